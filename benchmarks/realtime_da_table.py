"""Real-time DA's Tables 1 and 2 as one table on the minicity demo: every stage of the recipe
(configs/realtime_da.py:demo) and the oracle, per seed.

    python benchmarks/realtime_da_table.py --workdir=runs/realtime_da --seeds=0,1,2 \\
        [--data_dir=runs/calibration/tfds] [--pretrain_workdir=runs/calibration/pretrain_...]

Each seed runs the whole recipe with `recipe.run` (the code path of `python -m synseg_jax.main`)
in <workdir>/seed<N>: source-only without and with augmentation, adversarial, adversarial + FDA
at beta 0.01 and 0.05, their multi-band ensemble (MBT), MBT's pseudo-labels and the self-training
round. The oracle (<workdir>/oracle_seed<N>) is the augmented source-only training with
real_train's labels in place of the source's, the same steps. Every score is the last step's
(no selection on the target). The wall time is the whole recipe's; a seed resumed after a kill
reports none (its clock would miss the stages done before). The demo pretraining and the
minicity build are shared when their folders are given, and are not in the wall time.

A finished seed leaves `result.json` and is skipped when the command is run again. Prints the
markdown tables and writes them to <workdir>/realtime_da_table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import runs
from runs import HELD_OUT, REAL
from synseg_jax import recipe

# The recipe's scored stages, in the paper's order, with the table's words for them.
STAGES = {
    "source": "source only, no augmentation",
    "source_aug": "source only + augmentation",
    "adv": "+ adversarial",
    "fda_b001": "+ adversarial + FDA (beta 0.01)",
    "fda_b005": "+ adversarial + FDA (beta 0.05)",
    "mbt": "MBT (mean softmax of the two FDA models)",
    "ssl": "MBT pseudo-labels + self-training (from beta 0.01)",
}


def seed_config(seed: int, args, extra: str = ""):
    parts = ["demo", f"seed={seed}", f"data.data_dir={args.data_dir}", args.overrides, extra]
    if args.pretrain_workdir:
        parts.append(f"pretrain.workdir={args.pretrain_workdir}")
    return runs.load_config("realtime_da.py", parts)


def oracle_config(seed: int, args):
    """The recipe's source_aug stage alone, trained on real_train's labels."""
    config = seed_config(seed, args)
    with config.unlocked():
        stage = config.stages.source_aug
        stage.overrides += ",data.source_split=real_train"
        config.stages = {"oracle": stage}
        config.stage_order = ("oracle",)
    return config


def timed_recipe(config, workdir: str) -> dict:
    """Runs the recipe in `workdir` unless its result.json exists; returns that record."""
    result_path = os.path.join(workdir, "result.json")
    if not os.path.exists(result_path):
        config = recipe.ensure_pretrained(config, workdir)  # before the clock starts
        resumed = [name for name in recipe.stage_names(config)
                   if os.path.exists(os.path.join(workdir, name, recipe.DONE))]
        made_by = runs.provenance()
        start = time.time()
        recipe.run(config, workdir)
        record = {"wall_s": None if resumed else time.time() - start, "resumed_after": resumed,
                  "provenance": made_by, "steps": config.train.steps}
        with open(result_path, "w") as f:
            json.dump(record, f, indent=2)
    with open(result_path) as f:
        return json.load(f)


def run_seed(seed: int, args) -> dict:
    workdir = os.path.join(args.workdir, f"seed{seed}")
    record = timed_recipe(seed_config(seed, args), workdir)
    record["seed"] = seed
    record["scores"] = {stage: runs.last_scores(os.path.join(workdir, stage)) for stage in STAGES}
    with open(os.path.join(workdir, "pseudo", "report.json")) as f:
        record["pseudo"] = json.load(f)
    oracle_dir = os.path.join(args.workdir, f"oracle_seed{seed}")
    oracle = timed_recipe(oracle_config(seed, args), oracle_dir)
    record["scores"]["oracle"] = runs.last_scores(os.path.join(oracle_dir, "oracle"))
    record["oracle_wall_s"] = oracle["wall_s"]
    return record


def _mean(values: list[float]) -> str:
    return runs.mean_std(values) if values else "-"


def report(records: list[dict]) -> str:
    seeds = ",".join(str(r["seed"]) for r in records)
    lines = ["| stage | setting | seeds | real_val mIoU-19 (mean ± std) | per seed | "
             "held-out sim mIoU-19 | gain over source-only + aug |",
             "|---|---|---|---:|---|---:|---:|"]
    base = [r["scores"]["source_aug"][REAL]["miou"] for r in records]
    for stage, words in {**STAGES, "oracle": "oracle (real_train labels, + augmentation)"}.items():
        real = [r["scores"][stage][REAL]["miou"] for r in records]
        sim = [r["scores"][stage][HELD_OUT]["miou"] for r in records
               if HELD_OUT in r["scores"][stage]]
        gain = [a - b for a, b in zip(real, base)]
        lines.append(f"| {stage} | {words} | {seeds} | {runs.mean_std(real)} | "
                     f"{' / '.join(f'{v:.2f}' for v in real)} | {_mean(sim)} | "
                     f"{'' if stage == 'source_aug' else runs.mean_std(gain)} |")
    walls = [r["wall_s"] for r in records if r["wall_s"] is not None]
    wall = (f"{statistics.mean(walls):.0f} s (mean of {len(walls)} seeds: "
            + " / ".join(f"{w:.0f}" for w in walls) + ")" if walls else "resumed runs only")
    columns = {stage: [{"scores": r["scores"][stage]} for r in records]
               for stage in (*STAGES, "oracle")}
    made_by = sorted({r["provenance"] for r in records})
    return ("Real-time DA on the minicity demo (configs/realtime_da.py:demo; mIoU over 19 "
            "classes, last step of each stage)\n"
            + "".join(f"runs made with: {p}\n" for p in made_by) + "\n" + "\n".join(lines)
            + f"\n\nWall time of the whole recipe (7 stages scored, oracle not included): {wall}\n"
            + "\nMBT's pseudo-labels of real_train against its labels (mean over seeds):\n\n"
            + runs.pseudo_table([r["pseudo"] for r in records])
            + "\n\nPer-class IoU (%) on real_val, mean over seeds:\n\n"
            + runs.per_class_table(columns) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default <workdir>/tfds)")
    parser.add_argument("--pretrain_workdir", default="", help="a demo pretraining to reuse")
    parser.add_argument("--overrides", default="", help="extra key=value,... for every run")
    args = parser.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    args.data_dir = os.path.abspath(args.data_dir or os.path.join(args.workdir, "tfds"))
    args.pretrain_workdir = os.path.abspath(args.pretrain_workdir) if args.pretrain_workdir else ""
    records = [run_seed(int(s), args) for s in args.seeds.split(",") if s]
    text = report(records)
    runs.write_report(args.workdir, "realtime_da_table.md", text)


if __name__ == "__main__":
    main()
