"""Datasets a run writes for its own later stages: images with trainId labels made by a model
(pseudo-labels), read back by the pipeline like any other segmentation dataset.

A derived dataset lives in its own data dir (a stage's folder), with one split, ``train``. Its
examples are produced by a generator given when it is written; reading needs only the folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import tensorflow_datasets as tfds

DATA_VERSION = "1.0.0"
SPLIT = "train"


class Derived(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """``{"image": uint8 [H, W, 3], "label": uint8 [H, W, 1] trainIds (255 unlabelled),
    "name": the source example's name}``."""

    VERSION = tfds.core.Version(DATA_VERSION)
    RELEASE_NOTES = {DATA_VERSION: "Images of a split with labels made by a model."}

    def __init__(self, *, examples: Callable[[], Iterator[tuple[str, dict]]] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self._examples = examples

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.Image(shape=(None, None, 1)),
                "name": tfds.features.Text(),
            }),
            description="A split relabelled by a model (e.g. pseudo-labels for self-training).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._examples is None:
            raise ValueError(f"The derived dataset in {self.data_dir} is not written yet, and no "
                             "example generator was given to write it")
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        yield from self._examples()
