"""Image decoders: features back to an image (structure enhancement's reconstruction branch).

``UNITDecoder`` is UNIT's generator decoder (Liu, Breuel & Kautz, NeurIPS 2017): residual blocks
with instance normalisation, then per upsampling step a nearest x2 upsampling, a 5x5 conv that
halves the channels, LayerNorm and ReLU, and finally a 7x7 conv to RGB with tanh. Convolutions
pad by reflection (UNIT's configs use ``pad_type: reflect``) and start from He-normal weights
with zero biases (UNIT's ``init: kaiming``). The output lies in (-1, 1): UNIT's image range.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from synseg_jax.models.layers import Conv, instance_norm

kaiming_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # torch kaiming_normal_


class ReflectConv(nn.Module):
    """A biased convolution with reflection padding (UNIT's ``pad_type: reflect``).

    By default stride 1 and ``kernel_size // 2`` per side (size-preserving), the decoder's use.
    The translator (``models/translator.py``) also needs UNIT's 4x4 stride-2 convs with padding 1,
    SPADE's zero-padded convs (``pad_mode="zero"``), other initialisations, and spectral
    normalisation (Miyato et al., ICLR 2018): ``spectral_norm=True`` wraps the conv in flax's
    ``nn.SpectralNorm`` (named ``sn``), which divides the kernel, flattened to
    [k * k * in, out], by its largest singular value estimated by one power-iteration step per
    call. The kernel and bias stay at ``conv/kernel``, ``conv/bias`` either way; the power
    iteration's vector and last estimate live in the ``batch_stats`` collection under
    ``sn/conv/kernel/{u,sigma}`` and change only when called with ``update_stats=True`` (and
    ``batch_stats`` mutable). The defaults build exactly the decoder's original layer.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None  # per side; None: kernel_size // 2
    pad_mode: str = "reflect"  # or "zero"
    spectral_norm: bool = False
    kernel_init: Callable = kaiming_init

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        p = self.kernel_size // 2 if self.padding is None else self.padding
        if self.pad_mode not in ("reflect", "zero"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zero', got {self.pad_mode!r}")
        if p:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)),
                        mode="reflect" if self.pad_mode == "reflect" else "constant")
        conv = Conv(self.features, (self.kernel_size,) * 2, strides=(self.stride,) * 2,
                    padding="VALID", kernel_init=self.kernel_init,
                    bias_init=nn.initializers.zeros, name="conv")
        if self.spectral_norm:
            return nn.SpectralNorm(conv, name="sn")(x, update_stats=update_stats)
        return conv(x)


class UNITLayerNorm(nn.Module):
    """UNIT's LayerNorm: each image normalised by the mean and (unbiased) standard deviation of
    all its C x H x W values, (x - mean) / (std + eps), then a per-channel scale (initialised
    uniform in [0, 1), as UNIT's code does) and bias. Not flax's LayerNorm, which normalises each
    pixel over its channels."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("scale", nn.initializers.uniform(1.0), (x.shape[-1],))
        beta = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        std = jnp.std(x, axis=(1, 2, 3), keepdims=True, ddof=1)
        return (x - mean) / (std + self.eps) * gamma + beta


class ResidualBlock(nn.Module):
    """conv3x3 - IN - ReLU - conv3x3 - IN, plus the input (UNIT's ResBlock with norm "in");
    ``spectral_norm`` wraps both convs (see ``ReflectConv``)."""

    spectral_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        def conv(name):
            return ReflectConv(x.shape[-1], 3, spectral_norm=self.spectral_norm, name=name)

        y = nn.relu(instance_norm(conv("conv1")(x, update_stats)))
        y = instance_norm(conv("conv2")(y, update_stats))
        return x + y


def upsample_nearest2(x: jax.Array) -> jax.Array:
    """x2 nearest-neighbour upsampling (PyTorch's nn.Upsample(scale_factor=2))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample_to_image(x: jax.Array, steps: int, out_channels: int, spectral_norm: bool = False,
                      update_stats: bool = False) -> jax.Array:
    """UNIT's decoder tail, called from a compact ``__call__`` (its layers are the caller's): per
    step nearest x2, a 5x5 conv halving the channels (``up{i}``), UNIT's LayerNorm (``ln{i}``)
    and ReLU; then a 7x7 conv to ``out_channels`` (``to_rgb``) and tanh."""
    width = x.shape[-1]
    for i in range(steps):
        width = max(1, width // 2)
        x = ReflectConv(width, 5, spectral_norm=spectral_norm, name=f"up{i}")(
            upsample_nearest2(x), update_stats)
        x = nn.relu(UNITLayerNorm(name=f"ln{i}")(x))
    x = ReflectConv(out_channels, 7, spectral_norm=spectral_norm, name="to_rgb")(x, update_stats)
    return jnp.tanh(x)


class UNITDecoder(nn.Module):
    """Features at 1/2^upsample_steps of the image size -> an RGB image in (-1, 1).

    Attributes:
        width: channels of the residual blocks. UNIT's decoder works at its encoder's output
            width (64 doubled by two downsamplings: 256); a segmentation encoder's features (2048
            channels at ResNet-101's res5c) are first projected to it by a 1x1 conv (``proj``),
            since residual blocks at 2048 channels would hold ~300M parameters (our choice: the
            structure-enhancement paper says only that G "follows" UNIT's decoder).
        num_res_blocks: UNIT's n_res (4).
        upsample_steps: x2 steps; log2 of the encoder's output stride (res5c at stride 8: 3).
            Each step halves the channels, as UNIT's does.
    """

    width: int = 256
    num_res_blocks: int = 4
    upsample_steps: int = 3
    out_channels: int = 3

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (1, 1), kernel_init=kaiming_init,
                    bias_init=nn.initializers.zeros, name="proj")(features.astype(jnp.float32))
        for i in range(self.num_res_blocks):
            x = ResidualBlock(name=f"res{i}")(x)
        return upsample_to_image(x, self.upsample_steps, self.out_channels)
