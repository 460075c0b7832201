"""Source-only DeepLabV2: train on labelled synthetic data, test on real (the baseline).

    python -m synseg_jax.main --config=configs/source_only.py --workdir=runs/source_only
    python -m synseg_jax.main --config=configs/source_only.py:gta5 --workdir=...
Oracle (trains on the target's labels, an upper bound): `source_only.py:demo,data.source_split=real_train`.
The demo holds out the last 10% of sim scenes and scores them too (`data.extra_eval_splits`).
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.method.name = "source_only"
    config.data.target = ""  # source-only never sees target images
    config.data.target_split = ""
    return common.finalize(config, arg, {"demo": _demo})


def _demo(config):
    config.data.target = ""
    config.data.target_split = ""
    # The last 10% of sim is held out, so every run also reports in-domain accuracy: the gap
    # between it and real_val is the domain gap (BENCHMARKS.md).
    config.data.source_split = "sim[:90%]"
    config.data.extra_eval_splits = ("minicity/sim[90%:]",)
