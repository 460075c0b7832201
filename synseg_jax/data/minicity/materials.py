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
MAT = {m[0]: i for i, m in enumerate(_MATERIALS)}
MAT_TEXTURE = np.array([TEXTURES.index(m[1]) for m in _MATERIALS], np.int32)


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


PALETTES = {"sim": _palette_table(2), "real": _palette_table(3)}
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




def colour_lut(layout: Layout, style: str) -> np.ndarray:
    table, counts = PALETTES[style]
    n_colours = counts[layout.mat]
    pick = layout.tone * n_colours
    k = np.minimum(pick.astype(np.int32), n_colours - 1)
    jitter = 1.0 + _STYLE_JITTER[style] * (2.0 * (pick - k) - 1.0)
    shade = 1.0 + _STYLE_SHADING[style] * (layout.shade - 1.0)
    colours = table[layout.mat, k] * (jitter * shade)[:, None]
    return np.concatenate([np.zeros((1, 3), np.float32), colours]).astype(np.float32)

