"""Seconds per jitted training step (forward + backward + SGD update) of the full-size segmenters
at their papers' training sizes, and the step's memory as XLA plans it; optionally PyTorch steps
of DeepLabV2-ResNet101 and BiSeNet-STDC813 at the same sizes, side by side.

    python benchmarks/model_step.py                                   # every model, 3 repeats
    python benchmarks/model_step.py --models=bisenet_stdc813 --repeats=2
    python benchmarks/model_step.py --models=deeplabv2_r101,torch_deeplabv2_r101 --size=321x321
    python benchmarks/model_step.py --models=bisenet_stdc813,torch_bisenet_stdc813
    python benchmarks/model_step.py --compile-only                    # memory only, no steps
    python benchmarks/model_step.py --models=deeplabv2_r101 --compile-only --remat  # its memory
    python benchmarks/model_step.py --models=bisenet_stdc813 --compute-dtype=bfloat16

Training sizes (``MODELS``; the papers and their code):
    deeplabv2_r101          720x1280, batch 1   AdaptSegNet: GTA5 source images at 1280x720,
                                                batch 1 (its Cityscapes target side is 1024x512)
    deeplabv2_r50           640x640,  batch 1   TSG/SSI generalisation's baseline: ResNet-50,
                                                640x640 crops
    deeplabv2_r50_tsg_ssi   640x640,  batch 1   the same with TSG after layers 1-4 and SSI after
                                                1-3, plus the boundary loss on the 4 edge maps
    deeplab_largefov_vgg16  321x321,  batch 10  ROAD: 5 source + 5 target patches of 321x321
    pspnet_r101             321x321,  batch 10  ROAD (its PSPNet-R101 variant)
    fcn8s_vgg16             512x1024, batch 1   semantic translation paper: the paper gives no
                                                size; assumed Cityscapes' 1024x512 at batch 1
    bisenet_stdc813         512x1024, batch 8   real-time DA: 1024x512 (Cityscapes size), batch 8
    torch_deeplabv2_r101    = deeplabv2_r101    PyTorch CPU, our own Caffe-style ResNet-101 + ASPP
    torch_bisenet_stdc813   = bisenet_stdc813   PyTorch CPU, the STDC-Seg-layout BiSeNet that
                                                tests/test_weight_parity.py checks ours against

The step: logits bilinearly upsampled to the label size, softmax cross-entropy (plus the aux
outputs: BiSeNet's two at weight 1, as its reference code sums them; plus 1.5 x the boundary
loss on the SSI edge maps when the model has them, as methods/tsg_ssi.py), SGD momentum 0.9
with weight decay 5e-4, BatchNorm in train mode (batch statistics, running averages updated, as
the reference code runs), dropout on. Parameters are random (values do not matter for time).
Memory is ``jax.jit(step).lower(...).compile().memory_analysis()``: arguments, outputs (donated
state aliases them), and the temporaries XLA plans; "peak" = arguments + outputs + temporaries −
aliased. For PyTorch, the step runs in a child process and "peak" is its peak RSS
(VmHWM) minus the RSS after importing torch, i.e. model, gradients, momentum and
activations plus allocator slack, so the two are comparable only roughly.

GFLOP / step: XLA's cost analysis of the compiled step (convolutions, matmuls and elementwise
work) for the JAX rows; torch's FlopCounterMode over the warm-up step (convolutions and matmuls
only) for the PyTorch rows. GFLOP/s divides it by the step time; the run also prints the GFLOP/s
of a 2048x2048 float32 matmul in XLA, the practical peak of the machine to compare with.

``--size`` / ``--batch`` override every model's size, for a quick run on a small machine.
``--remat`` rematerialises the backbone blocks (``model.remat``; ResNet and STDC segmenters,
the VGG ones are skipped), ``--compute-dtype`` sets ``model.compute_dtype``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    segmenter: str
    kwargs: dict
    size: tuple[int, int]  # (H, W)
    batch: int
    source: str


MODELS = {
    "deeplabv2_r101": ModelSpec("deeplabv2", {}, (720, 1280), 1,
                                "AdaptSegNet GTA5 1280x720, batch 1"),
    "deeplabv2_r50": ModelSpec("deeplabv2", dict(depth=50, style="torchvision"), (640, 640),
                               1, "TSG/SSI 640x640 crops, batch 1"),
    "deeplabv2_r50_tsg_ssi": ModelSpec(
        "deeplabv2", dict(depth=50, style="torchvision", tsg=(1, 2, 3, 4), ssi=(1, 2, 3)),
        (640, 640), 1, "TSG/SSI 640x640 crops, batch 1"),
    "deeplab_largefov_vgg16": ModelSpec("deeplab_largefov_vgg16", {}, (321, 321), 10,
                                        "ROAD 5+5 patches 321x321"),
    "pspnet_r101": ModelSpec("pspnet_r101", {}, (321, 321), 10, "ROAD 5+5 patches 321x321"),
    "fcn8s_vgg16": ModelSpec("fcn8s_vgg16", {}, (512, 1024), 1,
                             "assumed 1024x512, batch 1 (the paper gives no size)"),
    "bisenet_stdc813": ModelSpec("bisenet_stdc813", {}, (512, 1024), 8,
                                 "real-time DA 1024x512, batch 8"),
    "torch_deeplabv2_r101": ModelSpec("deeplabv2", {}, (720, 1280), 1,
                                      "as deeplabv2_r101, PyTorch CPU"),
    "torch_bisenet_stdc813": ModelSpec("bisenet_stdc813", {}, (512, 1024), 8,
                                       "as bisenet_stdc813, PyTorch CPU"),
}
NUM_CLASSES = 19
MIB = 2 ** 20


# ---------------------------------------------------------------------------------------------
# JAX


def host_variables(model, shape, seed=0):
    """Random variables from numpy with the model's shapes (skips compiling the initialisers)."""
    import jax
    import jax.numpy as jnp

    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def jax_training_step(spec: ModelSpec, size, batch, remat: bool = False,
                      compute_dtype: str = "float32"):
    """The jittable train step of ``spec`` at ``size`` x ``batch`` and its arguments:
    ``(step, (params, opt_state, batch_stats, images, labels, key), remat)``; ``remat`` says
    whether the model could be rematerialised (the VGG ones cannot)."""
    import jax
    import optax

    from synseg_jax import losses
    from synseg_jax.methods import tsg_ssi
    from synseg_jax.models import layers, segmenters

    options = {"dtype": layers.compute_dtype(compute_dtype)}
    # The VGG segmenters have no blocks to rematerialise: their rows say remat=False.
    remat = remat and "remat" in {f.name for f in dataclasses.fields(
        segmenters.SEGMENTERS[spec.segmenter])}
    if remat:
        options["remat"] = True
    model = segmenters.build_segmenter(spec.segmenter, NUM_CLASSES, bn_mode="train",
                                       **spec.kwargs, **options)
    h, w = size
    variables = host_variables(model, (1, h, w, 3))
    params = variables.pop("params")
    batch_stats = variables.get("batch_stats", {})
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(2.5e-4, momentum=0.9))
    opt_state = tx.init(params)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(batch, h, w, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(batch, h, w)).astype(np.int32)

    def loss_fn(params, batch_stats, images, labels, key):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        out, updated = model.apply(variables, images, train=True, rngs={"dropout": key},
                                   mutable=["batch_stats"])
        loss = losses.cross_entropy(out["logits"], labels)
        for aux in ("aux_logits", "aux_logits2"):
            if aux in out:
                loss = loss + losses.cross_entropy(out[aux], labels)
        if tsg_ssi.EDGE_OUTPUT in out:
            names = tsg_ssi.edge_map_names(tuple(spec.kwargs.get("ssi", ())))
            boundary, _ = tsg_ssi.boundary_loss(out[tsg_ssi.EDGE_OUTPUT], labels, names)
            loss = loss + 1.5 * boundary
        return loss, updated.get("batch_stats", batch_stats)

    def step(params, opt_state, batch_stats, images, labels, key):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, batch_stats, loss

    return step, (params, opt_state, batch_stats, images, labels, jax.random.key(0)), remat


def jax_step(name: str, spec: ModelSpec, size, batch, repeats: int, compile_only: bool,
             remat: bool = False, compute_dtype: str = "float32") -> dict:
    import jax

    step, arguments, remat = jax_training_step(spec, size, batch, remat, compute_dtype)
    params, opt_state, batch_stats, images, labels, key = arguments
    h, w = size
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*arguments)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per device
    row = dict(model=name, size=f"{h}x{w}", batch=batch, source=spec.source, remat=remat,
               compute_dtype=compute_dtype,
               params_m=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e6,
               compile_s=compile_s)
    if cost and cost.get("flops"):
        row["gflop"] = cost["flops"] / 1e9
    if mem is not None:
        args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
        temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
        row.update(args_mib=args / MIB, temp_mib=temp / MIB,
                   peak_mib=(args + out + temp - alias) / MIB)
    if compile_only:
        return row
    state = jax.device_put((params, opt_state, batch_stats))
    times = []
    for i in range(repeats + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        *state, loss = compiled(*state, images, labels, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        if i:
            times.append(time.perf_counter() - t0)
    row.update(step_s=statistics.median(times), loss=float(loss))
    if "gflop" in row:
        row["gflops_s"] = row["gflop"] / row["step_s"]
    return row


# ---------------------------------------------------------------------------------------------
# PyTorch: DeepLabV2-ResNet101 (Caffe layout: stride on the first 1×1, ceil-mode pool, layer3/4
# dilated 2/4, ASPP rates 6/12/18/24 summed), or BiSeNet-STDC813 (the weight-parity test's
# module, full width). Run in a child process: its own peak RSS.


def peak_rss_kib() -> int:
    """This process's peak resident set (KiB). /proc's VmHWM starts afresh at exec, whereas
    getrusage's ru_maxrss keeps the high-water mark of the parent the process was forked from."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def torch_deeplabv2_r101():
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, inplanes, planes, stride, dilation, project):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4 * planes)
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False),
                nn.BatchNorm2d(4 * planes)) if project else None

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = F.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return F.relu(y + (x if self.downsample is None else self.downsample(x)))

    class DeepLabV2(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
            blocks, inplanes = [], 64
            for s, (n, stride, dilation) in enumerate(
                    zip((3, 4, 23, 3), (1, 2, 1, 1), (1, 1, 2, 4))):
                planes = 64 * 2 ** s
                for b in range(n):
                    blocks.append(Block(inplanes, planes, stride if b == 0 else 1, dilation,
                                        b == 0))
                    inplanes = 4 * planes
            self.blocks = nn.Sequential(*blocks)
            self.aspp = nn.ModuleList(nn.Conv2d(2048, num_classes, 3, 1, r, r)
                                      for r in (6, 12, 18, 24))

        def forward(self, x):
            x = self.blocks(self.pool(F.relu(self.bn1(self.conv1(x)))))
            return sum(conv(x) for conv in self.aspp)

    return DeepLabV2(NUM_CLASSES)


def torch_bisenet_stdc813():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.test_weight_parity import BiSeNet

    return BiSeNet(64, NUM_CLASSES, c=128, fused=256, mid=64)  # STDC-Seg's full widths


TORCH_MODELS = {"deeplabv2": torch_deeplabv2_r101, "bisenet_stdc813": torch_bisenet_stdc813}


def torch_training_step(segmenter: str, h: int, w: int, batch: int):
    """The PyTorch model of ``segmenter`` and a function running one train step of it on random
    ``batch`` x ``h`` x ``w`` images, as the JAX step does."""
    import torch
    from torch.nn import functional as F

    model = TORCH_MODELS[segmenter]().train()
    opt = torch.optim.SGD(model.parameters(), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, h, w)
    labels = torch.randint(0, NUM_CLASSES, (batch, h, w))

    def step():
        opt.zero_grad(set_to_none=True)
        outputs = model(images)  # BiSeNet: main and two aux outputs, summed as in the JAX step
        loss = sum(F.cross_entropy(F.interpolate(out, (h, w), mode="bilinear",
                                                 align_corners=False), labels, ignore_index=255)
                   for out in (outputs if isinstance(outputs, tuple) else (outputs,)))
        loss.backward()
        opt.step()
        return loss

    return model, step


def torch_worker(segmenter: str, h: int, w: int, batch: int, repeats: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(os.cpu_count() or 1)
    base_rss = peak_rss_kib()
    model, step = torch_training_step(segmenter, h, w, batch)
    counter = FlopCounterMode(display=False)
    with counter:  # the warm-up step, untimed, counts the flops (convolutions and matmuls)
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_kib()
    step_s = statistics.median(times)
    gflop = counter.get_total_flops() / 1e9
    return dict(step_s=step_s, loss=float(loss), gflop=gflop, gflops_s=gflop / step_s,
                # parameters the step trains: STDC's ImageNet classifier (conv_last, fc, linear) is
                # in the module but not in the segmentation forward
                params_m=sum(p.numel() for p in model.parameters() if p.grad is not None) / 1e6,
                peak_mib=(peak - base_rss) / 1024, torch=torch.__version__)


def torch_step(name: str, spec: ModelSpec, size, batch, repeats: int) -> dict:
    h, w = size
    row = dict(model=name, size=f"{h}x{w}", batch=batch, source=spec.source)
    try:
        import torch  # noqa: F401
    except ImportError:
        return dict(row, note="torch not installed")
    result = subprocess.run(
        [sys.executable, __file__, "--torch-worker",
         f"{spec.segmenter},{h},{w},{batch},{repeats}"],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return dict(row, note=f"failed: {result.stderr.strip().splitlines()[-1:]}")
    return dict(row, **json.loads(result.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------


PEAK_N = 2048


def matmul_gflops(repeats: int = 5) -> float:
    """GFLOP/s of a large float32 matmul in XLA: the rate the steps' GFLOP/s compare with."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((PEAK_N, PEAK_N), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return 2 * PEAK_N ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def fmt(value, digits=2):
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    cols = [("model", "model"), ("size", "H×W"), ("batch", "batch"), ("compute_dtype", "dtype"),
            ("remat", "remat"), ("params_m", "params (M)"),
            ("compile_s", "compile (s)"), ("step_s", "step (s)"), ("gflop", "GFLOP / step"),
            ("gflops_s", "GFLOP/s"), ("args_mib", "XLA args (MiB)"),
            ("temp_mib", "XLA temp (MiB)"), ("peak_mib", "peak (MiB)"), ("source", "size from")]
    lines = ["| " + " | ".join(title for _, title in cols) + " |",
             "|" + "---|" * len(cols)]
    for row in rows:
        cells = [fmt(row.get(key)) for key, _ in cols]
        if row.get("note"):
            cells[-1] += f" ({row['note']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--size", default=None, help="HxW for every model (default: its own)")
    parser.add_argument("--batch", type=int, default=None, help="batch for every model")
    parser.add_argument("--compile-only", action="store_true",
                        help="XLA memory analysis only, no steps (PyTorch rows skipped)")
    parser.add_argument("--remat", action="store_true",
                        help="rematerialise backbone blocks (model.remat; not the VGG models)")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="model.compute_dtype of the JAX rows")
    parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.torch_worker:
        segmenter, *numbers = args.torch_worker.split(",")
        print(json.dumps(torch_worker(segmenter, *map(int, numbers))))
        return

    import jax

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    rows = []
    for name in names:
        spec = MODELS[name]
        s, b = size or spec.size, args.batch or spec.batch
        if (s, b) != (spec.size, spec.batch):
            spec = dataclasses.replace(spec, source=f"override of {spec.size[0]}x{spec.size[1]} "
                                                    f"batch {spec.batch}: {spec.source}")
        print(f"{name}: {s[0]}x{s[1]} batch {b} ...", file=sys.stderr, flush=True)
        if name.startswith("torch_"):
            if not args.compile_only:
                rows.append(torch_step(name, spec, s, b, args.repeats))
        else:
            rows.append(jax_step(name, spec, s, b, args.repeats, args.compile_only, args.remat,
                                 args.compute_dtype))
        if rows:  # each finished row at once: a long run stopped midway keeps what it measured
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if not args.compile_only:
        print(f"XLA float32 matmul {PEAK_N}x{PEAK_N} (this CPU's practical peak): "
              f"{matmul_gflops():.0f} GFLOP/s", flush=True)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"cpu_count={os.cpu_count()}, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"repeats={args.repeats} (median); load average at the end (1/5/15 min): {load}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
