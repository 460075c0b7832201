"""The ``python -m synseg_jax.import_weights`` command: files in, ``init.seg`` trees out.

Checkpoints here are tiny members of each family with the published key layouts (the numerics of
each layout are checked against PyTorch in test_weight_parity.py; those of the two whole trained
models, AdaptSegNet's multi-level DeepLabV2 and STDC-Seg's BiSeNet with InPlace-ABN, here). ``.pth``/``.tar`` files need
torch to be written; ``.safetensors`` files need the ``safetensors`` package.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax import checkpoint, import_weights, trees
from synseg_jax.methods import base
from synseg_jax.models import layers, segmenters, weights
from synseg_jax.state import RoleState

RNG = np.random.default_rng(0)


def fake_state_dict(model, naming, scope=("backbone",), shape=(1, 65, 65, 3), extra=()):
    """Random tensors under the PyTorch names ``naming`` gives the model's leaves (OIHW convs),
    plus ``extra`` (name, shape) pairs such as an ImageNet classifier."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = tuple(str(k.key) for k in path)[1:]
        if keys[:len(scope)] != tuple(scope) or (source := naming(keys[len(scope):])) is None:
            continue
        value = RNG.normal(size=leaf.shape).astype(np.float32)
        if keys[-1] == "var":
            value = np.abs(value) + 0.5
        if len(leaf.shape) == 4:  # Flax HWIO → PyTorch OIHW
            value = value.transpose(3, 2, 0, 1)
        sd[source.key] = value
    sd.update({name: RNG.normal(size=s).astype(np.float32) for name, s in extra})
    return sd


def save_pth(sd, path, wrap=None):
    torch = pytest.importorskip("torch", reason="writing .pth files needs PyTorch")
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    torch.save(wrap(tensors) if wrap else tensors, str(path))
    return str(path)


def run_cli(capsys, *args):
    assert import_weights.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


TINY_RESNET = dict(stage_sizes=(1, 1, 1, 1), width=0.125)


def test_torchvision_resnet_cli_loads_as_init_weights(tmp_path, capsys):
    model = segmenters.build_segmenter("pspnet_r101", 19, style="torchvision", **TINY_RESNET)
    sd = fake_state_dict(model, weights.torchvision_resnet_naming,
                         extra=[("fc.weight", (1000, 256)), ("fc.bias", (1000,))])
    src = save_pth(sd, tmp_path / "resnet50.pth")
    out = run_cli(capsys, "--format=torchvision_resnet50", f"--src={src}",
                  f"--dst={tmp_path / 'r50'}", "--stage-sizes=1,1,1,1", "--width=0.125")
    assert "--config.init.seg.path=" in out and "--config.model.style=torchvision" in out

    loaded = checkpoint.load_variables(str(tmp_path / "r50"))
    assert sorted(loaded) == ["batch_stats", "params"]
    np.testing.assert_array_equal(loaded["params"]["layer3_0"]["conv2"]["conv"]["kernel"],
                                  sd["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded["batch_stats"]["stem"]["bn"]["var"],
                                  sd["bn1.running_var"])
    # What train.py does with init.seg.path / init.seg.scope="backbone".
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
    role = RoleState(zeros.pop("params"), zeros, None)
    role = base.with_pretrained(role, loaded, "backbone", None)
    assert_tree_equal(role.params["backbone"], loaded["params"])
    assert_tree_equal(role.collections["batch_stats"]["backbone"], loaded["batch_stats"])


def test_existing_destination_is_refused_unless_overwrite(tmp_path, capsys):
    """Writing weights into a run's folder would delete the run: refused, the folder untouched."""
    model = segmenters.build_segmenter("pspnet_r101", 19, style="torchvision", **TINY_RESNET)
    src = save_pth(fake_state_dict(model, weights.torchvision_resnet_naming,
                                   extra=[("fc.weight", (1000, 256)), ("fc.bias", (1000,))]),
                   tmp_path / "resnet50.pth")
    run = tmp_path / "runs" / "gta5"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    args = ["--format=torchvision_resnet50", f"--src={src}", f"--dst={run}",
            "--stage-sizes=1,1,1,1", "--width=0.125"]
    with pytest.raises(FileExistsError, match=r"gta5 is not empty \(it holds checkpoints, "
                                              r"config.json\).*--overwrite"):
        import_weights.main(args)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json"]
    run_cli(capsys, *args, "--overwrite")
    assert checkpoint.load_variables(str(run))["params"]


def test_wrong_depth_is_reported(tmp_path):
    model = segmenters.build_segmenter("pspnet_r101", 19, **TINY_RESNET)
    src = save_pth(fake_state_dict(model, weights.torchvision_resnet_naming), tmp_path / "r.pth")
    with pytest.raises(ValueError, match=r"expects blocks per stage \(3, 4, 23, 3\), but the "
                                         r"file has \(1, 1, 1, 1\): wrong --format"):
        import_weights.main(["--format=torchvision_resnet101", f"--src={src}",
                             f"--dst={tmp_path / 'x'}"])
    with pytest.raises(ValueError, match="state_dict does not match the model"):  # wrong width
        import_weights.main(["--format=torchvision_resnet101", f"--src={src}",
                             f"--dst={tmp_path / 'x'}", "--stage-sizes=1,1,1,1", "--width=0.25"])


def test_deeplab_init_cli_backbone_and_whole_model(tmp_path, capsys):
    model = segmenters.build_segmenter("deeplabv2", 21, **TINY_RESNET)
    sd = fake_state_dict(model, weights.deeplab_v2_naming(), scope=())
    assert "Scale.layer5.conv2d_list.3.weight" in sd and "Scale.layer1.0.downsample.0.weight" in sd
    src = save_pth(sd, tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth")

    # Default: the backbone, ASPP ignored (19-class configs cannot use the init's classifier).
    run_cli(capsys, "--format=deeplab_resnet101_init", f"--src={src}", f"--dst={tmp_path / 'b'}",
            "--stage-sizes=1,1,1,1", "--width=0.125")
    backbone = checkpoint.load_variables(str(tmp_path / "b"))
    np.testing.assert_array_equal(backbone["params"]["layer4_0"]["conv1"]["conv"]["kernel"],
                                  sd["Scale.layer4.0.conv1.weight"].transpose(2, 3, 1, 0))
    assert "head" not in backbone["params"]

    # --scope= : the whole DeepLabV2, class count read from layer5.
    out = run_cli(capsys, "--format=deeplab_resnet101_init", f"--src={src}",
                  f"--dst={tmp_path / 'all'}", "--stage-sizes=1,1,1,1", "--width=0.125",
                  "--scope=")
    assert "--config.model.num_classes=21" in out
    whole = checkpoint.load_variables(str(tmp_path / "all"))
    assert sorted(whole["params"]) == ["backbone", "head"]
    np.testing.assert_array_equal(whole["params"]["head"]["branch2"]["bias"],
                                  sd["Scale.layer5.conv2d_list.2.bias"])
    assert_tree_equal(whole["params"]["backbone"], backbone["params"])


def test_vgg16_largefov_keeps_fc_initialisation(tmp_path, capsys):
    model = segmenters.build_segmenter("fcn8s_vgg16", 19, width=1 / 16)
    sd = fake_state_dict(model, weights.torchvision_vgg_naming(), shape=(1, 33, 33, 3),
                         extra=[("classifier.0.weight", (256, 32 * 49)),
                                ("classifier.0.bias", (256,)), ("classifier.3.weight", (256, 256)),
                                ("classifier.3.bias", (256,)), ("classifier.6.weight", (1000, 256)),
                                ("classifier.6.bias", (1000,))])
    src = save_pth(sd, tmp_path / "vgg16.pth")
    out = run_cli(capsys, "--format=torchvision_vgg16", f"--src={src}",
                  f"--dst={tmp_path / 'fcn'}", "--width=0.0625")
    fcn = checkpoint.load_variables(str(tmp_path / "fcn"))
    assert sorted(fcn) == ["params"]  # VGG16 has no BatchNorm
    np.testing.assert_array_equal(fcn["params"]["fc7"]["kernel"][0, 0],
                                  sd["classifier.3.weight"].T)
    out = run_cli(capsys, "--format=torchvision_vgg16", f"--src={src}",
                  f"--dst={tmp_path / 'lfov'}", "--width=0.0625",
                  "--model=deeplab_largefov_vgg16")
    assert "are freshly initialised: params/fc6/bias" in out
    lfov = checkpoint.load_variables(str(tmp_path / "lfov"))
    assert lfov["params"]["fc6"]["kernel"].shape == (3, 3, 32, 64)  # 1024 / 16, dilation 12
    assert np.abs(lfov["params"]["fc6"]["kernel"]).max() > 0  # a real initialisation
    np.testing.assert_array_equal(lfov["params"]["conv5_3"]["bias"], sd["features.28.bias"])


def test_stdc813_tar_cli(tmp_path, capsys):
    model = segmenters.build_segmenter("bisenet_stdc813", 19, width=0.25)
    sd = fake_state_dict(model, weights.stdc_naming(), shape=(1, 64, 64, 3),
                         extra=[("linear.weight", (1000, 1024)), ("bn.running_mean", (1024,))])
    sd["x8.0.2.conv_list.0.conv.weight"] = sd["features.2.conv_list.0.conv.weight"]  # alias
    # The published tar holds more than weights; DataParallel prefixes "module.".
    src = save_pth(sd, tmp_path / "STDCNet813M_73.91.tar",
                   wrap=lambda t: {"epoch": 250, "best_prec1": 73.91,
                                   "state_dict": {f"module.{k}": v for k, v in t.items()}})
    run_cli(capsys, "--format=stdc813", f"--src={src}", f"--dst={tmp_path / 'stdc'}",
            "--width=0.25")
    loaded = checkpoint.load_variables(str(tmp_path / "stdc"))
    np.testing.assert_array_equal(loaded["params"]["stage4_0"]["conv_avd"]["kernel"],
                                  sd["features.4.avd_layer.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded["batch_stats"]["stage5_1"]["branch3"]["bn"]["mean"],
                                  sd["features.7.conv_list.3.bn.running_mean"])


def test_timm_safetensors_cli(tmp_path, capsys):
    save_file = pytest.importorskip("safetensors.numpy", reason="needs `safetensors`").save_file
    model = segmenters.build_segmenter("pspnet_r101", 19, **TINY_RESNET)
    sd = fake_state_dict(model, weights.torchvision_resnet_naming,
                         extra=[("fc.weight", (1000, 256)), ("fc.bias", (1000,))])
    src = tmp_path / "model.safetensors"
    save_file(sd, str(src))
    with pytest.raises(ValueError, match=r"neither ResNet-50 .* nor -101"):
        import_weights.main(["--format=timm_safetensors", f"--src={src}",
                             f"--dst={tmp_path / 'x'}"])
    run_cli(capsys, "--format=timm_safetensors", f"--src={src}", f"--dst={tmp_path / 'timm'}",
            "--stage-sizes=1,1,1,1", "--width=0.125")
    loaded = checkpoint.load_variables(str(tmp_path / "timm"))
    np.testing.assert_array_equal(loaded["params"]["layer2_0"]["downsample"]["bn"]["bias"],
                                  sd["layer2.0.downsample.1.bias"])


class NotATensor:
    """Pickled as a reference to this module: a weights-only load must refuse it."""


def test_pth_is_loaded_weights_only(tmp_path):
    torch = pytest.importorskip("torch", reason="writing .pth files needs PyTorch")
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": NotATensor()}, str(path))
    with pytest.raises(ValueError, match="weights-only") as err:
        weights.load_tensor_file(str(path))
    assert "NotATensor" in str(err.value)  # what was refused is named
    assert "state_dict()" in str(err.value)  # ... with safe advice, never torch's
    assert "weights_only` set to `False`" not in str(err.value) and "add_safe_globals" not in str(
        err.value)


def test_random_bytes_are_refused_without_unsafe_advice(tmp_path):
    pytest.importorskip("torch", reason="reading .pth files needs PyTorch")
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ValueError, match=r"random\.pth as a weights-only") as err:
        weights.load_tensor_file(str(path))
    assert "False" not in str(err.value) and "trusted source" not in str(err.value)


def test_missing_torch_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "resnet50.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch → ImportError
    with pytest.raises(ImportError, match="needs torch, an optional dependency"):
        weights.load_tensor_file(str(path))
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        weights.load_tensor_file(str(tmp_path / "absent.pth"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="does not fit torchvision_vgg16"):
        import_weights.convert("torchvision_vgg16", "x.pth", model_name="deeplabv2")
    with pytest.raises(ValueError, match="holds no segmentation head"):
        import_weights.convert("stdc813", "x.tar", scope=())


def _printed_overrides(out: str) -> list[str]:
    """The `--config.key=value` flags the CLI printed, as `key=value` config overrides."""
    flags = [t for t in out.split() if t.startswith("--config.")]
    return [f[len("--config."):].replace("'", "") for f in flags]


@pytest.mark.parametrize("scope,extra", [("backbone", []), ("", ["--aspp-two-branch"])])
def test_printed_flags_load_as_they_stand_over_the_demo_preset(tmp_path, capsys, scope, extra):
    """The flags, given after the demo preset (whose stage sizes and ASPP differ), build a model
    the weights fit: stage sizes and the two-branch ASPP are printed, not left to the preset."""
    from configs import source_only  # noqa: PLC0415

    model = segmenters.build_segmenter("deeplabv2", 19, aspp_two_branch=bool(extra),
                                       stage_sizes=(3, 4, 23, 3), width=0.0625)
    sd = fake_state_dict(model, weights.deeplab_v2_naming(), scope=())
    src = save_pth(sd, tmp_path / "init.pth")
    # ResNet-101's own sizes, which once printed as model.depth=101 alone.
    out = run_cli(capsys, "--format=deeplab_resnet101_init", f"--src={src}",
                  f"--dst={tmp_path / 'w'}", "--width=0.0625", f"--scope={scope}", *extra)
    config = source_only.get_config(",".join(["demo", *_printed_overrides(out)]))
    assert tuple(config.model.stage_sizes) == (3, 4, 23, 3)
    built = base.segmenter_from_config(config.model)
    role = base.init_role(built, jax.random.PRNGKey(0), jnp.zeros((1, 33, 33, 3)), None)
    loaded = checkpoint.load_variables(config.init.seg.path)
    base.with_pretrained(role, loaded, config.init.seg.scope, None)  # raises if it does not fit


# ---------------------------------------------------------------------------------------------
# Whole trained models: AdaptSegNet's multi-level DeepLabV2, STDC-Seg's BiSeNet.


def _fits(config, loaded) -> None:
    """The segmenter `config.model` builds takes `loaded` whole, as train.py would load it."""
    built = base.segmenter_from_config(config.model)
    role = jax.eval_shape(lambda: base.init_role(built, jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 33, 33, 3)), None))
    base.with_pretrained(role, loaded, config.init.seg.scope, None)  # raises if it does not fit
    assert trees.shapes(role.collections) == trees.shapes(
        {k: v for k, v in loaded.items() if k != "params"})


def _aspp_in_torch(features, sd, layer, rates):
    """AdaptSegNet's Classifier_Module on NHWC `features`: the dilated 3×3 convs with bias of
    `layer`.conv2d_list, summed (its forward returns after the first two)."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(np.asarray(features).transpose(0, 3, 1, 2).copy())
    out = sum(torch.nn.functional.conv2d(
        x, torch.from_numpy(sd[f"{layer}.conv2d_list.{i}.weight"]),
        torch.from_numpy(sd[f"{layer}.conv2d_list.{i}.bias"]), padding=r, dilation=r)
        for i, r in enumerate(rates))
    return out.numpy().transpose(0, 2, 3, 1)


def test_adaptsegnet_multi_level_import(tmp_path, capsys):
    """layer6 (on layer4) is the main head, layer5 (on layer3) the auxiliary one; the printed
    flags give the multi-level, two-branch model over the demo preset."""
    from configs import source_only  # noqa: PLC0415

    four_branch = segmenters.build_segmenter("deeplabv2", 7, multi_level=True, **TINY_RESNET)
    sd = fake_state_dict(four_branch, weights.deeplab_v2_naming("", weights.DEEPLAB_MULTI_HEADS),
                         scope=())
    # The names pin the layers: 1024·w channels into layer5 (layer3's), 2048·w into layer6.
    assert sd["layer5.conv2d_list.3.weight"].shape[1] == 128
    assert sd["layer6.conv2d_list.3.weight"].shape[1] == 256
    src = save_pth(sd, tmp_path / "GTA2Cityscapes_multi-ed35151c.pth")
    tiny = ("--stage-sizes=1,1,1,1", "--width=0.125")
    out = run_cli(capsys, "--format=adaptsegnet_deeplab_multi", f"--src={src}",
                  f"--dst={tmp_path / 'multi'}", *tiny)
    for flag in ("init.seg.scope=''", "model.multi_level=True", "model.aspp_two_branch=True",
                 "model.num_classes=7", "model.stage_sizes='(1,1,1,1)'"):
        assert f"--config.{flag}" in out
    loaded = checkpoint.load_variables(str(tmp_path / "multi"))
    assert sorted(loaded["params"]) == ["backbone", "head", "head_aux"]
    assert sorted(loaded["params"]["head"]) == ["branch0", "branch1"]
    layer3 = loaded["params"]["backbone"]["layer3_0"]
    np.testing.assert_array_equal(layer3["conv1"]["conv"]["kernel"],
                                  sd["layer3.0.conv1.weight"].transpose(2, 3, 1, 0))

    config = source_only.get_config(",".join(["demo", *_printed_overrides(out)]))
    _fits(config, loaded)
    model = base.segmenter_from_config(config.model)
    result = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        loaded, jnp.asarray(RNG.normal(size=(1, 33, 33, 3)), jnp.float32))
    features = result["features"]
    for output, layer, feature in (("logits", "layer6", "layer4"),
                                   ("aux_logits", "layer5", "layer3")):
        want = _aspp_in_torch(features[feature], sd, layer, (6, 12))
        np.testing.assert_allclose(result[output], want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())

    # The same file under DataParallel's and the init's prefixes, and ADVENT's four-branch sum.
    prefixed = save_pth({f"module.Scale.{k}": v for k, v in sd.items()}, tmp_path / "p.pth")
    variables, config_fields, kept = import_weights.convert(
        "adaptsegnet_deeplab_multi", prefixed, width=0.125, stage_sizes=(1, 1, 1, 1),
        aspp_two_branch=False)
    assert not kept and config_fields["aspp_two_branch"] is False
    np.testing.assert_array_equal(variables["params"]["head_aux"]["branch3"]["kernel"],
                                  sd["layer5.conv2d_list.3.weight"].transpose(2, 3, 1, 0))
    assert_tree_equal(variables["params"]["backbone"], loaded["params"]["backbone"])
    backbone, _, _ = import_weights.convert("adaptsegnet_deeplab_multi", prefixed, width=0.125,
                                            stage_sizes=(1, 1, 1, 1), scope=("backbone",))
    assert_tree_equal(backbone["params"], loaded["params"]["backbone"])

    single = save_pth({k: v for k, v in sd.items() if not k.startswith("layer6.")},
                      tmp_path / "init.pth")
    with pytest.raises(ValueError, match=r"needs its classifier, but "
                                         r"layer6\.conv2d_list\.0\.weight is missing"):
        import_weights.convert("adaptsegnet_deeplab_multi", single, width=0.125,
                               stage_sizes=(1, 1, 1, 1))


def inplace_abn(channels: int, eps: float = 1e-5):
    """A PyTorch module with InPlace-ABN's tensors (weight, bias; running_mean, running_var) and
    its eval-mode forward, (x - mean) / sqrt(var + eps) · (|weight| + eps) + bias, with the
    activation STDC-Seg gives it: none."""
    torch = pytest.importorskip("torch", reason="needs PyTorch")

    class InPlaceABN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(channels))
            self.bias = torch.nn.Parameter(torch.zeros(channels))
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))

        def forward(self, x):
            def per_channel(v):
                return v[None, :, None, None]
            scale = (self.weight.abs() + eps) * torch.rsqrt(self.running_var + eps)
            centred = x - per_channel(self.running_mean)
            return centred * per_channel(scale) + per_channel(self.bias)

    return InPlaceABN()


def test_inplace_abn_scale_gives_pytorch_output():
    """STDC-Seg's ConvBNReLU (conv, InPlace-ABN without activation, ReLU) with negative γ equals
    ``ConvBN`` with γ → |γ| + eps; γ copied as a plain BN scale does not."""
    torch = pytest.importorskip("torch", reason="needs PyTorch")
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
    norm = inplace_abn(6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([-1.5, 0.7, -0.2, 1.1, -0.9, 0.4]))
        for tensor in (norm.bias, norm.running_mean):
            tensor.normal_(0.0, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 3, 9, 9)
        want = torch.relu(norm(conv(x))).numpy().transpose(0, 2, 3, 1)

    kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)

    def flax_output(scale):
        variables = {"params": {"conv": {"kernel": kernel},
                                "bn": {"scale": scale, "bias": norm.bias.detach().numpy()}},
                     "batch_stats": {"bn": {"mean": norm.running_mean.numpy(),
                                            "var": norm.running_var.numpy()}}}
        return np.asarray(layers.ConvBN(6).apply(variables, x.numpy().transpose(0, 2, 3, 1),
                                                 train=False))

    gamma = norm.weight.detach().numpy()
    np.testing.assert_allclose(flax_output(weights.inplace_abn_scale(gamma)), want,
                               rtol=1e-5, atol=1e-5)
    assert np.abs(flax_output(gamma) - want).max() > 0.1


def test_stdcseg_bisenet_import_matches_pytorch(tmp_path, capsys):
    """A whole STDC-Seg checkpoint (InPlace-ABN head with negative γ, plain-BN backbone with
    negative γ too, detail heads, backbone aliases) through the CLI gives PyTorch's three
    outputs; its printed flags build a model the weights fit."""
    torch = pytest.importorskip("torch", reason="needs PyTorch")
    from configs import source_only  # noqa: PLC0415
    from tests.test_weight_parity import BiSeNet, assert_close, randomize  # noqa: PLC0415

    torch.manual_seed(0)
    net = randomize(BiSeNet(16, 5, c=32, fused=64, mid=16))  # our BiSeNet at width 0.25
    signs = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, module in list(net.named_modules()):
            if not isinstance(module, torch.nn.BatchNorm2d):
                continue
            flip = torch.where(torch.rand(module.num_features, generator=signs) < 0.5, -1.0, 1.0)
            flip[0] = -1.0
            module.weight.mul_(flip)
            if name.startswith(weights.STDCSEG_BACKBONE_PREFIX):
                continue  # STDC-Seg's backbone keeps nn.BatchNorm2d
            abn = inplace_abn(module.num_features)
            for tensor in ("weight", "bias", "running_mean", "running_var"):
                getattr(abn, tensor).copy_(getattr(module, tensor))
            parent, attribute = name.rsplit(".", 1)
            setattr(net.get_submodule(parent), attribute, abn)
        x = torch.randn(1, 3, 64, 96)
        want = net(x)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    # STDC-Seg's layout: the head's InPlace-ABN tensors, the backbone's slice aliases.
    assert {"cp.arm16.bn_atten.running_var", "cp.backbone.x32.0.7.conv_list.0.bn.weight"} <= set(sd)
    detail = {f"conv_out_sp{s}.{k}": RNG.normal(size=shape).astype(np.float32)
              for s in (2, 4, 8, 16) for k, shape in (("conv.conv.weight", (16, 8, 3, 3)),
                                                      ("conv.bn.weight", (16,)),
                                                      ("conv_out.weight", (1, 16, 1, 1)))}
    src = save_pth({**sd, **detail}, tmp_path / "model_maxmIOU75.pth")
    out = run_cli(capsys, "--format=stdcseg_bisenet", f"--src={src}",
                  f"--dst={tmp_path / 'stdc1_seg'}", "--width=0.25")
    assert "--config.model.num_classes=5" in out and "--config.init.seg.scope=''" in out
    loaded = checkpoint.load_variables(str(tmp_path / "stdc1_seg"))

    gamma = sd["cp.arm16.bn_atten.weight"]
    assert gamma.min() < 0
    np.testing.assert_array_equal(loaded["params"]["head"]["arm16"]["bn_atten"]["scale"],
                                  np.abs(gamma) + np.float32(1e-5))
    np.testing.assert_array_equal(loaded["params"]["backbone"]["convx1"]["bn"]["scale"],
                                  sd["cp.backbone.features.0.bn.weight"])
    assert sd["cp.backbone.features.0.bn.weight"].min() < 0
    backbone, _, _ = import_weights.convert("stdcseg_bisenet", src, width=0.25,
                                            scope=("backbone",))
    assert_tree_equal(backbone, {c: v["backbone"] for c, v in loaded.items()})

    config = source_only.get_config(",".join(["demo", *_printed_overrides(out)]))
    _fits(config, loaded)
    model = base.segmenter_from_config(config.model)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    image = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    got = forward(loaded, image)
    for key, want_output in zip(("logits", "aux_logits", "aux_logits2"), want):
        assert_close(got[key], want_output, f"STDC-Seg {key}")
    # Read as plain BatchNorm, the negative γ flip channels: the output is far off.
    as_batch_norm = weights.import_stdcseg_bisenet(sd, loaded)
    wrong, right = np.asarray(forward(as_batch_norm, image)["logits"]), np.asarray(got["logits"])
    assert np.abs(wrong - right).max() > 0.1 * np.abs(right).max()


def test_stdcseg_bisenet_depth_is_read_from_the_file(tmp_path):
    """STDC2-Seg (12 CatBottlenecks) imports as (4, 5, 3); a count neither network has fails."""
    model = segmenters.build_segmenter("bisenet_stdc813", 3, stage_sizes=(4, 5, 3), width=0.25)
    sd = fake_state_dict(model, weights.stdcseg_bisenet_naming((4, 5, 3)), scope=(),
                         shape=(1, 64, 64, 3))
    src = save_pth(sd, tmp_path / "stdc2.pth")
    _, config, kept = import_weights.convert("stdcseg_bisenet", src, width=0.25)
    assert config["stage_sizes"] == (4, 5, 3) and config["num_classes"] == 3 and not kept
    last_block = "cp.backbone.features.13."
    src = save_pth({k: v for k, v in sd.items() if not k.startswith(last_block)},
                   tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"has 11 CatBottlenecks, neither STDC1 \(6\) nor STDC2"):
        import_weights.convert("stdcseg_bisenet", src, width=0.25)
