"""minicity's splits: one example is a pure function of (split, index, seed, size); object crops;
the preview grid."""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from synseg_jax import images
from synseg_jax.data import labels
from synseg_jax.data.minicity.gap import FULL, Gap
from synseg_jax.data.minicity.geometry import Layout
from synseg_jax.data.minicity.layout import OBJECT_PARAMS, sample_layout, sample_layout_from
from synseg_jax.data.minicity.materials import STUFF
from synseg_jax.data.minicity.raster import (
    DEFAULT_SCENE_SIZE, FULL_VIEW, draw_polygons, labels_from_index, rasterize_index,
    rasterize_labels)
from synseg_jax.data.minicity.render import render_from_index

VERSION = "2.0.0"  # bump when what the generator renders changes
SCENE_SPLITS: tuple[str, ...] = ("sim", "sim_topdown", "real_train", "real_val")
SPLITS: tuple[str, ...] = SCENE_SPLITS + ("objects",)
DEFAULT_NUM_EXAMPLES: dict[str, int] = {
    "sim": 3000, "sim_topdown": 2000, "real_train": 1500, "real_val": 500, "objects": 5000,
}
DEFAULT_OBJECT_SIZE = 64

# split -> (RNG stream code, layout domain, rendering style). Distinct codes keep every split's
# scenes disjoint, objects included.
SPLIT_INFO: dict[str, tuple[int, str, str]] = {
    "sim": (1, "sim", "sim"),
    "sim_topdown": (2, "sim_topdown", "sim"),
    "real_train": (3, "real", "real"),
    "real_val": (4, "real", "real"),
    "objects": (5, "real", "real"),
}


# Objects are mildly long-tailed, like an object-centric pretraining set.
_OBJECT_CLASS_WEIGHTS = np.array(
    [3, 2, 3, 1.5, 1.5, 1.5, 1, 1.5, 3, 1.5, 2, 2.5, 1, 3, 1.5, 1.5, 1, 1, 1.5], np.float64)
_OBJECT_CLASS_WEIGHTS /= _OBJECT_CLASS_WEIGHTS.sum()


def _instance_bbox(layout: Layout, prims: np.ndarray):
    pts = np.concatenate([layout.uv[layout.starts[i]:layout.starts[i + 1]] for i in prims])
    return pts.min(0), pts.max(0)


def _object_view(layout: Layout, rng, target: int):
    """A square viewport (u0, v0, du, dv) centred on one instance of `target`, or None, plus the
    primitives of that instance (None for stuff classes, checked by area instead)."""
    aspect = layout.camera.aspect
    if target in STUFF:
        coarse = labels_from_index(layout, rasterize_index(layout, (32, 64)))
        ys, xs = np.nonzero(coarse == target)
        if len(ys) == 0:
            return None, None
        i = rng.integers(len(ys))
        side = rng.uniform(0.1, 0.35)
        cu, cv = (xs[i] + 0.5) / 64, (ys[i] + 0.5) / 32
        return (cu - side / (2 * aspect), cv - side / 2, side / aspect, side), None
    candidates = np.nonzero(layout.cls == target)[0]
    if len(candidates) == 0:
        return None, None
    instances, first = np.unique(layout.instance[candidates], return_index=True)
    # Prefer instances that are large on screen: tiny far ones are mostly hidden or sub-pixel.
    lo = np.minimum.reduceat(layout.uv, layout.starts[:-1], axis=0)[candidates]
    hi = np.maximum.reduceat(layout.uv, layout.starts[:-1], axis=0)[candidates]
    height = np.maximum.reduceat(hi[:, 1], first) - np.minimum.reduceat(lo[:, 1], first)
    weights = np.sqrt(np.clip(height, 1e-4, 1.0))
    inst = instances[rng.choice(len(instances), p=weights / weights.sum())]
    prims = candidates[layout.instance[candidates] == inst]
    lo, hi = _instance_bbox(layout, prims)
    lo, hi = np.maximum(lo, -0.2), np.minimum(hi, 1.2)
    if np.any(hi <= lo) or (hi[1] - lo[1]) * 128 < 2.0:
        return None, None
    side = max((hi[0] - lo[0]) * aspect, hi[1] - lo[1]) * rng.uniform(1.15, 1.6)
    side = float(np.clip(side, 0.03, 1.0))
    cu = (lo[0] + hi[0]) / 2 + rng.uniform(-0.08, 0.08) * side / aspect
    cv = (lo[1] + hi[1]) / 2 + rng.uniform(-0.08, 0.08) * side
    return (cu - side / (2 * aspect), cv - side / 2, side / aspect, side), prims


def _object_is_visible(layout: Layout, index: np.ndarray, target: int, prims, viewport) -> bool:
    """Stuff must fill half the crop's centre; a thing must be at least half unoccluded and
    cover a minimum of the crop."""
    h, w = index.shape
    if prims is None:
        centre = labels_from_index(layout, index[h // 4:3 * h // 4, w // 4:3 * w // 4])
        return np.mean(centre == target) >= 0.5
    mask = np.zeros(layout.num_primitives + 1, bool)
    mask[prims + 1] = True
    visible = np.count_nonzero(np.take(mask, index))
    sub_uv = [layout.uv[layout.starts[i]:layout.starts[i + 1]] for i in prims]
    sub_starts = np.cumsum([0] + [len(s) for s in sub_uv])
    unoccluded = np.count_nonzero(
        draw_polygons((h, w), np.concatenate(sub_uv), sub_starts, np.ones(len(prims)), viewport))
    return unoccluded > 0 and visible >= 0.5 * unoccluded and visible >= 0.015 * index.size


def _render_object(rng, size: int) -> tuple[np.ndarray, int]:
    target = int(rng.choice(labels.NUM_CLASSES, p=_OBJECT_CLASS_WEIGHTS))
    for _ in range(10):
        layout = sample_layout_from(rng, "real", OBJECT_PARAMS, 2.0, target)
        for _ in range(3):
            viewport, prims = _object_view(layout, rng, target)
            if viewport is None:
                break
            index = rasterize_index(layout, (size, size), viewport)
            if _object_is_visible(layout, index, target, prims, viewport):
                return render_from_index(layout, index, "real", rng, viewport), target
    # Practically unreachable; label honestly by what fills the centre of the last crop.
    layout = sample_layout_from(rng, "real", OBJECT_PARAMS, 2.0, None)
    viewport = (0.45, layout.camera.horizon, 0.1, 0.2)
    index = rasterize_index(layout, (size, size), viewport)
    centre = labels_from_index(layout, index)[size // 4:3 * size // 4, size // 4:3 * size // 4]
    target = int(np.bincount(centre.ravel(), minlength=256)[:labels.NUM_CLASSES].argmax())
    return render_from_index(layout, index, "real", rng, viewport), target


def gap_suffix(gap: Gap) -> str:
    """"" for the full gap, else "-no_<knob>..." for the knobs turned off."""
    return "".join(f"-no_{knob}" for knob in gap.off)


def _check_split(split: str) -> None:
    if split not in SPLIT_INFO:
        raise ValueError(f"Unknown minicity split {split!r}; expected one of {SPLITS}")


def example_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The RNG of one example: independent of process, order and every other example."""
    _check_split(split)
    return np.random.default_rng([seed, SPLIT_INFO[split][0], index])


def scene_layout(split: str, index: int, *, seed: int = 0, scene_size=DEFAULT_SCENE_SIZE,
                 gap: Gap = FULL):
    """The layout (and the RNG, positioned for rendering) of a scene split's example."""
    _check_split(split)
    if split == "objects":
        raise ValueError("'objects' is not a scene split; use render_example")
    rng = example_rng(split, index, seed)
    h, w = scene_size
    return sample_layout(rng, SPLIT_INFO[split][1], aspect=w / h, gap=gap), rng


def render_example(split: str, index: int, *, seed: int = 0, scene_size=DEFAULT_SCENE_SIZE,
                   object_size: int = DEFAULT_OBJECT_SIZE, gap: Gap = FULL) -> dict:
    """Scene splits -> {"image": uint8 (H, W, 3), "label": uint8 (H, W) trainIds, "scene_id"};
    objects -> {"image": uint8 (S, S, 3), "label": int trainId, "scene_id"}.

    A pure function of its arguments: the same arguments give byte-identical output in any
    process and any order. `gap` turns domain-gap knobs off for the real scene splits (the
    objects, the demo's ImageNet stand-in, always keep the full real style)."""
    _check_split(split)
    scene_id = f"minicity-{VERSION}{gap_suffix(gap)}/{split}/{seed}/{index:06d}"
    if split == "objects":
        image, label = _render_object(example_rng(split, index, seed), int(object_size))
        return {"image": image, "label": label, "scene_id": scene_id}
    size = tuple(int(s) for s in scene_size)
    layout, rng = scene_layout(split, index, seed=seed, scene_size=size, gap=gap)
    index_map = rasterize_index(layout, size)
    image = render_from_index(layout, index_map, SPLIT_INFO[split][2], rng, FULL_VIEW, gap)
    return {"image": image, "label": labels_from_index(layout, index_map), "scene_id": scene_id}


def render_labels(split: str, index: int, *, seed: int = 0, scene_size=DEFAULT_SCENE_SIZE,
                  gap: Gap = FULL):
    """Only the label map of a scene example (cheap: no image), identical to render_example's."""
    layout, _ = scene_layout(split, index, seed=seed, scene_size=scene_size, gap=gap)
    return rasterize_labels(layout, tuple(scene_size))


# ----------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------

def preview(rows: int = 4, seed: int = 0, scene_size=DEFAULT_SCENE_SIZE) -> np.ndarray:
    """Rows of sim image | real image | colourised labels for shared layouts (the last row from
    the sim_topdown domain), then two rows of object crops."""
    h, w = scene_size
    lines = []
    for r in range(rows):
        if r == rows - 1 and rows > 1:
            domain = "sim_topdown"
        else:
            domain = "sim" if r % 2 == 0 else "real"
        rng = np.random.default_rng([seed, 99, r])
        layout = sample_layout(rng, domain, aspect=w / h)
        index = rasterize_index(layout, (h, w))
        lines.append(np.concatenate([
            render_from_index(layout, index, "sim", rng, FULL_VIEW),
            render_from_index(layout, index, "real", rng, FULL_VIEW),
            images.colorize(labels_from_index(layout, index))], axis=1))
    per_row = 3 * w // (h // 2)
    for r in range(2):
        crops = [render_example("objects", r * per_row + i, seed=seed, object_size=h // 2)["image"]
                 for i in range(per_row)]
        lines.append(np.concatenate(crops, axis=1))
    return np.concatenate(lines, axis=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a grid of minicity examples.")
    parser.add_argument("--preview", required=True, help="PNG path for a grid of examples")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    Image.fromarray(preview(args.rows, args.seed)).save(args.preview)
    print(f"wrote {args.preview}")
