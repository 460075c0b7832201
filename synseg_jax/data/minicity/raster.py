"""Rasterisation: a Layout becomes a map of primitive indices, and labels are read from it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from synseg_jax.data import labels
from synseg_jax.data.minicity.geometry import Layout

DEFAULT_SCENE_SIZE = (128, 256)
FULL_VIEW = (0.0, 0.0, 1.0, 1.0)


def draw_polygons(size, uv, starts, values, viewport, keep=None) -> np.ndarray:
    """Fill polygons in order into an int32 (H, W) map; `keep` (bool per polygon) culls."""
    h, w = size
    u0, v0, du, dv = viewport
    xy = (uv - (u0, v0)) * (w / du, h / dv)
    flat = xy.ravel().tolist()
    img = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for i in range(len(starts) - 1):
        if keep is None or keep[i]:
            draw.polygon(flat[2 * starts[i]:2 * starts[i + 1]], fill=int(values[i]))
    return np.asarray(img)


def in_view(uv: np.ndarray, starts: np.ndarray, viewport) -> np.ndarray | None:
    """Which polygons' bounding boxes meet the viewport (None: draw all, for full views)."""
    if viewport == FULL_VIEW:
        return None
    u0, v0, du, dv = viewport
    lo = np.minimum.reduceat(uv, starts[:-1], axis=0)
    hi = np.maximum.reduceat(uv, starts[:-1], axis=0)
    return (hi[:, 0] >= u0) & (lo[:, 0] <= u0 + du) & (hi[:, 1] >= v0) & (lo[:, 1] <= v0 + dv)


def rasterize_index(layout: Layout, size, viewport=FULL_VIEW) -> np.ndarray:
    """(H, W) int32 map of 1 + the index of the primitive painted last at each pixel (0: none).

    `viewport` = (u0, v0, du, dv) is the window of normalised image coordinates to render."""
    values = np.arange(1, layout.num_primitives + 1)
    keep = in_view(layout.uv, layout.starts, viewport)
    return draw_polygons(size, layout.uv, layout.starts, values, viewport, keep)


def labels_from_index(layout: Layout, index: np.ndarray) -> np.ndarray:
    lut = np.concatenate([[labels.IGNORE_LABEL], layout.cls]).astype(np.uint8)
    return np.take(lut, index)


def rasterize_labels(layout: Layout, size=DEFAULT_SCENE_SIZE) -> np.ndarray:
    """(H, W) uint8 trainIds of the layout; 255 where nothing was drawn (never, in practice)."""
    return labels_from_index(layout, rasterize_index(layout, tuple(size)))

