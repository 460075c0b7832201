"""Source-only training: cross-entropy on labelled source images (the baseline and the oracle)."""

from __future__ import annotations

import jax
import ml_collections

from synseg_jax.methods import base
from synseg_jax.state import TrainState, init_key, new_state


class SourceOnly:
    roles = ("seg",)

    def __init__(self, config: ml_collections.ConfigDict):
        self.seg = base.Segmenter.from_config(config)
        self.model = self.seg.model

    def init(self, rng, batch, pretrained) -> TrainState:
        role = self.seg.init_role(init_key(rng, "seg"), batch["source"]["image"], pretrained)
        return new_state(rng, {"seg": role})

    def train_step(self, state: TrainState, batch):
        role = state.roles["seg"]
        source = batch["source"]

        def loss_fn(params):
            out, collections = self.seg.train_forward(role, params, source["image"], "source",
                                                      state)
            total, terms = self.seg.loss(out, source["label"])
            return total, (terms, collections)

        (_, (terms, collections)), grads = jax.value_and_grad(loss_fn, has_aux=True)(role.params)
        new_role = base.apply_gradients(role, grads, self.seg.opt.tx, collections)
        metrics = {**terms, **self.seg.opt.lr_metrics(state.step)}
        return state.replace(step=state.step + 1, roles={"seg": new_role}), metrics

    def predict(self, seg_variables, images):
        return self.seg.predict(seg_variables, images)
