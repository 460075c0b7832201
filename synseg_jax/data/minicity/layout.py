"""Scene layouts: the parameters of each domain (camera, class frequencies) and the sampler
that places ground, facades and street things."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from synseg_jax.choices import check_choice
from synseg_jax.data.minicity.gap import FULL, Gap
from synseg_jax.data.minicity.geometry import (
    Builder, Camera, Layout, Road, add, add_billboard, add_prism, blob, ground_quads, insets,
    prism_faces, strip)
from synseg_jax.data.minicity.materials import (
    BICYCLE, BUILDING, BUS, CAR, FENCE, LIGHT, MOTORCYCLE, PERSON, POLE, RIDER, ROAD,
    SIDEWALK, SIGN, SKY, TERRAIN, TRAIN, TRUCK, VEGETATION, WALL)
from synseg_jax.data.minicity.things import (
    VEHICLES, bicycle_parts, mast, motorcycle_parts, person_parts, pole_group, tree_parts, vehicle)

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
    motorcycles: float                # expected number
    bicycles: float
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
    # Focal length in image heights. 1.9-2.2 is a road camera's ~50 degree horizontal field of
    # view (Cityscapes': 2262 px on 2048 px); at 128x256 it keeps poles and signs several
    # pixels wide. 1.0.0 used ~1 (90 degrees) everywhere.
    focal: tuple[float, float] = (1.9, 2.2)


# sim is the game (GTA5-like): a higher camera, wider roads, more trucks and buses, fewer people.
# real is the city (Cityscapes-like): a car-mounted camera, more people, bicycles and poles.
# Thin and small classes are drawn at the frequencies (and, via things.py, the sizes) at which a
# 128x256 image still shows them, so that all 19 classes can be learnt (issue 11).
DOMAIN_PARAMS: dict[str, DomainParams] = {
    "sim": DomainParams(
        cam_height=(1.6, 2.3), horizon=(0.32, 0.44), road_half_width=(4.5, 9.0),
        max_curvature=0.004, cars=5.0, persons=4.0, poles=4.0, trees=4.0, p_truck=0.35,
        p_bus=0.25, p_train=0.05, motorcycles=0.8, bicycles=0.8, p_rider=0.55, p_light=0.6,
        p_sign=0.45, p_mast=0.3, p_building=0.65, building_height=(6.0, 32.0), p_wall=0.08,
        p_fence=0.08, p_verge=0.3, terrain=True, z_far=70.0),
    "real": DomainParams(
        cam_height=(1.1, 1.5), horizon=(0.40, 0.52), road_half_width=(3.5, 7.5),
        max_curvature=0.003, cars=6.5, persons=7.0, poles=6.0, trees=5.5, p_truck=0.3,
        p_bus=0.15, p_train=0.08, motorcycles=0.8, bicycles=1.5, p_rider=0.6, p_light=0.6,
        p_sign=0.5, p_mast=0.3, p_building=0.55, building_height=(6.0, 24.0), p_wall=0.1,
        p_fence=0.12, p_verge=0.5, terrain=True, z_far=70.0),
    "sim_topdown": DomainParams(
        cam_height=(6.0, 12.0), horizon=(0.10, 0.28), road_half_width=(5.0, 10.0),
        max_curvature=0.004, cars=6.0, persons=5.0, poles=4.0, trees=4.0, p_truck=0.0,
        p_bus=0.25, p_train=0.0, motorcycles=0.8, bicycles=1.0, p_rider=0.55, p_light=0.6,
        p_sign=0.45, p_mast=0.3, p_building=0.65, building_height=(6.0, 28.0), p_wall=0.1,
        p_fence=0.1, p_verge=0.4, terrain=False, z_far=90.0,
        focal=(0.92, 1.08)),  # a wide lens from high up, as SYNTHIA's
}
# The fields each layout knob of gap.py owns; with the knob off, real takes sim's values.
KNOB_FIELDS: dict[str, tuple[str, ...]] = {
    "camera": ("cam_height", "horizon", "road_half_width", "max_curvature", "building_height"),
    "frequencies": ("cars", "persons", "poles", "trees", "p_truck", "p_bus", "p_train",
                    "motorcycles", "bicycles", "p_rider", "p_light", "p_sign", "p_mast",
                    "p_building", "p_wall", "p_fence", "p_verge"),
}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_PARAMS)

# Object crops see a small part of a scene: their layouts are real-domain scenes with a shorter
# street and fewer things, which makes them several times cheaper to sample.
OBJECT_PARAMS = dataclasses.replace(
    DOMAIN_PARAMS["real"], cars=2.0, persons=1.5, poles=1.5, trees=2.0, z_far=40.0,
    facade_end=(30.0, 60.0))

# What to force so that a layout sampled for an object crop of a class contains that class.
_REQUIRE: dict[int, dict[str, float]] = {
    ROAD: {}, SIDEWALK: {}, SKY: {}, BUILDING: {"p_building": 0.9},
    WALL: {"p_wall": 0.5}, FENCE: {"p_fence": 0.5}, POLE: {"poles": 5.0},
    LIGHT: {"p_light": 1.0, "poles": 3.0}, SIGN: {"p_sign": 1.0, "poles": 3.0},
    VEGETATION: {"trees": 6.0}, TERRAIN: {"p_verge": 1.0}, PERSON: {"persons": 5.0},
    RIDER: {"bicycles": 1.5, "p_rider": 1.0}, CAR: {"cars": 6.0}, TRUCK: {"p_truck": 1.0},
    BUS: {"p_bus": 1.0}, TRAIN: {"p_train": 1.0}, MOTORCYCLE: {"motorcycles": 1.5},
    BICYCLE: {"bicycles": 1.5},
}

# --- background, skyline, ground ---------------------------------------------------------------

def _background(b: Builder, rng, cam: Camera, ground_cls: int) -> None:
    # Oversized so that object crops near the image border still find sky and ground.
    sky = b.group(b.SKY)
    add(sky, SKY, "sky", rng.random(),
         np.array([(-2.0, -2.0), (3.0, -2.0), (3.0, cam.horizon + 0.01),
                   (-2.0, cam.horizon + 0.01)]))
    ground = b.group(b.SKY)
    add(ground, ground_cls, "terrain" if ground_cls == TERRAIN else "sidewalk", rng.random(),
         np.array([(-2.0, cam.horizon), (3.0, cam.horizon), (3.0, 3.0), (-2.0, 3.0)]))


def _skyline(b: Builder, rng, cam: Camera) -> None:
    """Distant blocks and tree lines along the horizon, drawn directly in image coordinates."""
    g = b.group(b.SKYLINE)
    u = -0.1
    while u < 1.1:
        width = rng.uniform(0.04, 0.16)
        scale = cam.focal / rng.uniform(150.0, 320.0)  # image heights per metre at that depth
        base = cam.horizon + scale * cam.height
        if rng.random() < 0.7:
            top = base - scale * rng.uniform(8.0, 70.0)
            add(g, BUILDING, "building", rng.random(),
                 np.array([(u, top), (u + width, top), (u + width, base), (u, base)]), 0.9)
        else:
            r = scale * rng.uniform(4.0, 12.0)
            crown = blob(rng, 0.0, 0.0, 1.0)
            add(g, VEGETATION, "vegetation", rng.random(), np.stack(
                [u + width * (0.5 + 0.5 * crown[:, 0]),
                 np.minimum(base - r + r * crown[:, 1], base)], axis=1))
        u += width * rng.uniform(0.6, 1.1)


def _ground(b: Builder, rng, road: Road, p: DomainParams, train_lane) -> None:
    g = b.group(b.GROUND)
    hw = road.half_width
    for side in (-1, 1):
        kerb, facade = road.kerb(side), road.facade(side)
        if road.verge[1 if side > 0 else 0] > 0:
            edge = side * hw
            verge_cls = TERRAIN if p.terrain else VEGETATION
            add(g, verge_cls, "terrain" if p.terrain else "vegetation", rng.random(),
                 strip(road, min(edge, kerb), max(edge, kerb)))
        add(g, SIDEWALK, "sidewalk", rng.random(),
             strip(road, min(kerb, facade), max(kerb, facade)))
    add(g, ROAD, "road", rng.random(), strip(road, -hw, hw))

    marks = b.group(b.MARKINGS)
    z0 = np.arange(rng.uniform(1.0, 9.0), 70.0, 9.0)
    z1 = z0 + 3.0
    lane_w = 2 * hw / _lane_count(road)
    for i in range(1, _lane_count(road)):
        offset = -hw + i * lane_w
        centre_line = abs(offset) < lane_w / 2
        mat = "marking_yellow" if centre_line and rng.random() < 0.4 else "marking"
        for quad in ground_quads(road, offset, 0.08, z0, z1):
            add(marks, ROAD, mat, 0.5, quad)
    for side in (-1, 1):
        if rng.random() < 0.6:  # solid edge line
            add(marks, ROAD, "marking", 0.5, strip(road, side * (hw - 0.35), side * (hw - 0.2)))
    if rng.random() < 0.25:  # zebra crossing
        zc = rng.uniform(6.0, 30.0)
        offsets = np.arange(-hw + 0.5, hw - 0.5, 1.0)
        for off in offsets:
            quad = ground_quads(road, off, 0.25, np.array([zc]), np.array([zc + 3.0]))[0]
            add(marks, ROAD, "marking", 0.5, quad)
    if train_lane is not None:
        for rail in (-0.72, 0.72):
            centre = train_lane + rail
            add(marks, ROAD, "rail", 0.5, strip(road, centre - 0.05, centre + 0.05))


def _lane_count(road: Road) -> int:
    return max(2, int(round(2 * road.half_width / 3.4)))


# --- facades -----------------------------------------------------------------------------------

def _facade_box(road: Road, side: int, z0: float, z1: float, inner: float, depth: float):
    """Footprint of a block along the road: inner edge `inner` metres from the centre line."""
    xi0, xi1 = road.centre(z0) + inner, road.centre(z1) + inner
    xo0, xo1 = xi0 + side * depth, xi1 + side * depth
    return [(xi0, z0), (xi1, z1), (xo1, z1), (xo0, z0)]


def _windows(b: Builder, prims: list, quad: np.ndarray, height: float, length: float,
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
        for window in insets(quad, rects):
            add(prims, BUILDING, "window", win_tone, window)
        return
    if floors * cols <= 16:
        s0 = (np.tile(np.arange(cols), floors) + 0.25) / cols
        t0 = np.repeat(t0, cols)
        rects = np.stack([s0, s0 + 0.5 / cols, t0, t0 + 1.6 / height], axis=1)
        for window in insets(quad, rects):
            add(prims, BUILDING, "window", win_tone, window)
        return
    s0 = (np.arange(cols) + 0.25) / cols
    top = t0[-1] + 1.6 / height
    columns = np.stack([s0, s0 + 0.5 / cols, np.full(cols, t0[0]), np.full(cols, top)], axis=1)
    for window in insets(quad, columns):
        add(prims, BUILDING, "window", win_tone, window)
    bands = np.stack([np.zeros(floors - 1), np.ones(floors - 1), t0[:-1] + 1.6 / height, t0[1:]], 1)
    for band in insets(quad, bands):
        add(prims, BUILDING, "building", tone, band, shade)


def _trees_behind(b: Builder, prims: list, road: Road, side: int, z0: float, z1: float,
                  inner: float) -> None:
    rng = b.rng
    for z in np.arange(z0 + rng.uniform(1, 5), z1, rng.uniform(5, 10)):
        x = road.centre(z) + inner + side * rng.uniform(2.0, 8.0)
        add_billboard(prims, tree_parts(rng, rng.uniform(1.0, 1.4)), x, z)


def _facade(b: Builder, rng, cam: Camera, road: Road, side: int, p: DomainParams) -> None:
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
        add_prism(b, g, VEGETATION, "vegetation", rng.random(),
                   _facade_box(road, side, hz0, hz1, inner, 0.8), 0.0, rng.uniform(0.8, 1.5), cam)


def _building(b, g, rng, cam, road, side, z0, z1, inner, p: DomainParams) -> None:
    height = rng.uniform(*p.building_height)
    tone = rng.random()
    corners = _facade_box(road, side, z0, z1, inner, rng.uniform(12.0, 30.0))
    for quad, normal in prism_faces(corners, 0.0, height, cam.height):
        shade = b.face_shade(normal)
        add(g, BUILDING, "building", tone, quad, shade)
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
    for quad, normal in prism_faces(corners, 0.0, height, cam.height):
        add(g, cls, mat, tone, quad, b.face_shade(normal))
        if cls == FENCE and normal is not None and abs(normal[0]) > 0.5:
            posts = min(8, max(2, int((z1 - z0) / 3.0)))
            s = (np.arange(posts) + 0.5) / posts
            rects = np.stack([s - 0.01, s + 0.01, np.zeros(posts), np.ones(posts)], axis=1)
            for post in insets(quad, rects):
                add(g, FENCE, mat, tone, post, 0.6)


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


def _street(b: Builder, rng, cam: Camera, road: Road, p: DomainParams, train_lane) -> None:
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
        length = vehicle(b, TRAIN, road.centre(z) + train_lane, z, heading, cam)
        occupied[lane].append((z - length / 2, z + length / 2))
    if rng.random() < 0.45:  # parked cars along a kerb, blocking the outer lane
        side = 1 if rng.random() < 0.6 else -1
        lane = len(lanes) - 1 if side > 0 else 0
        for z in np.arange(rng.uniform(z_lo, max(z_lo, 20.0)), z_hi, rng.uniform(5.5, 9.0)):
            if rng.random() < 0.7 and claim(lane, z - 2.5, z + 2.5):
                x = road.centre(z) + side * (road.half_width - 1.1)
                vehicle(b, CAR, x, z, road.heading(z) + (rng.random() < 0.3) * math.pi, cam)
    kinds = [TRUCK] if rng.random() < p.p_truck else []
    kinds += [BUS] if rng.random() < p.p_bus else []
    kinds += [CAR] * rng.poisson(p.cars)
    for cls in kinds:
        for _ in range(6):
            lane = int(rng.integers(len(lanes)))
            z = rng.uniform(z_lo + 2.0, z_hi)
            if lane == ego and z < 9.0:
                continue
            half = VEHICLES[cls][0][1] / 2
            if claim(lane, z - half, z + half):
                offset, turn = lanes[lane]
                x = road.centre(z) + offset + rng.uniform(-0.3, 0.3)
                vehicle(b, cls, x, z, road.heading(z) + turn, cam)
                break

    def two_wheeler(kind: int, ridden: bool) -> None:
        z = rng.uniform(z_lo + 1.0, min(z_hi, 25.0))
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
        parts = bicycle_parts(rng, ridden) if kind == BICYCLE else motorcycle_parts(rng, ridden)
        add_billboard(b.group(b.THINGS, depth=z), parts, x, z, angle)

    for kind, mean in ((BICYCLE, p.bicycles), (MOTORCYCLE, p.motorcycles)):
        for _ in range(rng.poisson(mean)):
            two_wheeler(kind, rng.random() < p.p_rider)

    for _ in range(rng.poisson(p.persons)):
        z = rng.uniform(z_lo, min(z_hi, 30.0))
        if rng.random() < 0.12:  # crossing the road
            x = road.centre(z) + rng.uniform(-road.half_width, road.half_width)
        else:
            side = (1 if rng.random() < 0.5 else -1)
            across = rng.uniform(0.3, 0.9) * road.sidewalk[1 if side > 0 else 0]
            x = road.centre(z) + road.kerb(side) + side * across
        add_billboard(b.group(b.THINGS, depth=z), person_parts(rng), x, z, rng.uniform(-0.3, 0.3))
        lean = 0.4 * b.sun[0]
        b.shadow(np.array([(x - 0.4 - lean, 0, z - 0.2), (x + 0.4 - lean, 0, z - 0.2),
                           (x + 0.4, 0, z + 0.3), (x - 0.4, 0, z + 0.3)]))

    for _ in range(rng.poisson(p.poles)):
        z = rng.uniform(z_lo, z_hi)
        light = rng.random() < p.p_light
        sign = rng.random() < p.p_sign
        pole_group(b, rng, road, z, (1 if rng.random() < 0.5 else -1), light, sign)
    if rng.random() < p.p_mast:
        mast(b, rng, cam, road, rng.uniform(max(z_lo, 12.0), 45.0))

    for _ in range(rng.poisson(p.trees)):
        z = rng.uniform(z_lo, z_hi)
        side = (1 if rng.random() < 0.5 else -1)
        i = 1 if side > 0 else 0
        if road.verge[i] > 0:
            x = road.centre(z) + side * (road.half_width + road.verge[i] / 2)
        else:
            x = road.centre(z) + road.kerb(side) + side * rng.uniform(0.6, 0.9) * road.sidewalk[i]
        add_billboard(b.group(b.THINGS, depth=z), tree_parts(rng, rng.uniform(0.8, 1.3)), x, z)


def domain_params(domain: str, gap: Gap = FULL) -> DomainParams:
    """The scene parameters of a domain; for `real`, the layout knobs that `gap` turns off take
    sim's values."""
    check_choice("domain", domain, DOMAINS)
    p = DOMAIN_PARAMS[domain]
    if domain == "real":
        sim = DOMAIN_PARAMS["sim"]
        for knob, fields in KNOB_FIELDS.items():
            if not getattr(gap, knob):
                p = dataclasses.replace(p, **{f: getattr(sim, f) for f in fields})
    return p


def sample_layout(rng: np.random.Generator, domain: str, *, aspect: float = 2.0,
                  require: int | None = None, gap: Gap = FULL) -> Layout:
    """Sample a scene of `domain` ("sim", "real" or "sim_topdown"); `require` (a trainId) raises
    the odds of that class so that object crops can find it; `gap` (real only) turns layout knobs
    off."""
    return sample_layout_from(rng, domain, domain_params(domain, gap), aspect, require)


def sample_layout_from(rng, domain: str, p: DomainParams, aspect: float, require) -> Layout:
    if require is not None:
        p = dataclasses.replace(p, **_REQUIRE[require])
    cam = Camera(height=rng.uniform(*p.cam_height), horizon=rng.uniform(*p.horizon),
                 focal=rng.uniform(*p.focal), aspect=aspect)
    half_width = rng.uniform(*p.road_half_width)
    verge = tuple(rng.uniform(0.8, 2.5) if rng.random() < p.p_verge else 0.0 for _ in range(2))
    road = Road(x0=-rng.uniform(0.25, 0.75) * half_width, k=rng.uniform(-1, 1) * p.max_curvature,
                half_width=half_width, verge=verge,
                sidewalk=(rng.uniform(1.5, 4.5), rng.uniform(1.5, 4.5)))
    sun_angle = rng.uniform(0, 2 * np.pi)
    b = Builder(rng, (math.cos(sun_angle), math.sin(sun_angle)))
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

