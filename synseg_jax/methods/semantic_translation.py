"""Semantically adaptive image-to-image translation (the translation paper, Sec. 3.1-3.2): the
translator stage of its bidirectional rounds.

Roles, each with its own optax state where it learns:

- ``trans``: the coupled encoders and SPADE generators (``models/translator.Translator``), Adam
  with TTUR (``optim.trans``);
- ``disc_img``: the per-domain multi-scale PatchGANs (``models/translator.ImageDiscriminators``),
  Adam at the faster rate (``optim.disc_img``);
- ``seg``: the segmenter of the previous stage, frozen (no optimiser state, inference mode). It
  supplies the semantic maps that condition SPADE and the symmetric cross-entropy; the gradient
  of that loss flows through it into the translator, never into its weights.

One jitted step: the generator objective of Eq. 1

    lambda_gan L_gan + lambda_rec L_rec + lambda_cyc L_cyc + lambda_latent L_latent
    + lambda_sce L_sce      (each term summed over both domains)

is minimised over ``trans``; then each image discriminator takes an LSGAN step on the real
images of its domain against the step's translations into it (gradients stopped). The
segmentation stage of a round is not here: it is ``methods/adversarial.py`` trained on the
translated source (a sweep of this stage's translator) and the pseudo-labelled target
(``configs/semantic_translation.py`` wires the rounds).

Choices where the paper (whose extracted text lost its equations and loss weights) is silent:

- Images: the translator works in RGB [-1, 1] (``images.to_unit_range``); the segmenter sees a
  translation through ``images.from_unit_range``, i.e. in its own input normalisation.
- L_rec, L_cyc, L_latent: mean absolute error (UNIT's and MUNIT's ``recon_criterion``). The
  latent term compares the code of a translation with the code it was decoded from, E_T(s2t)
  against h_s (MUNIT's content reconstruction), without stopping either gradient, as MUNIT.
- Conditioning: every decode of content that came from x_s takes the segmenter's logits of x_s,
  the cycle's second decode included (the paper's appendix A: the logits of the translation
  would give SPADE inconsistent inputs). The logits are constants of the step.
- L_sce, for each direction: H(p, q) + H(q, p) per pixel, averaged, where p and q are the
  segmenter's softmax on the original and on its translation and H(p, q) = -sum_c p_c log q_c.
  The paper's two "contributions" each take one prediction as the label; with a frozen segmenter
  a hard (argmax) label would give the second one no gradient, so both are soft.
- Discriminator updates use the translations of the same step's generator forward, as UNIT's
  trainer would with a one-step lag; the generator and discriminator updates share one forward.
- Spectral norm: its power-iteration vectors (``batch_stats``) advance in the translator's
  forward and in the discriminators' own update; the discriminators judge the generator's
  images in inference mode (the vectors as stored), so one step advances each vector once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from synseg_jax import images
from synseg_jax.methods import base
from synseg_jax.models.translator import (ImageDiscriminators, Translator, conditioning_channels,
                                          lsgan_discriminator_loss, lsgan_generator_loss)
from synseg_jax.state import RoleState, TrainState, init_key, new_state

GAN_TERMS = ("gan", "rec", "cyc", "latent", "sce")


def mean_abs(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def symmetric_cross_entropy(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
    """mean over pixels of H(p_a, p_b) + H(p_b, p_a), H(p, q) = -sum_c p_c log q_c, with the
    softmax of each set of logits (same shape [B, H, W, C])."""
    log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
    log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
    cross = -(jnp.exp(log_a) * log_b + jnp.exp(log_b) * log_a)
    return jnp.mean(jnp.sum(cross, axis=-1))


def check_conditioning(trans_params, num_classes: int, translator_from: str,
                       segmenter_from: str) -> None:
    """A SPADE translator is built for one class count; refuse a segmenter with another."""
    channels = conditioning_channels(trans_params)
    if channels is not None and channels != num_classes:
        raise ValueError(
            f"The translator from {translator_from} is conditioned on {channels} semantic "
            f"channels, but the segmenter from {segmenter_from} predicts {num_classes} classes "
            f"(model.num_classes); use a translator trained with a {num_classes}-class "
            f"segmenter, or the segmenter it was trained with")


class SemanticTranslation:
    """Translator (``trans``) and image discriminators (``disc_img``) trained against a frozen
    segmenter (``seg``); a translator stage has no segmenter to evaluate."""

    eval_role = None
    config_fields = ("translator_dim", "translator_downsample", "translator_res",
                     "translator_shared", "generator_norm", "spade_hidden", "spectral_norm",
                     "spade_spectral_norm", "disc_scales", "disc_dim", "disc_layers",
                     "lambda_gan", "lambda_rec", "lambda_cyc", "lambda_latent", "lambda_sce")

    def __init__(self, config: ml_collections.ConfigDict):
        me = config.method
        if not config.data.target:
            raise ValueError("Semantic translation needs target images: set data.target")
        if not config.init.seg.path:
            raise ValueError(
                "Semantic translation trains its translator against a trained segmenter: set "
                "init.seg.path (with init.seg.scope='') to its weights, or run the recipe "
                "(configs/semantic_translation.py), whose translator stages take the previous "
                "stage's segmenter")
        self.seg = base.Segmenter.from_config(config)
        self.model = self.seg.model
        self.num_classes = config.model.num_classes
        self.seg_from = config.init.seg.path
        self.trans_from = config.init.get("trans", {}).get("path", "") or "(random init)"
        self.translator = Translator(
            dim=me.translator_dim, n_downsample=me.translator_downsample, n_res=me.translator_res,
            n_shared=me.translator_shared, norm=me.generator_norm, spade_hidden=me.spade_hidden,
            spectral_norm=me.spectral_norm, spade_spectral_norm=me.spade_spectral_norm)
        self.disc = ImageDiscriminators(num_scales=me.disc_scales, dim=me.disc_dim,
                                        num_layers=me.disc_layers,
                                        spectral_norm=me.spectral_norm)
        self.weights = {term: float(me[f"lambda_{term}"]) for term in GAN_TERMS}
        self.trans_opt = base.role_optimizer(config.optim, "trans")
        self.disc_opt = base.role_optimizer(config.optim, "disc_img")
        self.normalization = config.data.normalization
        self.roles = ("trans", "disc_img", "seg")
        # Where the step's images must be at least: the coarsest PatchGAN scale needs a pixel.
        self.min_image_size = 2 ** (me.disc_layers + me.disc_scales - 1)

    # -- init ---------------------------------------------------------------------------------

    def init(self, rng, batch, pretrained) -> TrainState:
        x_s = batch["source"]["image"]
        for domain in ("source", "target"):
            hw = batch[domain]["image"].shape[1:3]
            if min(hw) < self.min_image_size:
                raise ValueError(
                    f"The {domain} images of a translator step are {hw[0]}x{hw[1]}, smaller than "
                    f"{self.min_image_size} pixels a side, which the {self.disc.num_scales}-scale "
                    f"PatchGAN of {self.disc.num_layers} stride-2 layers needs (data.crop)")
        seg = base.init_role(self.model, init_key(rng, "seg"), x_s, None)
        seg = base.with_pretrained(seg, pretrained.get("seg"), self.seg.init_scope, None)
        semantics = jnp.zeros(self.seg.output_shapes(seg, x_s.shape)["logits"].shape, jnp.float32)
        unit = jnp.zeros(x_s.shape, jnp.float32)
        trans = self._init_translator(init_key(rng, "trans"), unit, semantics)
        if "trans" in pretrained:
            check_conditioning(pretrained["trans"]["params"], self.num_classes, self.trans_from,
                               self.seg_from)
            trans = base.with_pretrained(trans, pretrained["trans"], "", self.trans_opt.tx)
        disc_vars = self.disc.init(init_key(rng, "disc_img"), unit)
        disc_params = disc_vars.pop("params")
        disc = RoleState(disc_params, dict(disc_vars), self.disc_opt.tx.init(disc_params))
        return new_state(rng, {"trans": trans, "disc_img": disc, "seg": seg})

    def _init_translator(self, rng, unit: jax.Array, semantics: jax.Array) -> RoleState:
        variables = self.translator.init(rng, unit, semantics,
                                         method=Translator.create_variables)
        params = variables.pop("params")
        return RoleState(params, dict(variables), self.trans_opt.tx.init(params))

    # -- the step -----------------------------------------------------------------------------

    def segment(self, seg: RoleState, images_: jax.Array) -> jax.Array:
        """The frozen segmenter's logits (inference mode) on model-input images."""
        return self.seg.predict(seg.variables, images_)

    def generator_loss(self, trans_params, state: TrainState, x_s, x_t, sem_s, sem_t):
        trans, seg = state.roles["trans"], state.roles["seg"]
        out, updated = self.translator.apply(
            {"params": trans_params, **trans.collections}, x_s, x_t, sem_s, sem_t, train=True,
            mutable=list(trans.collections))
        disc_vars = state.roles["disc_img"].variables
        w = self.weights
        terms = {
            "loss/gan": (lsgan_generator_loss(self.disc.apply(disc_vars, out["s2t"], "target"))
                         + lsgan_generator_loss(self.disc.apply(disc_vars, out["t2s"], "source"))),
            "loss/rec": mean_abs(out["rec_s"], x_s) + mean_abs(out["rec_t"], x_t),
            "loss/cyc": mean_abs(out["cyc_s"], x_s) + mean_abs(out["cyc_t"], x_t),
            "loss/latent": mean_abs(out["h_s2t"], out["h_s"]) + mean_abs(out["h_t2s"], out["h_t"]),
        }
        if w["sce"]:
            to_input = lambda y: images.from_unit_range(y, self.normalization)  # noqa: E731
            terms["loss/sce"] = (
                symmetric_cross_entropy(sem_s, self.segment(seg, to_input(out["s2t"])))
                + symmetric_cross_entropy(sem_t, self.segment(seg, to_input(out["t2s"]))))
        total = sum(w[name.split("/")[1]] * value for name, value in terms.items())
        terms["loss/total"] = total
        fakes = {"target": jax.lax.stop_gradient(out["s2t"]),
                 "source": jax.lax.stop_gradient(out["t2s"])}
        return total, (terms, {**trans.collections, **updated}, fakes)

    def discriminator_loss(self, disc_params, disc: RoleState, real: dict, fake: dict):
        variables = {"params": disc_params, **disc.collections}
        total, collections = 0.0, disc.collections
        for domain in ("source", "target"):
            both = jnp.concatenate([real[domain], fake[domain]], axis=0)
            outs, updated = self.disc.apply({**variables, **collections}, both, domain,
                                            train=True, mutable=list(disc.collections))
            collections = {**collections, **updated}
            n = real[domain].shape[0]
            total = total + lsgan_discriminator_loss([o[:n] for o in outs],
                                                     [o[n:] for o in outs])
        return total, collections

    def train_step(self, state: TrainState, batch):
        seg = state.roles["seg"]
        source, target = batch["source"]["image"], batch["target"]["image"]
        x_s = images.to_unit_range(source, self.normalization)
        x_t = images.to_unit_range(target, self.normalization)
        sem_s, sem_t = self.segment(seg, source), self.segment(seg, target)
        trans = state.roles["trans"]
        (_, (terms, trans_collections, fakes)), grads = jax.value_and_grad(
            self.generator_loss, has_aux=True)(trans.params, state, x_s, x_t, sem_s, sem_t)
        roles = dict(state.roles)
        roles["trans"] = base.apply_gradients(trans, grads, self.trans_opt.tx, trans_collections)
        disc = state.roles["disc_img"]
        (d_loss, disc_collections), d_grads = jax.value_and_grad(
            self.discriminator_loss, has_aux=True)(
            disc.params, disc, {"source": x_s, "target": x_t}, fakes)
        roles["disc_img"] = base.apply_gradients(disc, d_grads, self.disc_opt.tx,
                                                 disc_collections)
        metrics = {**terms, "loss/disc_img": d_loss, **self.trans_opt.lr_metrics(state.step),
                   **self.disc_opt.lr_metrics(state.step)}
        return state.replace(step=state.step + 1, roles=roles), metrics

    # -- inference ----------------------------------------------------------------------------

    def predict(self, seg_variables, images_):
        return self.seg.predict(seg_variables, images_)

    translate_roles = ("trans", "seg")

    def translate(self, variables: dict, images_: jax.Array, source: str = "source",
                  target: str = "target") -> jax.Array:
        """Model-input images of domain `source` -> their translations into `target`, uint8 RGB
        (the images a translated dataset stores). `variables`: {"trans": ..., "seg": ...}."""
        semantics = self.seg.predict(variables["seg"], images_)
        y = self.translator.apply(variables["trans"],
                                  images.to_unit_range(images_, self.normalization), semantics,
                                  source, target, method=Translator.translate)
        return images.unit_to_uint8(y)

    def summaries(self, state: TrainState, batch) -> dict[str, jax.Array]:
        """Per direction, one row per image: input | the semantic map conditioning SPADE (argmax
        of the segmenter's logits) | reconstruction | translation | cycled back."""
        seg, trans = state.roles["seg"], state.roles["trans"]
        n = base.SUMMARY_IMAGES
        source, target = batch["source"]["image"][:n], batch["target"]["image"][:n]
        sem_s, sem_t = self.segment(seg, source), self.segment(seg, target)
        out = self.translator.apply(trans.variables,
                                    images.to_unit_range(source, self.normalization),
                                    images.to_unit_range(target, self.normalization),
                                    sem_s, sem_t)
        pictures = {}
        for name, x, sem, rec, fake, cyc in (
                ("source_to_target", source, sem_s, out["rec_s"], out["s2t"], out["cyc_s"]),
                ("target_to_source", target, sem_t, out["rec_t"], out["t2s"], out["cyc_t"])):
            size = x.shape[1:3]
            semantic = images.colorize(
                jnp.argmax(images.resize_bilinear(sem, size, self.seg.align_corners), -1), xp=jnp)
            row = [images.to_uint8(x, self.normalization, xp=jnp), semantic,
                   images.unit_to_uint8(rec), images.unit_to_uint8(fake), images.unit_to_uint8(cyc)]
            pictures[f"train/{name}"] = jnp.concatenate(row, axis=2)
        return pictures
