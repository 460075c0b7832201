"""The semantic-translation networks (models/translator.py): shapes, UNIT's shared layers, SPADE's
arithmetic, spectral normalisation, multi-scale discriminators, LSGAN losses. Tiny widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax.models.decoders import ReflectConv
from synseg_jax.models.translator import (DOMAINS, SPADE, ImageDiscriminators, Translator,
                                          conditioning_channels, downsample_avg,
                                          lsgan_discriminator_loss, lsgan_generator_loss)

B, H, W, CLASSES = 2, 16, 24, 5
TINY = dict(dim=4, n_downsample=2, n_res=2, n_shared=1, spade_hidden=8)


def _paths(tree):
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _every_domain(module, x, semantics, train=False):
    """Encode and decode once per domain: touches every translator layer."""
    return [module.decode(module.encode(x, d, train), semantics, d, train) for d in DOMAINS]


def _variables(module, *args, seed=0, **kwargs):
    """Random variables with the shapes `module.init` gives, without running (or compiling) the
    init itself: XLA:CPU takes tens of seconds to compile these graphs' random initialisers, and
    op-by-op (eager) application, which these tests use, reuses one compiled kernel per shape.
    Kernels He-normal, biases and other leaves small, LayerNorm scales near 1, power-iteration
    vectors normal."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name.endswith("/sigma"):
            return jnp.ones(leaf.shape, leaf.dtype)
        else:
            std = 1.0 if name.endswith("/u") else 0.1
        value = rng.normal(size=leaf.shape) * std + (1.0 if name == "scale" else 0.0)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    return {k: jnp.asarray(v, jnp.float32) for k, v in dict(
        x_s=rng.uniform(-1, 1, (B, H, W, 3)), x_t=rng.uniform(-1, 1, (B, H, W, 3)),
        # logits at half the image size, as a segmenter's output stride gives them
        sem_s=3 * rng.normal(size=(B, H // 2, W // 2, CLASSES)),
        sem_t=3 * rng.normal(size=(B, H // 2, W // 2, CLASSES))).items()}


@pytest.fixture(scope="module")
def spade_translator(inputs):
    model = Translator(**TINY)
    return model, _variables(model, **inputs)


def test_translator_shapes_range_and_training_updates(spade_translator, inputs):
    model, variables = spade_translator
    out, updated = model.apply(variables, **inputs, train=True, mutable=["batch_stats"])
    latent = (B, H // 4, W // 4, TINY["dim"] * 4)  # two stride-2 steps, channels doubled twice
    for name in ("h_s", "h_t", "h_s2t", "h_t2s"):
        assert out[name].shape == latent, name
    for name in ("rec_s", "rec_t", "s2t", "t2s", "cyc_s", "cyc_t"):
        assert out[name].shape == (B, H, W, 3), name
        assert float(jnp.max(jnp.abs(out[name]))) < 1.0, name  # tanh
    assert conditioning_channels(variables["params"]) == CLASSES
    # training moves every power-iteration vector (each conv gets update_stats=train)
    before, after = _paths(variables["batch_stats"]), _paths(updated["batch_stats"])
    moved = [p for p in before if p[-1].endswith("/u") and not np.allclose(before[p], after[p])]
    assert len(moved) == sum(p[-1].endswith("/u") for p in before)
    # evaluation reads the vectors and writes nothing back
    _, evaluated = model.apply(variables, inputs["x_s"], inputs["sem_s"], train=False,
                               mutable=["batch_stats"], method=_every_domain)
    assert set(_paths(evaluated["batch_stats"])) == set(before)
    for p, value in _paths(evaluated["batch_stats"]).items():
        np.testing.assert_array_equal(value, before[p])


def test_spectral_norm_wraps_every_conv(spade_translator):
    _, variables = spade_translator
    # shapes only (jax.eval_shape): nothing to compile
    disc = jax.eval_shape(ImageDiscriminators(num_scales=2, dim=4, num_layers=2).init,
                          jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    for v in (variables, disc):
        # a conv named X keeps params at .../X/conv/kernel and its vector at .../X/sn/conv/kernel/u
        kernels = {p[:-2] for p in _paths(v["params"]) if p[-1] == "kernel"}
        vectors = {p[:-2] for p in _paths(v["batch_stats"]) if p[-1] == "conv/kernel/u"}
        assert len(kernels) > 10 and kernels == vectors
    plain = Translator(**TINY, spectral_norm=False)
    plain_vars = jax.eval_shape(
        lambda: plain.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                           jnp.zeros((1, 8, 8, CLASSES)), method=_every_domain))
    assert "batch_stats" not in plain_vars
    # same params either way: spectral norm only adds state
    assert (jax.tree_util.tree_map(jnp.shape, plain_vars["params"])
            == jax.tree_util.tree_map(jnp.shape, variables["params"]))


def test_spectral_norm_state_changes_only_in_training():
    model = ImageDiscriminators(num_scales=2, dim=4, num_layers=2)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 16, 16, 3)), jnp.float32)
    variables = _variables(model, x)

    def judge(train):
        return model.apply(variables, x, "target", train=train, mutable=["batch_stats"])[1]

    evaluated, trained = judge(False), judge(True)
    before = _paths(variables["batch_stats"])
    assert set(_paths(evaluated["batch_stats"])) == set(before)
    for p, value in _paths(evaluated["batch_stats"]).items():
        np.testing.assert_array_equal(value, before[p])
    after = _paths(trained["batch_stats"])
    for p, value in before.items():
        if p[-1].endswith("/u"):
            # only the judged domain's discriminator moves
            assert (p[0] == "target") != np.allclose(value, after[p]), p


def test_power_iteration_reaches_largest_singular_value():
    """After enough training calls the kernel is divided by its largest singular value (numpy's
    SVD of the kernel flattened to [k * k * in, out]): the effective kernel has norm 1."""
    conv = ReflectConv(4, 3, spectral_norm=True)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 8, 8, 3)), jnp.float32)
    variables = _variables(conv, x)
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(27, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    matrix = (u * np.array([5.0, 2.0, 1.0, 0.5])) @ v.T
    kernel = jnp.asarray(matrix.reshape(3, 3, 3, 4), jnp.float32)
    params = {"conv": {"kernel": kernel, "bias": jnp.zeros(4)}}
    stats = variables["batch_stats"]
    step = jax.jit(lambda s: conv.apply({"params": params, "batch_stats": s}, x, True,
                                        mutable=["batch_stats"])[1]["batch_stats"])
    for _ in range(20):
        stats = step(stats)
    sigma = float(stats["sn"]["conv/kernel/sigma"])
    top = np.linalg.svd(matrix, compute_uv=False)[0]
    assert sigma == pytest.approx(top, rel=1e-4)
    effective = matrix / sigma
    assert np.linalg.svd(effective, compute_uv=False)[0] == pytest.approx(1.0, rel=1e-4)
    # the forward pass uses the normalised kernel
    out = conv.apply({"params": params, "batch_stats": stats}, x, False)
    plain = ReflectConv(4, 3).apply(
        {"params": {"conv": {"kernel": kernel / top, "bias": jnp.zeros(4)}}}, x)
    np.testing.assert_allclose(out, plain, atol=1e-5)


def test_shared_layers_are_one_module_used_by_both_domains(spade_translator, inputs):
    model, variables = spade_translator
    params = variables["params"]
    assert set(params) == {"enc_source", "enc_target", "enc_shared",
                           "gen_source", "gen_target", "gen_shared"}
    assert set(params["enc_shared"]) == {"res0"} and set(params["gen_shared"]) == {"res0"}
    assert set(params["enc_source"]["blocks"]) == {"res0"}  # n_res - n_shared private blocks
    assert set(params["gen_target"]["blocks"]) == {"res0"}
    stats = variables["batch_stats"]
    x, sem = inputs["x_s"], inputs["sem_s"]

    def both(p):
        v = {"params": p, "batch_stats": stats}
        latents = [model.apply(v, x, d, method=Translator.encode) for d in DOMAINS]
        images = [model.apply(v, latents[0], sem, d, method=Translator.decode) for d in DOMAINS]
        return latents, images

    def bumped(part):
        return {**params, part: jax.tree_util.tree_map(lambda a: a + 0.3, params[part])}

    (h_s, h_t), (g_s, g_t) = both(params)

    def changed(a, b):
        return not np.allclose(a, b, atol=1e-6)

    (hs, ht), (gs, gt) = both(bumped("enc_shared"))
    assert changed(hs, h_s) and changed(ht, h_t)
    (hs, ht), _ = both(bumped("enc_source"))
    assert changed(hs, h_s) and not changed(ht, h_t)
    _, (gs, gt) = both(bumped("gen_shared"))
    assert changed(gs, g_s) and changed(gt, g_t)
    _, (gs, gt) = both(bumped("gen_target"))
    assert changed(gt, g_t) and not changed(gs, g_s)


def _conv3x3_zero(x, kernel, bias):
    """numpy NHWC 3x3 convolution with zero padding 1 (cross-correlation, as every framework)."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,co->nhwo", xp[:, i:i + x.shape[1], j:j + x.shape[2]],
                             kernel[i, j])
    return out + bias


def test_spade_matches_numpy():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(1, 4, 6, 2)) * 3 + 1).astype(np.float32)
    seg = rng.normal(size=(1, 8, 12, 3)).astype(np.float32)
    spade = SPADE(hidden=3, spectral_norm=False)
    params = _variables(spade, x, seg, seed=6)["params"]
    out = np.asarray(spade.apply({"params": params}, x, seg))

    def p(name):
        return np.asarray(params[name]["conv"]["kernel"]), np.asarray(params[name]["conv"]["bias"])

    # PyTorch's nearest: output pixel i reads input floor(i * in / out)
    s = seg[:, (np.arange(4) * 8) // 4][:, :, (np.arange(6) * 12) // 6]
    a = np.maximum(_conv3x3_zero(s, *p("mlp_shared")), 0)
    gamma, beta = _conv3x3_zero(a, *p("mlp_gamma")), _conv3x3_zero(a, *p("mlp_beta"))
    mean = x.mean(axis=(1, 2), keepdims=True)
    x_hat = (x - mean) / np.sqrt(x.var(axis=(1, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, x_hat * (1 + gamma) + beta, rtol=1e-4, atol=1e-4)
    assert np.abs(gamma).max() > 0.1 and np.abs(beta).max() > 0.1  # not a trivial check


def test_generator_conditioning_spade_vs_in(spade_translator, inputs):
    x, sem_a, sem_b = inputs["x_s"], inputs["sem_s"], inputs["sem_t"]

    def decoded(model, variables):
        return [model.apply(variables, x, s, method=_every_domain) for s in (sem_a, sem_b)]

    model, variables = spade_translator
    a, b = decoded(model, variables)
    for d in range(2):
        assert not np.allclose(a[d], b[d], atol=1e-5)
    plain = Translator(**TINY, norm="in", spectral_norm=False)
    plain_vars = _variables(plain, x, sem_a, method=_every_domain)
    assert conditioning_channels(plain_vars["params"]) is None
    assert "spade" not in str(jax.tree_util.tree_structure(plain_vars))
    a, b = decoded(plain, plain_vars)
    for d in range(2):
        np.testing.assert_array_equal(a[d], b[d])


def test_multiscale_discriminator_shapes_and_pooling():
    model = ImageDiscriminators(num_scales=3, dim=4, num_layers=2)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 48, 3)), jnp.float32)
    variables = _variables(model, x)
    outs = model.apply(variables, x, "source")
    # two stride-2 convs per scale, each scale at half the previous one's size
    assert [o.shape for o in outs] == [(2, 8, 12, 1), (2, 4, 6, 1), (2, 2, 3, 1)]
    both = model.apply(variables, x)
    assert set(both) == {"source", "target"}
    assert not np.allclose(both["source"][0], both["target"][0])  # two separate discriminators
    np.testing.assert_array_equal(both["source"][1], outs[1])
    # 3x3 stride-2 average, padding 1 not counted: a constant stays constant at the borders
    pooled = downsample_avg(jnp.full((1, 6, 8, 2), 3.0))
    assert pooled.shape == (1, 3, 4, 2)
    np.testing.assert_allclose(pooled, 3.0, rtol=1e-6)
    ramp = jnp.arange(36.0).reshape(1, 6, 6, 1)
    # top-left output: mean of input rows 0-1, cols 0-1 (the other 5 cells are padding)
    assert float(downsample_avg(ramp)[0, 0, 0, 0]) == pytest.approx((0 + 1 + 6 + 7) / 4)
    assert float(downsample_avg(ramp)[0, 1, 1, 0]) == pytest.approx(np.mean(
        np.arange(36.0).reshape(6, 6)[1:4, 1:4]))


def test_lsgan_losses_on_constants():
    d_fake = [jnp.full((1, 4, 4, 1), 2.0), jnp.full((1, 2, 2, 1), 0.5)]
    d_real = [jnp.full((1, 4, 4, 1), 0.0), jnp.full((1, 2, 2, 1), -1.0)]
    # generator: sum over scales of mean (D(fake) - 1)^2
    assert float(lsgan_generator_loss(d_fake)) == pytest.approx(1.0 + 0.25)
    # discriminator: sum over scales of mean (D(real) - 1)^2 + mean D(fake)^2
    assert float(lsgan_discriminator_loss(d_real, d_fake)) == pytest.approx(
        (1.0 + 4.0) + (4.0 + 0.25))
    with pytest.raises(ValueError, match="scales"):
        lsgan_discriminator_loss(d_real[:1], d_fake)


def test_bad_arguments_are_errors():
    x = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="norm"):
        Translator(**{**TINY, "norm": "adain"}).init(jax.random.PRNGKey(0), x, "source",
                                                    method=Translator.encode)
    with pytest.raises(ValueError, match="domain"):
        Translator(**TINY).init(jax.random.PRNGKey(0), x, "real", method=Translator.encode)
    with pytest.raises(ValueError, match="n_shared"):
        Translator(**{**TINY, "n_shared": 3}).init(jax.random.PRNGKey(0), x, "source",
                                                  method=Translator.encode)
