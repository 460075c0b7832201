"""minicity's three reference points: source-only (sim -> real_val), held-out sim, and the oracle.

    python benchmarks/reference_points.py --workdir=runs/reference [--data_dir=DIR] [--seed=0]

Renders minicity into a fresh data dir, pretrains the demo backbone, then runs the demo source-only
config and the oracle config through the normal entry point, timing each step, and prints a
markdown table with mIoU, wall times and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], log_path: str, env: dict) -> float:
    start = time.time()
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def final_miou(workdir: str, split: str) -> tuple[int, float]:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", split)
    records = []
    for name in os.listdir(os.path.join(workdir, "eval")):
        if name.startswith(safe + "_") and name.endswith(".json"):
            with open(os.path.join(workdir, "eval", name)) as f:
                record = json.load(f)
            records.append((record["step"], 100 * record["miou_19"]))
    return max(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/reference")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    data_dir = os.path.abspath(args.data_dir or os.path.join(workdir, "tfds"))
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    env = {**os.environ, "SYNSEG_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1"}

    build = run([sys.executable, "-c",
                 "from synseg_jax.data import datasets\n"
                 "for s in ('sim', 'objects'):\n    datasets.open_split('minicity', s)"],
                os.path.join(workdir, "build.log"), env)
    main_cmd = [sys.executable, "-m", "synseg_jax.main"]
    so_dir, oracle_dir = os.path.join(workdir, "source_only"), os.path.join(workdir, "oracle")
    # The one-time demo pretraining, timed on its own (the training runs below then find it).
    pre = run([sys.executable, "-c",
               "from configs import source_only\nfrom synseg_jax import recipe\n"
               f"recipe.ensure_pretrained(source_only.get_config('demo,seed={args.seed}'), "
               f"{so_dir!r})"], os.path.join(workdir, "pretrain.log"), env)
    so_time = run(main_cmd + [f"--config=configs/source_only.py:demo,seed={args.seed}",
                              f"--workdir={so_dir}"], os.path.join(workdir, "source_only.log"), env)
    oracle_time = run(main_cmd + [
        f"--config=configs/source_only.py:demo,seed={args.seed},data.source_split=real_train,"
        "data.extra_eval_splits=()", f"--workdir={oracle_dir}"],
        os.path.join(workdir, "oracle.log"), env)

    so_step, so_real = final_miou(so_dir, "minicity/real_val")
    _, so_sim = final_miou(so_dir, "minicity/sim[90%:]")
    or_step, or_real = final_miou(oracle_dir, "minicity/real_val")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    print(f"minicity build (all splits, fresh data dir): {build:.0f} s; {machine}")
    print(f"demo pretraining on objects (one time): {pre:.0f} s")
    print("| run | trained on | scored on | step | mIoU-19 | wall time |")
    print("|---|---|---|---:|---:|---:|")
    print(f"| source-only | sim[:90%] | real_val | {so_step} | {so_real:.2f} | "
          f"{so_time:.0f} s |")
    print(f"| source-only | sim[:90%] | sim[90%:] (held out) | {so_step} | {so_sim:.2f} | same run |")
    print(f"| oracle | real_train | real_val | {or_step} | {or_real:.2f} | {oracle_time:.0f} s |")
    print(f"source-only / oracle on real_val = {so_real / or_real:.3f} (must be <= 0.6)")


if __name__ == "__main__":
    main()
