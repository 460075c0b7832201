"""Texture/shape modules for synthetic-to-real generalisation (Li, Li & Guo, "Synthetic-to-real
generalization for semantic segmentation"): the Texture Structure Generalizer (TSG) and the Spatial
Structure Intensifier (SSI), options of every ResNet segmenter (``tsg`` / ``ssi`` fields).

Where they sit (``TextureShapeInserts``, called by ``ResNet`` after each stage)::

    F_s = layer_s(...)                         ResNet stage s (1..4)
    F_s = F_s + SSI_{s-1}.projection           when an SSI sits after layer s-1 (the paper's
                                               cross-layer "interval" connection)
    F_s = TSG_s(F_s)                           when a TSG sits after layer s
    SSI_s reads F_s                            when an SSI sits after layer s: its projection is
                                               added to F_{s+1}, its edge map is an output

so the projection enters before the later layer's TSG (paper Sec. 3.1: "the features after SSI are
first added to the features of the layer and then enter into the TSG module"). The paper does not
say whether an SSI reads its layer's features before or after that layer's TSG; here it reads them
after, i.e. exactly what the next layer reads, so nothing un-normalised reaches a later layer.

Design choices (the paper leaves them open):

* IN has no affine parameters (PyTorch's ``InstanceNorm2d`` default, which a PyTorch implementation
  gets unless it asks otherwise; Eq. 1 has none, and the per-channel scale and shift such
  parameters would add are what the next conv + BN learns anyway). eps 1e-5, PyTorch's.
* CA is squeeze-and-excitation (Hu et al., the paper's ref. [18]): global average pool, FC to C/r,
  ReLU, FC to C, sigmoid, channel-wise product. Reduction r = 16, the SE paper's default.
* The paper cites SE for the SSI's spatial attention too, but SE attends over channels; the SSI's
  is CBAM's spatial attention (Woo et al., ECCV 2018): channel-wise mean and max, a 7x7 conv to
  one channel, sigmoid, product. CBAM's code follows the 7x7 conv with BN; here the conv has a
  bias instead (one channel, and no batch statistics to keep).
* The projection's spatial size is matched by its stride: a strided 1x1 conv, as ResNet's own
  projection shortcut, samples exactly the grid the later layer's stride-2 conv samples (both give
  ceil(n / 2) pixels); at output stride 8, layers 2-4 share one size and the stride is 1.
* The edge branch: 3x3 conv + ReLU, 3x3 conv + ReLU, 1x1 conv to one channel (the paper: "a module
  containing three convolution layers"). Its map is upsampled bilinearly to the input (= label)
  size; a 1x1 conv (``ssi_fuse``) fuses the side maps into the fourth, initialised to their mean
  (HED's fusion layer, which the deep-supervision loss of Eq. 2-3 follows).
* Learning rate: TSG and SSI sit in the feature path, and the paper trains the whole network at
  one rate, so their names avoid "head" / "classifier" and they learn at the body rate (see
  ``optim.is_head``). They live beside ``backbone``, not in it, so ImageNet or demo-pretrained
  backbone weights (``init.seg.scope="backbone"``) load unchanged into a TSG/SSI segmenter.
* He-normal (fan-out) init for every conv, as the ResNet's own; the paper trains from scratch.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synseg_jax import images
from synseg_jax.models.layers import Conv, conv_init, conv_padding, instance_norm

NUM_LAYERS = 4  # ResNet's layer1..layer4
SE_REDUCTION = 16  # SE's default reduction ratio (Hu et al., Sec. 6.1)
SPATIAL_KERNEL = 7  # CBAM's spatial-attention kernel (Woo et al., Sec. 3.2)
IN_EPS = 1e-5  # PyTorch InstanceNorm2d's eps (layers.instance_norm's default)


def check_placements(tsg: Sequence[int], ssi: Sequence[int], num_layers: int = NUM_LAYERS) -> None:
    """A TSG may sit after any layer 1..num_layers, an SSI after 1..num_layers-1 (its projection
    feeds the next layer, and the last has none); anything else is an error naming it."""
    for name, placed, last in (("tsg", tsg, num_layers), ("ssi", ssi, num_layers - 1)):
        for layer in placed:
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise ValueError(f"model.{name}: {layer!r} is not a layer number (ResNet layers "
                                 f"are 1..{num_layers})")
            if not 1 <= layer <= num_layers:
                raise ValueError(f"model.{name}: the backbone has no layer {layer} (ResNet "
                                 f"layers are 1..{num_layers})")
            if layer > last:
                raise ValueError(f"model.{name}: an SSI after layer {layer} has no later layer "
                                 f"to feed its projection into (SSI may sit after layers "
                                 f"1..{last})")
        if len(set(placed)) != len(tuple(placed)):
            raise ValueError(f"model.{name}: a layer is listed twice in {tuple(placed)}")


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(mean_hw(x))))), fc1 to C / reduction."""

    reduction: int = SE_REDUCTION
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        a = jnp.mean(x, axis=(1, 2))
        a = nn.relu(nn.Dense(max(1, channels // self.reduction), dtype=self.dtype, name="fc1")(a))
        a = nn.sigmoid(nn.Dense(channels, dtype=self.dtype, name="fc2")(a))
        return x * a[:, None, None, :]


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: x * sigmoid(conv7x7([mean_c(x), max_c(x)]))."""

    kernel_size: int = SPATIAL_KERNEL
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True),
                                  jnp.max(x, axis=-1, keepdims=True)], axis=-1)
        k = self.kernel_size
        a = Conv(1, (k, k), padding=conv_padding(k), kernel_init=conv_init, dtype=self.dtype,
                 name="conv")(pooled)
        return x * nn.sigmoid(a)


class TSG(nn.Module):
    """Texture Structure Generalizer (paper Eq. 1): CA(F - IN(F)) + IN(F)."""

    reduction: int = SE_REDUCTION
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        normed = instance_norm(x, IN_EPS)
        return ChannelAttention(self.reduction, self.dtype, name="attention")(x - normed) + normed


def projection_stride(size_in: Sequence[int], size_out: Sequence[int]) -> int:
    """The stride s of a 1x1 conv taking a map of `size_in` to `size_out` (ceil(n / s) pixels a
    side, the size a stride-s ResNet layer gives)."""
    for s in range(1, max(size_in) + 1):
        if all(-(-n // s) == m for n, m in zip(size_in, size_out)):
            return s
    raise ValueError(f"SSI: no stride takes a {tuple(size_in)} map to the later layer's "
                     f"{tuple(size_out)}")


class SSI(nn.Module):
    """Spatial Structure Intensifier: CBAM spatial attention (``attention``), then two branches:
    a 1x1 conv (``proj``) to the later layer's channels and grid (strided when that layer is
    smaller), and the edge branch (``edge1``..``edge3``) giving one edge logit per pixel at this
    layer's resolution. Returns (projection, edge logits)."""

    edge_channels: int = 64
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, out_channels: int, out_size: Sequence[int]
                 ) -> tuple[jax.Array, jax.Array]:
        a = SpatialAttention(dtype=self.dtype, name="attention")(x)
        s = projection_stride(x.shape[1:3], out_size)
        proj = Conv(out_channels, (1, 1), strides=(s, s), kernel_init=conv_init,
                    dtype=self.dtype, name="proj")(a)
        e = a
        for i in (1, 2):
            e = nn.relu(Conv(self.edge_channels, (3, 3), padding=conv_padding(3),
                             kernel_init=conv_init, dtype=self.dtype, name=f"edge{i}")(e))
        e = Conv(1, (1, 1), kernel_init=conv_init, dtype=self.dtype, name="edge3")(e)
        return proj, e


class TextureShapeInserts:
    """The TSG / SSI modules of one segmenter and the hook ``ResNet`` calls after each stage.

    Not a flax module: it is created inside a segmenter's compact ``__call__``, so the modules it
    creates (``tsg{s}``, ``ssi{s}``, ``ssi_fuse``) belong to the segmenter, beside ``backbone``,
    while ``ResNet`` calls them between its stages. Holds the side edge maps of one call.
    """

    def __init__(self, tsg: Sequence[int], ssi: Sequence[int], edge_channels: int,
                 dtype: Any = None):
        check_placements(tsg, ssi)
        self.tsg = {s: TSG(dtype=dtype, name=f"tsg{s}") for s in sorted(tsg)}
        self.ssi = {s: SSI(edge_channels, dtype=dtype, name=f"ssi{s}") for s in sorted(ssi)}
        self.dtype = dtype
        self.side_edges: dict[int, jax.Array] = {}

    def __bool__(self) -> bool:
        return bool(self.tsg or self.ssi)

    def __call__(self, stage: int, x: jax.Array, features: dict[str, jax.Array]) -> jax.Array:
        """Stage `stage`'s output `x` as the next stage sees it; `features` holds the earlier
        stages' (as returned by this hook)."""
        if stage - 1 in self.ssi:
            proj, edge = self.ssi[stage - 1](features[f"layer{stage - 1}"], x.shape[-1],
                                             x.shape[1:3])
            x = x + proj.astype(x.dtype)
            self.side_edges[stage - 1] = edge
        if stage in self.tsg:
            x = self.tsg[stage](x)
        return x

    def edge_outputs(self, size: Sequence[int]) -> tuple[jax.Array, ...] | None:
        """The side edge logits in layer order, each bilinearly upsampled to `size` (the input
        image's), then the fused map: [N, H, W, 1] each. None without an SSI. Call inside the
        segmenter's ``__call__`` after the backbone ran."""
        if not self.ssi:
            return None
        sides = [images.resize_bilinear(self.side_edges[s].astype(jnp.float32), size)
                 for s in sorted(self.ssi)]
        fused = Conv(1, (1, 1), kernel_init=nn.initializers.constant(1.0 / len(sides)),
                     bias_init=nn.initializers.zeros, dtype=self.dtype, name="ssi_fuse")(
                         jnp.concatenate(sides, axis=-1))
        return (*sides, fused)
