"""Average pooling whose padded cells do not count (PyTorch's ``count_include_pad=False``, TF's
average pool), with the divisor computed on the host.

flax's ``avg_pool(count_include_pad=False)`` divides by a pooled array of ones, a constant XLA
then folds at compile time: at 512x512 that folding alone takes seconds per pool and minutes for
a multi-scale discriminator's step. The divisor depends on shapes only, so numpy makes it at
trace time; the quotient is the same (the same sum, divided by the same integer counts).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _counts_1d(size: int, window: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
    """For each output position along one axis, how many of its window's cells are inside."""
    out = (size + pad[0] + pad[1] - window) // stride + 1
    start = np.arange(out) * stride - pad[0]
    return np.minimum(start + window, size) - np.maximum(start, 0)


def avg_pool_uncounted_padding(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                               padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Average pool of NHWC `x` over the cells of each window that lie inside the image."""
    summed = nn.pool(x, 0.0, jax.lax.add, window, strides, padding)
    counts = np.outer(*(_counts_1d(size, k, s, p) for size, k, s, p in
                        zip(x.shape[1:3], window, strides, padding)))
    return summed / jnp.asarray(counts, x.dtype)[None, :, :, None]
