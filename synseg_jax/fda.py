"""Fourier Domain Adaptation (Yang & Soatto, CVPR 2020) as an input option of any method.

A source image keeps its phase (what is where) and takes the low-frequency amplitude (global
colour, illumination, texture energy) of a target image: per channel, FFT, swap the amplitude
inside a low-frequency window, inverse FFT, real part. It works on RGB 0..255 images before
normalisation, with one window for all channels, as both published versions do. The window
half-size is ``b = floor(min(H, W) * beta)``, and there are two published windows:

* ``"centered"``: the frequencies -b..b on both axes, a (2b+1)^2 square around the zero frequency
  of the shifted spectrum (FDA's numpy function, which the real-time DA paper's code uses);
* ``"corners"``: the b x b corners of the unshifted spectrum, i.e. frequencies -b..b-1 on each
  axis (FDA's PyTorch training code).

Neither version clips the result to 0..255 (FDA's training code feeds it on, mean subtracted),
and neither does this one. Source image i takes the amplitude of target image i of the batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from synseg_jax import images
from synseg_jax.choices import check_choice

VARIANTS = ("centered", "corners")
Batch = dict[str, dict[str, jax.Array]]


def check_beta(beta: float) -> None:
    if not 0.0 < beta < 0.5:
        raise ValueError(f"FDA beta must be in (0, 0.5) (the window must stay inside the "
                         f"spectrum; the papers use 0.01, 0.05, 0.09), got {beta!r}")


def window_half_size(height: int, width: int, beta: float) -> int:
    return int(np.floor(min(height, width) * beta))


def low_frequency_mask(height: int, width: int, beta: float, variant: str) -> np.ndarray:
    """Boolean [H, W] over the unshifted spectrum: True where the target's amplitude is taken."""
    check_beta(beta)
    check_choice("FDA variant", variant, VARIANTS)
    b = window_half_size(height, width, beta)

    def axis(n: int) -> np.ndarray:
        index = np.arange(n)
        if variant == "centered":  # frequencies -b..b: indices 0..b and n-b..n-1
            return (index <= b) | (index >= n - b)
        return (index < b) | (index >= n - b)  # corners: 0..b-1 and n-b..n-1

    return axis(height)[:, None] & axis(width)[None, :]


def source_to_target(source: jax.Array, target: jax.Array, beta: float,
                     variant: str = "centered") -> jax.Array:
    """Source images [B, H, W, C] (RGB 0..255) with the low-frequency amplitude of `target`
    (same shape), float32."""
    if source.shape != target.shape:
        raise ValueError(f"FDA needs source and target images of one shape, got {source.shape} "
                         f"and {target.shape} (crop both domains to the same size)")
    _, h, w, _ = source.shape
    mask = jnp.asarray(low_frequency_mask(h, w, beta, variant))[None, :, :, None]
    spec_s = jnp.fft.fft2(source.astype(jnp.float32), axes=(1, 2))
    spec_t = jnp.fft.fft2(target.astype(jnp.float32), axes=(1, 2))
    amplitude = jnp.where(mask, jnp.abs(spec_t), jnp.abs(spec_s))
    mixed = amplitude * jnp.exp(1j * jnp.angle(spec_s))
    return jnp.real(jnp.fft.ifft2(mixed, axes=(1, 2))).astype(jnp.float32)


def batch_transform(beta: float, variant: str, normalization: str
                    ) -> Callable[[Batch], Batch] | None:
    """The jittable input transform a config's `fda` section asks for (None when beta is 0):
    the batch's normalised source images, translated to the target's style by FDA and normalised
    again. The loop applies it before the method's step, so any method can switch it on."""
    if beta == 0.0:
        return None
    check_beta(beta)
    low_frequency_mask(2, 2, beta, variant)  # validates the variant now, not at the first step
    images.check_normalization(normalization)

    def transform(batch: Batch) -> Batch:
        if "target" not in batch:
            raise ValueError("FDA needs target images in the batch: set data.target")
        raw_s = images.denormalize(batch["source"]["image"], normalization)
        raw_t = images.denormalize(batch["target"]["image"], normalization)
        translated = source_to_target(raw_s, raw_t, beta, variant)
        source = {**batch["source"], "image": images.normalize(translated, normalization)}
        return {**batch, "source": source}

    return transform
