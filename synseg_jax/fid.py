"""Fréchet Inception Distance: feature statistics gathered batch by batch, and the distance.

FID (Heusel et al., NeurIPS 2017) fits a Gaussian to the features of each image set and measures
the Fréchet distance between the two:

    d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)

The statistics and the arithmetic follow TF FID's code and its port pytorch-fid
(``fid_score.py``), whose published numbers a comparison needs to match: the mean and the
unbiased covariance (divided by N - 1, ``np.cov``'s default), the square root of the product by
``scipy.linalg.sqrtm``, ``eps`` times the identity added to both covariances when that root is
not finite (a singular product), and a complex root accepted only when the imaginary parts of its
diagonal are numerical noise (below 1e-3), which are then dropped.

The features come from a function the caller chooses: the FID Inception-v3
(``models.inception.fid_inception_features`` on imported ``pt_inception-2015-12-05`` weights)
gives scores comparable with published ones; any other network (the demo uses one of the
project's) gives a Fréchet distance in that network's feature space, which is only comparable
with itself and must be named with its result. Statistics are accumulated in float64 on the host,
so memory does not grow with the number of images (a 2048 x 2048 sum, not N x 2048 features).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import scipy.linalg

# pytorch-fid's defaults: the diagonal offset for a singular product, and how large the
# imaginary part of the root's diagonal may be before the root is not trusted.
SINGULAR_EPS = 1e-6
IMAGINARY_ATOL = 1e-3

FeatureFn = Callable[[np.ndarray], np.ndarray]


class FeatureStatistics:
    """Running mean and covariance of feature vectors added batch by batch.

    Holds the count, the sum and the sum of outer products of the features minus a fixed shift
    (the first batch's mean), in float64. The shift keeps the covariance exact when the features'
    mean is large against their spread: sum(x xᵀ) - N mu muᵀ of unshifted features would cancel
    most of its digits.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    @property
    def dim(self) -> int | None:
        """Feature dimension, fixed by the first batch (None before it)."""
        return None if self._shift is None else self._shift.shape[0]

    def add(self, features) -> None:
        """Adds a batch of features [N, D] (any float dtype; N may be 0)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed: this batch has {x.shape[1]}, earlier "
                             f"batches had {self.dim}")
        if not np.isfinite(x).all():
            raise ValueError(f"features hold {np.count_nonzero(~np.isfinite(x))} non-finite "
                             f"values (batch of shape {x.shape})")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        centred = x - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += x.shape[0]

    def mean(self) -> np.ndarray:
        self._require(1)
        return self._shift + self._sum / self.count

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (divided by N - 1), as ``np.cov(features, rowvar=False)``."""
        self._require(2)
        centred_mean = self._sum / self.count
        return (self._outer - self.count * np.outer(centred_mean, centred_mean)) / (self.count - 1)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance): what ``frechet_distance`` takes, and what pytorch-fid's ``.npz``
        statistics files hold as ``mu`` and ``sigma``."""
        return self.mean(), self.covariance()

    def _require(self, needed: int) -> None:
        if self.count < needed:
            what = "a mean" if needed == 1 else "a covariance"
            raise ValueError(f"{what} needs at least {needed} feature vectors, got {self.count}")


def _check_moments(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: the mean must be [D] and the covariance [D, D], got "
                         f"{mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{which}: the mean or the covariance holds non-finite values")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SINGULAR_EPS) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), by pytorch-fid's procedure
    (see the module docstring).

    Raises:
        ValueError: mismatched or malformed shapes (both named), non-finite inputs, or a root
            whose diagonal has a large imaginary part (its size named).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_moments(mu1, sigma1, "first set")
    _check_moments(mu2, sigma2, "second set")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two sets have different feature dimensions: {mu1.shape[0]} and "
                         f"{mu2.shape[0]}")

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than dimensions, or dead features): regularise both.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > IMAGINARY_ATOL:
            raise ValueError(f"the square root of the covariance product has a diagonal "
                             f"imaginary component of {imaginary:.3g} (more than "
                             f"{IMAGINARY_ATOL:g}): the covariances are not usable")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def image_statistics(batches: Iterable[np.ndarray], features: FeatureFn) -> FeatureStatistics:
    """Feature statistics of uint8 RGB image batches [B, H, W, 3] under ``features``
    (images → [B, D])."""
    stats = FeatureStatistics()
    for i, batch in enumerate(batches):
        batch = np.asarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"image batch {i}: expected uint8 RGB [B, H, W, 3], got "
                             f"{batch.dtype} {batch.shape}")
        out = np.asarray(features(batch))
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise ValueError(f"image batch {i}: the feature function returned shape {out.shape} "
                             f"for {batch.shape[0]} images; it must return [B, D]")
        stats.add(out)
    return stats


def fid_of_images(batches_a: Iterable[np.ndarray], batches_b: Iterable[np.ndarray],
                  features: FeatureFn) -> float:
    """FID between two streams of uint8 RGB image batches [B, H, W, 3], each reduced to its
    feature statistics under ``features`` (e.g. ``inception.fid_inception_features``).

    Like every FID, the value is biased by the number of images: compare values computed on
    equal counts (``image_statistics(...).count``).
    """
    first = image_statistics(batches_a, features)
    second = image_statistics(batches_b, features)
    for name, stats in (("first", first), ("second", second)):
        if stats.count < 2:
            raise ValueError(f"FID needs at least 2 images per set; the {name} set has "
                             f"{stats.count}")
    return frechet_distance(*first.moments(), *second.moments())
