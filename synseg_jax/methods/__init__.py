"""Training methods: each owns its networks, losses and update rules (see methods/base.py)."""

from synseg_jax.methods.classifier import Classifier
from synseg_jax.methods.road import Road
from synseg_jax.methods.self_training import SelfTraining
from synseg_jax.methods.source_only import SourceOnly

METHODS = {
    "source_only": SourceOnly,
    "classifier": Classifier,
    "road": Road,
    "self_training": SelfTraining,
}


def build(config):
    """The method named by `config.method.name`; an unknown name lists the valid ones."""
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods: {sorted(METHODS)}")
    return METHODS[name](config)
