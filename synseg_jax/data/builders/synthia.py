"""TFDS builder for SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016) from its official download.

Labels are 16-bit multi-channel PNGs; the class id is the first channel (R) of the PNG, i.e. the
last one in OpenCV's BGR order, and the other channels hold instance ids. Pillow cannot keep 16
bits per channel of an RGB PNG, so the labels are decoded with ``tf.io.decode_png``; the ids
(0..22) are stored as 8-bit raw SYNTHIA ids. No pre-converted ``synthia_mapped_to_cityscapes``
folder is needed.

The official download, ``RAND_CITYSCAPES.rar``, may lie in the manual dir as it is: its RGB/ and
GT/LABELS/ members are extracted once through libarchive (see ``common.extract_members``).
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

from synseg_jax.data import labels
from synseg_jax.data.builders import common


def decode_synthia_label(data: bytes, ref: common.FileRef) -> np.ndarray:
    """16-bit (or 8-bit) PNG -> its first channel as a 2-D int32 array of class ids."""
    try:
        depth = common.png_bit_depth(data)
        if depth not in (8, 16):
            raise ValueError(f"unsupported PNG bit depth {depth}")
        # decode_png(dtype=uint16) would scale an 8-bit PNG by 257: pick the dtype from the file.
        decoded = tf.io.decode_png(data, channels=0,
                                   dtype=tf.uint16 if depth == 16 else tf.uint8)
        return decoded.numpy()[..., 0].astype(np.int32)
    except Exception as err:  # tf.errors.InvalidArgumentError, ValueError
        raise common.CorruptFileError(f"Cannot decode label {ref}: {err}") from err


class Synthia(common.RealDatasetBuilder):
    """SYNTHIA-RAND-CITYSCAPES: 9,400 frames at 1280x760, one `train` split."""

    name = "synthia"
    TITLE = "SYNTHIA-RAND-CITYSCAPES"
    DOWNLOAD = "https://synthia-dataset.net/downloads/ (SYNTHIA-RAND-CITYSCAPES (CVPR16))"
    LAYOUT = ("  RAND_CITYSCAPES.rar (the download as it is), or extracted:\n"
              "  RAND_CITYSCAPES/RGB/0000000.png ... and\n"
              "  RAND_CITYSCAPES/GT/LABELS/0000000.png ...\n"
              "  (the RAND_CITYSCAPES/ prefix is optional; GT/COLOR and Depth/ are not read)")
    LABEL_TABLE = labels.SYNTHIA_TABLE
    EXPECTED_COUNTS = {"train": (9_400,)}
    IMAGE_PATTERN = re.compile(r"(?:^|/)RGB/(?P<key>\d+)\.png$")
    LABEL_PATTERN = re.compile(r"(?:^|/)GT/LABELS/(?P<key>\d+)\.png$")
    DESCRIPTION = "SYNTHIA-RAND-CITYSCAPES frames with raw SYNTHIA class ids; name = file stem."

    def decode_label(self, data, ref):
        return decode_synthia_label(data, ref)
