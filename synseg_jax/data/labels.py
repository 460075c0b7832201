"""Label taxonomies: the 19 Cityscapes trainIds, raw-id lookup tables and colour palettes.

Every dataset stores its labels in its own raw ids; the input pipeline maps them to trainIds with
one of the tables below, in one place. A table entry is the trainId (0..18), 255 for an id the
dataset defines but the benchmark ignores, or ``UNKNOWN`` (-1) for an id outside the dataset's
taxonomy: the pipeline turns those into 255 too but counts them, because they mean corrupt or
mislabelled input rather than a deliberate "void".
"""

from __future__ import annotations

import numpy as np

from synseg_jax import images

IGNORE_LABEL = 255
UNKNOWN = -1
NUM_CLASSES = 19

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Cityscapes colours, indexed by trainId: defined with the other drawing conventions in
# `images` (methods draw label maps too, and must not import the data layer).
PALETTE = images.TRAIN_ID_PALETTE
IGNORE_COLOUR = images.IGNORE_COLOUR

# SYNTHIA protocols (docs/reference.md): terrain, truck and train never occur in SYNTHIA.
CLASSES_16: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
CLASSES_13: tuple[int, ...] = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
CLASS_SUBSETS: dict[str, tuple[int, ...]] = {
    "19": tuple(range(NUM_CLASSES)),
    "16": CLASSES_16,
    "13": CLASSES_13,
}

# Cityscapes labelId -> trainId; GTA5 labels use the same labelIds.
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_MAX_LABEL_ID = 33

# SYNTHIA-RAND-CITYSCAPES class id -> trainId.
SYNTHIA_TO_TRAIN: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
    19: 15, 12: 17, 11: 18,
}
SYNTHIA_MAX_ID = 22  # ids 0..22 are defined by the dataset (0 is void, 22 lane marking)

TABLE_SIZE = 256  # every supported label encoding fits in 8 bits once decoded


def _make_table(mapping: dict[int, int], max_known_id: int) -> np.ndarray:
    """Lookup table: mapped ids -> trainId, other known ids -> 255, the rest -> UNKNOWN."""
    table = np.full(TABLE_SIZE, UNKNOWN, dtype=np.int32)
    table[: max_known_id + 1] = IGNORE_LABEL
    for raw_id, train_id in mapping.items():
        table[raw_id] = train_id
    return table


CITYSCAPES_TABLE = _make_table(CITYSCAPES_LABEL_TO_TRAIN, CITYSCAPES_MAX_LABEL_ID)
GTA5_TABLE = CITYSCAPES_TABLE
SYNTHIA_TABLE = _make_table(SYNTHIA_TO_TRAIN, SYNTHIA_MAX_ID)
# Datasets stored directly in trainIds (minicity): 0..18 map to themselves, 255 stays ignore.
TRAIN_ID_TABLE = _make_table({i: i for i in range(NUM_CLASSES)}, NUM_CLASSES - 1)
TRAIN_ID_TABLE[IGNORE_LABEL] = IGNORE_LABEL

LABEL_TABLES: dict[str, np.ndarray] = {
    "cityscapes": CITYSCAPES_TABLE,
    "gta5": GTA5_TABLE,
    "synthia": SYNTHIA_TABLE,
    "train_id": TRAIN_ID_TABLE,
}

# trainId -> Cityscapes labelId, for exporting predictions the official evaluator can read.
TRAIN_TO_CITYSCAPES_LABEL = np.zeros(TABLE_SIZE, dtype=np.uint8)
for _label_id, _train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
    TRAIN_TO_CITYSCAPES_LABEL[_train_id] = _label_id


def label_table(name: str) -> np.ndarray:
    """The raw-id -> trainId table called ``name``; an unknown name lists the valid ones."""
    try:
        return LABEL_TABLES[name]
    except KeyError:
        raise ValueError(
            f"Unknown label table {name!r}; expected one of {sorted(LABEL_TABLES)}") from None


def map_to_train_ids(raw: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, int]:
    """Numpy version of the pipeline's mapping: returns (trainIds as uint8, #unknown pixels)."""
    raw = np.asarray(raw)
    if raw.size and (raw.min() < 0 or raw.max() >= table.shape[0]):
        raise ValueError(
            f"Label values must lie in [0, {table.shape[0]}); got [{raw.min()}, {raw.max()}]")
    mapped = table[raw]
    unknown = int(np.count_nonzero(mapped == UNKNOWN))
    mapped = np.where(mapped == UNKNOWN, IGNORE_LABEL, mapped)
    return mapped.astype(np.uint8), unknown
