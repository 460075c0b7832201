"""FID arithmetic (``synseg_jax.fid``) against direct numpy / scipy references on random features.

The references are computed another way than the module does: the trace of the root by the
symmetric form Tr((S1^½ S2 S1^½)^½) from eigendecompositions, and the closed form for diagonal
covariances, sum (mu1 - mu2)² + sum (√a - √b)².
"""

import numpy as np
import pytest
import scipy.linalg

from synseg_jax import fid

RNG = np.random.default_rng(0)


def gaussian_features(n, mean, cov, rng=RNG):
    return rng.multivariate_normal(mean, cov, size=n)


def random_covariance(d, rng=RNG):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def reference_fid(mu1, s1, mu2, s2):
    """||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Tr((S1^½ S2 S1^½)^½), all by ``eigh``."""
    root1 = psd_sqrt(s1)
    cross = psd_sqrt(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def statistics_of(batches):
    stats = fid.FeatureStatistics()
    for batch in batches:
        stats.add(batch)
    return stats


def test_streaming_statistics_equal_numpy_mean_and_cov():
    # A mean far from 0 against a unit spread: the case where a plain sum of outer products
    # loses its digits.
    features = gaussian_features(203, np.full(6, 1e3), random_covariance(6))
    sizes = [1, 0, 50, 2, 100, 50]  # uneven, one empty, one single vector first
    batches = np.split(features, np.cumsum(sizes)[:-1])
    stats = statistics_of(batches)
    assert stats.count == 203 and stats.dim == 6
    np.testing.assert_allclose(stats.mean(), np.mean(features, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(features, rowvar=False),
                               rtol=1e-9, atol=1e-12)
    mu, sigma = stats.moments()
    np.testing.assert_array_equal(mu, stats.mean())
    np.testing.assert_array_equal(sigma, stats.covariance())


def test_frechet_distance_of_two_gaussians_matches_the_symmetric_reference():
    d = 12
    a = gaussian_features(400, RNG.normal(size=d), random_covariance(d))
    b = gaussian_features(300, RNG.normal(size=d) + 0.5, random_covariance(d))
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    want = reference_fid(mu1, s1, mu2, s2)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert want > 1.0  # two clearly different Gaussians
    assert got == pytest.approx(want, rel=1e-9)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(want)


def test_fid_of_a_set_with_itself_is_zero():
    features = gaussian_features(500, RNG.normal(size=16), random_covariance(16))
    mu, sigma = statistics_of([features[:200], features[200:]]).moments()
    scale = np.trace(sigma)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * scale


def toy_features(images: np.ndarray) -> np.ndarray:
    """A fixed nonlinear map of uint8 images to 5 features (channel means, a contrast, a
    corner pixel), standing in for a network."""
    x = images.astype(np.float64) / 255.0
    means = x.mean(axis=(1, 2))
    return np.concatenate([means, x.std(axis=(1, 2, 3))[:, None], x[:, 0, 0, :1] ** 2], axis=1)


def test_fid_of_image_batches_equals_the_distance_of_the_concatenated_features():
    first = RNG.integers(0, 256, size=(13, 8, 10, 3), dtype=np.uint8)
    second = np.clip(RNG.normal(150, 30, size=(9, 8, 10, 3)), 0, 255).astype(np.uint8)
    got = fid.fid_of_images([first[:5], first[5:]], [second[:4], second[4:7], second[7:]],
                            toy_features)
    fa, fb = toy_features(first), toy_features(second)
    want = reference_fid(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0),
                         np.cov(fb, rowvar=False))
    assert got == pytest.approx(want, rel=1e-7)
    assert fid.image_statistics([first], toy_features).count == 13


def test_too_few_samples_is_an_error_naming_the_count():
    stats = statistics_of([np.ones((1, 4))])
    with pytest.raises(ValueError, match="covariance needs at least 2 feature vectors, got 1"):
        stats.covariance()
    with pytest.raises(ValueError, match="mean needs at least 1 feature vectors, got 0"):
        fid.FeatureStatistics().mean()
    images = RNG.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="at least 2 images per set; the second set has 1"):
        fid.fid_of_images([images], [images[:1]], toy_features)


def test_mismatched_and_malformed_features_are_named():
    stats = statistics_of([np.zeros((3, 5))])
    with pytest.raises(ValueError, match="this batch has 4, earlier batches had 5"):
        stats.add(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"must be \[N, D\], got shape \(5,\)"):
        stats.add(np.zeros(5))
    with pytest.raises(ValueError, match="2 non-finite values"):
        stats.add(np.array([[0, 0, np.nan, 0, np.inf]]))
    with pytest.raises(ValueError, match="different feature dimensions: 3 and 2"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"second set: .* got \(3,\) and \(2, 2\)"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="first set: the mean or the covariance holds non-finite"):
        fid.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_bad_image_batches_and_feature_outputs_are_named():
    images = RNG.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"image batch 1: expected uint8 RGB .* float32"):
        fid.image_statistics([images, images.astype(np.float32)], toy_features)
    with pytest.raises(ValueError, match=r"image batch 0: expected uint8 RGB .*\(2, 4, 4, 1\)"):
        fid.image_statistics([images[..., :1]], toy_features)
    with pytest.raises(ValueError, match=r"returned shape \(5,\) for 2 images"):
        fid.image_statistics([images], lambda x: toy_features(x)[0])


def test_singular_product_is_retried_with_eps_on_both_covariances(monkeypatch):
    """pytorch-fid's fallback: a non-finite root → sqrtm((S1 + eps I)(S2 + eps I))."""
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 4.0])
    got = fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-2)
    np.testing.assert_allclose(calls[1], (s1 + 1e-2 * np.eye(2)) @ (s2 + 1e-2 * np.eye(2)))
    want = 1.0 + 4.0 - 2 * np.trace(real_sqrtm(calls[1]))
    assert got == pytest.approx(want)


def test_imaginary_root_is_dropped_when_tiny_and_an_error_naming_it_when_large(monkeypatch):
    def complex_root(imaginary):
        return lambda a: np.eye(2) + 1j * imaginary * np.eye(2)

    monkeypatch.setattr(scipy.linalg, "sqrtm", complex_root(1e-6))
    assert fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)) == pytest.approx(0)
    monkeypatch.setattr(scipy.linalg, "sqrtm", complex_root(0.25))
    with pytest.raises(ValueError, match="imaginary component of 0.25"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
