"""Structure enhancement: UNIT's decoder, the ASPP discriminator, the L1's reduction and image
range, the averaged encoder gradient, Table 1's switches and the decoder-size check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import source_only as so_config
from configs import structure as st_config
from synseg_jax import images, methods
from synseg_jax.methods import structure
from synseg_jax.models.decoders import UNITDecoder, UNITLayerNorm
from synseg_jax.models.discriminators import ASPPDiscriminator
from tests.tiny import TINY_DATA_AND_MODEL

TINY = [*TINY_DATA_AND_MODEL, "model.bn_mode=frozen", "method.rec_width=16",
        "method.rec_res_blocks=1", "method.disc_width=4"]


def tiny_config(*extra, module=st_config):
    tiny = TINY if module is st_config else TINY_DATA_AND_MODEL
    return module.get_config(",".join(["demo", *tiny, *extra]))


def fake_batch(b=2, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    image = lambda shift: jnp.asarray(rng.uniform(0, 255, (b, h, w, 3)) - 120 + shift,  # noqa: E731
                                      jnp.float32)
    return {"source": {"image": image(0), "label": jnp.asarray(rng.integers(0, 19, (b, h, w)),
                                                                jnp.uint8)},
            "target": {"image": image(10)}}


@pytest.fixture(scope="module")
def smooth_batch():
    """Images G can learn: low-frequency patterns (per-pixel noise has nothing to reconstruct)."""
    batch = fake_batch()
    rng = np.random.default_rng(1)
    for domain in ("source", "target"):
        low = jnp.asarray(rng.uniform(-100, 100, (2, 4, 4, 3)), jnp.float32)
        batch[domain]["image"] = images.resize_bilinear(low, (32, 32))
    return batch


@pytest.fixture(scope="module")
def full_state(smooth_batch):
    """One initial state of the full model, shared: every row's method reads the roles it has
    (initialising a ResNet takes most of a test's time on a loaded CPU)."""
    return jax.jit(methods.build(tiny_config()).init)(jax.random.PRNGKey(0), smooth_batch, {})


def test_decoder_is_units_with_three_upsampling_steps():
    decoder = UNITDecoder(width=32, num_res_blocks=2, upsample_steps=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 6, 40)), jnp.float32)
    params = decoder.init(jax.random.PRNGKey(0), x)["params"]
    kernels = {k: v["conv"]["kernel"].shape if "conv" in v else v.get("kernel", v.get("scale")).shape
               for k, v in params.items() if k != "res0" and k != "res1"}
    assert kernels == {"proj": (1, 1, 40, 32), "up0": (5, 5, 32, 16), "ln0": (16,),
                       "up1": (5, 5, 16, 8), "ln1": (8,), "up2": (5, 5, 8, 4), "ln2": (4,),
                       "to_rgb": (7, 7, 4, 3)}
    assert params["res0"]["conv1"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    y = decoder.apply({"params": params}, x)
    assert y.shape == (1, 32, 48, 3)  # x8
    assert float(jnp.max(jnp.abs(y))) < 1.0  # tanh


def test_unit_layer_norm_normalises_each_image_over_all_its_values():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 3, 4, 5)).astype(np.float32)
    ln = UNITLayerNorm()
    params = {"scale": jnp.full((5,), 2.0), "bias": jnp.full((5,), 0.5)}
    y = np.asarray(ln.apply({"params": params}, x))
    flat = x.reshape(2, -1)
    want = ((x - flat.mean(1)[:, None, None, None]) / (flat.std(1, ddof=1)[:, None, None, None]
                                                      + 1e-5)) * 2.0 + 0.5
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_aspp_discriminator_branches_and_receptive_field():
    disc = ASPPDiscriminator(width=3)
    x = jnp.zeros((1, 21, 21, 5))
    params = disc.init(jax.random.PRNGKey(0), x)["params"]
    assert [params[f"branch{i}"]["conv"]["kernel"].shape for i in range(4)] == [(3, 3, 5, 3)] * 4
    assert params["classifier"]["conv"]["kernel"].shape == (3, 3, 3, 1)
    assert disc.apply({"params": params}, x).shape == (1, 21, 21, 1)  # per pixel, stride 1
    # An impulse reaches as far as the largest rate (4) plus the classifier's 3x3 (1): radius 5.
    impulse = x.at[0, 10, 10, :].set(1.0)
    diff = np.abs(np.asarray(disc.apply({"params": params}, impulse)
                             - disc.apply({"params": params}, x)))[0, :, :, 0]
    rows = np.nonzero(diff.max(axis=1) > 1e-7)[0]
    assert rows.min() == 5 and rows.max() == 15


def test_l1_reduction_and_image_range():
    normalization = "caffe_bgr"
    black = images.normalize(jnp.zeros((1, 4, 4, 3)), normalization)
    white = images.normalize(jnp.full((1, 4, 4, 3), 255.0), normalization)
    np.testing.assert_allclose(images.to_unit_range(black, normalization), -1.0, atol=1e-5)
    np.testing.assert_allclose(images.to_unit_range(white, normalization), 1.0, atol=1e-5)
    a, b = jnp.zeros((2, 4, 5, 3)), jnp.full((2, 4, 5, 3), 0.5)
    assert float(structure.l1(a, b, "sum")) == pytest.approx(0.5 * 4 * 5 * 3)  # per image
    assert float(structure.l1(a, b, "mean")) == pytest.approx(0.5)
    assert float(structure.psnr(a, b)) == pytest.approx(10 * np.log10(4 / 0.25))


def _grads(config, state, batch):
    method = methods.build(config)

    @jax.jit  # one compile of the whole gradient instead of hundreds of op-by-op ones
    def grads(seg_params, rec_params, state, batch):
        (seg_grads, rec_grads), _ = jax.grad(method.loss, argnums=(0, 1), has_aux=True)(
            seg_params, rec_params, state, batch)
        return method._average_encoder(seg_grads), rec_grads

    # As numpy: the comparisons below need no compiles of their own.
    return jax.tree_util.tree_map(np.asarray, grads(state.roles["seg"].params,
                                                    state.roles["rec"].params, state, batch))


def test_encoder_gradient_is_the_average_of_the_branches(full_state, smooth_batch):
    """'average': E gets 1/2 (segmentation branch) + 1/2 (reconstruction branch); S and G their
    own branch's gradient. With 'sum' E gets the plain sum, so E's average is half of it, and S,
    which the reconstruction branch never reaches, is the same in both."""
    args = (full_state, smooth_batch)
    extra = ("method.lambda_rec=1e-3",)  # a reconstruction gradient comparable to the rest
    avg, rec_avg = _grads(tiny_config(*extra), *args)
    plain, rec_plain = _grads(tiny_config(*extra, "method.encoder_grads=sum"), *args)
    seg_only, _ = _grads(tiny_config(*extra, "method.encoder_grads=sum",
                                     "method.lambda_rec=0.0"), *args)
    close = lambda a, b: jax.tree_util.tree_map(  # noqa: E731
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-7), a, b)
    close(avg["backbone"], jax.tree_util.tree_map(lambda g: 0.5 * g, plain["backbone"]))
    close(avg["head"], plain["head"])
    close(avg["head"], seg_only["head"])
    close(rec_avg, rec_plain)
    # The reconstruction branch does reach E: the sum differs from the segmentation branch alone.
    diff = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))),
                                  plain["backbone"], seg_only["backbone"])
    assert max(jax.tree_util.tree_leaves(diff)) > 1e-6


def test_source_only_row_steps_as_the_source_only_method(full_state, smooth_batch):
    batch = smooth_batch
    config = tiny_config("method.reconstruction=False", "method.adversarial=False")
    method = methods.build(config)
    assert method.roles == ("seg",)
    after, metrics = jax.jit(method.train_step)(full_state, batch)
    so = methods.build(tiny_config(module=so_config))
    so_after, so_metrics = jax.jit(so.train_step)(full_state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(after.roles["seg"].params),
                    jax.tree_util.tree_leaves(so_after.roles["seg"].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(metrics["loss/seg"]) == pytest.approx(float(so_metrics["loss/seg"]), rel=1e-5)


@pytest.mark.parametrize("rec,adv,roles", [(True, False, ("seg", "rec")),
                                           (False, True, ("seg", "disc")),
                                           (True, True, ("seg", "rec", "disc"))])
def test_table1_rows_have_their_roles(rec, adv, roles):
    config = tiny_config(f"method.reconstruction={rec}", f"method.adversarial={adv}")
    assert methods.build(config).roles == roles


def test_full_model_step_trains_every_role_and_shows_its_pictures(full_state, smooth_batch):
    batch, state = smooth_batch, full_state
    method = methods.build(tiny_config())
    after, metrics = jax.jit(method.train_step)(state, batch)
    assert {"loss/seg", "loss/adv", "loss/disc", "loss/rec_source", "loss/rec_target",
            "train/rec_psnr_source", "train/disc_accuracy", "lr/seg", "lr/rec",
            "lr/disc"} <= set(metrics)
    # The reported total is the unscaled objective (the averaging only splits E's gradient).
    want = (metrics["loss/seg"] + 1e-3 * metrics["loss/adv"]
            + 1e-5 * (metrics["loss/rec_source"] + metrics["loss/rec_target"]))
    assert float(metrics["loss/total"]) == pytest.approx(float(want), rel=1e-5)
    for role in method.roles:
        leaves = zip(jax.tree_util.tree_leaves(state.roles[role].params),
                     jax.tree_util.tree_leaves(after.roles[role].params))
        assert any(not np.array_equal(a, b) for a, b in leaves), role
    pictures = jax.jit(method.summaries)(after, batch)
    assert {"train/source_reconstruction", "train/target_reconstruction", "train/target_image",
            "train/target_disc_map"} <= set(pictures)
    for picture in pictures.values():
        assert picture.dtype == jnp.uint8 and picture.shape[1:] == (32, 32, 3)


def test_reconstruction_learns_the_images(full_state, smooth_batch):
    """G (and E) fit a fixed pair of images: the L1 of both domains falls within a few steps."""
    config = tiny_config("method.adversarial=False", "method.lambda_rec=1e-4",
                         "optim.rec.lr=3e-3", "optim.seg.lr=1e-4")
    step = jax.jit(methods.build(config).train_step)
    state, first = full_state, None
    for _ in range(12):
        state, metrics = step(state, smooth_batch)
        first = first or {k: float(metrics[k]) for k in ("loss/rec_source", "loss/rec_target",
                                                          "train/rec_psnr_target")}
    for key in ("loss/rec_source", "loss/rec_target"):
        assert float(metrics[key]) < 0.9 * first[key], key
    assert float(metrics["train/rec_psnr_target"]) > first["train/rec_psnr_target"] + 1.0


def test_decoder_that_cannot_reach_the_input_size_is_a_build_error():
    with pytest.raises(ValueError, match=r"upsamples by 4.*output stride 8"):
        methods.build(tiny_config("method.rec_upsample_steps=2"))
    # Features the configured steps cannot bring back to the image size: caught at init, before
    # any step, naming both sizes.
    method = methods.build(tiny_config("method.rec_features=stem"))
    with pytest.raises(ValueError, match=r"16x16 features by 8 \(.*\) to 128x128.*32x32"):
        method.init(jax.random.PRNGKey(0), fake_batch(), {})
    with pytest.raises(ValueError, match="is not a feature"):
        methods.build(tiny_config("method.rec_features=res5c")).init(
            jax.random.PRNGKey(0), fake_batch(), {})


def test_bad_switch_values_are_named():
    with pytest.raises(ValueError, match="rec_reduction"):
        methods.build(tiny_config("method.rec_reduction=median"))
    with pytest.raises(ValueError, match="encoder_grads"):
        methods.build(tiny_config("method.encoder_grads=max"))
    with pytest.raises(ValueError, match="disc_input"):
        methods.build(tiny_config("method.disc_input=pixels"))


def test_discriminator_sees_the_softmax_at_the_chosen_resolution():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 8, 19)), jnp.float32)
    at_logits = methods.build(tiny_config()).disc_view(logits, (32, 64))
    at_image = methods.build(tiny_config("method.disc_input=image")).disc_view(logits, (32, 64))
    assert at_logits.shape == (1, 4, 8, 19) and at_image.shape == (1, 32, 64, 19)
    np.testing.assert_allclose(at_logits, jax.nn.softmax(logits), rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(at_image, -1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("preset", ["demo", "gta5", "synthia"])
def test_presets_keep_the_papers_values(preset):
    config = st_config.get_config(preset)
    assert config.method.lambda_rec == 1e-5 and config.method.lambda_adv == 1e-3
    assert tuple(config.method.disc_rates) == (1, 2, 3, 4)
    assert config.optim.rec.kind == "adam" and tuple(config.optim.rec.betas) == (0.9, 0.99)
    assert config.optim.disc.lr == 2.5e-4 and config.optim.seg.lr == (
        1e-2 if preset == "demo" else 2.5e-4)
    assert config.optim.rec.schedule_steps == config.optim.seg.schedule_steps
