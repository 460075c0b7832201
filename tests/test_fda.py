"""FDA on jnp.fft against the published procedures written out in numpy (shifted spectrum and
a centred slice; unshifted spectrum and four corner slices), and as a loop input option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax import fda, images


def published_centered(src_chw: np.ndarray, trg_chw: np.ndarray, beta: float) -> np.ndarray:
    """FDA's numpy procedure on one [C, H, W] pair: fftshift the amplitudes, copy the
    (2b+1)^2 square around the centre from the target, shift back, recombine with the phase."""
    f_s, f_t = np.fft.fft2(src_chw, axes=(-2, -1)), np.fft.fft2(trg_chw, axes=(-2, -1))
    amp_s, pha_s, amp_t = np.abs(f_s), np.angle(f_s), np.abs(f_t)
    amp_s, amp_t = np.fft.fftshift(amp_s, axes=(-2, -1)), np.fft.fftshift(amp_t, axes=(-2, -1))
    _, h, w = src_chw.shape
    b = int(np.floor(min(h, w) * beta))
    ch, cw = h // 2, w // 2
    amp_s[:, ch - b:ch + b + 1, cw - b:cw + b + 1] = amp_t[:, ch - b:ch + b + 1, cw - b:cw + b + 1]
    amp_s = np.fft.ifftshift(amp_s, axes=(-2, -1))
    return np.real(np.fft.ifft2(amp_s * np.exp(1j * pha_s), axes=(-2, -1)))


def published_corners(src_chw: np.ndarray, trg_chw: np.ndarray, beta: float) -> np.ndarray:
    """FDA's training-code procedure: the four b x b corners of the unshifted amplitude."""
    f_s, f_t = np.fft.fft2(src_chw, axes=(-2, -1)), np.fft.fft2(trg_chw, axes=(-2, -1))
    amp_s, pha_s, amp_t = np.abs(f_s), np.angle(f_s), np.abs(f_t)
    _, h, w = src_chw.shape
    b = int(np.floor(min(h, w) * beta))
    for rows in (slice(0, b), slice(h - b, h)):
        for cols in (slice(0, b), slice(w - b, w)):
            amp_s[:, rows, cols] = amp_t[:, rows, cols]
    return np.real(np.fft.ifft2(amp_s * np.exp(1j * pha_s), axes=(-2, -1)))


def _images(shape=(2, 40, 56, 3), seed=0):
    rng = np.random.default_rng(seed)
    # Smooth-ish content plus noise, in 0..255 like a photo.
    src = np.clip(rng.normal(120, 60, shape), 0, 255).astype(np.float32)
    trg = np.clip(rng.normal(80, 30, shape) + np.linspace(0, 90, shape[2])[None, None, :, None],
                  0, 255).astype(np.float32)
    return src, trg


@pytest.mark.parametrize("variant,published", [("centered", published_centered),
                                               ("corners", published_corners)])
@pytest.mark.parametrize("beta", [0.01, 0.05, 0.09])
@pytest.mark.parametrize("shape", [(2, 40, 56, 3), (1, 33, 47, 3)])
def test_matches_the_published_procedure(variant, published, beta, shape):
    src, trg = _images(shape)
    ours = np.asarray(fda.source_to_target(jnp.asarray(src), jnp.asarray(trg), beta, variant))
    for i in range(shape[0]):
        want = published(src[i].transpose(2, 0, 1).astype(np.float64),
                         trg[i].transpose(2, 0, 1).astype(np.float64), beta).transpose(1, 2, 0)
        # 1e-4 relative to the 0..255 range.
        np.testing.assert_allclose(ours[i], want, atol=255e-4, rtol=0)
    # The two windows really differ (for b > 0), so each test checks its own variant.
    if fda.window_half_size(shape[1], shape[2], beta) > 0:
        other = "corners" if variant == "centered" else "centered"
        assert not np.allclose(fda.source_to_target(src, trg, beta, other), ours, atol=1e-2)


def test_the_smallest_window_takes_the_target_mean_colour():
    """b = 0: the centred window is the zero frequency alone, i.e. each channel's mean."""
    src, trg = _images((1, 20, 30, 3))
    out = np.asarray(fda.source_to_target(src, trg, 0.01, "centered"))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), trg.mean(axis=(1, 2)), rtol=1e-4)
    np.testing.assert_allclose(out - out.mean(axis=(1, 2), keepdims=True),
                               src - src.mean(axis=(1, 2), keepdims=True), atol=1e-2)
    # The corner window is empty at b = 0: the image comes back unchanged.
    np.testing.assert_allclose(fda.source_to_target(src, trg, 0.01, "corners"), src, atol=1e-2)


@pytest.mark.parametrize("beta", [0.0, -0.1, 0.5, 0.7])
def test_a_beta_outside_the_open_interval_is_named(beta):
    with pytest.raises(ValueError, match=rf"FDA beta must be in \(0, 0.5\).*got {beta!r}"):
        fda.low_frequency_mask(32, 32, beta, "centered")


def test_bad_variant_and_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match="variant must be one of"):
        fda.batch_transform(0.01, "middle", "caffe_bgr")
    with pytest.raises(ValueError, match=r"one shape, got \(1, 8, 8, 3\) and \(1, 8, 9, 3\)"):
        fda.source_to_target(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 9, 3)), 0.01)


@pytest.mark.parametrize("normalization", ["caffe_bgr", "imagenet_rgb"])
def test_batch_transform_translates_raw_images_and_renormalises(normalization):
    src, trg = _images((2, 24, 32, 3), seed=3)
    batch = {"source": {"image": images.normalize(jnp.asarray(src), normalization),
                        "label": jnp.zeros((2, 24, 32), jnp.uint8)},
             "target": {"image": images.normalize(jnp.asarray(trg), normalization)}}
    transform = fda.batch_transform(0.05, "centered", normalization)
    out = jax.jit(transform)(batch)
    want = images.normalize(fda.source_to_target(src, trg, 0.05, "centered"), normalization)
    np.testing.assert_allclose(out["source"]["image"], want, atol=1e-3)
    np.testing.assert_array_equal(out["target"]["image"], batch["target"]["image"])
    np.testing.assert_array_equal(out["source"]["label"], batch["source"]["label"])
    assert fda.batch_transform(0.0, "centered", normalization) is None


def test_the_loop_feeds_any_methods_step_the_translated_batch():
    from configs import source_only
    from synseg_jax import train
    config = source_only.get_config("demo,data.target=minicity,data.target_split=real_train,"
                                    "fda.beta=0.05,fda.variant=corners")
    src, trg = _images((2, 24, 32, 3), seed=5)
    norm = config.data.normalization
    batch = {"source": {"image": images.normalize(jnp.asarray(src), norm)},
             "target": {"image": images.normalize(jnp.asarray(trg), norm)}}
    seen = []
    step = train.with_input_transform(lambda state, b: seen.append(b) or {}, config)
    step(None, batch)
    want = images.normalize(fda.source_to_target(src, trg, 0.05, "corners"), norm)
    np.testing.assert_allclose(seen[0]["source"]["image"], want, atol=1e-3)
    pictures = train.with_input_transform(lambda state, b: {"x": b["source"]["image"]}, config,
                                          show_original=True)(None, batch)
    np.testing.assert_array_equal(pictures["train/source_image_before_fda"][0],
                                  np.clip(np.rint(src[0]), 0, 255).astype(np.uint8))
    # Off by default; on without target images it says what to set.
    assert train.with_input_transform(len, source_only.get_config("demo")) is len
    with pytest.raises(ValueError, match="fda.beta=0.05 needs target images: set data.target"):
        train.with_input_transform(len, source_only.get_config("demo,fda.beta=0.05"))
