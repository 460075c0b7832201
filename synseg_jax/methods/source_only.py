"""Source-only training: cross-entropy on labelled source images (the baseline and the oracle)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from synseg_jax.methods import base
from synseg_jax.state import TrainState


class SourceOnly:
    roles = ("seg",)

    def __init__(self, config: ml_collections.ConfigDict):
        self.model = base.segmenter_from_config(config.model)
        self.seg_opt = base.role_optimizer(config.optim, "seg")
        self.aux_weight = config.method.aux_weight
        self.update_source_stats = base.updates_stats(config.model.bn_update, "source")
        self.init_scope = config.model.init_scope

    def init(self, rng, batch, pretrained=None) -> TrainState:
        seg = base.init_segmenter(self.model, rng, batch["source"]["image"], self.seg_opt.tx,
                                  pretrained, self.init_scope)
        return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, roles={"seg": seg})

    def train_step(self, state: TrainState, batch):
        seg = state.roles["seg"]
        source = batch["source"]

        def loss_fn(params):
            out, collections = base.forward(self.model, seg, params, source["image"], train=True,
                                            update_stats=self.update_source_stats,
                                            rng=state.step_rng("dropout"))
            total, terms = base.supervised_loss(out, source["label"], self.aux_weight)
            return total, (terms, collections)

        (_, (terms, collections)), grads = jax.value_and_grad(loss_fn, has_aux=True)(seg.params)
        new_seg = base.apply_gradients(seg, grads, self.seg_opt.tx, collections)
        metrics = {**terms, **self.seg_opt.lr_metrics(state.step)}
        return state.replace(step=state.step + 1, roles={"seg": new_seg}), metrics

    def predict(self, seg_variables, images):
        return base.predict_logits(self.model, seg_variables, images)
