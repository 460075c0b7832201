"""STDC backbones (NHWC): Short-Term Dense Concatenate networks (Fan et al., "Rethinking BiSeNet for
real-time semantic segmentation", CVPR 2021), the encoder of BiSeNet-STDC.

Structure (Fig. 3 and Table 1 of the paper, and the STDC-Seg code)::

    convx1        ConvX 3×3/2 → 32         (ConvX = conv without bias + BN + ReLU)   stride 2
    convx2        ConvX 3×3/2 → 64                                                    stride 4
    stage3_{b}    CatBottlenecks → 256, the first one (b = 0) with stride 2           stride 8
    stage4_{b}    → 512                                                               stride 16
    stage5_{b}    → 1024                                                              stride 32

Blocks per stage: (2, 2, 2) is STDC1, a.k.a. STDC813 (813 MFLOPs); (4, 5, 3) is STDC2 (STDC1446).
The ImageNet classifier's tail (ConvX 1×1 → 1024, pool, fc, BN, fc) is not part of the backbone:
BiSeNet-STDC does not use it (``use_conv_last=False`` in the reference code).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synseg_jax.models.layers import (Conv, ConvBN, batch_norm, conv_init, conv_padding,
                                      rematerialised)

STAGE_SIZES = {"stdc1": (2, 2, 2), "stdc2": (4, 5, 3)}
STEM_WIDTHS = (32, 64)
STAGE_WIDTHS = (256, 512, 1024)


def branch_widths(features: int, num_branches: int) -> list[int]:
    """Output channels of a CatBottleneck's branches: halving, the last one repeated.

    4 branches → out/2, out/4, out/8, out/8, whose concatenation has exactly ``features`` channels.
    """
    widths = [features // 2 ** (i + 1) for i in range(num_branches - 1)]
    widths.append(widths[-1])
    return widths


class CatBottleneck(nn.Module):
    """STDC module: a chain of convs whose outputs are all concatenated.

    Branch 0 is a 1×1 ConvX, the others 3×3 ConvX, each taking the previous branch's output
    (``branch0`` … ``branch{n-1}``). With ``strides=2`` the block downsamples twice over: a
    depthwise 3×3/2 conv + BN (``conv_avd``, ``bn_avd``, no ReLU) between branch 0 and branch 1,
    and a 3×3/2 pad-1 average pool of branch 0's own output before the concatenation. The pool
    divides by 9 everywhere (PyTorch's ``AvgPool2d`` default ``count_include_pad=True``).
    """

    features: int
    strides: int = 1
    num_branches: int = 4
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.strides not in (1, 2):
            raise ValueError(f"CatBottleneck strides must be 1 or 2, got {self.strides}")
        if self.num_branches < 2 or self.features % 2 ** (self.num_branches - 1):
            raise ValueError(f"{self.features} channels cannot be split into "
                             f"{self.num_branches} halving branches")
        conv = functools.partial(ConvBN, bn_mode=self.bn_mode, dtype=self.dtype)
        widths = branch_widths(self.features, self.num_branches)
        first = conv(widths[0], 1, name="branch0")(x, train)
        y = first
        if self.strides == 2:
            y = Conv(widths[0], (3, 3), strides=(2, 2), padding=conv_padding(3),
                     feature_group_count=widths[0], use_bias=False, kernel_init=conv_init,
                     dtype=self.dtype, name="conv_avd")(y)
            y = batch_norm(self.bn_mode, train, name="bn_avd", dtype=self.dtype)(y)
            first = nn.avg_pool(first, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                                count_include_pad=True)
        outputs = [first]
        for i, width in enumerate(widths[1:], start=1):
            y = conv(width, 3, name=f"branch{i}")(y, train)
            outputs.append(y)
        return jnp.concatenate(outputs, axis=-1)


class STDCNet(nn.Module):
    """STDC backbone returning the features at every stride.

    Attributes:
        stage_sizes: CatBottlenecks in stages 3, 4, 5; ``STAGE_SIZES["stdc1"]`` = (2, 2, 2) is
            STDC813, ``STAGE_SIZES["stdc2"]`` = (4, 5, 3).
        width: channel multiplier (stem 32·w, 64·w; stages 256·w, 512·w, 1024·w, rounded to a
            multiple of 2^(num_branches-1) so the branches split evenly).
        num_branches: branches per CatBottleneck (4 in the paper's STDC networks).
        bn_mode: "frozen" or "train" (``layers.BN_MODES``).
        dtype, remat: as ``resnet.ResNet``'s (remat per CatBottleneck).

    Returns a dict "stride2", "stride4" (the two ConvX), "stride8", "stride16", "stride32" (the
    outputs of stages 3, 4, 5: 256, 512, 1024 channels at full width).
    """

    stage_sizes: Sequence[int] = STAGE_SIZES["stdc1"]
    width: float = 1.0
    num_branches: int = 4
    bn_mode: str = "frozen"
    dtype: Any = None
    remat: bool = False

    def _channels(self, base: int, multiple: int = 1) -> int:
        return max(multiple, int(round(base * self.width / multiple)) * multiple)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        if len(self.stage_sizes) != len(STAGE_WIDTHS):
            raise ValueError(f"stage_sizes needs {len(STAGE_WIDTHS)} entries, "
                             f"got {tuple(self.stage_sizes)}")
        features = {}
        for i, base in enumerate(STEM_WIDTHS, start=1):
            x = ConvBN(self._channels(base), 3, 2, bn_mode=self.bn_mode, dtype=self.dtype,
                       name=f"convx{i}")(x, train)
            features[f"stride{2 ** i}"] = x
        block = rematerialised(CatBottleneck, self.remat)
        split = 2 ** (self.num_branches - 1)
        for s, (num_blocks, base) in enumerate(zip(self.stage_sizes, STAGE_WIDTHS), start=3):
            for b in range(num_blocks):
                x = block(self._channels(base, split), 2 if b == 0 else 1, self.num_branches,
                          self.bn_mode, self.dtype, name=f"stage{s}_{b}")(x, train)
            features[f"stride{2 ** s}"] = x
        return features
