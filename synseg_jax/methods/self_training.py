"""Self-training on pseudo-labels: cross-entropy on labelled source images plus, weighted by
``method.lambda_pseudo``, cross-entropy on target images labelled by an earlier model (a sweep
stage), where unselected pixels (255) count for nothing. BDL's and FDA's self-training rounds
train so, both with weight 1."""

from __future__ import annotations

import ml_collections

from synseg_jax.methods import base
from synseg_jax.state import TrainState


class SelfTraining:
    roles = ("seg",)
    config_fields = ("lambda_pseudo",)  # declared by configs/self_training.py

    def __init__(self, config: ml_collections.ConfigDict):
        if not (config.data.target and config.data.target_labels):
            raise ValueError("self_training needs a pseudo-labelled target: data.target (a "
                             "sweep stage's dataset) with data.target_labels=True")
        self.seg = base.Segmenter.from_config(config)
        self.model = self.seg.model
        self.lambda_pseudo = config.method.lambda_pseudo

    def init(self, rng, batch, pretrained) -> TrainState:
        return self.seg.init_state(rng, batch, pretrained)

    def train_step(self, state: TrainState, batch):
        seg = state.roles["seg"]
        source, target = batch["source"], batch["target"]

        def loss_fn(params):
            out_s, collections = self.seg.train_forward(seg, params, source["image"], "source",
                                                        state)
            total, terms = self.seg.loss(out_s, source["label"])
            out_t, collections = self.seg.train_forward(seg, params, target["image"], "target",
                                                        state, collections)
            pseudo, pseudo_terms = self.seg.pseudo_loss(out_t, target["label"])
            terms.update(pseudo_terms)
            total = total + self.lambda_pseudo * pseudo
            terms["loss/total"] = total
            return total, (terms, collections)

        return self.seg.update(state, loss_fn)

    def predict(self, seg_variables, images):
        return self.seg.predict(seg_variables, images)
