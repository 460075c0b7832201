"""Semantic translation on the minicity demo: the bidirectional rounds, Table 3's ablations, the
oracle, and FID of translated images (Table 4's question).

    python benchmarks/semantic_translation_ablation.py --workdir=runs/st            # all, seed 0
    python benchmarks/semantic_translation_ablation.py --workdir=... --seeds=0,1,2 --rows=full
    python benchmarks/semantic_translation_ablation.py --workdir=... --overrides=translator.steps=4

Rows (each the recipe of `configs/semantic_translation.py:demo` plus switches, run by
`recipe.run`, the code path of `python -m synseg_jax.main`):
  full       SPADE generator + symmetric CE, 2 rounds: reports the source-only stage, round 1
             and round 2 (the paper's final setting)
  spade      SPADE, no symmetric CE, 1 round          (Table 3)
  in_sce     IN generator, symmetric CE, 1 round      (Table 3)
  in         IN generator, no symmetric CE, 1 round   (Table 3's baseline)
  oracle     source-only training on real_train's labels, the same 600 steps
The ablation rows reuse the `source` and `pseudo1` stages of the `full` row of the same seed
(links: the same config, seed and data, so the same results), so every row of a seed starts
from one source-only model and its pseudo-labels. A row resumed after a kill reports no wall
time (its clock would miss the stages done before).

FID here is the Fréchet distance in the feature space of the demo's pretrained backbone (the
minicity-objects ResNet that stands in for ImageNet weights; global average of layer4), NOT
Inception's: comparable between rows of this table only. It compares the translated source
(a translate stage's dataset) and the untranslated source (sim[:90%]) with the target's train
images (real_train), as the paper's Table 4 does with GTA5 / Cityscapes.

Finished runs leave `result.json` and are skipped when the command is run again. Prints the
markdown tables and writes them to <workdir>/semantic_translation_ablation.md.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import runs
from synseg_jax import checkpoint, fid, images, inputs, recipe, sweep
from synseg_jax.methods import base

# name: (description, overrides, rounds)
ROWS = {
    "full": ("SPADE + symmetric CE", "", 2),
    "spade": ("SPADE, no symmetric CE", "method.lambda_sce=0", 1),
    "in_sce": ("IN + symmetric CE", "method.generator_norm=in", 1),
    "in": ("IN, no symmetric CE", "method.generator_norm=in,method.lambda_sce=0", 1),
    "oracle": ("oracle (real_train labels)", None, 0),
}
FID_BATCH = 50


def config_for(row: str, seed: int, args):
    common = [f"seed={seed}", f"data.data_dir={args.data_dir}" if args.data_dir else "",
              args.overrides]
    if row == "oracle":
        # The source stage's training with the target's labels in place of the source's.
        config = runs.load_config("semantic_translation.py", ["demo", "rounds=1", *common])
        with config.unlocked():
            source = config.stages.source
            source.overrides += ",data.source_split=real_train"
            config.stages = {"source": source}
            config.stage_order = ("source",)
        return shared_pretraining(config, args)
    _, overrides, rounds = ROWS[row]
    config = runs.load_config("semantic_translation.py",
                              ["demo", f"rounds={rounds}", overrides, *common])
    return shared_pretraining(config, args)


def shared_pretraining(config, args):
    """Every stage of every row and seed starts from one demo pretraining, in --workdir (a
    recipe's stages would otherwise look for it beside themselves, inside each run)."""
    with config.unlocked():
        config.pretrain.workdir = recipe.demo_backbone_dir(
            config, os.path.join(os.path.abspath(args.workdir), "any_run"))
    return config


def demo_features(config, workdir: str):
    """(images uint8 [B, H, W, 3]) -> [B, D]: the demo backbone's layer4, averaged over space."""
    config = recipe.ensure_pretrained(config, workdir)
    model = base.segmenter_from_config(config.model)
    sample = jnp.zeros((1, 64, 64, 3), jnp.float32)
    role = base.init_segmenter(model, jax.random.PRNGKey(0), sample, None,
                               checkpoint.load_variables(config.init.seg.path),
                               config.init.seg.scope)
    normalization = config.data.normalization

    @jax.jit
    def features(x):
        out = model.apply(role.variables, images.normalize(x.astype(jnp.float32), normalization),
                          train=False)
        return jnp.mean(out["features"]["layer4"], axis=(1, 2))

    return lambda batch: np.asarray(features(batch))


def image_batches(config, dataset: str, split: str):
    opened = inputs.open_split(config.data, dataset, split)
    for batch in opened.dataset.map(lambda e: e["image"]).batch(FID_BATCH).as_numpy_iterator():
        yield batch


def fid_report(config, workdir: str, rounds: int) -> dict:
    features = demo_features(config, workdir)
    target = fid.image_statistics(image_batches(config, "minicity", "real_train"), features)
    mu_t, sigma_t = target.moments()

    def distance(dataset, split):
        mu, sigma = fid.image_statistics(image_batches(config, dataset, split), features).moments()
        return fid.frechet_distance(mu, sigma, mu_t, sigma_t)

    out = {"untranslated": distance("minicity", config.data.source_split)}
    for r in range(1, rounds + 1):
        out[f"translate{r}"] = distance(
            sweep.dataset_name(os.path.join(workdir, f"translate{r}")), sweep.SPLIT)
    return out


# The stages an ablation row shares with the full row of its seed: the source-only segmenter and
# its pseudo-labels of the target (same config, seed and data, so the same results).
SHARED_STAGES = ("source", "pseudo1")
# What tells the rows apart: switches of the translator stages and the number of rounds. The
# shared stages, trained with the full row's config, differ from a row's only in these keys,
# which they do not read.
ROW_SWITCHES = ("method.lambda_sce:", "method.generator_norm:", "rounds:")


def link_shared_stages(workdir: str, full_workdir: str, seed: int, args) -> None:
    for name in SHARED_STAGES:
        link = os.path.join(workdir, name)
        if os.path.exists(link):
            continue
        if not os.path.exists(os.path.join(full_workdir, name, recipe.DONE)):
            run_one("full", seed, args)
        os.symlink(os.path.join(full_workdir, name), link)


def stage_seconds(config, workdir: str, start: float) -> dict:
    """Seconds each stage of this run took, from the times their DONE.json were written (a
    stage linked from another row took none here)."""
    out, previous = {}, start
    for name in recipe.stage_names(config):
        done = os.path.join(workdir, name, recipe.DONE)
        finished = os.path.getmtime(done)
        out[name] = max(0.0, finished - previous)
        previous = max(previous, finished)
    return out


def shared_stages_differ(config, workdir: str) -> bool:
    """Whether the linked stages ran with a config that differs from the row's, in row switches
    only (then the row runs with allow_config_change); any other difference is an error."""
    changes = [c for name in SHARED_STAGES
               for c in recipe.finished_stage_changes(config, workdir, name)]
    unexpected = [c for c in changes if not c.startswith(ROW_SWITCHES)]
    if unexpected:
        raise ValueError(f"The stages {SHARED_STAGES} linked into {workdir} ran with another "
                         f"config than this row's beyond its switches: {unexpected}")
    return bool(changes)


def run_one(row: str, seed: int, args) -> dict:
    workdir = os.path.join(args.workdir, f"{row}_seed{seed}")
    result_path = os.path.join(workdir, "result.json")
    config = config_for(row, seed, args)
    rounds = ROWS[row][2]
    if not os.path.exists(result_path):
        os.makedirs(workdir, exist_ok=True)
        linked_differ = False
        if row not in ("full", "oracle"):
            link_shared_stages(workdir, os.path.join(args.workdir, f"full_seed{seed}"), seed,
                               args)
            linked_differ = shared_stages_differ(config, workdir)
        recipe.ensure_pretrained(config, workdir)  # made before any clock starts
        made_by = runs.provenance()
        # A run resumed after a kill did part of its work before this clock: its wall time
        # would be too short, so none is reported for it.
        resumed = [name for name in recipe.stage_names(config)
                   if name not in SHARED_STAGES
                   and os.path.exists(os.path.join(workdir, name, recipe.DONE))]
        start = time.time()
        # The recipe would refuse the shared stages for those switch keys: they are known to
        # be irrelevant to them (checked just above), so the row goes on past them.
        recipe.run(config, workdir, allow_config_change=linked_differ)
        record = {"row": row, "seed": seed,
                  "wall_s": None if resumed else time.time() - start,
                  "resumed_after": resumed,
                  "provenance": made_by, "steps": config.train.steps,
                  "stage_seconds": stage_seconds(config, workdir, start)}
        if rounds:
            record["fid"] = fid_report(config, workdir, rounds)
        with open(result_path, "w") as f:
            json.dump(record, f, indent=2)
    with open(result_path) as f:
        record = json.load(f)
    stages = ["source"] + [f"seg{r}" for r in range(1, rounds + 1)]
    record["stages"] = {stage: runs.last_scores(os.path.join(workdir, stage)) for stage in stages}
    return record


def _cells(values: list[float]) -> str:
    return f"{runs.mean_std(values)} | {' / '.join(f'{v:.2f}' for v in values)}"


def table(records: list[dict]) -> str:
    lines = ["| setting | stage | seeds | real_val mIoU (mean ± std) | per seed | held-out sim "
             "mIoU | FID to real_train (translated) | recipe wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for row, rs in runs.by_row(records).items():
        for stage in rs[0]["stages"]:
            if row != "full" and row != "oracle" and stage == "source":
                continue  # the full row's, linked
            real = [r["stages"][stage][runs.REAL]["miou"] for r in rs]
            sim = [r["stages"][stage][runs.HELD_OUT]["miou"] for r in rs
                   if runs.HELD_OUT in r["stages"][stage]]
            n = stage[3:] if stage.startswith("seg") else ""
            fids = [r["fid"][f"translate{n}"] for r in rs if n and "fid" in r]
            label = ("source only" if stage == "source" and row != "oracle" else
                     ROWS[row][0] if row == "oracle" else f"{ROWS[row][0]}, round {n}")
            wall = runs.mean_wall(rs) if stage == list(rs[0]["stages"])[-1] else ""
            lines.append(f"| {label} | {stage} | {','.join(str(r['seed']) for r in rs)} | "
                         f"{_cells(real)} | {runs.mean_std(sim) if sim else '-'} | "
                         f"{runs.mean_std(fids) if fids else '-'} | {wall} |")
    untranslated = [r["fid"]["untranslated"] for r in records if "fid" in r]
    if untranslated:
        lines.append(f"\nFID of the untranslated source (sim[:90%]) to real_train: "
                     f"{runs.mean_std(untranslated)}")
    return "\n".join(lines)


def main():
    args, rows, seeds = runs.ablation_args(__doc__.split("\n")[0], ROWS)
    records = runs.archived_records(args.archive, {
        f"{row}_seed{seed}": functools.partial(run_one, row, seed, args)
        for row in rows for seed in seeds})
    provenance = sorted({r["provenance"] for r in records})
    columns = {}
    for row, rs in runs.by_row(records).items():
        for stage in rs[0]["stages"]:
            if stage != "source" or row in ("full", "oracle"):
                columns[f"{row}/{stage}"] = [{"scores": r["stages"][stage]} for r in rs]
    text = ("Semantic translation on the minicity demo (configs/semantic_translation.py:demo; "
            "mIoU over 19 classes, last step of each stage; FID in the demo backbone's feature "
            "space, not Inception's)\n\nMade by: " + "; ".join(provenance) + "\n\n"
            + table(records) + "\n\nPer-class IoU (%) on real_val, mean over seeds:\n\n"
            + runs.per_class_table(columns) + "\n")
    runs.write_report(args.workdir, "semantic_translation_ablation.md", text)


if __name__ == "__main__":
    main()
