"""Shared building blocks: conv + BatchNorm, explicit BatchNorm modes, gradient reversal, resizing.

Everything is NHWC. Convolutions pad symmetrically (``dilation * (k - 1) // 2`` per side), as the
PyTorch / Caffe reference networks do, rather than flax's "SAME", which pads stride-2 convs
asymmetrically and would shift every feature map by half a pixel relative to imported weights.

Naming rule, relied on by the optimiser (which freezes or decays BN affine params) and by the weight
importer: every BatchNorm module's name starts with ``bn``, and no other module's name does. A BN
layer therefore shows up as ``.../bn/scale``, ``.../bn/bias`` in ``params`` and ``.../bn/mean``,
``.../bn/var`` in ``batch_stats``; :func:`is_bn_path` tests a tree path for it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synseg_jax.choices import check_choice

BN_PREFIX = "bn"

# "frozen": always normalise with the running statistics and never change them (Caffe DeepLab's
#   use_global_stats; the right thing for batch-1 fine-tuning of a pretrained net).
# "train": batch statistics when called with train=True, and the running averages are updated (the
#   caller passes mutable=["batch_stats"] and decides whether to keep the update, i.e. which domains
#   move the statistics); running statistics when train=False. This is what the AdaptSegNet-lineage
#   code does, even though it freezes the BN affine parameters.
BN_MODES = ("frozen", "train")

# torchvision's ResNet init: He normal over fan-out. Used for training from scratch (TSG/SSI, demo);
# imported weights overwrite it otherwise.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# model.compute_dtype: what convolutions and matrix products compute in. Parameters stay float32
# (flax's param_dtype) whatever it is: bfloat16's 8-bit mantissa would round SGD's small updates
# away. bfloat16 is TPU's and Hopper's native matmul format; on a CPU it is emulated.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """The dtype of a ``model.compute_dtype`` name."""
    check_choice("compute_dtype", name, COMPUTE_DTYPES)
    return COMPUTE_DTYPES[name]


def float32_outputs(tree: Any) -> Any:
    """`tree` with its floating leaves in float32. A network's outputs pass through this at its
    boundary, so losses, softmaxes and the adversarial terms built on them stay float32 whatever
    the network computed in."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def rematerialised(module: type[nn.Module], remat: bool,
                   static_argnums: tuple[int, ...] = (2,)) -> type[nn.Module]:
    """`module`, or with `remat` its ``nn.remat`` form: the backward pass recomputes the block's
    activations from its input instead of keeping them, trading compute for memory. Parameter
    names are unchanged. ``static_argnums`` counts ``self`` as 0 and must name the Python-bool
    arguments (``train``, ``update_stats``), which select code paths while tracing."""
    return nn.remat(module, static_argnums=static_argnums) if remat else module


def is_bn_path(path: Sequence[Any]) -> bool:
    """Whether a tree path (strings or jax ``DictKey``s) lies inside a BatchNorm module."""
    return any(str(getattr(k, "key", k)).startswith(BN_PREFIX) for k in path)


def batch_norm(mode: str, train: bool, name: str = BN_PREFIX, dtype: Any = None) -> nn.BatchNorm:
    """A BatchNorm whose use of batch vs running statistics follows ``mode`` (see ``BN_MODES``).

    Momentum 0.9 / eps 1e-5 are PyTorch's defaults (its momentum 0.1 weights the new batch).
    Unlike PyTorch, flax folds the biased batch variance into the running variance; with the crop
    sizes used here (thousands of pixels per channel) the difference is negligible.
    """
    check_choice("bn_mode", mode, BN_MODES)
    if not name.startswith(BN_PREFIX):
        raise ValueError(f"BatchNorm module names must start with {BN_PREFIX!r}, got {name!r}")
    return nn.BatchNorm(
        use_running_average=(mode == "frozen" or not train),
        momentum=0.9,
        epsilon=1e-5,
        # Two-pass variance: E[x^2] - E[x]^2 loses precision on un-centred (0..255) inputs.
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )


def conv_padding(kernel_size: int, dilation: int = 1) -> list[tuple[int, int]]:
    """Symmetric PyTorch-style padding that keeps the size at stride 1 for odd kernels."""
    p = dilation * (kernel_size - 1) // 2
    return [(p, p), (p, p)]


class Conv(nn.Conv):
    """``nn.Conv`` with the same parameters, computing 1×1 and depthwise kernels without XLA's
    convolution, whose CPU gradients are slow for both.

    - 1×1: XLA:CPU lowers the kernel gradient of a 1×1 convolution to a convolution with a huge
      window, 2-2.5× slower than the equivalent matmul (benchmarks/model_step.py; ResNet
      bottlenecks are two-thirds 1×1). A strided 1×1 conv is a subsampling followed by the product.
    - depthwise (one group per channel, as STDC's 3×3/2 ``conv_avd``): XLA:CPU's grouped
      convolution gradient took 21 s forward + backward on 8×128×256×128, against 0.9 s for the
      same kernel as a sum of k·k shifted, strided slices each scaled per channel (PyTorch: 1.2 s).
      Those three convs were two-thirds of BiSeNet-STDC813's 512×1024 train step.
    Every other case (larger dense kernels, other groupings, input dilation) is nn.Conv itself.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self._is_depthwise(inputs.shape[-1]):
            return self._depthwise(inputs)
        if not self._is_pointwise():
            return super().__call__(inputs)
        sh, sw = _pair(self.strides)
        x = inputs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else inputs
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision)
        return y if bias is None else y + bias

    def _is_pointwise(self) -> bool:
        padding = self.padding
        # A 1x1 window needs no padding: "SAME" pads nothing at stride 1.
        same_unpadded = padding == "SAME" and _pair(self.strides) == (1, 1)
        no_padding = padding == "VALID" or same_unpadded or (
            not isinstance(padding, str) and all(p == (0, 0) for p in _padding_pairs(padding)))
        return (_pair(self.kernel_size) == (1, 1) and self.feature_group_count == 1 and no_padding
                and _pair(self.input_dilation) == (1, 1) and self.mask is None)

    def _is_depthwise(self, in_features: int) -> bool:
        return (self.feature_group_count == in_features == self.features and in_features > 1
                and len(_pair(self.kernel_size)) == 2 and _pair(self.input_dilation) == (1, 1)
                and self.mask is None
                and (not isinstance(self.padding, str) or self.padding in ("SAME", "VALID")))

    def _depthwise(self, inputs: jax.Array) -> jax.Array:
        kh, kw = _pair(self.kernel_size)
        sh, sw = _pair(self.strides)
        dh, dw = _pair(self.kernel_dilation)
        channels = inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, channels), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (channels,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        pads = _explicit_padding(self.padding, x.shape[1:3], (kh, kw), (sh, sw), (dh, dw))
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        out_h = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1
        out_w = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
        y = None
        for i in range(kh):
            for j in range(kw):
                start = (0, i * dh, j * dw, 0)
                limit = (x.shape[0], i * dh + (out_h - 1) * sh + 1,
                         j * dw + (out_w - 1) * sw + 1, channels)
                term = jax.lax.slice(x, start, limit, (1, sh, sw, 1)) * kernel[i, j, 0]
                y = term if y is None else y + term
        return y if bias is None else y + bias


def _explicit_padding(padding, spatial, kernel, strides, dilation) -> list[tuple[int, int]]:
    """nn.Conv's padding forms ("SAME", "VALID", an int, or per-axis ints / pairs) as
    ``[(lo, hi), (lo, hi)]``."""
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
        return [tuple(p) for p in jax.lax.padtype_to_pads(spatial, dilated, strides, padding)]
    return _padding_pairs(padding)


def _padding_pairs(padding: int | Sequence[int | Sequence[int]]) -> list[tuple[int, int]]:
    """nn.Conv's numeric padding forms (an int, or per-axis ints / pairs) as ``[(lo, hi), ...]``."""
    if isinstance(padding, int):
        return [(padding, padding)] * 2
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _pair(value: int | Sequence[int] | None) -> tuple[int, int]:
    """nn.Conv's int / pair / None (= 1) forms of a kernel size, stride or dilation, as (h, w)."""
    if value is None:
        return (1, 1)
    return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nn.Module):
    """k×k conv without bias (named ``conv``), BatchNorm (named ``bn``), optional ReLU."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    relu: bool = True
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k, s, d = self.kernel_size, self.strides, self.dilation
        x = Conv(self.features, (k, k), strides=(s, s), padding=conv_padding(k, d),
                 kernel_dilation=(d, d), use_bias=False, kernel_init=conv_init,
                 dtype=self.dtype, name="conv")(x)
        x = batch_norm(self.bn_mode, train, dtype=self.dtype)(x)
        return nn.relu(x) if self.relu else x


def pool_output_size(size: int, window: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a pooling window along one axis, with PyTorch's ceil-mode rule."""
    span = size + 2 * padding - window
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start in the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0,
             ceil_mode: bool = False) -> jax.Array:
    """Square max-pool on NHWC with symmetric -inf padding; ``ceil_mode`` as in PyTorch/Caffe.

    Ceil mode is implemented by extra -inf padding on the bottom/right so the last partial window
    exists; padding never wins a max because every window overlaps the input.
    """
    pads = []
    for size in x.shape[1:3]:
        out = pool_output_size(size, window, stride, padding, ceil_mode)
        extra = max(0, (out - 1) * stride + window - (size + 2 * padding))
        pads.append((padding, padding + extra))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


@jax.custom_vjp
def _scale_gradient(x, factor):
    return x


def _scale_gradient_fwd(x, factor):
    return x, factor


def _scale_gradient_bwd(factor, g):
    # The factor is a hyperparameter (possibly scheduled): it gets a zero gradient.
    return (factor * g).astype(g.dtype), jnp.zeros_like(factor)


_scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def scale_gradient(x: jax.Array, factor: float | jax.Array) -> jax.Array:
    """Identity forward; multiplies the incoming gradient by ``factor`` backward. ``factor`` may
    be a traced value, e.g. a schedule of the step."""
    return _scale_gradient(x, jnp.asarray(factor, jnp.float32))


def grad_reverse(x: jax.Array, scale: float | jax.Array = 1.0) -> jax.Array:
    """Identity forward; multiplies the incoming gradient by ``-scale`` backward (DANN's GRL)."""
    return scale_gradient(x, -jnp.asarray(scale, jnp.float32))


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Instance normalisation of NHWC features without affine parameters (PyTorch's
    InstanceNorm2d default): each channel of each image to zero mean and unit (biased) variance
    over its H x W pixels."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
