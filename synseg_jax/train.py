"""The one training loop, shared by every method; it knows none of them.

It builds the mesh, the data streams and the method's state, jits `method.train_step` with the
state donated and explicit shardings, and runs it: logging scalars and images through clu,
checkpointing through orbax (resuming from the latest step), evaluating periodically, stopping on
a non-finite loss before that step can reach a checkpoint, and stopping on SIGTERM or SIGUSR1
(a cluster's preemption or time-limit notice) after a final checkpoint, for a rerun to resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from clu import metric_writers
from jax.experimental import multihost_utils

from synseg_jax import checkpoint, evaluate, fda, images, inputs, methods, metrics, parallel
from synseg_jax.methods import base
from synseg_jax.state import TrainState


class NonFiniteLossError(FloatingPointError):
    pass


class ConfigChangedError(ValueError):
    """A resumed run whose config differs from the one its checkpoints were trained with."""


class StopRequested(Exception):
    """Training stopped on a signal, after saving a checkpoint of the step it had reached.

    Not a failure: the same command resumes. `exit_code` is what the command exits with, so a
    job script can tell this apart from an error (and requeue): EX_TEMPFAIL, "try again later".
    """

    exit_code = 75


# The notices a cluster sends before it takes the machine: SIGTERM (preemption, scancel, a TPU
# VM's maintenance) and SIGUSR1 (what launch/slurm.sbatch asks SLURM to send before the time
# limit). SIGINT stays KeyboardInterrupt: a person at the terminal wants it to stop now.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Context manager that records the arrival of any of `signals` instead of dying of it.

    A handler cannot save a checkpoint itself: it runs between two Python bytecodes, perhaps in
    the middle of dispatching a step whose state is not yet computed. So it only notes the
    signal; the loop saves at its next step boundary. The previous handlers come back on exit.
    Outside the main thread (where Python cannot install handlers) it records nothing.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous: dict = {}

    def _note(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            logging.warning("%s received: stopping after the next step, with a checkpoint",
                            self.received)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# Fields a resume may change without changing what is trained: how long, how often it logs,
# checkpoints and evaluates, and what else it scores.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.image_every",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
                     "data.extra_eval_splits", "data.eval_batch_size")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every field that differs (missing fields shown as <absent>)."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def blocking_changes(old: dict, new: dict, finished: bool = False) -> list[str]:
    """The changes (``config_changes``) that alter what a run trains. For a `finished` run a
    new ``train.steps`` blocks too: its results are those of the old length."""
    allowed = tuple(k + ":" for k in RESUMABLE_CHANGES if not (finished and k == "train.steps"))
    return [c for c in config_changes(old, new) if not c.startswith(allowed)]


def save_config(config: ml_collections.ConfigDict, workdir: str, resuming: bool = False,
                allow_config_change: bool = False) -> None:
    """Writes config.json, after the config has been validated (the method and data built).

    On a resume, a config that differs from the recorded one in what is trained is refused,
    naming each changed key, unless `allow_config_change`; changes in RESUMABLE_CHANGES pass.
    """
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = os.path.join(workdir, "config.json")
    # tf.io.gfile: a workdir may be a gs:// bucket (a TPU pod's runs).
    if resuming and tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            old = json.load(f)
        new = json.loads(text)
        changes, blocking = config_changes(old, new), blocking_changes(old, new)
        if blocking and not allow_config_change:
            raise ConfigChangedError(
                f"{workdir} holds a run trained with another config; resuming it with this one "
                f"would mix the two. Changed: " + "; ".join(blocking) + ". Use another "
                "--workdir, or pass --allow_config_change to resume anyway")
        if changes:
            logging.warning("Resuming %s with changed config: %s", workdir, "; ".join(changes))
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(workdir)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)


def _non_finite_terms(host_metrics: dict[str, float]) -> list[str]:
    return [name for name in sorted(host_metrics)
            if name.startswith("loss/") and not math.isfinite(host_metrics[name])]


def _stop(problem: str, ckpt: checkpoint.Checkpointer) -> NonFiniteLossError:
    # An earlier save may still be committing in the background: finish it, so that the
    # checkpoint named below really is on disk (stopping mid-commit would lose it).
    ckpt.wait()
    last = ckpt.latest_step()
    kept = (f"the last good checkpoint (step {last}) in {ckpt.directory} is intact"
            if last is not None else "no checkpoint had been written yet")
    return NonFiniteLossError(f"{problem}; stopping. {kept}.")


def _check_finite(host_metrics: dict[str, float], step: int, ckpt: checkpoint.Checkpointer) -> None:
    # Every bad term, not the first alone: "loss/adv = nan" hides whether the segmenter's own
    # loss diverged too (then the adversarial term only inherited its nan).
    bad = _non_finite_terms(host_metrics)
    if bad:
        terms = ", ".join(f"{name} = {host_metrics[name]}" for name in bad)
        raise _stop(f"Non-finite loss at step {step}: {terms}", ckpt)


@jax.jit
def _params_finite(state: TrainState) -> jax.Array:
    """Whether every floating parameter of every role is finite (a step with a finite loss can
    still leave inf parameters behind, which must not become a checkpoint)."""
    leaves = [x for role in state.roles.values() for x in jax.tree_util.tree_leaves(role.params)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def load_initial_weights(config: ml_collections.ConfigDict, roles: tuple[str, ...]
                         ) -> dict[str, dict]:
    """{role: variables tree} of every role whose `init.<role>.path` is set; the method puts
    each under its `init.<role>.scope`."""
    out = {}
    for role, section in config.init.items():
        if not section.path:
            continue
        if role not in roles:
            raise ValueError(f"init.{role}.path is set ({section.path}), but method "
                             f"{config.method.name!r} has no role {role!r}; its roles: {roles}")
        out[role] = checkpoint.load_variables(section.path)
        logging.info("Initialising %s/%s from %s", role, section.scope or "(all)", section.path)
    return out


def run_evaluation(config, role: str, state: TrainState, mesh, workdir: str, step: int,
                   targets, eval_step) -> dict[str, metrics.SegmentationScores]:
    variables = state.roles[role].variables
    results = {}
    for name, split in targets:
        batches = inputs.eval_batches(config, mesh, name, split)
        scores = evaluate.evaluate(eval_step, variables, batches)
        evaluate.write_results(workdir, f"{name}/{split}", step, scores)
        results[f"{name}/{split}"] = scores
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False
                       ) -> dict[str, metrics.SegmentationScores]:
    """Trains `config.method` for `config.train.steps`; returns the final evaluation scores.

    SIGTERM or SIGUSR1 (to any one process) stops every process after the same step, which is
    saved first; StopRequested then says so, and running the same call again resumes there.
    """
    with StopSignals() as stop:
        return _train_and_evaluate(config, workdir, allow_config_change, stop)


def _train_and_evaluate(config, workdir, allow_config_change, stop: StopSignals):
    mesh = parallel.make_mesh()
    repl, data_sharding = parallel.replicated(mesh), parallel.data_sharding(mesh)
    method = methods.build(config)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.train.keep_checkpoints)
    start_step = ckpt.latest_step() or 0
    total_steps = config.train.steps
    eval_role = base.eval_role_of(method)
    eval_targets = (inputs.eval_targets(config)
                    if config.data.eval_dataset and eval_role is not None else [])
    open_data_on_process_zero_first(config, eval_targets)
    # A resumed run continues the uninterrupted run's data stream at its next batch.
    batches = inputs.train_batches(config, mesh, seed=config.seed, start_step=start_step)
    batch = next(batches)
    save_config(config, workdir, resuming=start_step > 0,
                allow_config_change=allow_config_change)

    rng = jax.random.PRNGKey(config.seed)
    # A resumed run takes every role from its checkpoint, so the files are not read again.
    pretrained = load_initial_weights(config, method.roles) if start_step == 0 else {}
    state = jax.jit(method.init, out_shardings=repl, compiler_options=init_compiler_options())(
        rng, batch, pretrained)
    if start_step:
        state = ckpt.restore(state)
        logging.info("Resumed from step %d of %s", start_step, ckpt.directory)
        if jax.process_index() == 0:
            dropped = drop_events_after(workdir, start_step)
            if dropped:
                logging.info("Dropped %d TensorBoard events logged after step %d by the "
                             "interrupted run; this run logs those steps again", dropped,
                             start_step)

    train_step = jax.jit(with_stop_votes(with_input_transform(method.train_step, config)),
                         donate_argnums=(0,), in_shardings=(repl, data_sharding, data_sharding),
                         out_shardings=(repl, repl, repl))
    votes = stop_votes(mesh)
    # Replicated confusion matrices: every process can read the sum over all of them.
    eval_step = jax.jit(evaluate.make_eval_step(method.predict, config.model.num_classes,
                                                config.model.align_corners), out_shardings=repl)
    summaries = summaries_of(method, config.data.normalization)
    if summaries is not None:
        summaries = with_input_transform(summaries, config, show_original=True)
    # Replicated output: every process holds the pictures, however the batch is sharded.
    summaries = jax.jit(summaries, out_shardings=repl) if summaries is not None else None
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    t = config.train
    results: dict[str, metrics.SegmentationScores] = {}
    pending = None  # (step, device metrics, stop agreed) of the previous step, read one step late
    interval = MetricsInterval()
    timer_start, timer_steps = time.time(), 0

    for step in range(start_step + 1, total_steps + 1):
        if step > start_step + 1:
            batch = next(batches)
        state, step_metrics, stop_agreed = train_step(state, batch, votes(stop.received))
        # Reading the previous step's metrics keeps the device busy while the host checks them.
        stopping = False
        if pending is not None:
            host, stopping = _read(pending)
            _check_finite(host, pending[0], ckpt)
            interval.add(host)
            if pending[0] % t.log_every == 0:
                _log_progress(writer, pending[0], interval.pop(), total_steps, timer_start,
                              timer_steps)
                timer_start, timer_steps = time.time(), 0
        pending = (step, step_metrics, stop_agreed)
        timer_steps += 1

        is_last = step == total_steps
        if stopping and not is_last:
            # Every process read the same agreed vote, so all of them save this step and stop.
            host, _ = _read(pending)
            _check_finite(host, step, ckpt)
            interval.add(host)
            _log_progress(writer, step, interval.pop(), total_steps, timer_start, timer_steps)
            _save_checkpoint(ckpt, step, state)
            ckpt.close()
            writer.flush()
            asked = (f"{stop.received} received" if stop.received
                     else "another process received a stop signal")
            raise StopRequested(f"Stopped after step {step}/{total_steps} ({asked}); its "
                                f"checkpoint is in {ckpt.directory}. Run the same command again "
                                "to resume")
        if summaries is not None and t.image_every and (step % t.image_every == 0 or is_last):
            writer.write_images(step, jax.device_get(summaries(state, batch)))
        if step % t.checkpoint_every == 0 or is_last:
            host, _ = _read(pending)
            _check_finite(host, step, ckpt)  # a bad step never reaches a checkpoint
            _save_checkpoint(ckpt, step, state)
        if eval_targets and ((t.eval_every and step % t.eval_every == 0) or is_last):
            targets = eval_targets if is_last else eval_targets[:1]
            results = run_evaluation(config, eval_role, state, mesh, workdir, step, targets,
                                     eval_step)
            writer.write_scalars(step, {f"eval/{k}/miou": v.miou_19 for k, v in results.items()})
            for key, scores in results.items():
                logging.info("step %d %s mIoU %.2f", step, key, 100 * scores.miou_19)

    if pending is not None:
        host, _ = _read(pending)
        _check_finite(host, pending[0], ckpt)
        interval.add(host)  # the final step is always logged
        _log_progress(writer, pending[0], interval.pop(), total_steps, timer_start, timer_steps)
    ckpt.close()
    writer.flush()
    if start_step >= total_steps:
        logging.info("Nothing to train: %s already holds step %d", ckpt.directory, start_step)
    if results and jax.process_index() == 0:
        evaluate.write_summary(workdir)
    return results


def drop_events_after(workdir: str, step: int) -> int:
    """Removes the TensorBoard events of steps after `step` from `workdir`'s event files (a run
    killed after its last checkpoint had logged them, and its resume logs them again: two curves
    would overlap). Returns how many events were dropped."""
    from tensorflow.core.util import event_pb2  # noqa: PLC0415

    dropped = 0
    for path in tf.io.gfile.glob(os.path.join(workdir, "events.out.tfevents.*")):
        records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        partial = path + ".partial"
        with tf.io.TFRecordWriter(partial) as writer:
            for record in kept:
                writer.write(record)
        tf.io.gfile.rename(partial, path, overwrite=True)
    return dropped


def _read(pending) -> tuple[dict[str, float], bool]:
    """A step's metrics on the host, and whether any process had asked to stop by then."""
    _, device_metrics, stop_agreed = pending
    host_metrics, stop_agreed = jax.device_get((device_metrics, stop_agreed))
    return {k: float(v) for k, v in host_metrics.items()}, bool(stop_agreed)


def _save_checkpoint(ckpt: checkpoint.Checkpointer, step: int, state: TrainState) -> None:
    if not bool(_params_finite(state)):
        raise _stop(f"Non-finite parameters after step {step} (its losses were finite)", ckpt)
    ckpt.save(step, state)


def with_stop_votes(train_step):
    """`train_step(state, batch) -> (state, metrics)` as `step(state, batch, votes) -> (state,
    metrics, whether any vote is True)`.

    `votes` holds one bool per device, True on the devices of a process that received a stop
    signal. Reducing them inside the step tells every process the same answer in the same step,
    at no extra synchronisation: the loop reads it with that step's metrics. Processes that
    decided alone, each when its own signal came, would stop at different steps, and the
    collective checkpoint save would wait forever for the ones still training.
    """

    def step(state, batch, votes):
        state, step_metrics = train_step(state, batch)
        return state, step_metrics, jnp.any(votes)

    return step


def stop_votes(mesh):
    """`votes(received)` → this process's vote array for `with_stop_votes` (made once per value)."""
    made = {}

    def votes(received) -> jax.Array:
        wants_stop = received is not None
        if wants_stop not in made:
            local = np.full((len(mesh.local_devices),), wants_stop)
            made[wants_stop] = parallel.to_global(local, mesh)
        return made[wants_stop]

    return votes


def open_data_on_process_zero_first(config: ml_collections.ConfigDict,
                                    eval_targets: list[tuple[str, str]]) -> None:
    """minicity renders itself into the data dir the first time one of its splits is opened.
    Two processes rendering the same dataset into one folder collide (each renames its finished
    build onto the same path), so with several processes, process 0 opens every split the run
    reads, rendering what is missing, while the others wait for it."""
    if jax.process_count() == 1:
        return
    if jax.process_index() == 0:
        data = config.data
        splits = [(data.source, data.source_split), *eval_targets]
        if data.target:
            splits.append((data.target, data.target_split))
        for name, split in splits:
            inputs.open_split(data, name, split, decode=False)
    multihost_utils.sync_global_devices("synseg_jax: data dir ready")


def init_compiler_options() -> dict | None:
    """A method's init runs once, so XLA's backend optimisations only lengthen its compile: on
    the CPU, where they cost most (a translator's spectral-norm init: minutes), they are off."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def with_input_transform(fn, config: ml_collections.ConfigDict, show_original: bool = False):
    """`fn(state, batch)` fed the batch as the config's input options make it (FDA's source in
    the target's style, config `fda`), so that every method can switch them on. With
    `show_original`, `fn` is a summaries hook and the untranslated source is shown too."""
    transform = fda.batch_transform(config.fda.beta, config.fda.variant, config.data.normalization)
    if transform is None:
        return fn
    if not config.data.target:
        raise ValueError(f"fda.beta={config.fda.beta} needs target images: set data.target and "
                         "data.target_split")

    def wrapped(state, batch):
        out = fn(state, transform(batch))
        if show_original:
            shown = batch["source"]["image"][:base.SUMMARY_IMAGES]
            out = {**out, "train/source_image_before_fda": images.to_uint8(
                shown, config.data.normalization, xp=jnp)}
        return out

    return wrapped


def segmentation_summaries(predict, role: str, normalization: str,
                           max_images: int = base.SUMMARY_IMAGES):
    """The default `summaries` hook: the first source images, their labels and the `role`'s
    predictions, as uint8 RGB. Jittable, so the loop can gather a multi-host batch into one
    replicated set of pictures."""

    def summaries(state: TrainState, batch: dict) -> dict[str, jax.Array]:
        source = batch["source"]
        shown = source["image"][:max_images]
        out = {"train/source_image": images.to_uint8(shown, normalization, xp=jnp)}
        label = source.get("label")
        if label is not None and label.ndim == 3 and role in state.roles:
            logits = predict(state.roles[role].variables, shown)
            pred = jnp.argmax(images.resize_bilinear(logits, shown.shape[1:3]), axis=-1)
            out["train/source_label"] = images.colorize(label[:max_images], xp=jnp)
            out["train/source_prediction"] = images.colorize(pred, xp=jnp)
        return out

    return summaries


def summaries_of(method, normalization: str):
    """The pictures the loop logs: the default segmentation ones when the method has an
    evaluated role, and those of its `summaries` hook; None when there are neither."""
    role = base.eval_role_of(method)
    default = segmentation_summaries(method.predict, role, normalization) if role else None
    hook = getattr(method, "summaries", None)
    if hook is None or default is None:
        return hook or default
    return lambda state, batch: {**default(state, batch), **hook(state, batch)}


class MetricsInterval:
    """Means of the logged metrics over the steps since the last log line ("lr/*": the last
    value, the rate the step used), so a noisy loss is not reported by one sample."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._count = 0

    def add(self, host: dict[str, float]) -> None:
        for name, value in host.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._last = host
        self._count += 1

    def pop(self) -> dict[str, float]:
        out = {k: (self._last[k] if k.startswith("lr/") else v / self._count)
               for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out


def _log_progress(writer, step: int, host: dict[str, float], total: int, since: float,
                  steps: int) -> None:
    rate = steps / max(time.time() - since, 1e-9)
    eta = (total - step) / rate if rate else float("inf")
    writer.write_scalars(step, {**host, "perf/steps_per_sec": rate})
    losses = ", ".join(f"{k}={v:.4f}" for k, v in sorted(host.items()) if k.startswith("loss/"))
    logging.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, total, losses, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?")
