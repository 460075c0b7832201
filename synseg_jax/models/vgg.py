"""VGG backbones (NHWC): torchvision's VGG16 layout, plus the FCN and DeepLab-LargeFOV variants.

Parameter tree (Caffe layer names, which the weight importer maps onto torchvision's indices)::

    conv{b}_{i}/{kernel,bias}      3×3 conv i (1-based) of block b (1..5), each followed by ReLU
    fc6/{kernel,bias}, fc7/...     the convolutionalised classifier ("fcn" and "largefov" only)

No BatchNorm anywhere (VGG16 as published and as torchvision's ``vgg16``), so ``bn_mode`` does not
apply. Variants differ in pooling, dilation and what follows conv5 (see ``VARIANTS``):

* ``"features"``: torchvision's ``vgg16().features``: five 2×2/2 max-pools, output stride 32.
* ``"fcn"``: "features" + fc6 (7×7 conv, 4096) + fc7 (1×1 conv, 4096), FCN's convolutionalised
  VGG16 classifier; the segmenter takes its pool3 / pool4 skips and fc7.
* ``"largefov"``: DeepLab-LargeFOV: 3×3 pools, pool4 / pool5 at stride 1, conv5 dilated 2,
  fc6 3×3 dilation 12 with 1024 channels, fc7 1×1 with 1024 channels; output stride 8.

All pools use ceil mode, as in Caffe, where FCN and DeepLab were trained (a 321×321 crop then gives
DeepLab's 41×41 score map); for the even sizes torchvision sees (224) floor and ceil agree.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from synseg_jax.choices import check_choice
from synseg_jax.models.layers import BN_MODES, Conv, conv_init, conv_padding, max_pool

# Convs per block: VGG16 (configuration "D" of Simonyan & Zisserman 2015, Table 1). The same
# attribute gives VGG11 (1, 1, 2, 2, 2), VGG13 (2, 2, 2, 2, 2) and VGG19 (2, 2, 4, 4, 4).
VGG16_STAGE_SIZES = (2, 2, 3, 3, 3)
BLOCK_WIDTHS = (64, 128, 256, 512, 512)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a VGG variant pools, dilates conv5, and continues after it."""

    pool_window: int
    pool_padding: int
    late_pool_stride: int  # stride of pool4 and pool5 (pools 1-3 always have stride 2)
    conv5_dilation: int
    fc6: tuple[int, int, int] | None  # (channels, kernel, dilation), or no fc layers
    fc7: int | None  # channels of the 1×1 fc7


VARIANTS = {
    # torchvision vgg16().features: MaxPool2d(kernel_size=2, stride=2) after every block.
    "features": Variant(2, 0, 2, 1, None, None),
    # FCN (Long, Shelhamer & Darrell, CVPR 2015, Sec. 3.1): VGG16's fully connected layers read as
    # convolutions covering their whole input, i.e. fc6 = 7×7 conv over pool5 (VGG's 4096×25088
    # weight = 4096×512×7×7) and fc7 = 1×1 conv, 4096 channels each. Padded to keep pool5's size,
    # instead of FCN's 100-pixel input padding and cropping.
    "fcn": Variant(2, 0, 2, 1, (4096, 7, 1), 4096),
    # DeepLab-LargeFOV (Chen et al., "Semantic image segmentation with deep convolutional nets and
    # fully connected CRFs", ICLR 2015, Sec. 3.1 and Table 2; and its released train.prototxt):
    # pools are 3×3 stride 2 pad 1; pool4 and pool5 keep stride 1 (3×3 pad 1) so the output stride
    # is 8 ("skip subsampling after the last two max-pooling layers"); conv5 therefore uses input
    # stride (dilation) 2; fc6 is subsampled to a 3×3 kernel with 1024 channels at dilation 12 (the
    # "large field of view": input stride 12) and fc7 to 1×1 with 1024 channels.
    "largefov": Variant(3, 1, 1, 2, (1024, 3, 12), 1024),
}


def dropout(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """Dropout that is active only when training *and* the caller passed a "dropout" rng.

    Methods pass one through ``methods.base.forward`` in training; callers that pass none (shape
    probes, parity tests) get a deterministic network instead of an error.
    """
    active = train and rate > 0 and module.has_rng("dropout")
    return nn.Dropout(rate, deterministic=not active)(x)


class VGG(nn.Module):
    """VGG backbone returning the output of every pool (and fc7 where the variant has one).

    Attributes:
        variant: "features", "fcn" or "largefov" (see ``VARIANTS``).
        stage_sizes: 3×3 convs per block; (2, 2, 3, 3, 3) is VGG16.
        width: channel multiplier for every conv and fc layer (for small demo networks).
        dropout_rate: after fc6 and fc7 (0.5 in VGG, FCN and DeepLab); see ``dropout``.
        bn_mode: accepted for a uniform segmenter interface; VGG has no BatchNorm.

    Returns a dict: "pool1" … "pool5" (strides 2, 4, 8, 16, 32, or 2, 4, 8, 8, 8 for "largefov")
    and "fc7" (after its ReLU and dropout) when the variant has fc layers.
    """

    variant: str = "features"
    stage_sizes: Sequence[int] = VGG16_STAGE_SIZES
    width: float = 1.0
    dropout_rate: float = 0.5
    bn_mode: str = "frozen"
    dtype: Any = None

    def _channels(self, base: int) -> int:
        return max(1, int(round(base * self.width)))

    def _conv(self, features: int, kernel: int, dilation: int, name: str) -> nn.Conv:
        return Conv(features, (kernel, kernel), padding=conv_padding(kernel, dilation),
                    kernel_dilation=(dilation, dilation), kernel_init=conv_init,
                    bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        check_choice("variant", self.variant, VARIANTS)
        check_choice("bn_mode", self.bn_mode, BN_MODES)  # unused, but a typo must not pass
        if len(self.stage_sizes) != len(BLOCK_WIDTHS):
            raise ValueError(f"stage_sizes needs {len(BLOCK_WIDTHS)} entries, "
                             f"got {tuple(self.stage_sizes)}")
        spec = VARIANTS[self.variant]
        features = {}
        for b, (num_convs, base) in enumerate(zip(self.stage_sizes, BLOCK_WIDTHS), start=1):
            dilation = spec.conv5_dilation if b == 5 else 1
            for i in range(1, num_convs + 1):
                x = nn.relu(self._conv(self._channels(base), 3, dilation, f"conv{b}_{i}")(x))
            stride = spec.late_pool_stride if b >= 4 else 2
            x = max_pool(x, spec.pool_window, stride, spec.pool_padding, ceil_mode=True)
            features[f"pool{b}"] = x
        if spec.fc6 is not None:
            channels, kernel, dilation = spec.fc6
            x = nn.relu(self._conv(self._channels(channels), kernel, dilation, "fc6")(x))
            x = dropout(self, x, self.dropout_rate, train)
            x = nn.relu(self._conv(self._channels(spec.fc7), 1, 1, "fc7")(x))
            features["fc7"] = dropout(self, x, self.dropout_rate, train)
        return features
