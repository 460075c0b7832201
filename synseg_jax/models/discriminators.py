"""Domain discriminators on segmentation outputs.

``OutputDiscriminator`` is AdaptSegNet's fully-convolutional discriminator (Tsai et al., CVPR
2018): on a softmax map with C channels, 4x4 stride-2 convolutions (padding 1) with 64, 128, 256
and 512 filters, each followed by LeakyReLU 0.2, then a 4x4 stride-2 convolution to one channel.
No normalisation; it returns logits (the losses apply the sigmoid), one per output patch.

``ASPPDiscriminator`` is structure enhancement's (Lv et al., 2018): an ASPP layer of four dilated
3x3 convolutions in parallel (rates 1, 2, 3, 4), then one convolution to a single channel, at
stride 1, so it judges every pixel of the softmax map. The paper gives no more; what it leaves
open is chosen in its docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synseg_jax.models.layers import Conv

# PyTorch's default Conv2d init (what AdaptSegNet's discriminator starts from): weights and biases
# uniform in +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5) gives exactly that bound).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    bound = 1.0 / fan_in ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchConv(nn.Module):
    """A biased convolution initialised as PyTorch's nn.Conv2d is."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1] * self.kernel_size ** 2
        return Conv(self.features, (self.kernel_size, self.kernel_size),
                    strides=(self.stride, self.stride),
                    padding=[(self.padding, self.padding)] * 2,
                    kernel_dilation=(self.dilation, self.dilation),
                    kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in),
                    name="conv")(x)


class OutputDiscriminator(nn.Module):
    """AdaptSegNet's discriminator; `widths` scale down for the demo ((64, 128, 256, 512) is the
    paper's)."""

    widths: Sequence[int] = (64, 128, 256, 512)
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, probs: jax.Array) -> jax.Array:
        x = probs
        for i, width in enumerate(self.widths):
            x = TorchConv(width, 4, stride=2, padding=1, name=f"conv{i + 1}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
        return TorchConv(1, 4, stride=2, padding=1, name="classifier")(x)


class ASPPDiscriminator(nn.Module):
    """Structure enhancement's discriminator: ASPP (rates 1-4) -> LeakyReLU -> conv to 1 channel.

    Paper silent, chosen here: each branch has ``width`` filters (64, AdaptSegNet's first width,
    the discriminator the paper's setting follows); the branches are summed, as DeepLabV2's ASPP
    (the paper's ASPP reference) sums its branches; LeakyReLU 0.2 (AdaptSegNet's) between the two
    layers; the last conv is 3x3, padding 1; PyTorch's default init. Returns per-pixel logits.
    """

    width: int = 64
    rates: Sequence[int] = (1, 2, 3, 4)
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, probs: jax.Array) -> jax.Array:
        branches = [TorchConv(self.width, 3, padding=r, dilation=r, name=f"branch{i}")(probs)
                    for i, r in enumerate(self.rates)]
        x = nn.leaky_relu(sum(branches[1:], branches[0]), self.negative_slope)
        return TorchConv(1, 3, padding=1, name="classifier")(x)


DISCRIMINATORS = {"fcd": OutputDiscriminator, "aspp": ASPPDiscriminator}
