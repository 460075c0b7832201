"""The Method protocol and the plumbing every segmentation method shares.

A method owns its networks, losses and update rules. `train.py` only calls `init`,
`train_step` (jitted, with the state donated) and `predict`; it never looks inside a role.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from synseg_jax import images, optim
from synseg_jax.models import segmenters
from synseg_jax.state import RoleState, TrainState

Batch = dict[str, dict[str, jax.Array]]
Metrics = dict[str, jax.Array]


class Method(Protocol):
    roles: tuple[str, ...]

    def init(self, rng: jax.Array, batch: Batch, pretrained: dict | None = None) -> TrainState:
        """A fresh state; `pretrained` holds {"params", "batch_stats"} of the backbone."""

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """Pure; scalar metrics named "loss/<term>", "lr/<role>", ..."""

    def predict(self, seg_variables: dict, images: jax.Array) -> jax.Array:
        """Logits of the `seg` role at feature resolution (evaluation upsamples them)."""


def segmenter_from_config(model: ml_collections.ConfigDict) -> nn.Module:
    """The segmenter `model.name`, given those of the model.* fields its class declares."""
    fields = {
        "depth": model.depth, "width": model.width,
        "output_stride": model.output_stride, "bn_mode": model.bn_mode,
        "aspp_rates": tuple(model.aspp_rates), "aspp_two_branch": model.aspp_two_branch,
        "multi_level": model.multi_level,
    }
    # Empty stage sizes keep the class's full-size default (VGG16, STDC1, ResNet depth).
    if model.stage_sizes:
        fields["stage_sizes"] = tuple(model.stage_sizes)
    if style := resnet_style(model):
        fields["style"] = style
    cls = segmenters.SEGMENTERS.get(model.name)
    declared = {f.name for f in dataclasses.fields(cls)} if cls is not None else set(fields)
    return segmenters.build_segmenter(
        model.name, model.num_classes, **{k: v for k, v in fields.items() if k in declared})


def resnet_style(model: ml_collections.ConfigDict) -> str:
    """`model.style`, or when it is empty the style of segmenter `model.name`'s own ResNet (that of
    the weights its paper starts from); "" for a segmenter without a ResNet."""
    if model.style:
        return model.style
    cls = segmenters.SEGMENTERS.get(model.name)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if cls is not None else {}
    return defaults.get("style", "")


def optimizer_from_config(o: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
    """The segmenter's optimiser and its body-lr schedule (for logging)."""
    schedule = optim.poly_schedule(o.lr, o.schedule_steps, o.poly_power)
    frozen = [optim.under_prefixes([tuple(p.split("/")) for p in o.frozen_prefixes])]
    if o.freeze_bn_affine:
        frozen.append(optim.is_batchnorm)
    tx = optim.make_optimizer(
        o.kind, schedule, momentum=o.momentum, weight_decay=o.weight_decay,
        head_lr_mult=o.head_lr_mult, frozen_predicate=optim.any_of(*frozen))
    return tx, schedule


def init_role(module: nn.Module, rng: jax.Array, sample: jax.Array,
              tx: optax.GradientTransformation | None) -> RoleState:
    variables = module.init(rng, sample, train=False)
    params = variables.pop("params")
    return RoleState(params=params, collections=dict(variables),
                     opt_state=tx.init(params) if tx is not None else None)


def with_pretrained(role: RoleState, pretrained: dict | None, scope: str,
                    tx: optax.GradientTransformation | None) -> RoleState:
    """Replaces the `scope` subtree (e.g. "backbone"; "" = the whole model) by pretrained ones."""
    if pretrained is None:
        return role

    def replace(tree, new):
        return new if not scope else {**tree, scope: new}

    _check_same_shapes(role.params[scope] if scope else role.params, pretrained["params"],
                       scope or "whole model")
    params = replace(role.params, pretrained["params"])
    collections = dict(role.collections)
    if "batch_stats" in collections and "batch_stats" in pretrained:
        collections["batch_stats"] = replace(collections["batch_stats"], pretrained["batch_stats"])
    return RoleState(params, collections, tx.init(params) if tx is not None else None)


def _check_same_shapes(expected, given, scope: str) -> None:
    want = jax.tree_util.tree_map(jnp.shape, expected)
    got = jax.tree_util.tree_map(jnp.shape, given)
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or want != got:
        raise ValueError(
            f"Pretrained {scope!r} params do not fit the model built from the config "
            f"(model.* sizes differ from those the weights were made with)")


def forward(module: nn.Module, role: RoleState, params: Any, images: jax.Array, *,
            train: bool, update_stats: bool, rng: jax.Array | None = None) -> tuple[dict, dict]:
    """Runs a segmenter; returns (outputs, collections after the call).

    With bn_mode="train" the batch is normalised by its own statistics; the running statistics
    are updated only when `update_stats` (the config chooses which domains do). `rng` feeds
    dropout, which runs only in training.
    """
    variables = {"params": params, **role.collections}
    rngs = {"dropout": rng} if (train and rng is not None) else None
    if train and getattr(module, "bn_mode", "frozen") == "train" and "batch_stats" in role.collections:
        out, updated = module.apply(variables, images, train=True, mutable=["batch_stats"],
                                    rngs=rngs)
        return out, ({**role.collections, **updated} if update_stats else role.collections)
    return module.apply(variables, images, train=train, rngs=rngs), role.collections


def apply_gradients(role: RoleState, grads: Any, tx: optax.GradientTransformation,
                    collections: dict | None = None) -> RoleState:
    updates, opt_state = tx.update(grads, role.opt_state, role.params)
    return RoleState(optax.apply_updates(role.params, updates),
                     role.collections if collections is None else collections, opt_state)


def updates_stats(bn_update: str, domain: str) -> bool:
    """Whether `domain` ("source" / "target") updates BN running statistics."""
    if bn_update not in ("source", "target", "both", "none"):
        raise ValueError(f"model.bn_update must be source, target, both or none; got {bn_update!r}")
    return bn_update in (domain, "both")


def resize_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    return images.resize_bilinear(logits, size)
