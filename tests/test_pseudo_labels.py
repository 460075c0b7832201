"""Pseudo-label selection: histogram thresholds against exact numpy percentiles, masks, caps,
the three rules, jit, and precision/coverage counts on a hand-checked example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax import pseudo_labels as pl

C = 4
BINS = 100
WIDTH = 1.0 / BINS


def random_probs(rng, shape=(6, 16, 16), num_classes=C, scale=2.0):
    """Softmax of random logits: confidences spread over most of (1/C, 1)."""
    logits = scale * rng.standard_normal(shape + (num_classes,))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def accumulate(probs, batch=2, num_bins=BINS, fn=pl.update):
    hist = pl.empty_histogram(probs.shape[-1], num_bins)
    for start in range(0, len(probs), batch):
        hist = fn(hist, probs[start:start + batch])
    return np.asarray(hist)


def class_confidences(probs):
    return probs.argmax(-1), probs.max(-1)


def reference_histogram(probs, num_bins=BINS):
    """Plain numpy: bin k holds edges[k] <= confidence < edges[k+1], the last bin also 1.0."""
    pred, conf = class_confidences(probs)
    k = np.clip(np.searchsorted(pl.bin_edges(num_bins), conf, side="right") - 1, 0, num_bins - 1)
    hist = np.zeros((probs.shape[-1], num_bins), np.int64)
    np.add.at(hist, (pred, k), 1)
    return hist


@pytest.fixture(scope="module")
def data():
    probs = random_probs(np.random.default_rng(0))
    return probs, accumulate(probs)


@pytest.mark.parametrize("p", [50.0, 66.0, 90.0])
def test_thresholds_match_numpy_percentile_over_batches(data, p):
    probs, hist = data
    pred, conf = class_confidences(probs)
    thr = pl.thresholds_from_histogram(hist, p, cap=1.0)
    assert thr.dtype == np.float32 and thr.shape == (C,)
    for c in range(C):
        x = np.sort(conf[pred == c])
        assert len(x) > 200  # enough pixels per class that percentiles are dense
        # Within one bin width of numpy's (interpolated) percentile of the full set...
        assert abs(thr[c] - np.percentile(x, p)) <= WIDTH
        # ...and exactly the documented value: lower edge of the bin of sorted[floor(p N / 100)].
        v = x[min(int(np.floor(p * len(x) / 100)), len(x) - 1)]
        assert thr[c] <= v < thr[c] + WIDTH
        assert thr[c] == pl.bin_edges(BINS)[int(np.floor(thr[c] * BINS + 0.5))]


def test_histogram_matches_numpy_and_batching_does_not_change_it(data):
    probs, hist = data  # accumulated over three batches of two
    np.testing.assert_array_equal(hist, reference_histogram(probs))
    np.testing.assert_array_equal(accumulate(probs, batch=len(probs)), hist)
    assert hist.sum() == probs[..., 0].size


def test_masked_examples_and_pixels_do_not_count(data):
    probs, hist = data
    rng = np.random.default_rng(1)
    # A final batch of four real examples and two padding ones.
    batch = np.concatenate([probs[:4], random_probs(rng, shape=(2, 16, 16))])
    h = pl.update(pl.empty_histogram(C, BINS), batch, mask=np.array([True] * 4 + [False] * 2))
    np.testing.assert_array_equal(np.asarray(h), reference_histogram(probs[:4]))
    assert not np.array_equal(reference_histogram(batch), reference_histogram(probs[:4]))

    pixel_mask = rng.random(probs.shape[:3]) < 0.5
    h = pl.update(pl.empty_histogram(C, BINS), probs, mask=pixel_mask)
    np.testing.assert_array_equal(np.asarray(h), reference_histogram(probs[pixel_mask]))


@pytest.mark.parametrize("p", [50.0, 66.0])
def test_kept_fraction_per_class(data, p):
    probs, hist = data
    pred, _ = class_confidences(probs)
    thr = pl.thresholds_from_histogram(hist, p, cap=1.0)
    labels = np.asarray(pl.select(probs, thr))
    for c in range(C):
        n = (pred == c).sum()
        kept = (labels == c).sum()
        k = int(round(thr[c] * BINS))
        # Exactly the pixels in bins >= k are kept, so at least 1 - p/100 of the class and no
        # more than that plus the one bin the percentile falls in.
        assert kept == hist[c, k:].sum()
        assert kept / n >= 1 - p / 100
        assert kept / n - (1 - p / 100) <= hist[c, k] / n
        assert abs(kept / n - (1 - p / 100)) < 0.05


def test_cap_applies_when_percentile_is_above_it():
    rng = np.random.default_rng(2)
    probs = random_probs(rng, shape=(2, 16, 16), scale=1.0)
    # Class 0 predicted with confidence 0.93..0.99 on half the pixels: its 66th percentile > 0.9.
    conf0 = rng.uniform(0.93, 0.99, size=probs.shape[:3])
    rest = (1 - conf0)[..., None] / (C - 1) * np.ones(C - 1)
    confident = np.concatenate([conf0[..., None], rest], -1).astype(np.float32)
    half = np.arange(16) < 8
    probs[:, half] = confident[:, half]
    hist = np.asarray(pl.update(pl.empty_histogram(C, BINS), probs))
    uncapped = pl.thresholds_from_histogram(hist, 66.0, cap=1.0)
    capped = pl.thresholds_from_histogram(hist, 66.0, cap=0.9)
    assert uncapped[0] > 0.9
    assert capped[0] == np.float32(0.9)
    np.testing.assert_array_equal(capped[1:], np.minimum(uncapped[1:], np.float32(0.9)))
    labels = np.asarray(pl.select(probs, capped))
    # With the cap every class-0 pixel >= 0.9 is kept, far more than 34% of the class.
    pred, conf = class_confidences(probs)
    kept = (labels == 0).sum()
    assert kept == ((pred == 0) & (conf >= np.float32(0.9))).sum()
    assert kept / (pred == 0).sum() > 0.5


def test_class_never_predicted_gets_cap():
    probs = random_probs(np.random.default_rng(3), shape=(2, 16, 16))
    probs[..., 3] = 0.0  # class 3 can never win the argmax
    hist = pl.update(pl.empty_histogram(C, BINS), probs)
    assert np.asarray(hist)[3].sum() == 0
    for cap in (0.9, 0.75):
        thr = pl.thresholds_from_histogram(hist, 66.0, cap)
        assert thr[3] == np.float32(cap)


def test_median_rule_is_percentile_50(data):
    _, hist = data
    median = pl.make_rule("class_median", cap=0.8)
    assert median.needs_statistics
    expected = pl.thresholds_from_histogram(hist, 50.0, 0.8)
    np.testing.assert_array_equal(median.thresholds(hist), expected)
    np.testing.assert_array_equal(
        pl.make_rule("class_percentile", percentile=50, cap=0.8).thresholds(hist), expected)
    default = pl.make_rule("class_percentile")
    assert (default.percentile, default.cap) == (66.0, 0.9)
    assert pl.make_rule("class_median").cap == 0.9
    # Not vacuous: the 66th percentile rule gives different thresholds on this data.
    assert not np.array_equal(pl.thresholds_from_histogram(hist, 66.0, 0.8), expected)


def test_flat_rule_keeps_exactly_pixels_at_or_above_threshold(data):
    probs = np.array([[[0.5, 0.25, 0.25], [0.49, 0.5, 0.01]],
                      [[0.1, 0.2, 0.7], [0.4, 0.3, 0.3]]], np.float32)
    labels = np.asarray(pl.select_flat(probs, 0.5))
    np.testing.assert_array_equal(labels, [[0, 1], [2, 255]])

    probs, _ = data
    pred, conf = class_confidences(probs)
    rule = pl.make_rule("flat", threshold=0.7)
    assert not rule.needs_statistics
    expected = np.where(conf >= np.float32(0.7), pred, 255)
    np.testing.assert_array_equal(np.asarray(pl.select_flat(probs, 0.7)), expected)
    np.testing.assert_array_equal(np.asarray(pl.select(probs, rule.thresholds(num_classes=C))),
                                  expected)


def test_select_labels_are_argmax_or_ignore_uint8(data):
    probs, _ = data
    thr = np.array([0.3, 0.5, 0.6, 0.8], np.float32)
    labels = pl.select(probs, thr)
    assert labels.dtype == jnp.uint8 and labels.shape == probs.shape[:3]
    pred, conf = class_confidences(probs)
    np.testing.assert_array_equal(np.asarray(labels), np.where(conf >= thr[pred], pred, 255))
    assert 0 < (np.asarray(labels) == 255).sum() < labels.size
    # One image [H, W, C] works too.
    np.testing.assert_array_equal(np.asarray(pl.select(probs[0], thr)), np.asarray(labels)[0])


def test_update_and_select_under_jit(data):
    probs, hist = data
    mask = np.array([True] * 4 + [False] * 2)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(pl.update)(pl.empty_histogram(C, BINS), probs, mask)),
        reference_histogram(probs[:4]))
    thr = pl.thresholds_from_histogram(hist)
    np.testing.assert_array_equal(np.asarray(jax.jit(pl.select)(probs, thr)),
                                  np.asarray(pl.select(probs, thr)))
    np.testing.assert_array_equal(np.asarray(jax.jit(pl.select_flat)(probs, 0.6)),
                                  np.asarray(pl.select_flat(probs, 0.6)))


def test_bins_agree_with_threshold_comparison_at_edges():
    # Confidences exactly on (float32) bin edges must land in the bin whose lower edge they are,
    # or the kept-fraction guarantee breaks.
    edges = pl.bin_edges(BINS)
    conf = edges[40:90]
    other = (1 - conf) / 2
    probs = np.stack([conf, other, other], -1).astype(np.float32)[None, None]
    hist = np.asarray(pl.update(pl.empty_histogram(3, BINS), probs))
    np.testing.assert_array_equal(np.nonzero(hist[0])[0], np.arange(40, 90))


# Hand-made example: C = 4 (class 3 never occurs), one 2x4 image.
GT = np.array([[0, 0, 1, 1], [2, 255, 0, 1]], np.uint8)
PSEUDO = np.array([[0, 255, 1, 0], [255, 2, 0, 255]], np.uint8)
# Valid-gt pixels: (0,0) gt0 p0 | (0,1) gt0 - | (0,2) gt1 p1 | (0,3) gt1 p0 | (1,0) gt2 - |
# (1,2) gt0 p0 | (1,3) gt1 -.  (1,1) has gt 255, so its pseudo-label 2 counts nowhere.
CORRECT, SELECTED, GT_TOTAL, COVERED = [2, 1, 0, 0], [3, 1, 0, 0], [3, 3, 1, 0], [2, 2, 0, 0]


def test_precision_coverage_hand_example():
    counts = jax.jit(pl.precision_coverage, static_argnums=2)(PSEUDO, GT, 4)
    np.testing.assert_array_equal(counts.correct, CORRECT)
    np.testing.assert_array_equal(counts.selected, SELECTED)
    np.testing.assert_array_equal(counts.gt_total, GT_TOTAL)
    np.testing.assert_array_equal(counts.selected_with_gt, COVERED)
    precision, coverage = pl.precision_coverage_ratios(counts)
    np.testing.assert_allclose(precision, [2 / 3, 1.0, np.nan, np.nan])
    np.testing.assert_allclose(coverage, [2 / 3, 2 / 3, 0.0, np.nan])


def test_precision_coverage_accumulates_and_masks():
    pseudo = np.stack([PSEUDO[:1], PSEUDO[1:]])  # two 1x4 images
    gt = np.stack([GT[:1], GT[1:]])
    total = pl.add_counts(pl.precision_coverage(pseudo[:1], gt[:1], 4),
                          pl.precision_coverage(pseudo[1:], gt[1:], 4))
    expected = [CORRECT, SELECTED, GT_TOTAL, COVERED]
    for a, b in zip(total, expected):
        np.testing.assert_array_equal(a, b)
    garbage = np.zeros_like(pseudo)  # would add to class 0's counts if it were counted
    padded = pl.precision_coverage(np.concatenate([pseudo, garbage]), np.concatenate([gt, garbage]),
                                   4, mask=np.array([True, True, False, False]))
    for a, b in zip(padded, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind, params, words", [
    ("class_mediam", {}, ["class_mediam", "class_percentile", "class_median", "flat"]),
    ("class_percentile", {"percentile": 120}, ["percentile", "120"]),
    ("class_percentile", {"percentile": -1}, ["percentile", "-1"]),
    ("class_percentile", {"cap": 0}, ["cap", "0"]),
    ("class_median", {"cap": 1.5}, ["cap", "1.5"]),
    ("flat", {"threshold": 0.0}, ["threshold", "0.0"]),
    ("flat", {"threshold": 2}, ["threshold", "2"]),
    ("flat", {"cap": 0.9}, ["flat", "cap"]),
    ("class_median", {"percentile": 60}, ["class_median", "percentile"]),
])
def test_bad_rules_raise_naming_the_problem(kind, params, words):
    with pytest.raises(ValueError) as err:
        pl.make_rule(kind, **params)
    for word in words:
        assert word in str(err.value)


def test_bad_arguments_to_host_functions_raise(data):
    _, hist = data
    with pytest.raises(ValueError, match="percentile.*101"):
        pl.thresholds_from_histogram(hist, 101)
    with pytest.raises(ValueError, match="cap.*0"):
        pl.thresholds_from_histogram(hist, 66, cap=0)
    with pytest.raises(ValueError, match="threshold.*1.2"):
        pl.select_flat(np.full((2, 2, C), 0.25, np.float32), 1.2)
    with pytest.raises(ValueError, match="thresholds"):
        pl.select(np.full((2, 2, C), 0.25, np.float32), np.zeros(C + 1, np.float32))
    with pytest.raises(ValueError, match="classes"):
        pl.update(pl.empty_histogram(C + 1, BINS), np.full((1, 2, 2, C), 0.25, np.float32))
