"""Rendering a rasterised layout in a style: flat colours for sim; textures, lighting and
sensor effects for real."""

from __future__ import annotations

import math

import numpy as np

from synseg_jax.choices import check_choice
from synseg_jax.data.minicity.gap import FULL, Gap
from synseg_jax.data.minicity.geometry import Layout
from synseg_jax.data.minicity.materials import (
    GROUND, MAT_TEXTURE, SKY, TEXTURES, TILE, colour_lut, texture_tiles)
from synseg_jax.data.minicity.sensor import Sensor
from synseg_jax.data.minicity.raster import (
    DEFAULT_SCENE_SIZE, FULL_VIEW, draw_polygons, in_view, labels_from_index, rasterize_index)

STYLES: tuple[str, ...] = ("sim", "real")


# Ground materials are textured in world coordinates (perspective-correct paving, asphalt and
# grass); everything else in screen coordinates.
_GROUND_TEXTURES = np.zeros(len(TEXTURES), bool)
_GROUND_TEXTURES[[TEXTURES.index(t) for t in ("road", "marking", "sidewalk", "terrain")]] = True
_GROUND_TEXEL = 0.05  # metres
_HAZE_COLOUR = np.array((200, 205, 212), np.float32)
_IS_GROUND = np.isin(np.arange(256), GROUND)


def _pixel_coords(shape, viewport) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image coordinates of pixel centres: (H, 1) rows and (1, W) columns."""
    h, w = shape
    u0, v0, du, dv = viewport
    ys = (v0 + (np.arange(h, dtype=np.float32) + 0.5) * np.float32(dv / h))[:, None]
    xs = (u0 + (np.arange(w, dtype=np.float32) + 0.5) * np.float32(du / w))[None, :]
    return ys, xs


def _texture_field(layout: Layout, index: np.ndarray, offset, ys, xs) -> np.ndarray:
    """(H, W) float32 multiplicative shading from the texture of each pixel's material."""
    h, w = index.shape
    t = TILE
    tex = np.concatenate([[0], MAT_TEXTURE[layout.mat]])
    base = np.take((tex * (t * t)).astype(np.int32), index)
    oy, ox = offset
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


def _real_finish(layout: Layout, index: np.ndarray, rng, viewport, gap: Gap) -> np.ndarray:
    """Photo-like rendering: textures, shading, shadows, light gradient and haze, then the camera
    (sensor.py). Works on planar (3, H, W) arrays, where numpy's broadcasting of per-pixel factors
    over channels is several times faster than on (H, W, 3). Every random draw is made whatever
    the knobs say, in one order, so a knob turned off changes nothing but its own factor."""
    h, w = index.shape
    ys, xs = _pixel_coords((h, w), viewport)
    cls = labels_from_index(layout, index)
    sensor = Sensor.draw(rng, gap.sensor)
    texture_offset = tuple(int(o) for o in rng.integers(TILE, size=2))
    shadow_strength = np.float32(rng.uniform(0.3, 0.5))
    light_angle, light_strength = rng.uniform(0, 2 * np.pi), np.float32(rng.uniform(0.1, 0.35))
    haze_strength = np.float32(rng.uniform(0.1, 0.3))

    colours = colour_lut(layout, "real" if gap.palette else "sim",
                         "real" if gap.lighting else "sim")
    colours = (colours * sensor.white_balance()).T.copy()
    if gap.texture:
        field = _texture_field(layout, index, texture_offset, ys, xs)
    else:
        field = np.ones((h, w), np.float32)
    vignette = sensor.vignette(ys, xs)
    field *= vignette
    haze = None
    if gap.lighting:
        if len(layout.shadow_starts) > 1:
            shadow = draw_polygons((h, w), layout.shadow_uv, layout.shadow_starts,
                                   np.ones(len(layout.shadow_starts) - 1), viewport,
                                   in_view(layout.shadow_uv, layout.shadow_starts, viewport))
            field *= 1.0 - shadow_strength * ((shadow > 0) & np.take(_IS_GROUND, cls))
        field *= 1.0 + light_strength * ((xs - 0.5) * np.float32(math.cos(light_angle))
                                         + (ys - 0.5) * np.float32(math.sin(light_angle)))
        # Aerial perspective: what lies near the horizon is far away and fades towards the sky.
        haze = haze_strength * np.exp(-np.abs(ys - layout.camera.horizon) / 0.05)
        haze = np.where(cls == SKY, np.float32(0), haze) * vignette
        field -= haze * field  # field * (1 - haze), without another temporary
    img = np.take(colours, index, axis=1)
    img *= field
    if haze is not None:
        img += haze * (_HAZE_COLOUR * sensor.white_balance())[:, None, None]
    return sensor.capture(img)


def render_from_index(layout: Layout, index: np.ndarray, style: str, rng, viewport,
                      gap: Gap = FULL) -> np.ndarray:
    check_choice("style", style, STYLES)
    if style == "sim":
        colours = np.clip(colour_lut(layout, "sim", "sim") + 0.5, 0, 255).astype(np.uint8)
        return np.take(colours, index, axis=0)
    return _real_finish(layout, index, rng, viewport, gap)


def render_image(layout: Layout, style: str, size=DEFAULT_SCENE_SIZE, rng=None,
                 viewport=FULL_VIEW, gap: Gap = FULL) -> np.ndarray:
    """(H, W, 3) uint8 image of the layout in "sim" or "real" style; `rng` drives the per-image
    camera effects of the real style (the sim style uses none); `gap` says which of the real
    style's differences to apply."""
    rng = np.random.default_rng(0) if rng is None else rng
    index = rasterize_index(layout, tuple(size), viewport)
    return render_from_index(layout, index, style, rng, viewport, gap)

