"""Scene geometry: the camera, the road, 2-D and 3-D shape helpers, and the Builder that
collects coloured primitives into a projected Layout."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from synseg_jax.data.minicity.materials import MAT



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


GROUND_Z = np.geomspace(0.5, 420.0, 18)
# Unit circles as (n, 2) outlines, for discs, wheels, heads and crowns.
CIRCLE = {n: np.stack([np.cos(a), np.sin(a)], axis=1)
           for n in (6, 8, 10, 12, 14) for a in [np.linspace(0, 2 * np.pi, n, endpoint=False)]}


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 10) -> np.ndarray:
    return CIRCLE[n] * (rx, ry) + (cx, cy)


def bar(p, q, width: float) -> np.ndarray:
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
    return CIRCLE[n][None] * radii * (1.0, 0.9)


_BLOBS = _blob_templates()


def blob(rng, cx: float, cy: float, r: float) -> np.ndarray:
    """An irregular roundish outline of radius about r (tree crowns)."""
    k = int(rng.integers(len(_BLOBS)))
    return _BLOBS[k] * (r if k % 2 else -r, r) + (cx, cy)


def strip(road: Road, a: float, b: float, z: np.ndarray = GROUND_Z) -> np.ndarray:
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


def ground_quads(road: Road, offset: float, half_w: float, z0: np.ndarray, z1: np.ndarray):
    """(n, 4, 3) ground quads centred on a lateral offset between depths z0[i] and z1[i]."""
    x0, x1 = road.centre(z0) + offset, road.centre(z1) + offset
    quads = np.zeros((len(z0), 4, 3))
    quads[:, 0, 0], quads[:, 1, 0] = x0 - half_w, x1 - half_w
    quads[:, 2, 0], quads[:, 3, 0] = x1 + half_w, x0 + half_w
    quads[:, (0, 3), 2] = z0[:, None]
    quads[:, (1, 2), 2] = z1[:, None]
    return quads


def prism_faces(corners, y0: float, y1: float, cam_height: float):
    """Visible faces of a vertical prism over a convex 4-corner (x, z) footprint.

    Returns [(quad (4, 3), (nx, nz) or None for the top)], quads ordered bottom-a, bottom-b,
    top-b, top-a so that `inset` can address them. Faces of a convex solid never overlap on
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


def insets(quad: np.ndarray, rects) -> np.ndarray:
    """Sub-rectangles (s0, s1, t0, t1) of a planar face quad, s along its bottom edge and t up
    its side, both in [0, 1]: (n, 4, 3) corners."""
    st = np.asarray(rects, np.float64).reshape(-1, 4)[:, _INSET_CORNERS]
    return quad[0] + st @ (quad[[1, 3]] - quad[0])


def inset(quad: np.ndarray, s0: float, s1: float, t0: float, t1: float) -> np.ndarray:
    return insets(quad, (s0, s1, t0, t1))[0]


def footprint(x: float, z: float, heading: float, length: float, width: float,
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


class Builder:
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


def add(prims: list, cls: int, mat: str, tone: float, pts: np.ndarray, shade: float = 1.0):
    prims.append((cls, MAT[mat], tone, shade, pts))


def add_billboard(prims: list, parts, x: float, z: float, angle: float = 0.0, y0: float = 0.0):
    """Add 2-D parts [(cls, mat, tone, (N, 2) metres)] standing in a vertical plane at (x, z),
    turned `angle` radians about the vertical axis (0 faces the camera)."""
    pts = np.concatenate([part[3] for part in parts])
    world = np.empty((len(pts), 3))
    world[:, 0] = x + pts[:, 0] * math.cos(angle)
    world[:, 1] = y0 + pts[:, 1]
    world[:, 2] = z + pts[:, 0] * math.sin(angle)
    i = 0
    for cls, mat, tone, part in parts:
        prims.append((cls, MAT[mat], tone, 1.0, world[i:i + len(part)]))
        i += len(part)


def add_prism(b: Builder, prims: list, cls: int, mat: str, tone: float, corners, y0, y1, cam):
    faces = prism_faces(corners, y0, y1, cam.height)
    for quad, normal in faces:
        add(prims, cls, mat, tone, quad, b.face_shade(normal))
    return faces
