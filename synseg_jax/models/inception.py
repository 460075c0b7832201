"""The Inception-v3 feature network of the Fréchet Inception Distance, in Flax (NHWC).

FID (Heusel et al., NeurIPS 2017) is defined by one network: TensorFlow's FID code runs the
2015-12-05 Inception-v3 graph and takes its 2048-d ``pool_3`` features. pytorch-fid
(mseitzer/pytorch-fid, ``inception.py``) ports that graph to PyTorch as torchvision's
``Inception3`` with four kinds of blocks patched and publishes the weights as
``pt_inception-2015-12-05-6726825d.pth``; its scores match the TF code's. This module rebuilds
that port so the published file imports (``weights.import_fid_inception``; ``python -m
synseg_jax.import_weights --format=fid_inception_v3``) and reproduces the port's features
(tests/test_fid_inception.py checks it against a PyTorch build of the same layers).

Layout (torchvision's ``Inception3``, module names kept so that weight names map one to one):

- every conv is a ``BasicConv2d``: conv without bias, BatchNorm with eps 1e-3 (TF's), ReLU;
  kernels may be rectangular (1x7, 7x1, 1x3, 3x1), padding is explicit and symmetric, and a conv
  without padding is a "valid" one;
- stem: Conv2d_1a_3x3 (stride 2), Conv2d_2a_3x3, Conv2d_2b_3x3 (padding 1), 3x3/2 max-pool,
  Conv2d_3b_1x1, Conv2d_4a_3x3, 3x3/2 max-pool (the pools unpadded, floor mode);
- Mixed_5b/5c/5d (block A), Mixed_6a (B, stride 2), Mixed_6b..6e (C), Mixed_7a (D, stride 2),
  Mixed_7b/7c (E); the 2048 channels of Mixed_7c averaged over space are the features.

What the FID port changes from torchvision's network (pytorch-fid's ``FIDInceptionA/C/E_1/E_2``):
the 3x3 average pool of the pool branch of blocks A, C and E does not count the zero padding in
its mean (TF's average pool does not), and the last block, Mixed_7c, max-pools in that branch
instead (the TF graph does; pytorch-fid notes it is likely an error of that graph, but it is what
defines FID).

Input: RGB in [0, 255] (uint8 or float), [B, H, W, 3]. pytorch-fid reads images as [0, 1]
tensors, resizes them bilinearly to 299x299 (``align_corners=False``, no antialiasing) and maps
them to [-1, 1]; ``resize_input=False`` skips the resize (any size from 75x75 up, the smallest
that leaves Mixed_7c a pixel).

The network is only ever used for inference: BatchNorm always normalises with the running
statistics, and there is no ``train`` argument.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synseg_jax import images as image_ops
from synseg_jax.models import layers, pooling

INPUT_SIZE = 299  # what pytorch-fid resizes every image to
MIN_INPUT_SIZE = 75  # the smallest square input whose Mixed_7c map is not empty
FEATURE_DIM = 2048
# torchvision's BasicConv2d (and TF's Inception graph): BatchNorm eps 1e-3, not PyTorch's 1e-5.
BN_EPS = 1e-3


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nn.Module):
    """Conv (no bias, named ``conv``) + BatchNorm on running statistics (``bn``) + ReLU."""

    features: int
    kernel_size: int | tuple[int, int] = 1
    strides: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = layers.Conv(self.features, _pair(self.kernel_size), strides=(self.strides,) * 2,
                        padding=[(ph, ph), (pw, pw)], use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def avg_pool_3x3_uncounted_padding(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, the padded zeros not counted (TF's average pool;
    pytorch-fid's ``count_include_pad=False``)."""
    return pooling.avg_pool_uncounted_padding(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    return layers.max_pool(x, 3, stride, padding)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avg-pool→1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(64, name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, name="branch_pool")(
            avg_pool_3x3_uncounted_padding(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35→17 (Mixed_6a): 3x3/2 | 1x1→3x3→3x3/2 | 3x3/2 max-pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convs (1x7 and 7x1 in turn)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        wide, tall = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1),
                                                                     padding=(3, 0))
        branch1x1 = BasicConv2d(192, name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, **wide, name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, **tall, name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv2d(c7, **tall, name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, **wide, name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, **tall, name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(192, **wide, name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = BasicConv2d(192, name="branch_pool")(avg_pool_3x3_uncounted_padding(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17→8 (Mixed_7a): 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | 3x3/2 max-pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(192, name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c): 1x1 | 1x1→(1x3 ‖ 3x1) | 1x1→3x3→(1x3 ‖ 3x1) | pool→1x1.

    ``pool`` is "avg" (uncounted padding; Mixed_7b) or "max" (Mixed_7c, the TF graph's).
    """

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        wide, tall = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1),
                                                                     padding=(1, 0))
        branch1x1 = BasicConv2d(320, name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate([BasicConv2d(384, **wide, name="branch3x3_2a")(branch3x3),
                                     BasicConv2d(384, **tall, name="branch3x3_2b")(branch3x3)],
                                    axis=-1)
        branch3x3dbl = BasicConv2d(448, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = jnp.concatenate(
            [BasicConv2d(384, **wide, name="branch3x3dbl_3a")(branch3x3dbl),
             BasicConv2d(384, **tall, name="branch3x3dbl_3b")(branch3x3dbl)], axis=-1)
        pooled = (max_pool_3x3(x, 1, padding=1) if self.pool == "max"
                  else avg_pool_3x3_uncounted_padding(x))
        branch_pool = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


def to_network_input(rgb: jax.Array, resize: bool) -> jax.Array:
    """RGB [0, 255] → [-1, 1], resized to 299x299 first when ``resize`` (pytorch-fid's order:
    scale to [0, 1], resize, then 2x - 1)."""
    x = rgb.astype(jnp.float32) / 255.0
    if resize:
        x = image_ops.resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE), align_corners=False)
    return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
    """RGB [0, 255] images [B, H, W, 3] → FID features [B, 2048] (see the module docstring)."""

    resize_input: bool = True

    @nn.compact
    def __call__(self, rgb: jax.Array) -> jax.Array:
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 takes RGB images [B, H, W, 3], got {rgb.shape}")
        x = to_network_input(rgb, self.resize_input)
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"FIDInceptionV3 needs inputs of at least {MIN_INPUT_SIZE}x"
                             f"{MIN_INPUT_SIZE} without the resize, got {x.shape[1]}x{x.shape[2]}")
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3(x, 2)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = max_pool_3x3(x, 2)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def abstract_variables(resize_input: bool = True) -> dict:
    """The network's variable shapes (``jax.ShapeDtypeStruct``s), traced without computing:
    the target tree of a weight import."""
    model = FIDInceptionV3(resize_input=resize_input)
    size = INPUT_SIZE if resize_input else MIN_INPUT_SIZE
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def fid_inception_features(variables, resize_input: bool = True
                           ) -> Callable[[np.ndarray], np.ndarray]:
    """A feature function for ``synseg_jax.fid``: uint8 RGB batches [B, H, W, 3] → float64
    [B, 2048] numpy features, from imported FID Inception variables (the tree
    ``import_weights --format=fid_inception_v3`` writes). Jitted once per batch shape."""
    model = FIDInceptionV3(resize_input=resize_input)
    apply = jax.jit(model.apply)

    def features(batch: np.ndarray) -> np.ndarray:
        return np.asarray(apply(variables, jnp.asarray(batch)), np.float64)

    return features
