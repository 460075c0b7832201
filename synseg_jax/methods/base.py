"""The Method protocol and the plumbing every segmentation method shares.

A method owns its networks, losses and update rules. `train.py` only calls `init`,
`train_step` (jitted, with the state donated) and `predict`; it never looks inside a role.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import ml_collections
import optax

from synseg_jax import images, losses, optim, trees
from synseg_jax.models import layers, segmenters
from synseg_jax.state import RoleState, TrainState, init_key, new_state

Batch = dict[str, dict[str, jax.Array]]
Metrics = dict[str, jax.Array]


class Method(Protocol):
    """Required: `roles`, `init`, `train_step`, `predict`. Optional hooks, with the loop's
    defaults (see `eval_role_of` here and `train.summaries_of`):

    - ``eval_role: str | None`` -- the role `predict` reads and evaluation restores ("seg");
      None for a stage without a segmenter (a translator), which is then not evaluated.
    - ``summaries(state, batch) -> {name: uint8 [N, H, W, 3]}`` -- the method's own pictures,
      jittable: reconstructions, translated images, edge maps. The loop logs them beside its
      default ones (source input, label and the evaluated role's prediction).
    """

    roles: tuple[str, ...]

    def init(self, rng: jax.Array, batch: Batch, pretrained: dict[str, dict]) -> TrainState:
        """A fresh state. `pretrained` maps a role to the variables tree ({"params",
        "batch_stats"}) that config `init.<role>` names; the method puts it under the role's
        `init.<role>.scope` and initialises the rest from `rng`."""

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """Pure; scalar metrics named "loss/<term>", "lr/<role>", ..."""

    def predict(self, seg_variables: dict, images: jax.Array) -> jax.Array:
        """Logits of the `seg` role at feature resolution (evaluation upsamples them)."""


DEFAULT_EVAL_ROLE = "seg"
def eval_role_of(method) -> str | None:
    return getattr(method, "eval_role", DEFAULT_EVAL_ROLE)


# model.* fields that are arguments of some segmenter classes and not of others.
ARCHITECTURE_FIELDS = ("depth", "width", "output_stride", "bn_mode", "aspp_rates",
                       "aspp_two_branch", "multi_level", "stage_sizes", "style", "tsg", "ssi",
                       "remat")


def undeclared_fields(model: ml_collections.ConfigDict) -> set[str]:
    """The architecture fields of `model` that segmenter `model.name` does not take."""
    cls = segmenters.SEGMENTERS.get(model.name)
    if cls is None:
        return set()
    return set(ARCHITECTURE_FIELDS) - {f.name for f in dataclasses.fields(cls)}


def check_model_overrides(before: ml_collections.ConfigDict,
                          after: ml_collections.ConfigDict) -> None:
    """Overrides took `before` to `after`: a model.* field they set that the chosen segmenter
    does not take would be silently dropped, so it is an error naming the field."""
    changed = sorted(f for f in undeclared_fields(after.model)
                     if f in before.model and before.model[f] != after.model[f])
    if changed:
        raise ValueError(f"model.{changed[0]} is set, but segmenter {after.model.name!r} has no "
                         f"such setting (it would be ignored); unset "
                         f"{', '.join('model.' + f for f in changed)}")


def segmenter_from_config(model: ml_collections.ConfigDict) -> nn.Module:
    """The segmenter `model.name`, given those of the model.* fields its class declares."""
    fields = {
        "depth": model.depth, "width": model.width,
        "output_stride": model.output_stride, "bn_mode": model.bn_mode,
        "aspp_rates": tuple(model.aspp_rates), "aspp_two_branch": model.aspp_two_branch,
        "multi_level": model.multi_level,
        # TSG / SSI placements of ResNet segmenters (models/tsg_ssi.py); configs written before
        # the fields existed have none.
        "tsg": tuple(model.get("tsg", ())), "ssi": tuple(model.get("ssi", ())),
        # Likewise for the precision and memory options (configs/common.py).
        "dtype": layers.compute_dtype(model.get("compute_dtype", "float32")),
        "remat": model.get("remat", False),
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


@dataclasses.dataclass(frozen=True)
class RoleOptimizer:
    """One optimised role's optax transformation and its body-lr schedule (for logging)."""

    role: str
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    head_lr_mult: float

    def lr_metrics(self, step: jax.Array) -> Metrics:
        """"lr/<role>" (and "lr/<role>_head" when the head learns at another rate)."""
        lrs = optim.current_lrs(self.schedule, step, self.head_lr_mult)
        out = {f"lr/{self.role}": lrs["base"]}
        if self.head_lr_mult != 1.0:
            out[f"lr/{self.role}_head"] = lrs["head"]
        return out


def role_optimizer(optim_config: ml_collections.ConfigDict, role: str) -> RoleOptimizer:
    """The optimiser of `role` from its section `config.optim.<role>`."""
    if role not in optim_config:
        raise ValueError(f"config.optim has no section for role {role!r}; sections: "
                         f"{sorted(optim_config.keys())} (add one with "
                         f"configs.common.optimizer_section)")
    o = optim_config[role]
    if o.schedule == "poly":
        schedule = optim.poly_schedule(o.lr, o.schedule_steps, o.poly_power)
    elif o.schedule == "constant":
        schedule = optax.constant_schedule(o.lr)
    else:
        raise ValueError(f"optim.{role}.schedule must be 'poly' or 'constant', got {o.schedule!r}")
    schedule = optim.linear_warmup(schedule, o.warmup_steps)
    frozen = [optim.under_prefixes([tuple(p.split("/")) for p in o.frozen_prefixes])]
    if o.freeze_bn_affine:
        frozen.append(optim.is_batchnorm)
    tx = optim.make_optimizer(
        o.kind, schedule, momentum=o.momentum, weight_decay=o.weight_decay,
        betas=tuple(o.betas), head_lr_mult=o.head_lr_mult,
        frozen_predicate=optim.any_of(*frozen))
    return RoleOptimizer(role, tx, schedule, o.head_lr_mult)


# The step key's stream that feeds each domain's dropout.
DROPOUT_STREAMS = {"source": "dropout", "target": "dropout_target"}


@dataclasses.dataclass(frozen=True)
class Segmenter:
    """The trained `seg` role segmentation methods share: the network, its optimiser, the
    auxiliary-loss weight, which domains update BN statistics, and the subtree its initial
    weights replace (`init.seg.scope`)."""

    model: nn.Module
    opt: RoleOptimizer
    aux_weight: float
    bn_update: str
    init_scope: str
    align_corners: bool = False  # how logits are upsampled to label size (model.align_corners)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Segmenter":
        updates_stats(config.model.bn_update, "source")  # validates the setting
        return cls(segmenter_from_config(config.model), role_optimizer(config.optim, "seg"),
                   config.method.aux_weight, config.model.bn_update, config.init.seg.scope,
                   config.model.align_corners)

    def train_forward(self, role: RoleState, params: Any, images: jax.Array, domain: str,
                      state: TrainState, collections: dict | None = None) -> tuple[dict, dict]:
        """The segmenter on one domain's ("source" / "target") images in training mode: dropout
        from the step's key for that domain, BN statistics kept when `model.bn_update` names
        the domain. `collections`: those an earlier call of the step left (default: the
        role's). Returns (outputs, collections after the call)."""
        if collections is not None:
            role = role.replace(collections=collections)
        return forward(self.model, role, params, images, train=True,
                       update_stats=self.updates_stats(domain),
                       rng=state.step_rng(DROPOUT_STREAMS[domain]))

    def loss(self, out: dict, labels: jax.Array) -> tuple[jax.Array, dict]:
        """The supervised loss of every output (see `supervised_loss`) on `labels`."""
        return supervised_loss(out, labels, self.aux_weight, self.align_corners)

    def pseudo_loss(self, out: dict, pseudo_labels: jax.Array) -> tuple[jax.Array, dict]:
        """`loss` on pseudo-labelled target images, its terms logged as loss/pseudo*."""
        total, terms = self.loss(out, pseudo_labels)
        return total, {k.replace("loss/seg", "loss/pseudo"): v for k, v in terms.items()}

    def init_role(self, rng: jax.Array, sample: jax.Array, pretrained: dict) -> RoleState:
        """The `seg` role: fresh init, then `pretrained["seg"]` under its scope when given."""
        return init_segmenter(self.model, rng, sample, self.opt.tx, pretrained.get("seg"),
                              self.init_scope)

    def init_state(self, rng: jax.Array, batch: dict, pretrained: dict) -> TrainState:
        """The state of a method whose only role is this segmenter."""
        return new_state(rng, {"seg": self.init_role(init_key(rng, "seg"),
                                                     batch["source"]["image"], pretrained)})

    def update(self, state: TrainState, loss_fn) -> tuple[TrainState, Metrics]:
        """One step of the `seg` role alone: the gradient of `loss_fn(params) -> (total,
        (terms, collections))`, the optimiser update, and the terms with the step's lr."""
        role = state.roles["seg"]
        (_, (terms, collections)), grads = jax.value_and_grad(loss_fn, has_aux=True)(role.params)
        roles = {**state.roles, "seg": apply_gradients(role, grads, self.opt.tx, collections)}
        return (state.replace(step=state.step + 1, roles=roles),
                {**terms, **self.opt.lr_metrics(state.step)})

    def updates_stats(self, domain: str) -> bool:
        return updates_stats(self.bn_update, domain)

    def output_shapes(self, role: RoleState, image_shape: tuple[int, ...]) -> dict:
        """Shapes of the segmenter's outputs (inference mode) on images of `image_shape`,
        traced, not computed: what a method checks and sizes its other networks by."""
        return jax.eval_shape(
            lambda p, x: self.model.apply({"params": p, **role.collections}, x, train=False),
            role.params, jax.ShapeDtypeStruct(tuple(image_shape), jax.numpy.float32))

    def predict(self, variables: dict, images: jax.Array) -> jax.Array:
        return predict_logits(self.model, variables, images)


def init_segmenter(module: nn.Module, rng: jax.Array, sample: jax.Array,
                   tx: optax.GradientTransformation, pretrained: dict | None,
                   scope: str) -> RoleState:
    """A trained segmenter role: fresh init, then the pretrained `scope` subtree when given."""
    return with_pretrained(init_role(module, rng, sample, tx), pretrained, scope, tx)


def supervised_loss(out: dict, labels: jax.Array, aux_weight: float,
                    align_corners: bool = False) -> tuple[jax.Array, dict]:
    """Cross-entropy on "logits" plus `aux_weight` x that of every auxiliary output.

    Every "aux_logits*" output counts: DeepLabV2 multi-level and PSPNet have one ("aux_logits",
    logged as loss/seg_aux), BiSeNet two ("aux_logits2" too, loss/seg_aux2), which its reference
    code adds with weight 1.
    """
    total = losses.cross_entropy(out["logits"], labels, align_corners=align_corners)
    terms = {"loss/seg": total}
    for key in sorted(k for k in out if k.startswith("aux_logits")):
        aux = losses.cross_entropy(out[key], labels, align_corners=align_corners)
        terms["loss/seg_" + key.replace("_logits", "")] = aux
        total = total + aux_weight * aux
    return total, terms


def predict_logits(module: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """A segmenter's main logits in inference mode (what evaluation and export read)."""
    return module.apply(variables, images, train=False)["logits"]


def init_role(module: nn.Module, rng: jax.Array, sample: jax.Array,
              tx: optax.GradientTransformation | None) -> RoleState:
    variables = module.init(rng, sample, train=False)
    params = variables.pop("params")
    return RoleState(params=params, collections=dict(variables),
                     opt_state=tx.init(params) if tx is not None else None)


def init_params_role(module: nn.Module, rng: jax.Array, sample: jax.Array,
                     tx: optax.GradientTransformation) -> RoleState:
    """A trained role whose network keeps only params (a discriminator, a decoder): fresh init
    on `sample` and its optimiser state."""
    params = module.init(rng, sample)["params"]
    return RoleState(params, {}, tx.init(params))


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
    problem = trees.describe_mismatch(trees.shapes(given), trees.shapes(expected),
                                      "pretrained weights", "model")
    if problem:
        raise ValueError(
            f"Pretrained {scope!r} params do not fit the model built from the config (model.* "
            f"sizes differ from those the weights were made with):\n{problem}")


def forward(module: nn.Module, role: RoleState, params: Any, images: jax.Array, *,
            train: bool, update_stats: bool, rng: jax.Array | None = None) -> tuple[dict, dict]:
    """Runs a network; returns (outputs, collections after the call).

    In training every non-param collection is mutable, so whatever state a layer keeps there
    (BatchNorm running statistics with bn_mode="train", spectral norm's power-iteration vectors)
    can update; the updates are kept only when `update_stats` (the config chooses which domains
    update BN statistics). Frozen BN reads its statistics and leaves them as they were. `rng`
    feeds dropout, which runs only in training.
    """
    variables = {"params": params, **role.collections}
    rngs = {"dropout": rng} if (train and rng is not None) else None
    if train and role.collections:
        out, updated = module.apply(variables, images, train=True,
                                    mutable=list(role.collections), rngs=rngs)
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


SUMMARY_IMAGES = 3  # pictures per summary
