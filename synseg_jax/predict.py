"""Predictions of a trained segmenter as full-resolution PNGs the official evaluator reads.

    python -m synseg_jax.predict --config=configs/source_only.py:gta5 --workdir=runs/gta5 \\
        --dataset=cityscapes --split=validation --out=preds/val [--colour_out=preds/val_colour]

For every example of the split: the image is resized to ``data.eval_size``, the `seg` role's
logits are upsampled bilinearly to the label's (original) size and argmaxed (the protocol of
`evaluate`), and the trainIds are written as Cityscapes labelIds to
``<out>/<name>_pred_labelIds.png``, where ``<name>`` is the example's stored name
(``<city>_<seq>_<frame>`` for Cityscapes). cityscapesscripts' evaluator matches such files to
``<city>_<seq>_<frame>_gtFine_labelIds.png``; it searches its results folder recursively and
stops on two candidates, so colourised PNGs go to a separate folder (``--colour_out``).

Runs in one process on one device: exporting is bound by PNG writing and needs no mesh.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from synseg_jax import evaluate, images, inputs, methods, paths
from synseg_jax.data import datasets, labels, pipeline

SUFFIX = "_pred_labelIds.png"
COLOUR_SUFFIX = "_color.png"


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """trainIds (0..18; 255 and anything else -> 0, "unlabeled") -> Cityscapes labelIds, uint8."""
    train_ids = np.asarray(train_ids)
    if train_ids.min(initial=0) < 0 or train_ids.max(initial=0) >= labels.TABLE_SIZE:
        raise ValueError(f"trainIds must lie in [0, {labels.TABLE_SIZE}), got "
                         f"[{train_ids.min()}, {train_ids.max()}]")
    return labels.TRAIN_TO_CITYSCAPES_LABEL[train_ids.astype(np.int64)]


def write_prediction(out_dir: str, name: str, train_ids: np.ndarray,
                     colour_dir: str | None = None) -> str:
    """Writes ``<out_dir>/<name>_pred_labelIds.png`` (and the colour PNG); returns its path."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"Invalid example name {name!r} for a file name")
    train_ids = np.asarray(train_ids)
    if train_ids.ndim != 2:
        raise ValueError(f"Expected one [H, W] prediction, got shape {train_ids.shape}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + SUFFIX)
    Image.fromarray(to_label_ids(train_ids)).save(path)
    if colour_dir:
        os.makedirs(colour_dir, exist_ok=True)
        Image.fromarray(labels.colorize(train_ids)).save(
            os.path.join(colour_dir, name + COLOUR_SUFFIX))
    return path


def make_predict_step(predict: Callable) -> Callable:
    """(seg_variables, batch) -> uint8 trainIds [B, H, W] at the label's size (jit it)."""

    def step(variables, batch):
        logits = predict(variables, batch[pipeline.IMAGE])
        logits = images.resize_bilinear(logits, batch[pipeline.LABEL].shape[1:3])
        return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

    return step


def file_safe(name: str) -> str:
    """``name`` with every character outside [A-Za-z0-9._-] replaced by "_" (minicity's ids
    hold slashes); Cityscapes' ``<city>_<seq>_<frame>`` ids are unchanged."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def example_names(dataset: str, split: str, *, data_dir: str | None = None,
                  minicity_options=None) -> list[str]:
    """The stored names of a split, file-safe, in the order `datasets.open_split` reads it.

    Real datasets store ``name``; minicity stores ``scene_id``. Images are not decoded.
    """
    builder = datasets.builder(dataset, split, data_dir=data_dir,
                               minicity_options=minicity_options)
    features = builder.info.features
    key = datasets.name_key(builder)
    if key is None:
        raise ValueError(f"{dataset}/{split} stores no example names")
    skip = {k: tfds.decode.SkipDecoding() for k, f in features.items()
            if isinstance(f, tfds.features.Image)}
    shard = tfds.even_splits(split, n=1, drop_remainder=False)[0]  # as open_split reads it
    ds = builder.as_dataset(split=shard, shuffle_files=False, decoders=skip)
    return [file_safe(e[key].decode())
            for e in ds.map(lambda e: {key: e[key]}).as_numpy_iterator()]


def export_batches(step: Callable, variables, batches: Iterable[dict], num_examples: int,
                   out_dir: str, colour_dir: str | None = None) -> list[str]:
    """Runs ``step`` on every batch and writes each real (unmasked) example under the name it
    carries in the batch; returns the paths. Every example must be written exactly once."""
    written = []
    for batch in batches:
        arrays = {k: v for k, v in batch.items() if k != pipeline.NAME}  # strings stay on host
        preds = np.asarray(step(variables, arrays))
        for name, keep, pred in zip(batch[pipeline.NAME], batch[pipeline.MASK], preds):
            if keep:
                written.append(write_prediction(out_dir, file_safe(name.decode()), pred,
                                                 colour_dir))
    counts = collections.Counter(written)
    repeated = sorted(os.path.basename(p) for p, n in counts.items() if n > 1)
    if len(written) != num_examples or repeated:
        raise RuntimeError(
            f"Wrote {len(counts)} distinct predictions for {num_examples} examples"
            + (f"; written more than once: {repeated[:5]}" if repeated else ""))
    return written


def export_split(config, predict: Callable, variables, dataset: str, split: str, out_dir: str,
                 colour_dir: str | None = None) -> list[str]:
    """Predicts every example of ``dataset/split`` with the config's data settings; writes PNGs."""
    if jax.process_count() != 1:
        raise NotImplementedError("predict runs in a single process")
    data = config.data
    opened = inputs.open_split(data, dataset, split, with_names=True)
    if opened.task != "segmentation":
        raise ValueError(f"{opened.description} is not a segmentation split")
    ds = pipeline.eval_stream(opened.dataset, batch_size=data.eval_batch_size,
                              table=opened.label_table, image_size=tuple(data.eval_size) or None,
                              normalization=data.normalization, name=opened.description)
    batches = pipeline.HostIterator(ds, name=opened.description)
    step = jax.jit(make_predict_step(predict))
    written = export_batches(step, variables, batches, opened.num_examples, out_dir, colour_dir)
    logging.info("Wrote %d predictions of %s to %s", len(written), opened.description, out_dir)
    return written


def run(config, workdir: str, dataset: str, split: str, out_dir: str, *, step: int | None = None,
        colour_dir: str | None = None) -> list[str]:
    """Restores the `seg` role of ``workdir``'s checkpoint (latest or ``step``) and exports."""
    params, collections = evaluate.restore_seg(config, workdir, step)
    method = methods.build(config)
    return export_split(config, method.predict, {"params": params, **collections}, dataset,
                        split, out_dir, colour_dir)


def main(argv):
    from absl import flags  # noqa: PLC0415

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    config = FLAGS.config
    paths.resolve_config_paths(config)
    dataset = FLAGS.dataset or config.data.eval_dataset
    split = FLAGS.split or config.data.eval_split
    out = paths.absolute(FLAGS.out)
    written = run(config, paths.absolute(FLAGS.workdir), dataset, split, out, step=FLAGS.step,
                  colour_dir=paths.absolute(FLAGS.colour_out))
    print(f"Wrote {len(written)} labelId PNGs to {out}")


def _define_flags():
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/source_only.py:gta5",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
    flags.DEFINE_string("dataset", None, "Dataset to predict (default: config.data.eval_dataset).")
    flags.DEFINE_string("split", None, "Split to predict (default: config.data.eval_split).")
    flags.DEFINE_string("out", None, "Folder for <name>_pred_labelIds.png.")
    flags.DEFINE_string("colour_out", None, "Optional folder for colourised <name>_color.png.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.mark_flags_as_required(["config", "workdir", "out"])


if __name__ == "__main__":
    import sys

    from absl import app

    _define_flags()
    paths.prepare_config_flag(sys.argv)  # config files import `configs.*`
    app.run(main)
