"""Domain discriminators on segmentation outputs.

``OutputDiscriminator`` is AdaptSegNet's fully-convolutional discriminator (Tsai et al., CVPR
2018): on a softmax map with C channels, 4x4 stride-2 convolutions (padding 1) with 64, 128, 256
and 512 filters, each followed by LeakyReLU 0.2, then a 4x4 stride-2 convolution to one channel.
No normalisation; it returns logits (the losses apply the sigmoid), one per output patch.
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
