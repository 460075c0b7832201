"""The self-training recipe (configs/self_training.py:demo) on minicity, per seed: the real_val
mIoU of its source stage and of its adapted stage, the pseudo-labels' per-class precision and
coverage, and the wall time of the whole recipe.

    python benchmarks/self_training.py --workdir=runs/self_training --seeds=0,1,2 \\
        [--data_dir=runs/calibration/tfds] [--pretrain_workdir=runs/calibration/pretrain_...]

Each seed runs `recipe.run` (the code path of `python -m synseg_jax.main`) in <workdir>/seed<N>;
a finished seed leaves `result.json` and is skipped when the command is run again, and an
interrupted one resumes in the stage it was in. The demo pretraining and the minicity build are
shared with the other benchmarks when their folders are given, and are not in the wall time.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import runs
from runs import REAL


def run_seed(seed: int, args) -> dict:
    workdir = os.path.join(args.workdir, f"seed{seed}")
    config = runs.seed_config("self_training.py", seed, args)
    record = {**runs.timed_recipe(config, workdir), "seed": seed}
    for stage in ("source", "adapt"):
        record[stage] = {**record, "row": stage, "steps": config.train.steps,
                         "scores": runs.last_scores(os.path.join(workdir, stage))}
    with open(os.path.join(workdir, "pseudo", "report.json")) as f:
        record["pseudo"] = json.load(f)
    return record


def report(records: list[dict]) -> str:
    lines = ["| stage | seeds | steps | real_val mIoU-19 (mean ± std) | per seed | held-out sim "
             "mIoU-19 | wall time |", "|---|---|---:|---:|---|---:|---:|"]
    for stage, desc in (("source", "source (source-only)"),
                        ("adapt", "adapt (source + pseudo-labelled target)")):
        rs = [dict(r[stage], wall_s=r["wall_s"]) for r in records]
        lines.append(f"| {desc} | {runs.score_cells(rs)} |")
    gains = [r["adapt"]["scores"][REAL]["miou"] - r["source"]["scores"][REAL]["miou"]
             for r in records]
    made_by = sorted({r["provenance"] for r in records})
    columns = {"source": [r["source"] for r in records], "adapt": [r["adapt"] for r in records]}
    return ("self-training (configs/self_training.py:demo; mIoU over 19 classes, last step of "
            "each stage; wall time = the whole recipe)\n"
            + "".join(f"runs made with: {p}\n" for p in made_by) + "\n" + "\n".join(lines)
            + "\n\n- gain of adapt over source, per seed: "
            + " / ".join(f"{g:+.2f}" for g in gains) + f" (mean {runs.mean_std(gains)})\n"
            + "\nPseudo-labels of real_train against its labels (mean over seeds):\n\n"
            + runs.pseudo_table([r["pseudo"] for r in records])
            + "\n\nPer-class IoU (%) on real_val, mean over seeds:\n\n"
            + runs.per_class_table(columns) + "\n")


def main():
    args = runs.recipe_args(__doc__.split("\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    records = runs.archived_records(
        args.archive, {f"seed{s}": functools.partial(run_seed, s, args) for s in args.seeds})
    text = report(records)
    runs.write_report(args.workdir, "self_training.md", text)


if __name__ == "__main__":
    main()
