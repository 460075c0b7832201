"""Real-dataset builders on tiny fakes written in each official on-disk format.

GTA5 (palette PNGs whose indices are labelIds), SYNTHIA (16-bit 3-channel PNGs with the class id
in the first channel) and Cityscapes (labelIds PNGs in the leftImg8bit/gtFine layout), each
extracted and zipped, are prepared through the real builders and read back through
`datasets.open_split` and the pipeline streams with the dataset's table; bad input (missing,
corrupt, unpaired, mismatched, unknown ids, wrong counts) behaves as documented in
synseg_jax/data/builders/common.py.
"""

import io
import os
import struct
import sys
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from synseg_jax import prepare as prepare_cli
from synseg_jax.data import datasets, labels, pipeline
from synseg_jax.data.builders import common

H, W = 16, 32
WORKERS = 2
# Raw ids drawn for fake labels: mapped classes, ignored-but-known ids, nothing unknown.
GTA5_IDS = np.array([0, 1, 4, 7, 8, 11, 17, 21, 23, 24, 26, 33], np.uint8)
SYNTHIA_IDS = np.array([0, 1, 2, 3, 4, 8, 10, 12, 13, 19, 22], np.uint16)


# ------------------------------------------------------------------------------------------------
# Writers of the official formats.


def rgb(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def raw_labels(seed, ids, h=H, w=W):
    return np.random.default_rng(1000 + seed).choice(ids, (h, w))


def png_bytes(array, mode=None, palette=None):
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gta5_label_png(ids):
    """A palette PNG like GTA5's: the pixel values are palette indices = labelIds."""
    palette = np.random.default_rng(5).integers(0, 256, 768, dtype=np.uint8).tolist()
    return png_bytes(ids.astype(np.uint8), "P", palette)


def synthia_label_png(ids):
    """A 16-bit RGB PNG: R = class id, G/B = instance-like values beyond 8 bits."""
    h, w = ids.shape
    rest = np.random.default_rng(7).integers(0, 60000, (h, w, 2), dtype=np.uint16)
    array = np.concatenate([ids.astype(np.uint16)[..., None], rest], -1)
    return tf.io.encode_png(tf.constant(array)).numpy()


class Tree:
    """Collects relative path -> bytes, then writes them as files or into zip archives."""

    def __init__(self):
        self.files = {}

    def add(self, path, data):
        self.files[path] = data

    def write(self, root, archives=None):
        """``archives``: {zip name: prefix of the paths it holds}; the rest become files."""
        os.makedirs(root, exist_ok=True)
        archives = archives or {}
        for path, data in self.files.items():
            zipped = [z for z, prefix in archives.items() if path.startswith(prefix)]
            if zipped:
                with zipfile.ZipFile(os.path.join(root, zipped[0]), "a") as z:
                    z.writestr(path, data)
            else:
                os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
                with open(os.path.join(root, path), "wb") as f:
                    f.write(data)
        return str(root)


def write_rar4(path, files):
    """A RAR 4.x archive of stored (uncompressed) members, written from the format's spec: marker
    block, main header, one file header (+ data) per member, end block; each header starts with
    the low 16 bits of the CRC32 of the rest of it. No rar tool can be installed here, and
    libarchive reads stored members with the same code path as compressed ones up to the codec."""
    def block(body):
        return struct.pack("<H", zlib.crc32(body) & 0xFFFF) + body
    out = bytearray(b"Rar!\x1a\x07\x00")
    out += block(struct.pack("<BHHHI", 0x73, 0, 13, 0, 0))  # main header
    for name, data in files.items():
        encoded = name.encode()
        # type 0x74 file, flag 0x8000 (has data), header size, packed/unpacked size, host OS
        # 3 (Unix), data CRC32, DOS time, version 2.0, method 0x30 (store), name size, mode.
        out += block(struct.pack("<BHHIIBIIBBHI", 0x74, 0x8000, 32 + len(encoded), len(data),
                                 len(data), 3, zlib.crc32(data), 0x21 << 16, 20, 0x30,
                                 len(encoded), 0o100644) + encoded) + data
    out += block(struct.pack("<BHH", 0x7B, 0x4000, 7))  # end of archive
    with open(path, "wb") as f:
        f.write(bytes(out))
    return str(path)


def write_tar_gz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def fake_gta5(n=4):
    tree, expected = Tree(), {}
    for i in range(1, n + 1):
        name = f"{i:05d}"
        ids = raw_labels(i, GTA5_IDS)
        tree.add(f"images/{name}.png", png_bytes(rgb(i)))
        tree.add(f"labels/{name}.png", gta5_label_png(ids))
        expected[name] = ids
    return tree, expected


def fake_synthia(n=3):
    tree, expected = Tree(), {}
    for i in range(n):
        name = f"{i:07d}"
        ids = raw_labels(i, SYNTHIA_IDS)
        tree.add(f"RAND_CITYSCAPES/RGB/{name}.png", png_bytes(rgb(i)))
        tree.add(f"RAND_CITYSCAPES/GT/LABELS/{name}.png", synthia_label_png(ids))
        tree.add(f"RAND_CITYSCAPES/GT/COLOR/{name}.png", png_bytes(rgb(i + 50)))  # not read
        expected[name] = ids
    return tree, expected


CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}
CS_IDS = np.arange(34, dtype=np.uint8)


def fake_cityscapes(per_city=2):
    tree, expected = Tree(), {"train": {}, "val": {}}
    k = 0
    for split, cities in CITIES.items():
        for city in cities:
            for frame in range(per_city):
                name = f"{city}_{k:06d}_{frame:06d}"
                ids = raw_labels(k * 10 + frame, CS_IDS)
                tree.add(f"leftImg8bit/{split}/{city}/{name}_leftImg8bit.png",
                         png_bytes(rgb(k * 10 + frame)))
                tree.add(f"gtFine/{split}/{city}/{name}_gtFine_labelIds.png", png_bytes(ids))
                # Files of the same packages that the builder must ignore.
                tree.add(f"gtFine/{split}/{city}/{name}_gtFine_color.png", png_bytes(rgb(1)))
                tree.add(f"gtFine/{split}/{city}/{name}_gtFine_instanceIds.png",
                         tf.io.encode_png(ids.astype(np.uint16)[..., None] * 1000).numpy())
                expected[split][name] = ids
            k += 1
    tree.add("leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png", png_bytes(rgb(9)))
    tree.add("README", b"official readme")
    return tree, expected


GTA5_ZIPS = {"01_images.zip": "images/", "01_labels.zip": "labels/"}
CS_ZIPS = {"leftImg8bit_trainvaltest.zip": "leftImg8bit/", "gtFine_trainvaltest.zip": "gtFine/"}


def build(dataset, manual_dir, data_dir, **kwargs):
    kwargs.setdefault("allow_partial", True)
    builder = datasets.REAL_BUILDERS[dataset](
        data_dir=str(data_dir), manual_dir=str(manual_dir), workers=WORKERS, **kwargs)
    builder.download_and_prepare()
    return builder


def read_split(dataset, split, data_dir):
    """(name -> trainId label as the eval stream delivers it, unknown pixels, names in order)."""
    opened = datasets.open_split(dataset, split, data_dir=str(data_dir))
    ds = pipeline.eval_stream(opened.dataset, batch_size=1, table=opened.label_table,
                              image_size=(8, 16), name=opened.description)
    builder = datasets.builder(dataset, split, data_dir=str(data_dir))
    names = [e["name"].decode() for e in tfds_names(builder, split)]
    out, unknown = {}, 0
    for name, batch in zip(names, ds.as_numpy_iterator()):
        assert batch["image"].shape == (1, 8, 16, 3)
        out[name] = batch["label"][0]
        unknown += int(batch[pipeline.UNKNOWN_PIXELS].sum())
    assert len(out) == opened.num_examples
    return out, unknown


def tfds_names(builder, split):
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={
        "image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
    return ds.as_numpy_iterator()


def expected_train_ids(raw, dataset):
    table = labels.label_table(datasets.DATASETS[dataset].label_table)
    return labels.map_to_train_ids(raw, table)[0]


# ------------------------------------------------------------------------------------------------
# Registry


def test_every_real_dataset_has_a_builder_with_its_splits():
    real = {n for n in datasets.DATASETS if n != "minicity"}
    assert set(datasets.REAL_BUILDERS) == real
    for name, cls in datasets.REAL_BUILDERS.items():
        assert tuple(cls.EXPECTED_COUNTS) == datasets.DATASETS[name].splits
        assert cls.LABEL_TABLE is labels.label_table(datasets.DATASETS[name].label_table)


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
    for name in datasets.REAL_BUILDERS:
        with pytest.raises(FileNotFoundError, match="python -m synseg_jax.prepare"):
            datasets.open_split(name, "train", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Round trips: official format -> builder -> open_split -> pipeline


@pytest.mark.parametrize("zipped", [False, True], ids=["extracted", "zipped"])
def test_gta5_round_trip(tmp_path, zipped):
    tree, expected = fake_gta5()
    manual = tree.write(tmp_path / "manual", GTA5_ZIPS if zipped else None)
    builder = build("gta5", manual, tmp_path / "data")
    stats = builder.stats["train"]
    assert stats.written == len(expected) and not stats.resized_labels and not stats.unknown_ids
    got, unknown = read_split("gta5", "train", tmp_path / "data")
    assert unknown == 0 and set(got) == set(expected)
    for name, raw in expected.items():
        np.testing.assert_array_equal(got[name], expected_train_ids(raw, "gta5"))


def test_synthia_16bit_labels_round_trip(tmp_path):
    tree, expected = fake_synthia()
    manual = tree.write(tmp_path / "manual")
    build("synthia", manual, tmp_path / "data")
    got, unknown = read_split("synthia", "train", tmp_path / "data")
    assert unknown == 0 and set(got) == set(expected)
    for name, raw in expected.items():
        want = expected_train_ids(raw, "synthia")
        np.testing.assert_array_equal(got[name], want)
    assert {0, 1, 2, 10, 13, 15} <= set(np.unique(np.stack(list(got.values()))).tolist())
    # The training stream maps the same way (no flip, crop = whole image).
    opened = datasets.open_split("synthia", "train", data_dir=str(tmp_path / "data"))
    ds = pipeline.train_stream(opened.dataset, config=pipeline.AugmentConfig(flip_prob=0.0),
                               batch_size=len(expected), seed=0, table=opened.label_table,
                               shuffle_buffer=1)
    batch = next(ds.as_numpy_iterator())
    wanted = {expected_train_ids(raw, "synthia").tobytes() for raw in expected.values()}
    assert {label.tobytes() for label in batch["label"]} == wanted


@pytest.mark.parametrize("zipped", [False, True], ids=["extracted", "zipped"])
def test_cityscapes_round_trip(tmp_path, zipped):
    tree, expected = fake_cityscapes()
    manual = tree.write(tmp_path / "manual", CS_ZIPS if zipped else None)
    build("cityscapes", manual, tmp_path / "data")
    for split, tfds_split in (("train", "train"), ("val", "validation")):
        got, unknown = read_split("cityscapes", tfds_split, tmp_path / "data")
        assert unknown == 0 and set(got) == set(expected[split])
        for name, raw in expected[split].items():
            assert got[name].shape == (H, W)  # eval labels keep full resolution
            np.testing.assert_array_equal(got[name], expected_train_ids(raw, "cityscapes"))


# ------------------------------------------------------------------------------------------------
# Bad input


def test_missing_manual_dir_lists_the_expected_layout(tmp_path):
    for name, cls in datasets.REAL_BUILDERS.items():
        with pytest.raises(common.ManualDirError, match="does not exist") as err:
            build(name, tmp_path / "nowhere", tmp_path / "data")
        assert isinstance(err.value, FileNotFoundError)
        assert cls.LAYOUT in str(err.value) and "http" in str(err.value)
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(common.ManualDirError, match="No .* found"):
            build(name, tmp_path / "empty", tmp_path / "data")


def test_a_failed_prepare_leaves_no_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    data = tmp_path / "data"
    (data / "other").mkdir(parents=True)  # what was there before stays
    with pytest.raises(common.ManualDirError):
        prepare_cli.prepare("gta5", str(tmp_path / "empty"), str(data), progress=False)
    assert sorted(os.listdir(data)) == ["other"]


@pytest.mark.parametrize("archive", ["rar", "tar.gz"])
def test_synthia_read_from_its_archive_and_extracted_once(tmp_path, archive):
    """The official RAND_CITYSCAPES.rar in the manual dir, as downloaded: only RGB/ and
    GT/LABELS/ are extracted (under <data_dir>/downloads/extracted), once."""
    tree, expected = fake_synthia()
    (tmp_path / "manual").mkdir()
    writer = write_rar4 if archive == "rar" else write_tar_gz
    writer(tmp_path / "manual" / f"RAND_CITYSCAPES.{archive}", tree.files)
    build("synthia", tmp_path / "manual", tmp_path / "data")
    got, unknown = read_split("synthia", "train", tmp_path / "data")
    assert unknown == 0 and set(got) == set(expected)
    for name, raw in expected.items():
        np.testing.assert_array_equal(got[name], expected_train_ids(raw, "synthia"))
    dest = tmp_path / "data" / "downloads" / "extracted" / "synthia" / "RAND_CITYSCAPES"
    extracted = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.png"))
    assert len(extracted) == 2 * len(expected)
    assert not [p for p in extracted if "COLOR" in p]  # members nobody reads stay packed
    assert common.extract_members(str(tmp_path / "manual" / f"RAND_CITYSCAPES.{archive}"),
                                  str(dest), lambda m: True) == 0  # stamped: not read again


def test_interrupted_extraction_resumes_without_rewriting(tmp_path):
    files = {f"RGB/{i:07d}.png": bytes([i]) * (100 + i) for i in range(4)}
    archive = write_rar4(tmp_path / "a.rar", files)
    dest = tmp_path / "out"
    (dest / "RGB").mkdir(parents=True)
    (dest / "RGB" / "0000000.png").write_bytes(files["RGB/0000000.png"])  # finished earlier
    (dest / "RGB" / "0000001.png.part").write_bytes(b"\0" * 7)  # the interrupted one
    assert common.extract_members(archive, str(dest), lambda m: True) == 3
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert not list(dest.rglob("*.part"))


def test_damaged_or_escaping_archive_is_named(tmp_path):
    tree, _ = fake_synthia(2)
    manual = tmp_path / "manual"
    manual.mkdir()
    path = write_rar4(manual / "RAND_CITYSCAPES.rar", tree.files)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(common.CorruptFileError, match="RAND_CITYSCAPES.rar"):
        build("synthia", manual, tmp_path / "data")
    evil = write_rar4(tmp_path / "evil.rar", {"../RGB/0000000.png": b"x"})
    with pytest.raises(common.CorruptFileError, match="outside"):
        common.extract_members(evil, str(tmp_path / "out"), lambda m: True)
    assert not (tmp_path / "RGB").exists()


def test_missing_libarchive_says_what_to_install(tmp_path, monkeypatch):
    path = write_rar4(tmp_path / "a.rar", {"RGB/0000000.png": b"x"})
    monkeypatch.setitem(sys.modules, "libarchive", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="libarchive-c.*apt install libarchive13.*extract"):
        common.extract_members(path, str(tmp_path / "out"), lambda m: True)


def test_unpaired_files_are_named_or_dropped(tmp_path):
    tree, expected = fake_gta5(3)
    del tree.files["labels/00002.png"]
    manual = tree.write(tmp_path / "manual")
    with pytest.raises(common.ManualDirError, match="00002.png .no label."):
        build("gta5", manual, tmp_path / "data", allow_partial=False)
    builder = build("gta5", manual, tmp_path / "data")
    assert builder.stats["train"].written == 2 and len(builder.stats["train"].unpaired) == 1


def test_official_counts_are_checked(tmp_path):
    manual = fake_gta5(2)[0].write(tmp_path / "manual")
    with pytest.raises(common.IncompleteDatasetError, match="24,966 or 24,941"):
        build("gta5", manual, tmp_path / "data", allow_partial=False)
    manual = fake_cityscapes(1)[0].write(tmp_path / "cs")
    with pytest.raises(common.IncompleteDatasetError, match="2,975"):
        build("cityscapes", manual, tmp_path / "data", allow_partial=False)


@pytest.mark.parametrize("dataset", ["gta5", "synthia"])
def test_corrupt_file_is_named_or_skipped(tmp_path, dataset):
    tree, expected = fake_gta5(3) if dataset == "gta5" else fake_synthia(3)
    bad = sorted(p for p in tree.files if "LABELS" in p or p.startswith("labels/"))[1]
    tree.files[bad] = tree.files[bad][: len(tree.files[bad]) // 2]  # truncated PNG
    manual = tree.write(tmp_path / "manual")
    with pytest.raises(common.CorruptFileError, match=os.path.basename(bad)):
        build(dataset, manual, tmp_path / "data")
    builder = build(dataset, manual, tmp_path / "data2", skip_corrupt=True)
    stats = builder.stats["train"]
    assert stats.written == 2 and len(stats.corrupt) == 1 and os.path.basename(bad) in \
        stats.corrupt[0]
    opened = datasets.open_split(dataset, "train", data_dir=str(tmp_path / "data2"))
    assert opened.num_examples == 2


def test_unreadable_zip_archive_is_named(tmp_path):
    manual = fake_gta5(2)[0].write(tmp_path / "manual", GTA5_ZIPS)
    path = os.path.join(manual, "01_labels.zip")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)  # central directory gone
    with pytest.raises(common.CorruptFileError, match="01_labels.zip"):
        build("gta5", manual, tmp_path / "data")


def test_gta5_size_mismatch_resizes_label(tmp_path):
    tree, expected = fake_gta5(2)
    small = raw_labels(9, GTA5_IDS, H // 2, W // 2)
    tree.files["labels/00002.png"] = gta5_label_png(small)
    manual = tree.write(tmp_path / "manual")
    builder = build("gta5", manual, tmp_path / "data")
    assert builder.stats["train"].resized_labels == ["00002"]
    got, _ = read_split("gta5", "train", tmp_path / "data")
    want = np.asarray(Image.fromarray(small).resize((W, H), Image.NEAREST))
    np.testing.assert_array_equal(got["00002"], expected_train_ids(want, "gta5"))


def test_unknown_ids_become_255_and_are_counted(tmp_path):
    tree, expected = fake_gta5(2)
    ids = expected["00001"].copy()
    ids[0, :5] = 40  # not a Cityscapes labelId
    tree.files["labels/00001.png"] = gta5_label_png(ids)
    manual = tree.write(tmp_path / "manual")
    builder = build("gta5", manual, tmp_path / "data")
    assert dict(builder.stats["train"].unknown_ids) == {40: 5}
    got, unknown = read_split("gta5", "train", tmp_path / "data")
    assert unknown == 5  # the pipeline still sees them as outside the taxonomy
    assert (got["00001"][0, :5] == labels.IGNORE_LABEL).all()
    # SYNTHIA: 16-bit ids beyond 8 bits as well.
    tree, expected = fake_synthia(1)
    ids = expected["0000000"].astype(np.uint16)
    ids[1, :3] = 300
    ids[2, :2] = 30
    tree.files["RAND_CITYSCAPES/GT/LABELS/0000000.png"] = synthia_label_png(ids)
    builder = build("synthia", tree.write(tmp_path / "s"), tmp_path / "data")
    assert dict(builder.stats["train"].unknown_ids) == {30: 2, 300: 3}


# ------------------------------------------------------------------------------------------------
# The prepare command


def test_prepare_command_summary(tmp_path, capsys):
    tree, expected = fake_cityscapes()
    manual = tree.write(tmp_path / "manual", CS_ZIPS)
    data = str(tmp_path / "data")
    argv = ["--dataset=cityscapes", f"--manual_dir={manual}", f"--data_dir={data}",
            f"--workers={WORKERS}", "--no_progress"]
    assert prepare_cli.main(argv) == 1  # default: the official counts are required
    assert "2,975" in capsys.readouterr().err
    assert prepare_cli.main(argv + ["--allow_partial"]) == 0
    out = capsys.readouterr().out
    assert "train: 4 examples" in out and "validation: 2 examples" in out
    assert "32x16 x4" in out and "NOTE: not the official count" in out
    assert "road" in out and "ignore" in out
    summary = prepare_cli.prepare("cityscapes", manual, data)  # second run: nothing to do
    assert summary["already_prepared"] and summary["splits"]["validation"]["examples"] == 2
    pixels = summary["splits"]["train"]["train_id_pixels"]
    raw = np.concatenate([r.ravel() for r in expected["train"].values()])
    assert pixels["road"] == int((raw == 7).sum()) and sum(pixels.values()) == raw.size
    assert pixels["ignore"] == int((labels.CITYSCAPES_TABLE[raw] == 255).sum())
    assert prepare_cli.main(["--dataset=gta5", f"--manual_dir={tmp_path}/none",
                             f"--data_dir={data}"]) == 1
    assert "images/00001.png" in capsys.readouterr().err
