"""The taxonomies in labels.py, checked against the project's own record of them, docs/reference.md."""

import pathlib
import re

import numpy as np
import pytest

from synseg_jax import images
from synseg_jax.data import labels

REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def _reference_text() -> str:
    return REFERENCE.read_text()


def _parse_id_map(line_prefix: str) -> dict[int, int]:
    """Reads a `- prefix: \`a:b c:d …\`` line of docs/reference.md into a dict."""
    for line in _reference_text().splitlines():
        if line.startswith(line_prefix):
            pairs = re.search(r"`([^`]*)`", line).group(1).split()
            return {int(a): int(b) for a, b in (p.split(":") for p in pairs)}
    raise AssertionError(f"no line starting with {line_prefix!r} in {REFERENCE}")


def _parse_int_list(marker: str) -> list[int]:
    match = re.search(re.escape(marker) + r"[^`]*`\[([0-9,]+)\]`", _reference_text())
    assert match, f"{marker!r} not found in {REFERENCE}"
    return [int(v) for v in match.group(1).split(",")]


def test_label_id_map_matches_reference():
    expected = _parse_id_map("- labelId → trainId (Cityscapes")
    assert labels.CITYSCAPES_LABEL_TO_TRAIN == expected
    for raw in range(labels.CITYSCAPES_MAX_LABEL_ID + 1):
        assert labels.CITYSCAPES_TABLE[raw] == expected.get(raw, labels.IGNORE_LABEL)
    assert labels.GTA5_TABLE is labels.CITYSCAPES_TABLE


def test_synthia_map_matches_reference():
    expected = _parse_id_map("- SYNTHIA id → trainId")
    assert labels.SYNTHIA_TO_TRAIN == expected
    for raw in range(labels.SYNTHIA_MAX_ID + 1):
        assert labels.SYNTHIA_TABLE[raw] == expected.get(raw, labels.IGNORE_LABEL)
    never = {labels.CLASS_NAMES.index(n) for n in ("terrain", "truck", "train")}
    assert never.isdisjoint(labels.SYNTHIA_TO_TRAIN.values())


def test_class_names_and_subsets_match_reference():
    text = _reference_text()
    names_line = re.search(r"The 19 trainIds in order: ([^.]*)\.", text).group(1)
    assert labels.CLASS_NAMES == tuple(n.strip() for n in names_line.split(","))
    assert list(labels.CLASSES_16) == _parse_int_list("mIoU16 over trainIds")
    assert list(labels.CLASSES_13) == _parse_int_list("mIoU13 over")


def test_ids_outside_taxonomy_are_unknown_and_counted():
    raw = np.array([[7, 0, 33], [34, 200, 26]], dtype=np.uint8)
    mapped, unknown = labels.map_to_train_ids(raw, labels.CITYSCAPES_TABLE)
    np.testing.assert_array_equal(mapped, [[0, 255, 18], [255, 255, 13]])
    assert unknown == 2  # 34 and 200; 0 is a defined "unlabeled" id, ignored but not unknown


def test_train_id_table_keeps_ignore_and_flags_others():
    mapped, unknown = labels.map_to_train_ids(np.array([0, 18, 255, 19, 100]), labels.TRAIN_ID_TABLE)
    np.testing.assert_array_equal(mapped, [0, 18, 255, 255, 255])
    assert unknown == 2


def test_train_to_label_id_inverts_the_map():
    for label_id, train_id in labels.CITYSCAPES_LABEL_TO_TRAIN.items():
        assert labels.TRAIN_TO_CITYSCAPES_LABEL[train_id] == label_id


def test_palette_and_colorize():
    assert labels.PALETTE.shape == (19, 3)
    assert len({tuple(c) for c in labels.PALETTE}) == 19
    rgb = images.colorize(np.array([[0, 10, 255]]))
    np.testing.assert_array_equal(rgb[0, 0], (128, 64, 128))  # road
    np.testing.assert_array_equal(rgb[0, 1], (70, 130, 180))  # sky
    np.testing.assert_array_equal(rgb[0, 2], labels.IGNORE_COLOUR)


def test_unknown_table_name_lists_valid_ones():
    with pytest.raises(ValueError, match="cityscapes"):
        labels.label_table("cityscape")
