"""Structure enhancement (Lv et al., 2018): reconstruction decoder + ASPP output discriminator.

    python -m synseg_jax.main --config=configs/structure.py --workdir=runs/structure       # demo
    python -m synseg_jax.main --config=configs/structure.py:gta5 --workdir=...  # DeepLabV2-R101

Table 1's rows are switches: `reconstruction=False,adversarial=False` (source only),
`adversarial=False` (feature-level), `reconstruction=False` (output-level), neither (full model).
`encoder_grads=sum` replaces the paper's averaged encoder gradient by the plain sum.
benchmarks/structure_ablation.py runs the table on the demo.
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.method.name = "structure"
    m = config.method
    m.reconstruction = True  # feature-level enhancement: G reconstructs both domains (Sec. 3)
    m.adversarial = True  # output-level enhancement: D on the softmax maps (Sec. 3)
    m.lambda_rec = 1e-5  # lambda_rec (Sec. 4.2)
    m.lambda_adv = 1e-3  # lambda_adv (Sec. 4.2)
    # Paper silent; lambda_rec = 1e-5 only weighs anything for a per-image SUM of |G(E(I)) - I|
    # over pixels and channels (PyTorch L1Loss(size_average=False)); see methods/structure.py.
    m.rec_reduction = "sum"
    # "E is updated by averaging the gradients from each branch" (Sec. 3); "sum": the plain sum.
    m.encoder_grads = "average"
    m.rec_features = "layer4"  # res5c, fed to both S and G (Sec. 4.2)
    # G: UNIT's decoder (Sec. 4.2: "identical architecture in [8]"), shared by both domains.
    m.rec_width = 256  # UNIT's decoder width (64 x 2^2); res5c is projected to it (decoders.py)
    m.rec_res_blocks = 4  # UNIT's n_res
    m.rec_upsample_steps = 3  # res5c at output stride 8: three x2 steps back to the input size
    # D: ASPP of four dilated 3x3 convs, rates 1-4, then a conv to one channel (Sec. 4.2);
    # branch width paper silent: 64, the first width of AdaptSegNet's discriminator.
    m.disc_width = 64
    m.disc_rates = (1, 2, 3, 4)
    # Paper silent: D on the softmax at output stride ("logits", as FCAN's ASPP discriminator
    # [17]) or upsampled to the image ("image", AdaptSegNet's); see methods/structure.py.
    m.disc_input = "logits"
    # G and D: "Adam with momentum of 0.99" (beta2; beta1 0.9 as AdaptSegNet, whose setting the
    # paper follows), lr 2.5e-4 with the segmenter's poly decay (Sec. 4.2); no weight decay.
    seg = config.optim.seg
    for role in ("rec", "disc"):
        config.optim[role] = common.optimizer_section(
            kind="adam", lr=2.5e-4, betas=(0.9, 0.99), weight_decay=0.0, head_lr_mult=1.0,
            freeze_bn_affine=False, schedule_steps=seg.get_ref("schedule_steps").identity(),
            poly_power=seg.get_ref("poly_power").identity())
    return common.finalize(config, arg, {"demo": _demo, "gta5": _paper, "synthia": _paper})


def _paper(config):
    """DeepLabV2-R101 (common's) from DeepLab's ImageNet init, AdaptSegNet's setting (Sec. 4.2):
    SGD 2.5e-4 momentum 0.9, 10x classifier, poly 0.9, batch 1, whole GTA5 frames at 1280x720
    and Cityscapes at 1024x512, 120k steps of a 250k horizon (all common's defaults)."""
    config.init.seg.path = ""  # bring DeepLab's ImageNet weights with synseg_jax.import_weights
    config.data.crop = ()
    config.model.align_corners = True  # AdaptSegNet's PyTorch 0.4 upsampling


def _demo(config):
    # As the source-only demo: the last 10% of sim is held out and scored too.
    config.data.source_split = "sim[:90%]"
    config.data.extra_eval_splits = ("minicity/sim[90%:]",)
    # G and D shrink with the demo backbone (width 0.25 of ResNet's); G further to 32 (1/8 of
    # UNIT's): its 5x5 convs at image size cost the 2-core CPU more than the segmenter at 64.
    config.method.rec_width = 32
    config.method.disc_width = 32
    # Both domains through the segmenter plus G and D: ~2-3x a source-only step on the 2-core
    # CPU, so 600 steps (as ROAD's demo) fit the demo's 10 minutes; one evaluation, at the end.
    t = config.train
    t.steps = 600
    config.optim.seg.schedule_steps = 600
    t.eval_every = 0
    t.checkpoint_every = 300  # the reconstruction benchmark reads steps 300 and 600
    t.image_every = 300
