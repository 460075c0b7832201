"""Multi-stage runs: demo pretraining (when its weights are missing), then the config's stages.

A config without stages is one training run in the workdir. With `config.stages`, each stage
runs in ``<workdir>/<stage>``: a train stage trains (resuming from its own checkpoints), a sweep
stage pseudo-labels a split into a dataset, a translate stage writes a split translated by an
earlier stage's translator as a dataset, an ensemble stage scores earlier models together. A finished stage leaves ``DONE.json`` and is skipped
when the command is run again, so a killed recipe resumes in the stage it was in.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable

import jax
import ml_collections
import tensorflow as tf

from synseg_jax import (checkpoint, config_keys, evaluate, inputs, locks, methods, metrics,
                        parallel, paths, pseudo_labels, sweep, train)
from synseg_jax.methods import base
from synseg_jax.models import segmenters

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


def backbone_key(config: ml_collections.ConfigDict) -> str:
    """What tells one demo-pretrained backbone from another: its shapes, style, input
    normalisation, minicity and pretraining seed."""
    m = config.model
    stages = "-".join(map(str, m.stage_sizes)) if m.stage_sizes else f"d{m.depth}"
    return (f"{stages}_w{m.width:g}_{base.resnet_style(m)}_{config.data.normalization}"
            f"_mc{config.data.minicity.seed}_seed{config.pretrain.seed}")


def demo_backbone_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The workdir of the demo pretraining a run in `workdir` uses (shared by the runs beside
    it): `pretrain.workdir`, or `<workdir>/../pretrain_<backbone key>`."""
    return config.pretrain.workdir or os.path.join(
        os.path.dirname(paths.absolute(workdir)), f"pretrain_{backbone_key(config)}")


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The pretraining config whose backbone has exactly the shapes `config`'s model needs."""
    m = config.model
    overrides = [f"seed={config.pretrain.seed}", f"model.depth={m.depth}",
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
    """Resolves init.<role>.path="demo" to the demo-pretrained backbone, pretraining it if missing.

    The demo pretraining is the minicity stand-in for ImageNet weights: like them it is made
    once and shared (by every seed and method beside `workdir`), so it is not a stage of each
    run; it runs through the same training and export as a stage does.
    """
    demo_roles = [role for role, s in config.init.items() if s.path == DEMO_WEIGHTS]
    if not demo_roles:
        return config
    pre_workdir = demo_backbone_dir(config, workdir)
    weights = os.path.join(pre_workdir, "backbone")
    # tf.io.gfile here and in the stages: a workdir may be a gs:// bucket.
    if not tf.io.gfile.isdir(weights):
        # Runs in other workdirs may want the same backbone: one pretrains, the others wait.
        with locks.exclusive(pre_workdir, wait=True):
            if not tf.io.gfile.isdir(weights):
                pre_config = pretrain_config(config)
                print(f"No demo-pretrained backbone at {weights}: pretraining it on minicity "
                      f"objects first ({pre_config.train.steps} steps, one time).", flush=True)
                train.train_and_evaluate(pre_config, pre_workdir)
                export_backbone(pre_config, pre_workdir, weights)
    resolved = ml_collections.ConfigDict(config.to_dict())
    for role in demo_roles:
        resolved.init[role].path = weights
    resolved.lock()
    return resolved


def export_backbone(config: ml_collections.ConfigDict, workdir: str, path: str) -> None:
    """Saves the `backbone` subtree of a finished run's `seg` role as init weights."""
    params, collections = evaluate.restore_seg(config, workdir)
    scope = segmenters.BACKBONE_SCOPE
    variables = {"params": params[scope]}
    if "batch_stats" in collections:
        variables["batch_stats"] = collections["batch_stats"][scope]
    if jax.process_index() == 0:
        checkpoint.save_variables(path, variables)
    logging.info("Exported %s to %s", scope, path)


def export_role(config: ml_collections.ConfigDict, workdir: str, path: str) -> None:
    """Saves a finished run's evaluated role (whole segmenter) as init weights (scope "")."""
    params, collections = evaluate.restore_seg(config, workdir)
    if jax.process_index() == 0:
        checkpoint.save_variables(path, {"params": params, **collections})


# ------------------------------------------------------------------------------------------------
# Stages.

DONE = "DONE.json"


def stage_config(config: ml_collections.ConfigDict, workdir: str,
                 name: str) -> ml_collections.ConfigDict:
    """The config a train stage runs with: the run's, its overrides, and the links to earlier
    stages (initial weights, pseudo-labelled target) resolved to their folders."""
    stage = config.stages[name]
    out = config_keys.apply_overrides(config, stage.overrides)
    base.check_model_overrides(config, out)
    with out.unlocked():
        out.stages = ml_collections.ConfigDict()  # a stage runs as a plain run
        out.stage_order = ()
        if stage.init_from:
            _check_earlier(config, name, stage.init_from, "train")
            out.init.seg.path = os.path.join(workdir, stage.init_from, "final_weights")
            out.init.seg.scope = ""
        if stage.lr_mult != 1.0:
            rates = {role: out.optim[role].lr for role in out.optim}
            for role, rate in rates.items():
                # A role whose lr follows another's (ROAD's disc) has moved with it already.
                if out.optim[role].lr == rate:
                    out.optim[role].lr = rate * stage.lr_mult
        if stage.target_from:
            _check_earlier(config, name, stage.target_from, "sweep")
            out.data.target = sweep.dataset_name(os.path.join(workdir, stage.target_from))
            out.data.target_split = sweep.SPLIT
            out.data.target_labels = True
        if stage.get("source_from"):
            _check_earlier(config, name, stage.source_from, "translate")
            out.data.source = sweep.dataset_name(os.path.join(workdir, stage.source_from))
            out.data.source_split = sweep.SPLIT
    out.lock()
    return out


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """The stages in the order `config.stage_order` gives; each stage named exactly once."""
    order, declared = list(config.stage_order), set(config.stages.keys())
    if sorted(order) != sorted(declared) or len(set(order)) != len(order):
        raise ValueError(f"config.stage_order {tuple(order)} must name every stage of "
                         f"config.stages ({sorted(declared)}) exactly once")
    return order


def _check_earlier(config, name: str, other: str, kind: str | tuple[str, ...]) -> None:
    order = stage_names(config)
    if other not in order or order.index(other) >= order.index(name):
        raise ValueError(f"Stage {name!r} reads stage {other!r}, which is not an earlier stage "
                         f"(stages in order: {order})")
    kinds = (kind,) if isinstance(kind, str) else kind
    if config.stages[other].kind not in kinds:
        raise ValueError(f"Stage {name!r} reads stage {other!r} as a {' or '.join(kinds)} "
                         f"stage, but it is a {config.stages[other].kind} stage")


def _run_train_stage(config, workdir: str, name: str, allow_config_change: bool) -> dict:
    stage_dir = os.path.join(workdir, name)
    cfg = ensure_pretrained(stage_config(config, workdir, name), stage_dir)
    results = train.train_and_evaluate(cfg, stage_dir, allow_config_change)
    if base.eval_role_of(methods.build(cfg)) is not None:
        # Later stages start from (init_from) or sweep with this stage's final segmenter.
        export_role(cfg, stage_dir, os.path.join(stage_dir, "final_weights"))
    return {k: v.miou_19 for k, v in results.items()}


class StageError(ValueError):
    """A --stage or --step that names nothing the recipe can score or predict with."""


def _member_names(config, name: str) -> list[str]:
    """The train stages whose segmenters stage `name` uses (an ensemble stands for its members)."""
    stage = config.stages[name]
    if not stage.models:
        raise ValueError(f"Stage {name!r} names no models (stages.{name}.models)")
    names = []
    for other in stage.models:
        _check_earlier(config, name, other, ("train", "ensemble"))
        names += (list(config.stages[other].models) if config.stages[other].kind == "ensemble"
                  else [other])
    return names


def _members(config, workdir: str, name: str) -> tuple[list[sweep.Model], ml_collections.ConfigDict]:
    """The final segmenters of the earlier stages that stage `name` names (an ensemble stage
    stands for its members), and the first member's config. Members must agree on what their
    outputs mean and how their inputs are made: class count and normalisation."""
    names = _member_names(config, name)
    configs = [stage_config(config, workdir, member) for member in names]
    first = configs[0]
    for member, cfg in zip(names, configs):
        for key in ("model.num_classes", "data.normalization", "model.align_corners"):
            section, field = key.split(".")
            if cfg[section][field] != first[section][field]:
                raise ValueError(
                    f"Stage {name!r}: member {member!r} has {key}={cfg[section][field]!r}, but "
                    f"member {names[0]!r} has {first[section][field]!r}; an ensemble averages "
                    "the softmax of models that agree on both")
    models = []
    for member, cfg in zip(names, configs):
        params, collections = evaluate.restore_seg(cfg, os.path.join(workdir, member))
        models.append((methods.build(cfg).predict, {"params": params, **collections}))
    return models, first


def score_ensemble(config, workdir: str, name: str, variant: str = ""
                   ) -> dict[str, metrics.SegmentationScores]:
    """Scores the mean softmax of ensemble stage `name`'s members (FDA's multi-band transfer)
    on the eval splits; results land in <workdir>/<name>/eval like a train stage's, at step
    `train.steps` (`variant`: see evaluate.write_results)."""
    models, member_config = _members(config, workdir, name)
    mesh = parallel.make_mesh()
    variables = jax.device_put(tuple(v for _, v in models), parallel.replicated(mesh))
    # Replicated confusion matrices, as evaluate_checkpoint's: every process reads the sum.
    eval_step = jax.jit(evaluate.make_ensemble_eval_step(
        [p for p, _ in models], member_config.model.num_classes, member_config.model.align_corners),
        out_shardings=parallel.replicated(mesh))
    stage_dir = os.path.join(workdir, name)
    results = {}
    for dataset, split in inputs.eval_targets(member_config):
        scores = evaluate.evaluate(eval_step, variables,
                                   inputs.eval_batches(member_config, mesh, dataset, split))
        evaluate.write_results(stage_dir, f"{dataset}/{split}", member_config.train.steps, scores,
                               variant)
        print(f"\n{name}: {dataset}/{split}\n\n{metrics.markdown_table(scores)}", flush=True)
        results[f"{dataset}/{split}"] = scores
    if jax.process_index() == 0:
        evaluate.write_summary(stage_dir)
    return results


def _run_ensemble_stage(config, workdir: str, name: str) -> dict:
    return {k: v.miou_19 for k, v in score_ensemble(config, workdir, name).items()}


def _ensemble_variant(config, workdir: str, name: str) -> str:
    """The settings in which scoring ensemble `name` now differs from how its first member
    was trained and scored (evaluate.evaluation_variant)."""
    first = _member_names(config, name)[0]
    return evaluate.evaluation_variant(os.path.join(workdir, first),
                                       stage_config(config, workdir, first))


def scoring_stage(config, name: str | None) -> str:
    """The stage that --mode=eval and predict use: `name` (a train stage with a segmenter, or
    an ensemble stage), or the last train stage when None."""
    if not name:
        return last_train_stage(config)
    if name not in config.stages:
        raise StageError(f"--stage={name!r} is not a stage of the config; stages: "
                         f"{list(config.stages.keys())}")
    kind = config.stages[name].kind
    if kind == "ensemble":
        return name
    if not _trains_a_segmenter(config, name):
        raise StageError(f"--stage={name!r} ({kind} stage) has no segmenter to score or predict "
                         "with: name a train stage with a segmenter or an ensemble stage")
    return name


def _no_step_for_ensemble(name: str, step: int | None) -> None:
    if step is not None:
        raise StageError(f"--step={step}: ensemble stage {name!r} has no checkpoints of its own; "
                         "it uses its members' final weights")


def stage_predictor(config, workdir: str, name: str | None = None, step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, Callable, object]:
    """(config, scores, variables) of a recipe's stage for predictions: `scores` is
    evaluate.label_scores' (variables, images, size) -> class scores, of the stage's segmenter
    or of an ensemble stage's mean softmax; `config` is the stage's (an ensemble's first
    member's), whose data settings make the inputs."""
    name = scoring_stage(config, name)
    if config.stages[name].kind == "ensemble":
        _no_step_for_ensemble(name, step)
        models, member_config = _members(config, workdir, name)
        return (member_config, evaluate.ensemble_label_scores(
            [p for p, _ in models], member_config.model.align_corners),
            tuple(v for _, v in models))
    cfg = stage_config(config, workdir, name)
    params, collections = evaluate.restore_seg(cfg, os.path.join(workdir, name), step)
    return (cfg, evaluate.label_scores(methods.build(cfg).predict, cfg.model.align_corners),
            {"params": params, **collections})


def _run_sweep_stage(config, workdir: str, name: str) -> dict:
    stage = config.stages[name]
    models, _ = _members(config, workdir, name)
    params = {"percentile": stage.percentile, "cap": stage.cap}
    if stage.rule == "class_median":
        params = {"cap": stage.cap}
    elif stage.rule == "flat":
        params = {"threshold": stage.threshold}
    rule = pseudo_labels.make_rule(stage.rule, **params)
    dataset = stage.dataset or config.data.target
    split = stage.split or config.data.target_split
    if not dataset or not split:
        raise ValueError(f"Sweep stage {name!r} has no split to sweep: set stages.{name}.dataset "
                         "and .split, or data.target and data.target_split")
    return sweep.pseudo_label(config, models, dataset, split, os.path.join(workdir, name), rule)


def _run_translate_stage(config, workdir: str, name: str) -> dict:
    """Translates the source split (or `dataset/split`) with the final translator of train
    stage `stages.<name>.translator`, conditioned as it was trained, into a dataset."""
    stage = config.stages[name]
    if not stage.translator:
        raise ValueError(f"Stage {name!r} names no translator stage (stages.{name}.translator)")
    _check_earlier(config, name, stage.translator, "train")
    cfg = stage_config(config, workdir, stage.translator)
    method = methods.build(cfg)
    if not hasattr(method, "translate"):
        raise ValueError(f"Stage {name!r} translates with stage {stage.translator!r}, whose "
                         f"method {cfg.method.name!r} has no translator")
    variables = evaluate.restore_roles(cfg, os.path.join(workdir, stage.translator),
                                       method.translate_roles)
    translate = jax.jit(lambda x: method.translate(variables, x))
    dataset = stage.dataset or cfg.data.source
    split = stage.split or cfg.data.source_split
    size = tuple(cfg.data.train_resize) or None
    return sweep.translate_split(cfg, translate, dataset, split, os.path.join(workdir, name), size,
                                 batch_size=cfg.data.eval_batch_size)


def _train_stage_changes(config, workdir: str, name: str) -> list[str]:
    stage_dir = os.path.join(workdir, name)
    recorded = os.path.join(stage_dir, "config.json")
    if not tf.io.gfile.exists(recorded):
        return []
    cfg = ensure_pretrained(stage_config(config, workdir, name), stage_dir)
    with tf.io.gfile.GFile(recorded) as f:
        old = json.load(f)
    return train.blocking_changes(old, json.loads(cfg.to_json_best_effort()), finished=True)


STAGE_RECORD = "stage.json"


def _stage_settings(config, name: str) -> dict:
    """What a sweep, ensemble or translate stage was run with: its own section of the config
    (members, rule and thresholds, translator, split). Its inputs are train stages, and those
    are checked through their own config.json."""
    return {f"stages.{name}": json.loads(config.stages[name].to_json_best_effort())}


def _other_stage_changes(config, workdir: str, name: str) -> list[str]:
    recorded = os.path.join(workdir, name, STAGE_RECORD)
    if not tf.io.gfile.exists(recorded):  # finished before stages recorded their settings
        return []
    with tf.io.gfile.GFile(recorded) as f:
        old = json.load(f)
    return train.config_changes(old, _stage_settings(config, name))


def finished_stage_changes(config, workdir: str, name: str) -> list[str]:
    """How finished stage `name` ran differently from what `config` asks now, as 'key: old ->
    new' ([] if the same): a train stage's recorded config.json (a new `train.steps` counts), a
    sweep, ensemble or translate stage's own settings (stage.json). A finished stage is
    skipped only when this is empty: otherwise its results would silently stand for a config
    that never ran (a new threshold would reuse the old pseudo-labels)."""
    changes = (_train_stage_changes if config.stages[name].kind == "train"
               else _other_stage_changes)
    return changes(config, workdir, name)


def run_stages(config: ml_collections.ConfigDict, workdir: str,
               allow_config_change: bool = False) -> dict:
    """Runs every stage not yet done, in order; returns {stage: its summary}."""
    summaries = {}
    for name in stage_names(config):
        stage = config.stages[name]
        done = os.path.join(workdir, name, DONE)
        if tf.io.gfile.exists(done):
            changes = [] if allow_config_change else finished_stage_changes(config, workdir, name)
            if changes:
                raise train.ConfigChangedError(
                    f"Stage {name!r} in {os.path.join(workdir, name)} was finished with another "
                    "config, so its results are not this config's. Changed: "
                    + "; ".join(changes) + ". Delete that folder and the later stages' to rerun "
                    "them, use another --workdir, or pass --allow_config_change to keep the "
                    "finished stages")
            print(f"Stage {name!r} is done ({done}); skipping it.", flush=True)
            with tf.io.gfile.GFile(done) as f:
                summaries[name] = json.load(f)
            continue
        print(f"Stage {name!r} ({stage.kind}) in {os.path.join(workdir, name)}", flush=True)
        if stage.kind == "train":
            summary = _run_train_stage(config, workdir, name, allow_config_change)
        elif stage.kind == "sweep":
            summary = _run_sweep_stage(config, workdir, name)
        elif stage.kind == "ensemble":
            summary = _run_ensemble_stage(config, workdir, name)
        elif stage.kind == "translate":
            summary = _run_translate_stage(config, workdir, name)
        else:
            raise ValueError(f"Stage {name!r} has kind {stage.kind!r}; expected 'train', "
                             "'sweep', 'ensemble' or 'translate'")
        if jax.process_index() == 0:
            if stage.kind != "train":  # a train stage's settings are in its config.json
                with tf.io.gfile.GFile(os.path.join(workdir, name, STAGE_RECORD), "w") as f:
                    json.dump(_stage_settings(config, name), f, indent=2, sort_keys=True)
            with tf.io.gfile.GFile(done, "w") as f:
                json.dump(summary, f, indent=2)
        summaries[name] = summary
    return summaries


def last_train_stage(config: ml_collections.ConfigDict) -> str:
    """The last train stage with a segmenter to evaluate (a translator stage has none)."""
    names = [n for n in stage_names(config) if _trains_a_segmenter(config, n)]
    if not names:
        raise ValueError("The config's stages have no train stage to evaluate")
    return names[-1]


def _trains_a_segmenter(config: ml_collections.ConfigDict, name: str) -> bool:
    """Whether stage `name` is a train stage whose method has a segmenter to evaluate."""
    return (config.stages[name].kind == "train"
            and base.eval_role_of(methods.METHODS.get(stage_method(config, name))) is not None)


def stage_method(config: ml_collections.ConfigDict, name: str) -> str:
    """The method a train stage runs (the run's, or its overrides')."""
    return config_keys.apply_overrides(config, config.stages[name].overrides).method.name


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train",
        step: int | None = None, allow_config_change: bool = False, stage: str | None = None
        ) -> dict[str, metrics.SegmentationScores]:
    """--mode=train (resuming) or eval; `allow_config_change` lets a resume take a changed
    config (train.save_config names the changes); `stage`: the recipe stage --mode=eval scores
    (default: the last train stage)."""
    if stage and not config.stages:
        raise StageError(f"--stage={stage!r}: the config has no stages (it is a single run)")
    if stage and mode == "train":
        raise StageError("--stage is for --mode=eval; training runs every stage not yet done")
    if mode == "train":
        with locks.exclusive(workdir):
            return _run_locked(config, workdir, mode, step, allow_config_change, stage)
    return _run_locked(config, workdir, mode, step, allow_config_change, stage)


def _run_locked(config, workdir: str, mode: str, step: int | None, allow_config_change: bool,
                stage: str | None = None):
    if config.stages and mode == "train":
        summaries = run_stages(config, workdir, allow_config_change)
        print("\n" + json.dumps(summaries, indent=2), flush=True)
        return {}  # per-class tables: <workdir>/<stage>/eval/*.md
    if config.stages:  # --mode=eval scores one stage, by default the last train stage
        name = scoring_stage(config, stage)
        if config.stages[name].kind == "ensemble":
            _no_step_for_ensemble(name, step)
            return score_ensemble(config, workdir, name,
                                  _ensemble_variant(config, workdir, name))
        config, workdir = stage_config(config, workdir, name), os.path.join(workdir, name)
    if mode == "train":
        config = ensure_pretrained(config, workdir)
        results = train.train_and_evaluate(config, workdir, allow_config_change)
    elif mode == "eval":
        results = evaluate.evaluate_checkpoint(config, workdir, step)
    else:
        raise ValueError(f"Unknown mode {mode!r}; expected 'train' or 'eval'")
    for name, scores in results.items():
        print(f"\n{name}\n\n{metrics.markdown_table(scores)}", flush=True)
    return results
