"""Demo backbone pretraining: classify minicity `objects` crops (the demo's stand-in for ImageNet).

Demo configs with `init.seg.path="demo"` run this automatically when its output is missing,
with the model fields (depth, stage sizes, width, style, normalisation) of the config that needs
it. The real presets start from imported ImageNet weights instead (synseg_jax.import_weights).
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.method.name = "classifier"
    config.model.bn_mode = "train"  # a classifier trained from scratch learns its BN statistics
    config.model.output_stride = 32
    config.init.seg.path = ""
    config.optim.seg.lr = 0.1  # ResNet ImageNet recipe (He et al.), scaled down with the batch below
    config.optim.seg.weight_decay = 1e-4  # ResNet ImageNet recipe
    config.optim.seg.head_lr_mult = 1.0
    config.optim.seg.freeze_bn_affine = False
    return common.finalize(config, arg, {p: _objects for p in common.PRESETS})


def _objects(config):
    d = config.data
    d.source, d.source_split = "minicity", "objects"
    d.target = d.target_split = ""
    d.eval_dataset = d.eval_split = ""  # held-out accuracy is logged by the recipe
    d.train_resize = ()  # crops are stored at their training size
    d.crop = ()
    d.scale_range = (1.0, 1.0)
    config.init.seg.path = ""
    config.model.output_stride = 32
    config.optim.seg.lr = 0.05
    config.optim.seg.schedule_steps = 1200
    t = config.train
    t.steps = 1200
    t.batch_size = 32
    t.log_every = 100
    t.image_every = 0
    t.checkpoint_every = 400
    t.eval_every = 0
