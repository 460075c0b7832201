"""Semantically adaptive image-to-image translator and its image discriminators.

The networks of the semantic-translation method (issue 16): two coupled autoencoders that share
a latent space, as in UNIT (Liu, Breuel & Kautz, NeurIPS 2017), whose generators denormalise
their residual features with SPADE (Park et al., CVPR 2019) conditioned on the segmenter's
unnormalised logits, and per-domain multi-scale PatchGAN discriminators (pix2pixHD, Wang et al.,
CVPR 2018, in MUNIT's form, Huang et al., ECCV 2018) trained with the LSGAN objective (Mao et
al., ICCV 2017). Spectral normalisation (Miyato et al., ICLR 2018) wraps every convolution.

Layout, following the translation paper's appendix table (widths for ``dim=64``, UNIT's default):

- encoder E_d (one per domain d): 7x7 conv 3->64, IN, ReLU; two 4x4 stride-2 convs (64->128,
  128->256), IN, ReLU; four residual blocks (conv3x3-IN-ReLU-conv3x3-IN, plus the input).
- generator G_d: four residual blocks whose normalisation is SPADE (a parameter-free instance
  norm, then a per-pixel scale and shift computed from the semantic map), ReLU; then per
  upsampling step nearest x2, a 5x5 conv halving the channels, UNIT's LayerNorm, ReLU; a 7x7 conv
  to RGB with tanh, so images live in (-1, 1) (``images.to_unit_range``'s space).
- discriminator D_d: ``num_scales`` (3) PatchGANs on the image, then on its 3x3 stride-2
  average-pooled copies (padding 1, the padding not counted, as MUNIT's ``AvgPool2d(...,
  count_include_pad=False)``); each 4x4 stride-2 convs 64, 128, 256, 512 with LeakyReLU 0.2 and
  no normalisation, then a 1x1 conv to one channel (the paper's table, = MUNIT's ``MsImageDis``).

Choices where the translation paper is silent, with their source:

- Shared latent space (UNIT): the LAST ``n_shared`` residual blocks of the encoders and the FIRST
  ``n_shared`` residual blocks of the generators are one module each (``enc_shared``,
  ``gen_shared``), used by both domains. UNIT's code shares one block on each side
  (``n_enc_shared_blk: 1``, ``n_gen_shared_blk: 1``, with three private blocks each: four in
  all, the paper's count), hence ``n_shared = 1``. The latent code h is the output of the shared
  encoder block. UNIT's VAE noise on h is left out: the paper has no KL term, and constrains h by
  a latent cycle loss instead (MUNIT's content reconstruction).
- SPADE residual block ordering: UNIT's post-normalisation block with IN replaced by SPADE,
  conv3x3 - SPADE - ReLU - conv3x3 - SPADE, plus the input (the paper's table gives ReLU and
  "IN+SPADE" at constant width 256, so SPADE's own pre-activation block with LeakyReLU and a
  learned shortcut does not apply). ``norm="in"`` gives UNIT's plain IN block (Table 3's
  ablation), with the same conv parameters and no dependence on the semantic map.
- SPADE itself (SPADE's code): the map is resized to the feature size with PyTorch's "nearest"
  (``images.resize_nearest``), then a zero-padded 3x3 conv to ``spade_hidden`` (128) channels +
  ReLU, and two zero-padded 3x3 convs giving gamma and beta; out = IN(x) * (1 + gamma) + beta,
  IN without affine parameters and eps 1e-5.
- Padding: reflection in the encoder, generator and discriminator convs (UNIT's / MUNIT's
  ``pad_type: reflect``), zero in SPADE's convs (SPADE's code).
- Initialisation: He-normal (fan-in) weights and zero biases in the translator (UNIT's
  ``init: kaiming``); N(0, 0.02) weights and zero biases in the discriminators (UNIT's and
  MUNIT's trainers re-initialise them ``gaussian``). With spectral norm only the kernels'
  direction matters for the normalised convs.
- Spectral normalisation on every conv of the translator and the discriminators (the paper
  applies it "to all the models"), including the 1x1 classifier of D and SPADE's three convs
  (SPADE's own code leaves SPADE's convs unnormalised: ``spade_spectral_norm=False`` does that).
  flax's ``nn.SpectralNorm``: one power-iteration step per call, its vector in ``batch_stats``,
  written back only when a module is called with ``train=True`` (and ``batch_stats`` mutable, as
  ``methods/base.forward`` does in training). In evaluation the step still runs from the stored
  vector but nothing is written, so the output is deterministic.

Inputs: images in [-1, 1] RGB, NHWC; semantic maps are float logits [B, h, w, C] at any
resolution (the segmenter's output stride); they are resized inside each SPADE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synseg_jax.choices import check_choice
from synseg_jax.images import resize_nearest
from synseg_jax.losses import mse_gan
from synseg_jax.models.decoders import ReflectConv, ResidualBlock, upsample_to_image
from synseg_jax.models.layers import instance_norm, rematerialised
from synseg_jax.models.pooling import avg_pool_uncounted_padding

DOMAINS = ("source", "target")
GENERATOR_NORMS = ("spade", "in")

# UNIT's and MUNIT's discriminator init ("gaussian"): N(0, 0.02).
gaussian_init = nn.initializers.normal(0.02)


def _check_domain(domain: str) -> str:
    check_choice("domain", domain, DOMAINS)
    return domain


class SPADE(nn.Module):
    """Spatially-adaptive denormalisation (Park et al., CVPR 2019):
    ``instance_norm(x) * (1 + gamma(s)) + beta(s)`` with gamma, beta from the semantic map s.

    Params: ``mlp_shared`` (3x3 conv to ``hidden`` channels, ReLU), ``mlp_gamma`` and
    ``mlp_beta`` (3x3 convs to x's channels), as SPADE names them; zero padding.
    """

    hidden: int = 128
    spectral_norm: bool = True
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, semantics: jax.Array,
                 update_stats: bool = False) -> jax.Array:
        def conv(features, name):
            return ReflectConv(features, 3, pad_mode="zero", spectral_norm=self.spectral_norm,
                               name=name)

        s = resize_nearest(semantics.astype(jnp.float32), x.shape[1:3])
        a = nn.relu(conv(self.hidden, "mlp_shared")(s, update_stats))
        gamma = conv(x.shape[-1], "mlp_gamma")(a, update_stats)
        beta = conv(x.shape[-1], "mlp_beta")(a, update_stats)
        return instance_norm(x, self.eps) * (1.0 + gamma) + beta


class SPADEResidualBlock(nn.Module):
    """conv3x3 - SPADE - ReLU - conv3x3 - SPADE, plus the input: UNIT's residual block with its
    instance norms replaced by SPADE (see the module docstring). The convs are named as in
    ``decoders.ResidualBlock`` (``conv1``, ``conv2``)."""

    spade_hidden: int = 128
    spectral_norm: bool = True
    spade_spectral_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, semantics: jax.Array,
                 update_stats: bool = False) -> jax.Array:
        def conv(name):
            return ReflectConv(x.shape[-1], 3, spectral_norm=self.spectral_norm, name=name)

        def spade(name):
            return SPADE(self.spade_hidden, self.spade_spectral_norm, name=name)

        y = conv("conv1")(x, update_stats)
        y = nn.relu(spade("spade1")(y, semantics, update_stats))
        y = conv("conv2")(y, update_stats)
        y = spade("spade2")(y, semantics, update_stats)
        return x + y


class GeneratorBlocks(nn.Module):
    """``num_blocks`` generator residual blocks (``res0``, ...): SPADE-conditioned for
    ``norm="spade"``, UNIT's IN blocks for ``norm="in"`` (the semantic map is then unused);
    ``remat`` rematerialises each block (``layers.rematerialised``)."""

    num_blocks: int
    norm: str = "spade"
    spade_hidden: int = 128
    spectral_norm: bool = True
    spade_spectral_norm: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, semantics: jax.Array,
                 update_stats: bool = False) -> jax.Array:
        check_choice("norm", self.norm, GENERATOR_NORMS)
        spade_block = rematerialised(SPADEResidualBlock, self.remat, static_argnums=(3,))
        in_block = rematerialised(ResidualBlock, self.remat)
        for i in range(self.num_blocks):
            if self.norm == "spade":
                h = spade_block(self.spade_hidden, self.spectral_norm,
                                self.spade_spectral_norm, name=f"res{i}")(
                    h, semantics, update_stats)
            else:
                h = in_block(self.spectral_norm, name=f"res{i}")(h, update_stats)
        return h


class EncoderBlocks(nn.Module):
    """``num_blocks`` of UNIT's IN residual blocks (``res0``, ...), each rematerialised with
    ``remat``."""

    num_blocks: int
    spectral_norm: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        block = rematerialised(ResidualBlock, self.remat)
        for i in range(self.num_blocks):
            x = block(self.spectral_norm, name=f"res{i}")(x, update_stats)
        return x


class DomainEncoder(nn.Module):
    """One domain's private encoder layers: 7x7 conv (``conv_in``), IN, ReLU;
    ``n_downsample`` 4x4 stride-2 convs (``down0``, ...) doubling the channels, IN, ReLU; then
    the private residual blocks (``blocks``). The shared blocks follow in ``Translator``."""

    dim: int = 64
    n_downsample: int = 2
    num_blocks: int = 3
    spectral_norm: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        sn = self.spectral_norm
        x = ReflectConv(self.dim, 7, spectral_norm=sn, name="conv_in")(x, update_stats)
        x = nn.relu(instance_norm(x))
        width = self.dim
        for i in range(self.n_downsample):
            width *= 2
            x = ReflectConv(width, 4, stride=2, padding=1, spectral_norm=sn,
                            name=f"down{i}")(x, update_stats)
            x = nn.relu(instance_norm(x))
        return EncoderBlocks(self.num_blocks, sn, self.remat, name="blocks")(x, update_stats)


class DomainGenerator(nn.Module):
    """One domain's private generator layers, after the shared blocks: residual blocks
    (``blocks``), then per step nearest x2, 5x5 conv halving the channels (``up0``, ...),
    UNIT's LayerNorm (``ln0``, ...), ReLU; a 7x7 conv to RGB (``to_rgb``) and tanh."""

    n_upsample: int = 2
    num_blocks: int = 3
    out_channels: int = 3
    norm: str = "spade"
    spade_hidden: int = 128
    spectral_norm: bool = True
    spade_spectral_norm: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, semantics: jax.Array,
                 update_stats: bool = False) -> jax.Array:
        sn = self.spectral_norm
        x = GeneratorBlocks(self.num_blocks, self.norm, self.spade_hidden, sn,
                            self.spade_spectral_norm, self.remat, name="blocks")(
                                h, semantics, update_stats)
        return upsample_to_image(x, self.n_upsample, self.out_channels, sn, update_stats)


class Translator(nn.Module):
    """UNIT-style coupled autoencoders with SPADE generators (module docstring).

    Params: ``enc_source``, ``enc_target`` (private encoder layers), ``enc_shared`` (the last
    ``n_shared`` encoder residual blocks, both domains), ``gen_shared`` (the first ``n_shared``
    generator residual blocks, both domains), ``gen_source``, ``gen_target``.

    Attributes:
        dim: width of the first conv; the latent code has ``dim * 2**n_downsample`` channels
            (UNIT: 64 -> 256).
        n_downsample: stride-2 steps in the encoders = x2 steps in the generators (UNIT: 2).
        n_res: residual blocks per encoder and per generator, shared ones included (UNIT: 4).
        n_shared: how many of them are shared across domains (UNIT's code: 1).
        norm: "spade" (the paper) or "in" (Table 3's ablation: no semantic conditioning).
        spade_hidden: SPADE's hidden width (SPADE: 128).
        spectral_norm: on every encoder / generator conv.
        spade_spectral_norm: also on SPADE's three convs (the paper: every layer; SPADE's code:
            no). Ignored without ``spectral_norm``.
        remat: rematerialise every residual block, encoders' and generators' (same outputs
            and gradients, less memory, one more forward of the blocks in the backward pass).
    """

    dim: int = 64
    n_downsample: int = 2
    n_res: int = 4
    n_shared: int = 1
    norm: str = "spade"
    spade_hidden: int = 128
    out_channels: int = 3
    spectral_norm: bool = True
    spade_spectral_norm: bool = True
    remat: bool = False

    def setup(self):
        if not 0 <= self.n_shared <= self.n_res:
            raise ValueError(f"n_shared must lie in [0, n_res={self.n_res}], got {self.n_shared}")
        check_choice("norm", self.norm, GENERATOR_NORMS)
        sn, private = self.spectral_norm, self.n_res - self.n_shared
        spade_sn = self.spectral_norm and self.spade_spectral_norm
        enc = dict(dim=self.dim, n_downsample=self.n_downsample, num_blocks=private,
                   spectral_norm=sn, remat=self.remat)
        self.enc_source = DomainEncoder(**enc)
        self.enc_target = DomainEncoder(**enc)
        self.enc_shared = EncoderBlocks(self.n_shared, sn, self.remat)
        self.gen_shared = GeneratorBlocks(self.n_shared, self.norm, self.spade_hidden, sn,
                                          spade_sn, self.remat)
        gen = dict(n_upsample=self.n_downsample, num_blocks=private,
                   out_channels=self.out_channels, norm=self.norm,
                   spade_hidden=self.spade_hidden, spectral_norm=sn,
                   spade_spectral_norm=spade_sn, remat=self.remat)
        self.gen_source = DomainGenerator(**gen)
        self.gen_target = DomainGenerator(**gen)

    def encode(self, images: jax.Array, domain: str, train: bool = False) -> jax.Array:
        """E_d: images of `domain` in [-1, 1] -> latent code h [B, H / 2^n, W / 2^n, C_h]."""
        enc = self.enc_source if _check_domain(domain) == "source" else self.enc_target
        return self.enc_shared(enc(images.astype(jnp.float32), train), train)

    def decode(self, h: jax.Array, semantics: jax.Array, domain: str,
               train: bool = False) -> jax.Array:
        """G_d: latent code h + semantic logits [B, h, w, C] -> an image of `domain` in (-1, 1)."""
        gen = self.gen_source if _check_domain(domain) == "source" else self.gen_target
        return gen(self.gen_shared(h, semantics, train), semantics, train)

    def translate(self, images: jax.Array, semantics: jax.Array, source: str, target: str,
                  train: bool = False) -> jax.Array:
        """G_target(E_source(images), semantics): e.g. synthetic -> real-looking."""
        return self.decode(self.encode(images, source, train), semantics, target, train)

    def __call__(self, x_s: jax.Array, x_t: jax.Array, sem_s: jax.Array, sem_t: jax.Array,
                 train: bool = False, sem_s2t: jax.Array | None = None,
                 sem_t2s: jax.Array | None = None) -> dict[str, jax.Array]:
        """Everything one training step of the translator needs, for a source / target pair.

        Each decode of content that came from x_s is conditioned on sem_s (the segmenter's
        logits for x_s; the translation x_s2t is pixel-aligned with x_s), likewise for x_t;
        the cycle's second decode takes ``sem_s2t`` / ``sem_t2s`` instead when given.

        Returns:
            h_s, h_t: latent codes E_S(x_s), E_T(x_t).
            rec_s, rec_t: within-domain reconstructions G_S(h_s), G_T(h_t).
            s2t, t2s: translations G_T(h_s), G_S(h_t).
            h_s2t, h_t2s: latent codes of the translations, E_T(s2t), E_S(t2s) (latent cycle
                consistency compares them with h_s, h_t).
            cyc_s, cyc_t: cycle reconstructions G_S(h_s2t) (UNIT's x_aba), G_T(h_t2s) (x_bab).
        """
        h_s = self.encode(x_s, "source", train)
        h_t = self.encode(x_t, "target", train)
        s2t = self.decode(h_s, sem_s, "target", train)
        t2s = self.decode(h_t, sem_t, "source", train)
        h_s2t = self.encode(s2t, "target", train)
        h_t2s = self.encode(t2s, "source", train)
        return {
            "h_s": h_s, "h_t": h_t,
            "rec_s": self.decode(h_s, sem_s, "source", train),
            "rec_t": self.decode(h_t, sem_t, "target", train),
            "s2t": s2t, "t2s": t2s,
            "h_s2t": h_s2t, "h_t2s": h_t2s,
            "cyc_s": self.decode(h_s2t, sem_s if sem_s2t is None else sem_s2t, "source", train),
            "cyc_t": self.decode(h_t2s, sem_t if sem_t2s is None else sem_t2s, "target", train),
        }


    def create_variables(self, x: jax.Array, semantics: jax.Array) -> jax.Array:
        """Touches every layer once (each encoder, each generator): the cheapest trace that
        creates all variables, for ``init(..., method=Translator.create_variables)``."""
        h_s = self.encode(x, "source")
        h_t = self.encode(x, "target")
        return self.decode(h_s, semantics, "target") + self.decode(h_t, semantics, "source")


def conditioning_channels(params: Any) -> int | None:
    """The number of semantic channels (classes) a translator's params were built for, read
    from a SPADE's first conv; None for an unconditioned (``norm="in"``) translator. Lets a
    method refuse a translator checkpoint whose class count differs from its segmenter's."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in flat:
        keys = [str(getattr(k, "key", k)) for k in path]
        if "mlp_shared" in keys and keys[-1] == "kernel":
            return int(leaf.shape[2])
    return None


def downsample_avg(x: jax.Array) -> jax.Array:
    """3x3 stride-2 average pooling with padding 1 whose padded cells do not count (MUNIT's and
    pix2pixHD's ``AvgPool2d(3, 2, 1, count_include_pad=False)``): the next, coarser scale."""
    return avg_pool_uncounted_padding(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


class PatchDiscriminator(nn.Module):
    """One scale: ``num_layers`` 4x4 stride-2 convs (reflection padding 1) with ``dim``, 2 dim,
    ... (capped at ``max_dim``) filters, each followed by LeakyReLU 0.2, no normalisation; a 1x1
    conv to one channel (``classifier``). Returns a score per patch, [B, H / 2^L, W / 2^L, 1]."""

    dim: int = 64
    num_layers: int = 4
    max_dim: int = 512
    negative_slope: float = 0.2
    spectral_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        sn = self.spectral_norm
        for i in range(self.num_layers):
            width = min(self.dim * 2 ** i, self.max_dim)
            x = ReflectConv(width, 4, stride=2, padding=1, spectral_norm=sn,
                            kernel_init=gaussian_init, name=f"conv{i}")(x, update_stats)
            x = nn.leaky_relu(x, self.negative_slope)
        return ReflectConv(1, 1, padding=0, spectral_norm=sn, kernel_init=gaussian_init,
                           name="classifier")(x, update_stats)


class MultiScaleDiscriminator(nn.Module):
    """``num_scales`` PatchGANs (``scale0``, ...) on the image and its successively
    ``downsample_avg``-ed copies; returns their outputs, finest first (MUNIT's ``MsImageDis``)."""

    num_scales: int = 3
    dim: int = 64
    num_layers: int = 4
    max_dim: int = 512
    spectral_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        x = x.astype(jnp.float32)
        outputs = []
        for i in range(self.num_scales):
            if i:
                x = downsample_avg(x)
            outputs.append(PatchDiscriminator(self.dim, self.num_layers, self.max_dim,
                                              spectral_norm=self.spectral_norm,
                                              name=f"scale{i}")(x, train))
        return outputs


class ImageDiscriminators(nn.Module):
    """The per-domain image discriminators D_S (``source``) and D_T (``target``).

    ``__call__(images, domain)`` returns `domain`'s list of per-scale outputs; with
    ``domain=None`` both discriminators judge the same images ({"source": [...], "target":
    [...]}), which is how ``init`` creates both from one sample.
    """

    num_scales: int = 3
    dim: int = 64
    num_layers: int = 4
    max_dim: int = 512
    spectral_norm: bool = True

    def setup(self):
        args = (self.num_scales, self.dim, self.num_layers, self.max_dim, self.spectral_norm)
        self.source = MultiScaleDiscriminator(*args)
        self.target = MultiScaleDiscriminator(*args)

    def __call__(self, images: jax.Array, domain: str | None = None,
                 train: bool = False) -> list[jax.Array] | dict[str, list[jax.Array]]:
        if domain is None:
            return {"source": self.source(images, train), "target": self.target(images, train)}
        disc = self.source if _check_domain(domain) == "source" else self.target
        return disc(images, train)


def lsgan_generator_loss(fake_outputs: Sequence[jax.Array]) -> jax.Array:
    """LSGAN's generator term, summed over scales: sum_k mean((D_k(fake) - 1)^2) (MUNIT)."""
    return sum(mse_gan(out, 1.0) for out in fake_outputs)


def lsgan_discriminator_loss(real_outputs: Sequence[jax.Array],
                             fake_outputs: Sequence[jax.Array]) -> jax.Array:
    """LSGAN's discriminator term, summed over scales:
    sum_k mean((D_k(real) - 1)^2) + mean(D_k(fake)^2) (MUNIT)."""
    if len(real_outputs) != len(fake_outputs):
        raise ValueError(f"{len(real_outputs)} real vs {len(fake_outputs)} fake scales")
    return sum(mse_gan(r, 1.0) + mse_gan(f, 0.0) for r, f in zip(real_outputs, fake_outputs))
