"""Real-time domain adaptation (realtime_da_bisenet_fda.txt): BiSeNet-STDC813 with output-space
adversarial training, FDA, multi-band transfer (MBT) and self-training, as one recipe.

    python -m synseg_jax.main --config=configs/realtime_da.py --workdir=runs/realtime_da   # demo
    python -m synseg_jax.main --config=configs/realtime_da.py:gta5,init.seg.path=weights/stdc813 \\
        --workdir=runs/realtime_da_gta5       # weights: import_weights --format=stdc813

Stages, each in <workdir>/<stage>, resumable, skipped when done (the paper's Tables 1 and 2):
  source      source-only, no augmentation
  source_aug  source-only with contrast and saturation jitter and flips (p = 0.5 each)
  adv         + output-space adversarial, one discriminator on the main output
  fda_b001    + FDA, beta 0.01
  fda_b005    + FDA, beta 0.05
  mbt         the mean softmax of fda_b001 and fda_b005 (multi-band transfer), scored
  pseudo      MBT's pseudo-labels of the target train split (66th percentile per class, cap 0.9)
  ssl         fda_b001 fine-tuned on source + pseudo-labelled target, adversarial kept, at half
              the learning rates (the paper's self-training round; which model it starts from is
              not stated: the best single-beta model, as the paper's Table 2 ranks them)
The demo runs the same recipe on minicity with the demo DeepLabV2 (the demo's pretrained
backbone is a ResNet; BiSeNet on the demo needs an STDC pretraining that does not exist yet).
"""

from configs import adversarial, common

SOURCE_ONLY = "method.name=source_only,data.target=,data.target_split="
NO_AUGMENTATION = "data.jitter_prob=0.0,data.flip=False"
ADVERSARIAL_STAGES = ("adv", "fda_b001", "fda_b005", "ssl")


def get_config(arg: str | None = None):
    config = common.base_config()
    adversarial.declare(config)
    # Augmentation of the paper: contrast, saturation and horizontal flip, each with p = 0.5.
    config.data.jitter_prob = 0.5
    config.data.jitter_ops = ("contrast", "saturation")
    config.data.flip = True
    s = config.stages
    s.source = common.train_stage(overrides=f"{SOURCE_ONLY},{NO_AUGMENTATION}")
    s.source_aug = common.train_stage(overrides=SOURCE_ONLY)
    s.adv = common.train_stage()
    s.fda_b001 = common.train_stage(overrides="fda.beta=0.01")  # FDA's and the paper's betas
    s.fda_b005 = common.train_stage(overrides="fda.beta=0.05")
    s.mbt = common.ensemble_stage(models=("fda_b001", "fda_b005"))
    s.pseudo = common.sweep_stage(models=("mbt",), rule="class_percentile",
                                  percentile=66.0,  # FDA's SSL code, used by the paper's code
                                  cap=0.9)  # likewise
    s.ssl = common.train_stage(overrides="fda.beta=0.01", init_from="fda_b001",
                               target_from="pseudo",
                               lr_mult=0.5)  # "half the learning rates" (the paper, Sec. SSL)
    config.stage_order = ("source", "source_aug", "adv", "fda_b001", "fda_b005", "mbt", "pseudo",
                          "ssl")
    return common.finalize(config, arg, {"demo": _demo, "gta5": _paper, "synthia": _paper})


def _paper(config):
    """BiSeNet-STDC813 on the paper's subsets: 2,500 GTA5 (or SYNTHIA) images split 80 / 20
    (here the first 2,000 for training), 1,572 Cityscapes train images (the first 1,572)."""
    config.model.name = "bisenet_stdc813"
    config.model.align_corners = True  # STDC-Seg's BiSeNet upsamples its outputs so
    config.method.aux_weight = 1.0  # BiSeNet's loss sums its three cross-entropies (STDC-Seg)
    d = config.data
    d.normalization = "imagenet_rgb"  # STDC-Seg's input normalisation
    d.source_split = "train[:2000]"
    d.target_split = "train[:1572]"
    d.crop = (512, 1024)  # 1024x512 crops (the paper)
    o = config.optim.seg
    o.lr = 1e-2  # SGD lr 1e-2, momentum 0.9, weight decay 1e-4, poly (the paper)
    o.momentum = 0.9
    o.weight_decay = 1e-4
    # Paper silent on a head multiplier: common's 10x for fresh heads (STDC-Seg's optimiser too).
    t = config.train
    t.batch_size = 8  # the paper's batch
    t.steps = 12_500  # 50 epochs of 2,000 images at batch 8
    o.schedule_steps = 12_500
    # The adversarial stages train with batch 2 (the paper): 50 epochs are 50,000 steps.
    for name in ADVERSARIAL_STAGES:
        stage = config.stages[name]
        stage.overrides = ",".join(p for p in (
            stage.overrides, "train.batch_size=2", "train.steps=50000",
            "optim.seg.schedule_steps=50000") if p)


def _demo(config):
    # As the other demos: the last 10% of sim is held out and scored too.
    config.data.source_split = "sim[:90%]"
    config.data.extra_eval_splits = ("minicity/sim[90%:]",)
    config.method.disc_widths = (32, 64, 128, 256)  # halved with the demo's small segmenter
    # Six trainings share the demo recipe's 30-minute budget on 2 cores.
    config.train.steps = 600
    config.optim.seg.schedule_steps = 600
    config.train.eval_every = 600
    config.train.checkpoint_every = 300
    config.train.image_every = 300
