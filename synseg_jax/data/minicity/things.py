"""Things on the street: trees, people, riders, two-wheelers, traffic lights, signs, poles,
masts and vehicles, as billboards and prisms added to a Builder."""

from __future__ import annotations

import math

import numpy as np

from synseg_jax.data.minicity.geometry import (
    CIRCLE, Builder, Camera, Road, add, add_billboard, bar, blob, ellipse, footprint, inset, insets,
    prism_faces)
from synseg_jax.data.minicity.materials import (
    BICYCLE, BUS, CAR, LIGHT, MOTORCYCLE, PERSON, POLE, RIDER, SIGN, TRAIN, TRUCK, VEGETATION)

# --- templates (2-D parts in metres, x right, y up, feet at y = 0) ------------------------------

def tree_parts(rng, scale: float):
    trunk_h = rng.uniform(1.8, 3.2) * scale
    r = rng.uniform(1.3, 2.8) * scale
    parts = [(VEGETATION, "trunk", rng.random(),
              bar((0, 0), (0, trunk_h + r * 0.5), rng.uniform(0.25, 0.45) * scale))]
    tone = rng.random()
    for _ in range(rng.integers(1, 3)):
        cx, cy = rng.uniform(-0.5, 0.5) * r, trunk_h + r * rng.uniform(0.8, 1.3)
        parts.append((VEGETATION, "vegetation", tone, blob(rng, cx, cy, r)))
    return parts


def person_parts(rng, cls: int = PERSON):
    s = rng.uniform(1.55, 1.95) / 1.75
    stride = rng.uniform(-0.18, 0.18)
    swing = rng.uniform(-0.1, 0.1)
    legs, top, skin = rng.random(), rng.random(), rng.random()
    parts = [
        (cls, "cloth", legs, bar((-0.07, 0.86), (-0.07 + stride, 0.0), 0.14)),
        (cls, "cloth", legs, bar((0.07, 0.86), (0.07 - stride, 0.0), 0.14)),
        (cls, "cloth", top, np.array([(-0.19, 0.8), (0.19, 0.8), (0.22, 1.44), (-0.22, 1.44)])),
        (cls, "cloth", top, bar((-0.21, 1.4), (-0.27 - swing, 0.86), 0.09)),
        (cls, "cloth", top, bar((0.21, 1.4), (0.27 + swing, 0.86), 0.09)),
        (cls, "skin", skin, ellipse(0.0, 1.58, 0.1, 0.13, 8)),
    ]
    if rng.random() < 0.5:  # hair or a hat
        parts.append((cls, "cloth", rng.random(), ellipse(0.0, 1.66, 0.105, 0.07, 8)))
    return [(c, m, t, pts * s) for c, m, t, pts in parts]


def _rider_parts(rng, seat, hands):
    """A seated person: hip on the seat, hands on the handlebar."""
    top, legs = rng.random(), rng.random()
    hip = (seat[0], seat[1] + 0.08)
    knee = (seat[0] + 0.38, seat[1] + 0.05)
    foot = (seat[0] + 0.25, 0.25)
    shoulder = (hip[0] + 0.22, hip[1] + 0.58)
    return [
        (RIDER, "cloth", legs, bar(hip, knee, 0.16)),
        (RIDER, "cloth", legs, bar(knee, foot, 0.12)),
        (RIDER, "cloth", top, bar(hip, shoulder, 0.36)),
        (RIDER, "cloth", top, bar(shoulder, hands, 0.09)),
        (RIDER, "skin" if rng.random() < 0.4 else "cloth", rng.random(),
         ellipse(shoulder[0] + 0.06, shoulder[1] + 0.2, 0.11, 0.13, 8)),
    ]


def _wheel(cls: int, cx: float, cy: float, r: float, tone: float, hub_mat: str):
    return [(cls, "wheel", tone, ellipse(cx, cy, r, r, 12)),
            (cls, hub_mat, tone, ellipse(cx, cy, 0.78 * r, 0.78 * r, 12))]


def bicycle_parts(rng, ridden: bool):
    tone = rng.random()
    rear, front, bb = (-0.52, 0.34), (0.52, 0.34), (-0.02, 0.3)
    seat, head, handlebar = (-0.2, 0.88), (0.38, 0.86), (0.32, 1.02)
    parts = (_wheel(BICYCLE, *rear, 0.34, tone, "spokes")
             + _wheel(BICYCLE, *front, 0.34, tone, "spokes"))
    for p, q in ((rear, bb), (bb, seat), (seat, rear), (seat, head), (bb, head), (head, front),
                 (head, handlebar)):
        parts.append((BICYCLE, "frame", tone, bar(p, q, 0.09)))
    parts.append((BICYCLE, "wheel", tone, bar((-0.3, 0.92), (-0.1, 0.92), 0.06)))
    if ridden:
        parts += _rider_parts(rng, seat, handlebar)
    return parts


def motorcycle_parts(rng, ridden: bool):
    tone = rng.random()
    parts = _wheel(MOTORCYCLE, -0.7, 0.32, 0.32, tone, "wheel") + _wheel(
        MOTORCYCLE, 0.7, 0.32, 0.32, tone, "moto_body")
    parts += [
        (MOTORCYCLE, "moto_body", tone, np.array(
            [(-0.85, 0.5), (-0.3, 0.45), (0.45, 0.45), (0.7, 0.6), (0.55, 0.95), (0.2, 0.98),
             (-0.2, 0.85), (-0.8, 0.78)])),
        (MOTORCYCLE, "wheel", tone,
         np.array([(-0.55, 0.8), (0.05, 0.86), (0.05, 0.96), (-0.5, 0.93)])),
        (MOTORCYCLE, "frame", tone, bar((0.52, 0.98), (0.7, 0.32), 0.07)),
        (MOTORCYCLE, "frame", tone, bar((0.42, 1.1), (0.62, 1.12), 0.06)),
    ]
    if ridden:
        parts += _rider_parts(rng, (-0.25, 0.92), (0.5, 1.1))
    return parts


def traffic_light_parts(rng, top: float, x: float = 0.0, facing: bool = True):
    """A signal head hanging from height `top`, 1.5x life size (see pole_group)."""
    parts = [(LIGHT, "light_box", rng.random(),
              np.array([(x - 0.26, top - 1.4), (x + 0.26, top - 1.4), (x + 0.26, top),
                        (x - 0.26, top)]))]
    if facing:
        for i, lamp in enumerate(("lamp_red", "lamp_amber", "lamp_green")):
            parts.append((LIGHT, lamp, 0.5, ellipse(x, top - 0.26 - 0.43 * i, 0.15, 0.15, 8)))
    return parts


def sign_parts(rng, centre_x: float, centre_y: float):
    r = rng.uniform(0.55, 0.85)  # 1.5x life size (see pole_group)
    shape = rng.integers(4)
    facing = rng.random() < 0.75
    tone = rng.random()
    mat = "sign_face" if facing else "sign_back"
    if shape == 0:
        outline = ellipse(centre_x, centre_y, r, r, 12)
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
        parts.append((SIGN, "sign_face", 0.6, ellipse(centre_x, centre_y, 0.7 * r, 0.7 * r, 12)))
    return parts


# --- vehicles ----------------------------------------------------------------------------------

# length, width, height ranges (metres) and body material per vehicle class
VEHICLES = {
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
    disc = radius * (CIRCLE[10] @ np.stack([along, (0.0, 1.0, 0.0)]))
    for pos in positions:
        add(prims, cls, "wheel", 0.5, disc + (p0 + pos * ds + (0.0, radius - y0, 0.0)))


def vehicle(b: Builder, cls: int, x: float, z: float, heading: float, cam: Camera) -> float:
    """Add a vehicle whose centre is at (x, z); heading is its direction of travel. Returns its
    length so the caller can keep lanes clear."""
    rng = b.rng
    (l_lo, l_hi), (w_lo, w_hi), (h_lo, h_hi), mat = VEHICLES[cls]
    length, width = rng.uniform(l_lo, l_hi), rng.uniform(w_lo, w_hi)
    height = rng.uniform(h_lo, h_hi)
    g = b.group(b.THINGS, depth=z - length / 2)
    tone = rng.random()
    fx, fz = math.sin(heading), math.cos(heading)
    clearance = {CAR: 0.22, TRUCK: 0.5, BUS: 0.35, TRAIN: 0.45}[cls]
    wheel_r = {CAR: 0.32, TRUCK: 0.5, BUS: 0.5, TRAIN: 0.45}[cls]

    def body(corners, y0, y1, glass):
        for quad, normal in prism_faces(corners, y0, y1, cam.height):
            add(g, cls, mat, tone, quad, b.face_shade(normal))
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
            parts = insets(quad, ((0.05, 0.2, 0.55, 0.75), (0.8, 0.95, 0.55, 0.75),
                                   (0.06, 0.19, t0, 0.02), (0.81, 0.94, t0, 0.02)))
            for k, mat_k in enumerate((light, light, "wheel", "wheel")):
                add(g, cls, mat_k, 0.5, parts[k])
        else:
            positions = (0.18, 0.82) if cls != TRAIN else (0.1, 0.22, 0.78, 0.9)
            _side_wheels(g, cls, quad, clearance, positions, wheel_r)

    if cls == CAR:
        corners = footprint(x, z, heading, length, width)
        body(corners, clearance, 0.55 * height, lower_glass)
        cabin = footprint(x, z, heading, 0.5 * length, width - 0.12, along=-0.05 * length)

        def cabin_glass(quad, normal, along):
            if abs(along) > 0.7:
                add(g, cls, "vehicle_glass", 0.5, inset(quad, 0.08, 0.92, 0.1, 0.9))
            else:
                add(g, cls, "vehicle_glass", 0.5, inset(quad, 0.07, 0.93, 0.15, 0.85))
        body(cabin, 0.55 * height, height, cabin_glass)
    elif cls == TRUCK:
        cab_len = 2.2
        box = footprint(x, z, heading, length - cab_len - 0.2, width, along=-(cab_len + 0.2) / 2)
        body(box, clearance + 0.2, height, lower_glass)
        cab = footprint(x, z, heading, cab_len, width, along=(length - cab_len) / 2)

        def cab_glass(quad, normal, along):
            if along > 0.7:
                add(g, cls, "vehicle_glass", 0.5, inset(quad, 0.06, 0.94, 0.55, 0.9))
                for s0 in (0.05, 0.8):
                    add(g, cls, "head_light", 0.5, inset(quad, s0, s0 + 0.15, 0.15, 0.25))
            elif abs(along) <= 0.7:
                add(g, cls, "vehicle_glass", 0.5, inset(quad, 0.1, 0.6, 0.55, 0.88))
                _side_wheels(g, cls, quad, clearance, (0.5,), wheel_r)
        body(cab, clearance, 0.8 * height, cab_glass)
    else:  # bus, train: one long body with a band of windows (a train in two cars)
        cars = 1 if cls == BUS else 2
        car_len = (length - 0.6 * (cars - 1)) / cars
        for i in range(cars):
            offset = -length / 2 + car_len / 2 + i * (car_len + 0.6)
            corners = footprint(x, z, heading, car_len, width, along=offset)

            def band(quad, normal, along):
                if abs(along) > 0.7:
                    add(g, cls, "vehicle_glass", 0.5, inset(quad, 0.06, 0.94, 0.4, 0.88))
                    add(g, cls, "head_light" if along > 0 else "tail_light", 0.5,
                         inset(quad, 0.06, 0.2, 0.12, 0.2))
                else:
                    n_win = int(car_len // 2.2)
                    s0 = (np.arange(n_win) + 0.12) / n_win
                    rects = np.stack([s0, s0 + 0.78 / n_win, np.full(n_win, 0.45),
                                      np.full(n_win, 0.85)], axis=1)
                    for window in insets(quad, rects):
                        add(g, cls, "vehicle_glass", 0.5, window)
                    if cls == BUS:
                        _side_wheels(g, cls, quad, clearance, (0.15, 0.8), wheel_r)
            body(corners, clearance, height, band)
    # Contact shadow: the footprint, a little wider, pushed away from the sun.
    corners = footprint(x - 0.5 * b.sun[0], z - 0.5 * b.sun[1], heading, length + 0.4, width + 0.4)
    b.shadow(np.array([(cx, 0.0, cz) for cx, cz in corners]))
    return length


# --- street furniture and people ---------------------------------------------------------------

def pole_group(b: Builder, rng, road: Road, z: float, side: int, light: bool, sign: bool) -> None:
    x = road.centre(z) + road.kerb(side) + side * 0.5
    g = b.group(b.THINGS, depth=z)
    height = rng.uniform(3.5, 7.5) if (light or not sign) else rng.uniform(2.4, 3.4)
    width = rng.uniform(0.22, 0.4)  # 1.5-2x real poles: a pole is still 1-3 px wide at 128x256
    tone = rng.random()
    parts = [(POLE, "pole", tone, bar((0, 0), (0, height), width))]
    if light:
        parts += traffic_light_parts(rng, height + 0.1, 0.0, facing=rng.random() < 0.75)
    elif height > 4.5 and rng.random() < 0.6:  # street lamp: arm over the road and a head
        reach = -side * rng.uniform(1.0, 2.0)
        parts.append((POLE, "pole", tone, bar((0, height), (reach, height + 0.3), 0.1)))
        parts.append((POLE, "pole", tone, ellipse(reach, height + 0.25, 0.35, 0.1, 6)))
    if sign:
        parts += sign_parts(rng, -side * 0.32, rng.uniform(2.0, min(height, 3.2) - 0.1))
    add_billboard(g, parts, x, z)


def mast(b: Builder, rng, cam, road: Road, z: float) -> None:
    """A traffic-light mast: pole on one kerb, arm across the road, lights hanging above lanes."""
    side = 1 if rng.random() < 0.7 else -1
    x = road.centre(z) + road.kerb(side) + side * 0.5
    g = b.group(b.THINGS, depth=z)
    height = rng.uniform(5.0, 7.0)
    reach = rng.uniform(0.5, 1.0) * road.half_width * 1.6
    tone = rng.random()
    parts = [(POLE, "pole", tone, bar((0, 0), (0, height), 0.35)),
             (POLE, "pole", tone, bar((0, height - 0.1), (-side * reach, height - 0.1), 0.2))]
    for k in range(rng.integers(1, 3)):
        parts += traffic_light_parts(rng, height - 0.15, -side * reach * (0.5 + 0.45 * k))
    if rng.random() < 0.5:
        parts += traffic_light_parts(rng, 3.2, -side * 0.35)
    add_billboard(g, parts, x, z)

