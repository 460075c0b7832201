"""Sweeps on two processes: each sweeps its share of the split, and the dataset, thresholds and
report are those of one process sweeping the whole split (every example written once)."""

import json

import numpy as np

from synseg_jax import sweep
from synseg_jax.data import datasets
from tests.test_parallel import finish, free_port, start_python
from tests.tiny import TINY_DATA_AND_MODEL

# A "segmenter" whose confidences vary over the image: a fixed random projection of the pixels.
SWEEP = """
import json, sys
import numpy as np
from synseg_jax import parallel
pid, count, address, data_dir, folder = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                         sys.argv[4], sys.argv[5])
parallel.maybe_initialize_distributed(address, count, pid)
import jax, jax.numpy as jnp
from configs import source_only
from synseg_jax import pseudo_labels, sweep
overrides = json.loads(sys.argv[6])
config = source_only.get_config(",".join(["demo", f"data.data_dir={data_dir}", *overrides]))
weights = np.random.default_rng(0).normal(size=(3, 19)).astype(np.float32)
predict = lambda v, x: jnp.einsum("bhwc,ck->bhwk", x, v["w"])
rule = pseudo_labels.make_rule("class_percentile")  # needs the split-wide histogram
report = sweep.pseudo_label(config, [(predict, {"w": weights})], "minicity", "real_train",
                            folder, rule)
translate = jax.jit(lambda x: jnp.clip(x + 128.0, 0, 255).astype(jnp.uint8))
sweep.translate_split(config, translate, "minicity", "real_train", folder + "_translated",
                      (32, 64), batch_size=3)
print("REPORT", json.dumps(report))
"""


def sweep_dataset(folder):
    opened = datasets.open_split(sweep.dataset_name(folder), sweep.SPLIT, with_names=True)
    return {e["name"]: (e["image"], e["label"]) for e in opened.dataset.as_numpy_iterator()}


def run_sweep(pid: int, count: int, address: str, data_dir: str, folder: str):
    overrides = json.dumps([o for o in TINY_DATA_AND_MODEL if o != "data.data_dir="])
    return start_python(SWEEP, 1, str(pid), str(count), address, data_dir, folder, overrides)


def test_two_processes_sweep_as_one_does(tmp_path):
    data_dir = str(tmp_path / "tfds")
    # One process first: it also renders the tiny minicity both runs read.
    one = finish(run_sweep(0, 1, "unused", data_dir, str(tmp_path / "one")), timeout=600)
    address = f"127.0.0.1:{free_port()}"
    procs = [run_sweep(pid, 2, address, data_dir, str(tmp_path / "two")) for pid in (0, 1)]
    try:
        outs = [finish(p, timeout=600) for p in procs]
    finally:
        for p in procs:  # a failed peer must not leave the other waiting on the coordinator
            if p.poll() is None:
                p.kill()
                p.communicate()

    def report(out):
        return json.loads(out.split("REPORT ", 1)[1].splitlines()[0])

    # Split-wide numbers: the same thresholds (from the summed histogram) and counts, on both
    # processes.
    assert report(outs[0]) == report(outs[1]) == report(one)
    assert report(one)["examples"] == 8 and report(one)["per_class"]
    with open(tmp_path / "two" / "report.json") as f:
        assert json.load(f) == report(one)
    # Every example once, with the same pseudo-labels (translations) as the one-process sweep.
    for kind in ("", "_translated"):
        single, double = (sweep_dataset(str(tmp_path / (run + kind))) for run in ("one", "two"))
        assert sorted(double) == sorted(single) and len(single) == 8
        for name, (image, label) in single.items():
            np.testing.assert_array_equal(double[name][0], image)
            np.testing.assert_array_equal(double[name][1], label)
        if not kind:  # the pseudo-labels select some pixels and leave others out
            values = np.concatenate([label.ravel() for _, label in single.values()])
            assert (values == 255).any() and (values < 19).any()
