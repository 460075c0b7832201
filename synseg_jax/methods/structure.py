"""Structure enhancement (Lv, Lian, Yang, Lin, Pan & Duan, 2018): a reconstruction branch and an
output-space adversarial, beside the segmentation branch, on one shared encoder.

Roles, each with its own optax state: ``seg`` (encoder E = the segmenter's backbone, segmentation
branch S = its head), ``rec`` (decoder G, shared by both domains; ``models/decoders.py``) and
``disc`` (the ASPP discriminator D; ``models/discriminators.py``). One jitted step minimises

    L_seg(source) + lambda_rec [L1(G(E(I_S)), I_S) + L1(G(E(I_T)), I_T)] + lambda_adv L_adv(target)

over E, S and G, then updates D on the step's stopped-gradient softmax maps (the adversarial
pieces are those of ``methods/adversarial.py``). Choices where the paper is silent:

- Images for the L1: the input mapped to RGB in [-1, 1] (x / 127.5 - 1 of the 0..255 image),
  the range of G's tanh and UNIT's own image range. G's output is cropped at the bottom / right
  to the input size (a Caffe-style encoder's ceil-mode pooling gives one extra feature row /
  column there); a decoder that cannot reach the input size is an error at init.
- Reduction of the L1 (``method.rec_reduction``): "sum" over pixels and channels per image, mean
  over the batch. With lambda_rec = 1e-5 a mean would weigh the term ~1e-6 against a segmentation
  loss of ~1, i.e. switch it off; summed over a 1280x720x3 image of errors ~0.3 it is ~8: a real
  term. PyTorch's ``L1Loss(size_average=False)`` of the time is that sum.
- "E is updated by averaging the gradients from each branch" (Sec. 3): with both branches on,
  E's gradient is 1/2 (that of the segmentation branch, L_seg + lambda_adv L_adv) + 1/2 (that of
  the reconstruction branch); S and G get their own branch's gradient unscaled.
  ``method.encoder_grads="sum"`` takes the plain gradient of the total loss instead.
- D sees the softmax at the segmenter's output resolution (``method.disc_input="logits"``), not
  upsampled to the image as AdaptSegNet's discriminator does ("image"). The ASPP discriminator
  comes from FCAN (the paper's [17]), which discriminates maps at the network's output stride;
  and a stride-1 D with rates 1-4 sees 11 pixels, which at image resolution would judge the
  bilinear interpolation of the logits rather than the layout of the scene (at output stride 8
  it spans 88 image pixels). It also costs 64x less.
- The ablation rows of Table 1 are ``method.reconstruction`` and ``method.adversarial``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from synseg_jax import images
from synseg_jax.choices import check_choice
from synseg_jax.methods import base
from synseg_jax.methods.adversarial import (disc_map_picture, domain_loss, fooling_loss,
                                            probabilities)
from synseg_jax.models.decoders import UNITDecoder
from synseg_jax.models.discriminators import ASPPDiscriminator
from synseg_jax.models.layers import scale_gradient
from synseg_jax.models.segmenters import BACKBONE_SCOPE
from synseg_jax.state import TrainState, init_key, new_state

REDUCTIONS = ("sum", "mean")
DISC_INPUTS = ("logits", "image")
ENCODER_GRADS = ("average", "sum")


def l1(reconstruction: jax.Array, image: jax.Array, reduction: str) -> jax.Array:
    """L1 distance: "sum" over each image's pixels and channels, then the batch mean; "mean"
    over every element."""
    err = jnp.abs(reconstruction.astype(jnp.float32) - image.astype(jnp.float32))
    return jnp.mean(jnp.sum(err, axis=(1, 2, 3))) if reduction == "sum" else jnp.mean(err)


def psnr_per_image(reconstruction: jax.Array, image: jax.Array) -> jax.Array:
    """PSNR (dB) of each image of a batch in [-1, 1] (peak-to-peak 2, as 255 for 0..255)."""
    mse = jnp.mean(jnp.square(reconstruction - image), axis=(1, 2, 3))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def psnr(reconstruction: jax.Array, image: jax.Array) -> jax.Array:
    """Mean PSNR (dB) over the batch."""
    return jnp.mean(psnr_per_image(reconstruction, image))


def check_reachable(feature_size: tuple[int, int], factor: int, image_size: tuple[int, int],
                    where: str) -> None:
    """The decoder turns `feature_size` into `factor` x that; it must cover `image_size` with at
    most one feature row / column to spare (a ceil-mode encoder's overhang)."""
    out = tuple(factor * s for s in feature_size)
    if not all(i <= o <= i + factor for i, o in zip(image_size, out)):
        raise ValueError(
            f"The reconstruction decoder cannot give back the {where} images: it upsamples the "
            f"encoder's {feature_size[0]}x{feature_size[1]} features by {factor} (2^"
            f"method.rec_upsample_steps) to {out[0]}x{out[1]}, but the images are "
            f"{image_size[0]}x{image_size[1]}; set method.rec_upsample_steps to log2 of the "
            f"encoder's output stride")


class StructureEnhancement:
    """E + S (role seg), G (role rec), D (role disc); Table 1's rows are config switches."""

    config_fields = ("reconstruction", "adversarial", "lambda_rec", "lambda_adv",
                     "rec_reduction", "encoder_grads", "rec_features", "rec_width",
                     "rec_res_blocks", "rec_upsample_steps", "disc_width", "disc_rates",
                     "disc_input")

    def __init__(self, config: ml_collections.ConfigDict):
        me = config.method
        self.seg = base.Segmenter.from_config(config)
        self.model = self.seg.model
        self.use_rec, self.use_adv = bool(me.reconstruction), bool(me.adversarial)
        self.lambda_rec, self.lambda_adv = float(me.lambda_rec), float(me.lambda_adv)
        check_choice("method.rec_reduction", me.rec_reduction, REDUCTIONS)
        check_choice("method.disc_input", me.disc_input, DISC_INPUTS)
        self.disc_input = me.disc_input
        check_choice("method.encoder_grads", me.encoder_grads, ENCODER_GRADS)
        if (self.use_rec or self.use_adv) and not config.data.target:
            raise ValueError("Structure enhancement with method.reconstruction or "
                             "method.adversarial needs target images: set data.target")
        self.reduction = me.rec_reduction
        self.rec_features = me.rec_features
        self.upsample = 2 ** int(me.rec_upsample_steps)
        stride = getattr(self.model, "output_stride", None)
        if self.use_rec and me.rec_features == "layer4" and stride not in (None, self.upsample):
            raise ValueError(
                f"method.rec_upsample_steps={me.rec_upsample_steps} upsamples by "
                f"{self.upsample}, but the encoder's layer4 features are at output stride "
                f"{stride} (model.output_stride): the decoder would not give back the input size")
        self.decoder = UNITDecoder(me.rec_width, me.rec_res_blocks, me.rec_upsample_steps)
        self.disc = ASPPDiscriminator(me.disc_width, tuple(me.disc_rates))
        self.rec_opt = base.role_optimizer(config.optim, "rec") if self.use_rec else None
        self.disc_opt = base.role_optimizer(config.optim, "disc") if self.use_adv else None
        # "average" with two branches: each branch's gradient reaches E scaled by 1/2.
        self.branch_scale = 0.5 if self.use_rec and me.encoder_grads == "average" else 1.0
        self.normalization = config.data.normalization
        self.roles = (("seg",) + (("rec",) if self.use_rec else ())
                      + (("disc",) if self.use_adv else ()))

    # -- init ---------------------------------------------------------------------------------

    def init(self, rng, batch, pretrained) -> TrainState:
        sample = batch["source"]["image"]
        seg = self.seg.init_role(init_key(rng, "seg"), sample, pretrained)
        roles = {"seg": seg}
        # Output shapes for each domain's image size (the check below needs both).
        outs = {domain: self.seg.output_shapes(seg, batch[domain]["image"].shape)
                for domain in ("source", "target") if domain in batch}
        out = outs["source"]
        if self.use_rec:
            if self.rec_features not in out["features"]:
                raise ValueError(f"method.rec_features={self.rec_features!r} is not a feature "
                                 f"of segmenter {type(self.model).__name__}; it has "
                                 f"{sorted(out['features'])}")
            for domain, domain_out in outs.items():
                check_reachable(domain_out["features"][self.rec_features].shape[1:3],
                                self.upsample, batch[domain]["image"].shape[1:3], domain)
            sample_features = jnp.zeros(out["features"][self.rec_features].shape, jnp.float32)
            roles["rec"] = base.init_params_role(self.decoder, init_key(rng, "rec"),
                                                 sample_features, self.rec_opt.tx)
        if self.use_adv:
            num_classes = out["logits"].shape[-1]
            roles["disc"] = base.init_params_role(self.disc, init_key(rng, "disc"),
                                                  jnp.zeros((1, 16, 16, num_classes), jnp.float32),
                                                  self.disc_opt.tx)
        return new_state(rng, roles)

    # -- losses -------------------------------------------------------------------------------

    def disc_view(self, logits: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """What D sees: the softmax, at the logits' resolution or upsampled to the image's."""
        if self.disc_input == "logits":
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return probabilities(logits, image_size, self.seg.align_corners)

    def reconstruct(self, rec_params, features: jax.Array, size: tuple[int, int]) -> jax.Array:
        return self.decoder.apply({"params": rec_params}, features)[:, :size[0], :size[1]]

    def loss(self, seg_params, rec_params, state: TrainState, batch):
        seg = state.roles["seg"]
        source, target = batch["source"], batch["target"] if "target" in batch else None
        out_s, collections = self.seg.train_forward(seg, seg_params, source["image"], "source",
                                                    state)
        seg_branch, terms = self.seg.loss(out_s, source["label"])
        outs = {"source": out_s}
        if self.use_rec or self.use_adv:
            outs["target"], collections = self.seg.train_forward(
                seg, seg_params, target["image"], "target", state, collections)
        probs = None
        if self.use_adv:
            p_s = self.disc_view(outs["source"]["logits"], source["image"].shape[1:3])
            p_t = self.disc_view(outs["target"]["logits"], target["image"].shape[1:3])
            adv = fooling_loss(self.disc.apply({"params": state.roles["disc"].params}, p_t))
            terms["loss/adv"] = adv
            seg_branch = seg_branch + self.lambda_adv * adv
            probs = (jax.lax.stop_gradient(p_s), jax.lax.stop_gradient(p_t))
        total, reported = self.branch_scale * seg_branch, seg_branch
        if self.use_rec:
            for domain, out in outs.items():
                image = batch[domain]["image"]
                features = scale_gradient(out["features"][self.rec_features],
                                          self.branch_scale)
                recon = self.reconstruct(rec_params, features, image.shape[1:3])
                wanted = images.to_unit_range(image, self.normalization)
                rec = l1(recon, wanted, self.reduction)
                terms[f"loss/rec_{domain}"] = rec
                terms[f"train/rec_psnr_{domain}"] = psnr(jax.lax.stop_gradient(recon), wanted)
                total = total + self.lambda_rec * rec
                reported = reported + self.lambda_rec * rec
        terms["loss/total"] = reported
        return total, (terms, collections, probs)

    def _average_encoder(self, seg_grads):
        """Undoes the segmentation branch's scale outside E: S keeps its own gradient."""
        if self.branch_scale == 1.0:
            return seg_grads
        return {k: (v if k == BACKBONE_SCOPE else
                    jax.tree_util.tree_map(lambda g: g / self.branch_scale, v))
                for k, v in seg_grads.items()}

    def train_step(self, state: TrainState, batch):
        seg = state.roles["seg"]
        rec_params = state.roles["rec"].params if self.use_rec else None
        grad_fn = jax.value_and_grad(self.loss, argnums=(0, 1), has_aux=True)
        (_, (terms, collections, probs)), (seg_grads, rec_grads) = grad_fn(
            seg.params, rec_params, state, batch)
        roles = dict(state.roles)
        roles["seg"] = base.apply_gradients(seg, self._average_encoder(seg_grads),
                                            self.seg.opt.tx, collections)
        metrics = {**terms, **self.seg.opt.lr_metrics(state.step)}
        if self.use_rec:
            roles["rec"] = base.apply_gradients(state.roles["rec"], rec_grads, self.rec_opt.tx)
            metrics.update(self.rec_opt.lr_metrics(state.step))
        if self.use_adv:
            disc = state.roles["disc"]

            def disc_loss(params):
                return domain_loss(self.disc.apply({"params": params}, probs[0]),
                                   self.disc.apply({"params": params}, probs[1]))

            (loss, accuracy), grads = jax.value_and_grad(disc_loss, has_aux=True)(disc.params)
            roles["disc"] = base.apply_gradients(disc, grads, self.disc_opt.tx)
            metrics.update({"loss/disc": loss, "train/disc_accuracy": accuracy,
                            **self.disc_opt.lr_metrics(state.step)})
        return state.replace(step=state.step + 1, roles=roles), metrics

    def predict(self, seg_variables, images_):
        return self.seg.predict(seg_variables, images_)

    def summaries(self, state: TrainState, batch) -> dict[str, jax.Array]:
        """Input / reconstruction pairs of both domains, and D's map on the target images."""
        out = {}
        variables = state.roles["seg"].variables
        for domain in ("source", "target") if "target" in batch else ("source",):
            shown = batch[domain]["image"][:base.SUMMARY_IMAGES]
            if domain == "target":
                out["train/target_image"] = images.to_uint8(shown, self.normalization, xp=jnp)
            result = self.model.apply(variables, shown, train=False)
            if self.use_rec:
                recon = self.reconstruct(state.roles["rec"].params,
                                         result["features"][self.rec_features], shown.shape[1:3])
                out[f"train/{domain}_reconstruction"] = images.unit_to_uint8(recon)
            if self.use_adv and domain == "target":
                probs = self.disc_view(result["logits"], shown.shape[1:3])
                d = self.disc.apply({"params": state.roles["disc"].params}, probs)
                out["train/target_disc_map"] = disc_map_picture(d, shown.shape[1:3])
        return out
