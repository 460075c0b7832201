"""Shared method plumbing: pretrained subtrees (backbone or whole model) replace the fresh ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import source_only
from synseg_jax.methods import base


def _role():
    config = source_only.get_config("demo,model.width=0.125,init.seg.path=")
    model = base.segmenter_from_config(config.model)
    tx = base.role_optimizer(config.optim, "seg").tx
    return base.init_role(model, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), tx), tx


def _filled(tree, value):
    return jax.tree_util.tree_map(lambda x: np.full(x.shape, value, x.dtype), tree)


@pytest.mark.parametrize("scope", ["backbone", ""])
def test_with_pretrained_replaces_exactly_the_scope(scope):
    role, tx = _role()
    source = role.params[scope] if scope else role.params
    stats = role.collections["batch_stats"][scope] if scope else role.collections["batch_stats"]
    pretrained = {"params": _filled(source, 0.5), "batch_stats": _filled(stats, 2.0)}
    new = base.with_pretrained(role, pretrained, scope, tx)
    replaced = new.params[scope] if scope else new.params
    assert all((x == 0.5).all() for x in jax.tree_util.tree_leaves(replaced))
    if scope:  # the head keeps its own initialisation
        np.testing.assert_array_equal(new.params["head"]["branch0"]["kernel"],
                                      role.params["head"]["branch0"]["kernel"])
    new_stats = new.collections["batch_stats"][scope] if scope else new.collections["batch_stats"]
    assert all((x == 2.0).all() for x in jax.tree_util.tree_leaves(new_stats))


def test_with_pretrained_rejects_other_shapes():
    role, tx = _role()
    wrong = jax.tree_util.tree_map(lambda x: np.zeros(x.shape + (1,), x.dtype), role.params["backbone"])
    with pytest.raises(ValueError, match="'backbone' params do not fit") as error:
        base.with_pretrained(role, {"params": wrong}, "backbone", tx)
    # A differing key is named with both shapes.
    kernel = role.params["backbone"]["stem"]["conv"]["kernel"].shape
    one_off = jax.tree_util.tree_map(np.asarray, role.params["backbone"])
    one_off["stem"]["conv"]["kernel"] = np.zeros(kernel + (1,), np.float32)
    with pytest.raises(ValueError, match="shape mismatches \\(1\\)") as error:
        base.with_pretrained(role, {"params": one_off}, "backbone", tx)
    assert (f"stem/conv/kernel: pretrained weights {kernel + (1,)} vs model {kernel}"
            in str(error.value))
    missing = {k: v for k, v in role.params["backbone"].items() if k != "stem"}
    with pytest.raises(ValueError, match=r"missing from the pretrained weights \(\d+\): stem/"):
        base.with_pretrained(role, {"params": missing}, "backbone", tx)


# ------------------------------------------------------------------------------------------------
# Per-role optimisers and the supervised loss.

from configs import road  # noqa: E402
from synseg_jax import losses  # noqa: E402


def test_each_role_has_its_own_optimiser_section():
    config = road.get_config("demo,optim.seg.lr=0.02,optim.seg.schedule_steps=40")
    # ROAD's region classifiers follow the segmenter's section, at 10x its lr, until set.
    assert config.optim.disc.lr == pytest.approx(0.2)
    assert config.optim.disc.schedule_steps == 40 and config.optim.disc.head_lr_mult == 1.0
    own = road.get_config("demo,optim.disc.kind=adam,optim.disc.lr=1e-4,optim.disc.betas=(0.5,0.9)")
    assert own.optim.disc.kind == "adam" and own.optim.seg.kind == "sgd"
    assert own.optim.disc.lr == 1e-4 and own.optim.seg.lr == 1e-2
    opt = base.role_optimizer(own.optim, "disc")
    metrics = opt.lr_metrics(jnp.asarray(0))
    assert set(metrics) == {"lr/disc"} and float(metrics["lr/disc"]) == pytest.approx(1e-4)
    seg = base.role_optimizer(own.optim, "seg").lr_metrics(jnp.asarray(0))
    assert set(seg) == {"lr/seg", "lr/seg_head"}
    with pytest.raises(ValueError, match="no section for role 'gen'"):
        base.role_optimizer(own.optim, "gen")


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_role_optimiser_kinds_follow_pytorch_first_step(kind):
    """One update on p = 1 with gradient g = 0.5 and lr 0.1, decay 0.01, as PyTorch computes it."""
    config = road.get_config(f"demo,optim.disc.kind={kind},optim.disc.lr=0.1,"
                             "optim.disc.weight_decay=0.01,optim.disc.schedule=constant")
    tx = base.role_optimizer(config.optim, "disc").tx
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 0.5)}, tx.init(params), params)
    new = np.asarray(params["w"] + updates["w"])
    want = {"sgd": 1 - 0.1 * (0.5 + 0.01),  # L2 in the gradient, momentum buffer = g
            "adam": 1 - 0.1 * 1.0,  # the first Adam step is lr * sign(g) (bias-corrected)
            "adamw": 1 - 0.1 * (1.0 + 0.01)}[kind]
    np.testing.assert_allclose(new, want, rtol=1e-4)


def test_supervised_loss_weights_every_auxiliary_output():
    rng = np.random.default_rng(0)
    labels = jnp.asarray(rng.integers(0, 4, (2, 8, 8)))
    out = {k: jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
           for k in ("logits", "aux_logits", "aux_logits2")}
    total, terms = base.supervised_loss(out, labels, 0.5)
    ce = {k: losses.cross_entropy(v, labels) for k, v in out.items()}
    assert set(terms) == {"loss/seg", "loss/seg_aux", "loss/seg_aux2"}
    np.testing.assert_allclose(total, ce["logits"] + 0.5 * (ce["aux_logits"] + ce["aux_logits2"]),
                               rtol=1e-6)


def test_forward_lets_spectral_norm_state_update_in_training():
    """flax keeps spectral norm's power-iteration vector in a collection: training must be able to
    update it (and the BN-statistics switch must keep it when asked)."""
    import flax.linen as nn  # noqa: PLC0415

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.SpectralNorm(nn.Dense(4), collection_name="spectral")(x, update_stats=train)

    model = Tiny()
    x = jax.random.normal(jax.random.key(0), (3, 5))
    variables = model.init(jax.random.key(1), x, train=False)
    role = base.RoleState(params=variables["params"],
                          collections={"spectral": variables["spectral"]}, opt_state=None)
    _, kept = base.forward(model, role, role.params, x, train=True, update_stats=True)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), kept["spectral"],
                                     role.collections["spectral"])
    assert any(jax.tree_util.tree_leaves(changed))
    _, frozen = base.forward(model, role, role.params, x, train=True, update_stats=False)
    assert frozen is role.collections
    _, infer = base.forward(model, role, role.params, x, train=False, update_stats=True)
    assert infer is role.collections


def test_default_summaries_are_jittable_uint8_pictures():
    from configs import source_only as so  # noqa: PLC0415
    from synseg_jax import images  # noqa: PLC0415
    from synseg_jax.methods.source_only import SourceOnly  # noqa: PLC0415

    config = so.get_config("demo,model.width=0.125,model.stage_sizes=(1,1,1,1),"
                           "init.seg.path=")
    method = SourceOnly(config)
    label = np.random.default_rng(0).integers(0, 19, (4, 16, 16)).astype(np.int32)
    label[0, 0, 0] = 255
    batch = {"source": {"image": jnp.zeros((4, 16, 16, 3)), "label": jnp.asarray(label)}}
    state = method.init(jax.random.PRNGKey(0), batch, {})
    from synseg_jax import train  # noqa: PLC0415

    pictures = jax.jit(train.summaries_of(method, "caffe_bgr"))(state, batch)
    assert set(pictures) == {"train/source_image", "train/source_label",
                             "train/source_prediction"}
    for value in pictures.values():
        assert value.dtype == jnp.uint8 and value.shape == (base.SUMMARY_IMAGES, 16, 16, 3)
    np.testing.assert_array_equal(pictures["train/source_label"],
                                  images.colorize(label[:base.SUMMARY_IMAGES]))


def test_role_optimizer_applies_the_configured_warmup():
    config = source_only.get_config("demo,optim.seg.lr=1e-2,optim.seg.schedule_steps=100,"
                                    "optim.seg.warmup_steps=4")
    lrs = base.role_optimizer(config.optim, "seg").lr_metrics(jnp.asarray(1))
    assert float(lrs["lr/seg"]) == pytest.approx(0.5 * 1e-2 * (1 - 1 / 100) ** 0.9, rel=1e-5)
    assert float(lrs["lr/seg_head"]) == pytest.approx(10 * float(lrs["lr/seg"]), rel=1e-5)
