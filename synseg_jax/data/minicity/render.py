"""Rendering a rasterised layout in a style: flat colours for sim; textures, lighting and
sensor effects for real."""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image

from synseg_jax.data.minicity.geometry import Layout
from synseg_jax.data.minicity.materials import (
    GROUND, MAT_TEXTURE, SKY, TEXTURES, TILE, colour_lut, texture_tiles)
from synseg_jax.data.minicity.raster import (
    DEFAULT_SCENE_SIZE, FULL_VIEW, draw_polygons, in_view, labels_from_index, rasterize_index)

STYLES: tuple[str, ...] = ("sim", "real")


@functools.lru_cache(maxsize=8)
def _sensor_noise_tile(h: int, w: int) -> np.ndarray:
    """Planar unit Gaussian noise a little larger than an image, read at a random offset."""
    return np.random.default_rng(7).standard_normal((3, h + 32, w + 32)).astype(np.float32)



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


def _texture_field(layout: Layout, index: np.ndarray, rng, ys, xs) -> np.ndarray:
    """(H, W) float32 multiplicative shading from the texture of each pixel's material."""
    h, w = index.shape
    t = TILE
    tex = np.concatenate([[0], MAT_TEXTURE[layout.mat]])
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
    cls = labels_from_index(layout, index)
    gains = np.float32(rng.uniform(0.85, 1.15)) * np.array(
        (rng.uniform(1.0, 1.12), 1.0, rng.uniform(0.82, 0.98)), np.float32)
    colours = (colour_lut(layout, "real") * gains).T.copy()

    field = _texture_field(layout, index, rng, ys, xs)
    if len(layout.shadow_starts) > 1:
        shadow = draw_polygons((h, w), layout.shadow_uv, layout.shadow_starts,
                                np.ones(len(layout.shadow_starts) - 1), viewport,
                                in_view(layout.shadow_uv, layout.shadow_starts, viewport))
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


def render_from_index(layout: Layout, index: np.ndarray, style: str, rng, viewport) -> np.ndarray:
    if style not in STYLES:
        raise ValueError(f"Unknown style {style!r}; expected one of {STYLES}")
    if style == "sim":
        colours = np.clip(colour_lut(layout, style) + 0.5, 0, 255).astype(np.uint8)
        return np.take(colours, index, axis=0)
    return _real_finish(layout, index, rng, viewport)


def render_image(layout: Layout, style: str, size=DEFAULT_SCENE_SIZE, rng=None,
                 viewport=FULL_VIEW) -> np.ndarray:
    """(H, W, 3) uint8 image of the layout in "sim" or "real" style; `rng` drives the per-image
    camera effects of the real style (the sim style uses none)."""
    rng = np.random.default_rng(0) if rng is None else rng
    index = rasterize_index(layout, tuple(size), viewport)
    return render_from_index(layout, index, style, rng, viewport)

