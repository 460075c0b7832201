"""PyTorch → Flax weight import, without torch: the state_dicts are written out by hand from
torchvision's module layout (names and OIHW shapes) for tiny members of each family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax.models import layers, segmenters, vgg, weights

RNG = np.random.default_rng(0)


def _random(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _bn(prefix, channels):
    return {f"{prefix}.weight": _random(channels), f"{prefix}.bias": _random(channels),
            f"{prefix}.running_mean": _random(channels),
            f"{prefix}.running_var": np.abs(_random(channels)) + 0.5,
            f"{prefix}.num_batches_tracked": np.array(7)}


def torchvision_resnet_state_dict(stage_sizes, stem, num_classes):
    """torchvision's Bottleneck ResNet: conv1/bn1, layer{s}.{b}.conv{1,2,3}/bn{1,2,3},
    layer{s}.0.downsample.{0,1}, fc; inner widths stem·(1, 2, 4, 8), outputs 4× those."""
    sd = {"conv1.weight": _random(stem, 3, 7, 7), **_bn("bn1", stem)}
    in_ch = stem
    for s, blocks in enumerate(stage_sizes, start=1):
        planes = stem * 2 ** (s - 1)
        for b in range(blocks):
            p = f"layer{s}.{b}"
            sd[f"{p}.conv1.weight"] = _random(planes, in_ch, 1, 1)
            sd[f"{p}.conv2.weight"] = _random(planes, planes, 3, 3)
            sd[f"{p}.conv3.weight"] = _random(4 * planes, planes, 1, 1)
            sd.update(_bn(f"{p}.bn1", planes), **_bn(f"{p}.bn2", planes),
                      **_bn(f"{p}.bn3", 4 * planes))
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = _random(4 * planes, in_ch, 1, 1)
                sd.update(_bn(f"{p}.downsample.1", 4 * planes))
            in_ch = 4 * planes
    sd["fc.weight"], sd["fc.bias"] = _random(num_classes, in_ch), _random(num_classes)
    return sd


# torchvision vgg16().features indices of the 13 convs (ReLUs and pools take the others).
VGG16_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG16_CONV_NAMES = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]


def torchvision_vgg16_state_dict(widths, fc):
    """features.{i}.weight/bias for the 13 convs, classifier.{0,3,6} = fc6, fc7, fc8."""
    sd, in_ch = {}, 3
    for index, name in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES):
        out = widths[int(name[4]) - 1]
        sd[f"features.{index}.weight"] = _random(out, in_ch, 3, 3)
        sd[f"features.{index}.bias"] = _random(out)
        in_ch = out
    for index, (n_out, n_in) in zip((0, 3, 6), [(fc, in_ch * 7 * 7), (fc, fc), (1000, fc)]):
        sd[f"classifier.{index}.weight"] = _random(n_out, n_in)
        sd[f"classifier.{index}.bias"] = _random(n_out)
    return sd


def _untouched(new, old):
    """Same leaves (the very objects), i.e. the import left this subtree alone."""
    return all(a is b for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True))


def _abstract_variables(model, shape=(1, 33, 33, 3)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _np_conv_bn(x, w, bn, stride, pad):
    """Direct cross-correlation of an HWC image with an OIHW weight, then eval-mode BatchNorm."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    k = w.shape[-1]
    h = (x.shape[0] - k) // stride + 1
    out = np.empty((h, h, w.shape[0]))
    for i in range(h):
        for j in range(h):
            patch = x[i * stride:i * stride + k, j * stride:j * stride + k]  # (k, k, in)
            out[i, j] = np.einsum("oihw,hwi->o", w, patch)
    scale = bn["weight"] / np.sqrt(bn["running_var"] + 1e-5)
    return (out - bn["running_mean"]) * scale + bn["bias"]


# ---------------------------------------------------------------------------------------------
# ResNet


def test_torchvision_resnet_classifier_import():
    model = segmenters.build_classifier("resnet", 10, stage_sizes=(1, 1, 1, 1), width=0.125,
                                        style="torchvision")
    sd = torchvision_resnet_state_dict((1, 1, 1, 1), stem=8, num_classes=10)
    out = weights.import_torchvision_resnet(sd, _abstract_variables(model), scope=())

    # Every leaf became a concrete array: the whole model came from the checkpoint.
    leaves = jax.tree.leaves(out)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert len(leaves) == sum(not k.endswith("num_batches_tracked") for k in sd)
    p, s = out["params"]["backbone"], out["batch_stats"]["backbone"]
    np.testing.assert_array_equal(p["layer3_0"]["conv2"]["conv"]["kernel"],
                                  sd["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["layer2_0"]["downsample"]["bn"]["scale"],
                                  sd["layer2.0.downsample.1.weight"])
    np.testing.assert_array_equal(s["layer4_0"]["conv3"]["bn"]["var"],
                                  sd["layer4.0.bn3.running_var"])
    np.testing.assert_array_equal(out["params"]["head"]["kernel"], sd["fc.weight"].T)

    # Numerics, not just names: the imported stem equals PyTorch's conv1 (7×7/2 pad 3) + bn1.
    x = _random(1, 13, 13, 3)
    stem = layers.ConvBN(8, 7, 2, relu=False)
    got = stem.apply({"params": p["stem"], "batch_stats": s["stem"]}, jnp.asarray(x), train=False)
    bn1 = {k.split(".")[1]: v for k, v in sd.items() if k.startswith("bn1.")}
    want = _np_conv_bn(x[0], sd["conv1.weight"], bn1, stride=2, pad=3)
    np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-4)


def test_torchvision_resnet_into_segmenter_backbone():
    model = segmenters.build_segmenter("deeplabv2", 19, stage_sizes=(1, 1, 1, 1), width=0.125,
                                       style="torchvision")
    variables = _abstract_variables(model)
    sd = torchvision_resnet_state_dict((1, 1, 1, 1), stem=8, num_classes=1000)
    out = weights.import_torchvision_resnet(sd, variables)  # fc is ignored
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(out["params"]["backbone"]))
    # The ASPP head is not in the checkpoint and comes back untouched.
    assert _untouched(out["params"]["head"], variables["params"]["head"])
    np.testing.assert_array_equal(out["batch_stats"]["backbone"]["stem"]["bn"]["mean"],
                                  sd["bn1.running_mean"])


def test_mismatches_are_listed():
    model = segmenters.build_segmenter("deeplabv2", 19, stage_sizes=(1, 1, 1, 1), width=0.125)
    sd = torchvision_resnet_state_dict((1, 1, 1, 1), stem=8, num_classes=1000)
    del sd["layer2.0.bn1.running_var"]
    sd["layer1.0.conv2.weight"] = _random(8, 8, 5, 5)
    sd["layer5.0.conv1.weight"] = _random(3, 3, 1, 1)
    with pytest.raises(ValueError) as err:
        weights.import_torchvision_resnet(sd, _abstract_variables(model))
    message = str(err.value)
    assert "3 problems" in message
    assert "missing: layer2.0.bn1.running_var (for batch_stats/backbone/layer2_0/conv1/bn/var" \
        in message
    assert "shape: layer1.0.conv2.weight (8, 8, 5, 5) → (5, 5, 8, 8), but " \
        "params/backbone/layer1_0/conv2/conv/kernel is (3, 3, 8, 8)" in message
    assert "unused: layer5.0.conv1.weight (3, 3, 1, 1)" in message

    # A wrong architecture produces many problems; the message shows the first few.
    big = torchvision_resnet_state_dict((1, 1, 1, 1), stem=16, num_classes=1000)
    with pytest.raises(ValueError, match=r"… and \d+ more"):
        weights.import_torchvision_resnet(big, _abstract_variables(model))


# ---------------------------------------------------------------------------------------------
# VGG16


WIDTHS = (4, 8, 16, 32, 32)  # VGG16 at width 1/16; fc layers 4096 / 16 = 256


def test_torchvision_vgg16_into_fcn8s():
    model = segmenters.build_segmenter("fcn8s_vgg16", 5, width=1 / 16)
    variables = _abstract_variables(model)
    sd = torchvision_vgg16_state_dict(WIDTHS, fc=256)
    out = weights.import_torchvision_vgg16(sd, variables, "fcn")
    p = out["params"]["backbone"]
    assert sorted(p) == sorted(VGG16_CONV_NAMES + ["fc6", "fc7"])
    for index, name in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES):
        np.testing.assert_array_equal(p[name]["kernel"],
                                      sd[f"features.{index}.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(p[name]["bias"], sd[f"features.{index}.bias"])
    # fc6 as a 7×7 conv over a 7×7 pool5 map equals the linear layer on torch's (C, H, W) flatten.
    z = _random(7, 7, 32)
    linear = sd["classifier.0.weight"] @ z.transpose(2, 0, 1).reshape(-1)
    as_conv = np.einsum("hwco,hwc->o", np.asarray(p["fc6"]["kernel"]), z)
    np.testing.assert_allclose(as_conv, linear, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(p["fc7"]["kernel"][0, 0], sd["classifier.3.weight"].T)
    assert _untouched(out["params"]["head"], variables["params"]["head"])


def test_torchvision_vgg16_into_largefov_keeps_fc_init():
    model = segmenters.build_segmenter("deeplab_largefov_vgg16", 5, width=1 / 16)
    variables = _abstract_variables(model)
    sd = torchvision_vgg16_state_dict(WIDTHS, fc=256)
    out = weights.import_torchvision_vgg16(sd, variables, "largefov")
    p = out["params"]["backbone"]
    np.testing.assert_array_equal(p["conv5_1"]["kernel"],
                                  sd["features.24.weight"].transpose(2, 3, 1, 0))
    # DeepLab's subsampled 1024-channel fc6/fc7 are not in torchvision's checkpoint.
    for fc in ("fc6", "fc7"):
        assert _untouched(p[fc], variables["params"]["backbone"][fc])


def test_vgg_naming_follows_stage_sizes():
    # VGG19 (2, 2, 4, 4, 4): conv5_1 is features.28 there (16 convs, 4 pools before it).
    naming = weights.torchvision_vgg_naming((2, 2, 4, 4, 4))
    assert naming(("conv5_1", "kernel")).key == "features.28.weight"
    assert naming(("conv3_4", "bias")).key == "features.16.bias"
    assert naming(("fc6", "kernel")) is None
    assert vgg.VGG16_STAGE_SIZES == (2, 2, 3, 3, 3)


# ---------------------------------------------------------------------------------------------
# DeepLabV2 init, STDC, BiSeNet (numerics against PyTorch: test_weight_parity.py)


def test_deeplab_init_names_and_prefix():
    naming = weights.deeplab_v2_naming()
    assert naming(("backbone", "stem", "conv", "kernel")).key == "Scale.conv1.weight"
    assert naming(("backbone", "layer3_22", "conv3", "bn", "var")).key == \
        "Scale.layer3.22.bn3.running_var"
    assert naming(("backbone", "layer1_0", "downsample", "conv", "kernel")).key == \
        "Scale.layer1.0.downsample.0.weight"
    assert naming(("head", "branch3", "bias")).key == "Scale.layer5.conv2d_list.3.bias"
    assert naming(("head_aux", "branch0", "bias")) is None
    sd = torchvision_resnet_state_dict((1, 1, 1, 1), stem=8, num_classes=10)
    scaled = {f"Scale.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    scaled["Scale.layer5.conv2d_list.0.weight"] = _random(21, 256, 3, 3)
    assert weights.detect_prefix(scaled, ("Scale.",)) == "Scale."
    assert weights.resnet_stage_sizes(scaled, "Scale.") == (1, 1, 1, 1)
    model = segmenters.build_segmenter("deeplabv2", 19, stage_sizes=(1, 1, 1, 1), width=0.125)
    variables = _abstract_variables(model)
    out = weights.import_deeplab_resnet(scaled, variables)  # layer5 ignored for the backbone
    np.testing.assert_array_equal(out["params"]["backbone"]["layer2_0"]["conv1"]["conv"]["kernel"],
                                  sd["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
    # A stripped copy (no "Scale.") works the same.
    stripped = weights.strip_prefix(scaled, "Scale.")
    out2 = weights.import_deeplab_resnet(stripped, variables)
    assert _untouched(out2["params"]["head"], variables["params"]["head"])
    # The whole model needs the ASPP to match: 21 classes in the file, 19 in the model.
    with pytest.raises(ValueError, match=r"shape: Scale.layer5.conv2d_list.0.weight"):
        weights.import_deeplab_resnet(scaled, variables, scope=())


def test_stdc_names_follow_stage_sizes():
    naming = weights.stdc_naming((2, 2, 2))
    assert naming(("convx1", "conv", "kernel")).key == "features.0.conv.weight"
    assert naming(("convx2", "bn", "mean")).key == "features.1.bn.running_mean"
    assert naming(("stage3_0", "branch0", "conv", "kernel")).key == \
        "features.2.conv_list.0.conv.weight"
    assert naming(("stage4_0", "conv_avd", "kernel")).key == "features.4.avd_layer.0.weight"
    assert naming(("stage5_1", "bn_avd", "var")).key == "features.7.avd_layer.1.running_var"
    # STDC2 (STDC1446): (4, 5, 3) blocks, so stage 5 starts at features.11.
    naming2 = weights.stdc_naming((4, 5, 3))
    assert naming2(("stage5_0", "branch3", "bn", "scale")).key == \
        "features.11.conv_list.3.bn.weight"
    # Depthwise conv: PyTorch (C, 1, 3, 3) → Flax (3, 3, 1, C).
    assert naming(("stage3_0", "conv_avd", "kernel")).transform(_random(16, 1, 3, 3)).shape == \
        (3, 3, 1, 16)


def test_stdcseg_bisenet_names():
    naming = weights.stdcseg_bisenet_naming()
    cases = {
        ("backbone", "convx1", "conv", "kernel"): "cp.backbone.features.0.conv.weight",
        ("head", "global_context", "bn", "scale"): "cp.conv_avg.bn.weight",
        ("head", "arm32", "conv", "conv", "kernel"): "cp.arm32.conv.conv.weight",
        ("head", "arm16", "conv_atten", "kernel"): "cp.arm16.conv_atten.weight",
        ("head", "arm16", "bn_atten", "mean"): "cp.arm16.bn_atten.running_mean",
        ("head", "refine32", "conv", "kernel"): "cp.conv_head32.conv.weight",
        ("head", "ffm", "conv", "bn", "bias"): "ffm.convblk.bn.bias",
        ("head", "ffm", "se_reduce", "kernel"): "ffm.conv1.weight",
        ("head", "out", "classifier", "kernel"): "conv_out.conv_out.weight",
        # STDC-Seg's conv_out32 reads the stride-16 context feature, conv_out16 the stride-8 one.
        ("head", "out_ctx16", "conv", "conv", "kernel"): "conv_out32.conv.conv.weight",
        ("head", "out_ctx8", "classifier", "kernel"): "conv_out16.conv_out.weight",
    }
    for path, key in cases.items():
        assert naming(path).key == key, path
