"""Backbones, segmenters and shared layers: shapes, strides, parameter counts, BN modes, GRL."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax.models import layers, resnet, segmenters
from tests.model_init import abstract_init, count, host_init

TINY = dict(width=0.125, stage_sizes=(1, 1, 1, 1))  # stem 8 ch, stage outputs 32/64/128/256


def _images(seed, n=2, size=33, c=3):
    return jax.random.normal(jax.random.key(seed), (n, size, size, c))


# ---------------------------------------------------------------------------------------------
# Pooling and resizing arithmetic


def _np_max_pool(x, k, s, p, ceil_mode):
    """Direct PyTorch-semantics max-pool on a 2-D array, written from the formula."""
    def out_len(n):
        o = (math.ceil if ceil_mode else math.floor)((n + 2 * p - k) / s) + 1
        return o - 1 if ceil_mode and (o - 1) * s >= n + p else o

    h, w = x.shape
    out = np.empty((out_len(h), out_len(w)), x.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            r0, c0 = i * s - p, j * s - p
            out[i, j] = x[max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w)].max()
    return out


def test_pool_output_size_by_hand():
    # Caffe stem on 65×65: 7×7/2 pad 3 conv -> (65 + 6 - 7) // 2 + 1 = 33; pool 3×3/2 pad 1.
    assert layers.pool_output_size(33, 3, 2, 1, ceil_mode=True) == 17   # ceil(32 / 2) + 1
    assert layers.pool_output_size(33, 3, 2, 1, ceil_mode=False) == 17  # floor(32 / 2) + 1
    # Even input: 64×64 image -> 32 after the stem conv; the two modes now disagree.
    assert layers.pool_output_size(32, 3, 2, 1, ceil_mode=True) == 17   # ceil(31 / 2) + 1
    assert layers.pool_output_size(32, 3, 2, 1, ceil_mode=False) == 16  # floor(31 / 2) + 1
    # PyTorch drops a last window that would start in the right padding: 5 wide, 3×3/3 pad 1
    # gives ceil(4 / 3) + 1 = 3, but window 2 would start at 2·3 − 1 = 5, past the input.
    assert layers.pool_output_size(5, 3, 3, 1, ceil_mode=True) == 2


@pytest.mark.parametrize("size", [5, 6, 32, 33])
@pytest.mark.parametrize("ceil_mode", [True, False])
def test_max_pool_matches_numpy(size, ceil_mode):
    x = np.asarray(jax.random.normal(jax.random.key(size), (size, size + 1)), np.float32)
    want = _np_max_pool(x, 3, 2, 1, ceil_mode)
    got = layers.max_pool(jnp.asarray(x)[None, :, :, None], 3, 2, 1, ceil_mode)[0, :, :, 0]
    np.testing.assert_array_equal(np.asarray(got), want)


# ---------------------------------------------------------------------------------------------
# Gradient reversal


def test_grad_reverse_forward_identity_backward_negated():
    x = jax.random.normal(jax.random.key(1), (3, 4))
    upstream = jax.random.normal(jax.random.key(2), (3, 4))
    np.testing.assert_array_equal(layers.grad_reverse(x, 0.3), x)
    g = jax.grad(lambda v: jnp.sum(upstream * layers.grad_reverse(v, 0.3)))(x)
    np.testing.assert_allclose(g, -0.3 * upstream, rtol=1e-6)
    # A traced (scheduled) scale works under jit and receives no gradient.
    gx, gs = jax.jit(jax.grad(lambda v, s: jnp.sum(upstream * layers.grad_reverse(v, s)),
                              argnums=(0, 1)))(x, 2.0)
    np.testing.assert_allclose(gx, -2.0 * upstream, rtol=1e-6)
    assert gs == 0.0


# ---------------------------------------------------------------------------------------------
# ResNet geometry


# Expected spatial sizes for a 65×65 input: stem 33, pool 17, layer2 9, then OS-dependent.
@pytest.mark.parametrize("style", resnet.STYLES)
@pytest.mark.parametrize("output_stride,sizes", [
    (8, (33, 17, 9, 9, 9)), (16, (33, 17, 9, 5, 5)), (32, (33, 17, 9, 5, 3))])
def test_resnet_feature_shapes(style, output_stride, sizes):
    model = resnet.ResNet(style=style, output_stride=output_stride, **TINY)
    features, _ = abstract_init(model)
    names = ("stem", "layer1", "layer2", "layer3", "layer4")
    assert set(features) == set(names)
    for name, size, ch in zip(names, sizes, (8, 32, 64, 128, 256)):
        assert features[name].shape == (1, size, size, ch), (name, features[name].shape)


def test_ceil_vs_floor_pool_on_even_input():
    # 64×64: stem 32; caffe pool (ceil) 17 -> layer2 via 1×1/2 pad 0 = 9;
    # torchvision pool (floor) 16 -> layer2 via 3×3/2 pad 1 = 8.
    caffe, _ = abstract_init(resnet.ResNet(style="caffe", **TINY), (1, 64, 64, 3))
    tv, _ = abstract_init(resnet.ResNet(style="torchvision", **TINY), (1, 64, 64, 3))
    assert caffe["layer1"].shape[1:3] == (17, 17) and caffe["layer4"].shape[1:3] == (9, 9)
    assert tv["layer1"].shape[1:3] == (16, 16) and tv["layer4"].shape[1:3] == (8, 8)


@pytest.mark.parametrize("style,strided", [("caffe", "conv1"), ("torchvision", "conv2")])
def test_bottleneck_stride_placement(style, strided):
    block = resnet.Bottleneck(4, strides=2, project=True, style=style)
    x = jnp.ones((1, 8, 8, 8))
    variables = host_init(block, x)
    _, state = block.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    sizes = {k: v["__call__"][0].shape[1] for k, v in state["intermediates"].items()
             if k != "__call__"}
    assert sizes["conv1"] == (4 if strided == "conv1" else 8)
    assert sizes["conv2"] == sizes["conv3"] == sizes["downsample"] == 4


def _conv3x3_dilations(model, shape=(1, 33, 33, 3)):
    """Dilation of every 3×3 conv in forward order, read off the traced program."""
    _, variables = abstract_init(model, shape)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
        variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    # linen's apply is not jitted, so every conv is a top-level equation.
    return [eqn.params["rhs_dilation"][0] for eqn in jaxpr.jaxpr.eqns
            if eqn.primitive.name == "conv_general_dilated" and eqn.invars[1].aval.shape[0] == 3]


@pytest.mark.parametrize("style,want", [
    # layer1, layer2, layer3, layer4 with two blocks each at output stride 8.
    ("caffe", [1, 1, 1, 1, 2, 2, 4, 4]),        # DeepLab dilates whole stages
    ("torchvision", [1, 1, 1, 1, 1, 2, 2, 4]),  # first block keeps the previous dilation
])
def test_dilation_schedule(style, want):
    model = resnet.ResNet(style=style, width=0.125, stage_sizes=(2, 2, 2, 2), output_stride=8)
    assert _conv3x3_dilations(model) == want


# ---------------------------------------------------------------------------------------------
# Parameter counts, derived by hand from the layer definitions


def _bottleneck_params(in_ch, planes, project):
    out = 4 * planes
    n = in_ch * planes + 2 * planes      # conv1 1×1 (no bias) + BN scale/bias
    n += 3 * 3 * planes * planes + 2 * planes  # conv2 3×3 + BN
    n += planes * out + 2 * out          # conv3 1×1 + BN
    if project:
        n += in_ch * out + 2 * out       # downsample 1×1 + BN
    return n


def _resnet_params(stage_sizes):
    n = 7 * 7 * 3 * 64 + 2 * 64          # stem conv + BN
    in_ch = 64
    for s, blocks in enumerate(stage_sizes):
        planes = 64 * 2 ** s
        for b in range(blocks):
            n += _bottleneck_params(in_ch, planes, project=b == 0)
            in_ch = 4 * planes
    return n


def test_param_count_deeplabv2_resnet101():
    backbone = _resnet_params((3, 4, 23, 3))
    assert backbone == 42_500_160
    aspp = 4 * (3 * 3 * 2048 * 19 + 19)  # four dilated 3×3 convs 2048 -> 19 with bias
    assert aspp == 1_400_908
    model = segmenters.build_segmenter("deeplabv2", 19)  # defaults: R101, caffe, 4 branches
    _, variables = abstract_init(model)
    assert count(variables["params"]["backbone"]) == backbone
    assert count(variables["params"]["head"]) == aspp
    assert count(variables["params"]) == backbone + aspp == 43_901_068


def test_param_count_torchvision_classifiers():
    fc = 2048 * 1000 + 1000
    for depth, stages, known in [(101, (3, 4, 23, 3), 44_549_160), (50, (3, 4, 6, 3), 25_557_032)]:
        assert _resnet_params(stages) + fc == known
        model = segmenters.build_classifier("resnet", 1000, depth=depth, style="torchvision")
        _, variables = abstract_init(model, (1, 64, 64, 3))
        assert count(variables["params"]) == known


# ---------------------------------------------------------------------------------------------
# DeepLabV2 heads


def test_aspp_is_sum_of_dilated_branches():
    aspp = segmenters.ASPP(5)
    x = _images(3, n=1, size=9, c=8)
    params = aspp.init(jax.random.key(0), x)["params"]
    # Random biases so the check also covers them (init is zero).
    params = {k: {"kernel": v["kernel"], "bias": jax.random.normal(jax.random.key(i), (5,))}
              for i, (k, v) in enumerate(params.items())}
    want = 0.0
    for i, r in enumerate((6, 12, 18, 24)):
        p = params[f"branch{i}"]
        want += jax.lax.conv_general_dilated(
            x, p["kernel"], (1, 1), [(r, r), (r, r)], rhs_dilation=(r, r),
            dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    got = aspp.apply({"params": params}, x)
    assert got.shape == (1, 9, 9, 5)
    np.testing.assert_allclose(got, want, atol=1e-5)

    # Two-branch variant == four-branch with the last two branches zeroed.
    two = segmenters.ASPP(5, rates=(6, 12)).apply(
        {"params": {k: params[k] for k in ("branch0", "branch1")}}, x)
    zeroed = dict(params, **{k: jax.tree.map(jnp.zeros_like, params[k])
                             for k in ("branch2", "branch3")})
    np.testing.assert_allclose(two, aspp.apply({"params": zeroed}, x), atol=1e-5)


def test_conv_init_is_he_fan_out():
    kernel = layers.ConvBN(64, 3).init(jax.random.key(0), jnp.zeros((1, 5, 5, 32)),
                                       train=False)["params"]["conv"]["kernel"]
    assert abs(float(kernel.std()) / np.sqrt(2.0 / (3 * 3 * 64)) - 1) < 0.05


def test_aspp_init():
    params = segmenters.ASPP(19).init(jax.random.key(0), jnp.zeros((1, 9, 9, 64)))["params"]
    kernels = np.concatenate([np.ravel(p["kernel"]) for p in params.values()])
    assert abs(kernels.std() - 0.01) < 0.0005 and abs(kernels.mean()) < 0.0005
    assert all(not np.any(p["bias"]) for p in params.values())


@pytest.mark.parametrize("two_branch,multi_level", [(False, False), (True, True)])
def test_deeplabv2_outputs_and_param_tree(two_branch, multi_level):
    model = segmenters.DeepLabV2(7, aspp_two_branch=two_branch, multi_level=multi_level, **TINY)
    out, variables = abstract_init(model)
    params = variables["params"]
    assert out["logits"].shape == (1, 9, 9, 7)  # 65×65 input, output stride 8
    assert set(out["features"]) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    n_branches = 2 if two_branch else 4
    assert sorted(params["head"]) == [f"branch{i}" for i in range(n_branches)]
    assert ("aux_logits" in out) == multi_level
    assert set(params) == {"backbone", "head"} | ({"head_aux"} if multi_level else set())
    if multi_level:
        assert out["aux_logits"].shape == (1, 9, 9, 7)
        assert params["head_aux"]["branch0"]["kernel"].shape == (3, 3, 128, 7)  # on layer3

    # Naming rule: BN params are exactly the leaves under a `bn*` module.
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        last = path[-1].key
        if layers.is_bn_path(path):
            assert last in ("scale", "bias") and leaf.ndim == 1
        else:
            assert last == "kernel" or (last == "bias" and "head" in path[0].key)
    assert all(layers.is_bn_path(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0])


def test_classifier_backbone_transfers_to_segmenter():
    cls = segmenters.build_classifier("resnet", 10, style="caffe", **TINY)
    seg = segmenters.build_segmenter("deeplabv2", 19, **TINY)
    _, cv = abstract_init(cls)
    _, sv = abstract_init(seg)
    for col in ("params", "batch_stats"):
        assert (jax.tree.map(lambda a: a.shape, cv[col]["backbone"])
                == jax.tree.map(lambda a: a.shape, sv[col]["backbone"]))


def test_factories_resolve_every_name_and_reject_unknown():
    # TINY fits the ResNet-based names; tests/test_model_zoo.py builds every registered name.
    for name in ("deeplabv2", "pspnet_r101"):
        abstract_init(segmenters.build_segmenter(name, 3, **TINY))
    for name in segmenters.CLASSIFIERS:
        abstract_init(segmenters.build_classifier(name, 3, **TINY))
    abstract_init(segmenters.build_backbone("resnet", **TINY))
    with pytest.raises(ValueError, match="deeplabv2"):
        segmenters.build_segmenter("deeplabv3", 19)
    with pytest.raises(ValueError, match="resnet"):
        segmenters.build_classifier("vit", 10)


# ---------------------------------------------------------------------------------------------
# BatchNorm modes


def _apply_train(model, variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])


def test_bn_modes():
    x = _images(4, n=2) * 3.0 + 1.0
    x_other = x.at[1].set(_images(5, n=1)[0])  # same first image, different batch-mate
    train_model = segmenters.DeepLabV2(5, bn_mode="train", **TINY)
    frozen_model = segmenters.DeepLabV2(5, bn_mode="frozen", **TINY)
    variables = host_init(train_model, x)

    # "train": batch statistics, running averages move, outputs depend on the batch.
    out, upd = _apply_train(train_model, variables, x)
    out_other, _ = _apply_train(train_model, variables, x_other)
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, upd["batch_stats"],
                                         variables["batch_stats"]))
    assert not np.allclose(out["logits"][0], out_other["logits"][0], atol=1e-4)

    # "frozen": running statistics (here the non-trivial ones just learnt), never updated, and
    # each image's output is independent of its batch-mates -- the same as train-mode eval.
    trained = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    out, upd2 = _apply_train(frozen_model, trained, x)
    out_other, _ = _apply_train(frozen_model, trained, x_other)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, upd2["batch_stats"], trained["batch_stats"]))
    np.testing.assert_allclose(out["logits"][0], out_other["logits"][0], atol=1e-5)
    eval_out = train_model.apply(trained, x, train=False)
    np.testing.assert_allclose(out["logits"], eval_out["logits"], atol=1e-5)


def test_bn_rejects_bad_mode_and_name():
    with pytest.raises(ValueError, match="bn_mode"):
        abstract_init(segmenters.DeepLabV2(5, bn_mode="sync", **TINY))
    with pytest.raises(ValueError, match="start with"):
        layers.batch_norm("train", True, name="norm")


def _assert_same_as_nn_conv(ours, ref, x, use_bias, grad_tol):
    """layers.Conv `ours` against nn.Conv `ref`: same parameter tree and initial kernel, same
    outputs, same gradients (parameters and input) to `grad_tol`."""
    params = ref.init(jax.random.key(1), x)
    ours_init = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours_init) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(ours_init["params"]["kernel"], params["params"]["kernel"])
    if use_bias:
        params = jax.tree.map(lambda p: p + 0.3, params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    grad = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))
    for a, b in zip(jax.tree.leaves(grad(ours)(params, x)), jax.tree.leaves(grad(ref)(params, x))):
        np.testing.assert_allclose(a, b, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("strides,padding,use_bias,as_matmul", [
    (1, "SAME", True, True), (2, [(0, 0), (0, 0)], False, True), (1, "VALID", False, True),
    (1, 0, False, True), (2, (0, 0), True, True),  # nn.Conv's int and per-axis int forms
    (1, 1, True, False), (2, (1, 0), False, False),  # padded: nn.Conv's own path
])
def test_pointwise_conv_matmul_equals_nn_conv(strides, padding, use_bias, as_matmul):
    """layers.Conv computes unpadded 1x1 kernels as a matmul: same parameters (names, shapes,
    init), same outputs and gradients as nn.Conv, strided too, for every padding form."""
    import flax.linen as nn
    x = _images(3, n=2, size=9, c=5)
    ours = layers.Conv(7, (1, 1), strides=strides, padding=padding, use_bias=use_bias)
    ref = nn.Conv(7, (1, 1), strides=strides, padding=padding, use_bias=use_bias)
    assert ours._is_pointwise() == as_matmul
    _assert_same_as_nn_conv(ours, ref, x, use_bias, grad_tol=1e-5)
    # Anything that is not a plain 1x1 goes to nn.Conv unchanged.
    three = layers.Conv(7, (3, 3), padding=[(1, 1), (1, 1)])
    assert not three._is_pointwise() and three.init(jax.random.key(0), x)["params"]["kernel"].shape == (3, 3, 5, 7)


@pytest.mark.parametrize("kernel,strides,padding,dilation,use_bias", [
    ((3, 3), (2, 2), [(1, 1), (1, 1)], (1, 1), False),  # STDC's conv_avd
    ((3, 3), (1, 1), "SAME", (2, 2), True),
    ((3, 3), (2, 2), "SAME", (1, 1), False),  # flax's asymmetric stride-2 SAME
    ((3, 5), (1, 2), "VALID", (1, 1), True),
    ((5, 5), (3, 3), 2, (1, 2), False),
])
def test_depthwise_conv_equals_nn_conv(kernel, strides, padding, dilation, use_bias):
    """layers.Conv computes one-group-per-channel kernels as shifted, strided slices: same
    parameters, outputs and gradients as nn.Conv for every padding form, stride and dilation."""
    import flax.linen as nn
    x = _images(4, n=2, size=11, c=6)
    kwargs = dict(strides=strides, padding=padding, kernel_dilation=dilation, use_bias=use_bias,
                  feature_group_count=6)
    ours = layers.Conv(6, kernel, **kwargs)
    ref = nn.Conv(6, kernel, **kwargs)
    assert ours._is_depthwise(6)
    _assert_same_as_nn_conv(ours, ref, x, use_bias, grad_tol=1e-4)
    # Other groupings (two channels per group) are nn.Conv's.
    assert not layers.Conv(6, kernel, **dict(kwargs, feature_group_count=3))._is_depthwise(6)
