"""Recipe stages end to end on a tiny minicity: source training, a pseudo-label sweep written as a
dataset, and self-training that reads it; a killed recipe resumes in the stage it was in."""

import json
import os

import numpy as np
import pytest

from configs import self_training
from synseg_jax import inputs, recipe, sweep, train
from synseg_jax.data import datasets, labels
from tests.tiny import TINY_DATA_AND_MODEL

STEPS = ["model.bn_mode=train", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
         "train.eval_every=2", "train.log_every=1", "train.image_every=0",
         "optim.seg.schedule_steps=2", "data.source_split=sim", "data.extra_eval_splits=()"]


class SimulatedKill(Exception):
    """Stands for a kill: raised out of a stage, caught by nothing in the recipe."""


def tiny(data_dir, *extra):
    return self_training.get_config(",".join(
        ["demo", f"data.data_dir={data_dir}", *TINY_DATA_AND_MODEL, *STEPS, *extra]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_stages_run_in_order_write_a_pseudo_labelled_dataset_and_resume(data_dir, tmp_path,
                                                                        monkeypatch):
    config = tiny(data_dir)
    workdir = str(tmp_path / "run")
    real_train = train.train_and_evaluate
    trained = []

    def killed_in_adapt(cfg, stage_dir, *args):
        trained.append(os.path.basename(stage_dir))
        if os.path.basename(stage_dir) == "adapt":
            raise SimulatedKill("killed inside the adapt stage")
        return real_train(cfg, stage_dir, *args)

    monkeypatch.setattr(train, "train_and_evaluate", killed_in_adapt)
    with pytest.raises(SimulatedKill):
        recipe.run(config, workdir)
    assert trained == ["source", "adapt"]
    assert os.path.exists(os.path.join(workdir, "source", recipe.DONE))
    assert os.path.exists(os.path.join(workdir, "pseudo", recipe.DONE))
    assert not os.path.exists(os.path.join(workdir, "adapt", recipe.DONE))

    # The sweep's dataset: every target image once, with its own name and labels at its size.
    folder = os.path.join(workdir, "pseudo")
    opened = datasets.open_split(sweep.dataset_name(folder), sweep.SPLIT, with_names=True)
    examples = list(opened.dataset.as_numpy_iterator())
    assert len(examples) == 8  # data.minicity.num_examples.real_train
    target = datasets.open_split("minicity", "real_train", data_dir=data_dir, with_names=True,
                                 minicity_options=inputs.minicity_options(config.data))
    originals = {e["name"]: e["image"] for e in target.dataset.as_numpy_iterator()}
    for example in examples:
        np.testing.assert_array_equal(example["image"], originals[example["name"]])
        assert example["label"].shape == example["image"].shape[:2]
        values = set(np.unique(example["label"]).tolist())
        assert values <= set(range(19)) | {labels.IGNORE_LABEL}
    with open(os.path.join(folder, "report.json")) as f:
        report = json.load(f)
    assert report["examples"] == 8 and len(report["thresholds"]) == 19
    assert max(report["thresholds"]) <= 0.9 and 0.0 <= report["coverage"] <= 1.0

    # Rerun: the finished stages are skipped, the killed one runs, from the source weights.
    trained.clear()
    monkeypatch.setattr(train, "train_and_evaluate", lambda c, d, *a: (trained.append(
        os.path.basename(d)), real_train(c, d, *a))[1])
    recipe.run(config, workdir)
    assert trained == ["adapt"]
    with open(os.path.join(workdir, "adapt", "config.json")) as f:
        adapt = json.load(f)
    assert adapt["method"]["name"] == "self_training" and adapt["data"]["target_labels"]
    assert adapt["data"]["target"] == sweep.dataset_name(folder)
    assert adapt["init"]["seg"]["path"] == os.path.join(workdir, "source", "final_weights")
    assert os.path.exists(os.path.join(workdir, "adapt", "eval", "minicity_real_val_2.json"))
    # A third run has nothing left to do.
    trained.clear()
    recipe.run(config, workdir)
    assert trained == []
    # A changed config does not silently reuse stages finished with the old one.
    changed = tiny(data_dir, "optim.seg.lr=0.5")
    with pytest.raises(train.ConfigChangedError,
                       match=r"Stage 'source' .*optim\.seg\.lr: 0\.01 -> 0\.5"):
        recipe.run(changed, workdir)
    with pytest.raises(train.ConfigChangedError, match=r"train\.steps: 2 -> 3"):
        recipe.run(tiny(data_dir, "train.steps=3"), workdir)
    recipe.run(changed, workdir, allow_config_change=True)
    assert trained == []
    # Nor a sweep finished with another threshold rule: its pseudo-labels are the old rule's.
    with open(os.path.join(workdir, "pseudo", recipe.STAGE_RECORD)) as f:
        assert json.load(f)["stages.pseudo"]["percentile"] == config.stages.pseudo.percentile
    with pytest.raises(train.ConfigChangedError,
                       match=r"Stage 'pseudo' .*stages\.pseudo\.percentile: 66(\.0)? -> 50"):
        recipe.run(tiny(data_dir, "stages.pseudo.percentile=50"), workdir)


def test_stage_links_are_checked(data_dir, tmp_path):
    config = tiny(data_dir)
    with config.unlocked():
        config.stage_order = ("pseudo", "source", "adapt")
    with pytest.raises(ValueError, match="reads stage 'source', which is not an earlier stage"):
        recipe.run_stages(config, str(tmp_path))
    with config.unlocked():
        config.stage_order = ("source", "adapt")
    with pytest.raises(ValueError, match="must name every stage"):
        recipe.stage_names(config)


def test_a_sweep_never_overwrites_a_dataset_that_exists(tmp_path):
    """Finished (dataset and report): reused. Dataset without report: an error naming it."""
    folder = tmp_path / "pseudo"
    (folder / "derived" / "1.0.0").mkdir(parents=True)
    rule = sweep.pseudo_labels.make_rule("flat", threshold=0.9)
    with pytest.raises(FileExistsError, match=r"not overwritten: remove .*pseudo/derived"):
        sweep.pseudo_label(None, [], "minicity", "real_train", str(folder), rule)
    (folder / "report.json").write_text(json.dumps({"examples": 3}))
    assert sweep.pseudo_label(None, [], "minicity", "real_train", str(folder), rule) == {
        "examples": 3}
    assert sorted(os.listdir(folder / "derived")) == ["1.0.0"]
