"""Segmentation networks, and the factories that name every network a config can ask for.

Parameter-tree rule the optimiser relies on: the pretrained feature extractor lives under
``backbone``; every freshly initialised classifier module's name contains ``head`` (it gets the
10× learning rate); BatchNorm modules' names start with ``bn`` (see ``layers``).

A segmenter is called as ``model.apply(variables, images, train=...)`` on NHWC images and returns a
dict: "logits" at feature resolution (upsampling to label size is the loss's job), "features" (the
backbone's feature dict), "aux_logits" for multi-level variants, and for BiSeNet also
"aux_logits2" (see ``BiSeNet``). ResNet segmenters with SSI modules (``ssi``) add "edge_logits":
a tuple of [N, H, W, 1] edge logits at the input size, one per SSI in layer order, then the fused
one (``models.tsg_ssi``). Segmenters with dropout (the VGG ones, PSPNet) apply it only when
``train=True`` and a "dropout" rng is passed (``vgg.dropout``).

Registered networks (``SEGMENTERS``): DeepLabV2-ResNet101, DeepLab-LargeFOV-VGG16, FCN-8s-VGG16,
PSPNet-ResNet101, BiSeNet-STDC813; each takes ``num_classes``, ``width``, ``stage_sizes`` (its
backbone's depth), ``bn_mode`` and ``dtype``; those with a ResNet or STDC backbone also ``remat``.

``dtype`` is what the layers compute in (``layers.COMPUTE_DTYPES``; None: the input's, float32);
parameters and BatchNorm statistics are float32 either way, and every floating output comes out
float32 (``layers.float32_outputs``), so nothing downstream of a segmenter sees its compute
dtype. ``remat`` rematerialises the backbone's blocks (``layers.rematerialised``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synseg_jax import images
from synseg_jax.models.layers import Conv, ConvBN, batch_norm, conv_padding, float32_outputs
from synseg_jax.models.resnet import ResNet, ResNetClassifier
from synseg_jax.models.tsg_ssi import TextureShapeInserts, check_placements

BACKBONE_SCOPE = "backbone"  # where every segmenter (and the classifier) keeps its feature extractor
from synseg_jax.models.stdc import STAGE_SIZES as STDC_STAGE_SIZES
from synseg_jax.models.stdc import STDCNet
from synseg_jax.models.vgg import VGG, VGG16_STAGE_SIZES, dropout


class ASPP(nn.Module):
    """DeepLabV2's classifier: parallel 3×3 convs with dilation = padding = rate, outputs summed.

    Each branch maps straight to class scores (with bias, no BN or ReLU), weights N(0, 0.01),
    bias 0. Branches are ``branch0``, ``branch1``, … in ``rates`` order.
    """

    num_classes: int
    rates: Sequence[int] = (6, 12, 18, 24)
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branches = [
            Conv(self.num_classes, (3, 3), padding=conv_padding(3, r), kernel_dilation=(r, r),
                 kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                 dtype=self.dtype, name=f"branch{i}")(x)
            for i, r in enumerate(self.rates)
        ]
        return sum(branches[1:], branches[0])


def resnet_features(seg: nn.Module, x: jax.Array, train: bool
                    ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The ResNet ``backbone`` of segmenter `seg` on `x`, with `seg`'s TSG / SSI modules
    (``seg.tsg``, ``seg.ssi``) between its stages. Returns (features, extra outputs: "edge_logits"
    when there is an SSI). Call from `seg`'s compact ``__call__``: the modules are `seg`'s."""
    inserts = TextureShapeInserts(tuple(seg.tsg), tuple(seg.ssi), _scaled(64, seg.width),
                                  seg.dtype)
    features = ResNet(seg.depth, seg.stage_sizes, seg.width, seg.style, seg.output_stride,
                      seg.bn_mode, seg.dtype, seg.remat, name=BACKBONE_SCOPE)(
                          x, train, after_stage=inserts if inserts else None)
    edges = inserts.edge_outputs(x.shape[1:3])
    return features, ({} if edges is None else {"edge_logits": edges})


class DeepLabV2(nn.Module):
    """DeepLabV2: dilated ResNet (``backbone``) + ASPP on layer4 (``head``).

    Attributes:
        num_classes: number of output classes.
        depth, stage_sizes, width, style, output_stride, bn_mode: passed to ``ResNet``; the defaults
            are the field's DeepLabV2-ResNet101 (Caffe style, output stride 8).
        aspp_rates: dilation rates of the ASPP branches.
        aspp_two_branch: keep only the first two rates, as AdaptSegNet's code does by accident and
            DACS / DAFormer's "dlv2red" do on purpose.
        multi_level: add a second ASPP (``head_aux``) on layer3, giving "aux_logits" (AdaptSegNet).
        tsg, ssi: ResNet layers followed by a TSG (1..4) / an SSI (1..3) (``models.tsg_ssi``);
            () = none, the plain network. The heads read the layers' TSG outputs.
    """

    num_classes: int
    depth: int = 101
    stage_sizes: Sequence[int] | None = None
    width: float = 1.0
    style: str = "caffe"
    output_stride: int = 8
    bn_mode: str = "frozen"
    aspp_rates: Sequence[int] = (6, 12, 18, 24)
    aspp_two_branch: bool = False
    multi_level: bool = False
    tsg: Sequence[int] = ()
    ssi: Sequence[int] = ()
    dtype: Any = None
    remat: bool = False

    def __post_init__(self):
        check_placements(tuple(self.tsg), tuple(self.ssi))  # a bad layer fails at build time
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
        features, extra = resnet_features(self, x, train)
        rates = tuple(self.aspp_rates)[:2] if self.aspp_two_branch else tuple(self.aspp_rates)
        head = ASPP(self.num_classes, rates, self.dtype, name="head")
        out = {"logits": head(features["layer4"]), "features": features, **extra}
        if self.multi_level:
            head_aux = ASPP(self.num_classes, rates, self.dtype, name="head_aux")
            out["aux_logits"] = head_aux(features["layer3"])
        return float32_outputs(out)


def _scaled(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class DeepLabLargeFOV(nn.Module):
    """DeepLab-LargeFOV: VGG16 "largefov" (``backbone``) + 1×1 classifier on fc7 (``head``).

    Output stride 8; "logits" come from fc7 (1024 channels at full width). The classifier is
    DeepLab's fc8: N(0, 0.01) weights, zero bias. Other "DeepLab-VGG16" networks in the DA
    literature change fc6/fc7 or put an ASPP on top; this is the LargeFOV one.

    Attributes:
        num_classes: number of output classes.
        stage_sizes, width, dropout_rate: passed to ``VGG`` (dropout after fc6 and fc7).
        bn_mode: accepted for a uniform interface; VGG has no BatchNorm.
    """

    num_classes: int
    stage_sizes: Sequence[int] = VGG16_STAGE_SIZES
    width: float = 1.0
    dropout_rate: float = 0.5
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
        features = VGG("largefov", self.stage_sizes, self.width, self.dropout_rate, self.bn_mode,
                       self.dtype, name="backbone")(x, train)
        logits = Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01),
                      bias_init=nn.initializers.zeros, dtype=self.dtype,
                      name="head")(features["fc7"])
        return float32_outputs({"logits": logits, "features": features})


class FCN8sHead(nn.Module):
    """FCN-8s scoring: 1×1 class scores of fc7, pool4 and pool3, fused coarse to fine.

    score(fc7) is upsampled ×2 to pool4's size and added to score(pool4); that sum is upsampled to
    pool3's size and added to score(pool3), giving logits at stride 8. Every scoring conv starts at
    zero (Long et al. 2015, Sec. 4.1). The upsampling is fixed bilinear: FCN initialises its
    deconvolutions to bilinear interpolation and, in the released nets, does not learn them.
    """

    num_classes: int
    dtype: Any = None

    @nn.compact
    def __call__(self, features: dict[str, jax.Array]) -> jax.Array:
        def score(name: str, x: jax.Array) -> jax.Array:
            return Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.zeros,
                        bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)(x)

        pool3, pool4 = features["pool3"], features["pool4"]
        x = images.resize_bilinear(score("score_fr", features["fc7"]), pool4.shape[1:3])
        x = images.resize_bilinear(x + score("score_pool4", pool4), pool3.shape[1:3])
        return x + score("score_pool3", pool3)


class FCN8s(nn.Module):
    """FCN-8s on VGG16: VGG16 "fcn" (``backbone``, fc6/fc7 included) + ``FCN8sHead`` (``head``).

    "logits" are at stride 8 (pool3's resolution); the final ×8 upsampling is the loss's job.

    Attributes:
        num_classes, stage_sizes, width, dropout_rate, bn_mode: as ``DeepLabLargeFOV``.
    """

    num_classes: int
    stage_sizes: Sequence[int] = VGG16_STAGE_SIZES
    width: float = 1.0
    dropout_rate: float = 0.5
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
        features = VGG("fcn", self.stage_sizes, self.width, self.dropout_rate, self.bn_mode,
                       self.dtype, name="backbone")(x, train)
        logits = FCN8sHead(self.num_classes, self.dtype, name="head")(features)
        return float32_outputs({"logits": logits, "features": features})


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights of PyTorch's adaptive average pool along one axis.

    Bin i averages [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out)); bins may overlap.
    """
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
    """NHWC → (N, bins, bins, C) average pool, as ``nn.AdaptiveAvgPool2d(bins)``."""
    rows = jnp.asarray(_adaptive_pool_matrix(x.shape[1], bins), x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(x.shape[2], bins), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


class PSPHead(nn.Module):
    """PSPNet's pyramid pooling module and classifier (Zhao et al., CVPR 2017, Sec. 3.2).

    Each bin size b: adaptive average pool to b×b, 1×1 ConvBN+ReLU to in/len(bins) channels (the
    paper reduces each level to 1/N of the input, N = 4 levels), bilinear upsample back. The input
    and the four levels are concatenated (2·in channels), then 3×3 ConvBN+ReLU → ``channels``,
    dropout, and a 1×1 conv with bias → classes (``classifier``). Upsampling uses align_corners
    (the reference PyTorch code's and Caffe's Interp convention) unless ``align_corners=False``.
    """

    num_classes: int
    bins: Sequence[int] = (1, 2, 3, 6)
    channels: int = 512
    dropout_rate: float = 0.1
    align_corners: bool = True
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(ConvBN, bn_mode=self.bn_mode, dtype=self.dtype)
        upsample = functools.partial(images.resize_bilinear, align_corners=self.align_corners)
        reduced = max(1, x.shape[-1] // len(self.bins))
        levels = [x]
        for b in self.bins:
            level = conv(reduced, 1, name=f"pool{b}")(adaptive_avg_pool(x, b), train)
            levels.append(upsample(level, x.shape[1:3]))
        y = conv(self.channels, 3, name="bottleneck")(jnp.concatenate(levels, axis=-1), train)
        y = dropout(self, y, self.dropout_rate, train)
        return Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(y)


class PSPNet(nn.Module):
    """PSPNet: dilated ResNet (``backbone``, output stride 8) + ``PSPHead`` on layer4 (``head``).

    Attributes:
        num_classes: number of output classes.
        depth, stage_sizes, width, style, output_stride, bn_mode: passed to ``ResNet``. The default
            style is torchvision's (the ImageNet weights users bring); PSPNet's own ResNet has a
            three-conv "deep" stem, which is not offered.
        bins, align_corners, dropout_rate: of the pyramid pooling head; its 512 channels scale
            with ``width``.
        multi_level: add PSPNet's auxiliary head on layer3 (``head_aux``: 3×3 ConvBN+ReLU → 256·w,
            dropout, 1×1 → classes), giving "aux_logits"; the paper weights its loss 0.4.
        tsg, ssi: as ``DeepLabV2``'s.
    """

    num_classes: int
    depth: int = 101
    stage_sizes: Sequence[int] | None = None
    width: float = 1.0
    style: str = "torchvision"
    output_stride: int = 8
    bn_mode: str = "frozen"
    bins: Sequence[int] = (1, 2, 3, 6)
    align_corners: bool = True
    dropout_rate: float = 0.1
    multi_level: bool = False
    tsg: Sequence[int] = ()
    ssi: Sequence[int] = ()
    dtype: Any = None
    remat: bool = False

    def __post_init__(self):
        check_placements(tuple(self.tsg), tuple(self.ssi))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
        features, extra = resnet_features(self, x, train)
        head = PSPHead(self.num_classes, tuple(self.bins), _scaled(512, self.width),
                       self.dropout_rate, self.align_corners, self.bn_mode, self.dtype,
                       name="head")
        out = {"logits": head(features["layer4"], train), "features": features, **extra}
        if self.multi_level:
            y = ConvBN(_scaled(256, self.width), 3, bn_mode=self.bn_mode, dtype=self.dtype,
                       name="head_aux")(features["layer3"], train)
            y = dropout(self, y, self.dropout_rate, train)
            out["aux_logits"] = Conv(self.num_classes, (1, 1), dtype=self.dtype,
                                     name="head_aux_classifier")(y)
        return float32_outputs(out)


class AttentionRefinement(nn.Module):
    """BiSeNet's ARM: 3×3 ConvBN+ReLU (``conv``), then channel attention from its global average:
    1×1 conv without bias (``conv_atten``), BN (``bn_atten``), sigmoid, multiply."""

    features: int
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvBN(self.features, 3, bn_mode=self.bn_mode, dtype=self.dtype, name="conv")(x, train)
        a = jnp.mean(x, axis=(1, 2), keepdims=True)
        a = Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="conv_atten")(a)
        a = batch_norm(self.bn_mode, train, name="bn_atten", dtype=self.dtype)(a)
        return x * nn.sigmoid(a)


class FeatureFusion(nn.Module):
    """BiSeNet's FFM: concat → 1×1 ConvBN+ReLU (``conv``) = f; SE-style attention a from f's
    global average (1×1 conv → features/ratio, ReLU, 1×1 conv → features, sigmoid; no bias, no BN);
    out = f·a + f."""

    features: int
    ratio: int = 4
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, spatial: jax.Array, context: jax.Array, train: bool) -> jax.Array:
        f = ConvBN(self.features, 1, bn_mode=self.bn_mode, dtype=self.dtype, name="conv")(
            jnp.concatenate([spatial, context], axis=-1), train)
        a = jnp.mean(f, axis=(1, 2), keepdims=True)
        a = nn.relu(Conv(max(1, self.features // self.ratio), (1, 1), use_bias=False,
                         dtype=self.dtype, name="se_reduce")(a))
        a = nn.sigmoid(Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                            name="se_expand")(a))
        return f * a + f


class BiSeNetOutput(nn.Module):
    """3×3 ConvBN+ReLU → ``mid`` channels (``conv``), 1×1 conv without bias → classes."""

    mid: int
    num_classes: int
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvBN(self.mid, 3, bn_mode=self.bn_mode, dtype=self.dtype, name="conv")(x, train)
        return Conv(self.num_classes, (1, 1), use_bias=False, dtype=self.dtype,
                    name="classifier")(x)


class BiSeNetHead(nn.Module):
    """BiSeNet's context path, feature fusion and three outputs on an STDC feature dict.

    Context path (channels ``c`` = 128·w): g = 1×1 ConvBN+ReLU of the global average of the
    stride-32 feature (``global_context``); ctx16 = 3×3 ConvBN+ReLU (``refine32``) of
    nearest-upsample(ARM32(stride32) + g) to stride 16; ctx8 = 3×3 ConvBN+ReLU (``refine16``) of
    nearest-upsample(ARM16(stride16) + ctx16) to stride 8. The stride-8 backbone feature is the
    spatial path, fused with ctx8 by the FFM (→ 256·w). Returns (logits, ctx16 logits,
    ctx8 logits) at strides 8, 16, 8.
    """

    num_classes: int
    width: float = 1.0
    bn_mode: str = "frozen"
    dtype: Any = None

    @nn.compact
    def __call__(self, features: dict[str, jax.Array], train: bool):
        kw = dict(bn_mode=self.bn_mode, dtype=self.dtype)
        c, fused, aux_mid = (_scaled(n, self.width) for n in (128, 256, 64))
        f8, f16, f32 = features["stride8"], features["stride16"], features["stride32"]
        # A 1×1 map nearest-upsampled is a broadcast, so the global term is simply added.
        g = ConvBN(c, 1, name="global_context", **kw)(
            jnp.mean(f32, axis=(1, 2), keepdims=True), train)
        x = AttentionRefinement(c, name="arm32", **kw)(f32, train) + g
        ctx16 = ConvBN(c, 3, name="refine32", **kw)(images.resize_nearest(x, f16.shape[1:3]), train)
        x = AttentionRefinement(c, name="arm16", **kw)(f16, train) + ctx16
        ctx8 = ConvBN(c, 3, name="refine16", **kw)(images.resize_nearest(x, f8.shape[1:3]), train)
        y = FeatureFusion(fused, name="ffm", **kw)(f8, ctx8, train)
        logits = BiSeNetOutput(fused, self.num_classes, name="out", **kw)(y, train)
        aux16 = BiSeNetOutput(aux_mid, self.num_classes, name="out_ctx16", **kw)(ctx16, train)
        aux8 = BiSeNetOutput(aux_mid, self.num_classes, name="out_ctx8", **kw)(ctx8, train)
        return logits, aux16, aux8


class BiSeNet(nn.Module):
    """BiSeNet on STDC (STDC-Seg without its detail head; the real-time DA paper's network):
    ``STDCNet`` (``backbone``) + ``BiSeNetHead`` (``head``).

    Output keys (each at feature resolution; the loss upsamples bilinearly to the label size and,
    as in the reference code, sums the three cross-entropies):
        "logits":      main output, stride 8 (FFM → 256 → classes);
        "aux_logits":  from the stride-16 context feature (128 → 64 → classes), stride 16;
        "aux_logits2": from the stride-8 context feature (128 → 64 → classes), stride 8;
        "features":    the backbone's feature dict.

    Attributes:
        num_classes: number of output classes.
        stage_sizes, width, num_branches, bn_mode: passed to ``STDCNet`` (default STDC813);
            ``width`` also scales the head's 128 / 256 / 64 channels.
    """

    num_classes: int
    stage_sizes: Sequence[int] = STDC_STAGE_SIZES["stdc1"]
    width: float = 1.0
    num_branches: int = 4
    bn_mode: str = "frozen"
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
        features = STDCNet(self.stage_sizes, self.width, self.num_branches, self.bn_mode,
                           self.dtype, self.remat, name="backbone")(x, train)
        logits, aux16, aux8 = BiSeNetHead(self.num_classes, self.width, self.bn_mode, self.dtype,
                                          name="head")(features, train)
        return float32_outputs({"logits": logits, "aux_logits": aux16, "aux_logits2": aux8,
                                "features": features})

# Every name a config may use. Each factory is just a lookup with a helpful error; tests build
# every entry.
SEGMENTERS = {
    "deeplabv2": DeepLabV2,
    "deeplab_largefov_vgg16": DeepLabLargeFOV,
    "fcn8s_vgg16": FCN8s,
    "pspnet_r101": PSPNet,
    "bisenet_stdc813": BiSeNet,
}
BACKBONES = {"resnet": ResNet, "vgg": VGG, "stdc": STDCNet}
CLASSIFIERS = {"resnet": ResNetClassifier}


def _lookup(registry: dict[str, type[nn.Module]], kind: str, name: str) -> type[nn.Module]:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}")
    return registry[name]


def build_segmenter(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    return _lookup(SEGMENTERS, "segmenter", name)(num_classes=num_classes, **kwargs)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    return _lookup(BACKBONES, "backbone", name)(**kwargs)


def build_classifier(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    return _lookup(CLASSIFIERS, "classifier", name)(num_classes=num_classes, **kwargs)
