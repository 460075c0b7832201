"""Config -> data streams: the one place where config fields meet the data layer."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import tensorflow as tf

from synseg_jax import parallel
from synseg_jax.data import datasets, pipeline
from synseg_jax.data.builders.minicity import MinicityOptions


def minicity_options(data: ml_collections.ConfigDict) -> MinicityOptions:
    m = data.minicity
    counts = {split: n for split, n in m.num_examples.items() if n}
    return MinicityOptions.create(scene_size=m.scene_size, object_size=m.object_size, seed=m.seed,
                                  num_examples=counts, gap_off=tuple(m.gap_off))


def open_split(data: ml_collections.ConfigDict, name: str, split: str,
               with_names: bool = False, decode: bool = True,
               whole_split: bool = False) -> datasets.SplitData:
    """This process's share of the split (`whole_split`: all of it, whatever the process)."""
    # Restrict TF to the CPU: it must never take accelerator memory from JAX.
    tf.config.set_visible_devices([], "GPU")
    share = (0, 1) if whole_split else (jax.process_index(), jax.process_count())
    return datasets.open_split(
        name, split, data_dir=data.data_dir or None, process_index=share[0],
        process_count=share[1], minicity_options=minicity_options(data),
        with_names=with_names, decode=decode)


JITTER_OPS = ("brightness", "contrast", "saturation")


def augment_config(data: ml_collections.ConfigDict, resize) -> pipeline.AugmentConfig:
    unknown = [op for op in data.jitter_ops if op not in JITTER_OPS]
    if unknown:
        raise ValueError(f"data.jitter_ops: unknown {unknown}; valid: {JITTER_OPS}")
    probs = {f"{op}_prob": (data.jitter_prob if op in data.jitter_ops else 0.0)
             for op in JITTER_OPS}
    return pipeline.AugmentConfig(
        resize=tuple(resize) or None,
        scale_range=tuple(data.scale_range),
        crop=tuple(data.crop) or None,
        flip_prob=0.5 if data.flip else 0.0,
        jitter=pipeline.Jitter(**probs) if data.jitter_prob and data.jitter_ops else None,
        normalization=data.normalization,
    )


def train_batches(config: ml_collections.ConfigDict, mesh, *, seed: int,
                  start_step: int = 0) -> pipeline.HostIterator:
    """Endless global batches {"source": ..., ["target": ...]} sharded over the mesh: batch k is
    the same whenever the stream starts, so `start_step` (the steps already trained) resumes
    exactly where a run stopped."""
    data = config.data
    local_batch = parallel.local_batch_size(config.train.batch_size)
    source = open_split(data, data.source, data.source_split, decode=False)
    source_aug = augment_config(data, data.train_resize)
    if source.task == "classification":
        source_aug = dataclasses.replace(source_aug, crop=None, scale_range=(1.0, 1.0))
    if data.target:
        target = open_split(data, data.target, data.target_split, decode=False)
        ds = pipeline.paired_stream(
            source.dataset, target.dataset, batch_size=local_batch, seed=seed,
            source_table=source.label_table, source_config=source_aug,
            target_config=augment_config(data, data.target_resize),
            target_table=target.label_table, target_labels=data.target_labels,
            shuffle_buffer=data.shuffle_buffer, source_name=source.description,
            target_name=target.description, source_decode=source.decode,
            target_decode=target.decode, start_batch=start_step)
    else:
        ds = pipeline.train_stream(
            source.dataset, config=source_aug, batch_size=local_batch, seed=seed,
            table=source.label_table, shuffle_buffer=data.shuffle_buffer, name=source.description,
            decode=source.decode, start_batch=start_step)
        ds = ds.map(lambda b: {"source": b})
    described = source.description + (f" and {target.description}" if data.target else "")
    return pipeline.HostIterator(ds, mesh=mesh, name=f"training data ({described})")


def eval_batches(config: ml_collections.ConfigDict, mesh, name: str, split: str):
    """Finite global batches of one split, padded so every process runs the same steps."""
    data = config.data
    local_batch = parallel.local_batch_size(data.eval_batch_size)
    opened = open_split(data, name, split)
    per_process_max = -(-opened.total_examples // jax.process_count())
    ds = pipeline.eval_stream(
        opened.dataset, batch_size=local_batch, table=opened.label_table,
        image_size=tuple(data.eval_size) or None, normalization=data.normalization,
        num_batches=pipeline.num_eval_batches(per_process_max, local_batch),
        name=opened.description)
    return pipeline.HostIterator(ds, mesh=mesh, name=opened.description)


def eval_targets(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(dataset, split) pairs scored at the end: the main eval split, then the extra ones."""
    targets = [(config.data.eval_dataset, config.data.eval_split)]
    for item in config.data.extra_eval_splits:
        name, _, split = item.partition("/")
        targets.append((name, split))
    return targets


def abstract_batch(config: ml_collections.ConfigDict) -> dict:
    """Shapes of one global train batch, for building a state without reading data."""
    data, b = config.data, config.train.batch_size

    def domain(name, split, resize, labelled):
        classification = datasets.spec(name).task(split) == "classification"
        if classification:  # object crops, stored at their training size
            hw = (data.minicity.object_size,) * 2
        else:
            hw = tuple(data.crop) or tuple(resize) or (data.minicity.object_size,) * 2
        out = {"image": jax.ShapeDtypeStruct((b, *hw, 3), jax.numpy.float32),
               "crop_box": jax.ShapeDtypeStruct((b, 4), jax.numpy.float32)}
        if labelled:
            out["label"] = (jax.ShapeDtypeStruct((b,), jax.numpy.int32) if classification
                            else jax.ShapeDtypeStruct((b, *hw), jax.numpy.uint8))
        return out

    batch = {"source": domain(data.source, data.source_split, data.train_resize, True)}
    if data.target:
        batch["target"] = domain(data.target, data.target_split, data.target_resize,
                                 data.target_labels)
    return batch
