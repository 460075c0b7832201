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

import argparse
import json
import logging
import os
import time

import runs
from runs import REAL
from synseg_jax import recipe


def run_seed(seed: int, args) -> dict:
    workdir = os.path.join(args.workdir, f"seed{seed}")
    result_path = os.path.join(workdir, "result.json")
    parts = ["demo", f"seed={seed}", f"data.data_dir={args.data_dir}"]
    if args.pretrain_workdir:
        parts.append(f"pretrain.workdir={args.pretrain_workdir}")
    config = runs.load_config("self_training.py", parts + [args.overrides])
    if not os.path.exists(result_path):
        config = recipe.ensure_pretrained(config, workdir)  # before the clock starts
        made_by = runs.provenance()
        start = time.time()
        recipe.run(config, workdir)
        with open(result_path, "w") as f:
            json.dump({"seed": seed, "wall_s": time.time() - start, "provenance": made_by}, f)
    with open(result_path) as f:
        record = json.load(f)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default <workdir>/tfds)")
    parser.add_argument("--pretrain_workdir", default="", help="a demo pretraining to reuse")
    parser.add_argument("--overrides", default="", help="extra key=value,... for every seed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.workdir = os.path.abspath(args.workdir)
    args.data_dir = os.path.abspath(args.data_dir or os.path.join(args.workdir, "tfds"))
    args.pretrain_workdir = os.path.abspath(args.pretrain_workdir) if args.pretrain_workdir else ""
    records = [run_seed(int(s), args) for s in args.seeds.split(",") if s]
    text = report(records)
    with open(os.path.join(args.workdir, "self_training.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
