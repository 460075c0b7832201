"""TFDS builder for GTA5 ("Playing for Data", Richter et al. 2016) from its official download.

Labels are palette PNGs whose palette *indices* are Cityscapes labelIds; they are stored as those
indices (raw labelIds). A few pairs have an image and a label of different sizes: the label is
resized with nearest neighbour to the image and the pair is counted (common.py).
"""

from __future__ import annotations

import re

from synseg_jax.data import labels
from synseg_jax.data.builders import common


class Gta5(common.RealDatasetBuilder):
    """GTA5: 24,966 frames (some copies hold 24,941) at 1914x1052, one `train` split."""

    name = "gta5"
    TITLE = "GTA5"
    DOWNLOAD = ("https://download.visinf.tu-darmstadt.de/data/from_games/ (the ten parts "
                "01_images.zip..10_images.zip and 01_labels.zip..10_labels.zip)")
    LAYOUT = ("  images/00001.png ... images/24966.png and labels/00001.png ... labels/24966.png\n"
              "  (extracted), or the part archives NN_images.zip and NN_labels.zip themselves")
    LABEL_TABLE = labels.GTA5_TABLE
    EXPECTED_COUNTS = {"train": (24_966, 24_941)}
    # "images/00001.png", and inside "01_images.zip" either "images/00001.png" or "00001.png".
    IMAGE_PATTERN = re.compile(r"(?:^|/)(?:\d+_)?images/(?:images/)?(?P<key>\d+)\.png$")
    LABEL_PATTERN = re.compile(r"(?:^|/)(?:\d+_)?labels/(?:labels/)?(?P<key>\d+)\.png$")
    DESCRIPTION = "GTA5 frames with Cityscapes labelIds (raw palette indices); name = file stem."
