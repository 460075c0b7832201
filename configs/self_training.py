"""Self-training with pseudo-labels: the engine's stages end to end.

    python -m synseg_jax.main --config=configs/self_training.py --workdir=runs/self_training

Three stages, each in <workdir>/<stage>, each with the run's config plus its own overrides (so
`train.steps=...` on the command line reaches both trainings):
  source  source-only training on the labelled source;
  pseudo  a sweep: the source model's softmax over the target train split, labelled per class at
          the 66th percentile of that class's confidences, capped at 0.9 (FDA's self-training;
          `stages.pseudo.rule=class_median` is BDL's median rule);
  adapt   from the source model, cross-entropy on source plus pseudo-labelled target
          (methods/self_training.py).
The pseudo stage writes report.json: per-class precision and coverage of the pseudo-labels
against the target's own labels (a report only; training never reads them).
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.method.name = "source_only"
    config.method.lambda_pseudo = 1.0  # BDL / FDA: pseudo-labelled target CE with weight 1
    s = config.stages
    s.source = common.train_stage(overrides="data.target=,data.target_split=")
    s.pseudo = common.sweep_stage(models=("source",), rule="class_percentile",
                                  percentile=66.0,  # FDA (Yang & Soatto 2020), its SSL code
                                  cap=0.9)  # FDA and BDL cap the per-class thresholds at 0.9
    s.adapt = common.train_stage(overrides="method.name=self_training", init_from="source",
                                 target_from="pseudo")
    config.stage_order = ("source", "pseudo", "adapt")
    return common.finalize(config, arg, {"demo": _demo})


def _demo(config):
    # As the source-only demo, the last 10% of sim is held out and scored too.
    config.data.source_split = "sim[:90%]"
    config.data.extra_eval_splits = ("minicity/sim[90%:]",)
    # Two trainings share the demo's time budget: 750 steps each (poly horizon to match). Set
    # on the run's config, so that a command-line `train.steps=...` reaches every stage.
    config.train.steps = 750
    config.optim.seg.schedule_steps = 750
    config.train.eval_every = 750
