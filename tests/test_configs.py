"""Every config file loads with every preset, and every name in it resolves."""

import glob
import os

import pytest

from configs import common
from synseg_jax import methods
from synseg_jax.data import datasets, labels
from synseg_jax.images import NORMALIZATIONS
from synseg_jax.models import segmenters
from synseg_jax.recipe import load_config_file

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if os.path.basename(p) not in ("__init__.py", "common.py"))


def test_there_are_configs():
    assert {"source_only.py", "pretrain.py"} <= {os.path.basename(p) for p in CONFIG_FILES}


@pytest.mark.parametrize("preset", common.PRESETS)
@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_every_name_resolves(path, preset):
    config = load_config_file(path, preset)
    assert config.preset == preset
    assert config.method.name in methods.METHODS
    if config.method.name == "classifier":
        assert "resnet" in segmenters.CLASSIFIERS
    else:
        assert config.model.name in segmenters.SEGMENTERS
    d = config.data
    for name, split in [(d.source, d.source_split), (d.target, d.target_split),
                        (d.eval_dataset, d.eval_split)]:
        if name:
            datasets.check_split(name, split)
            labels.label_table(datasets.spec(name).label_table)
    for item in d.extra_eval_splits:
        datasets.check_split(*item.split("/"))
    assert d.normalization in NORMALIZATIONS
    assert config.model.bn_mode in ("frozen", "train")
    # Demo presets run on minicity; the paper presets on the real datasets.
    assert (d.source == "minicity") == (preset == "demo" or config.method.name == "classifier")


def test_unknown_key_and_bad_value_are_named():
    with pytest.raises(KeyError, match="train.stepz.*train.steps"):
        load_config_file(os.path.join(CONFIG_DIR, "source_only.py"), "demo,train.stepz=3")
    with pytest.raises(ValueError, match="'optim.seg.lr'"):
        load_config_file(os.path.join(CONFIG_DIR, "source_only.py"), "demo,optim.seg.lr=fast")
    with pytest.raises(ValueError, match="Unknown preset 'gta6'.*gta5"):
        load_config_file(os.path.join(CONFIG_DIR, "source_only.py"), "gta6")


def test_overrides_parse_to_the_field_type():
    config = load_config_file(os.path.join(CONFIG_DIR, "source_only.py"),
                              "gta5,data.crop=(256,512),optim.seg.lr=1,model.multi_level=True")
    assert config.data.crop == (256, 512)
    assert config.optim.seg.lr == 1.0 and isinstance(config.optim.seg.lr, float)
    assert config.model.multi_level is True
    assert config.data.source == "gta5"


def test_unknown_dataset_split_and_method_list_valid_ones():
    with pytest.raises(ValueError, match="valid splits.*real_val"):
        datasets.check_split("minicity", "real_test")
    with pytest.raises(ValueError, match="valid datasets.*minicity"):
        datasets.spec("minicty")
    config = load_config_file(os.path.join(CONFIG_DIR, "source_only.py"), "demo")
    config.unlock()
    config.method.name = "sourceonly"
    with pytest.raises(ValueError, match="valid methods.*source_only"):
        methods.build(config)


def test_short_key_names_the_one_field_it_ends_and_ambiguity_is_an_error():
    config = load_config_file(os.path.join(CONFIG_DIR, "road.py"), "gta5,dist=False,grid=(2,1)")
    assert config.method.dist is False and config.method.grid == (2, 1)
    # "name" ends both model.name and method.name: refused, listing both.
    with pytest.raises(KeyError, match="ambiguous.*model.name.*method.name|ambiguous.*method.name"):
        load_config_file(os.path.join(CONFIG_DIR, "road.py"), "gta5,name=road")
    with pytest.raises(KeyError, match="Unknown config key 'distt'"):
        load_config_file(os.path.join(CONFIG_DIR, "road.py"), "gta5,distt=False")


@pytest.mark.parametrize("name,style", [("deeplabv2", "caffe"), ("pspnet_r101", "torchvision")])
def test_empty_style_is_the_style_of_the_weights_each_segmenter_starts_from(name, style):
    """DeepLabV2 starts from DeepLab's Caffe-style init, PSPNet from torchvision's ResNet."""
    from synseg_jax.methods import base
    config = load_config_file(os.path.join(CONFIG_DIR, "road.py"), f"gta5,model.name={name}")
    assert config.model.style == ""
    assert base.segmenter_from_config(config.model).style == style
    config = load_config_file(os.path.join(CONFIG_DIR, "road.py"),
                              f"gta5,model.name={name},model.style=torchvision")
    assert base.segmenter_from_config(config.model).style == "torchvision"


@pytest.mark.parametrize("name,style", [("deeplabv2", "caffe"), ("pspnet_r101", "torchvision")])
def test_demo_pretraining_builds_the_style_its_segmenter_will_load(name, style):
    """With model.style empty, the demo backbone is pretrained (and its workdir keyed) in the style
    of the segmenter that loads it, never in the classifier's own default."""
    from synseg_jax import recipe
    from synseg_jax.methods import classifier
    config = load_config_file(os.path.join(CONFIG_DIR, "road.py"),
                              f"demo,model.name={name},model.style=")
    pre_config = recipe.pretrain_config(config)
    assert pre_config.model.style == style
    assert classifier.Classifier(pre_config).model.style == style
    assert f"_{style}_" in recipe.backbone_key(config)


def test_a_config_file_loads_from_any_working_directory(tmp_path):
    """Config files import `configs.common`; loading one must not depend on the cwd."""
    import subprocess
    import sys
    code = ("from synseg_jax.recipe import load_config_file; "
            f"print(load_config_file({os.path.join(CONFIG_DIR, 'road.py')!r}, 'demo').method.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("road")


def test_every_seed_shares_one_demo_pretraining_and_it_is_keyed_by_pretrain_seed():
    """The demo backbone stands in for ImageNet weights: a run's seed does not change it."""
    from synseg_jax import recipe
    path = os.path.join(CONFIG_DIR, "source_only.py")
    keys = {recipe.backbone_key(load_config_file(path, f"demo,seed={s}")) for s in (0, 1, 2)}
    assert len(keys) == 1
    assert recipe.pretrain_config(load_config_file(path, "demo,seed=2")).seed == 0
    other = load_config_file(path, "demo,pretrain.seed=1")
    assert recipe.backbone_key(other) not in keys and recipe.pretrain_config(other).seed == 1


def test_every_roles_initial_weights_path_is_made_absolute(tmp_path, monkeypatch):
    from synseg_jax import paths
    monkeypatch.chdir(tmp_path)
    config = load_config_file(os.path.join(CONFIG_DIR, "road.py"),
                              "demo,init.teacher.path=weights/teacher")
    assert config.init.seg.path == "demo"  # a keyword, not a path
    assert config.init.teacher.path == str(tmp_path / "weights" / "teacher")
    unlocked = load_config_file(os.path.join(CONFIG_DIR, "road.py"), "demo,init.seg.path=w/seg")
    paths.resolve_config_paths(unlocked)
    assert unlocked.init.seg.path == str(tmp_path / "w" / "seg")


def test_a_model_field_the_segmenter_does_not_take_is_an_error_not_ignored():
    path = os.path.join(CONFIG_DIR, "road.py")
    with pytest.raises(ValueError, match=r"model.multi_level is set, but segmenter "
                                         r"'deeplab_largefov_vgg16' has no such setting"):
        load_config_file(path, "gta5,model.multi_level=True")
    # Fields the segmenter takes, and presets that set fields for other segmenters, are fine.
    assert load_config_file(path, "gta5,model.width=0.5").model.width == 0.5
    assert load_config_file(path, "demo,model.name=bisenet_stdc813").model.name == "bisenet_stdc813"
    # Stage overrides are checked the same way.
    from synseg_jax import recipe
    config = load_config_file(os.path.join(CONFIG_DIR, "self_training.py"),
                              "demo,model.name=bisenet_stdc813")
    with config.unlocked():
        config.stages.adapt.overrides += ",model.depth=50"
    with pytest.raises(ValueError, match=r"model.depth is set, but segmenter 'bisenet_stdc813'"):
        recipe.stage_config(config, "/tmp/w", "adapt")


def test_each_paper_preset_names_its_upsampling_convention():
    """STDC-Seg's BiSeNet and AdaptSegNet's PyTorch 0.4 code upsample with align_corners=True."""
    assert load_config_file(os.path.join(CONFIG_DIR, "realtime_da.py"), "gta5").model.align_corners
    assert load_config_file(os.path.join(CONFIG_DIR, "adversarial.py"), "gta5").model.align_corners
    assert not load_config_file(os.path.join(CONFIG_DIR, "source_only.py"), "demo").model.align_corners
