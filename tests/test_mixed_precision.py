"""model.compute_dtype (bfloat16 compute, float32 parameters, statistics and outputs) and
model.remat (rematerialised backbone blocks: same numbers, less memory)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import source_only
from synseg_jax.methods import base
from synseg_jax.methods.source_only import SourceOnly
from synseg_jax.models import layers, segmenters, translator
from synseg_jax.state import RoleState, new_state
from tests.model_init import host_init

TINY = {
    "deeplabv2": dict(width=0.125, stage_sizes=(1, 1, 1, 1), multi_level=True),
    "pspnet_r101": dict(width=0.125, stage_sizes=(1, 1, 1, 1), multi_level=True),
    "deeplab_largefov_vgg16": dict(width=1 / 16, stage_sizes=(1, 1, 1, 1, 1)),
    "fcn8s_vgg16": dict(width=1 / 16, stage_sizes=(1, 1, 1, 1, 1)),
    "bisenet_stdc813": dict(width=0.125, stage_sizes=(1, 1, 1)),
}
IMAGE_SHAPE = (2, 32, 32, 3)
MATMUL_PRIMITIVES = ("conv_general_dilated", "dot_general")


def _images(shape=IMAGE_SHAPE, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 50.0, shape), jnp.float32)


def _eqns(jaxpr):
    """Every equation of a closed jaxpr, inside nested ones (remat, custom_vjp, pjit) too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _eqns(getattr(inner, "jaxpr", inner))


def _matmul_dtypes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return {(eqn.primitive.name, str(v.aval.dtype))
            for eqn in _eqns(jaxpr) if eqn.primitive.name in MATMUL_PRIMITIVES
            for v in (*eqn.invars, *eqn.outvars)}


def _dtypes(tree):
    return {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree)}


def test_compute_dtype_names():
    assert layers.compute_dtype("bfloat16") == jnp.bfloat16
    assert layers.compute_dtype("float32") == jnp.float32
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        layers.compute_dtype("float16")


@pytest.mark.parametrize("name", sorted(TINY))
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_everywhere_else(name):
    model = segmenters.build_segmenter(name, 5, bn_mode="train", dtype=jnp.bfloat16,
                                       **TINY[name])
    x = _images()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert _dtypes(variables) == {"float32"}  # params and BN statistics

    def train_forward(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(1)})

    # Every convolution and matrix product reads and writes bfloat16.
    assert {dtype for _, dtype in _matmul_dtypes(train_forward, variables, x)} == {"bfloat16"}
    out, updated = jax.eval_shape(train_forward, variables, x)
    assert _dtypes(out) == {"float32"}  # logits, aux logits and features, for the losses
    assert _dtypes(updated) <= {"float32"}  # BN running statistics (none in VGG)
    assert bool(updated) == (name not in ("deeplab_largefov_vgg16", "fcn8s_vgg16"))


def test_bfloat16_intermediate_activations_are_bfloat16():
    model = segmenters.build_segmenter("deeplabv2", 5, dtype=jnp.bfloat16, **TINY["deeplabv2"])
    x = _images()

    def is_conv_output(module, method_name):
        return method_name == "__call__" and isinstance(module, (layers.Conv, layers.ConvBN))

    _, state = jax.eval_shape(lambda v, x: model.apply(
        v, x, train=False, capture_intermediates=is_conv_output, mutable=["intermediates"]),
        host_init(model, x), x)
    activations = jax.tree_util.tree_leaves(state["intermediates"])
    assert len(activations) > 10 and _dtypes(activations) == {"bfloat16"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_float32_is_the_default_computation(name):
    """compute_dtype="float32" traces to exactly the program of an unset dtype (the code path
    before the option existed), so its results are bit-identical."""
    x = _images()

    def program(dtype):
        model = segmenters.build_segmenter(name, 5, bn_mode="train", dtype=dtype, **TINY[name])
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        return str(jax.make_jaxpr(lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}))(
                variables, x))

    assert program(layers.compute_dtype("float32")) == program(None)


def _source_only(*overrides):
    config = source_only.get_config(",".join((
        "demo", "model.width=0.125", "model.stage_sizes=(1,1,1,1)", "model.multi_level=True",
        "model.bn_mode=train", "init.seg.path=", *overrides)))
    return SourceOnly(config)


def _state_and_batch(method):
    x = _images()
    labels = np.random.default_rng(1).integers(0, 19, x.shape[:3]).astype(np.int32)
    labels[:, :4] = 255
    variables = host_init(method.model, x, bias_std=0.1)
    params = variables.pop("params")
    role = RoleState(params, dict(variables), method.seg.opt.tx.init(params))
    return new_state(jax.random.key(0), {"seg": role}), {
        "source": {"image": x, "label": jnp.asarray(labels)}}


def test_source_only_config_float32_step_is_the_old_program():
    method = _source_only("model.compute_dtype=float32")
    old = _source_only()
    old.seg = dataclasses.replace(old.seg, model=old.model.clone(dtype=None))
    state, batch = _state_and_batch(method)
    assert (str(jax.make_jaxpr(method.train_step)(state, batch))
            == str(jax.make_jaxpr(old.train_step)(state, batch)))


def test_source_only_bfloat16_step_has_finite_loss_and_float32_gradients():
    method = _source_only("model.compute_dtype=bfloat16")
    assert method.model.dtype == jnp.bfloat16
    state, batch = _state_and_batch(method)
    role = state.roles["seg"]
    gradients_seen = []
    tx = method.seg.opt.tx

    def spied_update(grads, opt_state, params=None):
        gradients_seen.append(grads)  # traced: their dtypes are known while the step is traced
        return tx.update(grads, opt_state, params)

    spied_opt = dataclasses.replace(method.seg.opt, tx=optax.GradientTransformation(
        tx.init, spied_update))
    method.seg = dataclasses.replace(method.seg, opt=spied_opt)
    new_state_, metrics = jax.jit(method.train_step)(state, batch)
    assert len(gradients_seen) == 1 and _dtypes(gradients_seen[0]) == {"float32"}
    assert np.isfinite(float(metrics["loss/seg"])) and float(metrics["loss/seg"]) > 0
    new_role = new_state_.roles["seg"]
    assert _dtypes(new_role.params) == _dtypes(new_role.collections) == {"float32"}
    # Finite gradients: every parameter the optimiser updates moved and stayed finite.
    head = new_role.params["head"]["branch0"]["kernel"]
    assert bool(jnp.isfinite(head).all()) and bool((head != role.params["head"]["branch0"][
        "kernel"]).any())
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree_util.tree_leaves(new_role.params))
    moved = jax.tree_util.tree_map(lambda a, b: bool((a != b).any()),
                                   new_role.collections["batch_stats"],
                                   role.collections["batch_stats"])
    assert all(jax.tree_util.tree_leaves(moved))  # every BN layer's statistics updated


REMAT_PRIMITIVES = ("checkpoint", "remat", "remat2")


def _has_remat(fn, *args):
    return any(eqn.primitive.name in REMAT_PRIMITIVES
               for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol),
                           a, b)


def test_remat_resnet_segmenter_same_loss_gradients_and_statistics():
    x = _images()
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 5, x.shape[:3]), jnp.int32)
    plain = segmenters.build_segmenter("deeplabv2", 5, bn_mode="train", **TINY["deeplabv2"])
    remat = plain.clone(remat=True)
    variables = host_init(plain, x, bias_std=0.1)
    params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
    # Same parameter tree: a checkpoint trained with remat loads without it, and back.
    assert (jax.tree_util.tree_structure(jax.eval_shape(
        lambda: remat.init(jax.random.key(0), x, train=False)))
        == jax.tree_util.tree_structure(variables))

    def loss_and_grads(model):
        def loss(params):
            out, updated = model.apply({"params": params, **stats}, x, train=True,
                                       mutable=["batch_stats"])
            total, _ = base.supervised_loss(out, labels, 0.1)
            return total, updated

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    assert _has_remat(lambda p: remat.apply({"params": p, **stats}, x, train=False), params)
    assert not _has_remat(lambda p: plain.apply({"params": p, **stats}, x, train=False), params)
    (loss, updated), grads = loss_and_grads(plain)
    (loss_r, updated_r), grads_r = loss_and_grads(remat)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    _assert_trees_close(grads_r, grads)
    _assert_trees_close(updated_r, updated)


def test_remat_translator_blocks_same_gradients_and_spectral_norm_state():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(1, 8, 8, 8)), jnp.float32)
    semantics = jnp.asarray(rng.normal(size=(1, 4, 4, 5)), jnp.float32)
    blocks = translator.GeneratorBlocks(2, "spade", spade_hidden=8)
    variables = jax.jit(lambda: blocks.init(jax.random.key(0), h, semantics))()

    def loss_and_grads(model):
        def loss(params, h):
            out, updated = model.apply({**variables, "params": params}, h, semantics, True,
                                       mutable=["batch_stats"])
            return jnp.mean(jnp.square(out)), updated

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            variables["params"], h)

    (loss, updated), grads = loss_and_grads(blocks)
    (loss_r, updated_r), grads_r = loss_and_grads(blocks.clone(remat=True))
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    _assert_trees_close(grads_r, grads, rtol=1e-4)
    _assert_trees_close(updated_r, updated)
    # The spectral-norm vectors did update, inside the rematerialised blocks too.
    assert any(bool((a != b).any()) for a, b in zip(
        jax.tree_util.tree_leaves(updated_r), jax.tree_util.tree_leaves(
            variables["batch_stats"])))


def test_translator_remat_reaches_every_residual_block():
    net = translator.Translator(dim=4, n_downsample=1, n_res=2, n_shared=1, spade_hidden=8)
    x = jnp.zeros((1, 8, 8, 3))
    semantics = jnp.zeros((1, 4, 4, 5))
    variables = jax.eval_shape(lambda: net.init(
        jax.random.key(0), x, semantics, method=translator.Translator.create_variables))

    def checkpoints(model):
        jaxpr = jax.make_jaxpr(lambda v: model.apply(
            v, x, semantics, method=translator.Translator.create_variables))(variables)
        return sum(eqn.primitive.name in REMAT_PRIMITIVES for eqn in _eqns(jaxpr.jaxpr))

    assert checkpoints(net) == 0
    # Two encodes and two decodes, each through a private and a shared residual block.
    assert checkpoints(net.clone(remat=True)) == 8
