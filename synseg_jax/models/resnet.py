"""Bottleneck ResNets (NHWC) with dilation, Caffe/torchvision styles, and width/depth multipliers.

Parameter tree (what the weight importer maps onto)::

    stem/{conv,bn}                         7×7/2 conv + BN (+ ReLU), then a 3×3/2 max-pool
    layer{s}_{b}/conv{1,2,3}/{conv,bn}     bottleneck b of stage s (1-based stage, 0-based block)
    layer{s}_0/downsample/{conv,bn}        the 1×1 projection on the first block of each stage

Two styles of the same network:

* ``"caffe"`` (DeepLab's converted Caffe ResNet, the field's DeepLabV2 backbone): the stride sits on
  the first 1×1 conv of the bottleneck, the stem max-pool uses ceil mode, and a dilated stage is
  dilated in every block.
* ``"torchvision"``: the stride sits on the 3×3 conv, the max-pool floors, and, as torchvision's
  ``replace_stride_with_dilation``, the first block of a newly dilated stage keeps the previous
  dilation.

Parameter shapes are the same for both styles and every output stride, so weights move freely
between a classifier (output stride 32) and a segmenter (8).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synseg_jax.choices import check_choice
from synseg_jax.models.layers import ConvBN, float32_outputs, max_pool, rematerialised

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# (stage 1..4, its output, the earlier stages' features) -> what the next stage sees.
AfterStage = Callable[[int, jax.Array, dict[str, jax.Array]], jax.Array]
STYLES = ("caffe", "torchvision")
EXPANSION = 4  # bottleneck output channels = 4 × its inner width

# (stride, dilation) of layer1..layer4 for each output stride: each halving of the output stride
# trades a stage's stride 2 for a doubling of its dilation (DeepLab's "atrous" backbone).
STRIDES_AND_DILATIONS = {
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
}


class Bottleneck(nn.Module):
    """1×1 → 3×3 (dilated) → 1×1 ×4 residual block; ``project`` adds the 1×1 conv+BN shortcut."""

    planes: int
    strides: int = 1
    dilation: int = 1
    project: bool = False
    style: str = "caffe"
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(ConvBN, bn_mode=self.bn_mode, dtype=self.dtype)
        s1, s3 = (self.strides, 1) if self.style == "caffe" else (1, self.strides)
        y = conv(self.planes, 1, s1, name="conv1")(x, train)
        y = conv(self.planes, 3, s3, self.dilation, name="conv2")(y, train)
        y = conv(EXPANSION * self.planes, 1, relu=False, name="conv3")(y, train)
        if self.project:
            x = conv(EXPANSION * self.planes, 1, self.strides, relu=False, name="downsample")(
                x, train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Bottleneck ResNet backbone returning every stage's features.

    Attributes:
        depth: 50 or 101, i.e. stage sizes (3, 4, 6, 3) or (3, 4, 23, 3).
        stage_sizes: explicit blocks per stage, overriding ``depth``; for small members of the
            family, e.g. (1, 1, 1, 1).
        width: channel multiplier: stem 64·w, bottleneck widths (64, 128, 256, 512)·w, outputs
            4× those.
        style: "caffe" or "torchvision" (see the module docstring).
        output_stride: 8, 16 or 32.
        bn_mode: "frozen" or "train" (``layers.BN_MODES``).
        dtype: what the convolutions compute in (``layers.COMPUTE_DTYPES``); None: the input's.
        remat: recompute each bottleneck's activations in the backward pass instead of storing
            them (``layers.rematerialised``); the outputs and gradients are unchanged.

    Returns a dict: "stem" (after the stem's ReLU, stride 2, before the max-pool) and "layer1" …
    "layer4" (strides 4, 8, then 16/32 depending on ``output_stride``).

    ``after_stage(s, x, features)``, when given, maps stage s's output to what the next stage (and
    ``features["layer{s}"]``) sees; ``features`` holds the earlier stages'. The TSG / SSI modules
    of ``tsg_ssi.TextureShapeInserts`` come in this way: their parameters belong to the module
    that made them (the segmenter), so the ResNet's own parameter tree never changes.
    """

    depth: int = 101
    stage_sizes: Sequence[int] | None = None
    width: float = 1.0
    style: str = "caffe"
    output_stride: int = 8
    bn_mode: str = "frozen"
    dtype: Any = None
    remat: bool = False

    def _channels(self, base: int) -> int:
        return max(1, int(round(base * self.width)))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, after_stage: AfterStage | None = None
                 ) -> dict[str, jax.Array]:
        check_choice("style", self.style, STYLES)
        check_choice("output_stride", self.output_stride, STRIDES_AND_DILATIONS)
        if self.stage_sizes is None and self.depth not in STAGE_SIZES:
            raise ValueError(f"depth must be one of {sorted(STAGE_SIZES)} (or pass "
                             f"stage_sizes), got {self.depth}")
        stage_sizes = tuple(self.stage_sizes or STAGE_SIZES[self.depth])
        if len(stage_sizes) != 4:
            raise ValueError(f"stage_sizes needs 4 entries, got {stage_sizes}")

        x = ConvBN(self._channels(64), 7, 2, bn_mode=self.bn_mode, dtype=self.dtype,
                   name="stem")(x, train)
        features = {"stem": x}
        x = max_pool(x, 3, 2, padding=1, ceil_mode=self.style == "caffe")

        block = rematerialised(Bottleneck, self.remat)
        in_ch, prev_dilation = x.shape[-1], 1
        stages = zip(stage_sizes, STRIDES_AND_DILATIONS[self.output_stride])
        for s, (num_blocks, (stride, dilation)) in enumerate(stages, start=1):
            planes = self._channels(64 * 2 ** (s - 1))
            for b in range(num_blocks):
                first = b == 0
                torchvision_first = first and self.style == "torchvision"
                block_dilation = prev_dilation if torchvision_first else dilation
                # DeepLab's rule: project wherever stride != 1, channels change, or the stage is
                # dilated. Only the first block of a stage can meet it.
                project = first and (stride != 1 or in_ch != EXPANSION * planes or dilation > 1)
                x = block(planes, stride if first else 1, block_dilation, project, self.style,
                          self.bn_mode, self.dtype, name=f"layer{s}_{b}")(x, train)
                in_ch = EXPANSION * planes
            if after_stage is not None:
                x = after_stage(s, x, features)
            features[f"layer{s}"] = x
            prev_dilation = dilation
        return features


class ResNetClassifier(nn.Module):
    """ResNet + global average pool + dense, for ImageNet-style pretraining of a backbone.

    The backbone lives under ``backbone`` exactly as in the segmenters, so
    ``seg_params["backbone"] = cls_params["backbone"]`` transfers it. The dense layer is ``head``.
    Returns {"logits": (N, num_classes), "features": backbone features}.
    """

    num_classes: int
    depth: int = 50
    stage_sizes: Sequence[int] | None = None
    width: float = 1.0
    style: str = "torchvision"
    output_stride: int = 32
    bn_mode: str = "train"
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
        features = ResNet(self.depth, self.stage_sizes, self.width, self.style,
                          self.output_stride, self.bn_mode, self.dtype, self.remat,
                          name="backbone")(x, train)
        pooled = jnp.mean(features["layer4"], axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(pooled)
        return float32_outputs({"logits": logits, "features": features})
