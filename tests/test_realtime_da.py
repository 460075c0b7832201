"""The real-time DA recipe end to end on a tiny minicity: source-only with and without
augmentation, adversarial, adversarial + FDA for two betas, their multi-band ensemble scored,
its pseudo-labels, and the self-training fine-tune at half the learning rates."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import realtime_da
from synseg_jax import evaluate, metrics, predict, recipe
from tests.tiny import TINY_DATA_AND_MODEL

STEPS = ["model.bn_mode=train", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
         "train.eval_every=2", "train.log_every=1", "train.image_every=2",
         "optim.seg.schedule_steps=2", "data.source_split=sim", "data.extra_eval_splits=()",
         "method.disc_widths=(4,4,4,4)"]


def tiny(data_dir, *extra):
    return realtime_da.get_config(",".join(
        ["demo", f"data.data_dir={data_dir}", *TINY_DATA_AND_MODEL, *STEPS, *extra]))


def test_the_whole_recipe_runs_and_the_ensemble_averages_its_members(tmp_path):
    config = tiny(str(tmp_path / "tfds"))
    workdir = str(tmp_path / "run")
    summaries = recipe.run_stages(config, workdir)
    assert list(summaries) == list(config.stage_order)
    for name in config.stage_order:
        assert os.path.exists(os.path.join(workdir, name, recipe.DONE)), name

    def recorded(stage):
        with open(os.path.join(workdir, stage, "config.json")) as f:
            return json.load(f)

    assert recorded("source")["data"]["flip"] is False and recorded("source_aug")["data"]["flip"]
    assert recorded("fda_b005")["fda"]["beta"] == 0.05
    ssl = recorded("ssl")
    assert ssl["optim"]["seg"]["lr"] == pytest.approx(0.5 * config.optim.seg.lr)
    assert ssl["optim"]["disc"]["lr"] == pytest.approx(0.5 * config.optim.disc.lr)
    assert ssl["data"]["target_labels"] and ssl["init"]["seg"]["path"].endswith(
        os.path.join("fda_b001", "final_weights"))

    # MBT's score is the mean softmax of its two members, recomputed here from their weights.
    split = "minicity/real_val"
    with open(evaluate.results_stem(os.path.join(workdir, "mbt"), split, 2) + ".json") as f:
        mbt = json.load(f)
    from synseg_jax import inputs, methods, parallel  # noqa: PLC0415
    members = [recipe.stage_config(config, workdir, m) for m in ("fda_b001", "fda_b005")]
    predicts, variables = [], []
    for cfg, m in zip(members, ("fda_b001", "fda_b005")):
        params, collections = evaluate.restore_seg(cfg, os.path.join(workdir, m))
        predicts.append(methods.build(cfg).predict)
        variables.append({"params": params, **collections})
    total, preds = None, []
    for batch in inputs.eval_batches(members[0], parallel.make_mesh(), "minicity", "real_val"):
        probs = evaluate.mean_softmax(predicts, variables, batch["image"],
                                      batch["label"].shape[1:3])
        pred = jax.numpy.argmax(probs, -1)
        preds += [p for p, keep in zip(np.asarray(pred), np.asarray(batch["mask"])) if keep]
        total = metrics.accumulate_confusion(total, metrics.confusion_matrix(
            pred, batch["label"], 19, mask=batch["mask"]))
    want = metrics.scores_from_confusion(total).miou_19
    assert mbt["miou_19"] == pytest.approx(want, abs=1e-9)
    assert summaries["mbt"][split] == pytest.approx(want, abs=1e-9)

    # --mode=eval --stage=mbt scores the ensemble again, as the stage did...
    scores = recipe.run(config, workdir, "eval", stage="mbt")
    assert scores[split].miou_19 == pytest.approx(want, abs=1e-9)
    # ...and with other eval settings writes beside the stage's results, never over them.
    other = tiny(str(tmp_path / "tfds"), "data.eval_size=(16,32)")
    recipe.run(other, workdir, "eval", stage="mbt")
    assert os.path.exists(evaluate.results_stem(os.path.join(workdir, "mbt"), split, 2)
                          + ".eval_size-16x32.json")
    with open(evaluate.results_stem(os.path.join(workdir, "mbt"), split, 2) + ".json") as f:
        assert json.load(f)["miou_19"] == mbt["miou_19"]
    # predict --stage=mbt exports the ensemble's predictions, example by example.
    out = str(tmp_path / "mbt_pred")
    written = predict.run(config, workdir, None, None, out, stage="mbt")
    names = predict.example_names("minicity", "real_val", data_dir=config.data.data_dir,
                                  minicity_options=inputs.minicity_options(config.data))
    assert [os.path.basename(p) for p in written] == [n + predict.SUFFIX for n in names]
    for path, pred in zip(written, preds):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), predict.to_label_ids(pred))
    with pytest.raises(recipe.StageError, match="--step=2: ensemble stage 'mbt'"):
        recipe.run(config, workdir, "eval", step=2, stage="mbt")
    with pytest.raises(recipe.StageError, match="'pseudo' .sweep stage. has no segmenter"):
        predict.run(config, workdir, None, None, out, stage="pseudo")
    # The pseudo-labels came from the ensemble of both members.
    with open(os.path.join(workdir, "pseudo", "report.json")) as f:
        assert json.load(f)["examples"] == 8


def test_an_ensemble_of_members_that_disagree_is_named(tmp_path):
    config = tiny(str(tmp_path / "tfds"))
    with config.unlocked():
        config.stages.fda_b005.overrides += ",data.normalization=imagenet_rgb"
    workdir = str(tmp_path / "run")  # checked before any member is restored
    with pytest.raises(ValueError, match=r"member 'fda_b005' has data.normalization="
                                         r"'imagenet_rgb', but member 'fda_b001' has 'caffe_bgr'"):
        recipe._members(config, workdir, "mbt")
