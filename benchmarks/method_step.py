"""Seconds per jitted training step of a whole METHOD (every role: segmenter, decoder,
discriminators, teacher) at its preset's training sizes, and the step's memory as XLA plans it.

    python benchmarks/method_step.py --config=structure.py:gta5
    python benchmarks/method_step.py --config=structure.py:gta5 --config=source_only.py:gta5
    python benchmarks/method_step.py --config=structure.py:demo --repeats=5   # the demo's step
    python benchmarks/method_step.py --config=structure.py:gta5 --compile-only  # memory only

Where benchmarks/model_step.py times a segmenter alone, this times `method.train_step` exactly as
the training loop jits it (state donated), built from the config file and preset, on a batch of
the shapes the config's input pipeline would yield (`inputs.abstract_batch`: the crop, or the
whole resized image when `data.crop=()`), filled with random values. Parameters are random
(`init.*.path` is not read: values do not change the time). Memory:
`compile().memory_analysis()`; "peak" = arguments + outputs + temporaries - aliased.

Extra `key=value` overrides go after the preset (`structure.py:gta5,method.adversarial=False`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import runs
from synseg_jax import inputs, methods, train

MIB = 2 ** 20


def random_batch(config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def fill(spec):
        if spec.shape and spec.shape[-1] == 4 and spec.dtype == jnp.float32 and len(spec.shape) == 2:
            return np.tile(np.asarray([0.0, 0.0, 1.0, 1.0], np.float32), (spec.shape[0], 1))
        if jnp.issubdtype(spec.dtype, jnp.integer):
            return rng.integers(0, config.model.num_classes, spec.shape).astype(spec.dtype)
        return (rng.normal(size=spec.shape) * 50).astype(spec.dtype)

    return jax.tree_util.tree_map(fill, inputs.abstract_batch(config))


def time_step(config_arg: str, repeats: int, compile_only: bool = False) -> dict:
    file, _, arg = config_arg.partition(":")
    parts = [p for p in arg.split(",") if p] if arg else []
    config = runs.load_config(file, parts)
    method = methods.build(config)
    batch = random_batch(config)
    if compile_only:  # shapes are all a compile needs: no initialisation runs
        state = jax.eval_shape(method.init, jax.random.PRNGKey(0), batch, {})
    else:  # compiled as training compiles it (train.init_compiler_options)
        state = jax.jit(method.init, compiler_options=train.init_compiler_options())(
            jax.random.PRNGKey(0), batch, {})
    t0 = time.perf_counter()
    compiled = jax.jit(method.train_step, donate_argnums=(0,)).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    row = {"config": config_arg, "roles": "+".join(method.roles),
           "sizes": ", ".join(f"{d} {'x'.join(map(str, v['image'].shape[1:3]))}"
                              for d, v in batch.items()),
           "batch": config.train.batch_size,
           "params_m": sum(int(np.prod(x.shape)) for r in state.roles.values()
                           for x in jax.tree_util.tree_leaves(r.params)) / 1e6,
           "compile_s": compile_s}
    mem = compiled.memory_analysis()
    if mem is not None:
        row["peak_mib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / MIB
    if compile_only:
        return row
    times = []
    for i in range(repeats + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t0)
    row["step_s"] = statistics.median(times)
    row["finite"] = all(np.isfinite(float(v)) for v in jax.device_get(metrics).values())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True,
                        help="FILE[:preset,key=value,...] relative to configs/; repeatable")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--compile-only", action="store_true", help="memory only, no steps")
    args = parser.parse_args()
    rows = [time_step(c, args.repeats, args.compile_only) for c in args.config]
    print(f"{runs.provenance()}; jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)\n")
    print("| config | roles | image sizes | batch | params (M) | compile (s) | peak (MiB) "
          "| step (s) |\n|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['roles']} | {r['sizes']} | {r['batch']} | "
              f"{r['params_m']:.1f} | {r['compile_s']:.1f} | {r.get('peak_mib', float('nan')):.0f} "
              + (f"| {r['step_s']:.3f} |" if "step_s" in r else "| - |")
              + ("" if r.get("finite", True) else " (non-finite metrics)"))


if __name__ == "__main__":
    main()
