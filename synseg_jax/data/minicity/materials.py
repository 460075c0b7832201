"""What minicity's primitives are made of: class ids, materials with a palette per style, and
the texture tiles of the real style."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from synseg_jax.data import labels

if TYPE_CHECKING:  # the layout's geometry module imports this one
    from synseg_jax.data.minicity.geometry import Layout


(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(labels.NUM_CLASSES)
STUFF = (ROAD, SIDEWALK, BUILDING, WALL, FENCE, VEGETATION, TERRAIN, SKY)
GROUND = (ROAD, SIDEWALK, TERRAIN)

# ----------------------------------------------------------------------------------------------
# Materials: what a primitive looks like in each style. The class of a primitive is separate (a
# wheel is car, bus or bicycle), so one material serves several classes. Each style lists a few
# base colours per material; an instance picks one and a brightness jitter from its tone.
# sim is a game's palette: saturated, clean, pastel facades, a blue sky. real is a photo's: greyer,
# duller, an often overcast sky. The two keep the brightness order of the big classes (sky >
# facades and sidewalks > road, vegetation darker than terrain): version 1.0.0 flipped several
# (a road brighter than its buildings, poles lighter than trees), which no real pair does.
# ----------------------------------------------------------------------------------------------
TEXTURES: tuple[str, ...] = (
    "plain", "sky", "road", "marking", "sidewalk", "building", "wall", "fence", "pole",
    "vegetation", "terrain", "cloth", "metal", "glass")

MATERIALS = (
    # name, real-style texture, game-only sim colours, real (photo) colours
    ("sky", "sky",
     ((110, 180, 246), (130, 192, 248), (96, 168, 240)),
     ((166, 186, 212), (196, 202, 210), (142, 168, 204), (210, 212, 214))),
    ("road", "road",
     ((70, 64, 80), (80, 72, 90), (62, 60, 72)),
     ((84, 84, 86), (96, 94, 92), (76, 76, 80))),
    ("marking", "marking",
     ((246, 246, 246),),
     ((200, 200, 194), (184, 184, 178))),
    ("marking_yellow", "marking",
     ((250, 212, 40),),
     ((190, 166, 84),)),
    ("rail", "metal",
     ((36, 36, 40),),
     ((84, 78, 72),)),
    ("sidewalk", "sidewalk",
     ((236, 150, 130), (244, 172, 140), (226, 136, 150)),
     ((150, 146, 140), (168, 162, 152), (134, 132, 130))),
    ("building", "building",
     ((238, 208, 150), (180, 160, 220), (244, 178, 140), (186, 226, 188), (230, 200, 110),
      (242, 192, 212)),
     ((176, 164, 146), (150, 140, 128), (160, 112, 92), (138, 138, 142), (190, 180, 160),
      (124, 118, 110))),
    ("window", "glass",
     ((62, 96, 152), (92, 122, 172), (48, 80, 130)),
     ((58, 64, 74), (80, 88, 98), (100, 110, 120))),
    ("wall", "wall",
     ((234, 230, 172), (222, 202, 160), (240, 240, 204)),
     ((172, 166, 150), (150, 146, 136), (186, 180, 166))),
    ("fence", "fence",
     ((150, 92, 44), (172, 112, 52), (132, 80, 40)),
     ((120, 100, 78), (110, 112, 112), (96, 90, 80))),
    ("pole", "pole",
     ((42, 42, 46), (60, 60, 66), (30, 34, 40)),
     ((72, 74, 76), (92, 92, 90), (60, 62, 66))),
    ("light_box", "plain",
     ((28, 28, 28), (42, 44, 22)),
     ((48, 50, 48), (36, 38, 36), (60, 62, 58))),
    ("lamp_red", "plain",
     ((255, 40, 30),),
     ((170, 70, 60),)),
    ("lamp_amber", "plain",
     ((255, 204, 0),),
     ((170, 146, 70),)),
    ("lamp_green", "plain",
     ((40, 255, 96),),
     ((80, 156, 112),)),
    ("sign_face", "plain",
     ((20, 80, 226), (226, 30, 30), (250, 250, 250), (250, 212, 0)),
     ((44, 86, 160), (186, 52, 44), (220, 220, 212), (214, 180, 50))),
    ("sign_back", "metal",
     ((120, 120, 132),),
     ((128, 128, 126),)),
    ("vegetation", "vegetation",
     ((60, 184, 52), (40, 162, 72), (92, 192, 40)),
     ((74, 98, 50), (88, 112, 56), (62, 84, 48))),
    ("trunk", "terrain",
     ((128, 86, 40),),
     ((86, 72, 60), (70, 62, 54))),
    ("terrain", "terrain",
     ((172, 206, 80), (192, 212, 100), (160, 196, 70)),
     ((128, 130, 84), (140, 134, 96), (112, 122, 76))),
    ("cloth", "cloth",
     ((230, 40, 40), (40, 80, 230), (250, 200, 20), (40, 190, 60), (230, 110, 20),
      (150, 40, 200), (240, 240, 240), (30, 30, 30)),
     ((70, 72, 80), (110, 96, 80), (48, 50, 56), (140, 70, 62), (80, 96, 120), (160, 156, 148),
      (100, 106, 80), (36, 36, 40))),
    ("skin", "plain",
     ((252, 202, 160),),
     ((190, 150, 126), (150, 110, 86), (210, 176, 150))),
    ("car_body", "metal",
     ((230, 30, 30), (30, 100, 240), (250, 220, 30), (30, 200, 90), (250, 250, 250),
      (250, 130, 20), (150, 60, 220)),
     ((200, 200, 198), (150, 152, 156), (44, 44, 48), (60, 70, 100), (130, 46, 46),
      (104, 106, 110), (160, 150, 130))),
    ("vehicle_glass", "glass",
     ((76, 120, 170), (96, 140, 184)),
     ((40, 46, 54), (60, 66, 74))),
    ("wheel", "plain",
     ((22, 22, 22),),
     ((30, 30, 32),)),
    ("tail_light", "plain",
     ((255, 30, 30),),
     ((150, 44, 44),)),
    ("head_light", "plain",
     ((255, 255, 200),),
     ((210, 210, 196),)),
    ("truck_body", "metal",
     ((240, 240, 240), (250, 140, 20), (40, 120, 220)),
     ((206, 206, 202), (130, 134, 138), (160, 70, 50), (90, 100, 80))),
    ("bus_body", "metal",
     ((212, 40, 40), (40, 172, 80)),
     ((214, 196, 80), (204, 208, 212), (60, 100, 156))),
    ("train_body", "metal",
     ((40, 80, 212), (232, 232, 60)),
     ((222, 222, 216), (176, 60, 58))),
    ("moto_body", "metal",
     ((242, 122, 20), (232, 20, 20), (20, 20, 232)),
     ((48, 48, 54), (110, 34, 34), (80, 80, 86))),
    ("frame", "plain",
     ((236, 30, 152), (30, 222, 222), (236, 236, 30)),
     ((40, 40, 44), (70, 70, 80), (130, 40, 40), (150, 150, 150))),
    ("spokes", "plain",
     ((200, 200, 200),),
     ((110, 110, 110),)),
)
MAT = {m[0]: i for i, m in enumerate(MATERIALS)}
MAT_TEXTURE = np.array([TEXTURES.index(m[1]) for m in MATERIALS], np.int32)


# A game grades the world's colours: more saturated and a little brighter than a photo of it.
GAME_SATURATION = 1.6
GAME_BRIGHTNESS = 1.06


def game_grade(colour) -> tuple[float, float, float]:
    """A real colour as a game would show it: pushed away from its grey by GAME_SATURATION, then
    brightened."""
    c = np.asarray(colour, np.float64)
    grey = c.mean()
    graded = (grey + (c - grey) * GAME_SATURATION) * GAME_BRIGHTNESS
    return tuple(np.clip(graded, 0, 255).round())


def _palette_table(colours_of) -> tuple[np.ndarray, np.ndarray]:
    """(n_materials, K, 3) base colours padded by repetition, and the number of real entries."""
    lists = [colours_of(m) for m in MATERIALS]
    k_max = max(len(c) for c in lists)
    table = np.zeros((len(MATERIALS), k_max, 3), np.float32)
    counts = np.zeros(len(MATERIALS), np.int32)
    for i, colours in enumerate(lists):
        counts[i] = len(colours)
        for k in range(k_max):
            table[i, k] = colours[k % len(colours)]
    return table, counts


# The game's palette: the game's own stylised asset colours (pastel facades, candy-coloured cars
# and clothes, a deep-blue sky) mixed with the graded real ones, so that the two palettes overlap
# as a game's and a city's do, without being the same.
PALETTES = {"sim": _palette_table(lambda m: tuple(m[2]) + tuple(game_grade(c) for c in m[3])),
            "real": _palette_table(lambda m: m[3])}
# Brightness jitter per instance, and how much of the face shading each style keeps: game assets
# are uniformly lit, photos are not.
_STYLE_JITTER = {"sim": 0.16, "real": 0.22}
_STYLE_SHADING = {"sim": 0.35, "real": 1.0}

TILE = 256


def _periodic_noise(rng, feature_px: float, shape=(TILE, TILE)) -> np.ndarray:
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
    t = TILE
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




def colour_lut(layout: Layout, palette: str, shading: str) -> np.ndarray:
    """(1 + primitives, 3) float32 colour of each primitive (row 0: nothing drawn): the base
    colour its tone picks from `palette`'s list for its material, that palette's brightness
    jitter, and `shading`'s share of the face shading."""
    table, counts = PALETTES[palette]
    n_colours = counts[layout.mat]
    pick = layout.tone * n_colours
    k = np.minimum(pick.astype(np.int32), n_colours - 1)
    jitter = 1.0 + _STYLE_JITTER[palette] * (2.0 * (pick - k) - 1.0)
    shade = 1.0 + _STYLE_SHADING[shading] * (layout.shade - 1.0)
    colours = table[layout.mat, k] * (jitter * shade)[:, None]
    return np.concatenate([np.zeros((1, 3), np.float32), colours]).astype(np.float32)
