"""TFDS builder for Cityscapes fine annotations (Cordts et al. 2016), keeping raw labelIds.

Reads ``leftImg8bit`` and ``gtFine`` (train and val; the test split has no public labels) from
the two official trainvaltest zips or their extracted folders, and keeps each frame's
``<city>_<seq>_<frame>`` id as ``name``, which the prediction export needs for the official
evaluator's file names. TFDS's builtin ``cityscapes`` builder also emits raw labelIds but not the
frame ids, hence this builder (named ``cityscapes_labelids`` so both can share a data dir).
"""

from __future__ import annotations

import re

from synseg_jax.data import labels
from synseg_jax.data.builders import common


class Cityscapes(common.RealDatasetBuilder):
    """Cityscapes gtFine: 2,975 `train` and 500 `validation` frames at 2048x1024."""

    name = "cityscapes_labelids"
    TITLE = "Cityscapes"
    DOWNLOAD = ("https://www.cityscapes-dataset.com/downloads/ (free registration; packages "
                "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)")
    LAYOUT = ("  leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and\n"
              "  gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png (extracted),\n"
              "  or the archives leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip")
    LABEL_TABLE = labels.CITYSCAPES_TABLE
    EXPECTED_COUNTS = {"train": (2_975,), "validation": (500,)}
    SPLIT_DIRS = {"train": "train", "val": "validation"}
    IMAGE_PATTERN = re.compile(
        r"(?:^|/)leftImg8bit/(?P<split>[^/]+)/[^/]+/(?P<key>[^/]+_\d+_\d+)_leftImg8bit\.png$")
    LABEL_PATTERN = re.compile(
        r"(?:^|/)gtFine/(?P<split>[^/]+)/[^/]+/(?P<key>[^/]+_\d+_\d+)_gtFine_labelIds\.png$")
    DESCRIPTION = ("Cityscapes leftImg8bit with gtFine labelIds (raw, 0..33); "
                   "name = <city>_<seq>_<frame>.")
