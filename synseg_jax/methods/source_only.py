"""Source-only training: cross-entropy on labelled source images (the baseline and the oracle)."""

from __future__ import annotations

import jax
import ml_collections

from synseg_jax import losses, optim
from synseg_jax.methods import base
from synseg_jax.state import TrainState


class SourceOnly:
    roles = ("seg",)

    def __init__(self, config: ml_collections.ConfigDict):
        self.model = base.segmenter_from_config(config.model)
        self.tx, self.schedule = base.optimizer_from_config(config.optim)
        self.head_lr_mult = config.optim.head_lr_mult
        self.aux_weight = config.method.aux_weight
        self.update_source_stats = base.updates_stats(config.model.bn_update, "source")
        self.init_scope = config.model.init_scope

    def init(self, rng, batch, pretrained=None) -> TrainState:
        seg = base.init_role(self.model, rng, batch["source"]["image"], self.tx)
        seg = base.with_pretrained(seg, pretrained, self.init_scope, self.tx)
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), rng=rng, roles={"seg": seg})

    def seg_loss(self, out: dict, labels: jax.Array) -> tuple[jax.Array, dict]:
        """Main CE (+ aux_weight x aux CE for a multi-level head)."""
        main = losses.cross_entropy(out["logits"], labels)
        terms = {"loss/seg": main}
        total = main
        if "aux_logits" in out:
            aux = losses.cross_entropy(out["aux_logits"], labels)
            terms["loss/seg_aux"] = aux
            total = total + self.aux_weight * aux
        return total, terms

    def train_step(self, state: TrainState, batch):
        seg = state.roles["seg"]
        source = batch["source"]

        def loss_fn(params):
            out, collections = base.forward(self.model, seg, params, source["image"], train=True,
                                            update_stats=self.update_source_stats,
                                            rng=state.step_rng("dropout"))
            total, terms = self.seg_loss(out, source["label"])
            return total, (terms, collections)

        (_, (terms, collections)), grads = jax.value_and_grad(loss_fn, has_aux=True)(seg.params)
        new_seg = base.apply_gradients(seg, grads, self.tx, collections)
        lrs = optim.current_lrs(self.schedule, state.step, self.head_lr_mult)
        metrics = {**terms, "lr/seg": lrs["base"], "lr/seg_head": lrs["head"]}
        return state.replace(step=state.step + 1, roles={"seg": new_seg}), metrics

    def predict(self, seg_variables, images):
        return self.model.apply(seg_variables, images, train=False)["logits"]
