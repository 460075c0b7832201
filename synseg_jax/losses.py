"""Loss functions shared by the methods. All are pure, channel-last and return float32 scalars
(``entropy_map`` returns a map).

Each loss computes in float32 whatever the input dtype: a bf16 log-softmax over 19 classes, or a
bf16 mean over a million pixels, loses digits that the 1e-3-weighted adversarial and 5e-3-weighted
entropy terms cannot afford.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from synseg_jax import images
from synseg_jax.data.labels import IGNORE_LABEL

__all__ = [
    "cross_entropy",
    "bce_with_logits",
    "mse_gan",
    "entropy_map",
    "robust_entropy",
    "feature_distance",
]


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_LABEL,
                  upsample: bool = True, align_corners: bool = False) -> jax.Array:
    """Mean softmax cross-entropy over the pixels whose label is a class.

    Args:
      logits: [B, h, w, C].
      labels: int [B, H, W]. ``ignore_index`` and any value outside [0, C) are not counted.
      ignore_index: the void label.
      upsample: when the sizes differ, True resizes the logits bilinearly to the label size (the
        DeepLab-lineage reference code); False resizes the labels to the logit size with nearest
        neighbour instead (cheaper at full resolution, slightly different numbers).
      align_corners: the bilinear upsampling's convention (``images.resize_bilinear``).

    Returns 0 (and zero gradients) when no pixel is counted, never nan: a crop that lands entirely
    on void happens in GTA5 and must not poison the update.
    """
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits [B,h,w,C] and labels [B,H,W], got {logits.shape} and "
                         f"{labels.shape}")
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if logits.shape[1:3] != labels.shape[1:3]:
        if upsample:
            logits = images.resize_bilinear(logits, labels.shape[1:3], align_corners)
        else:
            labels = images.resize_nearest(labels, logits.shape[1:3], half_pixel=True)
    labels = labels.astype(jnp.int32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    # Void pixels read class 0 so the gather stays in bounds; the mask then zeroes them.
    safe = jnp.where(valid, labels, 0)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    count = valid.sum()
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1).astype(jnp.float32)


def bce_with_logits(logits: jax.Array, target_value: float) -> jax.Array:
    """Mean binary cross-entropy of sigmoid(logits) against a constant target (GAN domain label).

    Uses max(x, 0) - x t + log(1 + exp(-|x|)), which never overflows for large |x|.
    """
    x = logits.astype(jnp.float32)
    t = jnp.asarray(target_value, jnp.float32)
    return jnp.mean(jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))


def mse_gan(pred: jax.Array, target_value: float) -> jax.Array:
    """Least-squares GAN objective: mean (pred - target)^2."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target_value))


def entropy_map(logits: jax.Array) -> jax.Array:
    """Per-pixel entropy of softmax(logits) over the last axis, divided by log C (so in [0, 1])."""
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # p log p from log p: a probability that underflows to 0 contributes 0, not 0 * -inf.
    ent = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return ent / math.log(num_classes)


def robust_entropy(logits: jax.Array, eta: float = 2.0) -> jax.Array:
    """FDA's Charbonnier-style entropy penalty: mean of ((H / log C)^2 + 1e-8)^eta.

    eta > 0.5 flattens the penalty near zero entropy (already confident pixels) and steepens it
    for uncertain ones.
    """
    return jnp.mean((jnp.square(entropy_map(logits)) + 1e-8) ** eta)


def feature_distance(x: jax.Array, z: jax.Array) -> jax.Array:
    """Mean over positions of the L2 distance between feature vectors (last axis = channels).

    ROAD's distillation term ||F(x) - F_0(x)||_2. The caller stops gradients into the frozen
    reference ``z``. The norm's gradient is undefined where x == z (d sqrt(s)/ds = inf at 0, and
    inf * 0 = nan); there the gradient is taken as 0, the minimum-norm subgradient.
    """
    if x.shape != z.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {z.shape}")
    diff = x.astype(jnp.float32) - z.astype(jnp.float32)
    sq = jnp.sum(jnp.square(diff), axis=-1)
    nonzero = sq > 0
    # Double where: sqrt never sees 0, so its derivative stays finite on both branches.
    dist = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
    return jnp.mean(dist)
