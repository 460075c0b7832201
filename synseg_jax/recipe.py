"""Multi-stage runs: demo pretraining (when its weights are missing) → training → evaluation.

Each stage has its own workdir; a finished stage is skipped when the command is run again.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import jax
import ml_collections

from synseg_jax import checkpoint, evaluate, metrics, paths, train
from synseg_jax.methods import base

DEMO_WEIGHTS = "demo"


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file given by path (as --config=path:arg does)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path} does not exist")
    paths.make_config_package_importable(path)
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    paths.resolve_config_paths(config)
    return config


def _backbone_key(config: ml_collections.ConfigDict) -> str:
    m = config.model
    stages = "-".join(map(str, m.stage_sizes)) if m.stage_sizes else f"d{m.depth}"
    return (f"{stages}_w{m.width:g}_{base.resnet_style(m)}_{config.data.normalization}"
            f"_mc{config.data.minicity.seed}_seed{config.seed}")


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The pretraining config whose backbone has exactly the shapes `config`'s model needs."""
    m = config.model
    overrides = [f"seed={config.seed}", f"model.depth={m.depth}",
                 f"model.stage_sizes={tuple(m.stage_sizes)}", f"model.width={m.width}",
                 f"model.style={base.resnet_style(m)}", f"data.normalization={config.data.normalization}",
                 f"data.data_dir={config.data.data_dir}",
                 f"data.minicity.seed={config.data.minicity.seed}",
                 f"data.minicity.scene_size={tuple(config.data.minicity.scene_size)}",
                 f"data.minicity.object_size={config.data.minicity.object_size}"]
    overrides += [f"data.minicity.num_examples.{split}={n}"
                  for split, n in config.data.minicity.num_examples.items()]
    if config.pretrain.overrides:
        overrides.append(config.pretrain.overrides)
    return load_config_file(config.pretrain.config, ",".join(["demo"] + overrides))


def ensure_pretrained(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Resolves model.init_weights="demo" to a pretrained backbone, pretraining it if missing."""
    if config.model.init_weights != DEMO_WEIGHTS:
        return config
    pre_workdir = config.pretrain.workdir or os.path.join(
        os.path.dirname(os.path.abspath(workdir)), f"pretrain_{_backbone_key(config)}")
    weights = os.path.join(pre_workdir, "backbone")
    if not os.path.isdir(weights):
        pre_config = pretrain_config(config)
        print(f"No demo-pretrained backbone at {weights}: pretraining it on minicity objects "
              f"first ({pre_config.train.steps} steps, one time).", flush=True)
        train.train_and_evaluate(pre_config, pre_workdir)
        export_backbone(pre_config, pre_workdir, weights)
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.model.init_weights = weights
    resolved.lock()
    return resolved


def export_backbone(config: ml_collections.ConfigDict, workdir: str, path: str) -> None:
    """Saves the `backbone` subtree of a finished run's `seg` role as init weights."""
    params, collections = evaluate.restore_seg(config, workdir)
    scope = config.model.init_scope
    variables = {"params": params[scope]}
    if "batch_stats" in collections:
        variables["batch_stats"] = collections["batch_stats"][scope]
    if jax.process_index() == 0:
        checkpoint.save_variables(path, variables)
    logging.info("Exported %s to %s", scope, path)


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train",
        step: int | None = None) -> dict[str, metrics.SegmentationScores]:
    if mode == "train":
        config = ensure_pretrained(config, workdir)
        results = train.train_and_evaluate(config, workdir)
    elif mode == "eval":
        results = evaluate.evaluate_checkpoint(config, workdir, step)
    else:
        raise ValueError(f"Unknown mode {mode!r}; expected 'train' or 'eval'")
    for name, scores in results.items():
        print(f"\n{name}\n\n{metrics.markdown_table(scores)}", flush=True)
    return results
