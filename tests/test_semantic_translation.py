"""Semantic translation: the translator stage's losses and updates, the translate sweep (resumable,
labels kept), and the bidirectional recipe end to end on a tiny minicity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import semantic_translation as st_config
from synseg_jax import (checkpoint, evaluate, images, inputs, methods, recipe, sweep, train,
                        translate)
from synseg_jax.data import datasets, labels
from synseg_jax.methods import semantic_translation as st
from synseg_jax.models.translator import Translator
from tests.tiny import TINY_DATA_AND_MODEL

# A translator small enough for seconds: 2-scale PatchGANs of 2 layers need 8-pixel images.
TINY_TRANSLATOR = ["method.translator_dim=4", "method.translator_res=2", "method.spade_hidden=4",
                   "method.disc_dim=4", "method.disc_scales=2", "method.disc_layers=2",
                   "method.disc_widths=(4,4,4,4)"]


def tiny_translator_config(data_dir="", *extra):
    return st_config.get_config(",".join(
        ["demo", f"data.data_dir={data_dir}", *TINY_DATA_AND_MODEL, *TINY_TRANSLATOR,
         "method.name=semantic_translation", "init.seg.path=unused", "init.seg.scope=",
         "train.batch_size=2", *extra]))


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, (h, w) = config.train.batch_size, config.data.crop
    image = lambda: rng.normal(0, 50, (b, h, w, 3)).astype(np.float32)  # noqa: E731
    return {"source": {"image": image(), "label": rng.integers(0, 19, (b, h, w), np.int32)},
            "target": {"image": image()}}


@pytest.fixture(scope="module")
def stepped():
    """One jitted translator step on random data: (method, state before, state after, metrics)."""
    config = tiny_translator_config()
    method = methods.build(config)
    batch = random_batch(config)
    state = jax.jit(method.init)(jax.random.PRNGKey(0), batch, {})
    before = jax.tree_util.tree_map(np.asarray, state)
    after, metrics = jax.jit(method.train_step)(state, batch)
    return method, before, jax.tree_util.tree_map(np.asarray, after), \
        {k: float(v) for k, v in metrics.items()}, batch


def _changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_step_trains_translator_and_discriminators_and_leaves_the_segmenter_frozen(stepped):
    method, before, after, metrics, _ = stepped
    assert set(after.roles) == {"trans", "disc_img", "seg"}
    assert after.roles["seg"].opt_state is None
    assert not _changed(before.roles["seg"].params, after.roles["seg"].params)
    assert _changed(before.roles["trans"].params, after.roles["trans"].params)
    assert _changed(before.roles["disc_img"].params, after.roles["disc_img"].params)
    # Spectral norm's power-iteration vectors advance in training, in both networks.
    assert _changed(before.roles["trans"].collections, after.roles["trans"].collections)
    assert _changed(before.roles["disc_img"].collections, after.roles["disc_img"].collections)
    for term in ("gan", "rec", "cyc", "latent", "sce", "total", "disc_img"):
        assert np.isfinite(metrics[f"loss/{term}"]), term
    w = method.weights
    expected = sum(w[t] * metrics[f"loss/{t}"] for t in st.GAN_TERMS)
    assert metrics["loss/total"] == pytest.approx(expected, rel=1e-5)
    assert metrics["lr/trans"] == pytest.approx(1e-4) and metrics["lr/disc_img"] == pytest.approx(4e-4)


def test_symmetric_cross_entropy_matches_its_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pa, pb = softmax(a), softmax(b)
    expected = np.mean(np.sum(-(pa * np.log(pb) + pb * np.log(pa)), axis=-1))
    got = float(st.symmetric_cross_entropy(jnp.asarray(a), jnp.asarray(b)))
    assert got == pytest.approx(expected, rel=1e-5)
    # Symmetric, and at equal predictions twice their entropy (its minimum in the translation).
    assert float(st.symmetric_cross_entropy(jnp.asarray(b), jnp.asarray(a))) == pytest.approx(got)
    entropy = np.mean(np.sum(-pa * np.log(pa), -1))
    assert float(st.symmetric_cross_entropy(jnp.asarray(a), jnp.asarray(a))) == pytest.approx(
        2 * entropy, rel=1e-5)


def test_symmetric_ce_reaches_the_translator_through_the_frozen_segmenter(stepped):
    method, before, _, _, batch = stepped
    state = jax.tree_util.tree_map(jnp.asarray, before)
    x_s = images.to_unit_range(batch["source"]["image"], method.normalization)
    x_t = images.to_unit_range(batch["target"]["image"], method.normalization)
    seg = state.roles["seg"]
    sem_s, sem_t = method.segment(seg, batch["source"]["image"]), method.segment(
        seg, batch["target"]["image"])

    def sce_only(params):
        _, (terms, _, _) = method.generator_loss(params, state, x_s, x_t, sem_s, sem_t)
        return terms["loss/sce"]

    grads = jax.grad(sce_only)(state.roles["trans"].params)
    norms = {k: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree_util.tree_leaves(v)))
             for k, v in grads.items()}
    # Both translations are segmented: every generator and encoder gets a gradient.
    assert all(n > 0 for n in norms.values()), norms


def test_in_generator_has_no_spade_and_ignores_the_semantics():
    config = tiny_translator_config("", "method.generator_norm=in")
    method = methods.build(config)
    batch = random_batch(config)
    state = method.init(jax.random.PRNGKey(0), batch, {})
    flat = jax.tree_util.tree_flatten_with_path(state.roles["trans"].params)[0]
    assert not any("spade" in jax.tree_util.keystr(p) for p, _ in flat)
    x = batch["source"]["image"]
    seg = state.roles["seg"].variables
    t1 = method.translate({"trans": state.roles["trans"].variables, "seg": seg}, x)
    other = jax.tree_util.tree_map(lambda v: v * 0.5, seg)  # different semantics
    t2 = method.translate({"trans": state.roles["trans"].variables, "seg": other}, x)
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))
    assert t1.dtype == jnp.uint8 and t1.shape == x.shape


def test_translator_for_another_class_count_is_refused_naming_both(tmp_path):
    config = tiny_translator_config()
    method = methods.build(config)
    batch = random_batch(config)
    other = Translator(dim=4, n_res=2, spade_hidden=4)
    sem = jnp.zeros((1, 4, 4, 7), jnp.float32)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    trans = other.init(jax.random.PRNGKey(1), x, x, sem, sem)
    with pytest.raises(ValueError, match=r"conditioned on 7 semantic channels.*predicts 19"):
        method.init(jax.random.PRNGKey(0), batch, {"trans": dict(trans)})


def test_too_small_images_and_missing_segmenter_are_named():
    config = tiny_translator_config("", "data.crop=(4,4)")
    method = methods.build(config)
    with pytest.raises(ValueError, match="smaller than 8 pixels"):
        method.init(jax.random.PRNGKey(0), random_batch(config), {})
    with pytest.raises(ValueError, match="init.seg.path"):
        methods.build(tiny_translator_config("", "init.seg.path="))


def test_summaries_show_both_directions_as_rows(stepped):
    method, before, _, _, batch = stepped
    state = jax.tree_util.tree_map(jnp.asarray, before)
    pictures = method.summaries(state, batch)
    assert set(pictures) == {"train/source_to_target", "train/target_to_source"}
    for picture in pictures.values():
        # input | semantic map | reconstruction | translation | cycled, side by side
        assert picture.dtype == jnp.uint8 and picture.shape == (2, 32, 5 * 32, 3)


# ---------------------------------------------------------------------------------------------
# The translate sweep and the recipe.

RECIPE = ["rounds=1", "translator.steps=2", "translator.batch_size=1", "translator.crop=(32,32)",
          "translator.checkpoint_every=2", "translator.image_every=0", "train.steps=2",
          "train.batch_size=2", "train.checkpoint_every=2", "train.eval_every=2",
          "train.log_every=1", "train.image_every=0", "optim.seg.schedule_steps=2",
          "data.source_split=sim", "data.extra_eval_splits=()", "model.bn_mode=train"]


class SimulatedKill(Exception):
    pass


def test_recipe_translates_pseudo_labels_and_trains_and_a_killed_translation_resumes(
        tmp_path, monkeypatch):
    data_dir = str(tmp_path / "tfds")
    config = st_config.get_config(",".join(
        ["demo", f"data.data_dir={data_dir}", *TINY_DATA_AND_MODEL, *TINY_TRANSLATOR, *RECIPE]))
    assert config.stage_order == ("source", "trans1", "translate1", "pseudo1", "seg1")
    workdir = str(tmp_path / "run")

    # Kill the translate stage after two batches: nothing of it may be read as finished.
    real_split = sweep.translate_split
    per_batch = config.data.eval_batch_size  # images per translate call

    def killed(cfg, translate, *args, **kwargs):
        calls = []

        def dying(x):
            if len(calls) == 2:
                raise SimulatedKill("killed inside the translation sweep")
            calls.append(1)
            return translate(x)

        return real_split(cfg, dying, *args, **kwargs)

    monkeypatch.setattr(sweep, "translate_split", killed)
    with pytest.raises(SimulatedKill):
        recipe.run(config, workdir)
    folder = os.path.join(workdir, "translate1")
    assert not os.path.exists(os.path.join(folder, recipe.DONE))
    assert not os.path.exists(os.path.join(folder, "report.json"))
    assert len(os.listdir(os.path.join(folder, sweep.TRANSLATED_IMAGES))) == 2 * per_batch

    monkeypatch.setattr(sweep, "translate_split", real_split)
    trained = []
    real_train = train.train_and_evaluate
    monkeypatch.setattr(train, "train_and_evaluate", lambda c, d, *a: (trained.append(
        os.path.basename(d)), real_train(c, d, *a))[1])
    recipe.run(config, workdir)
    assert trained == ["seg1"]  # source and trans1 were done; the sweep finished what was left
    with open(os.path.join(folder, "report.json")) as f:
        report = json.load(f)
    assert report["examples"] == 16 and report["kept_from_earlier_run"] == 2 * per_batch
    assert report["translated_now"] == 16 - 2 * per_batch

    # The translated dataset: every source image once, translated by the stage's translator,
    # with the source's own labels.
    opened = datasets.open_split(sweep.dataset_name(folder), sweep.SPLIT, with_names=True)
    examples = {e["name"]: e for e in opened.dataset.as_numpy_iterator()}
    source = datasets.open_split("minicity", "sim", data_dir=data_dir, with_names=True,
                                 minicity_options=inputs.minicity_options(config.data))
    originals = {e["name"]: e for e in source.dataset.as_numpy_iterator()}
    assert sorted(examples) == sorted(originals)
    trans_cfg = recipe.stage_config(config, workdir, "trans1")
    method = methods.build(trans_cfg)
    variables = evaluate.restore_roles(trans_cfg, os.path.join(workdir, "trans1"),
                                       method.translate_roles)
    name = sorted(originals)[0]
    x = images.normalize(originals[name]["image"][None].astype(np.float32),
                         config.data.normalization)
    np.testing.assert_array_equal(examples[name]["image"],
                                  np.asarray(method.translate(variables, x))[0])
    table = source.label_table
    for key, example in examples.items():
        want = labels.map_to_train_ids(originals[key]["label"], table)[0]
        got = example["label"]
        np.testing.assert_array_equal(got[..., 0] if got.ndim == 3 else got, want)

    # The segmenter stage trained on the translated source and the pseudo-labelled target.
    with open(os.path.join(workdir, "seg1", "config.json")) as f:
        seg1 = json.load(f)
    assert seg1["method"]["name"] == "adversarial"
    assert seg1["data"]["source"] == sweep.dataset_name(folder)
    assert seg1["data"]["target"] == sweep.dataset_name(os.path.join(workdir, "pseudo1"))
    assert seg1["data"]["target_labels"] is True
    assert os.path.isdir(os.path.join(workdir, "seg1", "final_weights"))
    assert not os.path.isdir(os.path.join(workdir, "trans1", "final_weights"))
    assert checkpoint.Checkpointer(os.path.join(workdir, "trans1", "checkpoints"),
                                   read_only=True).latest_step() == 2

    # The translate command on a folder: the stage's translator and segmenter, images resized to
    # the training size (32x64 here: these two already are), non-images skipped.
    folder_in, folder_out = tmp_path / "photos", str(tmp_path / "translated")
    (folder_in / "sub").mkdir(parents=True)
    names = sorted(originals)[:2]
    from PIL import Image  # noqa: PLC0415
    Image.fromarray(originals[names[0]]["image"]).save(folder_in / "a.png")
    Image.fromarray(originals[names[1]]["image"]).save(folder_in / "sub" / "b.png")
    (folder_in / "notes.txt").write_text("not an image")
    cfg, method, variables = translate.translator_of(config, workdir, "trans1")
    written = translate.translate_folder(cfg, method, variables, str(folder_in), folder_out)
    assert [os.path.basename(p) for p in written] == ["a_translated.png", "sub_b_translated.png"]
    x = images.normalize(originals[names[0]]["image"][None].astype(np.float32),
                         config.data.normalization)
    np.testing.assert_array_equal(np.asarray(Image.open(written[0])),
                                  np.asarray(method.translate(variables, x))[0])
    with pytest.raises(ValueError, match="direction"):
        translate.translate_folder(cfg, method, variables, str(folder_in), folder_out, "up")
    with pytest.raises(ValueError, match="not a stage"):
        translate.translator_of(config, workdir, "trans9")
