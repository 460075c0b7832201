"""What the real-dataset builders (GTA5, SYNTHIA, Cityscapes) share.

Each builder reads an official download from a manual dir, either extracted or as the original
archives (any mix: an extracted file wins over the same file inside an archive), pairs every image
with its label, checks and re-encodes the pair in a thread pool, and writes TFDS shards of
``{"image": RGB PNG, "label": 1-channel uint8 PNG of RAW ids, "name": str}``. The pipeline maps
the raw ids to trainIds later, with the dataset's table (labels.py), so the shards keep the
official encoding and the benchmark mapping stays in one place.

Threads rather than processes: the work is PNG decoding/encoding, zlib and file reads, which all
release the GIL, and the 16-bit SYNTHIA labels are decoded with TensorFlow, which must not run in
a forked child of a process that already started TensorFlow.

Bad input, and what happens to it (counted in ``SplitStats``, reported by ``synseg_jax.prepare``):
- a RAR (SYNTHIA's download), 7z or tar archive: read with libarchive; RAR has no random access,
  so the members a builder wants are extracted once under ``<data_dir>/downloads/extracted/``
  (resumable; a finished archive is not read again). A damaged archive: ``CorruptFileError``
  naming it and the member;
- no manual dir, or no file of the expected layout in it: ``ManualDirError`` (a
  FileNotFoundError) describing the expected layout, where it was looked for, and where to get it;
- an image without its label or the reverse: an error naming them (``allow_partial`` drops them);
- a file count other than the official one: an error (``allow_partial`` accepts any count > 0);
- an unreadable / truncated / wrongly encoded file: ``CorruptFileError`` naming it
  (``skip_corrupt`` skips the pair and counts it);
- a label whose size differs from its image's (a few GTA5 pairs): resized with nearest
  neighbour to the image size, counted;
- a label id outside the dataset's taxonomy (or beyond 8 bits): stored as 255, counted. The tables
  mark 255 UNKNOWN too, so the pipeline still counts such pixels when it reads them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import itertools
import logging
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from synseg_jax.data import labels

log = logging.getLogger(__name__)

DATA_VERSION = "1.0.0"
# Archives read through libarchive (streamed, then extracted); zips are read in place.
STREAMED_ARCHIVES = (".rar", ".7z", ".tar", ".tar.gz", ".tgz")
MAX_LISTED = 10  # names listed in an error message or a summary before "... and N more"


class ManualDirError(FileNotFoundError):
    """The manual dir is missing, or holds none (or not all) of the files a builder expects."""


class CorruptFileError(OSError):
    """A file could not be read or decoded; the message names it."""


class IncompleteDatasetError(ValueError):
    """The manual dir holds a different number of examples than the official download."""


def _listing(items: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------------
# Files: plain files under the manual dir and members of the zip archives in it.


@dataclasses.dataclass(frozen=True)
class FileRef:
    """A file to read: a plain file (``archive`` None) or a member of a zip archive."""

    path: str  # absolute file path, or member name inside ``archive``
    archive: str | None = None

    def __str__(self) -> str:
        return f"{self.archive}!{self.path}" if self.archive else self.path

    def read(self) -> bytes:
        if self.archive is None:
            with open(self.path, "rb") as f:
                return f.read()
        return _open_zip(self.archive).read(self.path)


_ZIPS = threading.local()  # one ZipFile per archive and thread: reads never share a file offset


def _open_zip(path: str) -> zipfile.ZipFile:
    handles = getattr(_ZIPS, "handles", None)
    if handles is None:
        handles = _ZIPS.handles = {}
    if path not in handles:
        handles[path] = zipfile.ZipFile(path)
    return handles[path]


def scan(manual_dir: str) -> Iterator[tuple[str, FileRef]]:
    """(relative posix path, FileRef) for every file under ``manual_dir`` and every zip member.

    A member ``m`` of ``dir/NAME.zip`` gets the relative path ``dir/NAME/m``, i.e. where it would
    land if the archive were extracted into a folder of its own name; plain files come first, so
    that an extracted copy wins over the archive.
    """
    archives = []
    for root, dirs, files in os.walk(manual_dir, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, manual_dir).replace(os.sep, "/")
            if name.lower().endswith(".zip"):
                archives.append((rel, path))
            yield rel, FileRef(path)
    for rel, path in archives:
        try:
            with zipfile.ZipFile(path) as archive:
                members = [m.filename for m in archive.infolist() if not m.is_dir()]
        except (zipfile.BadZipFile, OSError) as err:
            raise CorruptFileError(f"Cannot read the zip archive {path}: {err}") from err
        stem = rel[: -len(".zip")]
        for member in members:
            yield f"{stem}/{member}", FileRef(member, archive=path)


def archive_stem(rel: str) -> str:
    """`dir/NAME.tar.gz` -> `dir/NAME`: where the archive's members would land if extracted."""
    for suffix in (".tar.gz", *(s for s in STREAMED_ARCHIVES if s != ".tar.gz"), ".zip"):
        if rel.lower().endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def _libarchive():
    try:
        import libarchive  # noqa: PLC0415 (only builders that meet a RAR/7z/tar need it)
    except (ImportError, OSError) as err:  # OSError: libarchive-c found no libarchive.so
        raise RuntimeError(
            f"Reading RAR, 7z and tar archives needs libarchive ({err}): `pip install "
            f"libarchive-c` and the system library (Debian/Ubuntu: `apt install libarchive13`), "
            f"or extract the archive into the manual dir yourself.") from err
    return libarchive


def extract_members(archive: str, dest: str, wanted: Callable[[str], bool],
                    progress: bool = False) -> int:
    """Extracts the files of ``archive`` for which ``wanted(member path)`` holds into ``dest``.

    Resumable: a member already there with its full size is not rewritten (each file is written
    to ``.part`` and renamed), and a finished archive leaves a stamp (its size and mtime), so a
    later call returns at once. Member paths that would leave ``dest`` are refused. Returns the
    number of members written in this call.
    """
    stat = os.stat(archive)
    stamp_path = os.path.join(dest, ".extracted")
    stamp = f"{stat.st_size} {int(stat.st_mtime)}\n"
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if f.read() == stamp:
                return 0
    libarchive = _libarchive()
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(desc=f"extracting {os.path.basename(archive)}", unit="file")
    written, member = 0, None
    try:
        with libarchive.file_reader(archive) as reader:
            for entry in reader:
                member = entry.pathname
                parts = [p for p in member.replace("\\", "/").split("/") if p not in ("", ".")]
                if not entry.isfile or not wanted("/".join(parts)):
                    continue
                if ".." in parts or os.path.isabs(member):
                    raise CorruptFileError(f"{archive}: member {member!r} would be written "
                                           f"outside {dest}; refusing to extract it")
                target = os.path.join(dest, *parts)
                if os.path.isfile(target) and os.path.getsize(target) == entry.size:
                    continue  # extracted by an earlier, interrupted call
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target + ".part", "wb") as f:
                    for block in entry.get_blocks():
                        f.write(block)
                os.replace(target + ".part", target)
                written += 1
                if bar is not None:
                    bar.update(1)
    except libarchive.ArchiveError as err:
        where = f" (at member {member})" if member else ""
        raise CorruptFileError(f"Cannot read the archive {archive}{where}: {err}") from err
    finally:
        if bar is not None:
            bar.close()
    os.makedirs(dest, exist_ok=True)
    with open(stamp_path, "w") as f:
        f.write(stamp)
    return written


# ------------------------------------------------------------------------------------------------
# Decoding and checks, per file.


def decode_rgb(data: bytes, ref: FileRef) -> tuple[bytes, tuple[int, int]]:
    """Fully decodes an image (so truncation is caught); returns (PNG bytes, (h, w)).

    An 8-bit RGB PNG is stored as it came; anything else is converted to RGB and re-encoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "PNG" and image.mode == "RGB":
                return data, (image.height, image.width)
            rgb = image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise CorruptFileError(f"Cannot decode image {ref}: {err}") from err
    return encode_png(np.asarray(rgb)), (rgb.height, rgb.width)


def decode_index_png(data: bytes, ref: FileRef) -> np.ndarray:
    """A label PNG whose pixel values are ids: palette indices ("P") or 8-bit grey ("L")."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ("P", "L"):
                raise ValueError(f"expected a palette or 8-bit greyscale PNG of ids, got mode "
                                 f"{image.mode!r}")
            return np.asarray(image)
    except Exception as err:
        raise CorruptFileError(f"Cannot decode label {ref}: {err}") from err


def png_bit_depth(data: bytes) -> int:
    """Bit depth from a PNG's IHDR chunk (signature 8 bytes, length 4, type 4, w 4, h 4, depth)."""
    if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return data[24]


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def clean_label(raw: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Raw ids (any int dtype) -> uint8 raw ids with every id outside ``table``'s taxonomy as 255.

    Returns the cleaned label and ``{unknown id: pixel count}``.
    """
    raw = np.asarray(raw)
    if raw.size and (raw.max() < 256 and raw.min() >= 0):
        ids = raw.astype(np.uint8)
        unknown = table[ids] == labels.UNKNOWN
    else:
        ids = np.clip(raw, 0, 255).astype(np.uint8)
        unknown = (raw < 0) | (raw > 255) | (table[ids] == labels.UNKNOWN)
    if not unknown.any():
        return ids, {}
    values, counts = np.unique(raw[unknown], return_counts=True)
    ids = np.where(unknown, np.uint8(labels.IGNORE_LABEL), ids)
    return ids, {int(v): int(c) for v, c in zip(values, counts)}


# ------------------------------------------------------------------------------------------------
# Statistics of one split, filled while its examples are generated.


@dataclasses.dataclass
class SplitStats:
    found: int = 0  # image/label pairs indexed
    written: int = 0
    unpaired: list[str] = dataclasses.field(default_factory=list)
    corrupt: list[str] = dataclasses.field(default_factory=list)  # "file: reason"
    resized_labels: list[str] = dataclasses.field(default_factory=list)  # example names
    unknown_ids: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    image_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    raw_histogram: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(labels.TABLE_SIZE, np.int64))

    @property
    def unknown_pixels(self) -> int:
        return int(sum(self.unknown_ids.values()))

    def train_id_histogram(self, table: np.ndarray) -> dict[str, int]:
        """Pixel counts per trainId name, plus "ignore" (255) and "unknown" (UNKNOWN ids)."""
        out = {name: 0 for name in labels.CLASS_NAMES}
        out["ignore"] = out["unknown"] = 0
        for raw_id in np.flatnonzero(self.raw_histogram):
            train_id = int(table[raw_id])
            key = ("unknown" if train_id == labels.UNKNOWN else
                   "ignore" if train_id == labels.IGNORE_LABEL else labels.CLASS_NAMES[train_id])
            out[key] += int(self.raw_histogram[raw_id])
        return out

    def to_dict(self, table: np.ndarray) -> dict:
        return {
            "examples": self.written,
            "pairs_found": self.found,
            "image_sizes": {f"{w}x{h}": n for (h, w), n in self.image_sizes.most_common()},
            "resized_labels": len(self.resized_labels),
            "resized_label_names": self.resized_labels[:MAX_LISTED],
            "corrupt_skipped": len(self.corrupt),
            "corrupt_files": self.corrupt[:MAX_LISTED],
            "unpaired_dropped": len(self.unpaired),
            "unpaired_files": self.unpaired[:MAX_LISTED],
            "unknown_label_pixels": self.unknown_pixels,
            "unknown_label_ids": {str(k): v for k, v in sorted(self.unknown_ids.items())},
            "train_id_pixels": self.train_id_histogram(table),
        }


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    image: FileRef
    label: FileRef


@dataclasses.dataclass(frozen=True)
class Processed:
    name: str
    image_png: bytes
    label_png: bytes
    image_size: tuple[int, int]
    resized: bool
    unknown_ids: dict[int, int]
    histogram: np.ndarray


@dataclasses.dataclass(frozen=True)
class Failed:
    name: str
    error: CorruptFileError


def bounded_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` in order on a thread pool, with at most ~4 x workers results pending.

    ``Executor.map`` would submit every item at once and buffer every result: tens of GB of
    encoded images when the consumer (the TFDS writer) is slower than the readers.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        window = itertools.islice(items, 4 * workers)
        pending = collections.deque(pool.submit(fn, x) for x in window)
        while pending:
            result = pending.popleft().result()
            for x in itertools.islice(items, 1):
                pending.append(pool.submit(fn, x))
            yield result


# ------------------------------------------------------------------------------------------------
# The builder base class.


class RealDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the GTA5 / SYNTHIA / Cityscapes builders; subclasses set the class constants.

    Args (besides TFDS's ``data_dir`` etc.), only needed to prepare, not to read:
      manual_dir: where the official download lies (extracted, archived, or both).
      extract_dir: where members of RAR / 7z / tar archives are extracted; default
        ``<data_dir>/downloads/extracted``.
      skip_corrupt: skip (and count) unreadable pairs instead of failing on the first.
      allow_partial: accept any non-zero count and drop unpaired files (tests, subsets).
      workers: reader threads; 0 = 2 per CPU core.
      progress: show a tqdm bar per split.
    """

    VERSION = tfds.core.Version(DATA_VERSION)
    RELEASE_NOTES = {DATA_VERSION: "Official download; labels stored as raw ids."}

    TITLE: str = ""  # human name for messages
    DOWNLOAD: str = ""  # where to get it (text)
    LAYOUT: str = ""  # the expected layout under the manual dir (text)
    LABEL_TABLE: np.ndarray = labels.CITYSCAPES_TABLE
    # TFDS split -> accepted counts of pairs in the official download.
    EXPECTED_COUNTS: dict[str, tuple[int, ...]] = {}
    IMAGE_PATTERN: re.Pattern = re.compile("")  # named groups: key, optional split
    LABEL_PATTERN: re.Pattern = re.compile("")
    SPLIT_DIRS: dict[str, str] = {}  # on-disk split folder -> TFDS split (when the layout has one)
    DESCRIPTION: str = ""

    def __init__(self, *, manual_dir: str | None = None, extract_dir: str | None = None,
                 skip_corrupt: bool = False, allow_partial: bool = False, workers: int = 0,
                 progress: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.manual_dir = manual_dir
        # TFDS keeps the data dir root (without <name>/<version>) in _data_dir_root.
        self.extract_dir = extract_dir or os.path.join(self._data_dir_root, "downloads",
                                                       "extracted")
        self.skip_corrupt = skip_corrupt
        self.allow_partial = allow_partial
        self.workers = workers or 2 * (os.cpu_count() or 1)
        self.progress = progress
        self.stats: dict[str, SplitStats] = {}

    # -- subclass hooks ---------------------------------------------------------------------------

    def decode_label(self, data: bytes, ref: FileRef) -> np.ndarray:
        """Label file bytes -> 2-D array of raw ids (any int dtype)."""
        return decode_index_png(data, ref)

    # -- TFDS -------------------------------------------------------------------------------------

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.Image(shape=(None, None, 1)),
                "name": tfds.features.Text(),
            }),
            description=self.DESCRIPTION,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data comes from the manual dir
        index = self.index()
        return {split: self._generate_examples(split, pairs) for split, pairs in index.items()}

    def _generate_examples(self, split: str, pairs: list[Pair]):
        stats = self.stats[split]
        results = bounded_map(self._process, pairs, self.workers)
        if self.progress:
            from tqdm import tqdm  # noqa: PLC0415 (only the prepare command draws bars)
            results = tqdm(results, total=len(pairs), desc=f"{self.name}/{split}", unit="img")
        for result in results:
            if isinstance(result, Failed):
                if not self.skip_corrupt:
                    raise CorruptFileError(
                        f"{result.error} (pass --skip_corrupt to skip such pairs and count them)")
                log.warning("Skipping %s: %s", result.name, result.error)
                stats.corrupt.append(str(result.error))
                continue
            stats.written += 1
            stats.image_sizes[result.image_size] += 1
            stats.raw_histogram += result.histogram
            stats.unknown_ids.update(result.unknown_ids)
            if result.resized:
                stats.resized_labels.append(result.name)
            yield result.name, {"image": result.image_png, "label": result.label_png,
                                "name": result.name}

    # -- reading ----------------------------------------------------------------------------------

    def _process(self, pair: Pair) -> Processed | Failed:
        try:
            try:
                image_bytes, label_bytes = pair.image.read(), pair.label.read()
            except (OSError, zipfile.BadZipFile, KeyError) as err:
                raise CorruptFileError(f"Cannot read {pair.image} or {pair.label}: {err}") from err
            image_png, (h, w) = decode_rgb(image_bytes, pair.image)
            raw = self.decode_label(label_bytes, pair.label)
        except CorruptFileError as err:
            return Failed(pair.name, err)
        ids, unknown = clean_label(raw, self.LABEL_TABLE)
        resized = ids.shape != (h, w)
        if resized:
            # A few GTA5 labels do not match their image: nearest keeps the ids valid.
            ids = np.asarray(Image.fromarray(ids).resize((w, h), Image.NEAREST))
        histogram = np.bincount(ids.ravel(), minlength=labels.TABLE_SIZE).astype(np.int64)
        return Processed(pair.name, image_png, encode_png(ids), (h, w),
                         resized, unknown, histogram)

    # -- indexing ---------------------------------------------------------------------------------

    def missing_message(self, problem: str) -> str:
        return (f"{problem}\n{self.TITLE} is expected in the manual dir {self.manual_dir!r} "
                f"with this layout:\n{self.LAYOUT}\nGet it from {self.DOWNLOAD}")

    def _split_of(self, match: re.Match) -> str | None:
        """The TFDS split a matched file belongs to (None: a split we do not build)."""
        if "split" not in match.re.groupindex:
            (only,) = self.EXPECTED_COUNTS
            return only
        return self.SPLIT_DIRS.get(match.group("split"))

    def example_name(self, match: re.Match) -> str:
        return match.group("key")

    def index(self) -> dict[str, list[Pair]]:
        """Pairs every image with its label, per split; checks counts. Fills ``self.stats``."""
        if not self.manual_dir or not os.path.isdir(self.manual_dir):
            raise ManualDirError(self.missing_message(
                f"The manual dir {self.manual_dir!r} does not exist."))
        found: dict[str, tuple[dict, dict]] = {s: ({}, {}) for s in self.EXPECTED_COUNTS}
        files = list(scan(self.manual_dir))
        archives = [rel for rel, _ in files if rel.lower().endswith(STREAMED_ARCHIVES)]
        for rel, ref in itertools.chain(files, self._streamed_archive_files(archives)):
            for kind, pattern in enumerate((self.IMAGE_PATTERN, self.LABEL_PATTERN)):
                match = pattern.search(rel)
                if match is None:
                    continue
                split = self._split_of(match)
                if split is not None:
                    found[split][kind].setdefault(self.example_name(match), ref)
        index = {}
        for split, (images, label_files) in found.items():
            if not images and not label_files:
                raise ManualDirError(self.missing_message(
                    f"No {self.TITLE} {split} images or labels found under "
                    f"{self.manual_dir!r}."))
            names = sorted(images.keys() & label_files.keys())
            unpaired = ([f"image {images[n]} (no label)" for n in sorted(images.keys() - names)] +
                        [f"label {label_files[n]} (no image)"
                         for n in sorted(label_files.keys() - names)])
            if unpaired and not self.allow_partial:
                raise ManualDirError(self.missing_message(
                    f"{len(unpaired)} {self.TITLE} {split} files lack their partner: "
                    f"{_listing(unpaired)} (pass --allow_partial to drop them)."))
            if not names:
                raise ManualDirError(self.missing_message(
                    f"No complete {self.TITLE} {split} image/label pair under "
                    f"{self.manual_dir!r}."))
            expected = self.EXPECTED_COUNTS[split]
            if len(names) not in expected and not self.allow_partial:
                raise IncompleteDatasetError(
                    f"{self.TITLE} {split}: found {len(names)} image/label pairs under "
                    f"{self.manual_dir!r}, but the official download has "
                    f"{' or '.join(f'{n:,}' for n in expected)}. Complete the download, or pass "
                    f"--allow_partial to build from what is there.")
            if unpaired:
                log.warning("%s %s: dropping %d unpaired files", self.TITLE, split, len(unpaired))
            index[split] = [Pair(n, images[n], label_files[n]) for n in names]
            self.stats[split] = SplitStats(found=len(names), unpaired=unpaired)
        return index

    def _wanted(self, rel: str) -> bool:
        return bool(self.IMAGE_PATTERN.search(rel) or self.LABEL_PATTERN.search(rel))

    def _streamed_archive_files(self, archives: list[str]) -> Iterator[tuple[str, FileRef]]:
        """Extracts the wanted members of each RAR / 7z / tar archive; yields them as files."""
        for rel in archives:
            stem = archive_stem(rel)
            dest = os.path.join(self.extract_dir, self.name, stem)
            written = extract_members(os.path.join(self.manual_dir, rel), dest,
                                      lambda member, s=stem: self._wanted(f"{s}/{member}"),
                                      self.progress)
            if written:
                log.info("Extracted %d files of %s into %s", written, rel, dest)
            for member_rel, ref in scan(dest):
                yield f"{stem}/{member_rel}", ref

    # -- reading side -----------------------------------------------------------------------------

    @classmethod
    def not_prepared_message(cls, data_dir: str, dataset: str) -> str:
        return (f"{cls.TITLE} is not prepared in the data dir {data_dir!r} (expected "
                f"{os.path.join(data_dir, cls.name, str(cls.VERSION))}). Download it from "
                f"{cls.DOWNLOAD}, then run:\n  python -m synseg_jax.prepare --dataset={dataset} "
                f"--manual_dir=DIR --data_dir={data_dir}\nwhere DIR holds:\n{cls.LAYOUT}\n"
                f"See docs/real_datasets.md.")
