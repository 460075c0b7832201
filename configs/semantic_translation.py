"""Semantically adaptive image-to-image translation + self-training, in bidirectional rounds
(semantic_translation_spade.txt; translator in synseg_jax/methods/semantic_translation.py).

    python -m synseg_jax.main --config=configs/semantic_translation.py --workdir=runs/st  # demo
    python -m synseg_jax.main --config=configs/semantic_translation.py:gta5,init.seg.path=W \\
        --workdir=runs/st_gta5     # W: import_weights --format=deeplab_resnet101_init

Stages, each in <workdir>/<stage>, resumable, skipped when done; for round r = 1..`rounds`
(r - 1 = 0 is the stage `source`):
  source       source-only segmenter
  trans<r>     translator (coupled SPADE GANs) trained against the round's segmenter, frozen:
               `source` for r = 1, seg<r-1> after
  translate<r> the whole source split translated into the target's look, with its labels
  pseudo<r>    the round's segmenter's pseudo-labels of the target train split (flat threshold)
  seg<r>       segmenter trained on the translated source + pseudo-labelled target + output-space
               adversarial (methods/adversarial.py with data.target_labels), from the run's
               initial weights, as BDL retrains each round's segmentation model from its init
`rounds`, the `translator.*` fields and `train.*` (the segmenter stages') are read when the
stages are made, after the command line's overrides, so `rounds=3` or `translator.steps=10`
reach every stage. Table 3's ablations: `method.generator_norm=in` (no SPADE) and
`method.lambda_sce=0` (no symmetric cross-entropy).

The paper's extracted text lost its loss weights and its confidence threshold; each default
below names the source it comes from instead (UNIT, MUNIT, BDL).
"""

import ml_collections

from configs import adversarial, common

ROUNDS = 2  # the paper iterates "until the segmenter stops improving"; BDL reports 2 rounds
SOURCE_ONLY = "method.name=source_only,data.target=,data.target_split="


def get_config(arg: str | None = None):
    config = common.base_config()
    adversarial.declare(config)  # the segmenter stages' method (output-space adversarial)
    declare(config)
    config.rounds = ROUNDS
    config = common.finalize(config, arg, {"demo": _demo, "gta5": _paper, "synthia": _paper})
    with config.unlocked():
        add_rounds(config)
    config.lock()
    return config


def declare(config):
    """The translator's fields, optimisers and stage settings."""
    m = config.method
    # Translator (models/translator.py): UNIT's layout as the paper's appendix table gives it.
    m.translator_dim = 64  # first conv width; latent 256 channels (the paper's table, UNIT)
    m.translator_downsample = 2  # two 4x4 stride-2 convs (the paper's table)
    m.translator_res = 4  # residual blocks per encoder and per generator (the paper's table)
    m.translator_shared = 1  # of them shared across domains (UNIT's code: n_*_shared_blk 1)
    m.generator_norm = "spade"  # "spade" (the paper) or "in" (Table 3's ablation)
    m.spade_hidden = 128  # SPADE's hidden width (SPADE)
    m.spectral_norm = True  # "to all the models" (the paper, Sec. 4)
    m.spade_spectral_norm = True  # the paper's "all"; SPADE's own code leaves its convs plain
    m.disc_scales = 3  # multi-scale PatchGAN (pix2pixHD / MUNIT: 3)
    m.disc_dim = 64  # MUNIT's dis dim
    m.disc_layers = 4  # 4x4 stride-2 convs per scale (MUNIT's n_layer)
    # Loss weights (lost from the paper's text): MUNIT's / UNIT's for their street-scene
    # configs (MUNIT synthia2cityscape: gan_w 1, recon_x_w 10, recon_c_w 1, recon_x_cyc_w 10;
    # UNIT gta2city: gan_w 1, recon_x_w 10, recon_x_cyc_w 10).
    m.lambda_gan = 1.0
    m.lambda_rec = 10.0
    m.lambda_cyc = 10.0
    m.lambda_latent = 1.0
    # Symmetric CE: no published weight; 1 as CyCADA's semantic consistency loss. 0 = off.
    m.lambda_sce = 1.0
    # TTUR (the paper; Heusel et al.): Adam, generator 1e-4, discriminators 4e-4, betas (0, 0.9),
    # poly decay to 0 over 1,000,000 iterations (the paper); no weight decay (UNIT / MUNIT).
    adam = dict(kind="adam", betas=(0.0, 0.9), weight_decay=0.0, head_lr_mult=1.0,
                freeze_bn_affine=False, schedule_steps=1_000_000, poly_power=0.9)
    config.optim.trans = common.optimizer_section(lr=1e-4, **adam)
    config.optim.disc_img = common.optimizer_section(lr=4e-4, **adam)
    config.init.trans = common.init_section()  # "" = random: each round trains a new translator
    # Translator stages: 512x512 random crops of the 1024x512 images (the paper), batch 1,
    # horizontal flips (UNIT's and MUNIT's loaders); steps: the paper's schedule length.
    config.translator = t = ml_collections.ConfigDict()
    t.steps = 1_000_000
    t.batch_size = 1
    t.crop = (512, 512)
    t.checkpoint_every = 10_000
    t.image_every = 1000
    # Pseudo-labels: a flat confidence threshold (the paper, Eq. 9; its value is lost): BDL's 0.9.
    config.pseudo_threshold = 0.9


def add_rounds(config):
    """The recipe's stages for `config.rounds` rounds (module docstring)."""
    if config.rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {config.rounds}")
    t = config.translator
    translator = ",".join([
        "method.name=semantic_translation", f"train.steps={t.steps}",
        f"train.batch_size={t.batch_size}", f"data.crop=({t.crop[0]},{t.crop[1]})",
        f"train.checkpoint_every={t.checkpoint_every}", f"train.image_every={t.image_every}",
        # The poly decay ends with the translator's training (the paper: both 1,000,000).
        f"optim.trans.schedule_steps={t.steps}", f"optim.disc_img.schedule_steps={t.steps}"])
    s = config.stages = ml_collections.ConfigDict()
    s.source = common.train_stage(overrides=SOURCE_ONLY)
    order = ["source"]
    previous = "source"
    for r in range(1, config.rounds + 1):
        s[f"trans{r}"] = common.train_stage(overrides=translator, init_from=previous)
        s[f"translate{r}"] = common.translate_stage(translator=f"trans{r}")
        s[f"pseudo{r}"] = common.sweep_stage(models=(previous,), rule="flat",
                                             threshold=config.pseudo_threshold)
        s[f"seg{r}"] = common.train_stage(source_from=f"translate{r}", target_from=f"pseudo{r}")
        order += [f"trans{r}", f"translate{r}", f"pseudo{r}", f"seg{r}"]
        previous = f"seg{r}"
    config.stage_order = tuple(order)


def _paper(config):
    """DeepLabV2-R101 (`model.name=fcn8s` for FCN8s-VGG16) at 1024x512, batch 1, with BDL's
    segmentation optimisation (its DeepLab options: SGD 2.5e-4, momentum 0.9, weight decay 5e-4,
    poly 0.9 over 250k, discriminator Adam 1e-4 (0.9, 0.99), lambda_adv 1e-3; common's values)."""
    d = config.data
    d.train_resize = (512, 1024)  # "images downsampled to 1024x512" (the paper)
    d.target_resize = (512, 1024)
    d.crop = ()  # BDL trains the segmenter on whole 1024x512 images
    config.train.steps = 80_000  # BDL's README command (--num-steps-stop 80000)
    # FCN8s (BDL's VGG options): Adam 1e-5, betas (0.9, 0.99), lambda_adv 1e-4; set with
    # model.name=fcn8s,optim.seg.kind=adam,optim.seg.lr=1e-5,method.lambda_adv=(1e-4,)


def _demo(config):
    # As the other demos: the last 10% of sim is held out and scored too.
    config.data.source_split = "sim[:90%]"
    config.data.extra_eval_splits = ("minicity/sim[90%:]",)
    config.method.disc_widths = (32, 64, 128, 256)  # halved with the demo's small segmenter
    m = config.method
    # A small translator for a 2-core CPU (the algorithm unchanged): ~0.5 s a step at batch 1.
    m.translator_dim = 8
    m.spade_hidden = 16
    m.disc_dim = 16
    t = config.translator
    t.crop = (128, 128)  # the paper's 512x512 of 1024x512, on minicity's 128x256
    t.steps = 600
    t.checkpoint_every = 300
    t.image_every = 300
    # Segmenter stages: as the other demos' 600-step trainings.
    config.train.steps = 600
    config.optim.seg.schedule_steps = 600
    # Demo only (no paper warms up): the segmenter stages of a round add the pseudo-labelled
    # target's cross-entropy to the source's, which doubles the first steps' gradient at the
    # demo's lr 1e-2 (1e-1 for the fresh head). Without a warmup, round 2's segmenter of seed 0
    # went from loss 5.9 to 31 after one step and to nan at step 22; 50 warmup steps kept it
    # at 8.1 or less over the 60 steps watched (1.2-1.7 by step 40).
    config.optim.seg.warmup_steps = 50
    config.train.eval_every = 600
    config.train.checkpoint_every = 300
    config.train.image_every = 300
