"""Scores a segmenter on a split with the full-resolution protocol, and writes the results.

Logits are predicted at the eval size, upsampled bilinearly to the label's (original) size,
argmaxed and counted into one confusion matrix over the whole split. Only `Method.predict` and the
`seg` role's variables are used, so a checkpoint is scored without building anything else.
"""

from __future__ import annotations

import json
import re
import logging
import os
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import tensorflow as tf

from synseg_jax import checkpoint, images, inputs, methods, metrics, parallel
from synseg_jax.methods import base


def label_scores(predict: Callable, align_corners: bool = False) -> Callable:
    """One segmenter's (variables, images, size) -> class scores at `size` whose argmax is its
    prediction: the logits upsampled bilinearly (`align_corners`: model.align_corners)."""

    def scores(variables, x, size):
        return images.resize_bilinear(predict(variables, x), size, align_corners)

    return scores


def mean_softmax(predicts: Sequence[Callable], variables: Sequence, x: jax.Array,
                 size: tuple[int, int], align_corners: bool = False) -> jax.Array:
    """An ensemble's prediction: each member's logits upsampled to `size`, softmaxed, averaged
    (FDA's multi-band transfer fuses its models so)."""
    probs = [jax.nn.softmax(images.resize_bilinear(predict(v, x), size, align_corners), axis=-1)
             for predict, v in zip(predicts, variables)]
    return sum(probs) / len(probs)


def ensemble_label_scores(predicts: Sequence[Callable], align_corners: bool = False) -> Callable:
    """An ensemble's (tuple of member variables, images, size) -> its mean softmax at `size`."""

    def scores(variables, x, size):
        return mean_softmax(predicts, variables, x, size, align_corners)

    return scores


def make_confusion_step(scores: Callable, num_classes: int) -> Callable:
    """(variables, batch) -> int32 [C, C] confusion of that batch, from `scores` (see
    `label_scores`) taken at the label's size; padding is masked out."""

    def step(variables, batch):
        pred = jnp.argmax(scores(variables, batch["image"], batch["label"].shape[1:3]), axis=-1)
        return metrics.confusion_matrix(pred, batch["label"], num_classes, mask=batch["mask"])

    return step


def make_eval_step(predict: Callable, num_classes: int, align_corners: bool = False) -> Callable:
    """(seg_variables, batch) -> confusion of one segmenter's upsampled logits."""
    return make_confusion_step(label_scores(predict, align_corners), num_classes)


def make_ensemble_eval_step(predicts: Sequence[Callable], num_classes: int,
                            align_corners: bool = False) -> Callable:
    """(tuple of member variables, batch) -> confusion of the ensemble's mean softmax, taken at
    full label resolution."""
    return make_confusion_step(ensemble_label_scores(predicts, align_corners), num_classes)


def evaluate(eval_step: Callable, variables, batches: Iterable[dict]) -> metrics.SegmentationScores:
    """Sums the confusion of every batch (host int64) and scores the split."""
    total = None
    count = 0
    for batch in batches:
        total = metrics.accumulate_confusion(total, eval_step(variables, batch))
        count += 1
    if total is None:
        raise ValueError("The evaluation stream yielded no batch")
    return metrics.scores_from_confusion(total)


def results_stem(workdir: str, name: str, step: int) -> str:
    """<workdir>/eval/<name>_<step>, the path of a split's results without extension."""
    # "minicity/sim[90%:]" -> "minicity_sim_90_": split names may carry TFDS slicing.
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return os.path.join(workdir, "eval", f"{safe}_{step}")


def write_results(workdir: str, name: str, step: int, scores: metrics.SegmentationScores,
                  variant: str = "") -> tuple[str, str]:
    """Writes eval/<name>_<step>[.<variant>].json and .md (process 0 only); returns both paths.

    `variant` names evaluation settings that differ from the run's own (see
    `evaluation_variant`), so such results never replace the training-time ones.
    """
    stem = results_stem(workdir, name, step) + (f".{variant}" if variant else "")
    if jax.process_index() == 0:
        # tf.io.gfile here and below: a workdir may be a gs:// bucket.
        tf.io.gfile.makedirs(os.path.dirname(stem))
        record = {"split": name, "step": int(step), "variant": variant, **scores.to_dict()}
        with tf.io.gfile.GFile(stem + ".json", "w") as f:
            f.write(json.dumps(record, indent=2, allow_nan=False))
        with tf.io.gfile.GFile(stem + ".md", "w") as f:
            title = f"# {name}, step {step}" + (f" ({variant})" if variant else "")
            f.write(title + "\n\n" + metrics.markdown_table(scores))
        logging.info("Wrote %s.json and .md", stem)
    return stem + ".json", stem + ".md"


def restore_seg(config, workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """The evaluated role's (params, collections) of a run ("seg" unless the method names
    another), read alone from its checkpoint."""
    role = base.eval_role_of(methods.build(config))
    if role is None:
        raise ValueError(f"Method {config.method.name!r} has no segmenter to evaluate")
    variables = restore_roles(config, workdir, (role,), step)[role]
    params = variables.pop("params")
    return params, variables


def restore_roles(config, workdir: str, roles, step: int | None = None) -> dict[str, dict]:
    """{role: variables} of the named roles of a run's checkpoint (latest or `step`), each read
    alone (no optimiser state)."""
    method = methods.build(config)
    abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0), inputs.abstract_batch(config), {})
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    out = {}
    for role in roles:
        shapes = abstract.roles[role]
        params, collections = ckpt.restore_role(role, shapes.params, shapes.collections, step)
        out[role] = {"params": params, **collections}
    return out


def evaluate_checkpoint(config, workdir: str, step: int | None = None
                        ) -> dict[str, metrics.SegmentationScores]:
    """--mode=eval: scores the latest (or a given) checkpoint's `seg` role on the eval splits."""
    mesh = parallel.make_mesh()
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {ckpt.directory} to evaluate")
    params, collections = restore_seg(config, workdir, step)
    variables = jax.device_put({"params": params, **collections}, parallel.replicated(mesh))
    method = methods.build(config)
    # Replicated confusion matrices: with several processes, each can read the whole sum.
    eval_step = jax.jit(make_eval_step(method.predict, config.model.num_classes,
                                       config.model.align_corners),
                        out_shardings=parallel.replicated(mesh))
    variant = evaluation_variant(workdir, config)
    results = {}
    for name, split in inputs.eval_targets(config):
        scores = evaluate(eval_step, variables, inputs.eval_batches(config, mesh, name, split))
        write_results(workdir, f"{name}/{split}", step, scores, variant)
        results[f"{name}/{split}"] = scores
    return results


# Settings that change an evaluation's numbers (the model and checkpoint aside).
EVAL_SETTINGS = ("data.eval_size", "data.normalization", "data.data_dir", "data.minicity",
                 "model.align_corners")


def evaluation_variant(workdir: str, config) -> str:
    """"" when `config` evaluates as the run's recorded config.json did; otherwise a file-safe
    name of the differing settings, e.g. "eval_size-64x128"."""
    path = os.path.join(workdir, "config.json")
    if not tf.io.gfile.exists(path):
        return ""
    with tf.io.gfile.GFile(path) as f:
        recorded = json.load(f)
    current = json.loads(config.to_json_best_effort())
    parts = []
    for key in EVAL_SETTINGS:
        old, new = _lookup(recorded, key), _lookup(current, key)
        if old != new:
            value = "x".join(map(str, new)) if isinstance(new, list) else json.dumps(new)
            parts.append(f"{key.split('.', 1)[1]}-{value}")
    return re.sub(r"[^A-Za-z0-9_.x-]+", "_", "_".join(parts)).strip("_")


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def write_summary(workdir: str) -> None:
    """eval/summary.json: for each split, the last and the best evaluated step (say which!)."""
    directory = os.path.join(workdir, "eval")
    history: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(tf.io.gfile.listdir(directory)):
        if name.endswith(".json") and name != "summary.json":
            with tf.io.gfile.GFile(os.path.join(directory, name)) as f:
                record = json.load(f)
            if record.get("variant"):  # --mode=eval with other settings: not this run's curve
                continue
            history.setdefault(record["split"], []).append((record["step"], record["miou_19"]))
    summary = {}
    for split, points in history.items():
        points.sort()
        valid = [p for p in points if p[1] is not None]
        best = max(valid, key=lambda p: p[1]) if valid else (None, None)
        summary[split] = {"last": {"step": points[-1][0], "miou_19": points[-1][1]},
                          "best": {"step": best[0], "miou_19": best[1]},
                          "note": "best is selected on this split itself: an optimistic figure"}
    with tf.io.gfile.GFile(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
