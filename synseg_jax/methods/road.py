"""ROAD: reality-oriented adaptation (Chen, Li & Van Gool, CVPR 2018).

L = L_seg + lambda_dist * L_dist + lambda_spt * L_spt  (Eq. 5), in one jitted step:

* Target-guided distillation (Sec. 3.1, Eq. 1): a frozen copy of the pretrained backbone (role
  ``teacher``: no optimiser state, BN in inference mode, never updated) sees the target images;
  L_dist is the mean over feature-map positions of the Euclidean distance between the segmenter's
  and the teacher's features at ``method.dist_layer``. ``method.dist_domain="source"`` is the
  paper's "source distillation" ablation (Sec. 4.3); its "frozen layers" ablation is
  ``method.dist=False`` with ``optim.seg.frozen_prefixes``.
* Spatial-aware adaptation (Sec. 3.2, Eqs. 2-4): every feature-map position is mapped back to the
  ORIGINAL image through the batch's ``crop_box`` (so a scaled / flipped random crop sends each
  activation to the region it came from) and scored by its region's own pixel-level domain
  classifier (role ``disc``), behind a gradient-reversal layer. L_spt = sum over regions of the
  region's mean two-domain cross-entropy (source 0, target 1) over the source and target pixels
  that fall in it. The GRL makes the min-max one minimisation: the classifiers descend L_spt, the
  segmenter ascends it.

Teacher initialisation: the teacher is the segmenter's backbone as ``init`` made it, i.e. the
pretrained backbone when ``init.seg.path`` is set (ImageNet, or minicity ``objects`` on the demo),
and the segmenter's own random initial backbone otherwise (tests that skip pretraining). Config
``init.teacher.path`` distils to another file's backbone instead (the paper does not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from synseg_jax import images, losses
from synseg_jax.methods import base
from synseg_jax.models import layers, segmenters
from synseg_jax.state import RoleState, TrainState, init_key, new_state

SOURCE_DOMAIN, TARGET_DOMAIN = 0, 1  # domain labels of Sec. 3.2 (0 source, 1 target)
BACKBONE_SCOPE = segmenters.BACKBONE_SCOPE

# Per segmenter: (backbone kind in segmenters.BACKBONES, fixed backbone kwargs, default distilled
# layer, default layer for the domain classifiers = the feature the segmentation classifier reads).
# VGG distils pool5 rather than fc7: fc7 passes through dropout in training, so a train-mode
# student never matches the inference-mode teacher there even with identical weights.
BACKBONE_OF = {
    "deeplabv2": ("resnet", {}, "layer4", "layer4"),
    "pspnet_r101": ("resnet", {}, "layer4", "layer4"),
    "deeplab_largefov_vgg16": ("vgg", {"variant": "largefov"}, "pool5", "fc7"),
    "fcn8s_vgg16": ("vgg", {"variant": "fcn"}, "pool5", "fc7"),
    "bisenet_stdc813": ("stdc", {}, "stride32", "stride8"),
}


def backbone_kind(model_name: str) -> tuple:
    if model_name not in BACKBONE_OF:
        raise ValueError(f"ROAD has no teacher backbone for segmenter {model_name!r}; "
                         f"known: {sorted(BACKBONE_OF)}")
    return BACKBONE_OF[model_name]


def teacher_backbone(model_name: str, segmenter: nn.Module) -> nn.Module:
    """A standalone backbone with exactly the segmenter's ``backbone`` subtree and behaviour."""
    kind, fixed, _, _ = backbone_kind(model_name)
    cls = segmenters.BACKBONES[kind]
    shared = {f.name: getattr(segmenter, f.name) for f in dataclasses.fields(cls)
              if f.name not in ("parent", "name") and f.name not in fixed
              and hasattr(segmenter, f.name)}
    return cls(**shared, **fixed)


def region_ids(crop_box: jax.Array, out_h: int, out_w: int,
               grid: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Region of each position of an ``out_h x out_w`` map, from where it lies in the original image.

    Regions are a ``grid = (rows, cols)`` partition of the original image, numbered row-major
    (region ``r * cols + c``). Returns (ids int32 [B, out_h, out_w], valid bool [B, out_h, out_w]);
    positions whose centre falls outside the image (padding of a crop larger than the scaled
    image) are not valid.
    """
    rows, cols = grid
    y, x = images.crop_box_grid(crop_box, out_h, out_w, xp=jnp)
    valid = (y >= 0) & (y <= 1) & (x >= 0) & (x <= 1)
    r = jnp.clip(jnp.floor(y * rows), 0, rows - 1).astype(jnp.int32)
    c = jnp.clip(jnp.floor(x * cols), 0, cols - 1).astype(jnp.int32)
    return r * cols + c, valid


class RegionClassifiers(nn.Module):
    """``num_regions`` independent pixel-level domain classifiers (1x1 convs: hidden -> ReLU -> 2).

    All classifiers run on every position (one einsum per layer, weights [M, in, out]); the loss
    keeps each position's own region's output, so a classifier only learns from its region.
    Returns [..., M, 2] domain logits.
    """

    num_regions: int
    hidden: Sequence[int] = (1024, 1024)
    num_domains: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.num_regions
        h = jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], m, x.shape[-1]))
        widths = (*self.hidden, self.num_domains)
        for i, width in enumerate(widths):
            kernel = self.param(f"kernel{i}", nn.initializers.variance_scaling(
                1.0 if i == len(widths) - 1 else 2.0, "fan_in", "normal", in_axis=-2,
                out_axis=-1, batch_axis=(0,)), (m, h.shape[-1], width))
            bias = self.param(f"bias{i}", nn.initializers.zeros, (m, width))
            h = jnp.einsum("...mc,mco->...mo", h, kernel) + bias
            if i < len(widths) - 1:
                h = nn.relu(h)
        return h


def spatial_domain_loss(logits: jax.Array, regions: jax.Array, valid: jax.Array,
                        domains: jax.Array, num_regions: int) -> tuple[jax.Array, jax.Array]:
    """ROAD Eqs. 2-3: sum over regions of the mean domain cross-entropy of the region's pixels.

    Args:
      logits: [N, M, 2] every classifier's logits at N pixels (both domains flattened together).
      regions: int [N] region of each pixel; valid: bool [N]; domains: int [N] domain labels.
    Returns (L_spt, accuracy of each pixel's own classifier over the valid pixels).
    """
    own = jnp.take_along_axis(logits.astype(jnp.float32), regions[:, None, None], axis=1)[:, 0]
    ce = optax.softmax_cross_entropy_with_integer_labels(own, domains)
    member = jax.nn.one_hot(regions, num_regions, dtype=jnp.float32) * valid[:, None]
    sums, counts = member.T @ ce, member.sum(0)
    loss = jnp.sum(jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0))
    correct = (jnp.argmax(own, -1) == domains) & valid
    accuracy = correct.sum() / jnp.maximum(valid.sum(), 1)
    return loss, accuracy


class Road:
    """ROAD-Net: source CE + target-guided distillation + spatial-aware adversarial adaptation."""

    # The method.* fields it reads, declared by configs/road.py.
    config_fields = ("dist", "dist_domain", "dist_layer", "lambda_dist", "spt", "spt_layer", "grid",
                     "lambda_spt", "disc_hidden")

    def __init__(self, config: ml_collections.ConfigDict):
        me = config.method
        self.seg = base.Segmenter.from_config(config)
        self.model = self.seg.model
        self.dist, self.spt = me.dist, me.spt
        self.lambda_dist, self.lambda_spt = me.lambda_dist, me.lambda_spt
        if me.dist_domain not in ("target", "source"):
            raise ValueError(f"method.dist_domain must be 'target' or 'source', got "
                             f"{me.dist_domain!r}")
        self.dist_domain = me.dist_domain
        self.grid = tuple(me.grid)
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"method.grid must be (rows, cols) >= 1, got {me.grid}")
        _, _, dist_default, spt_default = backbone_kind(config.model.name)
        self.dist_layer = me.dist_layer or dist_default
        self.spt_layer = me.spt_layer or spt_default
        self.needs_target = self.spt or (self.dist and self.dist_domain == "target")
        if self.needs_target and not config.data.target:
            raise ValueError("ROAD's target-guided distillation / spatial adaptation need target "
                             "images: set data.target (or method.dist_domain=source, spt=False)")
        self.teacher = teacher_backbone(config.model.name, self.model)
        self.disc = RegionClassifiers(self.grid[0] * self.grid[1], tuple(me.disc_hidden))
        self.disc_opt = base.role_optimizer(config.optim, "disc") if self.spt else None
        self.roles = ("seg",) + ("teacher",) * self.dist + ("disc",) * self.spt

    def init(self, rng, batch, pretrained) -> TrainState:
        sample = batch["source"]["image"]
        seg = self.seg.init_role(init_key(rng, "seg"), sample, pretrained)
        roles = {"seg": seg}
        features = self.seg.output_shapes(seg, sample.shape)["features"]
        wanted = [self.dist_layer] * self.dist + [self.spt_layer] * self.spt
        for layer in wanted:
            if layer not in features:
                raise ValueError(f"ROAD layer {layer!r} is not a backbone feature; this "
                                 f"segmenter has {sorted(features)}")
        if self.dist:
            # The segmenter's initial backbone: the pretrained one when given (see module doc).
            # Copied, so that the teacher never shares a (donated) buffer with the segmenter.
            copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731
            teacher = RoleState(
                params=copy(seg.params[BACKBONE_SCOPE]),
                collections={k: copy(v[BACKBONE_SCOPE]) for k, v in seg.collections.items()
                             if BACKBONE_SCOPE in v},
                opt_state=None)
            roles["teacher"] = base.with_pretrained(teacher, pretrained.get("teacher"), "", None)
        if self.spt:
            channels = features[self.spt_layer].shape[-1]
            roles["disc"] = base.init_params_role(self.disc, init_key(rng, "disc"),
                                                  jnp.zeros((1, 1, 1, channels), jnp.float32),
                                                  self.disc_opt.tx)
        return new_state(rng, roles)

    # --- losses -----------------------------------------------------------------------------

    def teacher_features(self, teacher: RoleState, images: jax.Array) -> jax.Array:
        """The frozen pretrained backbone's features: inference BN, no dropout, no gradient."""
        out = self.teacher.apply(teacher.variables, images, train=False)
        return jax.lax.stop_gradient(out[self.dist_layer])

    def spatial_loss(self, disc_params, feats_and_boxes) -> tuple[jax.Array, jax.Array]:
        """L_spt over [(features, crop_box, domain label), ...] of both domains."""
        logits, regions, valid, domains = [], [], [], []
        for feats, crop_box, domain in feats_and_boxes:
            b, h, w, c = feats.shape
            ids, ok = region_ids(crop_box, h, w, self.grid)
            # The GRL: identity forward; the segmenter receives the negated gradient.
            reversed_feats = layers.grad_reverse(feats)
            logits.append(self.disc.apply({"params": disc_params},
                                          reversed_feats).reshape(b * h * w, -1, 2))
            regions.append(ids.reshape(-1))
            valid.append(ok.reshape(-1))
            domains.append(jnp.full((b * h * w,), domain, jnp.int32))
        cat = lambda xs: jnp.concatenate(xs, axis=0)  # noqa: E731
        return spatial_domain_loss(cat(logits), cat(regions), cat(valid), cat(domains),
                                   self.grid[0] * self.grid[1])

    def road_loss(self, seg_params, disc_params, state: TrainState, batch):
        """Eq. 5 as a function of the trained roles' params; returns (total, (terms, collections))."""
        seg = state.roles["seg"]
        source = batch["source"]
        out_s, collections = self.seg.train_forward(seg, seg_params, source["image"], "source",
                                                    state)
        total, terms = self.seg.loss(out_s, source["label"])
        out_t = None
        if self.needs_target:
            target = batch["target"]
            out_t, collections = self.seg.train_forward(seg, seg_params, target["image"],
                                                        "target", state, collections)
        if self.dist:
            on_target = self.dist_domain == "target"
            images = batch["target" if on_target else "source"]["image"]
            student = (out_t if on_target else out_s)["features"][self.dist_layer]
            dist = losses.feature_distance(
                student, self.teacher_features(state.roles["teacher"], images))
            terms["loss/dist"] = dist
            total = total + self.lambda_dist * dist
        if self.spt:
            spt, accuracy = self.spatial_loss(disc_params, [
                (out_s["features"][self.spt_layer], source["crop_box"], SOURCE_DOMAIN),
                (out_t["features"][self.spt_layer], batch["target"]["crop_box"], TARGET_DOMAIN)])
            terms["loss/spt"] = spt
            terms["train/domain_accuracy"] = accuracy
            total = total + self.lambda_spt * spt
        terms["loss/total"] = total
        return total, (terms, collections)

    # --- the step ---------------------------------------------------------------------------

    def train_step(self, state: TrainState, batch):
        seg = state.roles["seg"]
        disc_params = state.roles["disc"].params if self.spt else None
        grad_fn = jax.value_and_grad(self.road_loss, argnums=(0, 1), has_aux=True)
        (_, (terms, collections)), (seg_grads, disc_grads) = grad_fn(
            seg.params, disc_params, state, batch)
        roles = dict(state.roles)
        roles["seg"] = base.apply_gradients(seg, seg_grads, self.seg.opt.tx, collections)
        metrics = {**terms, **self.seg.opt.lr_metrics(state.step)}
        if self.spt:
            roles["disc"] = base.apply_gradients(state.roles["disc"], disc_grads,
                                                 self.disc_opt.tx)
            metrics.update(self.disc_opt.lr_metrics(state.step))
        return state.replace(step=state.step + 1, roles=roles), metrics

    def predict(self, seg_variables, images):
        return self.seg.predict(seg_variables, images)
