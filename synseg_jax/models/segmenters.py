"""Segmentation networks, and the factories that name every network a config can ask for.

Parameter-tree rule the optimiser relies on: the pretrained feature extractor lives under
``backbone``; every freshly initialised classifier module's name contains ``head`` (it gets the
10× learning rate); BatchNorm modules' names start with ``bn`` (see ``layers``).

A segmenter is called as ``model.apply(variables, images, train=...)`` on NHWC images and returns a
dict: "logits" at feature resolution (upsampling to label size is the loss's job), "features" (the
backbone's feature dict), and "aux_logits" for multi-level variants.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from synseg_jax.models.layers import conv_padding
from synseg_jax.models.resnet import ResNet, ResNetClassifier


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
            nn.Conv(self.num_classes, (3, 3), padding=conv_padding(3, r), kernel_dilation=(r, r),
                    kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                    dtype=self.dtype, name=f"branch{i}")(x)
            for i, r in enumerate(self.rates)
        ]
        return sum(branches[1:], branches[0])


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
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
        features = ResNet(self.depth, self.stage_sizes, self.width, self.style,
                          self.output_stride, self.bn_mode, self.dtype, name="backbone")(x, train)
        rates = tuple(self.aspp_rates)[:2] if self.aspp_two_branch else tuple(self.aspp_rates)
        head = ASPP(self.num_classes, rates, self.dtype, name="head")
        out = {"logits": head(features["layer4"]), "features": features}
        if self.multi_level:
            head_aux = ASPP(self.num_classes, rates, self.dtype, name="head_aux")
            out["aux_logits"] = head_aux(features["layer3"])
        return out


# Every name a config may use. Each factory is just a lookup with a helpful error; tests build
# every entry.
SEGMENTERS = {"deeplabv2": DeepLabV2}
BACKBONES = {"resnet": ResNet}
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
