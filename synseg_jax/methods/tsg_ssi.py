"""Texture/shape domain generalisation (Li, Li & Guo, "Synthetic-to-real generalization for
semantic segmentation"): source-only training of a segmenter with TSG / SSI modules
(``model.tsg`` / ``model.ssi``, see models/tsg_ssi.py) plus a boundary loss on the SSI edge maps.

    L_total = L_seg + lambda * L_boundary                                    (paper Eq. 5)
    L_boundary = sum over the SSI edge maps and the fused one of l_boundary   (Eq. 3)
    l_boundary = class-balanced BCE against the boundary ground truth        (Eq. 2)

It is domain *generalisation*: training reads labelled source images only; no target image is
ever opened for training (a config with ``data.target`` set is refused). Evaluation scores unseen
domains (``data.eval_split``, ``data.extra_eval_splits``).

Boundary ground truth (``boundary_map``): the paper generates it "by semantic labels" and says no
more. Here a pixel is a boundary pixel when a pixel of another class lies in its
(2r+1) x (2r+1) neighbourhood (r = ``method.boundary_radius``, 1: the 8 neighbours, a boundary
two pixels wide, one on each side). Ignore pixels (255, or any id outside the classes) are
neither boundary nor non-boundary: they are left out of the loss, and they do not make a
neighbour a boundary pixel either (what lies under a void region is unknown, so a class next to
void is not an edge by that alone). Pixels beyond the image border count as void.

Class-balanced BCE (``class_balanced_bce``): per image, beta = |Y-| / |Y| with Y+ the boundary
pixels and Y- the others (HED's weighting, which Eq. 2 writes: beta weighs the terms of the
boundary pixels y = 1; the paper's sentence after Eq. 3 names the two sets the other way round,
but with beta on the rare class the two classes weigh the same in total, the point of the
balance). Eq. 2 and Eq. 4 are both sums over pixels; this project's L_seg is the mean over the
counted pixels (``losses.cross_entropy``), so the boundary sum is divided by its counted pixels
too, which keeps the ratio lambda sets. An image (or batch) with no counted pixel adds 0, never
nan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from synseg_jax import images
from synseg_jax.losses import IGNORE_LABEL
from synseg_jax.methods import base
from synseg_jax.state import TrainState

EDGE_OUTPUT = "edge_logits"  # the segmenter output holding the SSI edge maps (models/tsg_ssi.py)


def boundary_map(labels: jax.Array, radius: int = 1, ignore_index: int = IGNORE_LABEL,
                 num_classes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Boundary ground truth of int labels [B, H, W]: (edges, valid), both bool [B, H, W].

    valid: the pixel holds a class (not `ignore_index`, and below `num_classes` when given).
    edges: valid, and some valid pixel within `radius` (Chebyshev distance) holds another class.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected labels [B, H, W], got {labels.shape}")
    if radius < 1:
        raise ValueError(f"boundary radius must be >= 1, got {radius}")
    lab = labels.astype(jnp.int32)
    valid = (lab != ignore_index) & (lab >= 0)
    if num_classes is not None:
        valid &= lab < num_classes
    h, w = lab.shape[1:]
    r = radius
    pad = ((0, 0), (r, r), (r, r))
    lab_p = jnp.pad(jnp.where(valid, lab, -1), pad, constant_values=-1)
    valid_p = jnp.pad(valid, pad, constant_values=False)
    edges = jnp.zeros_like(valid)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy == 0 and dx == 0:
                continue
            nb = lab_p[:, r + dy:r + dy + h, r + dx:r + dx + w]
            nb_valid = valid_p[:, r + dy:r + dy + h, r + dx:r + dx + w]
            edges |= nb_valid & (nb != lab)
    return edges & valid, valid


def class_balanced_bce(logits: jax.Array, edges: jax.Array, valid: jax.Array) -> jax.Array:
    """Class-balanced BCE with logits (paper Eq. 2, HED's), mean over the counted pixels.

    logits: [B, H, W] or [B, H, W, 1]; edges, valid: bool [B, H, W]. Per image,
    beta = |Y-| / (|Y-| + |Y+|) with Y+ = edges & valid, Y- = ~edges & valid; the loss is
    sum(-beta log sigmoid(x) over Y+, -(1 - beta) log(1 - sigmoid(x)) over Y-) over the batch
    divided by its counted pixels. 0 (zero gradients) when nothing is counted.
    """
    x = logits.astype(jnp.float32)
    if x.ndim == 4:
        x = x[..., 0]
    if x.shape != edges.shape or edges.shape != valid.shape:
        raise ValueError(f"shape mismatch: logits {logits.shape}, edges {edges.shape}, "
                         f"valid {valid.shape}")
    pos = edges & valid
    neg = valid & ~edges
    n_pos = pos.sum(axis=(1, 2)).astype(jnp.float32)
    n_neg = neg.sum(axis=(1, 2)).astype(jnp.float32)
    count = n_pos + n_neg
    beta = (n_neg / jnp.maximum(count, 1.0))[:, None, None]
    # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x): finite for any x.
    per_pixel = jnp.where(pos, beta * jax.nn.softplus(-x),
                          jnp.where(neg, (1.0 - beta) * jax.nn.softplus(x), 0.0))
    return per_pixel.sum() / jnp.maximum(count.sum(), 1.0)


def edge_map_names(ssi: tuple[int, ...]) -> tuple[str, ...]:
    """Names of the edge maps in "edge_logits" order: ssi<layer> for each SSI, then fused."""
    return tuple(f"ssi{s}" for s in sorted(ssi)) + ("fused",)


def boundary_loss(edge_logits: tuple[jax.Array, ...], labels: jax.Array, names: tuple[str, ...],
                  radius: int = 1, num_classes: int | None = None, align_corners: bool = False
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_boundary (paper Eq. 3): the sum of ``class_balanced_bce`` over every edge map, each
    bilinearly resized to the label size when it is not there already. Returns (sum, terms
    "loss/boundary_<name>" and "train/boundary_fraction", the share of counted pixels on an
    edge)."""
    edges, valid = boundary_map(labels, radius, num_classes=num_classes)
    total = jnp.zeros((), jnp.float32)
    terms = {}
    for name, logits in zip(names, edge_logits, strict=True):
        if logits.shape[1:3] != labels.shape[1:3]:
            logits = images.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3],
                                            align_corners)
        term = class_balanced_bce(logits, edges, valid)
        terms[f"loss/boundary_{name}"] = term
        total = total + term
    terms["train/boundary_fraction"] = edges.sum() / jnp.maximum(valid.sum(), 1)
    return total, terms


class TsgSsi:
    """Source-only segmentation + lambda x boundary loss on the segmenter's SSI edge maps."""

    roles = ("seg",)
    config_fields = ("lambda_boundary", "boundary_radius")

    def __init__(self, config: ml_collections.ConfigDict):
        if config.data.target:
            raise ValueError(
                f"tsg_ssi is domain generalisation: training reads the source only, but "
                f"data.target={config.data.target!r} is set; set data.target='' (evaluation "
                f"splits are data.eval_split / data.extra_eval_splits)")
        me = config.method
        # This config file sets model.tsg / model.ssi, so the override check (which looks at
        # fields an override changed) does not see a segmenter that lacks them.
        dropped = [f"model.{f}" for f in ("tsg", "ssi")
                   if config.model.get(f) and f in base.undeclared_fields(config.model)]
        if dropped:
            raise ValueError(f"{', '.join(dropped)} set, but segmenter {config.model.name!r} has "
                             f"no TSG / SSI (ResNet segmenters have: deeplabv2, pspnet_r101); "
                             f"unset them for a plain run")
        self.seg = base.Segmenter.from_config(config)
        self.model = self.seg.model
        self.lambda_boundary = float(me.lambda_boundary)
        self.radius = int(me.boundary_radius)
        if self.radius < 1:
            raise ValueError(f"method.boundary_radius must be >= 1, got {self.radius}")
        self.num_classes = config.model.num_classes
        self.edge_names = edge_map_names(tuple(config.model.get("ssi", ())))
        self.normalization = config.data.normalization

    def init(self, rng, batch, pretrained) -> TrainState:
        return self.seg.init_state(rng, batch, pretrained)

    def loss(self, out: dict, labels: jax.Array) -> tuple[jax.Array, dict]:
        """L_seg (+ aux outputs) + lambda L_boundary when the segmenter has edge maps."""
        total, terms = self.seg.loss(out, labels)
        if EDGE_OUTPUT in out:
            boundary, boundary_terms = boundary_loss(
                out[EDGE_OUTPUT], labels, self.edge_names, self.radius, self.num_classes,
                self.seg.align_corners)
            terms.update(boundary_terms)
            terms["loss/boundary"] = boundary
            total = total + self.lambda_boundary * boundary
        terms["loss/total"] = total
        return total, terms

    def train_step(self, state: TrainState, batch):
        role = state.roles["seg"]
        source = batch["source"]  # the only domain: a target is never read

        def loss_fn(params):
            out, collections = self.seg.train_forward(role, params, source["image"], "source",
                                                      state)
            total, terms = self.loss(out, source["label"])
            return total, (terms, collections)

        return self.seg.update(state, loss_fn)

    def predict(self, seg_variables, images_):
        return self.seg.predict(seg_variables, images_)

    def summaries(self, state: TrainState, batch) -> dict[str, jax.Array]:
        """"train/edges": per source image, side by side, the boundary ground truth (white edge,
        black non-edge, gray ignore), then sigmoid of each SSI's edge map and of the fused one
        (inference mode), in "edge_logits" order (``edge_map_names``)."""
        source = batch["source"]
        shown = source["image"][:base.SUMMARY_IMAGES]
        labels = source["label"][:base.SUMMARY_IMAGES]
        edges, valid = boundary_map(labels, self.radius, num_classes=self.num_classes)
        panels = [images.gray_to_uint8(jnp.where(valid, edges.astype(jnp.float32), 0.5))]
        out = self.model.apply(state.roles["seg"].variables, shown, train=False)
        for logits in out.get(EDGE_OUTPUT, ()):
            if logits.shape[1:3] != labels.shape[1:3]:
                logits = images.resize_bilinear(logits, labels.shape[1:3])
            panels.append(images.gray_to_uint8(jax.nn.sigmoid(logits.astype(jnp.float32))))
        return {"train/edges": jnp.concatenate(panels, axis=2)}
