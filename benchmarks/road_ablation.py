"""ROAD's ablations (Table 1, Fig. 4, Fig. 6 of Chen et al., CVPR 2018) on the minicity demo.

    python benchmarks/road_ablation.py --workdir=runs/road_ablation            # all rows, seed 0
    python benchmarks/road_ablation.py --workdir=... --seeds=0,1,2 --rows=nonadapt,road_3x3
    python benchmarks/road_ablation.py --workdir=... --overrides=train.steps=4,train.eval_every=0

Rows: NonAdapt (both modules off), the three ways to keep real-image filters (frozen first layers,
source distillation, target-guided distillation; all without spt, as in Fig. 4), spatial-aware
adaptation alone on 1x1 / 2x1 / 2x2 / 3x3 regions (Fig. 6), and full ROAD (Table 1). Every row is
`configs/road.py:demo` plus method keys, trained by `synseg_jax.recipe` (the code path of
`python -m synseg_jax.main`), so all rows share data, seeds and the demo-pretrained backbone (made
once for all rows and seeds, before any timing starts). Wall time is the training + evaluation of one run.

Each finished run leaves `result.json` in its workdir and is skipped when the command is run
again. Prints the markdown table and writes it to <workdir>/road_ablation.md. The full table takes
over an hour on a 2-core CPU (about 9 rows x ~10 minutes per seed).
"""

from __future__ import annotations

import functools
import os

import runs
from synseg_jax import recipe
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "road.py")

# name: (description, dist, spt, grid, method / optim overrides)
ROWS = {
    "nonadapt": ("NonAdapt (source only)", "", "", "", "method.dist=False,method.spt=False"),
    "frozen": ("frozen first layers (Fig. 4 fr)", "", "", "",
               "method.dist=False,method.spt=False,optim.seg.frozen_prefixes={frozen}"),
    "source_dist": ("source distillation (Fig. 4 sd)", "source", "", "",
                    "method.spt=False,method.dist_domain=source"),
    "dist": ("target-guided distillation (dst)", "target", "", "", "method.spt=False"),
    "spt_1x1": ("spatial-aware, 1x1 (global)", "", "yes", "1x1",
                "method.dist=False,method.grid=(1,1)"),
    "spt_2x1": ("spatial-aware, 2x1", "", "yes", "2x1", "method.dist=False,method.grid=(2,1)"),
    "spt_2x2": ("spatial-aware, 2x2", "", "yes", "2x2", "method.dist=False,method.grid=(2,2)"),
    "spt_3x3": ("spatial-aware, 3x3 (spt)", "", "yes", "3x3", "method.dist=False,method.grid=(3,3)"),
    "road_3x3": ("ROAD: dst + spt 3x3", "target", "yes", "3x3", "method.grid=(3,3)"),
}


# Paired differences the paper's questions turn on: does each module help over NonAdapt, and are
# the two complementary (ROAD against each module alone)?
COMPARISONS = [(row, "nonadapt") for row in ROWS if row != "nonadapt"] + [
    ("road_3x3", "dist"), ("road_3x3", "spt_3x3"), ("dist", "source_dist")]


def frozen_prefixes(config) -> str:
    """The stem and every block of layer1 of the config's ResNet ("the first few layers").

    ``optim.under_prefixes`` compares path components whole, so layer1's blocks are named one by
    one (``backbone/layer1_0``, ...), not as ``backbone/layer1``.
    """
    blocks = (tuple(config.model.stage_sizes) or (3,))[0]
    prefixes = ["backbone/stem"] + [f"backbone/layer1_{b}" for b in range(blocks)]
    return "(" + ",".join(f'"{p}"' for p in prefixes) + ")"


def config_for(row: str, seed: int, data_dir: str, overrides: str):
    probe = recipe.load_config_file(CONFIG, "demo")
    method = ROWS[row][4].format(frozen=frozen_prefixes(probe))
    parts = ["demo", f"seed={seed}", method]
    if data_dir:
        parts.append(f"data.data_dir={data_dir}")
    if overrides:
        parts.append(overrides)
    return recipe.load_config_file(CONFIG, ",".join(parts))


def run_one(row: str, seed: int, args) -> dict:
    workdir = os.path.join(args.workdir, f"{row}_seed{seed}")
    return runs.run_once(config_for(row, seed, args.data_dir, args.overrides), workdir,
                         {"row": row, "seed": seed})


def table(records: list[dict]) -> str:
    lines = ["| setting | dist | spt | grid | seeds | steps | real_val mIoU (mean ± std) | per seed "
             "| held-out sim mIoU | wall time / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, rs in runs.by_row(records).items():
        desc, dist, spt, grid, _ = ROWS[row]
        lines.append(f"| {desc} | {dist or '-'} | {spt or '-'} | {grid or '-'} | "
                     f"{runs.score_cells(rs)} |")
    return "\n".join(lines)


def main():
    args, rows, seeds = runs.ablation_args(__doc__.split("\n")[0], ROWS)
    records = runs.archived_records(args.archive, {
        f"{row}_seed{seed}": functools.partial(run_one, row, seed, args)
        for row in rows for seed in seeds})
    text = ("ROAD ablations on the minicity demo (configs/road.py:demo; mIoU over 19 classes on "
            "minicity real_val, last step)\n\n" + table(records)
            + "\n\nPaired differences on real_val (same seed):\n\n"
            + runs.paired_table(runs.by_row(records), COMPARISONS) + "\n\nPer-class IoU (%) on "
            "real_val, mean over seeds:\n\n" + runs.per_class_table(runs.by_row(records)) + "\n")
    runs.write_report(args.workdir, "road_ablation.md", text)


if __name__ == "__main__":
    main()
