"""Segmentation scores: a confusion matrix computed on device, IoU tables computed on the host.

The evaluation protocol (docs/reference.md) is one confusion matrix over the whole split, then
IoU = TP / (TP + FP + FN) per class and mIoU = the nan-mean over a class subset. Per-image mIoUs are
never averaged: that would weight small images and rare classes differently from the papers.

Device side: ``confusion_matrix`` is jittable, counts in int32 and never builds one-hot volumes.
Host side: ``accumulate_confusion`` sums batches into int64, because a full Cityscapes val split at
2048x1024 holds ~1e9 pixels, near the int32 limit, and a longer split would overflow it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synseg_jax.data.labels import CLASS_NAMES, CLASS_SUBSETS

__all__ = [
    "confusion_matrix",
    "accumulate_confusion",
    "iou_from_confusion",
    "mean_iou",
    "pixel_accuracy",
    "SegmentationScores",
    "scores_from_confusion",
    "markdown_table",
]


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> jax.Array:
    """Counts (ground truth, prediction) pairs; returns int32 [C, C], rows = ground truth.

    Args:
      pred: integer class predictions [B, ...] (e.g. the argmax of the logits).
      label: integer ground truth, same shape as ``pred``. ``IGNORE_LABEL`` (255), any value
        >= ``num_classes`` and any negative value are not counted.
      num_classes: C.
      mask: optional bool [B]; examples where it is False are not counted (padding examples that
        fill the last global batch of a split).

    A prediction outside [0, C) on a counted pixel is dropped too. Argmax outputs never are; the
    alternative, a C+1-th "other" column, would change the shape every caller expects.

    Works on batch-sharded inputs under ``jax.jit``, both on meshes with Auto axes and on meshes
    with Explicit axes (``jax.make_mesh``'s default): a single ``bincount`` over all pixels of a
    batch-sharded array raises ``ShardingTypeError`` with Explicit axes, because the scatter's
    output sharding is ambiguous. Counting per example (a vmapped bincount, [B, C*C+1] int32, a few
    KB) and then summing over the batch axis is an ordinary sharded reduction in both modes.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred {pred.shape} and label {label.shape} must have the same shape")
    if pred.ndim < 1:
        raise ValueError("pred and label need a leading batch axis")
    c = int(num_classes)
    batch = pred.shape[0]
    # int32 before any arithmetic: uint8 labels would wrap in label * C.
    gt = label.astype(jnp.int32)
    pr = pred.astype(jnp.int32)
    valid = (gt >= 0) & (gt < c) & (pr >= 0) & (pr < c)
    if mask is not None:
        mask = jnp.asarray(mask, dtype=bool)
        if mask.shape != (batch,):
            raise ValueError(f"mask must have shape ({batch},), got {mask.shape}")
        valid &= mask.reshape((batch,) + (1,) * (pred.ndim - 1))
    # Everything not counted lands in bin C*C, which is sliced away.
    flat = jnp.where(valid, gt * c + pr, c * c).reshape(batch, -1)
    per_example = jax.vmap(lambda idx: jnp.bincount(idx, length=c * c + 1))(flat)
    counts = per_example.astype(jnp.int32).sum(axis=0, dtype=jnp.int32)
    return counts[: c * c].reshape(c, c)


def accumulate_confusion(total: np.ndarray | None, batch_cm) -> np.ndarray:
    """Returns ``total + batch_cm`` as a new host int64 array (``total=None`` starts a sum).

    Call it once per batch with the device int32 matrix; the int64 total cannot overflow on any
    realistic split.
    """
    batch_cm = np.asarray(jax.device_get(batch_cm)).astype(np.int64)
    if total is None:
        return batch_cm
    if total.shape != batch_cm.shape:
        raise ValueError(f"shape mismatch: total {total.shape}, batch {batch_cm.shape}")
    return np.asarray(total, dtype=np.int64) + batch_cm


def _as_square(cm) -> np.ndarray:
    cm = np.asarray(jax.device_get(cm))
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got {cm.shape}")
    return cm.astype(np.int64)


def iou_from_confusion(cm) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN) as float64 [C]; nan for a class that never occurs.

    "Never occurs" means TP + FP + FN = 0: absent from both the ground truth and the predictions.
    A class that is predicted but never in the ground truth scores 0, not nan: the false
    positives are real errors.
    """
    cm = _as_square(cm)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = tp + fp + fn
    iou = np.full(cm.shape[0], np.nan)
    present = denom > 0
    iou[present] = tp[present] / denom[present]
    return iou


def mean_iou(iou: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """nan-mean of ``iou`` over ``classes`` (all by default); nan when none of them occurs."""
    iou = np.asarray(iou, dtype=np.float64)
    picked = iou if classes is None else iou[np.asarray(classes, dtype=np.int64)]
    present = picked[~np.isnan(picked)]
    # np.nanmean warns on an all-nan slice; an empty split is a legitimate (if useless) input.
    return float(present.mean()) if present.size else math.nan


def pixel_accuracy(cm) -> float:
    """Correct pixels / counted pixels; nan when nothing was counted."""
    cm = _as_square(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


@dataclasses.dataclass(frozen=True)
class SegmentationScores:
    """Scores of one split. IoUs are fractions in [0, 1]; nan marks a class that never occurs."""

    per_class_iou: tuple[float, ...]
    miou_19: float
    miou_16: float
    miou_13: float
    pixel_acc: float
    num_pixels: int
    class_names: tuple[str, ...] = CLASS_NAMES

    def to_dict(self) -> dict:
        """Plain-Python dict; nan becomes None so that the result is valid JSON."""
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "miou_19": clean(self.miou_19),
            "miou_16": clean(self.miou_16),
            "miou_13": clean(self.miou_13),
            "pixel_acc": clean(self.pixel_acc),
            "num_pixels": int(self.num_pixels),
            "per_class_iou": {name: clean(v)
                              for name, v in zip(self.class_names, self.per_class_iou)},
        }

    def to_json(self, indent: int | None = 2) -> str:
        # allow_nan=False: a stray nan must fail here, not in a strict JSON reader later.
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def scores_from_confusion(cm, class_names: Sequence[str] = CLASS_NAMES) -> SegmentationScores:
    """All scores of a [C, C] confusion matrix (usually the int64 total of a split).

    The 16- and 13-class mIoUs use ``CLASS_SUBSETS`` (the SYNTHIA protocols) and are nan unless
    C is 19. ``miou_19`` averages over all C classes.
    """
    cm = _as_square(cm)
    num_classes = cm.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class matrix")
    iou = iou_from_confusion(cm)

    def subset_miou(key: str) -> float:
        classes = CLASS_SUBSETS[key]
        return mean_iou(iou, classes) if num_classes == len(CLASS_NAMES) else math.nan

    return SegmentationScores(
        per_class_iou=tuple(float(v) for v in iou),
        miou_19=mean_iou(iou),
        miou_16=subset_miou("16"),
        miou_13=subset_miou("13"),
        pixel_acc=pixel_accuracy(cm),
        num_pixels=int(cm.sum()),
        class_names=tuple(class_names),
    )


def _percent(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100.0 * x:.2f}"


def markdown_table(scores: SegmentationScores | Mapping[str, SegmentationScores]) -> str:
    """Per-class IoU (%) table, then mIoU-19/16/13 and pixel accuracy rows.

    Pass one ``SegmentationScores`` for a "class | IoU (%)" table, or a mapping
    {column title: scores} (e.g. {"last": ..., "best": ...}) for one column per entry. Columns are
    padded so the raw text reads as a table in a terminal and renders as one in a .md file.
    """
    columns = {"IoU (%)": scores} if isinstance(scores, SegmentationScores) else dict(scores)
    if not columns:
        raise ValueError("nothing to tabulate")
    all_scores = list(columns.values())
    names = all_scores[0].class_names
    if any(s.class_names != names for s in all_scores):
        raise ValueError("all columns must score the same classes")

    rows = [[name] + [_percent(s.per_class_iou[i]) for s in all_scores]
            for i, name in enumerate(names)]
    num = len(names)
    summary = [[f"**mIoU-{num}**"] + [_percent(s.miou_19) for s in all_scores]]
    for key, attr in (("16", "miou_16"), ("13", "miou_13")):
        # The SYNTHIA subsets only mean something in the 19-class taxonomy.
        if num == len(CLASS_NAMES):
            summary.append([f"**mIoU-{key}**"] + [_percent(getattr(s, attr)) for s in all_scores])
    summary.append(["pixel accuracy"] + [_percent(s.pixel_acc) for s in all_scores])
    header = ["class"] + list(columns)
    body = rows + summary
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)]
                          + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in body]) + "\n"
