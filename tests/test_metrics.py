"""Confusion matrix and IoU tables against a plain numpy reference."""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax import metrics
from synseg_jax.data.labels import CLASS_NAMES, CLASS_SUBSETS, IGNORE_LABEL

C = 19


def reference_confusion(pred, label, num_classes, mask=None):
    """The obvious double loop over pixels, in numpy."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for b in range(pred.shape[0]):
        if mask is not None and not mask[b]:
            continue
        for g, p in zip(label[b].ravel(), pred[b].ravel()):
            if 0 <= g < num_classes:
                cm[g, p] += 1
    return cm


def reference_iou(cm):
    out = []
    for k in range(cm.shape[0]):
        tp = cm[k, k]
        fp = cm[:, k].sum() - tp
        fn = cm[k, :].sum() - tp
        out.append(np.nan if tp + fp + fn == 0 else tp / (tp + fp + fn))
    return np.array(out)


def random_batch(rng, shape=(4, 12, 10), absent=(9, 14, 16), ignore_frac=0.2):
    """Random predictions/labels where classes in ``absent`` never occur in either."""
    present = np.array([k for k in range(C) if k not in absent])
    pred = rng.choice(present, size=shape)
    label = rng.choice(present, size=shape)
    # Make the prediction right half the time so IoUs are not all tiny.
    label = np.where(rng.random(shape) < 0.5, pred, label)
    label = np.where(rng.random(shape) < ignore_frac, IGNORE_LABEL, label)
    return pred.astype(np.int32), label.astype(np.uint8)


def test_confusion_matches_reference_with_ignore_mask_and_absent_classes():
    rng = np.random.default_rng(0)
    pred, label = random_batch(rng)
    label[0, 0, :3] = [19, 200, 254]  # out-of-range labels other than 255 are ignored too
    mask = np.array([True, False, True, True])
    fn = jax.jit(metrics.confusion_matrix, static_argnums=2)
    cm = fn(jnp.asarray(pred), jnp.asarray(label), C, jnp.asarray(mask))
    assert cm.dtype == jnp.int32 and cm.shape == (C, C)
    np.testing.assert_array_equal(np.asarray(cm), reference_confusion(pred, label, C, mask))
    # Without a mask every example counts.
    cm_all = fn(jnp.asarray(pred), jnp.asarray(label), C)
    np.testing.assert_array_equal(np.asarray(cm_all), reference_confusion(pred, label, C))

    iou = metrics.iou_from_confusion(cm)
    ref = reference_iou(reference_confusion(pred, label, C, mask))
    np.testing.assert_allclose(iou, ref, equal_nan=True)
    assert np.isnan(iou[[9, 14, 16]]).all() and not np.isnan(np.delete(iou, [9, 14, 16])).any()


def test_uint8_labels_do_not_wrap():
    # label * C for class 18 is 342: computing it in uint8 would land in the wrong bin.
    label = np.full((1, 2, 2), 18, np.uint8)
    pred = np.full((1, 2, 2), 17, np.int32)
    cm = np.asarray(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), C))
    assert cm[18, 17] == 4 and cm.sum() == 4


def test_fully_masked_or_ignored_batch_counts_nothing():
    pred = jnp.zeros((2, 4, 4), jnp.int32)
    label = jnp.zeros((2, 4, 4), jnp.int32)
    assert metrics.confusion_matrix(pred, label, C, jnp.array([False, False])).sum() == 0
    assert metrics.confusion_matrix(pred, jnp.full_like(label, 255), C).sum() == 0
    scores = metrics.scores_from_confusion(np.zeros((C, C), np.int64))
    assert math.isnan(scores.miou_19) and math.isnan(scores.pixel_acc)


def test_predicted_but_never_in_ground_truth_scores_zero_not_nan():
    cm = np.zeros((C, C), np.int64)
    cm[0, 0] = 10
    cm[0, 5] = 3  # class 5 predicted on road pixels; no pixel of class 5 exists
    iou = metrics.iou_from_confusion(cm)
    assert iou[5] == 0.0
    assert iou[0] == pytest.approx(10 / 13)
    assert np.isnan(np.delete(iou, [0, 5])).all()
    assert metrics.mean_iou(iou) == pytest.approx((10 / 13 + 0) / 2)


def test_subsets_pick_the_synthia_classes():
    # Give every class a distinct IoU so that the mean identifies the subset.
    iou = np.linspace(0.05, 0.95, C)
    cm = np.zeros((C, C), np.int64)
    for k, v in enumerate(iou):
        tp = int(round(v * 1000))
        cm[k, k] = tp
        cm[k, (k + 1) % C] += 1000 - tp  # errors, so that the IoUs differ from class to class
    ref = reference_iou(cm)
    scores = metrics.scores_from_confusion(cm)
    assert scores.miou_19 == pytest.approx(ref.mean())
    assert scores.miou_16 == pytest.approx(ref[list(CLASS_SUBSETS["16"])].mean())
    assert scores.miou_13 == pytest.approx(ref[list(CLASS_SUBSETS["13"])].mean())
    # The subsets drop exactly terrain, truck, train (16) and also wall, fence, pole (13).
    dropped16 = {CLASS_NAMES[k] for k in range(C) if k not in CLASS_SUBSETS["16"]}
    dropped13 = {CLASS_NAMES[k] for k in range(C) if k not in CLASS_SUBSETS["13"]}
    assert dropped16 == {"terrain", "truck", "train"}
    assert dropped13 == dropped16 | {"wall", "fence", "pole"}
    assert scores.pixel_acc == pytest.approx(np.trace(cm) / cm.sum())


def test_host_accumulation_is_int64_and_does_not_overflow():
    big = np.zeros((C, C), np.int32)
    big[0, 0] = 2_000_000_000  # near int32 max; a second batch would wrap in int32
    total = metrics.accumulate_confusion(None, big)
    total = metrics.accumulate_confusion(total, jnp.asarray(big))
    assert total.dtype == np.int64 and total[0, 0] == 4_000_000_000
    assert metrics.pixel_accuracy(total) == 1.0


def test_scores_json_and_markdown_table():
    rng = np.random.default_rng(1)
    pred, label = random_batch(rng)
    cm = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), C)
    scores = metrics.scores_from_confusion(metrics.accumulate_confusion(None, cm))
    data = json.loads(scores.to_json())
    assert data["per_class_iou"]["terrain"] is None  # nan -> null, valid JSON
    assert data["miou_19"] == pytest.approx(scores.miou_19)
    assert set(data["per_class_iou"]) == set(CLASS_NAMES)

    table = metrics.markdown_table(scores)
    lines = table.strip().split("\n")
    assert len({len(line) for line in lines}) == 1, "columns are not aligned"
    assert len(lines) == 2 + C + 4  # header, rule, classes, mIoU 19/16/13, pixel accuracy
    assert lines[1].startswith("|---") and lines[1].endswith(":|")
    road = next(line for line in lines if line.startswith("| road "))
    assert f"{100 * scores.per_class_iou[0]:.2f}" in road
    assert "n/a" in next(line for line in lines if line.startswith("| terrain "))
    assert f"{100 * scores.miou_16:.2f}" in next(l for l in lines if "mIoU-16" in l)

    both = metrics.markdown_table({"last": scores, "best (val)": scores}).strip().split("\n")
    assert "best (val)" in both[0] and len({len(line) for line in both}) == 1


def test_non_19_class_matrix_has_no_synthia_subsets():
    cm = np.eye(3, dtype=np.int64) * 5
    scores = metrics.scores_from_confusion(cm, class_names=("a", "b", "c"))
    assert scores.miou_19 == 1.0 and math.isnan(scores.miou_16) and math.isnan(scores.miou_13)
    table = metrics.markdown_table(scores)
    assert "mIoU-3" in table and "mIoU-16" not in table


_SHARDED_SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from synseg_jax.metrics import confusion_matrix
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 19, (16, 24, 20)).astype(np.int32)
    label = rng.integers(0, 24, (16, 24, 20)).astype(np.uint8)
    label[label >= 19] = 255
    mask = rng.random(16) < 0.7
    expected = np.asarray(confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 19,
                                           jnp.asarray(mask)))
    fn = jax.jit(confusion_matrix, static_argnums=2)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        shard = NamedSharding(mesh, P("data"))
        args = [jax.device_put(x, shard) for x in (pred, label)]
        m = jax.device_put(mask, shard)
        for under_mesh in (False, True):
            if under_mesh:
                with jax.set_mesh(mesh):
                    cm = fn(args[0], args[1], 19, m)
            else:
                cm = fn(args[0], args[1], 19, m)
            np.testing.assert_array_equal(np.asarray(cm), expected)
    print("OK", int(expected.sum()))
""")


def test_confusion_on_batch_sharded_inputs_over_8_fake_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")
