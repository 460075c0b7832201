"""Every config field, its default and where the default comes from.

A method's config file starts from `base_config()`, sets what its paper says, and returns
`finalize(config, arg)`, which applies the preset (`demo`, `gta5`, `synthia`) and then the
`key=value` overrides of `arg`. Configs are locked: a mistyped key is an error naming the key.

Defaults below are the papers' values for the full-size setting (the `gta5` preset); the `demo`
preset shrinks models and data so a run takes minutes on a CPU, without changing the algorithm.
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import ml_collections

from synseg_jax import config_keys
from synseg_jax.methods import base

PRESETS = ("demo", "gta5", "synthia")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds the init of networks not loaded from init.*, data order, augmentation
    c.preset = "demo"  # set by finalize(); recorded in config.json

    c.data = d = ml_collections.ConfigDict()
    d.data_dir = ""  # TFDS data dir; "" -> $SYNSEG_DATA_DIR or ~/tensorflow_datasets
    d.source = "minicity"  # labelled source dataset
    d.source_split = "sim"
    d.target = "minicity"  # unlabelled target dataset ("" for source-only / generalisation)
    d.target_split = "real_train"
    d.target_labels = False  # True only for the oracle: trains on target labels
    d.eval_dataset = "minicity"
    d.eval_split = "real_val"
    d.extra_eval_splits = ()  # further "dataset/split" pairs scored at the end of training
    d.train_resize = (720, 1280)  # (H, W) resize before cropping; GTA5 1280x720 (AdaptSegNet)
    d.target_resize = (512, 1024)  # Cityscapes train images 1024x512 (AdaptSegNet)
    d.crop = (512, 1024)  # random crop (H, W); () = no crop
    d.scale_range = (1.0, 1.0)  # random rescale factor range before cropping
    d.flip = True  # random horizontal flip, p = 0.5
    d.jitter_prob = 0.0  # probability of each jitter op below
    d.jitter_ops = ("brightness", "contrast", "saturation")  # photometric jitters applied
    d.normalization = "caffe_bgr"  # DeepLab lineage: BGR 0..255 minus mean (docs/reference.md)
    d.eval_size = (512, 1024)  # inference size; logits upsampled to the full label size
    d.eval_batch_size = 1
    d.shuffle_buffer = 1000  # encoded examples (training streams decode after shuffling)
    d.minicity = m = ml_collections.ConfigDict()
    m.scene_size = (128, 256)  # minicity rendering size (H, W)
    m.object_size = 64  # minicity objects crop size
    m.seed = 0  # generator seed: a different seed is a different benchmark
    # Domain-gap knobs turned off for the real splits (minicity/gap.py: palette, texture,
    # lighting, sensor, camera, frequencies); () is the benchmark. For ablations only.
    m.gap_off = ()
    # Examples per split; 0 keeps the benchmark's size (minicity.DEFAULT_NUM_EXAMPLES).
    m.num_examples = ml_collections.ConfigDict(
        {"sim": 0, "sim_topdown": 0, "real_train": 0, "real_val": 0, "objects": 0})

    c.model = mo = ml_collections.ConfigDict()
    mo.name = "deeplabv2"  # segmenter, see synseg_jax.models.segmenters
    mo.num_classes = 19
    mo.depth = 101  # ResNet-101 (DeepLabV2, AdaptSegNet)
    mo.stage_sizes = ()  # explicit blocks per stage; overrides depth (demo members)
    mo.width = 1.0  # channel multiplier (demo members)
    # ResNet style; "" = the segmenter's own: "caffe" (stride on the first 1x1, DeepLab's released
    # init) for DeepLabV2, "torchvision" (stride on the 3x3, torchvision's ImageNet weights) for
    # PSPNet. Set it to the style of the weights you import (import_weights prints it).
    mo.style = ""
    mo.output_stride = 8  # DeepLabV2: layer3 dilation 2, layer4 dilation 4
    mo.aspp_rates = (6, 12, 18, 24)  # DeepLabV2 ASPP
    # True: the AdaptSegNet code's ASPP, which returns after its first two branches (6, 12)
    mo.aspp_two_branch = False
    mo.multi_level = False  # second ASPP on layer3 (AdaptSegNet multi-level)
    # ResNet segmenters only: layers (1-4) followed by a Texture Structure Generalizer, and
    # layers (1-3) followed by a Spatial Structure Intensifier, whose edge maps ("edge_logits")
    # the tsg_ssi method supervises (configs/tsg_ssi.py). () = none: the plain network.
    mo.tsg = ()
    mo.ssi = ()
    # Bilinear upsampling of logits to the label size in losses, evaluation and export:
    # False = PyTorch >= 0.4's default (this project's); STDC-Seg's BiSeNet and AdaptSegNet's
    # PyTorch 0.4 port use True. Each paper preset says which its reference code used.
    mo.align_corners = False
    mo.bn_mode = "frozen"  # "frozen": running statistics; "train": batch statistics
    mo.bn_update = "source"  # with bn_mode="train": which domains update running stats
    # What the segmenter's convolutions and matmuls compute in: "float32", or "bfloat16" (TPU's
    # and Hopper GPUs' native format: about half the activation memory). Parameters, BN
    # statistics, the segmenter's outputs and so every loss and softmax stay float32 either way.
    # A CPU without bfloat16 units emulates it; the memory-bound demo net still steps faster.
    mo.compute_dtype = "float32"
    # Recompute each backbone block's activations (ResNet bottleneck, STDC module) in the backward
    # pass instead of storing them: the same results in less memory, for about a third more
    # compute; for 1280x720 DeepLabV2-R101 on a small accelerator. Not for the VGG segmenters.
    mo.remat = False

    # FDA (Yang & Soatto, CVPR 2020), an input option of every method: each source image takes
    # the low-frequency amplitude of a target image (synseg_jax/fda.py).
    c.fda = f = ml_collections.ConfigDict()
    f.beta = 0.0  # window size; 0 = off. FDA: 0.01, 0.05, 0.09 (must be in (0, 0.5))
    f.variant = "centered"  # "centered": FDA's numpy function (real-time DA); "corners": its torch code

    # Initial weights per role (init.seg, init.teacher, ...; see init_section). The segmenter
    # starts from imported ImageNet weights of its backbone (synseg_jax.import_weights).
    c.init = ml_collections.ConfigDict({"seg": init_section(scope="backbone")})

    # One section per optimised role (optim.seg, optim.disc, ...), each with its own optax state.
    c.optim = ml_collections.ConfigDict({"seg": optimizer_section()})

    c.train = t = ml_collections.ConfigDict()
    t.steps = 120_000  # AdaptSegNet stops at 120k of the 250k schedule
    t.batch_size = 1  # global batch per domain (AdaptSegNet: 1)
    t.log_every = 50
    t.image_every = 1000  # image summaries (input, label, prediction)
    t.checkpoint_every = 5000
    t.keep_checkpoints = 3
    t.eval_every = 5000  # 0: only at the end

    c.method = me = ml_collections.ConfigDict()
    me.name = "source_only"  # see synseg_jax.methods
    # A method's own fields (ROAD's lambdas, a discriminator's widths) are declared by its config
    # file (configs/<method>.py), so config.json records only those of the method that ran.
    me.aux_weight = 0.1  # multi-level: source loss = main + 0.1 x aux (AdaptSegNet)
    # Stages of a recipe (empty: one training run in the workdir): each a train_stage() or
    # sweep_stage() section, run in <workdir>/<name>, in the order stage_order names them
    # (ConfigDict keys iterate sorted, so the order is explicit).
    c.stages = ml_collections.ConfigDict()
    c.stage_order = ()

    c.pretrain = p = ml_collections.ConfigDict()
    # demo: the config that makes init.<role>.path="demo" when it is missing (this folder's pretrain.py)
    p.config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
    p.workdir = ""  # "" -> <workdir>/../pretrain_<backbone key>
    # The demo backbone stands in for ImageNet weights, which every run of a paper starts from
    # whatever its seed: one pretraining per benchmark, shared by all seeds of every method.
    p.seed = 0
    p.overrides = ""  # extra "key=value,..." for the pretraining config (e.g. train.steps=100)
    return c


def optimizer_section(**fields) -> ml_collections.ConfigDict:
    """One role's optimiser. Defaults: the DeepLabV2 segmenter of AdaptSegNet; `fields` override
    them (values or FieldReferences to another role's fields, which then follow that role)."""
    o = ml_collections.ConfigDict()
    o.kind = "sgd"  # "sgd" (PyTorch SGD), "adam" (L2 decay in the gradient) or "adamw" (decoupled)
    o.lr = 2.5e-4  # DeepLabV2 / AdaptSegNet segmenter
    o.schedule = "poly"  # "poly": lr (1 - step/schedule_steps)^poly_power; "constant"
    o.poly_power = 0.9  # DeepLab's poly power
    o.warmup_steps = 0  # linear warmup before the schedule; 0 = none, as in every paper here
    o.schedule_steps = 250_000  # poly horizon (AdaptSegNet: 250k, stopped earlier)
    o.momentum = 0.9  # SGD momentum (DeepLab)
    o.betas = (0.9, 0.99)  # Adam betas of the adaptation papers' discriminators (AdaptSegNet)
    o.weight_decay = 5e-4  # DeepLab's SGD; Adam roles of the reference codes use 0
    o.head_lr_mult = 10.0  # parameters under a "head"/"classifier" learn 10x faster (DeepLab)
    o.freeze_bn_affine = True  # reference code freezes BN scale/bias
    o.frozen_prefixes = ()  # parameter path prefixes never updated (e.g. ROAD "frozen" ablation)
    for key, value in fields.items():
        if key not in o:
            raise KeyError(f"Unknown optimiser field {key!r}; fields: {sorted(o.keys())}")
        o[key] = value
    return o


def init_section(path: str = "", scope: str = "") -> ml_collections.ConfigDict:
    """One role's initial weights: `path` of a variables tree (written by synseg_jax.import_weights
    or by an earlier stage; "demo" = the demo's minicity-objects pretraining, made when missing;
    "" = random init), and `scope`, the subtree of the role's params it replaces ("backbone";
    "" = the whole network)."""
    return ml_collections.ConfigDict({"path": path, "scope": scope})


def train_stage(overrides: str = "", init_from: str = "", target_from: str = "",
                lr_mult: float = 1.0, source_from: str = "") -> ml_collections.ConfigDict:
    """A training stage: the run's config with `overrides` ("key=value,..."); its segmenter
    starts from stage `init_from`'s final one when given; `target_from` names a sweep stage whose
    dataset becomes the labelled target (data.target, target_labels=True); `source_from` a
    translate stage whose dataset becomes the source (data.source); `lr_mult` scales every
    role's learning rate (a fine-tune at half the rates: 0.5)."""
    return ml_collections.ConfigDict({"kind": "train", "overrides": overrides,
                                      "init_from": init_from, "target_from": target_from,
                                      "source_from": source_from, "lr_mult": lr_mult})


def sweep_stage(models: tuple[str, ...] = (), dataset: str = "", split: str = "",
                rule: str = "class_percentile", percentile: float = 66.0, cap: float = 0.9,
                threshold: float = 0.9) -> ml_collections.ConfigDict:
    """A pseudo-label sweep: the mean softmax of the final segmenters of stages `models` over
    `dataset/split` (default: the run's data.target / target_split), labelled by `rule`:
    "class_percentile" (percentile, cap; FDA: 66, 0.9), "class_median" (cap; BDL) or "flat"
    (threshold)."""
    return ml_collections.ConfigDict({
        "kind": "sweep", "models": tuple(models), "dataset": dataset, "split": split,
        "rule": rule, "percentile": percentile, "cap": cap, "threshold": threshold})


def translate_stage(translator: str = "", dataset: str = "",
                    split: str = "") -> ml_collections.ConfigDict:
    """Translates `dataset/split` (default: the translator stage's data.source / source_split)
    with the final translator of train stage `translator`, into a dataset of translated images
    with the split's labels, at the size the translator trained on (data.train_resize)."""
    return ml_collections.ConfigDict({"kind": "translate", "translator": translator,
                                      "dataset": dataset, "split": split})


def ensemble_stage(models: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Scores the mean softmax of the final segmenters of stages `models` on the eval splits
    (FDA's multi-band transfer). A sweep stage may name it among its models."""
    return ml_collections.ConfigDict({"kind": "ensemble", "models": tuple(models)})


def _demo(c: ml_collections.ConfigDict) -> None:
    """Minutes on a 2-core CPU: small DeepLabV2 member, minicity at its stored size."""
    d = c.data
    d.source, d.source_split = "minicity", "sim"
    d.target, d.target_split = "minicity", "real_train"
    d.eval_dataset, d.eval_split = "minicity", "real_val"
    d.train_resize = (128, 256)
    d.target_resize = (128, 256)
    # About 56% of the image per crop, as AdaptSegNet's 1024x512 crops of 1280x720 GTA5 frames.
    d.crop = (96, 192)
    d.scale_range = (0.75, 1.25)
    d.eval_size = (128, 256)
    d.eval_batch_size = 25
    mo = c.model
    mo.stage_sizes = (1, 1, 1, 1)
    mo.width = 0.25
    mo.style = "caffe"  # the demo's own pretraining; DeepLabV2's style
    c.init.seg.path = "demo"
    c.optim.seg.lr = 1e-2  # small nets from a small pretraining take a larger step than 2.5e-4
    c.optim.seg.schedule_steps = 1500
    t = c.train
    t.steps = 1500
    t.batch_size = 4
    t.log_every = 50
    t.image_every = 750
    t.checkpoint_every = 500
    t.eval_every = 750  # mid-run and last: the demo's 10-minute budget holds two evaluations


def _gta5(c: ml_collections.ConfigDict) -> None:
    d = c.data
    d.source, d.source_split = "gta5", "train"
    d.target, d.target_split = "cityscapes", "train"
    d.eval_dataset, d.eval_split = "cityscapes", "validation"
    d.train_resize = (720, 1280)  # GTA5 resized to 1280x720
    d.target_resize = (512, 1024)
    d.eval_size = (512, 1024)


def _synthia(c: ml_collections.ConfigDict) -> None:
    _gta5(c)
    c.data.source = "synthia"
    c.data.train_resize = (760, 1280)  # SYNTHIA 1280x760


PRESET_FNS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "demo": _demo, "gta5": _gta5, "synthia": _synthia,
}


def parse_arg(arg: str | None) -> tuple[str, list[tuple[str, str]]]:
    """'preset,key=value,...' -> (preset, [(key, value), ...]); the preset may be omitted."""
    parts = [p for p in config_keys.split_top_level(arg or "") if p]
    preset = "demo"
    if parts and "=" not in parts[0]:
        preset = parts.pop(0)
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; valid presets: {list(PRESETS)}")
    overrides = []
    for part in parts:
        if "=" not in part:
            raise ValueError(f"Config override {part!r} is not of the form key=value")
        key, value = part.split("=", 1)
        overrides.append((key.strip(), value.strip()))
    return preset, overrides


def finalize(config: ml_collections.ConfigDict, arg: str | None,
             method_presets: dict[str, Callable] | None = None) -> ml_collections.ConfigDict:
    """Applies the preset (common part, then the method's part) and the overrides; locks."""
    preset, overrides = parse_arg(arg)
    config.preset = preset
    PRESET_FNS[preset](config)
    if method_presets and preset in method_presets:
        method_presets[preset](config)
    before = copy.deepcopy(config)
    for key, raw in overrides:
        config_keys.set_key(config, key, raw)
    base.check_model_overrides(before, config)
    config.lock()
    return config
