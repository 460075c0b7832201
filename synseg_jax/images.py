"""Image conventions every layer shares: normalisation, resizing and crop-box coordinates.

Neutral on purpose: numpy and jax.numpy only, never TensorFlow, so data, models, losses, methods
and the loop all draw on one definition of each convention. Methods (FDA, reconstruction losses,
translators) need them under jit, the pipeline in tf.data, the loop on the host.

Resizing conventions differ between the reference codes, and the difference moves mIoU:
- bilinear with half-pixel centres (PyTorch's ``align_corners=False``), this project's default,
  or with the end pixels mapped onto each other (``align_corners=True``: STDC-Seg, PSPNet's Caffe
  Interp, and AdaptSegNet's PyTorch-0.4 port, whose ``nn.Upsample`` behaved so);
- nearest by PyTorch's ``mode="nearest"`` rule, floor(i * in / out) (BiSeNet's context path), or
  with half-pixel centres, floor((i + 0.5) * in / out) (``nearest-exact``; label downsizing).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synseg_jax.choices import check_choice

# DeepLab / Caffe lineage: BGR order, 0..255 range, mean subtracted, no scaling.
CAFFE_BGR_MEAN = np.array((104.008, 116.669, 122.679), np.float32)
# torchvision / timm lineage: RGB scaled to 0..1, then per-channel mean and std.
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)
NORMALIZATIONS = ("caffe_bgr", "imagenet_rgb")


def check_normalization(mode: str) -> None:
    check_choice("normalization", mode, NORMALIZATIONS)


def normalize(rgb, mode: str):
    """RGB 0..255 (float) -> the model's input space. Plain arithmetic and slicing, so numpy, jax
    and (float) TF arrays all work; integer input is promoted by numpy and jax."""
    check_normalization(mode)
    if mode == "caffe_bgr":
        return rgb[..., ::-1] - CAFFE_BGR_MEAN
    return (rgb / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(x, mode: str):
    """Inverse of ``normalize``: model input -> RGB 0..255 float32, not clipped."""
    check_normalization(mode)
    if mode == "caffe_bgr":
        return (x + CAFFE_BGR_MEAN)[..., ::-1]
    return (x * IMAGENET_STD + IMAGENET_MEAN) * np.float32(255.0)


def to_uint8(x, mode: str, xp=np):
    """Model input -> displayable uint8 RGB (image summaries), rounded: the float round trip
    lands a hair below whole values, which truncation would shift down by one. ``xp``: numpy or
    jax.numpy."""
    return xp.clip(xp.rint(denormalize(xp.asarray(x), mode)), 0, 255).astype(xp.uint8)


def to_unit_range(x, normalization: str):
    """Model input -> RGB in [-1, 1] (x / 127.5 - 1 of the 0..255 image): the space of the
    image generators (a tanh output) of structure enhancement and the translator."""
    return denormalize(x, normalization) / np.float32(127.5) - np.float32(1.0)


def from_unit_range(y, normalization: str):
    """Inverse of ``to_unit_range``: RGB in [-1, 1] -> model input, not clipped."""
    return normalize((y + np.float32(1.0)) * np.float32(127.5), normalization)


def unit_to_uint8(y, xp=jnp):
    """RGB in [-1, 1] -> displayable / storable uint8 RGB, rounded and clipped."""
    return xp.clip(xp.rint((y + 1.0) * 127.5), 0, 255).astype(xp.uint8)


# How every layer draws a trainId map: Cityscapes' colours, indexed by trainId
# (cityscapesScripts' labels.py); ignore (255) and any other id outside 0..18 are black.
TRAIN_ID_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)
IGNORE_COLOUR = (0, 0, 0)
_COLOUR_TABLE = np.full((256, 3), IGNORE_COLOUR, np.uint8)  # every 8-bit id has a colour
_COLOUR_TABLE[:len(TRAIN_ID_PALETTE)] = TRAIN_ID_PALETTE


def colorize(train_ids, xp=np):
    """trainId map (..., H, W) -> RGB uint8 (..., H, W, 3) in `TRAIN_ID_PALETTE`. ``xp`` is numpy
    or jax.numpy (image summaries are drawn under jit)."""
    ids = xp.clip(xp.asarray(train_ids).astype(xp.int32), 0, len(_COLOUR_TABLE) - 1)
    return xp.asarray(_COLOUR_TABLE)[ids]


def gray_to_uint8(x):
    """A map in [0, 1], [N, H, W] or [N, H, W, 1] (edge maps, a discriminator's sigmoid) ->
    displayable uint8 RGB [N, H, W, 3], rounded. jax.numpy (jittable)."""
    x = x[..., 0] if x.ndim == 4 else x
    g = jnp.clip(jnp.rint(x * 255.0), 0, 255).astype(jnp.uint8)
    return jnp.repeat(g[..., None], 3, axis=-1)


def _linear_taps(n_in: int, n_out: int, align_corners: bool):
    """For each output index along one axis: the two input indices it blends and the weight of
    the second, as ``F.interpolate(mode="bilinear")`` computes them (numpy, at trace time).

    ``align_corners=False`` samples at half-pixel centres, ``(o + 0.5) * n_in / n_out - 0.5``,
    clamped at 0 (no antialiasing filter when downsizing); ``True`` maps the end pixels onto each
    other, ``o * (n_in - 1) / (n_out - 1)``.
    """
    out = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = out * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = np.maximum((out + 0.5) * n_in / n_out - 0.5, 0.0)
    first = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    second = np.minimum(first + 1, n_in - 1)
    return first, second, (src - first).astype(np.float32)


def _interpolation_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """The (n_out, n_in) matrix of :func:`_linear_taps`' blend."""
    first, second, weight = _linear_taps(n_in, n_out, align_corners)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), first), 1.0 - weight)
    np.add.at(m, (np.arange(n_out), second), weight)
    return m


def _blend_axis(x: jax.Array, n_out: int, axis: int, align_corners: bool) -> jax.Array:
    first, second, weight = _linear_taps(x.shape[axis], n_out, align_corners)
    shape = [1] * x.ndim
    shape[axis] = n_out
    weight = jnp.asarray(weight, x.dtype).reshape(shape)
    return (jnp.take(x, first, axis=axis) * (1 - weight)
            + jnp.take(x, second, axis=axis) * weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool) -> jax.Array:
    # Two gathers per axis: O(output) work, 4x faster on CPU than a product with the dense
    # (n_out, n_in) interpolation matrices, whose cost grows with n_in * n_out.
    return _blend_axis(_blend_axis(x, size[0], 1, align_corners), size[1], 2, align_corners)


def _resize_bilinear_fwd(x, size, align_corners):
    return _resize_bilinear(x, size, align_corners), x.shape[1:3]


def _resize_bilinear_bwd(size, align_corners, in_size, g):
    # The gathers' own gradient is a scatter-add, 3x slower on CPU than the transposed products.
    rows = jnp.asarray(_interpolation_matrix(in_size[0], size[0], align_corners), g.dtype)
    cols = jnp.asarray(_interpolation_matrix(in_size[1], size[1], align_corners), g.dtype)
    return (jnp.einsum("ih,jw,nij...->nhw...", rows, cols, g),)


_resize_bilinear.defvjp(_resize_bilinear_fwd, _resize_bilinear_bwd)


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """Bilinear resize of axes 1, 2 of [N, H, W, ...] to ``size`` = (h, w), as PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=...)`` does, including downsizing (no
    antialiasing filter, where jax.image.resize's default would average)."""
    return _resize_bilinear(x, (int(size[0]), int(size[1])), bool(align_corners))


def resize_nearest(x: jax.Array, size: Sequence[int], half_pixel: bool = False) -> jax.Array:
    """Nearest-neighbour resize of axes 1, 2 of [N, H, W, ...]; any dtype, values copied exactly.

    Output pixel i reads input floor(i * in / out) (PyTorch's "nearest"), or with ``half_pixel``
    floor((i + 0.5) * in / out) ("nearest-exact", jax.image.resize's "nearest"). The indices are
    computed in numpy at trace time, so labels never pass through floats.
    """
    def source(n_out: int, n_in: int) -> np.ndarray:
        if half_pixel:
            return np.minimum((2 * np.arange(n_out) + 1) * n_in // (2 * n_out), n_in - 1)
        return np.arange(n_out) * n_in // n_out

    rows, cols = source(size[0], x.shape[1]), source(size[1], x.shape[2])
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


def crop_box_grid(crop_box, out_h: int, out_w: int, xp=np):
    """Original-image normalised ``(y, x)`` of each output pixel centre of a crop.

    ``crop_box`` is ``[..., 4]`` = (y0, x0, y1, x1) in normalised coordinates of the original
    image (pixel edges: 0 = top/left edge, 1 = bottom/right edge; a flipped crop has x0 > x1).
    Pixel (i, j) of an ``out_h x out_w`` crop has its centre at
    ``y0 + (i + 0.5) / out_h * (y1 - y0)``, likewise for x. Returns two ``[..., out_h, out_w]``
    arrays. ``xp`` is numpy or jax.numpy (under jit).
    """
    box = xp.asarray(crop_box, dtype=xp.float32)
    y0, x0, y1, x1 = (box[..., k, None, None] for k in range(4))
    ty = ((xp.arange(out_h, dtype=xp.float32) + 0.5) / out_h)[:, None]
    tx = ((xp.arange(out_w, dtype=xp.float32) + 0.5) / out_w)[None, :]
    shape = (*box.shape[:-1], out_h, out_w)
    return (xp.broadcast_to(y0 + ty * (y1 - y0), shape),
            xp.broadcast_to(x0 + tx * (x1 - x0), shape))
