"""Source-only DeepLabV2: train on labelled synthetic data, test on real (the baseline).

    python -m synseg_jax.main --config=configs/source_only.py --workdir=runs/source_only
    python -m synseg_jax.main --config=configs/source_only.py:gta5 --workdir=...
Oracle (trains on the target's labels, an upper bound): `source_only.py:demo,data.source_split=real_train`.
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
