"""ROAD: gradient reversal through the loss, crop box -> region, distillation, which roles a step
changes, and a tiny end-to-end run of configs/road.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import road as road_config
from synseg_jax import methods, train
from synseg_jax.methods import road
from tests.tiny import TINY_DATA_AND_MODEL

# A tiny demo: minicity at 32x64, a 1-1-1-1 DeepLabV2 at 1/8 width, from scratch (no pretraining:
# the teacher is then the segmenter's own initial backbone, see methods/road.py).
TINY = [*TINY_DATA_AND_MODEL, "method.disc_hidden=(8,)"]


def tiny_config(*extra):
    return road_config.get_config(",".join(["demo", *TINY, *extra]))


def fake_batch(b=2, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "source": {"image": jnp.asarray(rng.normal(size=(b, h, w, 3)) * 50, jnp.float32),
                   "label": jnp.asarray(rng.integers(0, 19, (b, h, w)), jnp.uint8),
                   "crop_box": jnp.asarray([[0.0, 0.0, 1.0, 1.0], [0.2, 0.9, 0.7, 0.4]][:b])},
        "target": {"image": jnp.asarray(rng.normal(size=(b, h, w, 3)) * 50 + 10, jnp.float32),
                   "crop_box": jnp.asarray([[0.5, 0.5, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]][:b])},
    }


@pytest.fixture(scope="module")
def full_state():
    """One initialised state of full ROAD, shared: jitting an init costs ~10 s of CPU here."""
    method = methods.build(tiny_config())
    return jax.jit(method.init)(jax.random.PRNGKey(0), fake_batch(), {})


def state_for(method, full):
    """``full`` restricted to ``method``'s roles: what its own init returns (param shapes do not
    depend on BN mode, lambdas or dist_domain); checked against init's abstract output."""
    state = full.replace(roles={k: v for k, v in full.roles.items() if k in method.roles})
    abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0), fake_batch(), {})
    assert (jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(state))
    return state


def leaves_equal(a, b) -> list[bool]:
    return [bool(np.array_equal(x, y)) for x, y in
            zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]


# --- spatial-aware splitting ---------------------------------------------------------------------

def test_region_ids_follow_the_crop_box_through_flips_and_scaling():
    full = np.array([[0.0, 0.0, 1.0, 1.0]])
    ids, valid = road.region_ids(full, 3, 3, (3, 3))
    np.testing.assert_array_equal(ids[0], [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    assert bool(valid.all())
    # The same image flipped: the left column of the crop came from the right of the image.
    ids, _ = road.region_ids(np.array([[0.0, 1.0, 1.0, 0.0]]), 3, 3, (3, 3))
    np.testing.assert_array_equal(ids[0], [[2, 1, 0], [5, 4, 3], [8, 7, 6]])
    # A zoomed-in crop of the bottom-right quarter: centres at 0.625 and 0.875 of the image.
    ids, _ = road.region_ids(np.array([[0.5, 0.5, 1.0, 1.0]]), 2, 2, (3, 3))
    np.testing.assert_array_equal(ids[0], [[4, 5], [7, 8]])
    # A flipped crop of the top-left: x centres 0.35, 0.25, 0.15, 0.05; y centres 0.125, 0.375.
    box = np.array([[0.0, 0.4, 0.5, 0.0]])
    ids, _ = road.region_ids(box, 2, 4, (3, 3))
    np.testing.assert_array_equal(ids[0], [[1, 0, 0, 0], [4, 3, 3, 3]])
    ids, _ = road.region_ids(box, 2, 4, (2, 2))
    np.testing.assert_array_equal(ids[0], [[0, 0, 0, 0], [0, 0, 0, 0]])
    ids, _ = road.region_ids(np.array([[0.25, 0.0, 0.75, 1.0]]), 2, 1, (2, 1))  # top / bottom
    np.testing.assert_array_equal(ids[0], [[0], [1]])
    # A crop larger than the scaled image reaches outside [0, 1]: padding, not valid.
    ids, valid = road.region_ids(np.array([[-0.5, 0.0, 1.5, 1.0]]), 4, 1, (3, 3))
    np.testing.assert_array_equal(valid[0, :, 0], [False, True, True, False])
    np.testing.assert_array_equal(ids[0, 1:3, 0], [1, 7])  # y 0.25, 0.75; x 0.5


def test_each_pixel_is_scored_by_its_own_region_classifier():
    # Classifier m answers "target" with confidence m: the loss must read logits of the pixel's m.
    logits = jnp.stack([jnp.zeros(3), jnp.arange(3.0)], -1)[None].repeat(4, 0)  # [N=4, M=3, 2]
    regions = jnp.array([0, 1, 2, 2])
    domains = jnp.array([1, 1, 1, 0])
    loss, acc = road.spatial_domain_loss(logits, regions, jnp.ones(4, bool), domains, 3)
    ce = lambda z, d: float(jax.nn.logsumexp(jnp.array([0.0, z])) - (z if d else 0.0))  # noqa
    expected = ce(0.0, 1) + ce(1.0, 1) + (ce(2.0, 1) + ce(2.0, 0)) / 2  # Eq. 2: sum of means
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(acc) == pytest.approx(2 / 4)  # region 0 ties -> argmax 0 (source): wrong


# --- gradients -----------------------------------------------------------------------------------

def _grad_fn(method, state, batch):
    return jax.jit(jax.value_and_grad(lambda s, d: method.road_loss(s, d, state, batch),
                                      argnums=(0, 1), has_aux=True))


def _grads(method, state, batch):
    disc = state.roles["disc"].params if method.spt else None
    return _grad_fn(method, state, batch)(state.roles["seg"].params, disc)


def test_gradient_reversal_flips_the_segmenter_gradient_and_keeps_the_classifiers(
        monkeypatch, full_state):
    config = tiny_config("method.dist=False", "method.lambda_spt=1.0")
    method = methods.build(config)
    batch = fake_batch()
    # Every source pixel void: the segmentation loss and its gradient are 0, so the segmenter's
    # whole gradient is the one that comes back through the domain classifiers.
    batch["source"]["label"] = jnp.full_like(batch["source"]["label"], 255)
    state = state_for(method, full_state)
    (_, (terms, _)), (seg_grl, disc_grl) = _grads(method, state, batch)
    assert float(terms["loss/seg"]) == 0.0 and float(terms["loss/spt"]) > 0.0
    monkeypatch.setattr(road.layers, "grad_reverse", lambda x, scale=1.0: x)  # no GRL
    _, (seg_plain, disc_plain) = _grads(method, state, batch)

    # The domain classifiers descend L_spt either way: their gradient is the same, and not zero.
    for a, b in zip(jax.tree_util.tree_leaves(disc_grl), jax.tree_util.tree_leaves(disc_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(np.abs(x).max() > 0 for x in jax.tree_util.tree_leaves(disc_grl))
    # What reaches the features (and through them the backbone) is negated: the segmenter ascends.
    scale = max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(seg_plain["backbone"]))
    assert scale > 0
    for a, b in zip(jax.tree_util.tree_leaves(seg_grl), jax.tree_util.tree_leaves(seg_plain)):
        np.testing.assert_allclose(a, -b, atol=1e-4 * scale)
    # The head is not behind the domain classifiers (they read layer4): no gradient at all.
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(seg_grl["head"]))


def test_distillation_is_zero_for_identical_weights_and_positive_otherwise(full_state):
    # Frozen BN: student (train mode) and teacher (inference) then normalise alike.
    config = tiny_config("method.spt=False", "model.bn_mode=frozen")
    method = methods.build(config)
    batch = fake_batch()
    state = state_for(method, full_state)
    params = state.roles["seg"].params
    grad_fn = _grad_fn(method, state, batch)
    (_, (terms, _)), (grads, _) = grad_fn(params, None)
    teacher = jax.jit(method.teacher_features)(state.roles["teacher"], batch["target"]["image"])
    norm = float(jnp.linalg.norm(teacher, axis=-1).mean())
    # Identical weights: zero up to float round-off (XLA fuses the two graphs differently).
    assert float(terms["loss/dist"]) <= 1e-5 * norm
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    rng = np.random.default_rng(1)
    noisy = jax.tree_util.tree_map(
        lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), params)
    (_, (terms, _)), _ = grad_fn(noisy, None)
    assert float(terms["loss/dist"]) > 1e-2 * norm


# --- which roles a step changes ------------------------------------------------------------------

def _two_steps(config, batch, full):
    method = methods.build(config)
    state = state_for(method, full)
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), state.roles)
    step = jax.jit(method.train_step)  # no donation: `full` is shared (train.py's run donates)
    for _ in range(2):
        state, metrics = step(state, batch)
    return method, before, state.roles, metrics


def test_two_steps_change_seg_and_disc_and_never_the_teacher(full_state):
    # Train-mode BN: the segmenter's running statistics move; the teacher's must not.
    method, before, after, metrics = _two_steps(tiny_config("model.bn_mode=train"), fake_batch(),
                                                full_state)
    assert method.roles == ("seg", "teacher", "disc") and set(after) == set(method.roles)
    assert after["teacher"].opt_state is None
    assert all(leaves_equal(before["teacher"], after["teacher"]))  # bit-identical
    assert not all(leaves_equal(before["seg"].params, after["seg"].params))
    assert not all(leaves_equal(before["seg"].collections, after["seg"].collections))
    assert not all(leaves_equal(before["disc"].params, after["disc"].params))
    for name in ("loss/seg", "loss/dist", "loss/spt", "lr/disc"):
        assert np.isfinite(float(metrics[name])), name


def test_ablations_drop_the_disc_update_and_the_teacher(monkeypatch, full_state):
    method, before, after, metrics = _two_steps(tiny_config("method.spt=False"), fake_batch(),
                                                full_state)
    assert "disc" not in after and "disc" not in method.roles and "loss/spt" not in metrics
    assert "loss/dist" in metrics

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not run with method.dist=False")

    monkeypatch.setattr(road.Road, "teacher_features", no_teacher)
    method, before, after, metrics = _two_steps(tiny_config("method.dist=False"), fake_batch(),
                                                full_state)
    assert "teacher" not in after and "teacher" not in method.roles
    assert "loss/dist" not in metrics and "loss/spt" in metrics
    assert not all(leaves_equal(before["disc"].params, after["disc"].params))


def test_teacher_backbone_matches_every_segmenters_backbone():
    from synseg_jax.models import segmenters
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    for name in segmenters.SEGMENTERS:
        kwargs = {"width": 0.125}
        if name in ("deeplabv2", "pspnet_r101"):
            kwargs["stage_sizes"] = (1, 1, 1, 1)
        seg = segmenters.build_segmenter(name, 19, **kwargs)
        want = jax.eval_shape(lambda x: seg.init(jax.random.PRNGKey(0), x, train=False), images)
        teacher = road.teacher_backbone(name, seg)
        got = jax.eval_shape(lambda x: teacher.init(jax.random.PRNGKey(0), x, train=False),
                             images)
        for collection, tree in got.items():
            assert jax.tree_util.tree_map(lambda s: s.shape, tree) == jax.tree_util.tree_map(
                lambda s: s.shape, want[collection]["backbone"]), (name, collection)


# --- end to end ----------------------------------------------------------------------------------

def test_tiny_road_run_leaves_an_eval_json(tmp_path):
    config = tiny_config(f"data.data_dir={tmp_path / 'tfds'}", "model.bn_mode=train",
                         "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
                         "train.eval_every=2", "train.log_every=1", "train.image_every=0")
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "eval", "minicity_real_val_2.json")) as f:
        record = json.load(f)
    assert record["step"] == 2 and record["num_pixels"] > 0
    assert results["minicity/real_val"].miou_19 == pytest.approx(record["miou_19"])


@pytest.mark.parametrize("arg", ["gta5", "synthia,model.name=pspnet_r101"])
def test_paper_presets_build_every_role(arg):
    """Abstractly (no compile): the paper networks get a same-shaped teacher and 3x3 classifiers."""
    from synseg_jax import inputs
    config = road_config.get_config(arg)
    method = methods.build(config)
    state = jax.eval_shape(method.init, jax.random.PRNGKey(0), inputs.abstract_batch(config), {})
    assert set(state.roles) == {"seg", "teacher", "disc"}
    shapes = lambda tree: jax.tree_util.tree_map(lambda s: s.shape, tree)  # noqa: E731
    assert shapes(state.roles["teacher"].params) == shapes(state.roles["seg"].params["backbone"])
    assert state.roles["disc"].params["kernel0"].shape[0] == 9
    assert config.data.crop == (321, 321) and config.train.batch_size == 5


def test_per_role_initial_weights_reach_the_segmenter_and_the_teacher(full_state):
    """`init.seg` fills the segmenter's backbone; `init.teacher` (when set) replaces the teacher,
    which otherwise copies the segmenter's initial backbone."""
    method = methods.build(tiny_config())
    backbone = full_state.roles["seg"].params["backbone"]
    stats = full_state.roles["seg"].collections["batch_stats"]["backbone"]
    filled = lambda tree, v: jax.tree_util.tree_map(lambda x: jnp.full_like(x, v), tree)  # noqa: E731
    seg_init = {"params": filled(backbone, 0.5), "batch_stats": filled(stats, 2.0)}
    teacher_init = {"params": filled(backbone, -1.0), "batch_stats": filled(stats, 3.0)}

    state = method.init(jax.random.PRNGKey(0), fake_batch(), {"seg": seg_init})
    for leaf in jax.tree_util.tree_leaves(state.roles["teacher"].params):
        np.testing.assert_array_equal(leaf, 0.5)
    state = method.init(jax.random.PRNGKey(0), fake_batch(),
                        {"seg": seg_init, "teacher": teacher_init})
    for leaf in jax.tree_util.tree_leaves(state.roles["seg"].params["backbone"]):
        np.testing.assert_array_equal(leaf, 0.5)
    for leaf in jax.tree_util.tree_leaves(state.roles["teacher"].params):
        np.testing.assert_array_equal(leaf, -1.0)
    for leaf in jax.tree_util.tree_leaves(state.roles["teacher"].collections):
        np.testing.assert_array_equal(leaf, 3.0)


def test_initial_weights_for_a_role_the_method_lacks_are_an_error(tmp_path):
    config = tiny_config("method.dist=False", f"init.teacher.path={tmp_path}")
    method = methods.build(config)
    with pytest.raises(ValueError, match=r"init.teacher.path is set .* no role 'teacher'"):
        train.load_initial_weights(config, method.roles)
