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

A finished seed leaves `result.json` and is skipped when the command is run again. With
`--archive=benchmarks/results/realtime_da.json` the seeds' records (scores per class included)
are read from and added to that committed file, so the table can be finished in another session
and remade from it. Prints the markdown tables and writes them to <workdir>/realtime_da_table.md.
"""

from __future__ import annotations

import functools
import json
import os

import runs
from runs import HELD_OUT, REAL

CONFIG = "realtime_da.py"
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


def oracle_config(seed: int, args):
    """The recipe's source_aug stage alone, trained on real_train's labels."""
    config = runs.seed_config(CONFIG, seed, args)
    with config.unlocked():
        stage = config.stages.source_aug
        stage.overrides += ",data.source_split=real_train"
        config.stages = {"oracle": stage}
        config.stage_order = ("oracle",)
    return config


def run_seed(seed: int, args) -> dict:
    workdir = os.path.join(args.workdir, f"seed{seed}")
    record = runs.timed_recipe(runs.seed_config(CONFIG, seed, args), workdir)
    record["seed"] = seed
    record["scores"] = {stage: runs.last_scores(os.path.join(workdir, stage)) for stage in STAGES}
    with open(os.path.join(workdir, "pseudo", "report.json")) as f:
        record["pseudo"] = json.load(f)
    oracle_dir = os.path.join(args.workdir, f"oracle_seed{seed}")
    oracle = runs.timed_recipe(oracle_config(seed, args), oracle_dir)
    record["scores"]["oracle"] = runs.last_scores(os.path.join(oracle_dir, "oracle"))
    record["oracle_wall_s"] = oracle["wall_s"]
    return record


# Each component against the stage it is added to (Tables 1 and 2), and the whole recipe.
COMPARISONS = [("source_aug", "source"), ("adv", "source_aug"), ("fda_b001", "adv"),
               ("fda_b005", "adv"), ("mbt", "fda_b001"), ("ssl", "fda_b001"), ("ssl", "source")]


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
    wall = runs.mean_wall(records) + " (per seed: " + " / ".join(
        "resumed" if r["wall_s"] is None else f"{r['wall_s']:.0f} s" for r in records) + ")"
    by_stage = {stage: [{"seed": r["seed"], "scores": r["scores"][stage]} for r in records]
                for stage in (*STAGES, "oracle")}
    made_by = sorted({r["provenance"] for r in records})
    return ("Real-time DA on the minicity demo (configs/realtime_da.py:demo; mIoU over 19 "
            "classes, last step of each stage)\n"
            + "".join(f"runs made with: {p}\n" for p in made_by) + "\n" + "\n".join(lines)
            + "\n\nPaired differences on real_val (same seed):\n\n"
            + runs.paired_table(by_stage, COMPARISONS)
            + f"\n\nWall time of the whole recipe (7 stages scored, oracle not included): {wall}\n"
            + "\nMBT's pseudo-labels of real_train against its labels (mean over seeds):\n\n"
            + runs.pseudo_table([r["pseudo"] for r in records])
            + "\n\nPer-class IoU (%) on real_val, mean over seeds:\n\n"
            + runs.per_class_table(by_stage) + "\n")


def main():
    args = runs.recipe_args(__doc__.split("\n")[0])
    records = runs.archived_records(
        args.archive, {f"seed{s}": functools.partial(run_seed, s, args) for s in args.seeds})
    text = report(records)
    runs.write_report(args.workdir, "realtime_da_table.md", text)


if __name__ == "__main__":
    main()
