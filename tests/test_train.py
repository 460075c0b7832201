"""The training loop end to end on a tiny minicity: checkpoints, summaries, eval, resume, NaN stop,
demo pretraining, and the same losses on 1 and 8 devices."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import source_only
from synseg_jax import checkpoint, evaluate, recipe, train
from tests.tiny import TINY_DATA_AND_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    *TINY_DATA_AND_MODEL,
    "model.bn_mode=train",  # from scratch: frozen BN would keep the init statistics (0, 1)
    "train.steps=4", "train.batch_size=2", "train.checkpoint_every=2", "train.eval_every=2",
    "train.log_every=1", "train.image_every=2",
]


def tiny_config(data_dir, *extra):
    return source_only.get_config(",".join(["demo", f"data.data_dir={data_dir}", *TINY, *extra]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(data_dir)
    results = train.train_and_evaluate(config, workdir)
    return config, workdir, results


def test_run_leaves_checkpoints_events_and_eval(finished_run):
    config, workdir, results = finished_run
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ckpt.all_steps() == [2, 4]
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    with open(os.path.join(workdir, "eval", "minicity_real_val_4.json")) as f:
        record = json.load(f)
    assert record["step"] == 4 and 0.0 <= record["pixel_acc"] <= 1.0
    assert record["num_pixels"] > 0
    assert os.path.exists(os.path.join(workdir, "eval", "minicity_real_val_2.md"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 4
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
        summary = json.load(f)["minicity/real_val"]
    assert summary["last"]["step"] == 4
    assert results["minicity/real_val"].miou_19 == pytest.approx(record["miou_19"])


def test_eval_mode_reproduces_training_time_numbers(finished_run, tmp_path):
    config, workdir, _ = finished_run
    with open(os.path.join(workdir, "eval", "minicity_real_val_4.json")) as f:
        at_train_time = json.load(f)
    scores = evaluate.evaluate_checkpoint(config, workdir)["minicity/real_val"]
    assert scores.to_dict()["per_class_iou"] == at_train_time["per_class_iou"]
    assert scores.num_pixels == at_train_time["num_pixels"]
    # Every real_val pixel is scored exactly once: 6 images at the stored 32x64 label size.
    assert scores.num_pixels <= 6 * 32 * 64
    earlier = evaluate.evaluate_checkpoint(config, workdir, step=2)["minicity/real_val"]
    with open(os.path.join(workdir, "eval", "minicity_real_val_2.json")) as f:
        assert earlier.to_dict()["per_class_iou"] == json.load(f)["per_class_iou"]


def test_eval_mode_with_other_settings_keeps_training_time_results(finished_run):
    from synseg_jax import config_keys  # noqa: PLC0415

    config, workdir, _ = finished_run
    path = os.path.join(workdir, "eval", "minicity_real_val_4.json")
    with open(path) as f:
        at_train_time = f.read()
    smaller = config_keys.apply_overrides(config, "data.eval_size=(16,32)")
    scores = evaluate.evaluate_checkpoint(smaller, workdir)["minicity/real_val"]
    with open(path) as f:
        assert f.read() == at_train_time  # untouched
    variant = os.path.join(workdir, "eval", "minicity_real_val_4.eval_size-16x32.json")
    with open(variant) as f:
        record = json.load(f)
    assert record["variant"] == "eval_size-16x32"
    assert record["miou_19"] == pytest.approx(scores.miou_19)
    evaluate.write_summary(workdir)  # the run's summary ignores other-settings results
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
        assert json.load(f)["minicity/real_val"]["last"]["miou_19"] == json.loads(
            at_train_time)["miou_19"]


def test_resume_continues_from_latest_step(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(data_dir, "train.eval_every=0"), workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    first = checkpoint.Checkpointer(ckpt_dir, read_only=True)
    params_at_4, _ = first.restore_role("seg", *_seg_shapes(tiny_config(data_dir)))
    # The same command with more steps picks up at step 4 and goes on to 6.
    config = tiny_config(data_dir, "train.eval_every=0", "train.steps=6")
    train.train_and_evaluate(config, workdir)
    steps = checkpoint.Checkpointer(ckpt_dir, read_only=True).all_steps()
    assert steps[-1] == 6 and 4 in steps
    params_at_4_again, _ = checkpoint.Checkpointer(ckpt_dir, read_only=True).restore_role(
        "seg", *_seg_shapes(config), step=4)
    for a, b in zip(jax.tree_util.tree_leaves(params_at_4), jax.tree_util.tree_leaves(params_at_4_again)):
        np.testing.assert_array_equal(a, b)  # step 4 was not retrained


def test_an_interrupted_run_resumes_bit_identical_to_an_uninterrupted_one(data_dir, tmp_path):
    """Stopped after its checkpoint at step 6 (as a kill -9 at step 7 or 8 would leave it) and
    rerun, a run ends with exactly the parameters and scores of the run never stopped: the data
    stream resumes at its next batch, across an epoch boundary (16 scenes, batch 2)."""
    common = ["train.checkpoint_every=3", "train.eval_every=12", "train.image_every=0"]
    whole = str(tmp_path / "whole")
    scores_whole = train.train_and_evaluate(tiny_config(data_dir, *common, "train.steps=12"),
                                            whole)
    split = str(tmp_path / "split")
    train.train_and_evaluate(tiny_config(data_dir, *common, "train.steps=6"), split)
    config = tiny_config(data_dir, *common, "train.steps=12")
    scores_split = train.train_and_evaluate(config, split)
    restore = lambda w: checkpoint.Checkpointer(  # noqa: E731
        os.path.join(w, "checkpoints"), read_only=True).restore_role("seg", *_seg_shapes(config))
    (pa, ca), (pb, cb) = restore(whole), restore(split)
    for a, b in zip(jax.tree_util.tree_leaves((pa, ca)), jax.tree_util.tree_leaves((pb, cb))):
        np.testing.assert_array_equal(a, b)
    for key, scores in scores_whole.items():
        assert scores.miou_19 == scores_split[key].miou_19


def _seg_shapes(config):
    from synseg_jax import inputs, methods
    method = methods.build(config)
    abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0), inputs.abstract_batch(config), {})
    return abstract.roles["seg"].params, abstract.roles["seg"].collections


def test_non_finite_loss_stops_with_step_and_term_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(data_dir, "optim.seg.lr=1e30", "train.checkpoint_every=1", "train.eval_every=0",
                         "train.steps=8")
    with pytest.raises(train.NonFiniteLossError,
                       match=r"step \d+(: loss/seg = (nan|inf)| \(its losses were finite\))") as err:
        train.train_and_evaluate(config, workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    assert all(s < bad_step for s in ckpt.all_steps())
    # The checkpoint the message names is the one on disk, committed (no half-written save).
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
    if ckpt.all_steps():
        assert f"checkpoint (step {max(ckpt.all_steps())})" in str(err.value)
        params, _ = ckpt.restore_role("seg", *_seg_shapes(config))
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_non_finite_loss_command_ends_with_its_message(data_dir, tmp_path):
    arg = ",".join(["demo", f"data.data_dir={data_dir}", *TINY, "optim.seg.lr=1e30",
                    "train.eval_every=0", "train.steps=8"])
    proc = subprocess.run(
        [sys.executable, "-m", "synseg_jax.main", f"--config=configs/source_only.py:{arg}",
         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: Non-finite ")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("config_arg, message", [
    ("configs/source_only.py:demo,train.stepz=3", "Unknown config key 'train.stepz'; did you mean"),
    ("configs/nope.py", "configs/nope.py does not exist"),
    ("configs/source_only.py:demo,model.name=bisenet_stdc813,model.output_stride=16",
     "model.output_stride is set, but segmenter 'bisenet_stdc813' has no such setting"),
])
def test_a_bad_config_flag_is_one_line_naming_the_problem(config_arg, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "synseg_jax.main", f"--config={config_arg}",
         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"error: --config={config_arg}: ") and message in last, proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a config that cannot be built


def test_demo_pretraining_runs_once_and_initialises_the_backbone(data_dir, tmp_path):
    config = tiny_config(data_dir, "init.seg.path=demo", "train.steps=2",
                         "pretrain.overrides=train.steps=3", f"pretrain.workdir={tmp_path / 'pre'}")
    resolved = recipe.ensure_pretrained(config, str(tmp_path / "run"))
    weights = resolved.init.seg.path
    assert os.path.isdir(weights) and weights.startswith(str(tmp_path / "pre"))
    backbone = checkpoint.load_variables(weights)
    seg_params, _ = _seg_shapes(config)
    got = jax.tree_util.tree_map(np.shape, backbone["params"])
    assert got == jax.tree_util.tree_map(lambda s: s.shape, seg_params["backbone"])
    mtime = os.path.getmtime(weights)
    assert recipe.ensure_pretrained(config, str(tmp_path / "run")).init.seg.path == weights
    assert os.path.getmtime(weights) == mtime  # found, not redone


_DEVICE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    import jax
    from configs import source_only
    from synseg_jax import inputs, methods, parallel
    config = source_only.get_config(",".join({overrides!r}))
    mesh = parallel.make_mesh()
    method = methods.build(config)
    batches = inputs.train_batches(config, mesh, seed=0)
    batch = next(batches)
    repl = parallel.replicated(mesh)
    state = jax.jit(method.init, out_shardings=repl)(jax.random.PRNGKey(0), batch, {{}})
    step = jax.jit(method.train_step, donate_argnums=(0,),
                   in_shardings=(repl, parallel.data_sharding(mesh)), out_shardings=(repl, repl))
    losses = []
    for i in range(3):
        state, m = step(state, batch if i == 0 else next(batches))
        losses.append(float(m["loss/seg"]))
    print("LOSSES", json.dumps([len(jax.devices())] + losses))
""")


def _losses_on(num_devices, data_dir):
    overrides = ["demo", f"data.data_dir={data_dir}", *TINY, "train.batch_size=8",
                 "model.bn_mode=train"]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT.format(repo=REPO, overrides=overrides)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("LOSSES")][-1]
    devices, *losses = json.loads(line.split(" ", 1)[1])
    assert devices == num_devices
    return losses


def test_one_and_eight_devices_give_the_same_losses(data_dir, finished_run):
    one = _losses_on(1, data_dir)
    eight = _losses_on(8, data_dir)
    np.testing.assert_allclose(one, eight, rtol=2e-4)
    assert one[0] != one[2]  # the steps really trained


def test_results_of_a_sliced_split_land_where_results_stem_says(tmp_path):
    """Benchmarks read eval files back through `results_stem`; TFDS slicing must not break it."""
    from synseg_jax import metrics
    scores = metrics.scores_from_confusion(np.diag(np.arange(1, 20)).astype(np.int64))
    json_path, md_path = evaluate.write_results(str(tmp_path), "minicity/sim[90%:]", 600, scores)
    stem = evaluate.results_stem(str(tmp_path), "minicity/sim[90%:]", 600)
    assert (json_path, md_path) == (stem + ".json", stem + ".md")
    assert os.path.dirname(stem) == str(tmp_path / "eval") and "[" not in os.path.basename(stem)
    with open(json_path) as f:
        assert json.load(f)["miou_19"] == pytest.approx(1.0)


def _event_tags(workdir):
    import tensorflow as tf  # noqa: PLC0415

    tags = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_default_pictures_and_interval_means_are_logged(finished_run):
    _, workdir, _ = finished_run
    tags = _event_tags(workdir)
    for name in ("train/source_image", "train/source_label", "train/source_prediction"):
        assert tags[name] == [2, 4], name
    assert 4 in tags["loss/seg"]  # the final step's loss is logged too


def test_interval_metrics_are_means_and_lr_is_the_last():
    interval = train.MetricsInterval()
    interval.add({"loss/seg": 1.0, "lr/seg": 0.1})
    interval.add({"loss/seg": 3.0, "lr/seg": 0.05})
    assert interval.pop() == {"loss/seg": 2.0, "lr/seg": 0.05}
    interval.add({"loss/seg": 5.0, "lr/seg": 0.01})
    assert interval.pop() == {"loss/seg": 5.0, "lr/seg": 0.01}


class PicturesWithoutSegmenter:
    """A stage with no segmenter to evaluate and pictures of its own (as a translator has)."""

    eval_role = None

    def __init__(self, config):
        from synseg_jax.methods.source_only import SourceOnly  # noqa: PLC0415

        self.inner = SourceOnly(config)
        self.roles = ("gen",)

    def init(self, rng, batch, pretrained=None):
        state = self.inner.init(rng, batch, pretrained)
        return state.replace(roles={"gen": state.roles["seg"]})

    def train_step(self, state, batch):
        inner, metrics = self.inner.train_step(state.replace(roles={"seg": state.roles["gen"]}),
                                               batch)
        return inner.replace(roles={"gen": inner.roles["seg"]}), metrics

    def predict(self, variables, images):
        return self.inner.predict(variables, images)

    def summaries(self, state, batch):
        import jax.numpy as jnp  # noqa: PLC0415

        shade = (state.step * 60).astype(jnp.uint8)
        return {"train/made_up": jnp.broadcast_to(shade, (2, 4, 5, 3))}


def test_method_hooks_pictures_and_no_eval_role(data_dir, tmp_path, monkeypatch):
    from synseg_jax import methods  # noqa: PLC0415

    monkeypatch.setitem(methods.METHODS, "pictures", PicturesWithoutSegmenter)
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(
        tiny_config(data_dir, "method.name=pictures", "train.steps=2"), workdir)
    assert results == {} and not os.path.exists(os.path.join(workdir, "eval"))
    tags = _event_tags(workdir)
    assert tags["train/made_up"] == [2] and "train/source_image" not in tags


def test_resume_with_another_config_names_the_changes_and_refuses(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(data_dir, "train.steps=2", "train.eval_every=0"), workdir)
    changed = tiny_config(data_dir, "train.steps=3", "train.eval_every=0", "optim.seg.lr=0.5")
    with pytest.raises(train.ConfigChangedError, match=r"optim\.seg\.lr: 0\.01 -> 0\.5") as err:
        train.train_and_evaluate(changed, workdir)
    assert "train.steps" not in str(err.value)  # training longer is a plain resume
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optim"]["seg"]["lr"] == 0.01  # the record is left as it was
    train.train_and_evaluate(changed, workdir, allow_config_change=True)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optim"]["seg"]["lr"] == 0.5
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   read_only=True).latest_step() == 3


def test_an_invalid_config_leaves_no_config_record(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="unet"):
        train.train_and_evaluate(tiny_config(data_dir, "model.name=unet"), workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_a_config_flag_the_segmenter_does_not_take_is_named(tmp_path):
    """absl's --config.model.* flags come after the file is loaded; they are checked too."""
    proc = subprocess.run(
        [sys.executable, "-m", "synseg_jax.main",
         "--config=configs/source_only.py:demo,model.name=bisenet_stdc813",
         "--config.model.aspp_rates=(1,2)", f"--workdir={tmp_path / 'run'}"], cwd=REPO,
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        "error: model.aspp_rates is set, but segmenter 'bisenet_stdc813' has no such setting (it "
        "would be ignored); unset model.aspp_rates"), proc.stderr
    assert not (tmp_path / "run").exists()


def test_non_finite_message_names_every_bad_term_and_no_finite_one():
    class NoCheckpoint:
        directory = "unused"

        def wait(self):
            pass

        def latest_step(self):
            return None

    metrics = {"loss/adv": float("nan"), "loss/seg": float("inf"), "loss/disc": 0.5,
               "lr/seg": float("nan")}
    with pytest.raises(train.NonFiniteLossError) as err:
        train._check_finite(metrics, 22, NoCheckpoint())
    message = str(err.value)
    assert "step 22: loss/adv = nan, loss/seg = inf;" in message
    assert "loss/disc" not in message and "lr/seg" not in message


def _logged_loss_steps(workdir):
    import tensorflow as tf
    from tensorflow.core.util import event_pb2
    steps = []
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            if any(v.tag == "loss/seg" for v in event.summary.value):
                steps.append(event.step)
    return sorted(steps)


def test_a_resume_after_a_kill_logs_each_step_once(data_dir, tmp_path):
    """A run killed after logging steps its last checkpoint does not hold: the resume logs those
    steps again, and TensorBoard shows one curve, not two overlapping ones."""
    workdir = str(tmp_path / "run")
    common = ["train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0",
              "train.image_every=0", "train.steps=4"]
    train.train_and_evaluate(tiny_config(data_dir, *common), workdir)
    assert _logged_loss_steps(workdir) == [1, 2, 3, 4]
    # As if killed after logging step 4, before its checkpoint was written.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    train.train_and_evaluate(tiny_config(data_dir, *common), workdir)
    assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 2
    assert _logged_loss_steps(workdir) == [1, 2, 3, 4]
