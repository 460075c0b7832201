"""Output-space adversarial adaptation (AdaptSegNet: Tsai et al., CVPR 2018), for any segmenter.

    python -m synseg_jax.main --config=configs/adversarial.py --workdir=runs/adversarial   # demo
    python -m synseg_jax.main --config=configs/adversarial.py:gta5 --workdir=...  # AdaptSegNet

The `gta5` / `synthia` presets are AdaptSegNet's multi-level DeepLabV2-ResNet101 (one
discriminator on the main output and one on the layer-3 output). Single-level is
`adv_outputs=("logits",),lambda_adv=(1e-3,)`. With FDA: `fda.beta=0.01` (an input option of the
loop, synseg_jax/fda.py); FDA's entropy term: `method.ent_weight=0.005`.
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    declare(config)
    return common.finalize(config, arg, {"demo": _demo, "gta5": _paper, "synthia": _paper})


def declare(config):
    """The adversarial method's fields and its discriminators' optimiser (configs that run it
    in a stage, such as realtime_da.py, declare them so too)."""
    config.method.name = "adversarial"
    m = config.method
    # Outputs with a discriminator each: "logits" (main), "aux_logits" (DeepLabV2 multi-level,
    # BiSeNet's 1/8 context head), "aux_logits2" (BiSeNet's 1/16 head).
    m.adv_outputs = ("logits",)  # single-level (AdaptSegNet Table 1; real-time DA's final setting)
    m.lambda_adv = (1e-3,)  # AdaptSegNet single-level lambda_adv (Sec. 4.1); real-time DA: 1e-3
    m.disc_widths = (64, 128, 256, 512)  # AdaptSegNet's discriminator (Sec. 3.3)
    m.ent_weight = 0.0  # FDA's robust entropy on the target (FDA Eq. 4: 0.005); off in AdaptSegNet
    m.ent_eta = 2.0  # FDA's Charbonnier exponent eta (FDA Sec. 4)
    # With a pseudo-labelled target (data.target_labels): its CE weight (FDA / BDL: 1).
    m.lambda_pseudo = 1.0
    # Discriminators: Adam, lr 1e-4, betas (0.9, 0.99), the segmenter's poly decay (AdaptSegNet's
    # code); no weight decay, no head multiplier.
    seg = config.optim.seg
    config.optim.disc = common.optimizer_section(
        kind="adam", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, head_lr_mult=1.0,
        freeze_bn_affine=False, schedule_steps=seg.get_ref("schedule_steps").identity(),
        poly_power=seg.get_ref("poly_power").identity())


def _paper(config):
    """AdaptSegNet multi-level: DeepLabV2-R101 with a second classifier on layer 3."""
    config.model.multi_level = True
    config.model.align_corners = True  # AdaptSegNet's PyTorch 0.4 code upsamples so
    config.method.adv_outputs = ("logits", "aux_logits")
    config.method.lambda_adv = (1e-3, 2e-4)  # main 1e-3, layer-3 output 2e-4 (Sec. 4.1)
    # L_seg = main + 0.1 x aux: common's method.aux_weight. Whole images, no crop: GTA5 at
    # 1280x720 and Cityscapes at 1024x512 (AdaptSegNet's code), batch 1 (common's).
    config.data.crop = ()


def _demo(config):
    # As the source-only demo: the last 10% of sim is held out and scored too.
    config.data.source_split = "sim[:90%]"
    config.data.extra_eval_splits = ("minicity/sim[90%:]",)
    config.method.disc_widths = (32, 64, 128, 256)  # halved with the demo's small segmenter
