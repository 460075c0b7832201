"""Convert published ImageNet checkpoints into Flax variables that config ``init.seg`` loads.

    python -m synseg_jax.import_weights --format=torchvision_resnet101 \\
        --src=resnet101-63fe2227.pth --dst=/data/weights/r101_torchvision
    python -m synseg_jax.import_weights --format=deeplab_resnet101_init \\
        --src=DeepLab_resnet_pretrained_init-f81d91e8.pth --dst=/data/weights/deeplab_init
    python -m synseg_jax.import_weights --format=stdc813 --src=STDCNet813M_73.91.tar \\
        --dst=/data/weights/stdc813
    python -m synseg_jax.import_weights --format=fid_inception_v3 \\
        --src=pt_inception-2015-12-05-6726825d.pth --dst=/data/weights/fid_inception
    python -m synseg_jax.import_weights --format=adaptsegnet_deeplab_multi \\
        --src=GTA2Cityscapes_multi-ed35151c.pth --dst=/data/weights/adaptsegnet_multi
    python -m synseg_jax.import_weights --format=stdcseg_bisenet \\
        --src=model_maxmIOU75.pth --dst=/data/weights/stdc1_seg

Formats (``FORMATS``): torchvision_resnet50 / torchvision_resnet101 / torchvision_vgg16 (``.pth``),
deeplab_resnet101_init (DeepLabV2's Caffe-converted ResNet-101, ``Scale.*`` names), stdc813
(``.tar`` with the weights under "state_dict"), timm_safetensors (a timm ``resnet50`` /
``resnet101`` ``model.safetensors``) and fid_inception_v3 (pytorch-fid's FID Inception-v3); two
formats hold a whole trained segmenter and write it whole by default: adaptsegnet_deeplab_multi
(AdaptSegNet's multi-level DeepLabV2: backbone, ``layer6`` = ASPP on layer4 → ``head``, ``layer5``
= ASPP on layer3 → ``head_aux``; two-branch ASPPs, as AdaptSegNet's forward sums only the first
two convs, unless ``--no-aspp-two-branch``) and stdcseg_bisenet (STDC-Seg's trained BiSeNet,
``model_maxmIOU50/75.pth``: InPlace-ABN's γ in the head becomes the BatchNorm scale |γ| + 1e-5,
the detail heads ``conv_out_sp*`` are dropped; STDC1 or STDC2 read from the file).
``.pth``/``.tar`` need torch (optional, weights-only load); ``.safetensors`` need the
``safetensors`` package.

The output (written with ``synseg_jax.checkpoint.save_variables``) is the variables tree
``{"params": …, "batch_stats": …}`` of the ``--scope`` subtree of ``--model`` (default
``backbone``, or the whole model for the two trained-model formats); the command prints the config
overrides that load it, every model field the weights fix included (``model.multi_level``,
``model.aspp_two_branch``, ``model.stage_sizes`` …). ``--scope=`` (empty) writes
the whole model instead, e.g. a DeepLabV2 with the init's ASPP (its class count is read from the
checkpoint), which loads with ``init.seg.scope=`` (empty: the whole segmenter). Leaves the checkpoint has no counterpart for (DeepLab-LargeFOV's subsampled 1024-channel
fc6/fc7) get a fresh He-normal / zero initialisation, as the model gives them, and are listed.
Any key or shape that does not fit fails with the list of the first mismatches.

fid_inception_v3 is not a segmenter's: it writes the whole feature network of the Fréchet
Inception Distance (``models/inception.py``), which ``synseg_jax.fid`` uses through
``inception.fid_inception_features``; the segmenter flags (--model, --width, --scope …) do not
apply to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from synseg_jax import checkpoint, paths
from synseg_jax.models import inception, layers, segmenters, weights
from synseg_jax.models.stdc import STAGE_SIZES as STDC_STAGE_SIZES


@dataclasses.dataclass(frozen=True)
class Format:
    """A published checkpoint layout: the model it fits and how to import it."""

    description: str
    default_model: str
    models: tuple[str, ...]
    model_kwargs: dict  # fixed constructor arguments of the Flax model (style, depth …)
    state_dict_key: str | None = None  # sub-dict holding the weights ("state_dict" in the tar)
    default_stage_sizes: tuple[int, ...] | None = None
    feature_network: bool = False  # a whole non-segmenter network (FID's Inception)
    # The classifier weight (below any "Scale." prefix) whose output channels are the class count;
    # None for a checkpoint without a segmentation head, which imports as a backbone only.
    classes_key: str | None = None
    default_scope: tuple[str, ...] = ("backbone",)
    multi_level: bool = False  # DeepLabV2 with AdaptSegNet's second ASPP on layer3
    aspp_two_branch: bool = False  # what the checkpoint's own forward computes


RESNET_MODELS = ("deeplabv2", "pspnet_r101")
FORMATS = {
    "torchvision_resnet50": Format(
        "torchvision resnet50 .pth (e.g. resnet50-0676ba61.pth / resnet50-11ad3fa6.pth)",
        "pspnet_r101", RESNET_MODELS, dict(style="torchvision", depth=50),
        default_stage_sizes=(3, 4, 6, 3)),
    "torchvision_resnet101": Format(
        "torchvision resnet101 .pth (e.g. resnet101-63fe2227.pth / resnet101-cd907fc2.pth)",
        "pspnet_r101", RESNET_MODELS, dict(style="torchvision", depth=101),
        default_stage_sizes=(3, 4, 23, 3)),
    "timm_safetensors": Format(
        "timm resnet50 / resnet101 model.safetensors (torchvision names; depth read from the file)",
        "pspnet_r101", RESNET_MODELS, dict(style="torchvision")),
    "deeplab_resnet101_init": Format(
        "DeepLabV2 ImageNet+COCO init DeepLab_resnet_pretrained_init-f81d91e8.pth (Scale.* names)",
        "deeplabv2", ("deeplabv2",), dict(style="caffe", depth=101),
        default_stage_sizes=(3, 4, 23, 3), classes_key="layer5.conv2d_list.0.weight"),
    "adaptsegnet_deeplab_multi": Format(
        "AdaptSegNet's trained multi-level DeepLabV2 (model/deeplab_multi.py: layer5 = ASPP on "
        "layer3, layer6 = ASPP on layer4; optional Scale./module. prefix); whole model",
        "deeplabv2", ("deeplabv2",), dict(style="caffe", depth=101),
        default_stage_sizes=(3, 4, 23, 3), classes_key="layer6.conv2d_list.0.weight",
        default_scope=(), multi_level=True, aspp_two_branch=True),
    "torchvision_vgg16": Format(
        "torchvision vgg16 .pth (vgg16-397923af.pth); fc6/fc7 imported for fcn8s_vgg16 only",
        "fcn8s_vgg16", ("fcn8s_vgg16", "deeplab_largefov_vgg16"), {},
        default_stage_sizes=(2, 2, 3, 3, 3)),
    "stdc813": Format(
        "STDC-Seg ImageNet STDCNet813M_73.91.tar (weights under 'state_dict')",
        "bisenet_stdc813", ("bisenet_stdc813",), {}, state_dict_key="state_dict",
        default_stage_sizes=(2, 2, 2)),
    "stdcseg_bisenet": Format(
        "STDC-Seg's trained BiSeNet model_maxmIOU50/75.pth (STDC1 or STDC2; InPlace-ABN head); "
        "whole model",
        "bisenet_stdc813", ("bisenet_stdc813",), {}, classes_key="conv_out.conv_out.weight",
        default_scope=()),
    "fid_inception_v3": Format(
        "pytorch-fid's FID Inception-v3 pt_inception-2015-12-05-6726825d.pth (the whole "
        "feature network of FID, not a segmenter)",
        "fid_inception_v3", ("fid_inception_v3",), {}, feature_network=True),
}

# Flags that only shape a segmenter, with the value that means "not given".
SEGMENTER_FLAGS = {"model": None, "width": 1.0, "stage_sizes": None, "scope": None,
                   "num_classes": None, "aspp_two_branch": None}

RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}

# Input size used to trace the model's variable shapes (no compute happens at this size).
TRACE_SHAPE = (1, 65, 65, 3)


def _parse_sizes(text: str) -> tuple[int, ...] | None:
    text = text.strip().strip("()")
    return tuple(int(t) for t in text.split(",") if t.strip()) or None


def _load_state_dict(fmt: Format, src: str) -> dict[str, np.ndarray]:
    state_dict = weights.load_tensor_file(src, fmt.state_dict_key)
    # Saved from nn.DataParallel: every key starts with "module.".
    return weights.strip_prefix(state_dict, weights.detect_prefix(state_dict, ("module.",)))


def _stage_sizes(fmt_name: str, fmt: Format, state_dict: dict, override) -> tuple[int, ...]:
    if override:
        return tuple(override)
    if fmt_name in ("torchvision_vgg16", "stdc813"):
        return fmt.default_stage_sizes
    if fmt_name == "stdcseg_bisenet":
        blocks = weights.stdc_block_count(state_dict, weights.STDCSEG_BACKBONE_PREFIX)
        known = {sum(sizes): tuple(sizes) for sizes in STDC_STAGE_SIZES.values()}
        if blocks not in known:
            raise ValueError(f"{fmt_name}: the file's STDC backbone has {blocks} CatBottlenecks, "
                             "neither STDC1 (6) nor STDC2 (12); pass --stage-sizes")
        return known[blocks]
    prefix = weights.detect_prefix(state_dict, (weights.DEEPLAB_PREFIX,))
    found = weights.resnet_stage_sizes(state_dict, prefix)
    if fmt.default_stage_sizes is None:  # timm: depth from the file
        if found not in ((3, 4, 6, 3), (3, 4, 23, 3)):
            raise ValueError(f"{fmt_name}: the file's ResNet has blocks per stage {found}, "
                             "neither ResNet-50 (3, 4, 6, 3) nor -101 (3, 4, 23, 3); pass "
                             "--stage-sizes to import it anyway")
        return found
    if found and found != fmt.default_stage_sizes:
        raise ValueError(f"{fmt_name} expects blocks per stage {fmt.default_stage_sizes}, but "
                         f"the file has {found}: wrong --format? (or pass --stage-sizes)")
    return fmt.default_stage_sizes


def _num_classes(fmt: Format, state_dict: dict, scope: tuple[str, ...],
                 override: int | None) -> int:
    if override:
        return override
    if scope:
        return 19  # only the head's shape depends on it, and the head is not written
    prefix = weights.detect_prefix(state_dict, (weights.DEEPLAB_PREFIX,))
    key = prefix + fmt.classes_key
    if key not in state_dict:
        raise ValueError(f"--scope= (the whole model) needs its classifier, but {key} is missing: "
                         "wrong --format?")
    return int(state_dict[key].shape[0])


def _importer(fmt_name: str, model_name: str, stage_sizes, scope: tuple[str, ...]
              ) -> Callable[[dict, Any], dict]:
    if fmt_name.startswith("torchvision_resnet"):
        return lambda sd, v: weights.import_torchvision_resnet(sd, v, scope)
    if fmt_name == "timm_safetensors":
        return lambda sd, v: weights.import_timm_resnet(sd, v, scope)
    if fmt_name == "deeplab_resnet101_init":
        return lambda sd, v: weights.import_deeplab_resnet(sd, v, scope)
    if fmt_name == "adaptsegnet_deeplab_multi":
        return lambda sd, v: weights.import_deeplab_resnet(sd, v, scope,
                                                           heads=weights.DEEPLAB_MULTI_HEADS)
    if fmt_name == "torchvision_vgg16":
        variant = "fcn" if model_name == "fcn8s_vgg16" else "largefov"
        return lambda sd, v: weights.import_torchvision_vgg16(sd, v, variant, stage_sizes, scope)
    if fmt_name == "stdc813":
        return lambda sd, v: weights.import_stdc(sd, v, stage_sizes, scope)
    if fmt_name == "stdcseg_bisenet":
        return lambda sd, v: weights.import_stdcseg_bisenet(sd, v, stage_sizes,
                                                            inplace_abn_head=True, scope=scope)
    raise ValueError(f"unknown format {fmt_name!r}")


def _subtree(tree: dict, scope: tuple[str, ...]) -> dict:
    for key in scope:
        tree = tree[key]
    return tree


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in key_path)


def _initialise_missing(tree: dict, seed: int) -> dict:
    """Concrete values for the leaves the checkpoint lacks (still ``ShapeDtypeStruct``s), drawn as
    the models initialise such layers: conv kernels He-normal (``layers.conv_init``, what
    ``vgg.VGG`` uses for fc6/fc7), biases and BN shifts/means 0, BN scales/variances 1.

    Cheaper than ``model.init``, whose compilation (every initialiser of the network) takes
    tens of seconds on a CPU for a network that only needs two layers filled.
    """
    key = jax.random.key(seed)

    def fill(key_path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        name = str(getattr(key_path[-1], "key", key_path[-1]))
        if name == "kernel":
            return layers.conv_init(jax.random.fold_in(key, zlib.crc32(_path(key_path).encode())),
                                    leaf.shape, leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


def convert(fmt_name: str, src: str, model_name: str | None = None, width: float = 1.0,
            stage_sizes: Sequence[int] | None = None, scope: Sequence[str] | None = None,
            num_classes: int | None = None, aspp_two_branch: bool | None = None, seed: int = 0
            ) -> tuple[dict, dict, list[str]]:
    """Reads ``src`` and returns (variables of ``scope``, the model's config fields, the paths of
    leaves that kept their initialisation). ``scope`` and ``aspp_two_branch`` left None take the
    format's defaults."""
    if fmt_name not in FORMATS:
        raise ValueError(f"unknown --format {fmt_name!r}; one of {', '.join(FORMATS)}")
    fmt = FORMATS[fmt_name]
    if fmt.feature_network:
        raise ValueError(f"{fmt_name} is a feature network, not a segmenter: use "
                         "convert_feature_network")
    model_name = model_name or fmt.default_model
    if model_name not in fmt.models:
        raise ValueError(f"--model={model_name} does not fit {fmt_name}; one of {fmt.models}")
    scope = fmt.default_scope if scope is None else tuple(scope)
    if scope not in ((), ("backbone",)):
        raise ValueError(f"--scope must be 'backbone' or '' (whole model), got {'/'.join(scope)}")
    if not scope and fmt.classes_key is None:
        raise ValueError(f"{fmt_name} holds no segmentation head: import the backbone only")
    if aspp_two_branch is None:
        aspp_two_branch = fmt.aspp_two_branch

    state_dict = _load_state_dict(fmt, src)
    sizes = _stage_sizes(fmt_name, fmt, state_dict, stage_sizes)
    kwargs = dict(fmt.model_kwargs, width=width, stage_sizes=sizes)
    kwargs.pop("depth", None)
    if model_name == "deeplabv2":
        kwargs.update(aspp_two_branch=aspp_two_branch, multi_level=fmt.multi_level)
    classes = _num_classes(fmt, state_dict, scope, num_classes)
    model = segmenters.build_segmenter(model_name, classes, **kwargs)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(seed), jnp.zeros(TRACE_SHAPE), train=False))
    imported = _importer(fmt_name, model_name, sizes, scope)(state_dict, abstract)
    imported = {c: _subtree(v, scope) for c, v in imported.items() if not scope or scope[0] in v}

    kept = [_path(p) for p, leaf in jax.tree_util.tree_flatten_with_path(imported)[0]
            if isinstance(leaf, jax.ShapeDtypeStruct)]
    if kept:
        imported = _initialise_missing(imported, seed)
    variables = jax.tree_util.tree_map(np.asarray, imported)
    config: dict[str, Any] = dict(name=model_name, **{k: v for k, v in fmt.model_kwargs.items()
                                                    if k != "depth"})
    depth = RESNET_DEPTHS.get(tuple(sizes)) if model_name in RESNET_MODELS else None
    if depth:
        config["depth"] = depth
    # Always explicit: a preset's own stage sizes (the demo's 1-1-1-1) would otherwise win.
    config["stage_sizes"] = tuple(sizes)
    config["width"] = width
    if not scope:
        config["num_classes"] = classes
        if model_name == "deeplabv2":
            # Both explicit: a preset's own heads (the adversarial preset's second ASPP) would
            # otherwise give a tree the weights do not fit.
            config.update(aspp_two_branch=aspp_two_branch, multi_level=fmt.multi_level)
    return variables, config, kept


def convert_feature_network(fmt_name: str, src: str) -> dict:
    """Reads ``src`` and returns the whole network's variables (only fid_inception_v3 so far);
    every leaf comes from the file, or the import fails listing what does not fit."""
    if fmt_name != "fid_inception_v3":
        raise ValueError(f"{fmt_name!r} is not a feature-network format")
    state_dict = _load_state_dict(FORMATS[fmt_name], src)
    imported = weights.import_fid_inception(state_dict, inception.abstract_variables())
    return jax.tree_util.tree_map(np.asarray, imported)


def _main_feature_network(args: argparse.Namespace) -> int:
    given = [f"--{name.replace('_', '-')}" for name, unset in SEGMENTER_FLAGS.items()
             if getattr(args, name) != unset]
    if given:
        raise ValueError(f"--format={args.format} writes the whole feature network; "
                         f"{', '.join(given)} only apply to segmenter formats")
    check_destination(args.dst, args.overwrite)
    variables = convert_feature_network(args.format, args.src)
    checkpoint.save_variables(args.dst, variables)
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables))
    print(f"Wrote {count:,} values ({', '.join(sorted(variables))}) to {args.dst}")
    print("Use them as FID's feature network (Python): "
          "synseg_jax.models.inception.fid_inception_features("
          f"synseg_jax.checkpoint.load_variables({args.dst!r}))")
    return 0


def check_destination(dst: str, overwrite: bool) -> None:
    """Refuses a --dst that holds anything (a run's checkpoints, other weights) unless
    --overwrite: the writer would delete it."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise FileExistsError(f"--dst {dst} is a file, not a directory")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        held = sorted(os.listdir(dst))
        raise FileExistsError(
            f"--dst {dst} is not empty (it holds {', '.join(held[:5])}"
            f"{', ...' if len(held) > 5 else ''}); writing there would delete it. Choose a new "
            "directory, or pass --overwrite to replace its contents")


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "'(" + ",".join(map(str, value)) + ")'"
    return str(value) if str(value) else "''"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m synseg_jax.import_weights", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="formats:\n" + "\n".join(f"  {k:26s} {f.description}" for k, f in FORMATS.items()))
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--src", required=True, help="the published checkpoint file")
    parser.add_argument("--dst", required=True, help="output directory (save_variables)")
    parser.add_argument("--model", default=None,
                        help="segmenter the weights are for (default: the format's)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0)")
    parser.add_argument("--stage-sizes", type=_parse_sizes, default=None,
                        help="blocks per stage, e.g. 3,4,23,3 (default: the format's)")
    parser.add_argument("--scope", default=None,
                        help="subtree to write: 'backbone' or '' for the whole model (default: "
                             "the whole model for adaptsegnet_deeplab_multi / stdcseg_bisenet, "
                             "else 'backbone')")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="whole-model import: class count (default: from the checkpoint)")
    parser.add_argument("--aspp-two-branch", action=argparse.BooleanOptionalAction, default=None,
                        help="whole DeepLabV2 with the two-branch ASPP (rates 6, 12); default: "
                             "the format's (on for adaptsegnet_deeplab_multi, whose forward sums "
                             "two convs only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an existing, non-empty --dst holds")
    args = parser.parse_args(argv)
    args.src, args.dst = paths.absolute(args.src), paths.absolute(args.dst)
    fmt = FORMATS[args.format]
    if fmt.feature_network:
        return _main_feature_network(args)
    check_destination(args.dst, args.overwrite)

    scope = (fmt.default_scope if args.scope is None
             else tuple(p for p in args.scope.split("/") if p))
    variables, config, kept = convert(args.format, args.src, args.model, args.width,
                                      args.stage_sizes, scope, args.num_classes,
                                      args.aspp_two_branch)
    checkpoint.save_variables(args.dst, variables)
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables))
    print(f"Wrote {count:,} values ({', '.join(sorted(variables))}) to {args.dst}")
    if kept:
        print(f"{len(kept)} leaves are not in the checkpoint and are freshly initialised: "
              + ", ".join(kept[:8]) + (" …" if len(kept) > 8 else ""))
    fields = {"init.seg.path": args.dst, "init.seg.scope": "/".join(scope),
              **{f"model.{k}": v for k, v in config.items()}}
    flags = [f"--config.{k}={_flag_value(v)}" for k, v in fields.items()]
    print("Load them with (main.py flags; the same key=value pairs work as config overrides):\n  "
          + " ".join(flags))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, ImportError, FileNotFoundError, FileExistsError) as error:
        print(f"import_weights: error: {error}", file=sys.stderr)
        sys.exit(1)
