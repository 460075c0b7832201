"""Inference speed of BiSeNet-STDC813 (the real-time DA paper's network): images per second of
the main output upsampled to the input size, JAX (jitted) against PyTorch eager, side by side.

    python benchmarks/inference_speed.py                          # 512x1024 and 1024x2048, b 1, 8
    python benchmarks/inference_speed.py --sizes=512x1024 --batches=1 --repeats=5
    python benchmarks/inference_speed.py --no-torch               # JAX only (e.g. on a GPU)

Both sides run the same network with random weights: ours (synseg_jax.models, eval mode) and the
PyTorch module the weight-parity test checks ours against (STDC-Seg's layout, tests/
test_weight_parity.py), computing the main output only (STDC-Seg's inference), upsampled
bilinearly with align_corners=True to the input size. The two frameworks alternate within each
repeat, so load on a shared machine weighs on both alike: read the ratio, not the absolute
figures. Prints a markdown table (median over repeats).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from synseg_jax import images  # noqa: E402
from synseg_jax.models import segmenters  # noqa: E402


def jax_runner(height: int, width: int, batch: int):
    model = segmenters.build_segmenter("bisenet_stdc813", 19)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, height, width, 3)), jnp.float32)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x[:1], train=False))()

    @jax.jit
    def predict(v, images_):
        logits = model.apply(v, images_, train=False)["logits"]
        return images.resize_bilinear(logits, images_.shape[1:3], align_corners=True)

    predict(variables, x).block_until_ready()  # compile
    return lambda: predict(variables, x).block_until_ready()


def torch_runner(height: int, width: int, batch: int):
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from tests.test_weight_parity import BiSeNet  # noqa: PLC0415

    net = BiSeNet(64, 19, c=128, fused=256, mid=64).eval()
    x = torch.randn(batch, 3, height, width)

    def run():
        with torch.no_grad():
            f8, cp8, _ = net.cp(x)
            out = net.conv_out(net.ffm(f8, cp8))
            return F.interpolate(out, (height, width), mode="bilinear", align_corners=True)

    run()  # warm-up
    return run


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512x1024,1024x2048")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        for batch in (int(b) for b in args.batches.split(",")):
            runners = {"jax": jax_runner(h, w, batch)}
            if args.torch:
                runners["torch"] = torch_runner(h, w, batch)
            times = {name: [] for name in runners}
            for _ in range(args.repeats):
                for name, run in runners.items():
                    times[name].append(timed(run))
            ips = {name: batch / statistics.median(t) for name, t in times.items()}
            ratio = f"{ips['jax'] / ips['torch']:.2f}" if "torch" in ips else "-"
            rows.append(f"| {h}x{w} | {batch} | {ips['jax']:.2f} | "
                        f"{ips.get('torch', float('nan')):.2f} | {ratio} |")
            print(rows[-1], flush=True)
    device = jax.devices()[0]
    print(f"\nBiSeNet-STDC813 inference, main output upsampled to the input; median of "
          f"{args.repeats}; {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, "
          f"{platform.machine()}, jax {jax.__version__}\n")
    print("| input (HxW) | batch | JAX images/s | PyTorch eager images/s | JAX / PyTorch |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
