"""minicity: a procedural sim-to-real street-scene benchmark in the Cityscapes trainId taxonomy.

An example is a pure function of (split, index, seed, size). A scene *layout* (camera, curved road,
buildings, vehicles, people, poles ...) is sampled from a per-example RNG as 3-D boxes and
billboards, projected once to normalised image coordinates and painted far to near. Rendering
rasterises the layout into a primitive-index map; the label map and the image are both looked up
from that one map, so the `sim` and `real` renderings of a layout share their labels exactly.

The domain gap is built in on purpose:
* style: `sim` is flat, saturated and noise-free; `real` uses another per-class palette in which
  several brightness orderings flip (buildings and grass darker than the road, poles lighter
  than trees, a whitish sky), per-material textures (ground ones in perspective), shadows,
  light gradients, haze, white balance, vignetting, blur, sensor noise and JPEG;
* layout: the `real` camera is lower with its horizon further down and its class frequencies
  differ; `sim_topdown` (SYNTHIA-like) looks from higher up and never shows terrain, trucks or
  trains.
Instances vary in colour within a style, so shape, context and position carry the semantics.

The only process state is a cache of texture and sensor-noise tiles, built from fixed seeds so
that every process renders byte-identical examples.

`python -m synseg_jax.data.minicity --preview=PATH` writes a grid of examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from synseg_jax.data import labels

VERSION = "1.0.0"  # bump when what the generator renders changes
SCENE_SPLITS: tuple[str, ...] = ("sim", "sim_topdown", "real_train", "real_val")
SPLITS: tuple[str, ...] = SCENE_SPLITS + ("objects",)
DEFAULT_NUM_EXAMPLES: dict[str, int] = {
    "sim": 3000, "sim_topdown": 2000, "real_train": 1500, "real_val": 300, "objects": 5000,
}
DEFAULT_SCENE_SIZE = (128, 256)
DEFAULT_OBJECT_SIZE = 64
DOMAINS: tuple[str, ...] = ("sim", "real", "sim_topdown")
STYLES: tuple[str, ...] = ("sim", "real")

# split -> (RNG stream code, layout domain, rendering style). Distinct codes keep every split's
# scenes disjoint, objects included.
_SPLIT_INFO: dict[str, tuple[int, str, str]] = {
    "sim": (1, "sim", "sim"),
    "sim_topdown": (2, "sim_topdown", "sim"),
    "real_train": (3, "real", "real"),
    "real_val": (4, "real", "real"),
    "objects": (5, "real", "real"),
}

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(labels.NUM_CLASSES)
_STUFF = (ROAD, SIDEWALK, BUILDING, WALL, FENCE, VEGETATION, TERRAIN, SKY)
_GROUND = (ROAD, SIDEWALK, TERRAIN)

# ----------------------------------------------------------------------------------------------
# Materials: what a primitive looks like in each style. The class of a primitive is separate (a
# wheel is car, bus or bicycle), so one material serves several classes. Each style lists a few
# base colours per material; an instance picks one and a brightness jitter from its tone.
# ----------------------------------------------------------------------------------------------
TEXTURES: tuple[str, ...] = (
    "plain", "sky", "road", "marking", "sidewalk", "building", "wall", "fence", "pole",
    "vegetation", "terrain", "cloth", "metal", "glass")

_MATERIALS = (
    # name, real-style texture, sim colours, real colours
    ("sky", "sky", ((110, 180, 246), (130, 192, 248), (96, 168, 240)),
     ((206, 210, 214), (168, 190, 218), (224, 226, 228), (150, 178, 212))),
    ("road", "road", ((70, 64, 80), (80, 72, 90), (62, 60, 72)),
     ((122, 118, 112), (108, 108, 106), (134, 128, 118))),
    ("marking", "marking", ((246, 246, 246),), ((206, 206, 198), (188, 188, 182))),
    ("marking_yellow", "marking", ((250, 212, 40),), ((198, 172, 88),)),
    ("rail", "metal", ((36, 36, 40),), ((84, 78, 72),)),
    ("sidewalk", "sidewalk", ((236, 150, 130), (244, 172, 140), (226, 136, 150)),
     ((160, 158, 152), (174, 170, 160), (146, 146, 144))),
    ("building", "building",
     ((238, 208, 150), (180, 160, 220), (244, 178, 140), (186, 226, 188), (230, 200, 110),
      (242, 192, 212)),
     ((98, 90, 84), (124, 114, 102), (140, 86, 66), (86, 86, 92), (152, 142, 124),
      (112, 106, 98))),
    ("window", "glass", ((62, 96, 152), (92, 122, 172), (48, 80, 130)),
     ((40, 44, 52), (64, 70, 78), (94, 100, 106))),
    ("wall", "wall", ((234, 230, 172), (222, 202, 160), (240, 240, 204)),
     ((156, 150, 138), (136, 132, 124), (122, 120, 118))),
    ("fence", "fence", ((150, 92, 44), (172, 112, 52), (132, 80, 40)),
     ((114, 118, 124), (100, 104, 100), (132, 130, 122))),
    ("pole", "pole", ((42, 42, 46), (60, 60, 66), (30, 34, 40)),
     ((170, 170, 164), (152, 154, 152), (182, 180, 172))),
    ("light_box", "plain", ((28, 28, 28), (42, 44, 22)),
     ((60, 64, 58), (46, 50, 46), (72, 72, 68))),
    ("lamp_red", "plain", ((255, 40, 30),), ((158, 76, 64),)),
    ("lamp_amber", "plain", ((255, 204, 0),), ((158, 138, 76),)),
    ("lamp_green", "plain", ((40, 255, 96),), ((86, 148, 116),)),
    ("sign_face", "plain", ((20, 80, 226), (226, 30, 30), (250, 250, 250), (250, 212, 0)),
     ((66, 96, 144), (174, 68, 56), (206, 206, 196), (200, 172, 64))),
    ("sign_back", "metal", ((120, 120, 132),), ((134, 134, 132),)),
    ("vegetation", "vegetation", ((60, 184, 52), (40, 162, 72), (92, 192, 40)),
     ((58, 74, 38), (72, 86, 42), (50, 66, 42))),
    ("trunk", "terrain", ((128, 86, 40),), ((78, 66, 56), (66, 58, 52))),
    ("terrain", "terrain", ((172, 206, 80), (192, 212, 100), (160, 196, 70)),
     ((122, 112, 80), (108, 116, 74), (132, 120, 88))),
    ("cloth", "cloth",
     ((230, 40, 40), (40, 80, 230), (250, 200, 20), (40, 190, 60), (230, 110, 20), (150, 40, 200),
      (240, 240, 240), (30, 30, 30)),
     ((60, 62, 70), (98, 88, 76), (40, 42, 48), (122, 62, 56), (72, 86, 106), (142, 138, 130),
      (92, 98, 72), (30, 30, 34))),
    ("skin", "plain", ((252, 202, 160),), ((188, 148, 124), (152, 112, 88), (202, 168, 142))),
    ("car_body", "metal",
     ((230, 30, 30), (30, 100, 240), (250, 220, 30), (30, 200, 90), (250, 250, 250),
      (250, 130, 20), (150, 60, 220)),
     ((206, 206, 202), (162, 164, 166), (40, 40, 44), (56, 66, 98), (122, 42, 42), (98, 100, 102),
      (152, 142, 122))),
    ("vehicle_glass", "glass", ((76, 120, 170), (96, 140, 184)), ((34, 38, 46), (52, 58, 66))),
    ("wheel", "plain", ((22, 22, 22),), ((30, 30, 32),)),
    ("tail_light", "plain", ((255, 30, 30),), ((132, 40, 42),)),
    ("head_light", "plain", ((255, 255, 200),), ((202, 202, 186),)),
    ("truck_body", "metal", ((240, 240, 240), (250, 140, 20), (40, 120, 220)),
     ((202, 202, 198), (124, 128, 132), (152, 64, 44), (82, 92, 72))),
    ("bus_body", "metal", ((212, 40, 40), (40, 172, 80)),
     ((216, 198, 74), (202, 206, 210), (54, 94, 152))),
    ("train_body", "metal", ((40, 80, 212), (232, 232, 60)), ((224, 224, 218), (182, 54, 54))),
    ("moto_body", "metal", ((242, 122, 20), (232, 20, 20), (20, 20, 232)),
     ((44, 44, 50), (94, 24, 24), (74, 74, 80))),
    ("frame", "plain", ((236, 30, 152), (30, 222, 222), (236, 236, 30)),
     ((34, 34, 38), (64, 64, 74), (124, 34, 34), (142, 142, 142))),
    ("spokes", "plain", ((200, 200, 200),), ((98, 98, 98),)),
)
_MAT = {m[0]: i for i, m in enumerate(_MATERIALS)}
_MAT_TEXTURE = np.array([TEXTURES.index(m[1]) for m in _MATERIALS], np.int32)


def _palette_table(column: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_materials, K, 3) base colours padded by repetition, and the number of real entries."""
    k_max = max(len(m[column]) for m in _MATERIALS)
    table = np.zeros((len(_MATERIALS), k_max, 3), np.float32)
    counts = np.zeros(len(_MATERIALS), np.int32)
    for i, m in enumerate(_MATERIALS):
        colours = m[column]
        counts[i] = len(colours)
        for k in range(k_max):
            table[i, k] = colours[k % len(colours)]
    return table, counts


_PALETTES = {"sim": _palette_table(2), "real": _palette_table(3)}
# Brightness jitter per instance, and how much of the face shading each style keeps: game assets
# are uniformly lit, photos are not.
_STYLE_JITTER = {"sim": 0.16, "real": 0.22}
_STYLE_SHADING = {"sim": 0.35, "real": 1.0}

# ----------------------------------------------------------------------------------------------
# Domains: camera and class-frequency parameters of the scene distribution.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DomainParams:
    cam_height: tuple[float, float]   # metres
    horizon: tuple[float, float]      # image row of the horizon, fraction of the height
    road_half_width: tuple[float, float]
    max_curvature: float              # 1 / radius of the road centre line
    cars: float                       # expected number
    persons: float
    poles: float
    trees: float
    p_truck: float
    p_bus: float
    p_train: float
    p_moto: float
    p_bicycle: float
    p_rider: float                    # a bicycle or motorcycle is ridden
    p_light: float                    # per pole
    p_sign: float                     # per pole
    p_mast: float                     # an over-road traffic-light mast
    p_building: float                 # per facade segment
    building_height: tuple[float, float]
    p_wall: float
    p_fence: float
    p_verge: float                    # grass strip between road and sidewalk, per side
    terrain: bool                     # may the ground show terrain at all
    z_far: float                      # objects are placed up to this depth
    facade_end: tuple[float, float] = (110.0, 170.0)  # depth where the rows of blocks end


_DOMAINS: dict[str, DomainParams] = {
    "sim": DomainParams(
        cam_height=(1.6, 2.3), horizon=(0.32, 0.44), road_half_width=(4.5, 9.0),
        max_curvature=0.004, cars=5.0, persons=3.0, poles=3.0, trees=4.0, p_truck=0.35,
        p_bus=0.25, p_train=0.05, p_moto=0.2, p_bicycle=0.12, p_rider=0.55, p_light=0.25,
        p_sign=0.35, p_mast=0.2, p_building=0.65, building_height=(6.0, 32.0), p_wall=0.08,
        p_fence=0.08, p_verge=0.3, terrain=True, z_far=70.0),
    "real": DomainParams(
        cam_height=(1.1, 1.5), horizon=(0.40, 0.52), road_half_width=(3.5, 7.5),
        max_curvature=0.003, cars=6.5, persons=5.0, poles=4.0, trees=5.5, p_truck=0.15,
        p_bus=0.12, p_train=0.06, p_moto=0.1, p_bicycle=0.3, p_rider=0.5, p_light=0.3,
        p_sign=0.45, p_mast=0.25, p_building=0.55, building_height=(6.0, 24.0), p_wall=0.1,
        p_fence=0.12, p_verge=0.5, terrain=True, z_far=70.0),
    "sim_topdown": DomainParams(
        cam_height=(6.0, 12.0), horizon=(0.10, 0.28), road_half_width=(5.0, 10.0),
        max_curvature=0.004, cars=6.0, persons=4.0, poles=3.0, trees=4.0, p_truck=0.0,
        p_bus=0.25, p_train=0.0, p_moto=0.2, p_bicycle=0.15, p_rider=0.55, p_light=0.35,
        p_sign=0.35, p_mast=0.3, p_building=0.65, building_height=(6.0, 28.0), p_wall=0.1,
        p_fence=0.1, p_verge=0.4, terrain=False, z_far=90.0),
}

# Object crops see a small part of a scene: their layouts are real-domain scenes with a shorter
# street and fewer things, which makes them several times cheaper to sample.
_OBJECT_PARAMS = dataclasses.replace(
    _DOMAINS["real"], cars=2.0, persons=1.5, poles=1.5, trees=2.0, z_far=40.0,
    facade_end=(30.0, 60.0))

# What to force so that a layout sampled for an object crop of a class contains that class.
_REQUIRE: dict[int, dict[str, float]] = {
    ROAD: {}, SIDEWALK: {}, SKY: {}, BUILDING: {"p_building": 0.9},
    WALL: {"p_wall": 0.5}, FENCE: {"p_fence": 0.5}, POLE: {"poles": 5.0},
    LIGHT: {"p_light": 1.0, "poles": 3.0}, SIGN: {"p_sign": 1.0, "poles": 3.0},
    VEGETATION: {"trees": 6.0}, TERRAIN: {"p_verge": 1.0}, PERSON: {"persons": 5.0},
    RIDER: {"p_bicycle": 1.0, "p_rider": 1.0}, CAR: {"cars": 6.0}, TRUCK: {"p_truck": 1.0},
    BUS: {"p_bus": 1.0}, TRAIN: {"p_train": 1.0}, MOTORCYCLE: {"p_moto": 1.0},
    BICYCLE: {"p_bicycle": 1.0},
}

# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Camera:
    """Pinhole camera at x = 0, z = 0, looking down +z; pitch is folded into the horizon row."""
    height: float
    horizon: float
    focal: float   # in image heights
    aspect: float  # width / height

    def project(self, pts: np.ndarray) -> np.ndarray:
        """World (N, 3) -> normalised image (N, 2): u in [0, 1] across, v in [0, 1] down."""
        z = np.maximum(pts[:, 2], 0.05)
        u = 0.5 + self.focal * pts[:, 0] / (z * self.aspect)
        v = self.horizon + self.focal * (self.height - pts[:, 1]) / z
        return np.stack([u, v], axis=1)

    def ground_depth_at_bottom(self) -> float:
        return self.focal * self.height / max(1.0 - self.horizon, 0.05)


@dataclasses.dataclass(frozen=True)
class Road:
    """Centre line x(z) = x0 + k z^2 / 2; lateral profile per side: verge then sidewalk."""
    x0: float
    k: float
    half_width: float
    verge: tuple[float, float]       # (left, right) grass strip widths, 0 for none
    sidewalk: tuple[float, float]

    def centre(self, z):
        return self.x0 + 0.5 * self.k * z * z

    def heading(self, z: float) -> float:
        return math.atan(self.k * z)

    def kerb(self, side: int) -> float:
        """Lateral offset (from the centre line) of the sidewalk's road-side edge."""
        return side * (self.half_width + self.verge[1 if side > 0 else 0])

    def facade(self, side: int) -> float:
        i = 1 if side > 0 else 0
        return side * (self.half_width + self.verge[i] + self.sidewalk[i])


_GROUND_Z = np.geomspace(0.5, 420.0, 18)
# Unit circles as (n, 2) outlines, for discs, wheels, heads and crowns.
_CIRCLE = {n: np.stack([np.cos(a), np.sin(a)], axis=1)
           for n in (6, 8, 10, 12, 14) for a in [np.linspace(0, 2 * np.pi, n, endpoint=False)]}


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 10) -> np.ndarray:
    return _CIRCLE[n] * (rx, ry) + (cx, cy)


def _bar(p, q, width: float) -> np.ndarray:
    """A straight segment p -> q of the given width, as a 2-D quad."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    norm = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / norm * width / 2, dx / norm * width / 2
    return np.array([(p[0] + ox, p[1] + oy), (q[0] + ox, q[1] + oy),
                     (q[0] - ox, q[1] - oy), (p[0] - ox, p[1] - oy)])


def _blob_templates(count: int = 32, n: int = 12) -> np.ndarray:
    """Irregular unit outlines for tree crowns, fixed at import: picking one is much cheaper
    than drawing a fresh one per crown, and 32 shapes (x mirror, x scale) are plenty."""
    rng = np.random.default_rng(1234)
    radii = np.clip(1 + 0.16 * rng.standard_normal((count, n, 1)), 0.7, 1.3)
    return _CIRCLE[n][None] * radii * (1.0, 0.9)


_BLOBS = _blob_templates()


def _blob(rng, cx: float, cy: float, r: float) -> np.ndarray:
    """An irregular roundish outline of radius about r (tree crowns)."""
    k = int(rng.integers(len(_BLOBS)))
    return _BLOBS[k] * (r if k % 2 else -r, r) + (cx, cy)


def _strip(road: Road, a: float, b: float, z: np.ndarray = _GROUND_Z) -> np.ndarray:
    """The ground band between lateral offsets a and b from the road centre line, as 3-D points
    (near edge outwards, far edge back)."""
    n = len(z)
    pts = np.zeros((2 * n, 3))
    xc = road.centre(z)
    pts[:n, 0] = xc + a
    pts[n:, 0] = (xc + b)[::-1]
    pts[:n, 2] = z
    pts[n:, 2] = z[::-1]
    return pts


def _ground_quads(road: Road, offset: float, half_w: float, z0: np.ndarray, z1: np.ndarray):
    """(n, 4, 3) ground quads centred on a lateral offset between depths z0[i] and z1[i]."""
    x0, x1 = road.centre(z0) + offset, road.centre(z1) + offset
    quads = np.zeros((len(z0), 4, 3))
    quads[:, 0, 0], quads[:, 1, 0] = x0 - half_w, x1 - half_w
    quads[:, 2, 0], quads[:, 3, 0] = x1 + half_w, x0 + half_w
    quads[:, (0, 3), 2] = z0[:, None]
    quads[:, (1, 2), 2] = z1[:, None]
    return quads


def _prism_faces(corners, y0: float, y1: float, cam_height: float):
    """Visible faces of a vertical prism over a convex 4-corner (x, z) footprint.

    Returns [(quad (4, 3), (nx, nz) or None for the top)], quads ordered bottom-a, bottom-b,
    top-b, top-a so that `_inset` can address them. Faces of a convex solid never overlap on
    screen, so their order does not matter.
    """
    cx = sum(c[0] for c in corners) / 4
    cz = sum(c[1] for c in corners) / 4
    faces = []
    for i in range(4):
        (ax, az), (bx, bz) = corners[i], corners[(i + 1) % 4]
        nx, nz = bz - az, ax - bx
        if nx * ((ax + bx) / 2 - cx) + nz * ((az + bz) / 2 - cz) < 0:
            nx, nz = -nx, -nz
        if -nx * ax - nz * az > 0:  # the camera (origin) is on the outer side of this face
            norm = math.hypot(nx, nz) or 1.0
            quad = np.array([(ax, y0, az), (bx, y0, bz), (bx, y1, bz), (ax, y1, az)])
            faces.append((quad, (nx / norm, nz / norm)))
    if cam_height > y1:
        faces.append((np.array([(x, y1, z) for x, z in corners]), None))
    return faces


_INSET_CORNERS = np.array([[0, 2], [1, 2], [1, 3], [0, 3]])


def _insets(quad: np.ndarray, rects) -> np.ndarray:
    """Sub-rectangles (s0, s1, t0, t1) of a planar face quad, s along its bottom edge and t up
    its side, both in [0, 1]: (n, 4, 3) corners."""
    st = np.asarray(rects, np.float64).reshape(-1, 4)[:, _INSET_CORNERS]
    return quad[0] + st @ (quad[[1, 3]] - quad[0])


def _inset(quad: np.ndarray, s0: float, s1: float, t0: float, t1: float) -> np.ndarray:
    return _insets(quad, (s0, s1, t0, t1))[0]


def _footprint(x: float, z: float, heading: float, length: float, width: float,
               along: float = 0.0):
    """Corners of a box footprint centred `along` metres ahead of (x, z) on a heading."""
    fx, fz = math.sin(heading), math.cos(heading)
    rx, rz = fz, -fx
    cx, cz = x + fx * along, z + fz * along
    l, w = length / 2, width / 2
    return [(cx - fx * l - rx * w, cz - fz * l - rz * w),
            (cx - fx * l + rx * w, cz - fz * l + rz * w),
            (cx + fx * l + rx * w, cz + fz * l + rz * w),
            (cx + fx * l - rx * w, cz + fz * l - rz * w)]


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """A projected scene: polygons in paint order (far first), each with class and material.

    `uv[starts[i]:starts[i + 1]]` are the normalised image coordinates of primitive i;
    `instance` groups the primitives of one object; `shadow_*` are image-only ground shadows.
    """
    domain: str
    camera: Camera
    uv: np.ndarray
    starts: np.ndarray
    cls: np.ndarray
    mat: np.ndarray
    tone: np.ndarray
    shade: np.ndarray
    instance: np.ndarray
    shadow_uv: np.ndarray
    shadow_starts: np.ndarray

    @property
    def num_primitives(self) -> int:
        return len(self.cls)


class _Builder:
    """Collects primitives in paint groups (one object each), then sorts and projects them."""

    # Paint layers: background rectangles, distant skyline, ground, markings, then every 3-D
    # thing sorted far to near by its group's depth key.
    SKY, SKYLINE, GROUND, MARKINGS, THINGS = range(5)

    def __init__(self, rng: np.random.Generator, sun: tuple[float, float]):
        self.rng = rng
        self.sun = sun
        self._groups: list = []
        self._shadows: list[np.ndarray] = []

    def group(self, layer: int, depth: float = 0.0) -> list:
        prims: list = []
        self._groups.append((layer, -depth, len(self._groups), prims))
        return prims

    def shadow(self, ground_pts: np.ndarray) -> None:
        self._shadows.append(ground_pts)

    def face_shade(self, normal) -> float:
        if normal is None:
            return 1.08
        lit = normal[0] * self.sun[0] + normal[1] * self.sun[1]
        return 0.70 + 0.30 * max(lit, 0.0)

    def finish(self, domain: str, cam: Camera) -> Layout:
        # Screen-space groups (sky, skyline) come first in paint order; the rest are world
        # geometry, projected in one call.
        order = sorted(self._groups, key=lambda g: g[:3])
        prims = [p for g in order for p in g[3]]
        gids = [gid for gid, g in enumerate(order) for _ in g[3]]
        cls, mat, tone, shade, pts = zip(*prims)
        n_screen = sum(1 for p in pts if p.shape[1] == 2)
        if any(p.shape[1] != 2 for p in pts[:n_screen]):
            raise AssertionError("screen-space primitives must be painted before world ones")
        uv = np.concatenate(pts[:n_screen] + (cam.project(np.concatenate(pts[n_screen:])),))
        starts = np.cumsum([0] + [len(p) for p in pts])
        if self._shadows:
            shadow_uv = cam.project(np.concatenate(self._shadows))
            shadow_starts = np.cumsum([0] + [len(s) for s in self._shadows])
        else:
            shadow_uv, shadow_starts = np.zeros((0, 2)), np.zeros(1, np.int64)
        return Layout(
            domain=domain, camera=cam, uv=uv, starts=starts.astype(np.int64),
            cls=np.array(cls, np.uint8), mat=np.array(mat, np.int32),
            tone=np.array(tone, np.float32), shade=np.array(shade, np.float32),
            instance=np.array(gids, np.int32),
            shadow_uv=shadow_uv, shadow_starts=np.asarray(shadow_starts, np.int64))


def _add(prims: list, cls: int, mat: str, tone: float, pts: np.ndarray, shade: float = 1.0):
    prims.append((cls, _MAT[mat], tone, shade, pts))


def _add_billboard(prims: list, parts, x: float, z: float, angle: float = 0.0, y0: float = 0.0):
    """Add 2-D parts [(cls, mat, tone, (N, 2) metres)] standing in a vertical plane at (x, z),
    turned `angle` radians about the vertical axis (0 faces the camera)."""
    pts = np.concatenate([part[3] for part in parts])
    world = np.empty((len(pts), 3))
    world[:, 0] = x + pts[:, 0] * math.cos(angle)
    world[:, 1] = y0 + pts[:, 1]
    world[:, 2] = z + pts[:, 0] * math.sin(angle)
    i = 0
    for cls, mat, tone, part in parts:
        prims.append((cls, _MAT[mat], tone, 1.0, world[i:i + len(part)]))
        i += len(part)


def _add_prism(b: _Builder, prims: list, cls: int, mat: str, tone: float, corners, y0, y1, cam):
    faces = _prism_faces(corners, y0, y1, cam.height)
    for quad, normal in faces:
        _add(prims, cls, mat, tone, quad, b.face_shade(normal))
    return faces


# --- background, skyline, ground ---------------------------------------------------------------

def _background(b: _Builder, rng, cam: Camera, ground_cls: int) -> None:
    # Oversized so that object crops near the image border still find sky and ground.
    sky = b.group(b.SKY)
    _add(sky, SKY, "sky", rng.random(),
         np.array([(-2.0, -2.0), (3.0, -2.0), (3.0, cam.horizon + 0.01),
                   (-2.0, cam.horizon + 0.01)]))
    ground = b.group(b.SKY)
    _add(ground, ground_cls, "terrain" if ground_cls == TERRAIN else "sidewalk", rng.random(),
         np.array([(-2.0, cam.horizon), (3.0, cam.horizon), (3.0, 3.0), (-2.0, 3.0)]))


def _skyline(b: _Builder, rng, cam: Camera) -> None:
    """Distant blocks and tree lines along the horizon, drawn directly in image coordinates."""
    g = b.group(b.SKYLINE)
    u = -0.1
    while u < 1.1:
        width = rng.uniform(0.04, 0.16)
        scale = cam.focal / rng.uniform(150.0, 320.0)  # image heights per metre at that depth
        base = cam.horizon + scale * cam.height
        if rng.random() < 0.7:
            top = base - scale * rng.uniform(8.0, 70.0)
            _add(g, BUILDING, "building", rng.random(),
                 np.array([(u, top), (u + width, top), (u + width, base), (u, base)]), 0.9)
        else:
            r = scale * rng.uniform(4.0, 12.0)
            crown = _blob(rng, 0.0, 0.0, 1.0)
            _add(g, VEGETATION, "vegetation", rng.random(), np.stack(
                [u + width * (0.5 + 0.5 * crown[:, 0]),
                 np.minimum(base - r + r * crown[:, 1], base)], axis=1))
        u += width * rng.uniform(0.6, 1.1)


def _ground(b: _Builder, rng, road: Road, p: DomainParams, train_lane) -> None:
    g = b.group(b.GROUND)
    hw = road.half_width
    for side in (-1, 1):
        kerb, facade = road.kerb(side), road.facade(side)
        if road.verge[1 if side > 0 else 0] > 0:
            edge = side * hw
            verge_cls = TERRAIN if p.terrain else VEGETATION
            _add(g, verge_cls, "terrain" if p.terrain else "vegetation", rng.random(),
                 _strip(road, min(edge, kerb), max(edge, kerb)))
        _add(g, SIDEWALK, "sidewalk", rng.random(),
             _strip(road, min(kerb, facade), max(kerb, facade)))
    _add(g, ROAD, "road", rng.random(), _strip(road, -hw, hw))

    marks = b.group(b.MARKINGS)
    z0 = np.arange(rng.uniform(1.0, 9.0), 70.0, 9.0)
    z1 = z0 + 3.0
    lane_w = 2 * hw / _lane_count(road)
    for i in range(1, _lane_count(road)):
        offset = -hw + i * lane_w
        centre_line = abs(offset) < lane_w / 2
        mat = "marking_yellow" if centre_line and rng.random() < 0.4 else "marking"
        for quad in _ground_quads(road, offset, 0.08, z0, z1):
            _add(marks, ROAD, mat, 0.5, quad)
    for side in (-1, 1):
        if rng.random() < 0.6:  # solid edge line
            _add(marks, ROAD, "marking", 0.5, _strip(road, side * (hw - 0.35), side * (hw - 0.2)))
    if rng.random() < 0.25:  # zebra crossing
        zc = rng.uniform(6.0, 30.0)
        offsets = np.arange(-hw + 0.5, hw - 0.5, 1.0)
        for off in offsets:
            quad = _ground_quads(road, off, 0.25, np.array([zc]), np.array([zc + 3.0]))[0]
            _add(marks, ROAD, "marking", 0.5, quad)
    if train_lane is not None:
        for rail in (-0.72, 0.72):
            centre = train_lane + rail
            _add(marks, ROAD, "rail", 0.5, _strip(road, centre - 0.05, centre + 0.05))


def _lane_count(road: Road) -> int:
    return max(2, int(round(2 * road.half_width / 3.4)))


# --- facades -----------------------------------------------------------------------------------

def _facade_box(road: Road, side: int, z0: float, z1: float, inner: float, depth: float):
    """Footprint of a block along the road: inner edge `inner` metres from the centre line."""
    xi0, xi1 = road.centre(z0) + inner, road.centre(z1) + inner
    xo0, xo1 = xi0 + side * depth, xi1 + side * depth
    return [(xi0, z0), (xi1, z1), (xo1, z1), (xo0, z0)]


def _windows(b: _Builder, prims: list, quad: np.ndarray, height: float, length: float,
             near_z: float, cam: Camera, tone: float, shade: float) -> None:
    """Windows on a facade quad. A big grid is drawn as glass columns crossed by wall bands
    (columns + floors polygons instead of columns x floors); far facades get ribbons."""
    floor_px = cam.focal * 3.0 / max(near_z, 1.0) * 128
    if floor_px < 2.5 or height < 4.0:
        return
    floors = min(int((height - 1.0) // 3.2), 12 if floor_px >= 4.0 else 8)
    cols = max(1, int(length // 3.4))
    win_tone = b.rng.random()
    t0 = (1.2 + 3.2 * np.arange(floors)) / height
    if floor_px < 4.0:
        rects = np.stack([np.full_like(t0, 0.03), np.full_like(t0, 0.97), t0, t0 + 1.4 / height], 1)
        for window in _insets(quad, rects):
            _add(prims, BUILDING, "window", win_tone, window)
        return
    if floors * cols <= 16:
        s0 = (np.tile(np.arange(cols), floors) + 0.25) / cols
        t0 = np.repeat(t0, cols)
        rects = np.stack([s0, s0 + 0.5 / cols, t0, t0 + 1.6 / height], axis=1)
        for window in _insets(quad, rects):
            _add(prims, BUILDING, "window", win_tone, window)
        return
    s0 = (np.arange(cols) + 0.25) / cols
    top = t0[-1] + 1.6 / height
    columns = np.stack([s0, s0 + 0.5 / cols, np.full(cols, t0[0]), np.full(cols, top)], axis=1)
    for window in _insets(quad, columns):
        _add(prims, BUILDING, "window", win_tone, window)
    bands = np.stack([np.zeros(floors - 1), np.ones(floors - 1), t0[:-1] + 1.6 / height, t0[1:]], 1)
    for band in _insets(quad, bands):
        _add(prims, BUILDING, "building", tone, band, shade)


def _trees_behind(b: _Builder, prims: list, road: Road, side: int, z0: float, z1: float,
                  inner: float) -> None:
    rng = b.rng
    for z in np.arange(z0 + rng.uniform(1, 5), z1, rng.uniform(5, 10)):
        x = road.centre(z) + inner + side * rng.uniform(2.0, 8.0)
        _add_billboard(prims, _tree_parts(rng, rng.uniform(1.0, 1.4)), x, z)


def _facade(b: _Builder, rng, cam: Camera, road: Road, side: int, p: DomainParams) -> None:
    """Buildings, walls, fences and gaps along one side, each a group keyed by its far end so
    that anything on the street in front of it is painted after it."""
    z = -rng.uniform(0.0, 12.0)
    z_end = rng.uniform(*p.facade_end)
    facade = road.facade(side)
    while z < z_end:
        # Far blocks are few pixels wide: make them longer rather than numerous.
        length = rng.uniform(8.0, 30.0) * (1.0 + max(z, 0.0) / 60.0)
        z0, z1 = max(z, 0.5), z + length
        z = z1 + (rng.uniform(1.0, 6.0) if rng.random() < 0.2 else 0.0)
        if z1 <= 0.5:
            continue
        g = b.group(b.THINGS, depth=z1)
        kind = rng.random()
        setback = rng.uniform(0.0, 1.5)
        inner = facade + side * setback
        if kind < p.p_wall or kind > 1 - p.p_fence:
            # A garden wall or fence with a set-back block or trees behind it, painted first.
            behind = inner + side * rng.uniform(6.0, 20.0)
            if rng.random() < 0.5:
                _building(b, g, rng, cam, road, side, z0, z1, behind, p)
            else:
                _trees_behind(b, g, road, side, z0, z1, inner)
            _boundary(b, g, rng, cam, road, side, z0, z1, inner, WALL if kind < p.p_wall else FENCE)
            continue
        if kind < p.p_wall + p.p_building:
            _building(b, g, rng, cam, road, side, z0, z1, inner, p)
        elif rng.random() < 0.85:
            _trees_behind(b, g, road, side, z0, z1, inner)
    if rng.random() < 0.2:  # hedge along the back of the sidewalk
        hz0 = rng.uniform(2.0, 30.0)
        hz1 = hz0 + rng.uniform(8.0, 30.0)
        g = b.group(b.THINGS, depth=hz1 - 0.5)
        inner = facade - side * 0.9
        _add_prism(b, g, VEGETATION, "vegetation", rng.random(),
                   _facade_box(road, side, hz0, hz1, inner, 0.8), 0.0, rng.uniform(0.8, 1.5), cam)


def _building(b, g, rng, cam, road, side, z0, z1, inner, p: DomainParams) -> None:
    height = rng.uniform(*p.building_height)
    tone = rng.random()
    corners = _facade_box(road, side, z0, z1, inner, rng.uniform(12.0, 30.0))
    for quad, normal in _prism_faces(corners, 0.0, height, cam.height):
        shade = b.face_shade(normal)
        _add(g, BUILDING, "building", tone, quad, shade)
        if normal is not None and normal[0] * side < -0.5:  # the face towards the road
            _windows(b, g, quad, height, z1 - z0, z0, cam, tone, shade)
    if rng.random() < 0.6:
        # Sun from this side: the block shades the sidewalk and part of the road.
        if b.sun[0] * side > 0:
            reach = min(height * 0.3, 7.0)
            footprint = _facade_box(road, side, z0, z1, inner, -reach)
            b.shadow(np.array([(x, 0.0, zz) for x, zz in footprint]))


def _boundary(b, g, rng, cam, road, side, z0, z1, inner, cls: int) -> None:
    height = rng.uniform(1.2, 2.8) if cls == WALL else rng.uniform(1.0, 2.2)
    mat = "wall" if cls == WALL else "fence"
    tone = rng.random()
    corners = _facade_box(road, side, z0, z1, inner, 0.3)
    for quad, normal in _prism_faces(corners, 0.0, height, cam.height):
        _add(g, cls, mat, tone, quad, b.face_shade(normal))
        if cls == FENCE and normal is not None and abs(normal[0]) > 0.5:
            posts = min(8, max(2, int((z1 - z0) / 3.0)))
            s = (np.arange(posts) + 0.5) / posts
            rects = np.stack([s - 0.01, s + 0.01, np.zeros(posts), np.ones(posts)], axis=1)
            for post in _insets(quad, rects):
                _add(g, FENCE, mat, tone, post, 0.6)


# --- templates (2-D parts in metres, x right, y up, feet at y = 0) ------------------------------

def _tree_parts(rng, scale: float):
    trunk_h = rng.uniform(1.8, 3.2) * scale
    r = rng.uniform(1.3, 2.8) * scale
    parts = [(VEGETATION, "trunk", rng.random(),
              _bar((0, 0), (0, trunk_h + r * 0.5), rng.uniform(0.25, 0.45) * scale))]
    tone = rng.random()
    for _ in range(rng.integers(1, 3)):
        cx, cy = rng.uniform(-0.5, 0.5) * r, trunk_h + r * rng.uniform(0.8, 1.3)
        parts.append((VEGETATION, "vegetation", tone, _blob(rng, cx, cy, r)))
    return parts


def _person_parts(rng, cls: int = PERSON):
    s = rng.uniform(1.55, 1.95) / 1.75
    stride = rng.uniform(-0.18, 0.18)
    swing = rng.uniform(-0.1, 0.1)
    legs, top, skin = rng.random(), rng.random(), rng.random()
    parts = [
        (cls, "cloth", legs, _bar((-0.07, 0.86), (-0.07 + stride, 0.0), 0.14)),
        (cls, "cloth", legs, _bar((0.07, 0.86), (0.07 - stride, 0.0), 0.14)),
        (cls, "cloth", top, np.array([(-0.19, 0.8), (0.19, 0.8), (0.22, 1.44), (-0.22, 1.44)])),
        (cls, "cloth", top, _bar((-0.21, 1.4), (-0.27 - swing, 0.86), 0.09)),
        (cls, "cloth", top, _bar((0.21, 1.4), (0.27 + swing, 0.86), 0.09)),
        (cls, "skin", skin, _ellipse(0.0, 1.58, 0.1, 0.13, 8)),
    ]
    if rng.random() < 0.5:  # hair or a hat
        parts.append((cls, "cloth", rng.random(), _ellipse(0.0, 1.66, 0.105, 0.07, 8)))
    return [(c, m, t, pts * s) for c, m, t, pts in parts]


def _rider_parts(rng, seat, hands):
    """A seated person: hip on the seat, hands on the handlebar."""
    top, legs = rng.random(), rng.random()
    hip = (seat[0], seat[1] + 0.08)
    knee = (seat[0] + 0.38, seat[1] + 0.05)
    foot = (seat[0] + 0.25, 0.25)
    shoulder = (hip[0] + 0.22, hip[1] + 0.58)
    return [
        (RIDER, "cloth", legs, _bar(hip, knee, 0.16)),
        (RIDER, "cloth", legs, _bar(knee, foot, 0.12)),
        (RIDER, "cloth", top, _bar(hip, shoulder, 0.36)),
        (RIDER, "cloth", top, _bar(shoulder, hands, 0.09)),
        (RIDER, "skin" if rng.random() < 0.4 else "cloth", rng.random(),
         _ellipse(shoulder[0] + 0.06, shoulder[1] + 0.2, 0.11, 0.13, 8)),
    ]


def _wheel(cls: int, cx: float, cy: float, r: float, tone: float, hub_mat: str):
    return [(cls, "wheel", tone, _ellipse(cx, cy, r, r, 12)),
            (cls, hub_mat, tone, _ellipse(cx, cy, 0.78 * r, 0.78 * r, 12))]


def _bicycle_parts(rng, ridden: bool):
    tone = rng.random()
    rear, front, bb = (-0.52, 0.34), (0.52, 0.34), (-0.02, 0.3)
    seat, head, bar = (-0.2, 0.88), (0.38, 0.86), (0.32, 1.02)
    parts = (_wheel(BICYCLE, *rear, 0.34, tone, "spokes")
             + _wheel(BICYCLE, *front, 0.34, tone, "spokes"))
    for p, q in ((rear, bb), (bb, seat), (seat, rear), (seat, head), (bb, head), (head, front),
                 (head, bar)):
        parts.append((BICYCLE, "frame", tone, _bar(p, q, 0.06)))
    parts.append((BICYCLE, "wheel", tone, _bar((-0.3, 0.92), (-0.1, 0.92), 0.06)))
    if ridden:
        parts += _rider_parts(rng, seat, bar)
    return parts


def _motorcycle_parts(rng, ridden: bool):
    tone = rng.random()
    parts = _wheel(MOTORCYCLE, -0.7, 0.32, 0.32, tone, "wheel") + _wheel(
        MOTORCYCLE, 0.7, 0.32, 0.32, tone, "moto_body")
    parts += [
        (MOTORCYCLE, "moto_body", tone, np.array(
            [(-0.85, 0.5), (-0.3, 0.45), (0.45, 0.45), (0.7, 0.6), (0.55, 0.95), (0.2, 0.98),
             (-0.2, 0.85), (-0.8, 0.78)])),
        (MOTORCYCLE, "wheel", tone,
         np.array([(-0.55, 0.8), (0.05, 0.86), (0.05, 0.96), (-0.5, 0.93)])),
        (MOTORCYCLE, "frame", tone, _bar((0.52, 0.98), (0.7, 0.32), 0.07)),
        (MOTORCYCLE, "frame", tone, _bar((0.42, 1.1), (0.62, 1.12), 0.06)),
    ]
    if ridden:
        parts += _rider_parts(rng, (-0.25, 0.92), (0.5, 1.1))
    return parts


def _traffic_light_parts(rng, top: float, x: float = 0.0, facing: bool = True):
    """A signal head hanging from height `top`."""
    parts = [(LIGHT, "light_box", rng.random(),
              np.array([(x - 0.17, top - 0.95), (x + 0.17, top - 0.95), (x + 0.17, top),
                        (x - 0.17, top)]))]
    if facing:
        for i, lamp in enumerate(("lamp_red", "lamp_amber", "lamp_green")):
            parts.append((LIGHT, lamp, 0.5, _ellipse(x, top - 0.18 - 0.29 * i, 0.1, 0.1, 8)))
    return parts


def _sign_parts(rng, centre_x: float, centre_y: float):
    r = rng.uniform(0.35, 0.55)
    shape = rng.integers(4)
    facing = rng.random() < 0.75
    tone = rng.random()
    mat = "sign_face" if facing else "sign_back"
    if shape == 0:
        outline = _ellipse(centre_x, centre_y, r, r, 12)
    elif shape == 1:
        outline = np.array([(centre_x - r, centre_y + 0.6 * r), (centre_x + r, centre_y + 0.6 * r),
                            (centre_x, centre_y - 1.1 * r)])
    elif shape == 2:
        outline = np.array([(centre_x - r, centre_y - 0.7 * r), (centre_x + r, centre_y - 0.7 * r),
                            (centre_x + r, centre_y + 0.7 * r), (centre_x - r, centre_y + 0.7 * r)])
    else:
        outline = np.array([(centre_x, centre_y - r), (centre_x + r, centre_y),
                            (centre_x, centre_y + r), (centre_x - r, centre_y)])
    parts = [(SIGN, mat, tone, outline)]
    if facing and shape == 0 and rng.random() < 0.6:
        parts.append((SIGN, "sign_face", 0.6, _ellipse(centre_x, centre_y, 0.7 * r, 0.7 * r, 12)))
    return parts


# --- vehicles ----------------------------------------------------------------------------------

# length, width, height ranges (metres) and body material per vehicle class
_VEHICLES = {
    CAR: ((3.9, 4.9), (1.7, 1.95), (1.35, 1.6), "car_body"),
    TRUCK: ((6.5, 10.0), (2.3, 2.55), (3.2, 3.9), "truck_body"),
    BUS: ((10.5, 12.5), (2.45, 2.55), (2.9, 3.2), "bus_body"),
    TRAIN: ((18.0, 30.0), (2.5, 2.65), (3.3, 3.6), "train_body"),
}


def _side_wheels(prims, cls, quad, y0, positions, radius):
    """Wheels on a side face: discs centred `radius` above the ground."""
    p0, ds = quad[0], quad[1] - quad[0]
    length = float(np.linalg.norm(ds)) or 1.0
    along = ds / length
    disc = radius * (_CIRCLE[10] @ np.stack([along, (0.0, 1.0, 0.0)]))
    for pos in positions:
        _add(prims, cls, "wheel", 0.5, disc + (p0 + pos * ds + (0.0, radius - y0, 0.0)))


def _vehicle(b: _Builder, cls: int, x: float, z: float, heading: float, cam: Camera) -> float:
    """Add a vehicle whose centre is at (x, z); heading is its direction of travel. Returns its
    length so the caller can keep lanes clear."""
    rng = b.rng
    (l_lo, l_hi), (w_lo, w_hi), (h_lo, h_hi), mat = _VEHICLES[cls]
    length, width = rng.uniform(l_lo, l_hi), rng.uniform(w_lo, w_hi)
    height = rng.uniform(h_lo, h_hi)
    g = b.group(b.THINGS, depth=z - length / 2)
    tone = rng.random()
    fx, fz = math.sin(heading), math.cos(heading)
    clearance = {CAR: 0.22, TRUCK: 0.5, BUS: 0.35, TRAIN: 0.45}[cls]
    wheel_r = {CAR: 0.32, TRUCK: 0.5, BUS: 0.5, TRAIN: 0.45}[cls]

    def body(corners, y0, y1, glass):
        for quad, normal in _prism_faces(corners, y0, y1, cam.height):
            _add(g, cls, mat, tone, quad, b.face_shade(normal))
            if normal is None:
                continue
            along = normal[0] * fx + normal[1] * fz
            glass(quad, normal, along)

    # Lights and wheels of a vehicle a few pixels tall would not show; skipping them saves time.
    detailed = cam.focal * height / max(z - length / 2, 1.0) * 128 > 8.0

    def lower_glass(quad, normal, along):
        if not detailed:
            return
        if abs(along) > 0.7:  # an end face: lights and tyres seen from the front or back
            light = "head_light" if along > 0 else "tail_light"
            t0 = -clearance / float(quad[3, 1] - quad[0, 1])
            parts = _insets(quad, ((0.05, 0.2, 0.55, 0.75), (0.8, 0.95, 0.55, 0.75),
                                   (0.06, 0.19, t0, 0.02), (0.81, 0.94, t0, 0.02)))
            for k, mat_k in enumerate((light, light, "wheel", "wheel")):
                _add(g, cls, mat_k, 0.5, parts[k])
        else:
            positions = (0.18, 0.82) if cls != TRAIN else (0.1, 0.22, 0.78, 0.9)
            _side_wheels(g, cls, quad, clearance, positions, wheel_r)

    if cls == CAR:
        corners = _footprint(x, z, heading, length, width)
        body(corners, clearance, 0.55 * height, lower_glass)
        cabin = _footprint(x, z, heading, 0.5 * length, width - 0.12, along=-0.05 * length)

        def cabin_glass(quad, normal, along):
            if abs(along) > 0.7:
                _add(g, cls, "vehicle_glass", 0.5, _inset(quad, 0.08, 0.92, 0.1, 0.9))
            else:
                _add(g, cls, "vehicle_glass", 0.5, _inset(quad, 0.07, 0.93, 0.15, 0.85))
        body(cabin, 0.55 * height, height, cabin_glass)
    elif cls == TRUCK:
        cab_len = 2.2
        box = _footprint(x, z, heading, length - cab_len - 0.2, width, along=-(cab_len + 0.2) / 2)
        body(box, clearance + 0.2, height, lower_glass)
        cab = _footprint(x, z, heading, cab_len, width, along=(length - cab_len) / 2)

        def cab_glass(quad, normal, along):
            if along > 0.7:
                _add(g, cls, "vehicle_glass", 0.5, _inset(quad, 0.06, 0.94, 0.55, 0.9))
                for s0 in (0.05, 0.8):
                    _add(g, cls, "head_light", 0.5, _inset(quad, s0, s0 + 0.15, 0.15, 0.25))
            elif abs(along) <= 0.7:
                _add(g, cls, "vehicle_glass", 0.5, _inset(quad, 0.1, 0.6, 0.55, 0.88))
                _side_wheels(g, cls, quad, clearance, (0.5,), wheel_r)
        body(cab, clearance, 0.8 * height, cab_glass)
    else:  # bus, train: one long body with a band of windows (a train in two cars)
        cars = 1 if cls == BUS else 2
        car_len = (length - 0.6 * (cars - 1)) / cars
        for i in range(cars):
            offset = -length / 2 + car_len / 2 + i * (car_len + 0.6)
            corners = _footprint(x, z, heading, car_len, width, along=offset)

            def band(quad, normal, along):
                if abs(along) > 0.7:
                    _add(g, cls, "vehicle_glass", 0.5, _inset(quad, 0.06, 0.94, 0.4, 0.88))
                    _add(g, cls, "head_light" if along > 0 else "tail_light", 0.5,
                         _inset(quad, 0.06, 0.2, 0.12, 0.2))
                else:
                    n_win = int(car_len // 2.2)
                    s0 = (np.arange(n_win) + 0.12) / n_win
                    rects = np.stack([s0, s0 + 0.78 / n_win, np.full(n_win, 0.45),
                                      np.full(n_win, 0.85)], axis=1)
                    for window in _insets(quad, rects):
                        _add(g, cls, "vehicle_glass", 0.5, window)
                    if cls == BUS:
                        _side_wheels(g, cls, quad, clearance, (0.15, 0.8), wheel_r)
            body(corners, clearance, height, band)
    # Contact shadow: the footprint, a little wider, pushed away from the sun.
    corners = _footprint(x - 0.5 * b.sun[0], z - 0.5 * b.sun[1], heading, length + 0.4, width + 0.4)
    b.shadow(np.array([(cx, 0.0, cz) for cx, cz in corners]))
    return length


# --- street furniture and people ---------------------------------------------------------------

def _pole_group(b: _Builder, rng, road: Road, z: float, side: int, light: bool, sign: bool) -> None:
    x = road.centre(z) + road.kerb(side) + side * 0.5
    g = b.group(b.THINGS, depth=z)
    height = rng.uniform(3.5, 7.5) if (light or not sign) else rng.uniform(2.4, 3.4)
    width = rng.uniform(0.12, 0.24)
    tone = rng.random()
    parts = [(POLE, "pole", tone, _bar((0, 0), (0, height), width))]
    if light:
        parts += _traffic_light_parts(rng, height + 0.1, 0.0, facing=rng.random() < 0.75)
    elif height > 4.5 and rng.random() < 0.6:  # street lamp: arm over the road and a head
        reach = -side * rng.uniform(1.0, 2.0)
        parts.append((POLE, "pole", tone, _bar((0, height), (reach, height + 0.3), 0.1)))
        parts.append((POLE, "pole", tone, _ellipse(reach, height + 0.25, 0.35, 0.1, 6)))
    if sign:
        parts += _sign_parts(rng, -side * 0.32, rng.uniform(2.0, min(height, 3.2) - 0.1))
    _add_billboard(g, parts, x, z)


def _mast(b: _Builder, rng, cam, road: Road, z: float) -> None:
    """A traffic-light mast: pole on one kerb, arm across the road, lights hanging above lanes."""
    side = 1 if rng.random() < 0.7 else -1
    x = road.centre(z) + road.kerb(side) + side * 0.5
    g = b.group(b.THINGS, depth=z)
    height = rng.uniform(5.0, 7.0)
    reach = rng.uniform(0.5, 1.0) * road.half_width * 1.6
    tone = rng.random()
    parts = [(POLE, "pole", tone, _bar((0, 0), (0, height), 0.25)),
             (POLE, "pole", tone, _bar((0, height - 0.1), (-side * reach, height - 0.1), 0.15))]
    for k in range(rng.integers(1, 3)):
        parts += _traffic_light_parts(rng, height - 0.15, -side * reach * (0.5 + 0.45 * k))
    if rng.random() < 0.5:
        parts += _traffic_light_parts(rng, 3.2, -side * 0.35)
    _add_billboard(g, parts, x, z)


def _lanes(road: Road, rng) -> list[tuple[float, float]]:
    """(offset from the centre line, heading offset) per lane: right half drives away."""
    n = _lane_count(road)
    lane_w = 2 * road.half_width / n
    one_way = rng.random() < 0.3
    lanes = []
    for i in range(n):
        offset = -road.half_width + (i + 0.5) * lane_w
        lanes.append((offset, 0.0 if (offset > 0 or one_way) else math.pi))
    return lanes


def _street(b: _Builder, rng, cam: Camera, road: Road, p: DomainParams, train_lane) -> None:
    z_lo = max(3.0, 0.75 * cam.ground_depth_at_bottom())
    z_hi = max(p.z_far, z_lo + 30.0)
    lanes = _lanes(road, rng)
    ego = min(range(len(lanes)), key=lambda i: abs(lanes[i][0] + road.x0))
    occupied: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(lanes))}

    def claim(lane: int, z0: float, z1: float) -> bool:
        if any(z0 < b1 + 2.0 and z1 > a1 - 2.0 for a1, b1 in occupied[lane]):
            return False
        occupied[lane].append((z0, z1))
        return True

    if train_lane is not None:
        lane = min(range(len(lanes)), key=lambda i: abs(lanes[i][0] - train_lane))
        z = rng.uniform(max(z_lo, 12.0), 50.0)
        heading = road.heading(z) + (rng.random() < 0.5) * math.pi
        length = _vehicle(b, TRAIN, road.centre(z) + train_lane, z, heading, cam)
        occupied[lane].append((z - length / 2, z + length / 2))
    if rng.random() < 0.45:  # parked cars along a kerb, blocking the outer lane
        side = 1 if rng.random() < 0.6 else -1
        lane = len(lanes) - 1 if side > 0 else 0
        for z in np.arange(rng.uniform(z_lo, 20.0), z_hi, rng.uniform(5.5, 9.0)):
            if rng.random() < 0.7 and claim(lane, z - 2.5, z + 2.5):
                x = road.centre(z) + side * (road.half_width - 1.1)
                _vehicle(b, CAR, x, z, road.heading(z) + (rng.random() < 0.3) * math.pi, cam)
    kinds = [TRUCK] if rng.random() < p.p_truck else []
    kinds += [BUS] if rng.random() < p.p_bus else []
    kinds += [CAR] * rng.poisson(p.cars)
    for cls in kinds:
        for _ in range(6):
            lane = int(rng.integers(len(lanes)))
            z = rng.uniform(z_lo + 2.0, z_hi)
            if lane == ego and z < 9.0:
                continue
            half = _VEHICLES[cls][0][1] / 2
            if claim(lane, z - half, z + half):
                offset, turn = lanes[lane]
                x = road.centre(z) + offset + rng.uniform(-0.3, 0.3)
                _vehicle(b, cls, x, z, road.heading(z) + turn, cam)
                break

    def two_wheeler(kind: int, ridden: bool) -> None:
        z = rng.uniform(z_lo + 1.0, min(z_hi, 30.0))
        angle = (1 if rng.random() < 0.5 else -1) * rng.uniform(0.35, 1.0)
        if ridden:
            lane = max(0, min(len(lanes) - 1, ego + int(rng.integers(-1, 2))))
            if not claim(lane, z - 1.0, z + 1.0):
                return
            x = road.centre(z) + lanes[lane][0] + rng.uniform(-1.0, 1.0)
        else:
            side = (1 if rng.random() < 0.5 else -1)
            x = road.centre(z) + road.kerb(side) + side * rng.uniform(0.5, 1.5)
            angle = rng.uniform(-0.5, 0.5)
        parts = _bicycle_parts(rng, ridden) if kind == BICYCLE else _motorcycle_parts(rng, ridden)
        _add_billboard(b.group(b.THINGS, depth=z), parts, x, z, angle)

    for kind, prob in ((BICYCLE, p.p_bicycle), (MOTORCYCLE, p.p_moto)):
        if rng.random() < prob:
            for _ in range(1 + (rng.random() < 0.3)):
                two_wheeler(kind, rng.random() < p.p_rider)

    for _ in range(rng.poisson(p.persons)):
        z = rng.uniform(z_lo, min(z_hi, 40.0))
        if rng.random() < 0.12:  # crossing the road
            x = road.centre(z) + rng.uniform(-road.half_width, road.half_width)
        else:
            side = (1 if rng.random() < 0.5 else -1)
            across = rng.uniform(0.3, 0.9) * road.sidewalk[1 if side > 0 else 0]
            x = road.centre(z) + road.kerb(side) + side * across
        _add_billboard(b.group(b.THINGS, depth=z), _person_parts(rng), x, z, rng.uniform(-0.3, 0.3))
        lean = 0.4 * b.sun[0]
        b.shadow(np.array([(x - 0.4 - lean, 0, z - 0.2), (x + 0.4 - lean, 0, z - 0.2),
                           (x + 0.4, 0, z + 0.3), (x - 0.4, 0, z + 0.3)]))

    for _ in range(rng.poisson(p.poles)):
        z = rng.uniform(z_lo, z_hi)
        light = rng.random() < p.p_light
        sign = rng.random() < p.p_sign
        _pole_group(b, rng, road, z, (1 if rng.random() < 0.5 else -1), light, sign)
    if rng.random() < p.p_mast:
        _mast(b, rng, cam, road, rng.uniform(max(z_lo, 12.0), 45.0))

    for _ in range(rng.poisson(p.trees)):
        z = rng.uniform(z_lo, z_hi)
        side = (1 if rng.random() < 0.5 else -1)
        i = 1 if side > 0 else 0
        if road.verge[i] > 0:
            x = road.centre(z) + side * (road.half_width + road.verge[i] / 2)
        else:
            x = road.centre(z) + road.kerb(side) + side * rng.uniform(0.6, 0.9) * road.sidewalk[i]
        _add_billboard(b.group(b.THINGS, depth=z), _tree_parts(rng, rng.uniform(0.8, 1.3)), x, z)


def sample_layout(rng: np.random.Generator, domain: str, *, aspect: float = 2.0,
                  require: int | None = None) -> Layout:
    """Sample a scene of `domain` ("sim", "real" or "sim_topdown"); `require` (a trainId) raises
    the odds of that class so that object crops can find it."""
    if domain not in _DOMAINS:
        raise ValueError(f"Unknown domain {domain!r}; expected one of {DOMAINS}")
    return _sample_layout(rng, domain, _DOMAINS[domain], aspect, require)


def _sample_layout(rng, domain: str, p: DomainParams, aspect: float, require) -> Layout:
    if require is not None:
        p = dataclasses.replace(p, **_REQUIRE[require])
    cam = Camera(height=rng.uniform(*p.cam_height), horizon=rng.uniform(*p.horizon),
                 focal=rng.uniform(0.92, 1.08), aspect=aspect)
    half_width = rng.uniform(*p.road_half_width)
    verge = tuple(rng.uniform(0.8, 2.5) if rng.random() < p.p_verge else 0.0 for _ in range(2))
    road = Road(x0=-rng.uniform(0.25, 0.75) * half_width, k=rng.uniform(-1, 1) * p.max_curvature,
                half_width=half_width, verge=verge,
                sidewalk=(rng.uniform(1.5, 4.5), rng.uniform(1.5, 4.5)))
    sun_angle = rng.uniform(0, 2 * np.pi)
    b = _Builder(rng, (math.cos(sun_angle), math.sin(sun_angle)))
    ground_cls = TERRAIN if (p.terrain and rng.random() < 0.5) else SIDEWALK
    train_lane = None
    if rng.random() < p.p_train:
        train_lane = rng.uniform(-0.3, 0.3) * half_width
    _background(b, rng, cam, ground_cls)
    _skyline(b, rng, cam)
    _ground(b, rng, road, p, train_lane)
    for side in (-1, 1):
        _facade(b, rng, cam, road, side, p)
    _street(b, rng, cam, road, p, train_lane)
    return b.finish(domain, cam)


# ----------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------

_FULL_VIEW = (0.0, 0.0, 1.0, 1.0)


def _draw_polygons(size, uv, starts, values, viewport, keep=None) -> np.ndarray:
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


def _in_view(uv: np.ndarray, starts: np.ndarray, viewport) -> np.ndarray | None:
    """Which polygons' bounding boxes meet the viewport (None: draw all, for full views)."""
    if viewport == _FULL_VIEW:
        return None
    u0, v0, du, dv = viewport
    lo = np.minimum.reduceat(uv, starts[:-1], axis=0)
    hi = np.maximum.reduceat(uv, starts[:-1], axis=0)
    return (hi[:, 0] >= u0) & (lo[:, 0] <= u0 + du) & (hi[:, 1] >= v0) & (lo[:, 1] <= v0 + dv)


def rasterize_index(layout: Layout, size, viewport=_FULL_VIEW) -> np.ndarray:
    """(H, W) int32 map of 1 + the index of the primitive painted last at each pixel (0: none).

    `viewport` = (u0, v0, du, dv) is the window of normalised image coordinates to render."""
    values = np.arange(1, layout.num_primitives + 1)
    keep = _in_view(layout.uv, layout.starts, viewport)
    return _draw_polygons(size, layout.uv, layout.starts, values, viewport, keep)


def _labels_from_index(layout: Layout, index: np.ndarray) -> np.ndarray:
    lut = np.concatenate([[labels.IGNORE_LABEL], layout.cls]).astype(np.uint8)
    return np.take(lut, index)


def rasterize_labels(layout: Layout, size=DEFAULT_SCENE_SIZE) -> np.ndarray:
    """(H, W) uint8 trainIds of the layout; 255 where nothing was drawn (never, in practice)."""
    return _labels_from_index(layout, rasterize_index(layout, tuple(size)))


# ----------------------------------------------------------------------------------------------
# Styles
# ----------------------------------------------------------------------------------------------

_TILE = 256


def _periodic_noise(rng, feature_px: float, shape=(_TILE, _TILE)) -> np.ndarray:
    """Seamlessly tiling Gaussian noise with blobs about `feature_px` wide, unit std."""
    spectrum = np.fft.rfft2(rng.standard_normal(shape))
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    low_pass = np.exp(-((fx ** 2 + fy ** 2) * (feature_px * 2.0) ** 2))
    noise = np.fft.irfft2(spectrum * low_pass, s=shape)
    return (noise - noise.mean()) / (noise.std() + 1e-8)


@functools.lru_cache(maxsize=None)
def texture_tiles() -> np.ndarray:
    """(len(TEXTURES), T, T) float32 multiplicative texture offsets, built once per process
    from a fixed seed so that every process renders identical images."""
    rng = np.random.default_rng(20240601)
    t = _TILE
    y, x = np.mgrid[0:t, 0:t]
    grain = lambda: rng.standard_normal((t, t))  # noqa: E731
    n = lambda px: _periodic_noise(rng, px)  # noqa: E731
    tiles = {
        "plain": 0.03 * grain(),
        "sky": 0.10 * np.clip(n(24.0), 0.0, None) + 0.03 * n(60.0),
        "road": 0.06 * grain() + 0.08 * n(20.0) - 0.12 * np.clip(n(6.0) - 1.6, 0.0, None),
        "marking": 0.05 * grain() - 0.15 * np.clip(n(3.0), 0.0, None),
        "sidewalk": (-0.22 * ((y % 10 == 0) | (x % 12 == 0)) + 0.05 * grain()
                     + 0.06 * np.repeat(np.repeat(rng.standard_normal((t // 10 + 1, t // 12 + 1)),
                                                  10, 0), 12, 1)[:t, :t]),
        "building": (-0.12 * ((y % 4 == 0) | ((x + 4 * ((y // 4) % 2)) % 8 == 0)) + 0.10 * n(24.0)
                     + 0.04 * grain()),
        "wall": 0.10 * n(10.0) + 0.05 * grain() - 0.15 * (x % 24 == 0),
        "fence": np.where(((x + y) % 6 == 0) | ((x - y) % 6 == 0), 0.3, -0.2) + 0.03 * grain(),
        "pole": 0.08 * np.repeat(_periodic_noise(rng, 2.0, (1, t)), t, 0) + 0.03 * grain(),
        "vegetation": 0.35 * np.tanh(2.0 * n(2.5)) + 0.12 * n(8.0) + 0.05 * grain(),
        "terrain": 0.15 * n(3.0) + 0.08 * grain() + 0.10 * n(20.0),
        "cloth": 0.07 * n(3.0) + 0.03 * grain(),
        "metal": 0.06 * n(16.0) + 0.02 * grain(),
        "glass": 0.15 * n(10.0) + 0.02 * grain(),
    }
    return np.stack([tiles[name] for name in TEXTURES]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _sensor_noise_tile(h: int, w: int) -> np.ndarray:
    """Planar unit Gaussian noise a little larger than an image, read at a random offset."""
    return np.random.default_rng(7).standard_normal((3, h + 32, w + 32)).astype(np.float32)


def _colour_lut(layout: Layout, style: str) -> np.ndarray:
    table, counts = _PALETTES[style]
    n_colours = counts[layout.mat]
    pick = layout.tone * n_colours
    k = np.minimum(pick.astype(np.int32), n_colours - 1)
    jitter = 1.0 + _STYLE_JITTER[style] * (2.0 * (pick - k) - 1.0)
    shade = 1.0 + _STYLE_SHADING[style] * (layout.shade - 1.0)
    colours = table[layout.mat, k] * (jitter * shade)[:, None]
    return np.concatenate([np.zeros((1, 3), np.float32), colours]).astype(np.float32)


def _binomial_blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication: a cheap lens."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    v = 0.25 * (p[:-2] + p[2:]) + 0.5 * p[1:-1]
    return 0.25 * (v[:, :-2] + v[:, 2:]) + 0.5 * v[:, 1:-1]


# Ground materials are textured in world coordinates (perspective-correct paving, asphalt and
# grass); everything else in screen coordinates.
_GROUND_TEXTURES = np.zeros(len(TEXTURES), bool)
_GROUND_TEXTURES[[TEXTURES.index(t) for t in ("road", "marking", "sidewalk", "terrain")]] = True
_GROUND_TEXEL = 0.05  # metres
_HAZE_COLOUR = np.array((200, 205, 212), np.float32)
_IS_GROUND = np.isin(np.arange(256), _GROUND)


def _pixel_coords(shape, viewport) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image coordinates of pixel centres: (H, 1) rows and (1, W) columns."""
    h, w = shape
    u0, v0, du, dv = viewport
    ys = (v0 + (np.arange(h, dtype=np.float32) + 0.5) * np.float32(dv / h))[:, None]
    xs = (u0 + (np.arange(w, dtype=np.float32) + 0.5) * np.float32(du / w))[None, :]
    return ys, xs


def _texture_field(layout: Layout, index: np.ndarray, rng, ys, xs) -> np.ndarray:
    """(H, W) float32 multiplicative shading from the texture of each pixel's material."""
    h, w = index.shape
    t = _TILE
    tex = np.concatenate([[0], _MAT_TEXTURE[layout.mat]])
    base = np.take((tex * (t * t)).astype(np.int32), index)
    oy, ox = (int(o) for o in rng.integers(t, size=2))
    flat = base + (((np.arange(h) + oy) % t) * t).astype(np.int32)[:, None]
    flat += ((np.arange(w) + ox) % t).astype(np.int32)[None, :]

    # Rows below the horizon may hold ground; index them by where they hit the road plane.
    cam = layout.camera
    r0 = int(np.searchsorted(ys[:, 0], cam.horizon + 2e-3))
    ground = np.take(_GROUND_TEXTURES[tex], index[r0:]) if r0 < h else None
    if ground is not None and ground.any():
        z = cam.focal * cam.height / (ys[r0:, 0] - cam.horizon)
        g_row = (((z / _GROUND_TEXEL).astype(np.int64) + oy) % t * t).astype(np.int32)
        x = (xs - 0.5) * (z * (cam.aspect / cam.focal / _GROUND_TEXEL))[:, None]
        g_col = ((np.floor(x).astype(np.int64) + ox) % t).astype(np.int32)
        g_flat = base[r0:] + g_row[:, None] + g_col
        flat[r0:] = np.where(ground, g_flat, flat[r0:])
    value = np.take(texture_tiles().reshape(-1), flat)
    if ground is not None and ground.any():
        # Far ground aliases into noise: let it fade to the flat colour with distance.
        fade = np.exp(z * np.float32(-1.0 / 25.0)).astype(np.float32)[:, None]
        value[r0:] = np.where(ground, value[r0:] * fade, value[r0:])
    value += 1.0
    return value


def _real_finish(layout: Layout, index: np.ndarray, rng, viewport) -> np.ndarray:
    """Photo-like rendering: textures, shadows, light gradient, haze, white balance, vignetting,
    lens blur, sensor noise and JPEG. Works on planar (3, H, W) arrays, where numpy's
    broadcasting of per-pixel factors over channels is several times faster than on (H, W, 3)."""
    h, w = index.shape
    ys, xs = _pixel_coords((h, w), viewport)
    cls = _labels_from_index(layout, index)
    gains = np.float32(rng.uniform(0.85, 1.15)) * np.array(
        (rng.uniform(1.0, 1.12), 1.0, rng.uniform(0.82, 0.98)), np.float32)
    colours = (_colour_lut(layout, "real") * gains).T.copy()

    field = _texture_field(layout, index, rng, ys, xs)
    if len(layout.shadow_starts) > 1:
        shadow = _draw_polygons((h, w), layout.shadow_uv, layout.shadow_starts,
                                np.ones(len(layout.shadow_starts) - 1), viewport,
                                _in_view(layout.shadow_uv, layout.shadow_starts, viewport))
        field *= 1.0 - np.float32(rng.uniform(0.3, 0.5)) * ((shadow > 0) & np.take(_IS_GROUND, cls))
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + np.float32(rng.uniform(0.1, 0.35)) * (
        (xs - 0.5) * np.float32(math.cos(angle)) + (ys - 0.5) * np.float32(math.sin(angle)))
    vignette = 1.0 - np.float32(rng.uniform(0.15, 0.4) * 2.0) * ((xs - 0.5) ** 2 + (ys - 0.5) ** 2)
    # Aerial perspective: what lies near the horizon is far away and fades towards the sky.
    haze = np.float32(rng.uniform(0.1, 0.3)) * np.exp(-np.abs(ys - layout.camera.horizon) / 0.05)
    haze = np.where(cls == SKY, np.float32(0), haze) * vignette
    field *= light * vignette
    field -= haze * field  # field * (1 - haze), without another temporary
    img = np.take(colours, index, axis=1)
    img *= field
    img += haze * (_HAZE_COLOUR * gains)[:, None, None]
    # Lens: a 2x2 box blur (a half-pixel shift) in each direction; edges keep their value.
    img[:, 1:] += img[:, :-1]
    img[:, 0] *= 2.0
    img[:, :, 1:] += img[:, :, :-1]
    img[:, :, 0] *= 2.0
    img *= 0.25
    noise_y, noise_x = (int(o) for o in rng.integers(32, size=2))
    img += np.float32(rng.uniform(2.0, 7.0)) * _sensor_noise_tile(h, w)[:, noise_y:noise_y + h,
                                                                         noise_x:noise_x + w]
    np.clip(img, 0, 255, out=img)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8).transpose(1, 2, 0)).save(
        buf, format="JPEG", quality=int(rng.integers(30, 80)))
    return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _render_from_index(layout: Layout, index: np.ndarray, style: str, rng, viewport) -> np.ndarray:
    if style not in STYLES:
        raise ValueError(f"Unknown style {style!r}; expected one of {STYLES}")
    if style == "sim":
        colours = np.clip(_colour_lut(layout, style) + 0.5, 0, 255).astype(np.uint8)
        return np.take(colours, index, axis=0)
    return _real_finish(layout, index, rng, viewport)


def render_image(layout: Layout, style: str, size=DEFAULT_SCENE_SIZE, rng=None,
                 viewport=_FULL_VIEW) -> np.ndarray:
    """(H, W, 3) uint8 image of the layout in "sim" or "real" style; `rng` drives the per-image
    camera effects of the real style (the sim style uses none)."""
    rng = np.random.default_rng(0) if rng is None else rng
    index = rasterize_index(layout, tuple(size), viewport)
    return _render_from_index(layout, index, style, rng, viewport)


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------

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
    if target in _STUFF:
        coarse = _labels_from_index(layout, rasterize_index(layout, (32, 64)))
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
        centre = _labels_from_index(layout, index[h // 4:3 * h // 4, w // 4:3 * w // 4])
        return np.mean(centre == target) >= 0.5
    mask = np.zeros(layout.num_primitives + 1, bool)
    mask[prims + 1] = True
    visible = np.count_nonzero(np.take(mask, index))
    sub_uv = [layout.uv[layout.starts[i]:layout.starts[i + 1]] for i in prims]
    sub_starts = np.cumsum([0] + [len(s) for s in sub_uv])
    unoccluded = np.count_nonzero(
        _draw_polygons((h, w), np.concatenate(sub_uv), sub_starts, np.ones(len(prims)), viewport))
    return unoccluded > 0 and visible >= 0.5 * unoccluded and visible >= 0.015 * index.size


def _render_object(rng, size: int) -> tuple[np.ndarray, int]:
    target = int(rng.choice(labels.NUM_CLASSES, p=_OBJECT_CLASS_WEIGHTS))
    for _ in range(10):
        layout = _sample_layout(rng, "real", _OBJECT_PARAMS, 2.0, target)
        for _ in range(3):
            viewport, prims = _object_view(layout, rng, target)
            if viewport is None:
                break
            index = rasterize_index(layout, (size, size), viewport)
            if _object_is_visible(layout, index, target, prims, viewport):
                return _render_from_index(layout, index, "real", rng, viewport), target
    # Practically unreachable; label honestly by what fills the centre of the last crop.
    layout = _sample_layout(rng, "real", _OBJECT_PARAMS, 2.0, None)
    viewport = (0.45, layout.camera.horizon, 0.1, 0.2)
    index = rasterize_index(layout, (size, size), viewport)
    centre = _labels_from_index(layout, index)[size // 4:3 * size // 4, size // 4:3 * size // 4]
    target = int(np.bincount(centre.ravel(), minlength=256)[:labels.NUM_CLASSES].argmax())
    return _render_from_index(layout, index, "real", rng, viewport), target


def _check_split(split: str) -> None:
    if split not in _SPLIT_INFO:
        raise ValueError(f"Unknown minicity split {split!r}; expected one of {SPLITS}")


def example_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The RNG of one example: independent of process, order and every other example."""
    _check_split(split)
    return np.random.default_rng([seed, _SPLIT_INFO[split][0], index])


def scene_layout(split: str, index: int, *, seed: int = 0, scene_size=DEFAULT_SCENE_SIZE):
    """The layout (and the RNG, positioned for rendering) of a scene split's example."""
    _check_split(split)
    if split == "objects":
        raise ValueError("'objects' is not a scene split; use render_example")
    rng = example_rng(split, index, seed)
    h, w = scene_size
    return sample_layout(rng, _SPLIT_INFO[split][1], aspect=w / h), rng


def render_example(split: str, index: int, *, seed: int = 0, scene_size=DEFAULT_SCENE_SIZE,
                   object_size: int = DEFAULT_OBJECT_SIZE) -> dict:
    """Scene splits -> {"image": uint8 (H, W, 3), "label": uint8 (H, W) trainIds, "scene_id"};
    objects -> {"image": uint8 (S, S, 3), "label": int trainId, "scene_id"}.

    A pure function of its arguments: the same arguments give byte-identical output in any
    process and any order."""
    _check_split(split)
    scene_id = f"minicity-{VERSION}/{split}/{seed}/{index:06d}"
    if split == "objects":
        image, label = _render_object(example_rng(split, index, seed), int(object_size))
        return {"image": image, "label": label, "scene_id": scene_id}
    size = tuple(int(s) for s in scene_size)
    layout, rng = scene_layout(split, index, seed=seed, scene_size=size)
    index_map = rasterize_index(layout, size)
    image = _render_from_index(layout, index_map, _SPLIT_INFO[split][2], rng, _FULL_VIEW)
    return {"image": image, "label": _labels_from_index(layout, index_map), "scene_id": scene_id}


def render_labels(split: str, index: int, *, seed: int = 0, scene_size=DEFAULT_SCENE_SIZE):
    """Only the label map of a scene example (cheap: no image), identical to render_example's."""
    layout, _ = scene_layout(split, index, seed=seed, scene_size=scene_size)
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
            _render_from_index(layout, index, "sim", rng, _FULL_VIEW),
            _render_from_index(layout, index, "real", rng, _FULL_VIEW),
            labels.colorize(_labels_from_index(layout, index))], axis=1))
    per_row = 3 * w // (h // 2)
    for r in range(2):
        crops = [render_example("objects", r * per_row + i, seed=seed, object_size=h // 2)["image"]
                 for i in range(per_row)]
        lines.append(np.concatenate(crops, axis=1))
    return np.concatenate(lines, axis=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preview", required=True, help="PNG path for a grid of examples")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    Image.fromarray(preview(args.rows, args.seed)).save(args.preview)
    print(f"wrote {args.preview}")


if __name__ == "__main__":
    main()
