"""TSG / SSI ablations (the texture/shape generalisation paper's Tables 2, 3) on the minicity demo.

    python benchmarks/tsg_ssi_ablation.py --workdir=runs/tsg_ssi_ablation    # all rows, seed 0
    python benchmarks/tsg_ssi_ablation.py --workdir=... --seeds=0,1,2 --rows=baseline,both
    python benchmarks/tsg_ssi_ablation.py --workdir=... --overrides=train.steps=4,train.eval_every=0
    python benchmarks/tsg_ssi_ablation.py --workdir=runs/tsg_ssi_pretrained \\
        --overrides=init.seg.path=demo        # the demo-pretrained variant

Rows: Table 2 -- baseline (no TSG, no SSI: source-only with the same recipe), TSG only, SSI only,
both; Table 3 -- both modules with lambda 1.0, 1.25, 1.5, 1.75, 2.0 (lambda 1.5 is the "both" run,
trained once). Every row is `configs/tsg_ssi.py:demo` plus model / method keys, trained by
`synseg_jax.train` (the code path of `python -m synseg_jax.main`), so all rows share data and seeds;
the demo trains from scratch, as the paper. Scores are those of the last step (no checkpoint
selection): minicity real_val (the unseen real domain), the held-out 10% of sim (in-domain) and
sim_topdown (the other synthetic domain, never trained on). Wall time is the training +
evaluation of one run.

Each finished run leaves `result.json` in its workdir and is skipped when the command is run
again. Prints the markdown tables (per row, per class on real_val and on sim_topdown) and writes
them to <workdir>/tsg_ssi_ablation.md. About 10 minutes per run on a 2-core CPU: the full table
(8 runs) takes well over an hour per seed.
"""

from __future__ import annotations

import functools
import os

import runs

CONFIG = "tsg_ssi.py"
TOPDOWN = "minicity/sim_topdown[:25%]"  # the demo's never-seen synthetic domain

# name: (description, TSG, SSI, lambda, the paper's GTA5 -> Cityscapes mIoU, overrides)
# The paper's numbers (its Tables 2 and 3, ResNet-50 from scratch) are for shape, not targets.
ROWS = {
    "baseline": ("baseline (source-only)", "", "", "", "26.21", "model.tsg=(),model.ssi=()"),
    "tsg": ("TSG only", "1-4", "", "", "31.72", "model.ssi=()"),
    "ssi": ("SSI only", "", "1-3", "1.5", "32.23", "model.tsg=()"),
    "both": ("TSG + SSI", "1-4", "1-3", "1.5", "34.24", ""),
    "lambda_1.0": ("TSG + SSI, lambda 1.0", "1-4", "1-3", "1.0", "32.68",
                   "method.lambda_boundary=1.0"),
    "lambda_1.25": ("TSG + SSI, lambda 1.25", "1-4", "1-3", "1.25", "33.43",
                    "method.lambda_boundary=1.25"),
    "lambda_1.5": ("TSG + SSI, lambda 1.5", "1-4", "1-3", "1.5", "34.24", ""),
    "lambda_1.75": ("TSG + SSI, lambda 1.75", "1-4", "1-3", "1.75", "33.34",
                    "method.lambda_boundary=1.75"),
    "lambda_2.0": ("TSG + SSI, lambda 2.0", "1-4", "1-3", "2.0", "32.59",
                   "method.lambda_boundary=2.0"),
}
SAME_RUN = {"lambda_1.5": "both"}  # identical configs share one run


# Table 2's questions (does each module help, do they add up?) and Table 3's (lambda against
# the paper's 1.5), each a paired difference on the same seeds.
COMPARISONS = [("tsg", "baseline"), ("ssi", "baseline"), ("both", "baseline"), ("both", "tsg"),
               ("both", "ssi")] + [(row, "both") for row in ROWS
                                   if row.startswith("lambda_") and row not in SAME_RUN]


def config_for(row: str, seed: int, data_dir: str, overrides: str):
    parts = ["demo", f"seed={seed}", ROWS[row][5]]
    if data_dir:
        parts.append(f"data.data_dir={data_dir}")
    return runs.load_config(CONFIG, parts + [overrides])


def run_one(row: str, seed: int, args) -> dict:
    workdir = os.path.join(args.workdir, f"{SAME_RUN.get(row, row)}_seed{seed}")
    record = runs.run_once(config_for(row, seed, args.data_dir, args.overrides), workdir,
                           {"row": row, "seed": seed})
    return {**record, "row": row}


def table(records: list[dict]) -> str:
    lines = ["| setting | TSG | SSI | lambda | paper GTA5->CS | seeds | steps | real_val mIoU "
             "(mean ± std) | per seed | held-out sim mIoU | wall time / run | sim_topdown mIoU |",
             "|---|---|---|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for row, rs in runs.by_row(records).items():
        desc, tsg, ssi, lam, paper, _ = ROWS[row]
        topdown = [r["scores"][TOPDOWN]["miou"] for r in rs if TOPDOWN in r["scores"]]
        lines.append(f"| {desc} | {tsg or '-'} | {ssi or '-'} | {lam or '-'} | {paper} | "
                     f"{runs.score_cells(rs)} | "
                     f"{runs.mean_std(topdown) if topdown else '-'} |")
    return "\n".join(lines)


def main():
    args, rows, seeds = runs.ablation_args(__doc__.split("\n")[0], ROWS)
    records = runs.archived_records(args.archive, {
        f"{row}_seed{seed}": functools.partial(run_one, row, seed, args)
        for row in rows for seed in seeds})
    by_row = runs.by_row(records)
    text = ("TSG / SSI ablations on the minicity demo (configs/tsg_ssi.py:demo, from scratch; "
            "mIoU over 19 classes, last step)\n\n" + table(records)
            + "\n\nPaired differences on real_val (same seed):\n\n"
            + runs.paired_table(by_row, COMPARISONS)
            + "\n\nPaired differences on sim_topdown (same seed):\n\n"
            + runs.paired_table(by_row, COMPARISONS, TOPDOWN)
            + "\n\nPer-class IoU (%) on real_val, mean over seeds:\n\n"
            + runs.per_class_table(by_row)
            + "\n\nPer-class IoU (%) on sim_topdown (never trained on), mean over seeds:\n\n"
            + runs.per_class_table(by_row, TOPDOWN) + "\n")
    runs.write_report(args.workdir, "tsg_ssi_ablation.md", text)


if __name__ == "__main__":
    main()
