"""Pseudo-label selection for self-training on the target (real) split.

A model's softmax output for each target image, ``probs`` [H, W, C] or [B, H, W, C], is turned
into a label map: each pixel gets its argmax class when that class's probability (the pixel's
*confidence*) reaches a threshold, and ``IGNORE`` (255) otherwise. Three rules are offered:

* ``class_percentile`` (defaults ``percentile=66``, ``cap=0.9``): a threshold per class, the
  66th percentile of the confidences of every pixel of the split predicted as that class, capped
  at 0.9. These are the defaults of FDA (Yang & Soatto, "FDA: Fourier Domain Adaptation for
  Semantic Segmentation", CVPR 2020) and of the real-time domain adaptation work that reuses
  its self-training recipe. Per-class thresholds keep rare, low-confidence classes (poles,
  signs) from vanishing from the pseudo-labels, as a single global threshold would make them.
* ``class_median`` (``cap=0.9``): the same rule at the 50th percentile, BDL's choice (Li, Yuan
  & Vasconcelos, "Bidirectional Learning for Domain Adaptation of Semantic Segmentation",
  CVPR 2019). It is ``class_percentile`` with ``percentile=50``, computed by the same code.
* ``flat`` (``threshold``): one confidence threshold for every class; needs no statistics.

Two passes, because the split does not fit in memory
----------------------------------------------------
The per-class rules need a statistic of the whole split before any image can be labelled. The
reference implementations gather every pixel's confidence on the host and sort them; keeping
the probabilities themselves would be 2,975 x 1024 x 512 x 19 float32 = 118 GB for Cityscapes
train. Here nothing proportional to the split is ever held:

1. Statistics: ``update(histogram, probs, mask)`` adds a batch to a per-class histogram of
   confidences, int32 counts [C, num_bins] over [0, 1] (76 KB at the default 1,000 bins). It is
   jittable (fixed shapes, one bincount per example) and ``mask`` drops the padding examples
   that fill a split's last batch. ``thresholds_from_histogram`` then reads the per-class
   percentiles off the cumulative counts on the host.
2. Labelling: a second pass over the split with ``select(probs, thresholds)`` (or
   ``select_flat(probs, threshold)``), also jittable, writes the label maps.

Threshold convention (exact, not approximate)
---------------------------------------------
Bin k holds confidences in ``[edges[k], edges[k+1])`` with ``edges = bin_edges(num_bins)``
(float32 k / num_bins); the last bin also takes 1.0 and anything above it (softmax rounding).
For a class with N predicted pixels and sorted confidences s_0 <= ... <= s_{N-1}, the
``percentile=p`` value is ``s_i`` with ``i = floor(p / 100 * N)`` (clipped to N - 1): at most
p% of the pixels lie strictly below it. The returned threshold is the *lower edge of the bin
that holds s_i*, then ``min(cap, .)``. Hence:

* the threshold is within one bin width (1e-3 by default) below the exact percentile value;
* because binning and selection compare the same float32 values against the same edges, a
  pixel is kept exactly when its bin index is >= that bin, so the kept fraction of each class
  is >= 1 - p/100 (at least the most confident 34% for p = 66), exceeding it by at most the
  share of pixels in that one bin. The cap can only lower a threshold, i.e. keep more.

FDA's reference indexes the sorted list at ``round(0.66 * N)`` rather than ``floor``; the two
differ by at most one pixel. A class that no pixel of the split was predicted as gets
``threshold = cap``; it matters only if the thresholds are applied to other images than the
ones they were computed on (FDA's code uses 0 there, i.e. keep everything).

Counts are int32 on the device: one (class, bin) cell overflows past 2**31 pixels, beyond
Cityscapes train at 1024x512 (1.6e9 pixels in all) but not at full resolution. For larger
splits, take each batch's ``batch_histogram`` to the host and sum in int64;
``thresholds_from_histogram`` accepts any integer array.

The device functions (``batch_histogram``, ``update``, ``select``, ``select_flat``,
``precision_coverage``) are wrapped in ``jax.jit`` already, so a plain call from a host loop
compiles once per input shape instead of dispatching op by op; they inline into an outer
``jax.jit`` as well.

Pseudo-labels are evaluated against ground truth with ``precision_coverage`` (jittable
per-class counts, summed over batches with ``add_counts``) and ``precision_coverage_ratios``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from synseg_jax.data.labels import IGNORE_LABEL as IGNORE  # numpy only: no TensorFlow

DEFAULT_NUM_BINS = 1000
# Label maps are uint8: a quarter of int32's memory and the dtype label PNGs are stored in.
LABEL_DTYPE = np.uint8

KINDS = ("class_percentile", "class_median", "flat")
_DEFAULTS = {
    "class_percentile": {"percentile": 66.0, "cap": 0.9},
    "class_median": {"cap": 0.9},
    "flat": {"threshold": 0.9},
}


# ---------------------------------------------------------------------------------------------
# Parameter checks (shared by Rule and the host functions, so one message format everywhere)


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _check_percentile(percentile) -> float:
    p = _number("percentile", percentile)
    if not 0.0 <= p <= 100.0:  # also rejects nan
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    return p


def _check_unit(name: str, value) -> float:
    v = _number(name, value)
    if not 0.0 < v <= 1.0:  # 0 would keep every pixel, which is no selection at all
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# Shapes


def _batched(probs, mask):
    """Returns probs as [B, H, W, C] and mask as bool [B, H, W] (or None)."""
    probs = jnp.asarray(probs)
    if probs.ndim == 3:
        probs = probs[None]
        if mask is not None:
            mask = jnp.asarray(mask, dtype=bool)
            if mask.shape != probs.shape[1:3]:
                raise ValueError(f"mask for one image must have shape {probs.shape[1:3]}, "
                                 f"got {mask.shape}")
            mask = mask[None]
    elif probs.ndim == 4:
        if mask is not None:
            mask = jnp.asarray(mask, dtype=bool)
            if mask.shape == probs.shape[:1]:
                mask = jnp.broadcast_to(mask[:, None, None], probs.shape[:3])
            elif mask.shape != probs.shape[:3]:
                raise ValueError(f"mask must have shape {probs.shape[:1]} (per image) or "
                                 f"{probs.shape[:3]} (per pixel), got {mask.shape}")
    else:
        raise ValueError(f"probs must be [H, W, C] or [B, H, W, C], got shape {probs.shape}")
    return probs, mask


def _confidence(probs):
    """Argmax class (int32) and its probability (float32), shapes probs.shape[:-1]."""
    # float32 before the max, so that binning and selection compare identical values even for
    # bfloat16 model outputs.
    probs = probs.astype(jnp.float32)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)


def _per_example_bincount(idx, length):
    """Sum over the batch of per-example bincounts of int idx [B, ...] -> int32 [length].

    One bincount per example, then a sum: a single bincount over a batch-sharded array is an
    ambiguous scatter under Explicit mesh axes (see metrics.confusion_matrix), a sum is not.
    """
    flat = idx.reshape(idx.shape[0], -1)
    counts = jax.vmap(lambda i: jnp.bincount(i, length=length))(flat)
    return counts.astype(jnp.int32).sum(axis=0, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# Pass 1: statistics


def bin_edges(num_bins: int = DEFAULT_NUM_BINS) -> np.ndarray:
    """float32 [num_bins + 1] edges k / num_bins; bin k is [edges[k], edges[k+1])."""
    if int(num_bins) < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins!r}")
    return (np.arange(int(num_bins) + 1, dtype=np.float64) / int(num_bins)).astype(np.float32)


def empty_histogram(num_classes: int, num_bins: int = DEFAULT_NUM_BINS) -> jax.Array:
    """All-zero int32 [num_classes, num_bins] histogram to start ``update`` from."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    bin_edges(num_bins)  # validates num_bins
    return jnp.zeros((int(num_classes), int(num_bins)), jnp.int32)


def _bin_index(conf, num_bins):
    edges = jnp.asarray(bin_edges(num_bins))
    # floor(conf * n) can land one bin off after float rounding; one step each way against the
    # stored edges makes the bin agree exactly with `conf >= edges[k]`, the test `select` uses.
    k = jnp.clip(jnp.floor(conf * num_bins).astype(jnp.int32), 0, num_bins - 1)
    k = k - (conf < edges[k]).astype(jnp.int32)
    k = jnp.clip(k, 0, num_bins - 1)
    k = k + (conf >= edges[k + 1]).astype(jnp.int32)
    return jnp.clip(k, 0, num_bins - 1)


@functools.partial(jax.jit, static_argnames="num_bins")
def batch_histogram(probs, num_bins: int = DEFAULT_NUM_BINS, mask=None) -> jax.Array:
    """Per-class confidence histogram of one batch, int32 [C, num_bins]. Jitted.

    Args:
      probs: softmax probabilities [H, W, C] or [B, H, W, C].
      num_bins: histogram resolution over [0, 1]; static under ``jax.jit``.
      mask: optional bool, [B] (per image) or [B, H, W] (per pixel), [H, W] for one image;
        False entries (padding examples of a final batch, say) are not counted.

    A pixel counts towards the row of its argmax class, in the bin of its confidence. Pixels
    with a non-finite confidence (a diverged model) are not counted.
    """
    num_bins = int(num_bins)
    probs, mask = _batched(probs, mask)
    c = probs.shape[-1]
    pred, conf = _confidence(probs)
    valid = jnp.isfinite(conf)
    if mask is not None:
        valid &= mask
    # Uncounted pixels go to one extra slot past the end, which is sliced away.
    idx = jnp.where(valid, pred * num_bins + _bin_index(conf, num_bins), c * num_bins)
    counts = _per_example_bincount(idx, c * num_bins + 1)
    return counts[: c * num_bins].reshape(c, num_bins)


@jax.jit
def update(histogram, probs, mask=None) -> jax.Array:
    """Returns ``histogram`` + the batch's ``batch_histogram``. Jitted.

    ``histogram`` is [C, num_bins] (from ``empty_histogram``); C must match ``probs``' last axis,
    and its num_bins is used. ``mask`` as in ``batch_histogram``. The sum is int32 (see the module
    docstring on overflow for very large splits).
    """
    histogram = jnp.asarray(histogram)
    if histogram.ndim != 2:
        raise ValueError(f"histogram must be [C, num_bins], got shape {histogram.shape}")
    if histogram.shape[0] != jnp.shape(probs)[-1]:
        raise ValueError(f"histogram has {histogram.shape[0]} classes but probs has "
                         f"{jnp.shape(probs)[-1]}")
    counts = batch_histogram(probs, histogram.shape[1], mask)
    return histogram.astype(jnp.int32) + counts


def thresholds_from_histogram(histogram, percentile: float = 66.0,
                              cap: float = 0.9) -> np.ndarray:
    """Per-class thresholds, float32 [C], from a (summed) confidence histogram. Host side.

    threshold_c = min(cap, lower edge of the bin holding the class's ``percentile``-th
    percentile confidence), as defined in the module docstring: at most ``percentile``% of
    class c's pixels fall below it, so at least (100 - percentile)% are kept. A class with no
    pixels gets ``cap``.
    """
    p = _check_percentile(percentile)
    cap32 = np.float32(_check_unit("cap", cap))
    hist = np.asarray(jax.device_get(histogram))
    if hist.ndim != 2 or hist.shape[1] < 1:
        raise ValueError(f"histogram must be [C, num_bins], got shape {hist.shape}")
    if not np.issubdtype(hist.dtype, np.integer):
        raise ValueError(f"histogram must hold integer counts, got dtype {hist.dtype}")
    hist = hist.astype(np.int64)
    if (hist < 0).any():
        raise ValueError("histogram has negative counts (int32 overflow?)")
    edges = bin_edges(hist.shape[1])
    cum = np.cumsum(hist, axis=1)
    total = cum[:, -1]
    # Sorted index of the percentile value; p * N first keeps it exact for integer p.
    rank = np.minimum(np.floor(p * total / 100.0).astype(np.int64), np.maximum(total - 1, 0))
    # The bin holding sorted element `rank` is the first whose cumulative count exceeds it.
    k = np.argmax(cum > rank[:, None], axis=1)
    thresholds = np.where(total > 0, edges[k], cap32)
    return np.minimum(thresholds, cap32).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Pass 2: labelling


def _labels(pred, keep):
    return jnp.where(keep, pred, IGNORE).astype(LABEL_DTYPE)


def _check_num_classes(c):
    if c > IGNORE:
        raise ValueError(f"at most {IGNORE} classes fit uint8 labels with {IGNORE} reserved, "
                         f"got {c}")


@jax.jit
def select(probs, thresholds) -> jax.Array:
    """Pseudo-labels with per-class thresholds. Jitted.

    Args:
      probs: softmax probabilities [H, W, C] or [B, H, W, C] (any float dtype).
      thresholds: float [C], e.g. from ``thresholds_from_histogram`` or ``Rule.thresholds``.

    Returns:
      uint8 labels of shape ``probs.shape[:-1]``: the argmax class where its probability is
      >= the threshold of that class (compared in float32), ``IGNORE`` (255) elsewhere.
    """
    probs = jnp.asarray(probs)
    c = probs.shape[-1]
    _check_num_classes(c)
    thresholds = jnp.asarray(thresholds, jnp.float32)
    if thresholds.shape != (c,):
        raise ValueError(f"thresholds must have shape ({c},), got {thresholds.shape}")
    pred, conf = _confidence(probs)
    return _labels(pred, conf >= thresholds[pred])


def select_flat(probs, threshold) -> jax.Array:
    """Pseudo-labels with one threshold for all classes; as ``select``. Jitted.

    ``threshold`` may be traced under jit; as a Python number it is checked to be in (0, 1].
    """
    if isinstance(threshold, (int, float)):
        _check_unit("threshold", threshold)
    return _select_flat(probs, threshold)


@jax.jit
def _select_flat(probs, threshold):
    probs = jnp.asarray(probs)
    _check_num_classes(probs.shape[-1])
    pred, conf = _confidence(probs)
    return _labels(pred, conf >= jnp.asarray(threshold, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """A validated selection rule; build it with ``make_rule``.

    ``percentile`` and ``cap`` are set for the per-class kinds (``class_median`` has
    percentile 50), ``threshold`` for ``flat``; the unused fields are None.
    """

    kind: str
    percentile: float | None = None
    cap: float | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown pseudo-label rule kind {self.kind!r}; valid kinds: "
                             f"{', '.join(KINDS)}")
        if self.kind == "flat":
            if self.percentile is not None or self.cap is not None:
                raise ValueError("a 'flat' rule takes only 'threshold'")
            object.__setattr__(self, "threshold", _check_unit("threshold", self.threshold))
        else:
            if self.threshold is not None:
                raise ValueError(f"a {self.kind!r} rule takes no 'threshold'")
            p = _check_percentile(self.percentile)
            if self.kind == "class_median" and p != 50.0:
                raise ValueError(f"a 'class_median' rule has percentile 50, got {p!r}")
            object.__setattr__(self, "percentile", p)
            object.__setattr__(self, "cap", _check_unit("cap", self.cap))

    @property
    def needs_statistics(self) -> bool:
        """True when the rule needs pass 1 (a histogram of the split) before labelling."""
        return self.kind != "flat"

    def thresholds(self, histogram=None, num_classes: int | None = None) -> np.ndarray:
        """Per-class float32 [C] thresholds for ``select``.

        Per-class kinds need the split's ``histogram``; ``flat`` needs only C, taken from
        ``num_classes`` or the histogram's shape.
        """
        if self.kind == "flat":
            if num_classes is None:
                if histogram is None:
                    raise ValueError("a 'flat' rule needs num_classes or a histogram")
                num_classes = np.shape(histogram)[0]
            return np.full((int(num_classes),), self.threshold, np.float32)
        if histogram is None:
            raise ValueError(f"a {self.kind!r} rule needs the split's confidence histogram")
        return thresholds_from_histogram(histogram, self.percentile, self.cap)


def make_rule(kind: str, **params) -> Rule:
    """Builds a ``Rule``: ``"class_percentile"`` (percentile=66, cap=0.9), ``"class_median"``
    (cap=0.9) or ``"flat"`` (threshold=0.9); missing parameters take those defaults.

    Raises ValueError for an unknown kind (listing the valid ones), a parameter the kind does
    not take, or a value out of range (percentile in [0, 100], cap and threshold in (0, 1]).
    """
    if kind not in _DEFAULTS:
        raise ValueError(f"unknown pseudo-label rule kind {kind!r}; valid kinds: "
                         f"{', '.join(KINDS)}")
    allowed = _DEFAULTS[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"rule kind {kind!r} takes no parameter(s) {', '.join(unknown)}; "
                         f"it takes: {', '.join(allowed)}")
    values = {**allowed, **params}
    if kind == "class_median":
        values["percentile"] = 50.0
    return Rule(kind=kind, **values)


# ---------------------------------------------------------------------------------------------
# Evaluation against ground truth


class PseudoLabelCounts(NamedTuple):
    """int32 [C] counts over pixels with valid ground truth (gt in [0, C)).

    correct: pseudo == gt == c.  selected: pseudo == c.  gt_total: gt == c.
    selected_with_gt: gt == c and the pixel has any pseudo-label.
    """

    correct: jax.Array
    selected: jax.Array
    gt_total: jax.Array
    selected_with_gt: jax.Array


@functools.partial(jax.jit, static_argnames="num_classes")
def precision_coverage(pseudo, gt, num_classes: int, mask=None) -> PseudoLabelCounts:
    """Per-class counts for pseudo-label precision and coverage. Jitted (num_classes static).

    Args:
      pseudo: integer pseudo-labels [H, W] or [B, H, W]; values outside [0, C) (IGNORE) mean
        "not selected".
      gt: ground truth of the same shape; pixels with gt outside [0, C) (255) are left out of
        every count, since there is nothing to check a pseudo-label against there.
      num_classes: C.
      mask: optional bool [B] or [B, H, W]; False entries are not counted.

    Sum batches with ``add_counts``; ``precision_coverage_ratios`` turns the totals into ratios.
    """
    c = int(num_classes)
    pseudo = jnp.asarray(pseudo)
    gt = jnp.asarray(gt)
    if pseudo.shape != gt.shape:
        raise ValueError(f"pseudo {pseudo.shape} and gt {gt.shape} must have the same shape")
    if pseudo.ndim == 2:
        pseudo, gt = pseudo[None], gt[None]
        mask = None if mask is None else jnp.asarray(mask, bool)[None]
    if pseudo.ndim != 3:
        raise ValueError(f"pseudo and gt must be [H, W] or [B, H, W], got {pseudo.shape}")
    # int32 first: comparing uint8 with C or 255 is fine, but arithmetic on it would wrap.
    p = pseudo.astype(jnp.int32)
    g = gt.astype(jnp.int32)
    valid = (g >= 0) & (g < c)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.shape == p.shape[:1]:
            mask = mask[:, None, None]
        elif mask.shape != p.shape:
            raise ValueError(f"mask must have shape {p.shape[:1]} or {p.shape}, got {mask.shape}")
        valid &= mask
    chosen = (p >= 0) & (p < c)
    # One count of (gt, pseudo) pairs, with column C for "no pseudo-label", holds all four
    # statistics; uncounted pixels go to the extra slot (C+1)**2.
    n = c + 1
    idx = jnp.where(valid, g * n + jnp.where(chosen, p, c), n * n)
    pairs = _per_example_bincount(idx, n * n + 1)[: n * n].reshape(n, n)[:c]
    gt_total = pairs.sum(axis=1, dtype=jnp.int32)
    return PseudoLabelCounts(
        correct=jnp.diagonal(pairs[:, :c]),
        selected=pairs[:, :c].sum(axis=0, dtype=jnp.int32),
        gt_total=gt_total,
        selected_with_gt=gt_total - pairs[:, c],
    )


def add_counts(a: PseudoLabelCounts, b: PseudoLabelCounts) -> PseudoLabelCounts:
    """Element-wise sum (``a + b`` on the NamedTuples would concatenate them)."""
    return PseudoLabelCounts(*(x + y for x, y in zip(a, b)))


def precision_coverage_ratios(counts: PseudoLabelCounts) -> tuple[np.ndarray, np.ndarray]:
    """Host side: (precision, coverage), float64 [C] each, NaN where the denominator is 0.

    precision_c = correct_c / selected_c: how often a pixel labelled c really is c.
    coverage_c = selected_with_gt_c / gt_total_c: the share of class c's pixels that received
    any pseudo-label.
    """
    correct, selected, gt_total, covered = (
        np.asarray(jax.device_get(x), np.float64) for x in counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(selected > 0, correct / selected, np.nan)
        coverage = np.where(gt_total > 0, covered / gt_total, np.nan)
    return precision, coverage


__all__ = [
    "IGNORE", "DEFAULT_NUM_BINS", "LABEL_DTYPE", "KINDS", "Rule", "make_rule", "bin_edges",
    "empty_histogram", "batch_histogram", "update", "thresholds_from_histogram", "select",
    "select_flat", "PseudoLabelCounts", "precision_coverage", "add_counts",
    "precision_coverage_ratios",
]
