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

A folder of your own images instead of a dataset split (any sizes, any PIL-readable format;
other files are skipped and named):

    python -m synseg_jax.predict --config=configs/source_only.py:gta5 --workdir=runs/gta5 \\
        --images=photos/ --out=preds/photos

writes ``<name>_pred_labelIds.png`` and ``<name>_overlay.png`` (the photo under the colourised
prediction) per image, ``<name>`` being its path inside the folder with "/" as "_".

Runs in one process on one device: exporting is bound by PNG writing and needs no mesh.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from synseg_jax import evaluate, images, inputs, methods, paths, recipe
from synseg_jax.data import datasets, labels, pipeline

SUFFIX = "_pred_labelIds.png"
COLOUR_SUFFIX = "_color.png"
OVERLAY_SUFFIX = "_overlay.png"
OVERLAY_ALPHA = 0.55  # weight of the prediction's colours over the photo


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
        Image.fromarray(images.colorize(train_ids)).save(
            os.path.join(colour_dir, name + COLOUR_SUFFIX))
    return path


def make_predict_step(scores: Callable) -> Callable:
    """(variables, batch) -> uint8 trainIds [B, H, W] at the label's size (jit it); `scores`:
    evaluate.label_scores' (variables, images, size) -> class scores, of a segmenter or of an
    ensemble."""

    def step(variables, batch):
        out = scores(variables, batch[pipeline.IMAGE], batch[pipeline.LABEL].shape[1:3])
        return jnp.argmax(out, axis=-1).astype(jnp.uint8)

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


def export_split(config, scores: Callable, variables, dataset: str, split: str, out_dir: str,
                 colour_dir: str | None = None) -> list[str]:
    """Predicts every example of ``dataset/split`` with the config's data settings; writes PNGs.
    `scores`: see `make_predict_step`."""
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
    step = jax.jit(make_predict_step(scores))
    written = export_batches(step, variables, batches, opened.num_examples, out_dir, colour_dir)
    logging.info("Wrote %d predictions of %s to %s", len(written), opened.description, out_dir)
    return written


def image_files(folder: str) -> tuple[list[str], list[str]]:
    """(image files, other files) under ``folder``, recursively, sorted. An image is a file PIL
    can identify; anything else (text, broken files) goes to the second list."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images: no folder {folder}")
    found, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                with Image.open(path) as img:
                    img.verify()
                found.append(path)
            except (OSError, SyntaxError, ValueError):
                skipped.append(path)
    return found, skipped


def overlay(rgb: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """The photo under its colourised prediction (ignored pixels stay the photo)."""
    colour = images.colorize(train_ids).astype(np.float32)
    mixed = (1 - OVERLAY_ALPHA) * rgb.astype(np.float32) + OVERLAY_ALPHA * colour
    keep = (train_ids >= labels.NUM_CLASSES)[..., None]
    return np.where(keep, rgb, np.rint(mixed)).astype(np.uint8)


def export_folder(config, scores: Callable, variables, folder: str, out_dir: str,
                  colour_dir: str | None = None) -> list[str]:
    """Predicts every image under ``folder`` at ``data.eval_size`` (or its own size when that is
    empty), takes the class scores at the image's size as `evaluate` does (`scores`: see
    `make_predict_step`), and writes labelIds and overlay PNGs; returns the labelIds paths.
    Non-image files are skipped and logged by name."""
    import tensorflow as tf  # noqa: PLC0415  (predict's data path is TF's, as in evaluation)

    files, skipped = image_files(folder)
    for path in skipped:
        logging.warning("--images: skipped %s (not an image PIL can read)", path)
    if not files:
        raise FileNotFoundError(f"--images: no image files in {folder}"
                                + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    data = config.data
    eval_size = tuple(data.eval_size) or None

    def step(variables, image, out_hw):
        return jnp.argmax(scores(variables, image, out_hw), axis=-1).astype(jnp.uint8)

    step = jax.jit(step, static_argnums=2)  # compiled once per distinct image size

    written = []
    for path in files:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
        image = tf.convert_to_tensor(rgb)
        if eval_size is not None:
            image = pipeline.resize_image(image, eval_size)
        image = pipeline.normalize(image, data.normalization).numpy()[None]
        pred = np.asarray(step(variables, image, rgb.shape[:2]))[0]
        name = file_safe(os.path.splitext(os.path.relpath(path, folder))[0])
        written.append(write_prediction(out_dir, name, pred))
        target = colour_dir or out_dir
        os.makedirs(target, exist_ok=True)
        Image.fromarray(overlay(rgb, pred)).save(os.path.join(target, name + OVERLAY_SUFFIX))
    logging.info("Wrote %d predictions of %s to %s (%d files skipped)", len(written), folder,
                 out_dir, len(skipped))
    return written


def run(config, workdir: str, dataset: str | None, split: str | None, out_dir: str, *,
        step: int | None = None, colour_dir: str | None = None, images_dir: str | None = None,
        stage: str | None = None) -> list[str]:
    """Restores the `seg` role of ``workdir``'s checkpoint (latest or ``step``), or for a recipe
    the segmenter of ``stage`` (default: its last train stage; an ensemble stage predicts with
    its members' mean softmax), and exports a dataset split (default: the config's eval split),
    or the images under ``images_dir`` when given."""
    if config.stages:
        config, scores, variables = recipe.stage_predictor(config, workdir, stage, step)
    elif stage:
        raise recipe.StageError(f"--stage={stage!r}: the config has no stages (a single run)")
    else:
        params, collections = evaluate.restore_seg(config, workdir, step)
        scores = evaluate.label_scores(methods.build(config).predict, config.model.align_corners)
        variables = {"params": params, **collections}
    if images_dir:
        return export_folder(config, scores, variables, images_dir, out_dir, colour_dir)
    return export_split(config, scores, variables, dataset or config.data.eval_dataset,
                        split or config.data.eval_split, out_dir, colour_dir)


def command_config(argv):
    """What the export commands (predict, translate) start with: no stray arguments, INFO
    logging, and the --config flag's config with its paths made absolute."""
    from absl import flags  # noqa: PLC0415

    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    config = flags.FLAGS.config
    paths.resolve_config_paths(config)
    return config


def main(argv):
    from absl import flags  # noqa: PLC0415

    FLAGS = flags.FLAGS
    config = command_config(argv)
    out = paths.absolute(FLAGS.out)
    images_dir = paths.absolute(FLAGS.images) if FLAGS.images else None
    try:
        written = run(config, paths.absolute(FLAGS.workdir), FLAGS.dataset, FLAGS.split, out,
                      step=FLAGS.step, colour_dir=paths.absolute(FLAGS.colour_out),
                      images_dir=images_dir, stage=FLAGS.stage)
    except (FileNotFoundError, recipe.StageError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
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
    flags.DEFINE_string("stage", None, "A recipe's stage to predict with: a train stage or an "
                        "ensemble (default: the last train stage).")
    flags.DEFINE_string("images", None, "A folder of images to predict instead of a dataset "
                        "split (any size; non-image files are skipped and named).")
    flags.mark_flags_as_required(["config", "workdir", "out"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    paths.prepare_config_flag(sys.argv)  # config files import `configs.*`
    app.run(main)
