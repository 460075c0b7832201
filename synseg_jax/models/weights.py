"""Import published PyTorch weights into Flax variables.

Families: torchvision ResNet-50/101 and VGG16, timm ResNets (same names as torchvision), DeepLabV2's
Caffe-converted ResNet-101 init (``Scale.``-prefixed names, ASPP as ``layer5.conv2d_list``) and
AdaptSegNet's trained multi-level DeepLabV2 (ASPPs ``layer5`` on layer3, ``layer6`` on layer4),
STDC813/STDC1446 (``features.{i}``), plus the STDC-Seg BiSeNet head names (InPlace-ABN in its
head), and the Inception-v3 of the Fréchet Inception Distance (pytorch-fid's port of TF FID's
network, torchvision's names).

Input is a PyTorch ``state_dict`` already turned into ``{name: numpy array}``; ``load_tensor_file``
reads one from ``.pth``/``.tar`` (needs torch, imported lazily) or ``.safetensors``. The Flax
tree drives the conversion: every leaf of the target variables under ``scope`` is named by an
architecture's *naming* function, which returns the PyTorch key it comes from and how to reorient
the tensor, or ``None`` for a leaf that no published checkpoint has (it keeps its initial value,
e.g. DeepLab-LargeFOV's 1024-channel fc6).

Conventions bridged here:
    conv weight   PyTorch OIHW → Flax HWIO
    linear weight (out, in) → (in, out)
    BatchNorm     weight, bias → params scale, bias; running_mean, running_var → batch_stats
                  mean, var (``num_batches_tracked`` is dropped)
    InPlace-ABN   weight γ → BatchNorm scale |γ| + eps (``inplace_abn_scale``), the rest as BN

Every problem is collected before failing, and the error lists the first few: PyTorch keys the
model needs but the state_dict lacks, shape mismatches (after reorientation), and state_dict keys
nothing used (minus the prefixes the caller says to ignore, e.g. the ImageNet classifier when
importing a backbone).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from synseg_jax.models.vgg import VGG16_STAGE_SIZES


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a Flax leaf comes from: a PyTorch key and how to reorient that tensor."""

    key: str
    transform: Callable[[np.ndarray], np.ndarray] = np.asarray


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (out, in, kh, kw) → Flax (kh, kw, in, out)."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight (out, in) → Flax Dense kernel (in, out)."""
    return np.transpose(w)


def fc_as_conv_kernel(kernel_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """A linear layer over a flattened (C, k, k) map → the equivalent k×k conv kernel.

    torch.flatten of an NCHW map orders the inputs channel-major, so (out, C·k·k) reshapes to
    (out, C, k, k), an OIHW conv weight.
    """
    def transform(w: np.ndarray) -> np.ndarray:
        out, inputs = w.shape
        return conv_kernel(w.reshape(out, inputs // kernel_size ** 2, kernel_size, kernel_size))
    return transform


# Flax BatchNorm leaf → PyTorch BatchNorm tensor.
BN_TENSORS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

# Bookkeeping tensors no Flax leaf corresponds to.
ALWAYS_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")

Naming = Callable[[tuple[str, ...]], "Source | None"]


def _conv_or_bn(torch_prefix_conv: str, torch_prefix_bn: str, module: str, leaf: str
                ) -> Source | None:
    """A ``ConvBN``'s ``conv``/``bn`` leaf → the PyTorch conv or BN tensor."""
    if module == "conv" and leaf == "kernel":
        return Source(f"{torch_prefix_conv}.weight", conv_kernel)
    if module == "bn" and leaf in BN_TENSORS:
        return Source(f"{torch_prefix_bn}.{BN_TENSORS[leaf]}")
    return None


def torchvision_resnet_naming(path: tuple[str, ...]) -> Source | None:
    """``resnet.ResNet`` leaf (path below the backbone) → torchvision ``resnet50/101`` tensor.

    stem → conv1 / bn1; layer{s}_{b}/conv{i} → layer{s}.{b}.conv{i} / bn{i};
    layer{s}_{b}/downsample → layer{s}.{b}.downsample.0 (conv) / .1 (BN).
    """
    joined = "/".join(path)
    if m := re.fullmatch(r"stem/(conv|bn)/(\w+)", joined):
        return _conv_or_bn("conv1", "bn1", *m.groups())
    if m := re.fullmatch(r"layer(\d+)_(\d+)/conv(\d)/(conv|bn)/(\w+)", joined):
        s, b, i, module, leaf = m.groups()
        return _conv_or_bn(f"layer{s}.{b}.conv{i}", f"layer{s}.{b}.bn{i}", module, leaf)
    if m := re.fullmatch(r"layer(\d+)_(\d+)/downsample/(conv|bn)/(\w+)", joined):
        s, b, module, leaf = m.groups()
        prefix = f"layer{s}.{b}.downsample"
        return _conv_or_bn(f"{prefix}.0", f"{prefix}.1", module, leaf)
    return None


def torchvision_resnet_classifier_naming(path: tuple[str, ...]) -> Source | None:
    """``resnet.ResNetClassifier`` leaf → torchvision tensor: ``backbone/...`` and ``head`` = fc."""
    if path[0] == "backbone":
        return torchvision_resnet_naming(path[1:])
    if path == ("head", "kernel"):
        return Source("fc.weight", dense_kernel)
    if path == ("head", "bias"):
        return Source("fc.bias")
    return None


def torchvision_vgg_naming(stage_sizes: Sequence[int] = VGG16_STAGE_SIZES,
                           import_fc: bool = False) -> Naming:
    """``vgg.VGG`` leaf (path below the backbone) → torchvision ``vgg16`` tensor.

    torchvision numbers the modules of ``features`` in order, ReLUs and pools included: a block of
    n convs occupies 2n + 1 indices (conv, ReLU per conv, then the pool), so conv{b}_{i} is
    ``features.{sum over earlier blocks of (2n + 1) + 2(i - 1)}``. With ``import_fc`` (the "fcn"
    variant: fc6 7×7 → 4096, fc7 1×1 → 4096) fc6 / fc7 come from ``classifier.0`` / ``.3``;
    otherwise they are left to their initialisation (DeepLab-LargeFOV's fc6/fc7 are subsampled
    versions that torchvision does not publish).
    """
    starts = np.concatenate([[0], np.cumsum([2 * n + 1 for n in stage_sizes])])

    def naming(path: tuple[str, ...]) -> Source | None:
        joined = "/".join(path)
        if m := re.fullmatch(r"conv(\d)_(\d)/(kernel|bias)", joined):
            b, i, leaf = int(m.group(1)), int(m.group(2)), m.group(3)
            index = int(starts[b - 1]) + 2 * (i - 1)
            if leaf == "kernel":
                return Source(f"features.{index}.weight", conv_kernel)
            return Source(f"features.{index}.bias")
        if import_fc and (m := re.fullmatch(r"fc([67])/(kernel|bias)", joined)):
            layer, leaf = m.groups()
            index = 0 if layer == "6" else 3  # classifier = fc6, ReLU, Dropout, fc7, ...
            if leaf == "bias":
                return Source(f"classifier.{index}.bias")
            return Source(f"classifier.{index}.weight", fc_as_conv_kernel(7 if layer == "6" else 1))
        return None

    return naming


def _path_keys(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in key_path)


def import_state_dict(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                      naming: Naming, scope: Sequence[str] = ("backbone",),
                      ignore_prefixes: Sequence[str] = (), max_errors: int = 10) -> dict:
    """Returns ``variables`` with every leaf under ``scope`` that ``naming`` maps replaced by the
    reoriented PyTorch tensor (cast to the leaf's dtype).

    Args:
        state_dict: PyTorch tensor name → numpy array.
        variables: the model's variables ({"params": …, "batch_stats": …}); concrete, or the
            shapes from ``jax.eval_shape`` (leaves outside ``scope`` are returned unchanged).
        naming: leaf path below ``scope`` (collection name dropped) → ``Source`` or None.
        scope: the subtree the checkpoint describes, e.g. ("backbone",), or () for the whole
            model (a classifier with its head).
        ignore_prefixes: state_dict keys starting with these may go unused (e.g. "fc." when
            importing an ImageNet ResNet into a segmenter's backbone).
        max_errors: how many problems the error message lists.

    Raises:
        ValueError: listing missing keys, shape mismatches and unused keys.
    """
    scope = tuple(scope)
    used: set[str] = set()
    problems: list[str] = []

    def convert(key_path, leaf):
        path = _path_keys(key_path)
        rest = path[1:]  # path[0] is the collection
        if rest[:len(scope)] != scope:
            return leaf
        source = naming(rest[len(scope):])
        if source is None:
            return leaf
        where = "/".join(path)
        if source.key not in state_dict:
            problems.append(f"missing: {source.key} (for {where} {tuple(leaf.shape)})")
            return leaf
        used.add(source.key)
        value = source.transform(np.asarray(state_dict[source.key]))
        if value.shape != tuple(leaf.shape):
            problems.append(f"shape: {source.key} {tuple(np.shape(state_dict[source.key]))} "
                            f"→ {value.shape}, but {where} is {tuple(leaf.shape)}")
            return leaf
        return jnp.asarray(value, dtype=leaf.dtype)

    converted = jax.tree_util.tree_map_with_path(convert, dict(variables))
    unused = sorted(k for k in state_dict if k not in used and not ALWAYS_IGNORED.search(k)
                    and not k.startswith(tuple(ignore_prefixes)))
    problems += [f"unused: {k} {tuple(np.shape(state_dict[k]))}" for k in unused]
    if problems:
        shown = "\n  ".join(problems[:max_errors])
        more = f"\n  … and {len(problems) - max_errors} more" if len(problems) > max_errors else ""
        raise ValueError(f"state_dict does not match the model ({len(problems)} problems):"
                         f"\n  {shown}{more}")
    return converted


def import_torchvision_resnet(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                              scope: Sequence[str] = ("backbone",)) -> dict:
    """torchvision ResNet-50/101 weights into a segmenter's ``backbone`` (the ImageNet fc is
    ignored) or, with ``scope=()``, into a whole ``ResNetClassifier`` (fc → ``head``).

    Build the model with ``style="torchvision"``: a "caffe" ResNet has the same shapes, so the
    import would succeed, but it strides the 1×1 conv where these weights expect the 3×3.
    """
    if tuple(scope):
        return import_state_dict(state_dict, variables, torchvision_resnet_naming, scope,
                                 ignore_prefixes=("fc.",))
    return import_state_dict(state_dict, variables, torchvision_resnet_classifier_naming, ())


def import_torchvision_vgg16(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                             variant: str, stage_sizes: Sequence[int] = VGG16_STAGE_SIZES,
                             scope: Sequence[str] = ("backbone",)) -> dict:
    """torchvision VGG16 weights into a ``vgg.VGG`` of ``variant`` under ``scope``.

    "fcn" also takes fc6 / fc7 from the classifier; "features" and "largefov" take the 13 convs
    only. The 1000-way fc8 (and, when unused, the rest of the classifier) is ignored.
    """
    import_fc = variant == "fcn"
    ignore = ("classifier.6.",) if import_fc else ("classifier.",)
    return import_state_dict(state_dict, variables, torchvision_vgg_naming(stage_sizes, import_fc),
                             scope, ignore_prefixes=ignore)


# ---------------------------------------------------------------------------------------------
# More layouts: DeepLabV2's Caffe-converted ResNet-101 init, STDC, BiSeNet-STDC, timm ResNet.


def prefixed(naming: Naming, prefix: str) -> Naming:
    """``naming`` with ``prefix`` put before every PyTorch key it returns."""
    if not prefix:
        return naming

    def wrapped(path: tuple[str, ...]) -> Source | None:
        source = naming(path)
        return None if source is None else Source(prefix + source.key, source.transform)

    return wrapped


# DeepLab_resnet_pretrained_init-f81d91e8.pth (AdaptSegNet / ADVENT / BDL / FDA all start from it)
# is a state_dict of the PyTorch port of DeepLabV2's Caffe ResNet-101 ("MS_Deeplab"), whose ResNet
# is the attribute ``Scale``: keys ``Scale.conv1.weight``, ``Scale.bn1.{weight,bias,running_mean,
# running_var}``, ``Scale.layer{s}.{b}.conv{1,2,3}.weight`` / ``.bn{1,2,3}.*``,
# ``Scale.layer{s}.0.downsample.0.weight`` (conv) / ``.downsample.1.*`` (BN), and the ASPP as
# ``Scale.layer5.conv2d_list.{i}.{weight,bias}`` (i = 0..3, rates 6, 12, 18, 24). The reference
# training scripts load it by dropping the first dotted component of every key ("Scale.") and
# skipping ``layer5`` when the class count differs. Below ``Scale.`` the names are exactly
# torchvision's; only the layout of the network (stride on the 1×1 conv, ceil-mode pool, dilation)
# differs, which the Flax model's ``style="caffe"`` supplies.
DEEPLAB_PREFIX = "Scale."


def detect_prefix(state_dict: Mapping[str, Any], candidates: Sequence[str]) -> str:
    """The first candidate prefix that every key starts with ("" if none does)."""
    for prefix in candidates:
        if prefix and state_dict and all(k.startswith(prefix) for k in state_dict):
            return prefix
    return ""


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Drops ``prefix`` from every key that has it (e.g. DataParallel's "module.")."""
    return {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v
            for k, v in state_dict.items()}


def resnet_stage_sizes(state_dict: Mapping[str, Any], prefix: str = "") -> tuple[int, ...]:
    """Blocks per stage of a torchvision-named ResNet state_dict, e.g. (3, 4, 23, 3)."""
    blocks: dict[int, int] = {}
    pattern = re.compile(re.escape(prefix) + r"layer(\d+)\.(\d+)\.")
    for key in state_dict:
        if m := pattern.match(key):
            s, b = int(m.group(1)), int(m.group(2))
            blocks[s] = max(blocks.get(s, 0), b + 1)
    return tuple(blocks[s] for s in sorted(blocks) if s <= 4)


def aspp_naming(prefix: str) -> Naming:
    """``ASPP`` leaf (below the head) → ``{prefix}conv2d_list.{i}`` conv with bias."""
    def naming(path: tuple[str, ...]) -> Source | None:
        if m := re.fullmatch(r"branch(\d+)/(kernel|bias)", "/".join(path)):
            i, leaf = m.groups()
            if leaf == "kernel":
                return Source(f"{prefix}conv2d_list.{i}.weight", conv_kernel)
            return Source(f"{prefix}conv2d_list.{i}.bias")
        return None
    return naming


# Which Flax head reads which PyTorch ASPP. The same name means different layers in the two
# published models: the init's single-level ``MS_Deeplab`` has one ASPP, ``layer5``, on layer4;
# AdaptSegNet's ``ResNetMulti`` (model/deeplab_multi.py) puts ``layer5`` on layer3 (1024 channels
# in) and ``layer6`` on layer4 (2048 in), and returns (layer5 output, layer6 output).
DEEPLAB_INIT_HEADS = {"head": "layer5"}
DEEPLAB_MULTI_HEADS = {"head": "layer6", "head_aux": "layer5"}


def deeplab_v2_naming(prefix: str = DEEPLAB_PREFIX,
                      heads: Mapping[str, str] = DEEPLAB_INIT_HEADS) -> Naming:
    """Whole ``segmenters.DeepLabV2`` leaf → DeepLab key: ``backbone`` as torchvision's names
    under ``prefix``, each Flax ASPP of ``heads`` ← ``{prefix}{its layer}.conv2d_list``. A head
    ``heads`` leaves out (the init's missing ``head_aux``) keeps its initialisation."""
    backbone = prefixed(torchvision_resnet_naming, prefix)
    aspps = {flax: aspp_naming(f"{prefix}{torch_layer}.") for flax, torch_layer in heads.items()}

    def naming(path: tuple[str, ...]) -> Source | None:
        if path[0] == "backbone":
            return backbone(path[1:])
        if path[0] in aspps:
            return aspps[path[0]](path[1:])
        return None
    return naming


def _aspp_branches(variables: Mapping[str, Any], scope: Sequence[str]) -> int:
    tree = variables["params"]
    for key in scope:
        tree = tree[key]
    return sum(1 for k in tree.get("head", {}) if k.startswith("branch"))


def import_deeplab_resnet(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                          scope: Sequence[str] = ("backbone",), prefix: str | None = None,
                          heads: Mapping[str, str] = DEEPLAB_INIT_HEADS) -> dict:
    """A DeepLabV2-ResNet-101 state_dict into a Caffe style ``ResNet`` under ``scope`` (its ASPPs
    ignored), or with ``scope=()`` into a whole ``DeepLabV2`` including the ASPPs ``heads`` names
    (the model's class count must equal the checkpoint's; a two-branch ASPP takes the first two
    convs of each, and the file's others are ignored).

    ``heads`` is ``DEEPLAB_INIT_HEADS`` for the ImageNet+COCO init
    (``DeepLab_resnet_pretrained_init-f81d91e8.pth``), ``DEEPLAB_MULTI_HEADS`` for a trained
    AdaptSegNet multi-level model, which the model must be built for (``multi_level=True``).
    ``prefix`` defaults to "Scale." when every key has it, else "" (an already stripped copy).
    """
    if prefix is None:
        prefix = detect_prefix(state_dict, (DEEPLAB_PREFIX,))
    aspp_layers = tuple(f"{prefix}{torch_layer}." for torch_layer in heads.values())
    if tuple(scope):
        return import_state_dict(state_dict, variables, prefixed(torchvision_resnet_naming, prefix),
                                 scope, ignore_prefixes=aspp_layers)
    branches = _aspp_branches(variables, ())
    # A two-branch model leaves the file's later convs (four in every published ASPP) unused.
    unused_branches = tuple(f"{layer}conv2d_list.{i}." for layer in aspp_layers
                            for i in range(branches, 8))
    return import_state_dict(state_dict, variables, deeplab_v2_naming(prefix, heads), (),
                             ignore_prefixes=unused_branches)


def import_timm_resnet(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                       scope: Sequence[str] = ("backbone",)) -> dict:
    """timm ``resnet50`` / ``resnet101`` weights (e.g. the hub's ``model.safetensors``).

    timm's plain ResNets use torchvision's names and layout (stride on the 3×3 conv), so this is
    ``import_torchvision_resnet``; variants with a deep stem or average-pool shortcuts
    (``resnet50d`` …: ``conv1.0``, ``downsample.1`` is a conv) do not fit and fail with the list
    of mismatched keys.
    """
    return import_torchvision_resnet(state_dict, variables, scope)


# STDCNet813M_73.91.tar / STDCNet1446_76.47.tar (STDC-Seg's ImageNet classifiers): the weights are
# under "state_dict"; the backbone is ``features``, an nn.Sequential of ConvX(3→32, 3×3/2) [0],
# ConvX(32→64, 3×3/2) [1], then the CatBottlenecks of the three stages in order [2, 3, …]. A
# ConvX is ``.conv`` (no bias) + ``.bn``; a CatBottleneck is ``.conv_list.{j}`` (ConvX, j =
# branch) and, when it has stride 2, ``.avd_layer.0`` (depthwise 3×3/2 conv) + ``.avd_layer.1``
# (BN). The network also registers ``x2``, ``x4``, ``x8``, ``x16``, ``x32`` as nn.Sequentials
# over slices of ``features`` (the same modules again under other names) and the classifier tail
# ``conv_last``, ``fc``, ``bn``, ``linear``; none of those is needed by the backbone.
STDC_IGNORED = ("x2.", "x4.", "x8.", "x16.", "x32.", "conv_last.", "fc.", "bn.", "linear.")


def stdc_naming(stage_sizes: Sequence[int] = (2, 2, 2)) -> Naming:
    """``stdc.STDCNet`` leaf → STDC-Seg ``features.{i}`` tensor."""
    first = {s: 2 + sum(stage_sizes[:s - 3]) for s in (3, 4, 5)}

    def naming(path: tuple[str, ...]) -> Source | None:
        joined = "/".join(path)
        if m := re.fullmatch(r"convx(\d)/(conv|bn)/(\w+)", joined):
            i, module, leaf = m.groups()
            p = f"features.{int(i) - 1}"
            return _conv_or_bn(f"{p}.conv", f"{p}.bn", module, leaf)
        if m := re.fullmatch(r"stage(\d)_(\d+)/(.+)", joined):
            s, b, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            p = f"features.{first[s] + b}"
            if m := re.fullmatch(r"branch(\d+)/(conv|bn)/(\w+)", rest):
                j, module, leaf = m.groups()
                return _conv_or_bn(f"{p}.conv_list.{j}.conv", f"{p}.conv_list.{j}.bn", module,
                                   leaf)
            if rest == "conv_avd/kernel":
                return Source(f"{p}.avd_layer.0.weight", conv_kernel)
            if m := re.fullmatch(r"bn_avd/(\w+)", rest):
                return _conv_or_bn("", f"{p}.avd_layer.1", "bn", m.group(1))
        return None
    return naming


def import_stdc(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                stage_sizes: Sequence[int] = (2, 2, 2), scope: Sequence[str] = ("backbone",)
                ) -> dict:
    """STDC-Seg ImageNet weights (the tar's "state_dict", "module." already stripped) into an
    ``STDCNet`` under ``scope``; the classifier tail and the ``x2``…``x32`` aliases are
    ignored."""
    return import_state_dict(state_dict, variables, stdc_naming(stage_sizes), scope,
                             ignore_prefixes=STDC_IGNORED)


# STDC-Seg's BiSeNet (models/model_stages.py; the real-time DA paper's code keeps its names):
# ``cp`` = ContextPath {backbone, arm16, arm32, conv_head32, conv_head16, conv_avg}, ``ffm`` =
# FeatureFusionModule {convblk, conv1, conv2}, outputs ``conv_out`` (on the FFM), ``conv_out16``
# (on the stride-8 context feature, despite its name) and ``conv_out32`` (stride-16 feature), each
# {conv (ConvBNReLU), conv_out (1×1, no bias)}; ``conv_out_sp{2,4,8,16}`` are STDC-Seg's detail
# heads, which this BiSeNet does not have. ConvBNReLU and the ARM's ``conv`` are {conv, bn}.
BISENET_MODULES = {
    "global_context": "cp.conv_avg", "arm32": "cp.arm32", "arm16": "cp.arm16",
    "refine32": "cp.conv_head32", "refine16": "cp.conv_head16", "ffm": "ffm",
    "out": "conv_out", "out_ctx16": "conv_out32", "out_ctx8": "conv_out16",
}
BISENET_LEAVES = {"conv_atten": "conv_atten", "se_reduce": "conv1", "se_expand": "conv2",
                  "classifier": "conv_out"}
STDCSEG_BACKBONE_PREFIX = "cp.backbone."
STDCSEG_DETAIL_HEADS = "conv_out_sp"

# STDC-Seg's head modules normalise with InPlace-ABN (``InPlaceABNSync``), its backbone with plain
# ``nn.BatchNorm2d``. InPlace-ABN stores a weight γ but scales by |γ| + eps (eps = 1e-5, the module
# default STDC-Seg keeps; the same eps as in its 1/sqrt(var + eps)), so that the forward can be
# inverted in place; its backward multiplies γ's gradient by sign(γ). A trained γ can therefore be
# negative, and copying it as a BatchNorm scale flips that channel. STDC-Seg builds every one of
# them with activation "none" and applies a separate ReLU (ConvBNReLU) or sigmoid (ARM attention)
# after it, which is what ``ConvBN`` / ``AttentionRefinement`` do, so no activation is converted:
# a checkpoint from a model whose InPlace-ABN applies its default leaky ReLU (slope 0.01) does
# not fit these layers, and nothing in a state_dict tells the two apart.
INPLACE_ABN_EPS = 1e-5


def inplace_abn_scale(weight: np.ndarray, eps: float = INPLACE_ABN_EPS) -> np.ndarray:
    """InPlace-ABN's stored γ → the BatchNorm scale that gives the same output, |γ| + eps."""
    return np.abs(weight) + eps


def stdcseg_bisenet_naming(stage_sizes: Sequence[int] = (2, 2, 2),
                           inplace_abn_head: bool = False) -> Naming:
    """Whole ``segmenters.BiSeNet`` leaf → STDC-Seg BiSeNet state_dict key; with
    ``inplace_abn_head`` every BN scale under ``head`` is read as an InPlace-ABN γ."""
    backbone = prefixed(stdc_naming(stage_sizes), STDCSEG_BACKBONE_PREFIX)

    def head(path: tuple[str, ...]) -> Source | None:
        if path[0] not in BISENET_MODULES:
            return None
        p, rest = BISENET_MODULES[path[0]], "/".join(path[1:])
        if m := re.fullmatch(r"(conv|bn)/(\w+)", rest):  # a ConvBN module itself
            module, leaf = m.groups()
            return _conv_or_bn(f"{p}.conv", f"{p}.bn", module, leaf)
        if m := re.fullmatch(r"conv/(conv|bn)/(\w+)", rest):  # ARM / FFM / output ConvBN
            module, leaf = m.groups()
            inner = f"{p}.convblk" if path[0] == "ffm" else f"{p}.conv"
            return _conv_or_bn(f"{inner}.conv", f"{inner}.bn", module, leaf)
        if m := re.fullmatch(r"bn_atten/(\w+)", rest):
            return _conv_or_bn("", f"{p}.bn_atten", "bn", m.group(1))
        if m := re.fullmatch(r"(\w+)/kernel", rest):
            if m.group(1) in BISENET_LEAVES:
                return Source(f"{p}.{BISENET_LEAVES[m.group(1)]}.weight", conv_kernel)
        return None

    def naming(path: tuple[str, ...]) -> Source | None:
        if path[0] == "backbone":
            return backbone(path[1:])
        if path[0] != "head" or (source := head(path[1:])) is None:
            return None
        if inplace_abn_head and path[-1] == "scale":
            return Source(source.key, inplace_abn_scale)
        return source
    return naming


def import_stdcseg_bisenet(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                           stage_sizes: Sequence[int] = (2, 2, 2), inplace_abn_head: bool = False,
                           scope: Sequence[str] = ()) -> dict:
    """A whole STDC-Seg-layout BiSeNet into ``BiSeNet`` (``scope=()``), or its STDC backbone
    alone (``scope=("backbone",)``, everything outside ``cp.backbone`` ignored).

    ``inplace_abn_head=True`` for STDC-Seg's own checkpoints (``model_maxmIOU75.pth`` …), whose
    head normalises with InPlace-ABN (γ → |γ| + eps); False for a copy of the network with plain
    BatchNorm everywhere. The backbone's BN is plain in both.
    """
    if tuple(scope):
        backbone = {k[len(STDCSEG_BACKBONE_PREFIX):]: v for k, v in state_dict.items()
                    if k.startswith(STDCSEG_BACKBONE_PREFIX)}
        return import_stdc(backbone, variables, stage_sizes, scope)
    ignore = tuple(STDCSEG_BACKBONE_PREFIX + p for p in STDC_IGNORED) + (STDCSEG_DETAIL_HEADS,)
    return import_state_dict(state_dict, variables,
                             stdcseg_bisenet_naming(stage_sizes, inplace_abn_head), (),
                             ignore_prefixes=ignore)


def stdc_block_count(state_dict: Mapping[str, Any], prefix: str = "") -> int:
    """CatBottlenecks in an STDC state_dict: its ``features`` entries after the two ConvX."""
    pattern = re.compile(re.escape(prefix) + r"features\.(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(0, len(indices) - 2)


# pt_inception-2015-12-05-6726825d.pth (pytorch-fid's port of TF FID's Inception-v3) is the
# state_dict of torchvision's ``Inception3`` built with 1008 classes and no auxiliary classifier:
# ``{module path}.conv.weight`` and ``{module path}.bn.{weight,bias,running_mean,running_var}``
# for every BasicConv2d (``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1``, ``Mixed_7c.branch3x3_2a`` …),
# plus the 1008-way classifier ``fc``, which FID does not use. ``inception.FIDInceptionV3``
# keeps torchvision's module names, so a leaf's Flax path is its PyTorch key with "/" for ".".
FID_INCEPTION_IGNORED = ("fc.",)


def fid_inception_naming(path: tuple[str, ...]) -> Source | None:
    """``inception.FIDInceptionV3`` leaf → pytorch-fid Inception key: ``A/B/conv/kernel`` →
    ``A.B.conv.weight``, ``A/B/bn/{scale,bias,mean,var}`` → ``A.B.bn.{weight,bias,running_*}``."""
    if len(path) < 3:
        return None
    module = ".".join(path[:-2])
    return _conv_or_bn(f"{module}.conv", f"{module}.bn", path[-2], path[-1])


def import_fid_inception(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any]
                         ) -> dict:
    """pytorch-fid's FID Inception weights into a whole ``inception.FIDInceptionV3``; the
    classifier ``fc`` is ignored. Any other key left over (e.g. torchvision's ``AuxLogits``, a
    sign of torchvision's ImageNet Inception, which is not FID's network) is an error."""
    return import_state_dict(state_dict, variables, fid_inception_naming, (),
                             ignore_prefixes=FID_INCEPTION_IGNORED)


# ---------------------------------------------------------------------------------------------
# Reading checkpoint files.


def _import_torch():
    try:
        import torch  # noqa: PLC0415 (optional dependency, imported only to read .pth files)
    except ImportError as err:
        raise ImportError(
            "Reading PyTorch .pth/.tar checkpoints needs torch, an optional dependency of "
            "synseg_jax: install a CPU build (e.g. `pip install torch`), or convert the file to "
            ".safetensors elsewhere and import that.") from err
    return torch


def _to_numpy(value: Any) -> np.ndarray:
    torch = _import_torch()
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
        value = value.float()  # bfloat16 / float16 → float32 (numpy has no bfloat16)
    return value.numpy()


def _unpickler_reason(err: Exception) -> str:
    """What torch found wrong with a file, without its advice to retry with weights_only=False
    (which runs whatever code the file holds: never the right advice for an unknown file)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = text.split("Check the documentation of torch.load", 1)[0]
        text = text.split(" Please use `torch.serialization", 1)[0]
    elif "weights_only" in text:
        text = "not a PyTorch checkpoint"
    text = " ".join(text.split()).rstrip(".")
    return text or "not a PyTorch checkpoint"


def load_tensor_file(path: str, key: str | None = None) -> dict[str, np.ndarray]:
    """A checkpoint file as ``{name: numpy array}``.

    ``.safetensors`` is read with the ``safetensors`` package's numpy loader. Anything else is a
    PyTorch pickle, read with ``torch.load(..., map_location="cpu", weights_only=True)``: tensors
    and plain containers only, never arbitrary objects. ``key`` selects a sub-dict (e.g.
    "state_dict" in the STDC ``.tar``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path}")
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file  # noqa: PLC0415
        except ImportError as err:
            raise ImportError("Reading .safetensors files needs the `safetensors` package") from err
        loaded: Any = load_file(str(path))
    else:
        torch = _import_torch()
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError subclasses, versions differ
            raise ValueError(
                f"Could not read {path} as a weights-only PyTorch checkpoint (tensors and plain "
                f"containers only; arbitrary pickled objects are refused): "
                f"{_unpickler_reason(err)}. If it is a whole pickled model from a source you "
                "trust, load it in PyTorch yourself and save its weights alone "
                "(torch.save(model.state_dict(), 'weights.pth')), then import that file") from None
    if key is not None:
        if not isinstance(loaded, Mapping) or key not in loaded:
            found = sorted(loaded)[:10] if isinstance(loaded, Mapping) else type(loaded).__name__
            raise ValueError(f"{path} has no {key!r} entry (top level: {found})")
        loaded = loaded[key]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (got {type(loaded).__name__})")
    out = {}
    for name, value in loaded.items():
        if isinstance(value, Mapping):
            raise ValueError(f"{path}: entry {name!r} is a nested dict; pass its name as `key`")
        out[str(name)] = np.asarray(value) if isinstance(value, np.ndarray) else _to_numpy(value)
    return out
