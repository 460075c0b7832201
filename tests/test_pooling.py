"""Average pooling that does not count padding: each output is the mean of the window's cells
that lie inside the image, as PyTorch's count_include_pad=False computes it."""

import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax.models import pooling


def reference(x, window, stride, pad):
    n, h, w, c = x.shape
    out_h = (h + 2 * pad - window) // stride + 1
    out_w = (w + 2 * pad - window) // stride + 1
    y = np.zeros((n, out_h, out_w, c), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * stride - pad, j * stride - pad
            cells = x[:, max(r0, 0):min(r0 + window, h), max(c0, 0):min(c0 + window, w)]
            y[:, i, j] = cells.mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("shape, stride", [((2, 7, 9, 3), 2), ((1, 8, 8, 2), 1), ((1, 5, 6, 1), 2)])
def test_mean_of_the_cells_inside_the_image(shape, stride):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = pooling.avg_pool_uncounted_padding(jnp.asarray(x), (3, 3), (stride, stride),
                                             ((1, 1), (1, 1)))
    np.testing.assert_allclose(np.asarray(got), reference(x, 3, stride, 1), rtol=1e-6, atol=1e-6)
    # A corner averages 4 cells, an edge 6: counting the padding would shrink both.
    ones = pooling.avg_pool_uncounted_padding(jnp.ones(shape), (3, 3), (stride, stride),
                                              ((1, 1), (1, 1)))
    np.testing.assert_array_equal(np.asarray(ones), 1.0)
