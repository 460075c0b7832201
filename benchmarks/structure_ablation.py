"""Structure enhancement's Table 1 (Lv et al., 2018) on the minicity demo, with the oracle.

    python benchmarks/structure_ablation.py --workdir=runs/structure              # all rows, seed 0
    python benchmarks/structure_ablation.py --workdir=... --seeds=0,1,2 --rows=source_only,full
    python benchmarks/structure_ablation.py --workdir=... --overrides=train.steps=4,train.eval_every=0

Rows: source only, feature-level (reconstruction only), output-level (adversarial only), the full
model, the full model with the plain-sum encoder gradient (the paper averages the branches'
gradients), and the oracle (trained on real_train's labels). Every row is
`configs/structure.py:demo` plus switches, trained by the recipe (the code path of
`python -m synseg_jax.main`), so rows share data, seeds and the demo-pretrained backbone (made once,
before any clock starts).

For the rows with a decoder, the reconstruction quality of every kept checkpoint is measured on
held-out images: L1 (mean absolute error on [-1, 1] RGB) and PSNR of G(E(I)) against I on real_val
(target domain) and the held-out 10% of sim (source domain).

Each finished run leaves `result.json` in its workdir and is skipped when the command is run again.
Prints the markdown tables and writes them to <workdir>/structure_ablation.md.
"""

from __future__ import annotations

import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import runs
from synseg_jax import checkpoint, images, inputs, methods, parallel
from synseg_jax.methods import structure

# name: (description, overrides)
ROWS = {
    "source_only": ("source only", "method.reconstruction=False,method.adversarial=False"),
    "feature": ("feature-level (reconstruction)", "method.adversarial=False"),
    "output": ("output-level (adversarial)", "method.reconstruction=False"),
    "full": ("full model", ""),
    "full_sum": ("full model, summed encoder gradient", "method.encoder_grads=sum"),
    "oracle": ("oracle (real_train labels)",
               "method.reconstruction=False,method.adversarial=False,"
               "data.source_split=real_train"),
}
RECONSTRUCTION_SPLITS = (("minicity", "real_val"), ("minicity", "sim[90%:]"))


def config_for(row: str, seed: int, args):
    return runs.load_config("structure.py", ["demo", f"seed={seed}", ROWS[row][1],
                                             f"data.data_dir={args.data_dir}" if args.data_dir
                                             else "", args.overrides])


def reconstruction_quality(config, workdir: str, max_images: int = 100) -> dict:
    """{step: {split: (L1, PSNR)}} of G(E(I)) on the first `max_images` images of each split."""
    method = methods.build(config)
    if not method.use_rec:
        return {}
    template = jax.eval_shape(method.init, jax.random.PRNGKey(0), inputs.abstract_batch(config),
                              {})
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    mesh = parallel.make_mesh()

    @jax.jit
    def errors(state, image):
        result = method.model.apply(state.roles["seg"].variables, image, train=False)
        recon = method.reconstruct(state.roles["rec"].params,
                                   result["features"][method.rec_features], image.shape[1:3])
        wanted = images.to_unit_range(image, config.data.normalization)
        return (jnp.mean(jnp.abs(recon - wanted), axis=(1, 2, 3)),
                structure.psnr_per_image(recon, wanted))

    out = {}
    for step in ckpt.all_steps():
        state = ckpt.restore(template, step)
        out[step] = {}
        for name, split in RECONSTRUCTION_SPLITS:
            l1s, psnrs = [], []
            for batch in inputs.eval_batches(config, mesh, name, split):
                keep = np.asarray(batch["mask"])
                l1, psnr = jax.device_get(errors(state, batch["image"]))
                l1s.extend(l1[keep]), psnrs.extend(psnr[keep])
                if len(l1s) >= max_images:
                    break
            out[step][f"{name}/{split}"] = (float(np.mean(l1s[:max_images])),
                                            float(np.mean(psnrs[:max_images])))
    ckpt.close()
    return out


def run_one(row: str, seed: int, args) -> dict:
    workdir = os.path.join(args.workdir, f"{row}_seed{seed}")
    config = config_for(row, seed, args)
    record = runs.run_once(config, workdir, {"row": row, "seed": seed})
    path = os.path.join(workdir, "reconstruction.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(reconstruction_quality(config, workdir), f, indent=2)
    with open(path) as f:
        record["reconstruction"] = json.load(f)
    return record


def table(records: list[dict]) -> str:
    lines = ["| setting | seeds | steps | real_val mIoU (mean ± std) | per seed "
             "| held-out sim mIoU | wall time / run |", "|---|---|---|---|---|---|---|"]
    for row, rs in runs.by_row(records).items():
        lines.append(f"| {ROWS[row][0]} | {runs.score_cells(rs)} |")
    return "\n".join(lines)


def reconstruction_table(records: list[dict]) -> str:
    lines = ["| setting | step | real_val L1 | real_val PSNR (dB) | held-out sim L1 "
             "| held-out sim PSNR (dB) |", "|---|---|---|---|---|---|"]
    for row, rs in runs.by_row(records).items():
        steps = sorted({int(s) for r in rs for s in r["reconstruction"]})
        for step in steps:
            cells = []
            for name, split in RECONSTRUCTION_SPLITS:
                values = [r["reconstruction"][str(step)][f"{name}/{split}"] for r in rs
                          if str(step) in r["reconstruction"]]
                cells += [f"{statistics.mean(v[0] for v in values):.3f}",
                          f"{statistics.mean(v[1] for v in values):.2f}"]
            lines.append(f"| {ROWS[row][0]} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    args, rows, seeds = runs.ablation_args(__doc__.split("\n")[0], ROWS)
    records = [run_one(row, seed, args) for row in rows for seed in seeds]
    provenance = sorted({r["provenance"] for r in records})
    text = ("Structure enhancement on the minicity demo (configs/structure.py:demo; mIoU over 19 "
            "classes, last step)\n\nMade by: " + "; ".join(provenance) + "\n\n" + table(records)
            + "\n\nPer-class IoU (%) on real_val, mean over seeds:\n\n"
            + runs.per_class_table(runs.by_row(records))
            + "\n\nReconstruction of held-out images (first 100 of each split), mean over "
            "seeds:\n\n" + reconstruction_table(records) + "\n")
    runs.write_report(args.workdir, "structure_ablation.md", text)


if __name__ == "__main__":
    main()
