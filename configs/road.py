"""ROAD: target-guided distillation + spatial-aware adaptation (Chen, Li & Van Gool, CVPR 2018).

    python -m synseg_jax.main --config=configs/road.py --workdir=runs/road            # demo
    python -m synseg_jax.main --config=configs/road.py:gta5 --workdir=...             # DeepLab-VGG16
    python -m synseg_jax.main --config=configs/road.py:gta5,model.name=pspnet_r101 --workdir=...

PSPNet starts from torchvision's ImageNet ResNet-101 (model.style "" picks its torchvision style).

Ablations (Table 1, Figs. 4 and 6) are method keys: `method.dist=False` ("spt" only),
`method.spt=False` ("dst" only), both False (NonAdapt), `method.dist_domain=source` (source
distillation), `method.dist=False,method.spt=False,optim.seg.frozen_prefixes=(...)` (frozen first
layers; prefixes are compared component-wise, e.g. ("backbone/stem", "backbone/layer1_0") for the
demo ResNet, ("backbone/conv1_1", "backbone/conv1_2", ...) for VGG), `method.grid=(2,1)` etc.
A key without dots names the one field it ends (`road.py:gta5,dist=False,grid=(2,2)`).
benchmarks/road_ablation.py runs that table on the demo.
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.method.name = "road"
    m = config.method
    m.dist = True  # target-guided distillation on (Sec. 3.1; Table 1 "dst")
    m.dist_domain = "target"  # real images are distilled (Sec. 3.1); "source" is Sec. 4.3's "sd"
    m.dist_layer = ""  # paper silent on the layer: the backbone's last map (VGG: pool5, see road.py)
    m.lambda_dist = 0.1  # lambda_1 (Sec. 3.3)
    # The teacher is the segmenter's initial (pretrained) backbone (Sec. 3.1); a path here
    # distils to another file's backbone instead (its whole tree: scope "").
    config.init.teacher = common.init_section()
    m.spt = True  # spatial-aware adaptation on (Sec. 3.2; Table 1 "spt")
    m.spt_layer = ""  # "pixel-level features": those the segmentation classifier sees
    m.grid = (3, 3)  # 3x3 regions (Sec. 4.4, Fig. 6: best of 1x1, 2x1, 2x2, 3x3)
    m.lambda_spt = 0.01  # lambda_2 (Sec. 3.3)
    # Paper silent on the domain classifier: DANN's (ROAD follows DANN [8] for the GRL), applied
    # per pixel as 1x1 convs: C -> 1024 -> 1024 -> 2.
    m.disc_hidden = (1024, 1024)
    # Paper silent on its optimiser. With the GRL, Eq. 5 is ONE loss minimised jointly ("directly
    # using conventional optimization methods like SGD", Sec. 3.2), so the region classifiers
    # (role "disc") use the segmenter's optimiser and schedule (SGD, poly), with 10x its lr as
    # freshly added layers, like the DeepLab classifier head (DANN's and DeepLab's convention).
    # The fields follow optim.seg's (derived references: setting one sets disc's alone).
    seg = config.optim.seg
    followed = ("kind", "schedule", "poly_power", "schedule_steps", "momentum", "betas",
                "weight_decay")
    config.optim.disc = common.optimizer_section(
        lr=seg.get_ref("lr") * 10.0, head_lr_mult=1.0,
        **{k: seg.get_ref(k).identity() for k in followed})
    return common.finalize(config, arg, {"demo": _demo, "gta5": _paper, "synthia": _paper})


def _paper(config):
    """GTA5 / SYNTHIA -> Cityscapes ("All experiment settings remain unchanged", Sec. 4.6)."""
    mo = config.model
    mo.name = "deeplab_largefov_vgg16"  # DeepLab with a VGG-16 backbone (Sec. 4.2, Table 2);
    # PSPNet-ResNet101 (Table 1 bottom): `road.py:gta5,model.name=pspnet_r101`.
    config.init.seg.path = ""  # ImageNet weights (Sec. 4.1): bring them with synseg_jax.import_weights
    d = config.data
    d.crop = (321, 321)  # 321x321 patches (Sec. 4.1); the resize before cropping: common's
    d.normalization = "caffe_bgr"  # DeepLab lineage ("Similar with [1]", Sec. 4.1)
    o = config.optim.seg
    o.kind = "sgd"  # DeepLab [1]: SGD, momentum 0.9, weight decay 5e-4, 10x head lr
    o.lr = 2.5e-4  # Sec. 4.1
    o.poly_power = 0.9  # "poly" policy (Sec. 4.1), DeepLab's power 0.9
    # Steps: paper silent; common's AdaptSegNet-style 120k of a 250k poly horizon.
    config.train.batch_size = 5  # 5 source + 5 target patches per batch (Sec. 4.1)


def _demo(config):
    """Minicity sim -> real_train, eval real_val; common's demo model (small DeepLabV2)."""
    # As the source-only demo: the last 10% of sim is held out and scored too (in-domain accuracy).
    config.data.source_split = "sim[:90%]"
    config.data.extra_eval_splits = ("minicity/sim[90%:]",)
    config.method.disc_hidden = (64, 64)  # scaled down with the demo backbone (512 channels)
    # Measured on the 2-core CPU (see the report / benchmarks/road_ablation.py): ROAD runs ~2x a
    # source-only step (two domains + the teacher), so fewer steps than common's demo 1500.
    config.train.steps = 600
    config.optim.seg.schedule_steps = 600
    config.train.eval_every = 300
    config.train.checkpoint_every = 300
    config.train.image_every = 300
