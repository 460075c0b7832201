"""Image classification, for pretraining a backbone (the demo's stand-in for ImageNet)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from synseg_jax.methods import base
from synseg_jax.models import segmenters
from synseg_jax.state import TrainState, init_key, new_state


class Classifier:
    roles = ("seg",)  # the trained network keeps the role name evaluation and export read

    def __init__(self, config: ml_collections.ConfigDict):
        m = config.model
        self.model = segmenters.build_classifier(
            "resnet", num_classes=m.num_classes, depth=m.depth,
            stage_sizes=tuple(m.stage_sizes) or None, width=m.width, style=base.resnet_style(m),
            output_stride=m.output_stride, bn_mode=m.bn_mode)
        self.seg_opt = base.role_optimizer(config.optim, "seg")

    def init(self, rng, batch, pretrained) -> TrainState:
        del pretrained  # pretraining starts from scratch
        seg = base.init_role(self.model, init_key(rng, "seg"), batch["source"]["image"],
                             self.seg_opt.tx)
        return new_state(rng, {"seg": seg})

    def train_step(self, state: TrainState, batch):
        seg = state.roles["seg"]
        source = batch["source"]

        def loss_fn(params):
            out, collections = base.forward(self.model, seg, params, source["image"], train=True,
                                            update_stats=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(
                out["logits"], source["label"]).mean()
            accuracy = jnp.mean(jnp.argmax(out["logits"], -1) == source["label"])
            return loss, (accuracy, collections)

        (loss, (accuracy, collections)), grads = jax.value_and_grad(loss_fn, has_aux=True)(seg.params)
        new_seg = base.apply_gradients(seg, grads, self.seg_opt.tx, collections)
        metrics = {"loss/cls": loss, "train/accuracy": accuracy,
                   **self.seg_opt.lr_metrics(state.step)}
        return state.replace(step=state.step + 1, roles={"seg": new_seg}), metrics

    def predict(self, seg_variables, images):
        return self.model.apply(seg_variables, images, train=False)["logits"]
