"""Output-space adversarial adaptation (AdaptSegNet, Tsai et al., CVPR 2018), for any segmenter.

One discriminator per adapted output (``method.adv_outputs``: "logits", and for multi-level
"aux_logits", "aux_logits2"), each a role of its own (``disc``, ``disc_aux``, ``disc_aux2``) with
its own optax state from ``optim.disc``. Outputs are upsampled to their input images' size and
softmaxed before a discriminator sees them, as in AdaptSegNet. One jitted step does both updates:

1. the segmenter minimises L_seg(source) + sum_l lambda_adv[l] * BCE(D_l(P_t^l), source label)
   (plus, optionally, FDA's robust entropy of the target prediction, weight ``ent_weight``, and,
   when the target is pseudo-labelled, ``lambda_pseudo`` x its segmentation loss: the
   self-training round of FDA and real-time DA); the discriminators are constants here;
2. each discriminator minimises 1/2 BCE(D_l(P_s^l), source) + 1/2 BCE(D_l(P_t^l), target) on the
   same step's predictions with their gradients stopped (AdaptSegNet's detached predictions).

Domain labels: source 0, target 1 (AdaptSegNet). FDA (config ``fda``) is an input option of the
loop, so "adversarial + FDA" is this method with ``fda.beta`` set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from synseg_jax import images, losses
from synseg_jax.methods import base
from synseg_jax.models.discriminators import OutputDiscriminator
from synseg_jax.state import TrainState, init_key, new_state

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # AdaptSegNet's domain labels


# The role of each output's discriminator.
DISC_ROLES = {"logits": "disc", "aux_logits": "disc_aux", "aux_logits2": "disc_aux2"}
OUTPUTS = tuple(DISC_ROLES)


def fooling_loss(disc_logits: jax.Array) -> jax.Array:
    """The segmenter's adversarial term: BCE of the discriminator's view of target predictions
    against the source label (the segmenter wants them judged source)."""
    return losses.bce_with_logits(disc_logits, SOURCE_LABEL)


def domain_loss(d_source: jax.Array, d_target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A discriminator's loss, 1/2 BCE(source maps, source label) + 1/2 BCE(target maps, target
    label), and how often it tells the domains apart (a logit > 0 judges "target")."""
    loss = 0.5 * (losses.bce_with_logits(d_source, SOURCE_LABEL)
                  + losses.bce_with_logits(d_target, TARGET_LABEL))
    accuracy = 0.5 * (jnp.mean(d_source < 0) + jnp.mean(d_target > 0))
    return loss, accuracy


def disc_map_picture(disc_logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """A discriminator's map as a uint8 gray picture at `size` (white: judged target)."""
    return images.gray_to_uint8(images.resize_nearest(jax.nn.sigmoid(disc_logits), size))


def probabilities(logits: jax.Array, size: tuple[int, int], align_corners: bool = False
                  ) -> jax.Array:
    """What a discriminator sees: the softmax of logits upsampled to the image size."""
    return jax.nn.softmax(images.resize_bilinear(logits.astype(jnp.float32), size, align_corners),
                          axis=-1)


class Adversarial:
    """Segmenter + output-space discriminators, trained as a min-max in one step."""

    config_fields = ("adv_outputs", "lambda_adv", "disc_widths", "ent_weight", "ent_eta",
                     "lambda_pseudo")

    def __init__(self, config: ml_collections.ConfigDict):
        me = config.method
        self.seg = base.Segmenter.from_config(config)
        self.model = self.seg.model
        self.outputs = tuple(me.adv_outputs)
        self.lambdas = tuple(float(x) for x in me.lambda_adv)
        bad = [o for o in self.outputs if o not in OUTPUTS]
        if bad or not self.outputs or len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"method.adv_outputs must name distinct segmenter outputs among "
                             f"{OUTPUTS}, got {self.outputs}")
        if len(self.lambdas) != len(self.outputs):
            raise ValueError(f"method.lambda_adv needs one weight per adapted output "
                             f"{self.outputs}, got {self.lambdas}")
        if not config.data.target:
            raise ValueError("Adversarial adaptation needs target images: set data.target")
        self.disc = OutputDiscriminator(tuple(me.disc_widths))
        self.disc_opt = base.role_optimizer(config.optim, "disc")
        self.ent_weight, self.ent_eta = float(me.ent_weight), float(me.ent_eta)
        # A pseudo-labelled target (a sweep stage's dataset, data.target_labels) adds its CE.
        self.lambda_pseudo = float(me.lambda_pseudo) if config.data.target_labels else 0.0
        self.normalization = config.data.normalization
        self.disc_roles = tuple(DISC_ROLES[o] for o in self.outputs)
        self.roles = ("seg",) + self.disc_roles

    def init(self, rng, batch, pretrained) -> TrainState:
        sample = batch["source"]["image"]
        seg = self.seg.init_role(init_key(rng, "seg"), sample, pretrained)
        out = self.seg.output_shapes(seg, sample.shape)
        missing = [o for o in self.outputs if o not in out]
        if missing:
            raise ValueError(f"method.adv_outputs {missing} are not outputs of segmenter "
                             f"{type(self.model).__name__} (it has {sorted(k for k in out if 'logits' in k)}; "
                             "multi-level DeepLabV2 needs model.multi_level=True)")
        roles = {"seg": seg}
        num_classes = out["logits"].shape[-1]
        for role in self.disc_roles:
            roles[role] = base.init_params_role(self.disc, init_key(rng, role),
                                                jnp.zeros((1, 32, 32, num_classes), jnp.float32),
                                                self.disc_opt.tx)
        return new_state(rng, roles)

    def segmenter_loss(self, seg_params, state: TrainState, batch):
        seg = state.roles["seg"]
        source, target = batch["source"], batch["target"]
        out_s, collections = self.seg.train_forward(seg, seg_params, source["image"], "source",
                                                    state)
        total, terms = self.seg.loss(out_s, source["label"])
        out_t, collections = self.seg.train_forward(seg, seg_params, target["image"], "target",
                                                    state, collections)
        if self.lambda_pseudo:
            pseudo, pseudo_terms = self.seg.pseudo_loss(out_t, target["label"])
            terms.update(pseudo_terms)
            total = total + self.lambda_pseudo * pseudo
        probs = {}
        for output, role, lam in zip(self.outputs, self.disc_roles, self.lambdas):
            p_s = probabilities(out_s[output], source["image"].shape[1:3], self.seg.align_corners)
            p_t = probabilities(out_t[output], target["image"].shape[1:3], self.seg.align_corners)
            fooled = self.disc.apply({"params": state.roles[role].params}, p_t)
            adv = fooling_loss(fooled)
            terms["loss/adv" + role[len("disc"):]] = adv
            total = total + lam * adv
            probs[role] = (jax.lax.stop_gradient(p_s), jax.lax.stop_gradient(p_t))
        if self.ent_weight:
            ent = losses.robust_entropy(
                images.resize_bilinear(out_t["logits"], target["image"].shape[1:3],
                                       self.seg.align_corners), self.ent_eta)
            terms["loss/entropy"] = ent
            total = total + self.ent_weight * ent
        terms["loss/total"] = total
        return total, (terms, collections, probs)

    def discriminator_loss(self, disc_params, p_s, p_t):
        return domain_loss(self.disc.apply({"params": disc_params}, p_s),
                           self.disc.apply({"params": disc_params}, p_t))

    def train_step(self, state: TrainState, batch):
        seg = state.roles["seg"]
        grad_fn = jax.value_and_grad(self.segmenter_loss, has_aux=True)
        (_, (terms, collections, probs)), grads = grad_fn(seg.params, state, batch)
        roles = dict(state.roles)
        roles["seg"] = base.apply_gradients(seg, grads, self.seg.opt.tx, collections)
        metrics = {**terms, **self.seg.opt.lr_metrics(state.step),
                   **self.disc_opt.lr_metrics(state.step)}
        for role in self.disc_roles:
            disc_grad_fn = jax.value_and_grad(self.discriminator_loss, has_aux=True)
            (loss, accuracy), disc_grads = disc_grad_fn(state.roles[role].params, *probs[role])
            roles[role] = base.apply_gradients(state.roles[role], disc_grads, self.disc_opt.tx)
            suffix = role[len("disc"):]
            metrics["loss/disc" + suffix] = loss
            metrics["train/disc_accuracy" + suffix] = accuracy
        return state.replace(step=state.step + 1, roles=roles), metrics

    def predict(self, seg_variables, images_):
        return self.seg.predict(seg_variables, images_)

    def summaries(self, state: TrainState, batch) -> dict[str, jax.Array]:
        """The target images and the main discriminator's map on them (white: judged target),
        upsampled to the image size (the loop adds the source pictures)."""
        shown = batch["target"]["image"][:base.SUMMARY_IMAGES]
        out = {}
        logits = self.predict(state.roles["seg"].variables, shown)
        d = self.disc.apply({"params": state.roles[self.disc_roles[0]].params},
                            probabilities(logits, shown.shape[1:3], self.seg.align_corners))
        out["train/target_image"] = images.to_uint8(shown, self.normalization, xp=jnp)
        out["train/target_disc_map"] = disc_map_picture(d, shown.shape[1:3])
        return out
