"""TFDS builders for minicity: scene splits (segmentation) and `objects` (classification).

The renderer is pure numpy/PIL, so examples are rendered and PNG-encoded in a process pool and
only serialised here. A builder config carries every generator argument, and its name encodes
them, so two demo sizes never share (or overwrite) one data dir entry.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import threading
import time
import warnings
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from synseg_jax.data import labels, minicity


@dataclasses.dataclass(frozen=True)
class MinicityOptions:
    """Generator arguments; defaults are the benchmark's (minicity.DEFAULT_*)."""

    scene_size: tuple[int, int] = minicity.DEFAULT_SCENE_SIZE
    object_size: int = minicity.DEFAULT_OBJECT_SIZE
    seed: int = 0
    num_examples: tuple[tuple[str, int], ...] = tuple(minicity.DEFAULT_NUM_EXAMPLES.items())
    gap_off: tuple[str, ...] = ()  # domain-gap knobs turned off (minicity.KNOBS); () = benchmark
    workers: int = 0  # 0: one per CPU core; not part of the dataset's identity

    @property
    def gap(self) -> minicity.Gap:
        return minicity.Gap.without(self.gap_off)

    def count(self, split: str) -> int:
        return dict(self.num_examples)[split]

    def config_name(self) -> str:
        counts = "-".join(str(self.count(s)) for s in minicity.SPLITS)
        h, w = self.scene_size
        return (f"s{h}x{w}_o{self.object_size}_seed{self.seed}_n{counts}"
                f"{minicity.gap_suffix(self.gap)}")

    def for_objects(self) -> "MinicityOptions":
        """The objects ignore the gap knobs, so every ablation shares one objects build."""
        return dataclasses.replace(self, gap_off=())

    @classmethod
    def create(cls, *, scene_size=None, object_size=None, seed=0, num_examples=None, gap_off=(),
               workers=0):
        """Builds options from plain values; `num_examples` may name a subset of the splits."""
        counts = dict(minicity.DEFAULT_NUM_EXAMPLES)
        unknown = set(num_examples or {}) - set(counts)
        if unknown:
            raise ValueError(
                f"minicity has no split(s) {sorted(unknown)}; valid splits: {list(minicity.SPLITS)}")
        counts.update(num_examples or {})
        return cls(
            scene_size=tuple(scene_size or minicity.DEFAULT_SCENE_SIZE),
            object_size=int(object_size or minicity.DEFAULT_OBJECT_SIZE),
            seed=int(seed),
            num_examples=tuple((s, int(counts[s])) for s in minicity.SPLITS),
            gap_off=minicity.Gap.without(tuple(gap_off)).off,  # validated, in canonical order
            workers=int(workers),
        )


class _MinicityConfig(tfds.core.BuilderConfig):
    def __init__(self, options: MinicityOptions):
        super().__init__(name=options.config_name(), description="minicity generator arguments")
        self.options = options


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Fast compression: the build is bound by CPU, not by disk.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _render_encoded(job: tuple[str, int, MinicityOptions]) -> tuple[int, dict]:
    split, index, options = job
    example = minicity.render_example(
        split, index, seed=options.seed, scene_size=options.scene_size,
        object_size=options.object_size, gap=options.gap)
    encoded = {"image": io.BytesIO(_png(example["image"])), "scene_id": example["scene_id"]}
    if split == "objects":
        encoded["label"] = int(example["label"])
    else:
        encoded["label"] = io.BytesIO(_png(example["label"]))  # 1-channel PNG
    return index, encoded


def _exit_with_parent(parent: int) -> None:
    """Worker initialiser: a worker whose parent is gone (killed, even with -9) exits within a
    second instead of waiting forever on the task queue as an orphan."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _render_all(split: str, options: MinicityOptions) -> Iterator[tuple[int, dict]]:
    jobs = [(split, i, options) for i in range(options.count(split))]
    workers = options.workers or os.cpu_count() or 1
    if workers == 1:
        yield from map(_render_encoded, jobs)
        return
    # Workers run numpy/PIL only, never JAX or TF, so forking this multithreaded process is safe
    # for them (JAX's warning about fork concerns children that use JAX), and fork spares each
    # worker a re-import of the TF/JAX-heavy parent's __main__ that spawn would make.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_exit_with_parent,
            initargs=(os.getpid(),)) as pool:
        with warnings.catch_warnings():  # map submits every job now: all workers fork here
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                    category=RuntimeWarning)
            results = pool.map(_render_encoded, jobs, chunksize=64)
        yield from results


class _MinicityBase(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version(minicity.VERSION)
    RELEASE_NOTES = {
        "1.0.0": "Procedural sim-to-real street scenes.",
        "2.0.0": "Calibrated gap: named knobs (minicity/gap.py), no brightness-order flips, "
                 "thin classes resolvable at 128x256, real_val of 500 scenes.",
    }
    _SPLITS: tuple[str, ...] = ()

    def __init__(self, *, options: MinicityOptions | None = None, **kwargs):
        options = options or MinicityOptions()
        super().__init__(config=_MinicityConfig(options), **kwargs)

    @property
    def options(self) -> MinicityOptions:
        return self.builder_config.options

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is rendered
        return {split: self._generate_examples(split) for split in self._SPLITS}

    def _generate_examples(self, split):
        yield from _render_all(split, self.options)


class Minicity(_MinicityBase):
    """Street scenes with trainId labels: sim, sim_topdown, real_train, real_val."""

    _SPLITS = minicity.SCENE_SPLITS

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.Image(shape=(None, None, 1)),
                "scene_id": tfds.features.Text(),
            }),
            description="minicity street scenes in the Cityscapes trainId taxonomy.",
        )


class MinicityObjects(_MinicityBase):
    """Object-centric crops in the real style: the demo's ImageNet stand-in."""

    _SPLITS = ("objects",)

    def __init__(self, *, options: MinicityOptions | None = None, **kwargs):
        super().__init__(options=(options or MinicityOptions()).for_objects(), **kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=list(labels.CLASS_NAMES)),
                "scene_id": tfds.features.Text(),
            }),
            description="minicity object crops labelled with their trainId.",
        )
