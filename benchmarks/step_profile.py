"""Where a train step's time goes: XLA's per-op profile of the JAX step against torch's profiler
of the same PyTorch step, grouped into the same kinds of work.

    python benchmarks/step_profile.py --model=bisenet_stdc813 --size=256x512 --batch=2
    python benchmarks/step_profile.py --model=deeplabv2_r101 --size=360x640 --batch=1

The steps are ``model_step.py``'s (random weights, BN in train mode, upsampled cross-entropy, SGD).
The JAX step is profiled with ``jax.profiler`` (a Perfetto trace): every XLA:CPU thunk is one
event. A thunk is "conv / matmul" when its HLO (or the fused computation it calls) holds a
convolution or a dot, and everything else otherwise (activations, BatchNorm, residual adds,
layout copies, the optimiser, each with its gradient). The compiled HLO's ``op_name`` metadata
names the primitive and direction (forward, or ``transpose(...)`` = backward) of the top ops.
The PyTorch step is profiled with ``torch.profiler``, self CPU time per aten op; convolution,
its backward and mm / addmm / bmm are "conv / matmul".

XLA:CPU runs independent thunks concurrently, so their summed time can exceed the step time;
shares are of the summed time. The PyTorch profile is of its own step, in a child process.
Only the split within one framework, and the two step times of the same run, compare.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import model_step

KINDS = ("conv / matmul", "everything else")
# XLA thunk names that are not ops of the step (runtime bookkeeping).
_RUNTIME = re.compile(r"^\$|Thunk|Await|Dispatch|Execut|Allocate|DevicePut|PjitFunction")
_PRODUCT = re.compile(r"= [^=]*\b(convolution|dot)\(")


def torch_kind(op: str) -> str:
    if "convolution" in op or op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        return KINDS[0]
    return KINDS[1]


def hlo_index(hlo_text: str) -> tuple[dict[str, str], set[str]]:
    """From compiled HLO text: instruction name -> ``op_name`` metadata (the JAX primitive
    path), and the names of instructions that are, or call a computation holding, a convolution
    or dot."""
    op_names, products, calls, bodies = {}, set(), {}, collections.defaultdict(str)
    computation = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            computation = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if not m:
            continue
        name = m.group(1)
        bodies[computation] += line + "\n"
        meta = re.search(r'op_name="([^"]+)"', line)
        if meta:
            op_names[name] = meta.group(1)
        if _PRODUCT.search(line):
            products.add(name)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called:
            calls[name] = called.group(1)
    products |= {name for name, body in calls.items() if _PRODUCT.search(bodies[body])}
    return op_names, products


def jax_profile(model: str, size, batch: int) -> dict:
    import jax

    step, arguments, _ = model_step.jax_training_step(model_step.MODELS[model], size, batch)
    compiled = jax.jit(step).lower(*arguments).compile()
    jax.block_until_ready(compiled(*arguments))  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*arguments))
    step_s = time.perf_counter() - t0
    op_names, products = hlo_index(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        jax.block_until_ready(compiled(*arguments))
        jax.profiler.stop_trace()
        trace_file = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        if not trace_file:
            raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
        with gzip.open(trace_file[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind, by_op = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or _RUNTIME.search(name):
            continue
        seconds = event.get("dur", 0) / 1e6
        by_kind[KINDS[0] if name in products else KINDS[1]] += seconds
        op_name = op_names.get(name)
        if op_name is None:
            by_op[f"{re.sub(r'[.][0-9]+$', '', name)} (no metadata)"] += seconds
        else:
            direction = "backward" if "transpose(" in op_name else "forward"
            by_op[f"{op_name.split('/')[-1]} ({direction})"] += seconds
    return dict(step_s=step_s, by_kind=dict(by_kind), top=by_op.most_common(12))


def torch_profile(model: str, size, batch: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(os.cpu_count() or 1)
    segmenter = model_step.MODELS[model].segmenter
    _, step = model_step.torch_training_step(segmenter, *size, batch)
    step()  # warm-up
    t0 = time.perf_counter()
    step()
    step_s = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_kind, by_op = collections.Counter(), collections.Counter()
    for item in prof.key_averages():
        if not item.key.startswith("aten::"):
            continue  # autograd / optimizer wrappers: their work is in the aten ops they call
        seconds = item.self_cpu_time_total / 1e6
        by_kind[torch_kind(item.key)] += seconds
        by_op[item.key] += seconds
    return dict(step_s=step_s, by_kind=dict(by_kind), top=by_op.most_common(12))


def report(title: str, result: dict) -> str:
    total = sum(result["by_kind"].values()) or 1.0
    lines = [f"### {title}: step {result['step_s']:.2f} s (unprofiled), "
             f"profiled op time {total:.2f} s", "",
             "| kind | s | share |", "|---|---:|---:|"]
    for kind in KINDS:
        if kind in result["by_kind"]:
            seconds = result["by_kind"][kind]
            lines.append(f"| {kind} | {seconds:.2f} | {100 * seconds / total:.0f} % |")
    lines += ["", "| top ops | s |", "|---|---:|"]
    lines += [f"| {op} | {seconds:.2f} |" for op, seconds in result["top"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bisenet_stdc813",
                        choices=sorted(n for n in model_step.MODELS
                                       if f"torch_{n}" in model_step.MODELS))
    parser.add_argument("--size", default="256x512", help="HxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.torch_worker:
        print(json.dumps(torch_profile(args.model, size, args.batch)))
        return
    jax_result = jax_profile(args.model, size, args.batch)
    torch_result = None
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: PyTorch profile skipped", file=sys.stderr)
    else:
        done = subprocess.run([sys.executable, __file__, "--torch-worker", f"--model={args.model}",
                               f"--size={args.size}", f"--batch={args.batch}"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"PyTorch profile failed: {done.stderr.strip()[-2000:]}", file=sys.stderr)
        else:
            torch_result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.model}, {size[0]}x{size[1]}, batch {args.batch}; load average "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(report("JAX (XLA:CPU thunks)", jax_result))
    if torch_result:
        print()
        print(report("PyTorch (aten self CPU time)", torch_result))


if __name__ == "__main__":
    main()
