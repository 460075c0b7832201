"""Prediction export: labelId PNGs named for the official evaluator, and our mIoU equals its mIoU.

cityscapesscripts (PyPI) is the official Cityscapes evaluator; with numpy >= 2.4 its
instance-level score calls the removed ``np.in1d``, so it is switched off (docs/reference.md).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import source_only
from synseg_jax import checkpoint, evaluate, inputs, methods, metrics, predict
from synseg_jax.data import datasets, labels

cs_eval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 24, 48  # full-resolution size of the fake Cityscapes frames
EVAL_SIZE = (12, 24)  # inference size: logits are upsampled back to H x W


def official_miou(pred_paths, gt_paths):
    args = cs_eval.args
    args.evalInstLevelScore = False  # np.in1d is gone in numpy >= 2.4
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    result = cs_eval.evaluateImgLists(list(pred_paths), list(gt_paths), args)
    return result["averageScoreClasses"], result


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def test_label_id_mapping_and_names(tmp_path):
    train_ids = np.array([[0, 1, 18], [13, 255, 9]], np.uint8)
    np.testing.assert_array_equal(predict.to_label_ids(train_ids), [[7, 8, 33], [26, 0, 22]])
    path = predict.write_prediction(str(tmp_path / "out"), "aachen_000000_000019", train_ids,
                                    colour_dir=str(tmp_path / "colour"))
    assert os.path.basename(path) == "aachen_000000_000019_pred_labelIds.png"
    stored = np.asarray(Image.open(path))
    assert stored.dtype == np.uint8 and stored.shape == (2, 3)
    np.testing.assert_array_equal(stored, predict.to_label_ids(train_ids))
    colour = np.asarray(Image.open(tmp_path / "colour" / "aachen_000000_000019_color.png"))
    np.testing.assert_array_equal(colour[0, 0], labels.PALETTE[0])
    with pytest.raises(ValueError, match="name"):
        predict.write_prediction(str(tmp_path), "../escape", train_ids)


def test_random_predictions_match_cityscapesscripts(tmp_path):
    rng = np.random.default_rng(0)
    preds, gts, pred_paths, gt_paths = [], [], [], []
    for k in range(3):
        name = f"lindau_{k:06d}_000019"
        gt = rng.integers(0, 34, (H, W)).astype(np.uint8)
        pred = rng.integers(0, 19, (H, W)).astype(np.uint8)
        gt_train = labels.map_to_train_ids(gt, labels.CITYSCAPES_TABLE)[0]
        pred[:8] = np.where(gt_train[:8] < 19, gt_train[:8], pred[:8])  # some true positives
        gt_paths.append(write_png(tmp_path / "gt" / f"{name}_gtFine_labelIds.png", gt))
        pred_paths.append(predict.write_prediction(str(tmp_path / "pred"), name, pred))
        preds.append(pred)
        gts.append(gt_train)
    cm = metrics.confusion_matrix(jnp.asarray(np.stack(preds)), jnp.asarray(np.stack(gts)), 19)
    ours = metrics.scores_from_confusion(np.asarray(cm))
    theirs, result = official_miou(pred_paths, gt_paths)
    assert ours.miou_19 == pytest.approx(theirs, abs=1e-12)
    for name, iou in zip(labels.CLASS_NAMES, ours.per_class_iou):
        assert iou == pytest.approx(result["classScores"][name], abs=1e-12, nan_ok=True)


# ------------------------------------------------------------------------------------------------
# The export path: prepared Cityscapes -> eval stream -> predict -> PNGs, scored both ways.


def fake_cityscapes_val(root, n=3):
    """leftImg8bit/val + gtFine/val in the official layout; returns {name: gt path}."""
    rng = np.random.default_rng(1)
    gt_paths = {}
    for k in range(n):
        city = ("frankfurt", "lindau")[k % 2]
        name = f"{city}_{k:06d}_000019"
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        write_png(os.path.join(root, "leftImg8bit", "val", city, f"{name}_leftImg8bit.png"), image)
        gt = rng.integers(0, 34, (H, W)).astype(np.uint8)
        gt_paths[name] = write_png(
            os.path.join(root, "gtFine", "val", city, f"{name}_gtFine_labelIds.png"), gt)
    # Cityscapes' builder wants both of its splits.
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    stem = "ulm_000000_000019"
    write_png(os.path.join(root, "leftImg8bit", "train", "ulm", f"{stem}_leftImg8bit.png"), image)
    write_png(os.path.join(root, "gtFine", "train", "ulm", f"{stem}_gtFine_labelIds.png"),
              rng.integers(0, 34, (H, W)).astype(np.uint8))
    return gt_paths


def fake_predict(variables, images):
    """A "segmenter": a fixed random 1x1 projection of the normalised pixels to 19 logits."""
    return jnp.einsum("bhwc,ck->bhwk", images, variables["params"]["w"])


FAKE_SCORES = evaluate.label_scores(fake_predict)


def test_export_split_matches_official_evaluator(tmp_path):
    gt_paths = fake_cityscapes_val(str(tmp_path / "manual"))
    data_dir = str(tmp_path / "data")
    datasets.REAL_BUILDERS["cityscapes"](
        data_dir=data_dir, manual_dir=str(tmp_path / "manual"), allow_partial=True,
        workers=2).download_and_prepare()
    config = source_only.get_config(
        f"gta5,data.data_dir={data_dir},data.eval_size={EVAL_SIZE},data.eval_batch_size=2")
    variables = {"params": {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 19))}}
    out = str(tmp_path / "pred")
    paths = predict.export_split(config, FAKE_SCORES, variables, "cityscapes", "validation", out,
                                 colour_dir=str(tmp_path / "colour"))
    names = [os.path.basename(p)[: -len(predict.SUFFIX)] for p in paths]
    assert sorted(names) == sorted(gt_paths)  # one PNG per frame, named <city>_<seq>_<frame>
    for path in paths:
        assert np.asarray(Image.open(path)).shape == (H, W)  # full resolution
    assert len(os.listdir(tmp_path / "colour")) == len(paths)

    # Our evaluator (the same stream and protocol) on the same predictions...
    step = jax.jit(evaluate.make_eval_step(fake_predict, 19))
    ours = evaluate.evaluate(step, variables,
                             inputs.eval_batches(config, None, "cityscapes", "validation"))
    # ...equals the official one reading the exported PNGs and the original labelIds files.
    theirs, _ = official_miou(paths, [gt_paths[n] for n in names])
    assert ours.miou_19 == pytest.approx(theirs, abs=1e-12)
    assert 0.0 < theirs < 1.0


# ------------------------------------------------------------------------------------------------
# The command on a real (tiny) checkpoint.

TINY_RUN = [
    "demo", "data.minicity.scene_size=(32,64)", "data.minicity.object_size=16",
    "data.minicity.num_examples.sim=8", "data.minicity.num_examples.sim_topdown=4",
    "data.minicity.num_examples.real_train=4", "data.minicity.num_examples.real_val=5",
    "data.minicity.num_examples.objects=8", "data.train_resize=(32,64)", "data.crop=(32,32)",
    "data.eval_size=(16,32)", "data.eval_batch_size=2", "data.shuffle_buffer=8",
    "model.width=0.125", "model.stage_sizes=(1,1,1,1)", "init.seg.path=",
    "model.bn_mode=train", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
    "train.eval_every=2", "train.log_every=1", "train.image_every=100",
]


def test_predict_command_on_a_checkpoint(tmp_path):
    """`python -m synseg_jax.predict` restores the `seg` role and writes one PNG per example."""
    arg = ",".join(TINY_RUN + [f"data.data_dir={tmp_path / 'data'}"])
    config = source_only.get_config(arg)
    method = methods.build(config)
    batch = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   inputs.abstract_batch(config))
    # A checkpoint of zeros will do (the plumbing is under test), and needs no compilation.
    state = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(method.init, jax.random.PRNGKey(0), batch, {}))
    workdir = str(tmp_path / "run")
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(3, state)
    ckpt.close()
    out = tmp_path / "pred"
    proc = subprocess.run(
        [sys.executable, "-m", "synseg_jax.predict", f"--config=configs/source_only.py:{arg}",
         f"--workdir={workdir}", f"--out={out}", f"--colour_out={tmp_path / 'colour'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = predict.example_names("minicity", "real_val", data_dir=str(tmp_path / "data"),
                                  minicity_options=inputs.minicity_options(config.data))
    assert sorted(os.listdir(out)) == sorted(n + predict.SUFFIX for n in names)
    assert len(names) == 5 and len(os.listdir(tmp_path / "colour")) == 5
    valid_ids = set(labels.CITYSCAPES_LABEL_TO_TRAIN)
    for name in names:
        stored = np.asarray(Image.open(out / f"{name}{predict.SUFFIX}"))
        assert stored.shape == (32, 64)  # the label size, not the (16, 32) eval size
        assert set(np.unique(stored).tolist()) <= valid_ids


def test_export_writes_each_example_under_its_own_name_exactly_once(tmp_path):
    """Names travel with their images in the batch; a repeated or missing example is an error
    that names it, never a silently overwritten PNG."""
    def batch(names, keep):
        return {"image": np.zeros((len(names), 2, 2, 3), np.float32),
                "label": np.zeros((len(names), 2, 2), np.uint8),
                "mask": np.asarray(keep), "name": np.asarray(names, object)}

    def step(variables, arrays):
        assert "name" not in arrays  # strings never reach the jitted step
        return np.full(arrays["label"].shape, 7, np.uint8)

    good = [batch([b"a_1", b"b_2"], [True, True]), batch([b"c/3", b""], [True, False])]
    paths = predict.export_batches(step, None, good, 3, str(tmp_path / "ok"))
    assert [os.path.basename(p) for p in paths] == [
        f"a_1{predict.SUFFIX}", f"b_2{predict.SUFFIX}", f"c_3{predict.SUFFIX}"]
    repeated = [batch([b"a_1", b"b_2"], [True, True]), batch([b"a_1", b""], [True, False])]
    with pytest.raises(RuntimeError, match="a_1_pred_labelIds.png"):
        predict.export_batches(step, None, repeated, 3, str(tmp_path / "bad"))
    with pytest.raises(RuntimeError, match="2 distinct predictions for 3"):
        predict.export_batches(step, None, good[:1], 3, str(tmp_path / "short"))


def test_predict_a_folder_of_images_like_the_evaluation_protocol(tmp_path, caplog):
    """--images: any sizes and formats, nested folders; labelIds at each image's own size equal
    to what the evaluation stream predicts for the same image; overlays; other files named."""
    import logging  # noqa: PLC0415

    import tensorflow as tf  # noqa: PLC0415

    from synseg_jax.data import pipeline  # noqa: PLC0415
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "day2").mkdir(parents=True)
    a = rng.integers(0, 256, (30, 50, 3), np.uint8)
    b = rng.integers(0, 256, (21, 40, 3), np.uint8)
    Image.fromarray(a).save(folder / "a.png")
    Image.fromarray(b).save(folder / "day2" / "b.bmp")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    config = source_only.get_config(f"gta5,data.eval_size={EVAL_SIZE}")
    variables = {"params": {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 19))}}
    with caplog.at_level(logging.WARNING):
        paths = predict.export_folder(config, FAKE_SCORES, variables, str(folder),
                                      str(tmp_path / "out"))
    assert [os.path.basename(p) for p in paths] == [
        f"a{predict.SUFFIX}", f"day2_b{predict.SUFFIX}"]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "notes.txt" in skipped and "broken.png" in skipped
    step = jax.jit(predict.make_predict_step(FAKE_SCORES))
    for path, rgb in zip(paths, (a, b)):
        got = np.asarray(Image.open(path))
        assert got.shape == rgb.shape[:2]
        ds = tf.data.Dataset.from_tensors({"image": rgb, "label": np.zeros(rgb.shape[:2], np.uint8)})
        (batch,) = pipeline.HostIterator(pipeline.eval_stream(
            ds, batch_size=1, table=labels.TRAIN_ID_TABLE, image_size=EVAL_SIZE,
            normalization=config.data.normalization))
        expected = np.asarray(step(variables, batch))[0]
        np.testing.assert_array_equal(got, predict.to_label_ids(expected))
        name = os.path.basename(path)[: -len(predict.SUFFIX)]
        over = np.asarray(Image.open(tmp_path / "out" / (name + predict.OVERLAY_SUFFIX)))
        assert over.shape == rgb.shape and not np.array_equal(over, rgb)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no image files in .*empty \(1 other"):
        predict.export_folder(config, FAKE_SCORES, variables, str(tmp_path / "empty"),
                              str(tmp_path / "x"))
