"""Import published PyTorch weights into Flax variables: torchvision ResNet and VGG16.

Input is a PyTorch ``state_dict`` already turned into ``{name: numpy array}`` (reading ``.pth``
files needs torch and lives elsewhere). The Flax tree drives the conversion: every leaf of the
target variables under ``scope`` is named by an architecture's *naming* function, which returns
the PyTorch key it comes from and how to reorient the tensor, or ``None`` for a leaf that no
published checkpoint has (it keeps its initial value, e.g. DeepLab-LargeFOV's 1024-channel fc6).

Conventions bridged here:
    conv weight   PyTorch OIHW → Flax HWIO
    linear weight (out, in) → (in, out)
    BatchNorm     weight, bias → params scale, bias; running_mean, running_var → batch_stats
                  mean, var (``num_batches_tracked`` is dropped)

Every problem is collected before failing, and the error lists the first few: PyTorch keys the
model needs but the state_dict lacks, shape mismatches (after reorientation), and state_dict keys
nothing used (minus the prefixes the caller says to ignore, e.g. the ImageNet classifier when
importing a backbone).
"""
from __future__ import annotations

import dataclasses
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
        collection, rest = path[0], path[1:]
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
