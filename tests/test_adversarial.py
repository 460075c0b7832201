"""Output-space adversarial adaptation: AdaptSegNet's discriminator, the min-max of one step
(signs, stopped gradients, separate optimiser states), single and multi-level."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import adversarial as adv_config
from configs import source_only as so_config
from synseg_jax import losses, methods
from synseg_jax.methods import adversarial
from synseg_jax.models.discriminators import OutputDiscriminator
from tests.tiny import TINY_DATA_AND_MODEL

TINY = [*TINY_DATA_AND_MODEL, "model.bn_mode=frozen"]


def tiny_config(*extra, module=adv_config):
    own = ["method.disc_widths=(8,8,8,8)"] if module is adv_config else []
    return module.get_config(",".join(["demo", *TINY, *own, *extra]))


def fake_batch(b=2, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"source": {"image": jnp.asarray(rng.normal(size=(b, h, w, 3)) * 50, jnp.float32),
                       "label": jnp.asarray(rng.integers(0, 19, (b, h, w)), jnp.uint8)},
            "target": {"image": jnp.asarray(rng.normal(size=(b, h, w, 3)) * 50 + 20, jnp.float32)}}


def test_discriminator_is_adaptsegnets():
    disc = OutputDiscriminator()
    x = jnp.zeros((1, 64, 128, 19))
    params = disc.init(jax.random.PRNGKey(0), x)["params"]
    shapes = {k: v["conv"]["kernel"].shape for k, v in params.items()}
    assert shapes == {"conv1": (4, 4, 19, 64), "conv2": (4, 4, 64, 128),
                      "conv3": (4, 4, 128, 256), "conv4": (4, 4, 256, 512),
                      "classifier": (4, 4, 512, 1)}
    assert all("bias" in v["conv"] for v in params.values())
    assert disc.apply({"params": params}, x).shape == (1, 2, 4, 1)  # five stride-2 halvings
    # PyTorch's default init: every weight and bias within 1/sqrt(fan_in).
    for name, fan_in in (("conv1", 19 * 16), ("conv4", 256 * 16)):
        bound = 1 / np.sqrt(fan_in)
        for leaf in params[name]["conv"].values():
            assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound


def _step(config, batch=None):
    method = methods.build(config)
    batch = batch or fake_batch()
    state = jax.jit(method.init)(jax.random.PRNGKey(0), batch, {})
    new_state, metrics = jax.jit(method.train_step)(state, batch)
    return method, state, new_state, metrics


def test_without_the_adversarial_weight_the_segmenter_steps_as_source_only():
    """lambda_adv = 0: the discriminators may learn, but nothing of theirs reaches the segmenter."""
    _, before, after, metrics = _step(tiny_config("lambda_adv=(0.0,)"))
    so = methods.build(tiny_config(module=so_config))
    so_state = jax.jit(so.init)(jax.random.PRNGKey(0), fake_batch(), {})
    so_after, _ = jax.jit(so.train_step)(so_state, fake_batch())
    for a, b in zip(jax.tree_util.tree_leaves(after.roles["seg"].params),
                    jax.tree_util.tree_leaves(so_after.roles["seg"].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(jax.tree_util.tree_leaves(before.roles["disc"].params)[0],
                              jax.tree_util.tree_leaves(after.roles["disc"].params)[0])
    assert {"loss/seg", "loss/adv", "loss/disc", "train/disc_accuracy", "lr/seg",
            "lr/disc"} <= set(metrics)


def test_the_segmenter_step_fools_the_old_discriminator():
    """The adversarial term's sign: after the segmenter's update, the discriminator of the step
    before judges the target predictions more source-like (lower BCE against the source label).
    The discriminator's own update must not reach the segmenter (its inputs are stopped)."""
    # Void source labels and no weight decay: the adversarial term is the segmenter's only loss.
    config = tiny_config("optim.seg.lr=1e-2", "optim.seg.weight_decay=0.0")
    batch = fake_batch()
    batch["source"]["label"] = jnp.full_like(batch["source"]["label"], 255)
    method, before, after, metrics = _step(config, batch)
    assert float(metrics["loss/seg"]) == 0.0

    def fooling(seg_params):
        logits = method.predict({"params": seg_params, **before.roles["seg"].collections},
                                batch["target"]["image"])
        d = method.disc.apply({"params": before.roles["disc"].params},
                              adversarial.probabilities(logits, (32, 32)))
        return float(losses.bce_with_logits(d, adversarial.SOURCE_LABEL))

    assert fooling(after.roles["seg"].params) < fooling(before.roles["seg"].params)


def test_the_discriminator_learns_to_tell_the_domains_apart():
    """Segmenter frozen (lr 0): a few steps on one batch make the discriminator accurate."""
    config = tiny_config("optim.seg.lr=0.0", "optim.disc.lr=1e-2", "optim.disc.schedule=constant")
    method = methods.build(config)
    batch = fake_batch()
    batch["target"]["image"] = batch["target"]["image"] * 3 + 200  # domains the net tells apart
    state = jax.jit(method.init)(jax.random.PRNGKey(0), batch, {})
    step = jax.jit(method.train_step)
    first = None
    for _ in range(30):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss/disc"])
    assert float(metrics["loss/disc"]) < 0.1 * first
    assert float(metrics["train/disc_accuracy"]) == 1.0


def test_multi_level_has_a_discriminator_and_an_optimiser_state_per_output():
    config = tiny_config("model.multi_level=True", 'adv_outputs=("logits","aux_logits")',
                         "lambda_adv=(1e-3,2e-4)")
    method, before, after, metrics = _step(config)
    assert method.roles == ("seg", "disc", "disc_aux")
    assert {"loss/adv", "loss/adv_aux", "loss/disc", "loss/disc_aux", "loss/seg_aux"} <= set(metrics)
    # Separate Adam states: each discriminator's first moment follows its own gradients.
    mu = [jax.tree_util.tree_leaves(after.roles[r].opt_state)[1] for r in ("disc", "disc_aux")]
    assert mu[0].shape == mu[1].shape and not np.allclose(mu[0], mu[1])


@pytest.mark.parametrize("extra,message", [
    (['adv_outputs=("logits","aux_logits")'], r"lambda_adv needs one weight per adapted output"),
    (['adv_outputs=("main",)'], r"adv_outputs must name distinct segmenter outputs"),
])
def test_bad_settings_are_named(extra, message):
    with pytest.raises(ValueError, match=message):
        methods.build(tiny_config(*extra))


def test_an_output_the_segmenter_lacks_is_named():
    method = methods.build(tiny_config('adv_outputs=("logits","aux_logits")',
                                       "lambda_adv=(1e-3,2e-4)"))
    with pytest.raises(ValueError, match=r"\['aux_logits'\] are not outputs.*multi_level=True"):
        method.init(jax.random.PRNGKey(0), fake_batch(), {})


def test_summaries_show_target_and_discriminator_map():
    from synseg_jax import train
    method, _, after, _ = _step(tiny_config())
    pictures = jax.jit(train.summaries_of(method, "caffe_bgr"))(after, fake_batch())
    assert {"train/source_image", "train/source_prediction", "train/target_image",
            "train/target_disc_map"} <= set(pictures)
    assert pictures["train/target_disc_map"].shape == (2, 32, 32, 3)
    assert pictures["train/target_disc_map"].dtype == jnp.uint8
