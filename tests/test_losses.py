"""Losses against numpy references, plus their edge cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax import images, losses


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_bilinear_torch(x, out_h, out_w):
    """PyTorch's bilinear interpolation with align_corners=False, for [B, h, w, C]."""
    def axis_weights(n_out, n_in):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)  # PyTorch clamps negative source coordinates
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        return lo, hi, frac

    r0, r1, fr = axis_weights(out_h, x.shape[1])
    c0, c1, fc = axis_weights(out_w, x.shape[2])
    fr = fr[None, :, None, None]
    fc = fc[None, None, :, None]
    top = x[:, r0][:, :, c0] * (1 - fc) + x[:, r0][:, :, c1] * fc
    bottom = x[:, r1][:, :, c0] * (1 - fc) + x[:, r1][:, :, c1] * fc
    return top * (1 - fr) + bottom * fr


def np_cross_entropy(logits, labels, ignore=255):
    log_p = np_log_softmax(logits.astype(np.float64))
    valid = (labels != ignore) & (labels < logits.shape[-1])
    if not valid.any():
        return 0.0
    b, h, w = np.nonzero(valid)
    return -log_p[b, h, w, labels[valid]].mean()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_cross_entropy_same_size_with_ignore(rng):
    logits = rng.normal(size=(2, 6, 5, 19)).astype(np.float32) * 3
    labels = rng.integers(0, 19, (2, 6, 5))
    labels[rng.random(labels.shape) < 0.3] = 255
    labels[0, 0, 0] = 30  # out of range: ignored like 255
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels.astype(np.uint8)))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_cross_entropy(logits, labels), rtol=1e-5)


@pytest.mark.parametrize("src,dst", [((5, 7), (17, 23)), ((4, 4), (32, 32)), ((9, 11), (4, 6))])
def test_cross_entropy_resizes_logits_like_pytorch_bilinear(rng, src, dst):
    logits = rng.normal(size=(2, *src, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, *dst))
    labels[:, 0, :] = 255
    resized = np_bilinear_torch(logits.astype(np.float64), *dst)
    np.testing.assert_allclose(images.resize_bilinear(jnp.asarray(logits), dst), resized,
                               atol=1e-5)
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(got, np_cross_entropy(resized, labels), rtol=1e-5)


def test_cross_entropy_without_upsampling_downsizes_labels_nearest(rng):
    logits = rng.normal(size=(1, 4, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (1, 8, 18))
    rows = np.floor((np.arange(4) + 0.5) * 8 / 4).astype(int)
    cols = np.floor((np.arange(6) + 0.5) * 18 / 6).astype(int)
    small = labels[:, rows][:, :, cols]
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), upsample=False)
    np.testing.assert_allclose(got, np_cross_entropy(logits, small), rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient(rng):
    logits = jnp.asarray(rng.normal(size=(2, 3, 3, 5)).astype(np.float32))
    labels = jnp.full((2, 6, 6), 255, jnp.int32)
    value, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
    assert value == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_gradient_finite_with_extreme_logits():
    logits = jnp.array([[[[1e4, -1e4, 0.0]]]], jnp.float32)
    labels = jnp.array([[[1]]], jnp.int32)
    value, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
    assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(value, 2e4, rtol=1e-6)


def test_cross_entropy_computes_in_float32_for_bf16_logits(rng):
    logits = rng.normal(size=(1, 4, 4, 19)).astype(np.float32)
    labels = rng.integers(0, 19, (1, 4, 4))
    got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert got.dtype == jnp.float32
    ref = np_cross_entropy(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64), labels)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_bce_with_logits_matches_numpy_and_is_stable(rng):
    x = rng.normal(size=(3, 4, 5, 1)).astype(np.float32) * 4
    for t in (0.0, 1.0, 0.3):
        p = 1 / (1 + np.exp(-x.astype(np.float64)))
        ref = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
        np.testing.assert_allclose(losses.bce_with_logits(jnp.asarray(x), t), ref, rtol=1e-5)
    extreme = jnp.array([100.0, -100.0])
    np.testing.assert_allclose(losses.bce_with_logits(extreme, 1.0), 50.0, rtol=1e-6)
    grad = jax.grad(losses.bce_with_logits)(extreme, 0.0)
    assert np.isfinite(np.asarray(grad)).all()


def test_mse_gan(rng):
    x = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(losses.mse_gan(jnp.asarray(x), 1.0), ((x - 1.0) ** 2).mean(),
                               rtol=1e-6)
    assert losses.mse_gan(jnp.zeros((3,)), 0.0) == 0.0


def test_entropy_map_and_robust_entropy(rng):
    logits = rng.normal(size=(2, 3, 4, 19)).astype(np.float32) * 2
    p = np.exp(np_log_softmax(logits.astype(np.float64)))
    ent = -(p * np.log(p)).sum(-1) / np.log(19)
    got = losses.entropy_map(jnp.asarray(logits))
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got, ent, rtol=1e-5)
    for eta in (2.0, 0.5):
        np.testing.assert_allclose(losses.robust_entropy(jnp.asarray(logits), eta),
                                   ((ent ** 2 + 1e-8) ** eta).mean(), rtol=1e-5)
    # Uniform -> 1; a saturated softmax -> 0 without nan (p = 0 entries contribute nothing).
    np.testing.assert_allclose(losses.entropy_map(jnp.zeros((1, 7))), [1.0], rtol=1e-6)
    sharp = jnp.array([[1e4, -1e4, -1e4]])
    assert losses.entropy_map(sharp)[0] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(np.asarray(jax.grad(lambda x: losses.robust_entropy(x))(sharp))).all()


def test_feature_distance_matches_numpy(rng):
    x = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
    z = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
    ref = np.sqrt(((x.astype(np.float64) - z) ** 2).sum(-1)).mean()
    np.testing.assert_allclose(losses.feature_distance(jnp.asarray(x), jnp.asarray(z)), ref,
                               rtol=1e-5)


def test_feature_distance_gradient_finite_where_x_equals_z(rng):
    z = jnp.asarray(rng.normal(size=(1, 3, 3, 4)).astype(np.float32))
    x = z.at[0, 0, 0].add(jnp.array([3.0, 4.0, 0.0, 0.0]))  # one position at distance 5
    value, grad = jax.value_and_grad(losses.feature_distance)(x, z)
    np.testing.assert_allclose(value, 5.0 / 9, rtol=1e-5)
    grad = np.asarray(grad)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad[0, 0, 0], np.array([3, 4, 0, 0]) / 5 / 9, rtol=1e-5)
    assert np.all(grad[0, 1:] == 0) and np.all(grad[0, 0, 1:] == 0)
    value, grad = jax.value_and_grad(losses.feature_distance)(z, z)
    assert value == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_losses_jit():
    logits = jnp.zeros((1, 2, 2, 3))
    labels = jnp.zeros((1, 4, 4), jnp.int32)
    assert math.isclose(float(jax.jit(losses.cross_entropy)(logits, labels)), math.log(3),
                        rel_tol=1e-6)


def test_cross_entropy_upsamples_with_the_chosen_corner_convention():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7, 4)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, (2, 17, 25)), jnp.int32)
    for corners in (False, True):
        want = losses.cross_entropy(images.resize_bilinear(logits, (17, 25), corners), labels)
        got = losses.cross_entropy(logits, labels, align_corners=corners)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert abs(float(losses.cross_entropy(logits, labels, align_corners=True))
               - float(losses.cross_entropy(logits, labels))) > 1e-3
