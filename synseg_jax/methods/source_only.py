"""Source-only training: cross-entropy on labelled source images (the baseline and the oracle)."""

from __future__ import annotations

import ml_collections

from synseg_jax.methods import base
from synseg_jax.state import TrainState


class SourceOnly:
    roles = ("seg",)

    def __init__(self, config: ml_collections.ConfigDict):
        self.seg = base.Segmenter.from_config(config)
        self.model = self.seg.model

    def init(self, rng, batch, pretrained) -> TrainState:
        return self.seg.init_state(rng, batch, pretrained)

    def train_step(self, state: TrainState, batch):
        role = state.roles["seg"]
        source = batch["source"]

        def loss_fn(params):
            out, collections = self.seg.train_forward(role, params, source["image"], "source",
                                                      state)
            total, terms = self.seg.loss(out, source["label"])
            return total, (terms, collections)

        return self.seg.update(state, loss_fn)

    def predict(self, seg_variables, images):
        return self.seg.predict(seg_variables, images)
