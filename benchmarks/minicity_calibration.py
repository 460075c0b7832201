"""minicity's calibration table: source-only, the oracle, and source-only with each domain-gap
knob turned off in turn, on the demo model and budget.

    python benchmarks/minicity_calibration.py --workdir=runs/calibration                 # all
    python benchmarks/minicity_calibration.py --workdir=... --seeds=0,1,2 --knob_seeds=0
    python benchmarks/minicity_calibration.py --workdir=... --rows=source_only,oracle

Rows: `source_only` (configs/source_only.py:demo: sim[:90%] -> real_val, with held-out sim),
`oracle` (the same config trained on real_train's labels), and `no_<knob>` for each knob of
synseg_jax/data/minicity/gap.py (source-only on a minicity whose real splits lack that factor).
Every run goes through the recipe (the code path of `python -m synseg_jax.main`). The minicity
build and the demo pretraining (one for every run) are timed on their own before any run starts.

Finished runs leave `result.json` in their workdir and are skipped when the command is run
again; with --archive=benchmarks/results/calibration.json their records are also kept there (and
not rerun) across sessions, whose workdirs do not survive. Prints the tables and writes them to <workdir>/calibration.md.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import time

import runs
from runs import REAL
from synseg_jax import recipe
from synseg_jax.data import minicity
from synseg_jax.inputs import minicity_options
from synseg_jax.data import datasets

ROWS = {"source_only": ("source-only", "sim[:90%]", ""),
        "oracle": ("oracle", "real_train", "data.source_split=real_train,data.extra_eval_splits=()")}
ROWS.update({f"no_{knob}": (f"source-only, no {knob}", "sim[:90%]",
                            f'data.minicity.gap_off=("{knob}",)') for knob in minicity.KNOBS})


def config_for(row: str, seed: int, data_dir: str, overrides: str):
    return runs.load_config("source_only.py",
                            ["demo", f"seed={seed}", ROWS[row][2], f"data.data_dir={data_dir}",
                             overrides])


def build(config) -> float:
    """Renders the scene splits of the config's minicity (and the objects) if missing."""
    start = time.time()
    options = minicity_options(config.data)
    for split in ("sim", "objects"):
        datasets.open_split("minicity", split, data_dir=config.data.data_dir,
                            minicity_options=options)
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of source_only and oracle")
    parser.add_argument("--knob_seeds", default="0", help="seeds of the no_<knob> rows")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default <workdir>/tfds)")
    parser.add_argument("--overrides", default="", help="extra key=value,... for every run")
    runs.add_archive_flag(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    knob_seeds = [int(s) for s in args.knob_seeds.split(",") if s]
    workdir = os.path.abspath(args.workdir)
    data_dir = os.path.abspath(args.data_dir or os.path.join(workdir, "tfds"))
    os.makedirs(workdir, exist_ok=True)

    timings = []
    fresh = not os.path.exists(data_dir)
    seconds = build(config_for("source_only", seeds[0], data_dir, args.overrides))
    if fresh:
        timings.append(f"building minicity (all splits, fresh data dir): {seconds:.0f} s")
    jobs = [(row, seed) for row in rows
            for seed in (knob_seeds if row.startswith("no_") else seeds)]
    # One demo pretraining serves every row and seed (config pretrain.seed); time it alone.
    config = config_for("source_only", seeds[0], data_dir, args.overrides)
    backbone_dir = recipe.demo_backbone_dir(config, os.path.join(workdir, "any_run"))
    was_there, start = os.path.isdir(backbone_dir), time.time()
    recipe.ensure_pretrained(config, os.path.join(workdir, "any_run"))
    if not was_there:
        timings.append(f"demo pretraining on objects: {time.time() - start:.0f} s")
    for row in {row for row, _ in jobs if row.startswith("no_")}:
        build(config_for(row, knob_seeds[0], data_dir, args.overrides))

    records = runs.archived_records(args.archive, {
        f"{row}_seed{seed}": functools.partial(
            runs.run_once, config_for(row, seed, data_dir, args.overrides),
            os.path.join(workdir, f"{row}_seed{seed}"), {"row": row, "seed": seed})
        for row, seed in jobs})
    text = report(records, timings)
    with open(os.path.join(workdir, "calibration.md"), "w") as f:
        f.write(text)
    print(text)


def report(records: list[dict], timings: list[str]) -> str:
    grouped = runs.by_row(records)
    lines = ["| run | trained on | seeds | steps | real_val mIoU-19 (mean ± std) | per seed | "
             "held-out sim mIoU-19 | wall time / run |", "|---|---|---|---:|---:|---|---:|---:|"]
    for row, rs in grouped.items():
        desc, trained_on, _ = ROWS[row]
        lines.append(f"| {desc} | {trained_on} | {runs.score_cells(rs)} |")
    notes = []
    if "source_only" in grouped and "oracle" in grouped:
        so = statistics.mean(r["scores"][REAL]["miou"] for r in grouped["source_only"])
        oracle = statistics.mean(r["scores"][REAL]["miou"] for r in grouped["oracle"])
        notes.append(f"source-only / oracle on real_val: {so / oracle:.3f}")
    if "oracle" in grouped:
        per_class = grouped["oracle"][0]["scores"][REAL]["per_class"]
        means = {k: statistics.mean(r["scores"][REAL]["per_class"][k] for r in grouped["oracle"])
                 for k in per_class}
        low = [k for k, v in means.items() if v <= 1.0]
        notes.append(f"oracle classes above 1% IoU: {len(means) - len(low)} of {len(means)}"
                     + (f" (not: {', '.join(low)})" if low else ""))
    columns = {ROWS[row][0]: rs for row, rs in grouped.items()}
    made_by = sorted({r.get("provenance", "") for r in records} - {""}) or [runs.provenance()]
    return ("minicity calibration (configs/source_only.py:demo; mIoU over 19 classes, last step)\n"
            + "".join(f"runs made with: {p}\n" for p in made_by) + "\n" + "\n".join(lines) + "\n\n"
            + "".join(f"- {n}\n" for n in timings + notes)
            + "\nPer-class IoU (%) on real_val, mean over seeds:\n\n"
            + runs.per_class_table(columns) + "\n")


if __name__ == "__main__":
    main()
