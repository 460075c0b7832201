"""The ``python -m synseg_jax.import_weights`` command: files in, ``init.seg`` trees out.

Checkpoints here are tiny members of each family with the published key layouts (the numerics of
each layout are checked against PyTorch in test_weight_parity.py). ``.pth``/``.tar`` files need
torch to be written; ``.safetensors`` files need the ``safetensors`` package.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax import checkpoint, import_weights
from synseg_jax.methods import base
from synseg_jax.models import segmenters, weights
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
