"""Opens a dataset split for this process: the one place that knows datasets by name.

Each dataset is a TFDS dataset in a data dir. `open_split` returns this process's share of a split
as a tf.data.Dataset of `{"image": uint8 [H,W,3], "label": uint8 [H,W] raw ids}` together with the
lookup table that maps those raw ids to trainIds, which the pipeline applies. minicity is rendered
into the data dir on first use; the real datasets are prepared by `synseg_jax.prepare`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
import io
import logging
import os
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from synseg_jax import paths
from synseg_jax.data import labels
from synseg_jax.data.builders import cityscapes as cityscapes_builders
from synseg_jax.data.builders import common as real_builders
from synseg_jax.data.builders import derived as derived_builders
from synseg_jax.data.builders import gta5 as gta5_builders
from synseg_jax.data.builders import minicity as minicity_builders
from synseg_jax.data.builders import synthia as synthia_builders


class DataDirError(OSError):
    """A data dir that cannot be written or read as needed."""


class _TfdsNoticeFilter(logging.Filter):
    """TFDS logs every custom builder config and every local render as if it were news ("Using
    custom data configuration", "Downloading and preparing dataset Unknown size"). For datasets
    this module renders or was told to open, those lines are noise; its own messages say what
    happens."""

    NOISE = ("Using custom data configuration", "Downloading and preparing dataset",
             "Dataset minicity", "Constructing tf.data.Dataset", "Load dataset info from",
             "Reusing dataset", "Generating dataset")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


logging.getLogger("absl").addFilter(_TfdsNoticeFilter())


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    splits: tuple[str, ...]
    label_table: str  # key of labels.LABEL_TABLES
    classification_splits: tuple[str, ...] = ()  # splits whose label is one trainId per image

    def task(self, split: str) -> str:
        return "classification" if split.split("[", 1)[0] in self.classification_splits \
            else "segmentation"


DATASETS: dict[str, DatasetSpec] = {
    "minicity": DatasetSpec(
        splits=("sim", "sim_topdown", "real_train", "real_val", "objects"),
        label_table="train_id", classification_splits=("objects",)),
    # Real datasets: raw ids as in the official downloads (docs/reference.md), mapped by the
    # pipeline.
    "gta5": DatasetSpec(splits=("train",), label_table="gta5"),
    "synthia": DatasetSpec(splits=("train",), label_table="synthia"),
    "cityscapes": DatasetSpec(splits=("train", "validation"), label_table="cityscapes"),
}


# Builders of the real datasets, prepared from the official downloads by `synseg_jax.prepare`.
REAL_BUILDERS: dict[str, type[real_builders.RealDatasetBuilder]] = {
    "gta5": gta5_builders.Gta5,
    "synthia": synthia_builders.Synthia,
    "cityscapes": cityscapes_builders.Cityscapes,
}


@dataclasses.dataclass(frozen=True)
class SplitData:
    """This process's share of one split."""

    dataset: tf.data.Dataset
    num_examples: int  # in this process's share
    total_examples: int  # in the whole split, over all processes
    label_table: np.ndarray
    task: str
    description: str  # "minicity/real_val in /path", for error messages
    # Decodes an example of `dataset` when it was opened with decode=False (images still PNG or
    # JPEG bytes); None when `dataset` is decoded already.
    decode: Callable[[dict], dict] | None = None


# A dataset written by an earlier stage of a run: "derived:<its folder>" (see builders/derived).
DERIVED_PREFIX = "derived:"
DERIVED_SPEC = DatasetSpec(splits=(derived_builders.SPLIT,), label_table="train_id")


def derived_name(folder: str) -> str:
    return DERIVED_PREFIX + folder


def spec(name: str) -> DatasetSpec:
    if name.startswith(DERIVED_PREFIX):
        return DERIVED_SPEC
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets: {sorted(DATASETS)} or "
                         f"{DERIVED_PREFIX}<folder> (written by a recipe stage)") from None


def check_split(name: str, split: str) -> None:
    # TFDS slicing ("objects[:90%]") is allowed on any split.
    if split.split("[", 1)[0] not in spec(name).splits:
        raise ValueError(
            f"Dataset {name!r} has no split {split!r}; valid splits: {list(spec(name).splits)}")


def default_data_dir() -> str:
    return paths.absolute(os.environ.get("SYNSEG_DATA_DIR") or "~/tensorflow_datasets")


def minicity_builder(split: str, data_dir: str, options: minicity_builders.MinicityOptions):
    cls = minicity_builders.MinicityObjects if split == "objects" else minicity_builders.Minicity
    return cls(options=options, data_dir=data_dir)


def _note_other_versions(version_dir: str) -> None:
    """Says which older minicity versions sit beside the one being rendered: TFDS keeps them
    apart (nothing mixes), but they take disk space and nothing reads them any more."""
    config_dir = os.path.dirname(version_dir)
    version = os.path.basename(version_dir)
    if not tf.io.gfile.isdir(config_dir):
        return
    others = sorted(v for v in tf.io.gfile.listdir(config_dir)
                    if v.rstrip("/") != version and v[:1].isdigit())
    if others:
        logging.info("minicity %s in %s is not used by this version (%s); delete it to free the "
                     "space", ", ".join(o.rstrip("/") for o in others), config_dir, version)


def _builder(name: str, split: str, data_dir: str, minicity_options):
    if name == "minicity":
        builder = minicity_builder(split, data_dir, minicity_options or
                                   minicity_builders.MinicityOptions())
        if not builder.is_prepared():
            logging.info("Rendering minicity %s into %s (one time)", builder.info.full_name, data_dir)
            _note_other_versions(builder.data_dir)
            start = time.time()
            try:
                # TFDS prints "Downloading and preparing dataset Unknown size" and "downloaded and
                # prepared" to stdout for what is a local render; its progress bars (stderr) and
                # the two log lines here say what happens.
                with contextlib.redirect_stdout(io.StringIO()):
                    builder.download_and_prepare()
                logging.info("Rendered minicity %s in %.0f s", builder.info.full_name,
                             time.time() - start)
            except OSError as err:
                raise DataDirError(
                    f"Cannot render minicity into the data dir {data_dir}: {err}. Set "
                    "data.data_dir (or $SYNSEG_DATA_DIR) to a folder this user can write, with "
                    "about 1 GB free") from err
        return builder
    if name.startswith(DERIVED_PREFIX):
        folder = name[len(DERIVED_PREFIX):]
        builder = derived_builders.Derived(data_dir=folder)
        if not builder.is_prepared():
            raise FileNotFoundError(f"No derived dataset in {folder}: the stage that writes it "
                                    "has not finished")
        return builder
    if name in REAL_BUILDERS:
        cls = REAL_BUILDERS[name]
        builder = cls(data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(cls.not_prepared_message(data_dir, name))
        return builder
    raise ValueError(f"Dataset {name!r} has no builder")


def builder(name: str, split: str, *, data_dir: str | None = None,
            minicity_options: minicity_builders.MinicityOptions | None = None):
    """The prepared TFDS builder that `open_split` reads `name/split` from."""
    check_split(name, split)
    return _builder(name, split, data_dir or default_data_dir(), minicity_options)


def name_key(builder) -> str | None:
    """The feature holding an example's stored name: real datasets store ``name``
    (``<city>_<seq>_<frame>`` for Cityscapes), minicity ``scene_id``."""
    features = builder.info.features
    return next((key for key in ("name", "scene_id") if key in features), None)


def _select(task: str, names_from: str | None, encoded: bool):
    """The stored example -> {"image", "label"[, "name"]}; with `encoded`, image and label stay
    bytes and only get their final form in `_decoder`."""
    def select(example):
        out = {"image": example["image"]}
        if task == "segmentation":
            out["label"] = example["label"] if encoded else example["label"][..., 0]
        else:
            out["label"] = tf.cast(example["label"], tf.int32)
        if names_from:
            out["name"] = example[names_from]
        return out
    return select


def _decoder(builder, task: str) -> Callable[[dict], dict]:
    """Decodes what `_select(encoded=True)` keeps, with the dataset's own feature decoders."""
    features = builder.info.features

    def decode(example):
        out = dict(example)
        out["image"] = features["image"].decode_example(example["image"])
        if task == "segmentation":
            out["label"] = features["label"].decode_example(example["label"])[..., 0]
        return out
    return decode


def open_split(name: str, split: str, *, data_dir: str | None = None,
               process_index: int = 0, process_count: int = 1,
               minicity_options: minicity_builders.MinicityOptions | None = None,
               with_names: bool = False, decode: bool = True) -> SplitData:
    """This process's contiguous share of `name/split`, in stored (deterministic) order.

    ``with_names`` keeps each example's stored name (a string "name") beside its image, so a
    consumer that writes files per example never has to join two reads by position.
    ``decode=False`` leaves images and labels encoded and returns the decoder beside them: a
    training stream shuffles and skips the small encoded records, and decodes only what it uses.
    """
    check_split(name, split)
    data_dir = data_dir or default_data_dir()
    builder = _builder(name, split, data_dir, minicity_options)
    total = builder.info.splits[split].num_examples
    description = f"{name}/{split} in {builder.data_dir}"
    if total == 0:
        raise ValueError(f"Split {description} is empty")
    shard = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    task = spec(name).task(split)
    skip = {k: tfds.decode.SkipDecoding() for k in ("image", "label")
            if k == "image" or task == "segmentation"}
    dataset = builder.as_dataset(split=shard, shuffle_files=False,
                                 decoders=None if decode else skip)
    names_from = None
    if with_names:
        names_from = name_key(builder)
        if names_from is None:
            raise ValueError(f"{description} stores no example names")
    dataset = dataset.map(_select(task, names_from, encoded=not decode),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return SplitData(
        dataset=dataset,
        num_examples=builder.info.splits[shard].num_examples,
        total_examples=total,
        label_table=labels.label_table(spec(name).label_table),
        task=task,
        description=description,
        decode=None if decode else _decoder(builder, task),
    )
