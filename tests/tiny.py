"""Config overrides shrinking a demo to seconds: minicity at 32x64 with a handful of scenes per split
and a 1-1-1-1 DeepLabV2 at 1/8 width, trained from scratch (no demo pretraining)."""

TINY_DATA_AND_MODEL = [
    "data.minicity.scene_size=(32,64)", "data.minicity.object_size=16",
    "data.minicity.num_examples.sim=16", "data.minicity.num_examples.sim_topdown=4",
    "data.minicity.num_examples.real_train=8", "data.minicity.num_examples.real_val=6",
    "data.minicity.num_examples.objects=32",
    "data.train_resize=(32,64)", "data.target_resize=(32,64)", "data.crop=(32,32)",
    "data.eval_size=(32,64)", "data.eval_batch_size=4", "data.shuffle_buffer=16",
    "model.width=0.125", "model.stage_sizes=(1,1,1,1)", "init.seg.path=",
]
