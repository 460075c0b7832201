"""Training methods: each owns its networks, losses and update rules (see methods/base.py)."""

from synseg_jax.methods.adversarial import Adversarial
from synseg_jax.methods.classifier import Classifier
from synseg_jax.methods.road import Road
from synseg_jax.methods.self_training import SelfTraining
from synseg_jax.methods.semantic_translation import SemanticTranslation
from synseg_jax.methods.source_only import SourceOnly
from synseg_jax.methods.structure import StructureEnhancement
from synseg_jax.methods.tsg_ssi import TsgSsi

METHODS = {
    "source_only": SourceOnly,
    "classifier": Classifier,
    "road": Road,
    "self_training": SelfTraining,
    "adversarial": Adversarial,
    "structure": StructureEnhancement,
    "tsg_ssi": TsgSsi,
    "semantic_translation": SemanticTranslation,
}


def build(config):
    """The method named by `config.method.name`; an unknown name lists the valid ones, and a
    config that lacks fields the method reads (declared by the method's own config file) names
    them."""
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods: {sorted(METHODS)}")
    cls = METHODS[name]
    missing = [f"method.{field}" for field in getattr(cls, "config_fields", ())
               if field not in config.method]
    if missing:
        raise ValueError(f"Method {name!r} reads config fields {missing}, which this config does "
                         f"not declare; start from the method's config file (configs/{name}.py) "
                         f"or declare them")
    return cls(config)
