"""Sweep stages: run trained networks over a split and write what they make as a dataset.

Two kinds: pseudo-labels of a target split (below), and translations of a source split by an
image translator (`translate_split`), kept with the source's labels.

The first kind is pseudo-labelling for self-training: the softmax of one model (or the mean of
several, an ensemble) on every image of the target split, turned into labels by a
`pseudo_labels` rule, written with the original images as a derived TFDS dataset that a later
stage reads like any other (same joint crop and flip of image and label).

Two passes over the split, so memory does not grow with it: pass 1 gathers the per-class
confidence histogram (only rules that need split statistics), pass 2 labels each image and
streams it into the dataset writer.

Each image is predicted at ``data.target_resize`` (the size training sees; bilinear, no
antialiasing), and the averaged softmax is upsampled back to the image's own size, where the
labels are made and stored.

With several processes, each sweeps its own share of the split and writes one file per example
(`<folder>/labels/` or `<folder>/images/`, on a filesystem every process sees); the split-wide
numbers (the confidence histogram, the report's counts) are summed over the processes, and
process 0 alone builds the dataset from the files once every process is done, so every example
is written exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from PIL import Image

from synseg_jax import evaluate, images, inputs, pseudo_labels
from synseg_jax.data import datasets, labels, pipeline
from synseg_jax.data.builders import derived

Model = tuple[Callable, dict]  # (predict, variables)


def make_probabilities(models: Sequence[Model], input_size: tuple[int, int] | None,
                       normalization: str, align_corners: bool = False) -> Callable:
    """(uint8 image [H, W, 3]) -> mean softmax over `models`, float32 [H, W, C] (jitted)."""

    @jax.jit
    def probabilities(image):
        x = image[None].astype(jnp.float32)
        out_hw = x.shape[1:3]
        if input_size:
            x = images.resize_bilinear(x, input_size)
        x = images.normalize(x, normalization)
        return evaluate.mean_softmax([p for p, _ in models], [v for _, v in models], x,
                                     out_hw, align_corners)[0]

    return probabilities


def _sum_over_processes(x) -> np.ndarray:
    """`x` summed over every process (each passes its own; all get the total)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def _wait_for_every_process(what: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(what)


def _examples(data, dataset: str, split: str, whole_split: bool = False) -> Iterator[dict]:
    """This process's share of the split's examples (`whole_split`: every example)."""
    opened = inputs.open_split(data, dataset, split, with_names=True, whole_split=whole_split)
    if opened.task != "segmentation":
        raise ValueError(f"{opened.description} is not a segmentation split")
    for example in opened.dataset.as_numpy_iterator():
        gt = None
        if "label" in example:
            gt = labels.map_to_train_ids(example["label"], opened.label_table)[0]
        yield {"image": example["image"], "name": example["name"].decode(), "gt": gt}


def pseudo_label(config, models: Sequence[Model], dataset: str, split: str, folder: str,
                 rule: pseudo_labels.Rule, num_bins: int = pseudo_labels.DEFAULT_NUM_BINS
                 ) -> dict:
    """Writes the derived dataset of `dataset/split` pseudo-labelled by `models` to `folder`;
    returns (and writes to ``<folder>/report.json``) the thresholds and, where the split has
    labels, per-class precision and coverage of the pseudo-labels (a report only: nothing
    downstream reads those labels)."""
    report_path = os.path.join(folder, "report.json")
    if os.path.isdir(os.path.join(folder, derived.Derived.name)):
        if os.path.exists(report_path):  # finished before a kill: keep it, sweep nothing again
            logging.info("Pseudo-labels already written to %s; reusing them", folder)
            with open(report_path) as f:
                return json.load(f)
        raise FileExistsError(f"{folder} already holds a pseudo-labelled dataset without its "
                              "report (an interrupted sweep?); it is not overwritten: remove "
                              f"{os.path.join(folder, derived.Derived.name)} to sweep again")
    data = config.data
    num_classes = config.model.num_classes
    probabilities = make_probabilities(models, tuple(data.target_resize) or None,
                                       data.normalization, config.model.align_corners)
    histogram = None
    if rule.needs_statistics:
        histogram = pseudo_labels.empty_histogram(num_classes, num_bins)
        for example in _examples(data, dataset, split):
            histogram = pseudo_labels.update(histogram, probabilities(example["image"]))
        histogram = _sum_over_processes(histogram)
    thresholds = rule.thresholds(histogram, num_classes)

    # This process's share: one pseudo-label PNG per example, and the report's counts.
    label_dir = os.path.join(folder, PSEUDO_LABELS)
    os.makedirs(label_dir, exist_ok=True)
    counts = pseudo_labels.PseudoLabelCounts(*(np.zeros(num_classes, np.int64),) * 4)
    written = labelled_examples = 0
    for example in _examples(data, dataset, split):
        pseudo = np.asarray(pseudo_labels.select(probabilities(example["image"]), thresholds),
                            np.uint8)
        if example["gt"] is not None:
            if not labelled_examples:
                logging.warning(
                    "%s/%s has labels of its own: they are read only for the precision and "
                    "coverage report; the pseudo-labels go to a new dataset in %s, and %s/%s is "
                    "not changed", dataset, split, folder, dataset, split)
            labelled_examples += 1
            counts = pseudo_labels.add_counts(counts, jax.device_get(
                pseudo_labels.precision_coverage(pseudo, example["gt"], num_classes)))
        _write_png_atomically(os.path.join(label_dir, _file_name(example["name"])), pseudo)
        written += 1
    written, labelled_examples = (int(n) for n in _sum_over_processes([written,
                                                                       labelled_examples]))
    counts = pseudo_labels.PseudoLabelCounts(*(_sum_over_processes(c) for c in counts))
    _wait_for_every_process(f"pseudo-labels written to {label_dir}")

    report = {"dataset": dataset, "split": split, "examples": written, "rule": rule.kind,
              "percentile": rule.percentile, "cap": rule.cap, "threshold": rule.threshold,
              "thresholds": [float(t) for t in thresholds]}
    if labelled_examples:
        precision, coverage = pseudo_labels.precision_coverage_ratios(counts)
        report["per_class"] = {
            name: {"precision": _finite(p), "coverage": _finite(c)}
            for name, p, c in zip(labels.CLASS_NAMES, precision, coverage)}
        selected = int(np.sum(counts.selected))
        report["precision"] = _finite(np.sum(counts.correct) / max(selected, 1))
        report["coverage"] = _finite(np.sum(counts.selected_with_gt)
                                     / max(int(np.sum(counts.gt_total)), 1))

    def labelled():  # every example, with the label file its process wrote
        for example in _examples(data, dataset, split, whole_split=True):
            with Image.open(os.path.join(label_dir, _file_name(example["name"]))) as img:
                pseudo = np.asarray(img)
            yield example["name"], {"image": example["image"], "label": pseudo[..., None],
                                    "name": example["name"]}

    if jax.process_index() == 0:
        derived.Derived(data_dir=folder, examples=labelled).download_and_prepare()
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    _wait_for_every_process(f"pseudo-labelled dataset built in {folder}")
    logging.info("Pseudo-labelled %d images of %s/%s into %s", written, dataset, split, folder)
    return report


TRANSLATED_IMAGES = "images"  # <folder>/images/<name>.png: one file per translated example
PSEUDO_LABELS = "labels"  # <folder>/labels/<name>.png: one pseudo-label map per example


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".png"


def _write_png_atomically(path: str, rgb: np.ndarray) -> None:
    """A file that exists is whole: written beside it, then renamed over it."""
    tmp = path + ".tmp"
    Image.fromarray(rgb).save(tmp, format="PNG")
    os.replace(tmp, path)


def translate_split(config, translate: Callable, dataset: str, split: str, folder: str,
                    size: tuple[int, int] | None, batch_size: int = 1) -> dict:
    """Writes `dataset/split` translated by `translate` (model-input images [B, H, W, 3] ->
    uint8 RGB [B, H, W, 3], jitted) with the split's own labels as a derived dataset in
    `folder`; returns (and writes to ``<folder>/report.json``) what was written. Images of
    one size go through `translate` up to `batch_size` at a time.

    Each image is resized (bilinear, antialiased when shrinking, as training reads it) to `size`
    (None: its own size) and its trainId label (nearest) with it. Resumable: every translation
    is first written whole to ``<folder>/images/<name>.png``, and a rerun after a kill
    translates only the images missing there; the dataset is built from those files and is
    readable only once ``report.json`` exists.
    """
    report_path = os.path.join(folder, "report.json")
    if os.path.exists(report_path):
        logging.info("Translations already written to %s; reusing them", folder)
        with open(report_path) as f:
            return json.load(f)
    image_dir = os.path.join(folder, TRANSLATED_IMAGES)
    os.makedirs(image_dir, exist_ok=True)
    data = config.data
    import tensorflow as tf  # noqa: PLC0415  (decoding and resizing as the training pipeline)

    def resized(example):
        image, label = tf.convert_to_tensor(example["image"]), example["gt"]
        if label is None:
            raise ValueError(f"{dataset}/{split} has no labels: a translated source split keeps "
                             "its labels for the segmentation stage, so it must have them")
        label = tf.convert_to_tensor(label)
        if size:
            image, label = pipeline.resize(image, label, size)
        return image, label.numpy()

    translated = reused = 0
    pending: list[tuple[str, np.ndarray]] = []  # (path, model-input image) of one batch

    def flush():
        nonlocal translated
        if pending:
            out = np.asarray(translate(np.stack([x for _, x in pending])))
            for (path, _), rgb in zip(pending, out):
                _write_png_atomically(path, rgb)
            translated += len(pending)
            pending.clear()

    for example in _examples(data, dataset, split):
        path = os.path.join(image_dir, _file_name(example["name"]))
        if os.path.exists(path):
            reused += 1
            continue
        image, _ = resized(example)
        x = pipeline.normalize(image, data.normalization).numpy()
        if pending and (x.shape != pending[0][1].shape or len(pending) == batch_size):
            flush()
        pending.append((path, x))
    flush()
    logging.info("Translated %d images of %s/%s (%d kept from an earlier run)", translated,
                 dataset, split, reused)
    translated, reused = (int(n) for n in _sum_over_processes([translated, reused]))
    _wait_for_every_process(f"translations written to {image_dir}")

    def written():  # every example, from the file its process wrote
        for example in _examples(data, dataset, split, whole_split=True):
            _, label = resized(example)
            with Image.open(os.path.join(image_dir, _file_name(example["name"]))) as img:
                rgb = np.asarray(img.convert("RGB"))
            if rgb.shape[:2] != label.shape:
                raise ValueError(f"Translated image of {example['name']} is "
                                 f"{rgb.shape[0]}x{rgb.shape[1]}, its label "
                                 f"{label.shape[0]}x{label.shape[1]}")
            yield example["name"], {"image": rgb, "label": label[..., None],
                                    "name": example["name"]}

    report = {"dataset": dataset, "split": split, "size": list(size) if size else None,
              "examples": translated + reused, "translated_now": translated,
              "kept_from_earlier_run": reused}
    if jax.process_index() == 0:
        if os.path.isdir(os.path.join(folder, derived.Derived.name)):
            # Built but killed before the report: TFDS renames a finished dataset into place,
            # so whatever is there is either whole or TFDS's own temporary folder, which it
            # replaces.
            logging.info("Reusing the translated dataset already built in %s", folder)
        derived.Derived(data_dir=folder, examples=written).download_and_prepare()
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    _wait_for_every_process(f"translated dataset built in {folder}")
    return report


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def dataset_name(folder: str) -> str:
    """The `data.*` dataset name under which a later stage reads the sweep's output."""
    return datasets.derived_name(folder)


SPLIT = derived.SPLIT
