"""Per-role optax chains: PyTorch-style SGD or Adam, the poly schedule, a 10x head learning rate and
frozen parameters.

Every parameter gets one of three labels from its path in the param tree:
  "frozen" (``frozen_predicate``): zero updates and no optimiser state;
  "head"   (``head_predicate``):   ``head_lr_mult`` x the learning rate (the DeepLab classifier);
  "body":                          the base learning rate.
Frozen wins over head. Paths are tuples of strings, e.g. ("backbone", "layer1_0", "conv1",
"kernel").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "Path",
    "PathPredicate",
    "poly_schedule",
    "linear_warmup",
    "path_of",
    "param_paths",
    "contains_any",
    "component_startswith",
    "under_prefixes",
    "any_of",
    "never",
    "is_head",
    "is_batchnorm",
    "label_params",
    "make_optimizer",
    "current_lrs",
]

Path = tuple[str, ...]
PathPredicate = Callable[[Path], bool]
ScalarOrSchedule = float | optax.Schedule

FROZEN, HEAD, BODY = "frozen", "head", "body"


def poly_schedule(base_lr: float, max_steps: int, power: float = 0.9) -> optax.Schedule:
    """base_lr * (1 - step / max_steps) ** power, and 0 from ``max_steps`` on."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")

    def schedule(step):
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / max_steps, 0.0, 1.0)
        return base_lr * (1.0 - frac) ** power

    return schedule


def linear_warmup(schedule: optax.Schedule, warmup_steps: int) -> optax.Schedule:
    """``schedule`` scaled by (step + 1) / warmup_steps for the first ``warmup_steps`` steps.

    None of the papers warms up; a demo whose large learning rate overshoots on its first steps
    (a fresh head at 10x) can. Step 0 already moves (by 1/warmup_steps of the lr)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return schedule

    def warmed(step):
        ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps)
        return ramp * schedule(step)

    return warmed


# --- naming parameters --------------------------------------------------------------------------

def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_of(key_path) -> Path:
    """A jax key path (from ``tree_map_with_path``) as a tuple of plain strings."""
    return tuple(_key_name(k) for k in key_path)


def param_paths(params) -> list[Path]:
    """The path of every leaf, in tree-flatten order (handy for checking predicates)."""
    return [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def contains_any(*substrings: str) -> PathPredicate:
    """True when some path component contains one of ``substrings`` (case-insensitive)."""
    subs = tuple(s.lower() for s in substrings)
    return lambda path: any(s in comp.lower() for comp in path for s in subs)


def component_startswith(*prefixes: str) -> PathPredicate:
    """True when some path component starts with one of ``prefixes`` (case-insensitive)."""
    pres = tuple(p.lower() for p in prefixes)
    return lambda path: any(comp.lower().startswith(pres) for comp in path)


def under_prefixes(prefixes: Sequence[str | Sequence[str]]) -> PathPredicate:
    """True for parameters under one of ``prefixes``, each "a/b/c" or ("a", "b", "c").

    Components are compared whole, so "backbone/layer1" matches ("backbone", "layer1", "kernel")
    but not ("backbone", "layer10", ...). For ROAD's "freeze the first layers" ablation.
    """
    split = [tuple(p.strip("/").split("/")) if isinstance(p, str) else tuple(p) for p in prefixes]
    return lambda path: any(path[: len(p)] == p for p in split)


def any_of(*predicates: PathPredicate) -> PathPredicate:
    return lambda path: any(pred(path) for pred in predicates)


def never(path: Path) -> bool:
    del path
    return False


# The DeepLab classifier and every other output head: AdaptSegNet and its descendants give them
# 10x the backbone's learning rate.
is_head: PathPredicate = contains_any("head", "classifier")
# BatchNorm scale and bias, for the reference code's frozen BN affine parameters. Modules named
# "bn1", "bn_0", ... as in the ported backbones, or flax's automatic "BatchNorm_0".
is_batchnorm: PathPredicate = component_startswith("bn", "batchnorm")


def label_params(params, head_predicate: PathPredicate = is_head,
                 frozen_predicate: PathPredicate = never):
    """The tree of "frozen" / "head" / "body" labels that ``make_optimizer`` uses."""
    def label(key_path, _):
        path = path_of(key_path)
        if frozen_predicate(path):
            return FROZEN
        return HEAD if head_predicate(path) else BODY

    return jax.tree_util.tree_map_with_path(label, params)


# --- optimisers ---------------------------------------------------------------------------------

def _scaled(lr: ScalarOrSchedule, mult: float) -> ScalarOrSchedule:
    if mult == 1.0:
        return lr
    if callable(lr):
        return lambda step: mult * lr(step)
    return mult * lr


def make_optimizer(kind: Literal["sgd", "adam", "adamw"], lr_schedule: ScalarOrSchedule,
                   momentum: float = 0.9, weight_decay: float | None = None,
                   betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                   head_lr_mult: float = 10.0, head_predicate: PathPredicate = is_head,
                   frozen_predicate: PathPredicate = never) -> optax.GradientTransformation:
    """One role's optimiser.

    Args:
      kind: "sgd": PyTorch's SGD: g += wd * p, then momentum buf = momentum * buf + g, then
        p -= lr * buf (no dampening, no Nesterov). "adam": PyTorch's Adam with L2 weight decay
        (g += wd * p before the moments, i.e. not AdamW) and ``betas``, ``eps`` outside the sqrt.
        "adamw": PyTorch's AdamW, the decay decoupled from the moments (p -= lr * wd * p).
      lr_schedule: a float or a step -> lr function, e.g. ``poly_schedule``; it is the body lr.
      momentum: SGD momentum; ignored by Adam.
      weight_decay: None picks the papers' default per kind: 5e-4 for SGD (DeepLab), 0 for Adam
        (the reference discriminators and translators use none). Applied to every trainable
        parameter, biases included, as the reference param groups do.
      betas: Adam (beta1, beta2); the adaptation papers use (0.9, 0.99).
      head_lr_mult: multiplier of the lr of parameters matched by ``head_predicate``. Scaling the
        lr after the momentum trace is exactly PyTorch's separate param group with 10x lr.
      frozen_predicate: parameters that get zero updates (e.g. ``is_batchnorm`` when BN affine
        parameters are frozen, or ``under_prefixes([...])``); they hold no optimiser state.
    """
    if kind == "sgd":
        wd = 5e-4 if weight_decay is None else weight_decay

        def role_chain(lr):
            return optax.chain(
                optax.add_decayed_weights(wd) if wd else optax.identity(),
                optax.trace(decay=momentum, nesterov=False) if momentum else optax.identity(),
                optax.scale_by_learning_rate(lr),
            )
    elif kind == "adam":
        wd = 0.0 if weight_decay is None else weight_decay

        def role_chain(lr):
            return optax.chain(
                optax.add_decayed_weights(wd) if wd else optax.identity(),
                optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=eps),
                optax.scale_by_learning_rate(lr),
            )
    elif kind == "adamw":
        wd = 1e-2 if weight_decay is None else weight_decay  # PyTorch AdamW's default

        def role_chain(lr):
            # Decoupled decay: p -= lr * (adam_update + wd * p), PyTorch's AdamW.
            return optax.chain(
                optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=eps),
                optax.add_decayed_weights(wd) if wd else optax.identity(),
                optax.scale_by_learning_rate(lr),
            )
    else:
        raise ValueError(f"unknown optimizer kind {kind!r}; expected 'sgd', 'adam' or 'adamw'")

    transforms = {
        BODY: role_chain(lr_schedule),
        HEAD: role_chain(_scaled(lr_schedule, head_lr_mult)),
        FROZEN: optax.set_to_zero(),
    }
    return optax.multi_transform(
        transforms,
        lambda params: label_params(params, head_predicate, frozen_predicate))


def current_lrs(lr_schedule: ScalarOrSchedule, step, head_lr_mult: float = 10.0
                ) -> dict[str, jax.Array]:
    """{"base": lr, "head": lr} at ``step`` as float32 scalars (to log as ``lr/seg``, ...).

    Jittable (``step`` may be traced: train steps report their lr as a metric); ``float()`` the
    values on the host. ``step`` counts the updates already applied (optax's count), so step 0 is
    the lr of the first update.
    """
    base = lr_schedule(step) if callable(lr_schedule) else lr_schedule
    base = jnp.asarray(base, jnp.float32)
    return {"base": base, "head": base * jnp.float32(head_lr_mult)}
