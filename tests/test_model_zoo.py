"""The model zoo: VGG16 (FCN / DeepLab-LargeFOV), STDC, PSPNet, FCN-8s, BiSeNet-STDC.

Full-size parameter counts are checked against published figures or against arithmetic written out
here from the layer definitions; shapes and numerics run on tiny widths.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax.models import segmenters, stdc, vgg
from tests.model_init import abstract_init, count, host_init

# Small members of each family, for every registered segmenter (the factory test demands one).
TINY = {
    "deeplabv2": dict(width=0.125, stage_sizes=(1, 1, 1, 1)),
    "pspnet_r101": dict(width=0.125, stage_sizes=(1, 1, 1, 1)),
    "deeplab_largefov_vgg16": dict(width=1 / 16, stage_sizes=(1, 1, 1, 1, 1)),
    "fcn8s_vgg16": dict(width=1 / 16, stage_sizes=(1, 1, 1, 1, 1)),
    "bisenet_stdc813": dict(width=0.125, stage_sizes=(1, 1, 1)),
}


def _host_init(model, x, seed=0):
    return host_init(model, x, seed, bias_std=0.1)


def conv(k, c_in, c_out, bias=True):
    return k * k * c_in * c_out + (c_out if bias else 0)


def conv_bn(k, c_in, c_out):  # conv without bias + BN scale and bias
    return k * k * c_in * c_out + 2 * c_out


# ---------------------------------------------------------------------------------------------
# Full-size parameter counts

# torchvision's published VGG16 size (the `num_params` of VGG16_Weights.IMAGENET1K_V1) and
# ResNet-101 size (ResNet101_Weights.IMAGENET1K_V1), and their classifiers.
TORCHVISION_VGG16 = 138_357_544
VGG16_CLASSIFIER = conv(1, 512 * 7 * 7, 4096) + conv(1, 4096, 4096) + conv(1, 4096, 1000)
TORCHVISION_RESNET101 = 44_549_160
RESNET101_BACKBONE = TORCHVISION_RESNET101 - conv(1, 2048, 1000)  # minus fc


def test_vgg16_features_paramcount():
    # Thirteen 3×3 convs with bias, channel pairs of configuration D.
    pairs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    by_hand = sum(conv(3, a, b) for a, b in pairs)
    assert by_hand == TORCHVISION_VGG16 - VGG16_CLASSIFIER == 14_714_688
    _, variables = abstract_init(vgg.VGG("features"), (1, 33, 33, 3))
    assert count(variables["params"]) == by_hand
    assert sorted(variables) == ["params"]  # no BatchNorm


def test_fcn8s_paramcount():
    # FCN keeps VGG16 up to fc7 (fc6 = the 25088→4096 layer as a 7×7 conv) and swaps the
    # 1000-way fc8 for 1×1 scoring convs on fc7, pool4 and pool3: the paper's "134M" (Table 1).
    backbone = TORCHVISION_VGG16 - conv(1, 4096, 1000)
    assert backbone == 14_714_688 + conv(7, 512, 4096) + conv(1, 4096, 4096) == 134_260_544
    head = conv(1, 4096, 21) + conv(1, 512, 21) + conv(1, 256, 21)
    _, variables = abstract_init(segmenters.build_segmenter("fcn8s_vgg16", 21), (1, 33, 33, 3))
    assert count(variables["params"]["backbone"]) == backbone
    assert count(variables["params"]["head"]) == head == 102_207
    assert round((backbone + head) / 1e6) == 134


def test_deeplab_largefov_paramcount():
    # DeepLab v1 Table 2 lists DeepLab-LargeFOV (21 VOC classes) at 20.5M parameters.
    backbone = 14_714_688 + conv(3, 512, 1024) + conv(1, 1024, 1024)
    head = conv(1, 1024, 21)
    _, variables = abstract_init(segmenters.build_segmenter("deeplab_largefov_vgg16", 21))
    assert count(variables["params"]["backbone"]) == backbone == 20_483_904
    assert count(variables["params"]["head"]) == head
    assert round((backbone + head) / 1e5) == 205


def test_pspnet_r101_paramcount():
    # Pyramid pooling: four 1×1 ConvBN 2048 → 512; bottleneck 3×3 ConvBN (2048 + 4·512) → 512;
    # 1×1 classifier with bias.
    head = 4 * conv_bn(1, 2048, 512) + conv_bn(3, 4096, 512) + conv(1, 512, 19)
    _, variables = abstract_init(segmenters.build_segmenter("pspnet_r101", 19))
    assert count(variables["params"]["backbone"]) == RESNET101_BACKBONE == 42_500_160
    assert count(variables["params"]["head"]) == head == 23_083_539


def _catbottleneck(c_in, c_out, strided):
    n = conv_bn(1, c_in, c_out // 2) + conv_bn(3, c_out // 2, c_out // 4)
    n += conv_bn(3, c_out // 4, c_out // 8) + conv_bn(3, c_out // 8, c_out // 8)
    if strided:  # depthwise 3×3 (9 weights per channel) + BN
        n += 9 * (c_out // 2) + 2 * (c_out // 2)
    return n


def _stdc_backbone(stage_sizes):
    n = conv_bn(3, 3, 32) + conv_bn(3, 32, 64)
    c_in = 64
    for c_out, blocks in zip((256, 512, 1024), stage_sizes):
        for b in range(blocks):
            n += _catbottleneck(c_in, c_out, strided=b == 0)
            c_in = c_out
    return n


# The ImageNet tail of the released STDC classifiers: ConvX 1×1 1024→1024, fc 1024→1024 without
# bias, BatchNorm1d, fc 1024→1000 without bias.
STDC_CLASSIFIER_TAIL = conv_bn(1, 1024, 1024) + 1024 * 1024 + 2 * 1024 + 1024 * 1000


@pytest.mark.parametrize("name,published_m", [("stdc1", 8.44), ("stdc2", 12.47)])
def test_stdc_paramcount(name, published_m):
    # The STDC paper's ImageNet table: STDC1 (STDC813) 8.44M and STDC2 12.47M parameters for
    # the classifiers, i.e. backbone + the classifier tail above.
    stage_sizes = stdc.STAGE_SIZES[name]
    by_hand = _stdc_backbone(stage_sizes)
    _, variables = abstract_init(stdc.STDCNet(stage_sizes), (1, 33, 33, 3))
    assert count(variables["params"]) == by_hand
    assert round((by_hand + STDC_CLASSIFIER_TAIL) / 1e4) == round(published_m * 100)
    if name == "stdc1":
        assert by_hand == 5_318_304


def test_bisenet_stdc813_paramcount():
    c = 19
    arm = lambda c_in: conv_bn(3, c_in, 128) + 128 * 128 + 2 * 128  # noqa: E731
    head = (conv_bn(1, 1024, 128)                                # global context
            + arm(1024) + conv_bn(3, 128, 128)                   # ARM32, refine to stride 16
            + arm(512) + conv_bn(3, 128, 128)                    # ARM16, refine to stride 8
            + conv_bn(1, 256 + 128, 256) + 2 * 256 * 64          # FFM + SE (ratio 4, no bias)
            + conv_bn(3, 256, 256) + 256 * c                     # main output
            + 2 * (conv_bn(3, 128, 64) + 64 * c))                # two context outputs
    _, variables = abstract_init(segmenters.build_segmenter("bisenet_stdc813", c))
    assert count(variables["params"]["backbone"]) == 5_318_304
    assert count(variables["params"]["head"]) == head == 3_106_944


def test_full_size_parameter_table():
    """Prints every full-size segmenter's size at 19 classes (`pytest -s -k parameter_table`) and
    checks each total against the sum of the parts verified one by one above."""
    c = 19
    expected = {
        "deeplabv2": RESNET101_BACKBONE + 4 * conv(3, 2048, c),
        "pspnet_r101": RESNET101_BACKBONE + 4 * conv_bn(1, 2048, 512) + conv_bn(3, 4096, 512)
        + conv(1, 512, c),
        "deeplab_largefov_vgg16": 20_483_904 + conv(1, 1024, c),
        "fcn8s_vgg16": 134_260_544 + conv(1, 4096, c) + conv(1, 512, c) + conv(1, 256, c),
        "bisenet_stdc813": 5_318_304 + 3_106_944,
    }
    assert sorted(expected) == sorted(segmenters.SEGMENTERS)
    print(f"\n{'segmenter (19 classes)':<26}{'parameters':>14}")
    for name, want in expected.items():
        _, variables = abstract_init(segmenters.build_segmenter(name, c))
        got = count(variables["params"])
        print(f"{name:<26}{got:>14,}")
        assert got == want, name


# ---------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("variant,sizes", [
    # 321×321 (DeepLab's crop): ceil-mode pools. "largefov" gives DeepLab's 41×41 score map.
    ("features", (161, 81, 41, 21, 11)),
    ("fcn", (161, 81, 41, 21, 11)),
    ("largefov", (161, 81, 41, 41, 41)),
])
def test_vgg_variant_strides(variant, sizes):
    features, _ = abstract_init(vgg.VGG(variant, width=1 / 16), (1, 321, 321, 3))
    for b, (size, ch) in enumerate(zip(sizes, (4, 8, 16, 32, 32)), start=1):
        assert features[f"pool{b}"].shape == (1, size, size, ch), b
    fc7 = {"features": None, "fcn": 256, "largefov": 64}[variant]
    assert ("fc7" in features) == (fc7 is not None)
    if fc7:
        assert features["fc7"].shape == (1, sizes[-1], sizes[-1], fc7)


def _conv_dilations(model, shape):
    """(kernel size, dilation) of every conv in forward order, read off the traced program."""
    _, variables = abstract_init(model, shape)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
        variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    return [(eqn.invars[1].aval.shape[0], eqn.params["rhs_dilation"][0])
            for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"]


def test_largefov_dilations():
    got = _conv_dilations(vgg.VGG("largefov", width=1 / 16), (1, 33, 33, 3))
    # conv1_1 … conv4_3 plain, conv5_x dilation 2, fc6 3×3 dilation 12; fc7 is 1×1, which
    # layers.Conv computes as a matmul (no conv in the program).
    assert got == [(3, 1)] * 10 + [(3, 2)] * 3 + [(3, 12)]


def test_stdc_feature_shapes_and_block_structure():
    model = stdc.STDCNet(width=0.125)
    features, variables = abstract_init(model, (1, 64, 64, 3))
    want = {"stride2": (32, 4), "stride4": (16, 8), "stride8": (8, 32), "stride16": (4, 64),
            "stride32": (2, 128)}
    assert {k: (v.shape[1], v.shape[3]) for k, v in features.items()} == want
    block = variables["params"]["stage3_0"]
    assert sorted(block) == ["bn_avd", "branch0", "branch1", "branch2", "branch3", "conv_avd"]
    assert block["conv_avd"]["kernel"].shape == (3, 3, 1, 16)  # depthwise on the 16-ch branch 0
    assert [block[f"branch{i}"]["conv"]["kernel"].shape[-1] for i in range(4)] == [16, 8, 4, 4]
    assert "conv_avd" not in variables["params"]["stage3_1"]
    assert stdc.branch_widths(1024, 4) == [512, 256, 128, 128]


def test_catbottleneck_skip_is_avg_pool_counting_padding():
    block = stdc.CatBottleneck(16, strides=2)
    x = jax.random.normal(jax.random.key(0), (1, 7, 7, 5))
    variables = _host_init(block, x)
    out, state = block.apply(variables, x, train=False, capture_intermediates=True,
                             mutable=["intermediates"])
    first = np.asarray(state["intermediates"]["branch0"]["__call__"][0])[0]
    padded = np.pad(first, ((1, 1), (1, 1), (0, 0)))
    want = np.stack([np.stack([padded[2 * i:2 * i + 3, 2 * j:2 * j + 3].sum((0, 1)) / 9
                               for j in range(4)]) for i in range(4)])
    assert out.shape == (1, 4, 4, 16)
    np.testing.assert_allclose(np.asarray(out[0, :, :, :8]), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# PSPNet and BiSeNet pieces


@pytest.mark.parametrize("n_in,bins", [(9, 6), (9, 2), (5, 3), (4, 6), (7, 1)])
def test_adaptive_avg_pool_matches_pytorch_rule(n_in, bins):
    x = np.asarray(jax.random.normal(jax.random.key(n_in), (1, n_in, n_in + 2, 3)))

    def edges(n, i):  # PyTorch: [floor(i·n/b), ceil((i+1)·n/b))
        return (i * n) // bins, -(-((i + 1) * n) // bins)

    want = np.empty((1, bins, bins, 3))
    for i in range(bins):
        for j in range(bins):
            (r0, r1), (c0, c1) = edges(n_in, i), edges(n_in + 2, j)
            want[0, i, j] = x[0, r0:r1, c0:c1].mean((0, 1))
    got = segmenters.adaptive_avg_pool(jnp.asarray(x), bins)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_feature_fusion_is_se_gated_residual():
    ffm = segmenters.FeatureFusion(8)
    sp, cp = jnp.ones((1, 3, 3, 4)), jax.random.normal(jax.random.key(2), (1, 3, 3, 4))
    _, abstract = jax.eval_shape(lambda: ffm.init_with_output(jax.random.key(0), sp, cp,
                                                              train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                             abstract)
    variables["batch_stats"]["conv"]["bn"]["var"] = jnp.ones(8)
    out = ffm.apply(variables, sp, cp, train=False)
    p, s = variables["params"], variables["batch_stats"]["conv"]["bn"]
    f = jnp.concatenate([sp, cp], -1) @ p["conv"]["conv"]["kernel"][0, 0]
    f = (f - s["mean"]) / jnp.sqrt(1 + 1e-5) * p["conv"]["bn"]["scale"] + p["conv"]["bn"]["bias"]
    f = jax.nn.relu(f)
    a = jax.nn.relu(f.mean((1, 2)) @ p["se_reduce"]["kernel"][0, 0])
    a = jax.nn.sigmoid(a @ p["se_expand"]["kernel"][0, 0])[:, None, None]
    np.testing.assert_allclose(out, f * a + f, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Every segmenter: outputs, parameter tree, a real forward pass


# Output keys, and the stride of each logits output, per segmenter.
OUTPUTS = {
    "deeplabv2": {"logits": 8},
    "pspnet_r101": {"logits": 8},
    "deeplab_largefov_vgg16": {"logits": 8},
    "fcn8s_vgg16": {"logits": 8},
    "bisenet_stdc813": {"logits": 8, "aux_logits": 16, "aux_logits2": 8},
}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_segmenter_outputs_and_param_tree(name):
    out, variables = abstract_init(segmenters.build_segmenter(name, 7, **TINY[name]))
    assert set(out) == set(OUTPUTS[name]) | {"features"}
    for key, stride in OUTPUTS[name].items():
        # On 65×65 every backbone's stride-s map has ceil(65 / s) pixels a side.
        size = -(-65 // stride)
        assert out[key].shape == (1, size, size, 7), (key, out[key].shape)
    params = variables["params"]
    # Optimiser rules: the backbone sits under "backbone", everything else is a head.
    assert "backbone" in params and all("head" in k for k in params if k != "backbone")


@pytest.mark.parametrize("name", ["pspnet_r101", "fcn8s_vgg16", "deeplab_largefov_vgg16",
                                  "bisenet_stdc813"])
def test_segmenter_forward_in_train_mode(name):
    model = segmenters.build_segmenter(name, 5, bn_mode="train", **TINY[name])
    x = jax.random.normal(jax.random.key(3), (2, 33, 33, 3))
    variables = _host_init(model, x)
    # One jitted program compiles faster than the op-by-op eager apply of a whole network.
    out, updated = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}))(
            variables, x)
    for key, stride in OUTPUTS[name].items():
        assert out[key].shape == (2, -(-33 // stride), -(-33 // stride), 5)
        assert bool(jnp.all(jnp.isfinite(out[key])))
    assert ("batch_stats" in updated) == (name in ("pspnet_r101", "bisenet_stdc813"))


def test_dropout_needs_train_mode_and_a_dropout_rng():
    name = "deeplab_largefov_vgg16"
    model = segmenters.build_segmenter(name, 5, **TINY[name])
    x = jax.random.normal(jax.random.key(3), (1, 33, 33, 3))
    variables = _host_init(model, x)
    rngs = {"dropout": jax.random.key(0)}
    plain = model.apply(variables, x, train=True)["logits"]
    assert not np.allclose(plain, model.apply(variables, x, train=True, rngs=rngs)["logits"])
    np.testing.assert_array_equal(plain, model.apply(variables, x, train=False)["logits"])
    np.testing.assert_array_equal(
        plain, model.apply(variables, x, train=False, rngs=rngs)["logits"])
    no_dropout = segmenters.build_segmenter(name, 5, dropout_rate=0.0, **TINY[name])
    np.testing.assert_array_equal(
        plain, no_dropout.apply(variables, x, train=True, rngs=rngs)["logits"])


def test_pspnet_multi_level():
    out, variables = abstract_init(segmenters.build_segmenter(
        "pspnet_r101", 7, multi_level=True, **TINY["pspnet_r101"]))
    assert out["aux_logits"].shape == out["logits"].shape == (1, 9, 9, 7)
    assert {"head", "head_aux", "head_aux_classifier"} <= set(variables["params"])


# ---------------------------------------------------------------------------------------------
# Factories


def test_every_segmenter_has_a_tiny_config_and_builds():
    assert set(TINY) == set(segmenters.SEGMENTERS) == set(OUTPUTS)
    for name, kwargs in TINY.items():
        out, _ = abstract_init(segmenters.build_segmenter(name, 3, **kwargs))
        assert out["logits"].shape[-1] == 3


@pytest.mark.parametrize("name,kwargs,deepest", [
    ("vgg", dict(variant="largefov", width=1 / 16), "fc7"),
    ("stdc", dict(width=0.125), "stride32"),
])
def test_new_backbones_resolve(name, kwargs, deepest):
    features, _ = abstract_init(segmenters.build_backbone(name, **kwargs))
    assert deepest in features


def test_factories_reject_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match="bisenet_stdc813"):
        segmenters.build_segmenter("bisenet", 19)
    with pytest.raises(ValueError, match="variant"):
        abstract_init(vgg.VGG("deeplab"))
    with pytest.raises(ValueError, match="stage_sizes"):
        abstract_init(segmenters.build_segmenter("fcn8s_vgg16", 3, stage_sizes=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="stage_sizes"):
        abstract_init(stdc.STDCNet(stage_sizes=(2, 2)))


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_segmenter_rejects_a_bad_bn_mode(name):
    with pytest.raises(ValueError, match="bn_mode"):
        abstract_init(segmenters.build_segmenter(name, 3, bn_mode="sync", **TINY[name]))
