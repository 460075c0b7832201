"""Prepares a real dataset from its official download into TFDS shards, once.

    python -m synseg_jax.prepare --dataset=gta5 --manual_dir=/downloads/gta5 --data_dir=/data/tfds

The manual dir holds the official download, extracted or as the original zips (see
docs/real_datasets.md for each dataset's layout). The command checks the number of examples
against the official count (``--allow_partial`` accepts a subset), shows a progress bar, and
prints (and stores next to the shards as ``prepare_summary.json``) a summary: examples per split,
image sizes, labels resized to their image, skipped corrupt pairs, label ids outside the taxonomy,
and the pixel histogram over trainIds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from synseg_jax import paths  # noqa: E402
from synseg_jax.data import datasets, labels  # noqa: E402
from synseg_jax.data.builders import common  # noqa: E402

SUMMARY_FILE = "prepare_summary.json"


def _folders_a_build_makes(version_dir: str, data_dir: str) -> list[str]:
    """The folders TFDS creates for a build, deepest first: the dataset's version folder and its
    parents up to the data dir, and the data dir's downloads/extracted."""
    folders = []
    d = os.path.abspath(version_dir)
    root = os.path.abspath(data_dir)
    while d.startswith(root + os.sep):
        folders.append(d)
        d = os.path.dirname(d)
    folders += [os.path.join(root, "downloads", "extracted"), os.path.join(root, "downloads")]
    return folders


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:  # deepest first, so a parent is empty once its children are gone
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty (or already gone): someone else's data, kept


def prepare(dataset: str, manual_dir: str, data_dir: str | None = None, *,
            skip_corrupt: bool = False, allow_partial: bool = False, workers: int = 0,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Builds `dataset` from `manual_dir` into `data_dir`; returns the summary dict.

    A dataset already prepared there is left alone (its stored summary is returned) unless
    `overwrite`. Raises common.ManualDirError, CorruptFileError or IncompleteDatasetError on bad
    input (see synseg_jax/data/builders/common.py).
    """
    if dataset not in datasets.REAL_BUILDERS:
        raise ValueError(f"Unknown dataset {dataset!r} to prepare; expected one of "
                         f"{sorted(datasets.REAL_BUILDERS)} (minicity is rendered on first use)")
    tf.config.set_visible_devices([], "GPU")
    data_dir = data_dir or datasets.default_data_dir()
    cls = datasets.REAL_BUILDERS[dataset]
    builder = cls(data_dir=data_dir, manual_dir=manual_dir, skip_corrupt=skip_corrupt,
                  allow_partial=allow_partial, workers=workers, progress=progress)
    summary_path = os.path.join(builder.data_dir, SUMMARY_FILE)
    if builder.is_prepared() and not overwrite:
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        else:
            summary = {"dataset": dataset, "data_dir": builder.data_dir,
                       "splits": {s: {"examples": i.num_examples}
                                  for s, i in builder.info.splits.items()}}
        summary["already_prepared"] = True
        return summary
    if progress:
        tfds.disable_progress_bar()  # ours counts images; TFDS's would draw a second bar
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite else
            tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    made = _folders_a_build_makes(builder.data_dir, data_dir)
    made = [d for d in made if not os.path.exists(d)]
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(download_mode=mode))
    except BaseException:
        _remove_empty(made)  # a failed build leaves no empty dataset folders behind
        raise
    splits = {}
    for split, stats in builder.stats.items():
        stored = builder.info.splits[split].num_examples
        if stored != stats.written:
            raise RuntimeError(f"{dataset}/{split}: wrote {stats.written} examples but the "
                               f"prepared split holds {stored}")
        splits[split] = stats.to_dict(cls.LABEL_TABLE)
        expected = cls.EXPECTED_COUNTS[split]
        splits[split]["official_count"] = stored in expected
        splits[split]["expected"] = list(expected)
    summary = {"dataset": dataset, "data_dir": builder.data_dir, "manual_dir": manual_dir,
               "splits": splits}
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _fraction_line(pixels: dict[str, int]) -> str:
    total = sum(pixels.values())
    if not total:
        return "no labelled pixels"
    return ", ".join(f"{name} {100.0 * n / total:.2f}%" for name, n in pixels.items() if n)


def format_summary(summary: dict) -> str:
    """The summary as the human-readable text the command prints."""
    state = "already prepared" if summary.get("already_prepared") else "prepared"
    lines = [f"{summary['dataset']} {state} in {summary['data_dir']}"]
    for split, s in summary["splits"].items():
        lines.append(f"  {split}: {s['examples']:,} examples")
        if "pairs_found" not in s:
            continue  # a dataset prepared without a stored summary
        if not s["official_count"]:
            lines.append(f"    NOTE: not the official count "
                         f"({' or '.join(f'{n:,}' for n in s['expected'])})")
        sizes = ", ".join(f"{size} x{n:,}" for size, n in s["image_sizes"].items())
        lines.append(f"    image sizes (WxH): {sizes}")
        lines.append(f"    labels resized (nearest) to their image's size: {s['resized_labels']:,}"
                     + (f" ({', '.join(s['resized_label_names'])}"
                        f"{', ...' if s['resized_labels'] > len(s['resized_label_names']) else ''})"
                        if s["resized_labels"] else ""))
        lines.append(f"    corrupt pairs skipped: {s['corrupt_skipped']:,}")
        for entry in s["corrupt_files"]:
            lines.append(f"      {entry}")
        if s["unpaired_dropped"]:
            lines.append(f"    unpaired files dropped: {s['unpaired_dropped']:,}")
        unknown = s["unknown_label_ids"]
        lines.append(f"    label pixels with ids outside the taxonomy (stored as "
                     f"{labels.IGNORE_LABEL}): {s['unknown_label_pixels']:,}"
                     + (f" (ids: {', '.join(unknown)})" if unknown else ""))
        lines.append(f"    trainId pixel histogram: {_fraction_line(s['train_id_pixels'])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m synseg_jax.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(datasets.REAL_BUILDERS))
    parser.add_argument("--manual_dir", required=True,
                        help="folder holding the official download (extracted or zipped)")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data dir to write to (default: $SYNSEG_DATA_DIR or "
                             "~/tensorflow_datasets)")
    parser.add_argument("--skip_corrupt", action="store_true",
                        help="skip and count unreadable pairs instead of stopping at the first")
    parser.add_argument("--allow_partial", action="store_true",
                        help="accept a count other than the official one and drop unpaired files")
    parser.add_argument("--workers", type=int, default=0,
                        help="reader threads (default: 2 per CPU core)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even if the dataset is already prepared in --data_dir")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.manual_dir, args.data_dir = paths.absolute(args.manual_dir), paths.absolute(args.data_dir)
    try:
        summary = prepare(args.dataset, args.manual_dir, args.data_dir,
                          skip_corrupt=args.skip_corrupt, allow_partial=args.allow_partial,
                          workers=args.workers, overwrite=args.overwrite,
                          progress=not args.no_progress)
    except (common.ManualDirError, common.CorruptFileError, common.IncompleteDatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
