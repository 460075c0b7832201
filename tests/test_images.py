"""The neutral image module: normalisation and every resize convention, checked against PyTorch's
F.interpolate (the reference codes' resize), and the crop-box grid in numpy and under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax import images

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_resize(x: np.ndarray, size, mode: str, align_corners=None) -> np.ndarray:
    """NHWC numpy through F.interpolate (which is NCHW)."""
    t = torch.from_numpy(np.array(np.moveaxis(x, -1, 1)))
    out = F.interpolate(t, size=tuple(size), mode=mode, align_corners=align_corners)
    return np.moveaxis(out.numpy(), 1, -1)


SIZES = [((5, 6), (12, 17)), ((5, 6), (3, 4)), ((9, 11), (4, 6)), ((4, 4), (32, 32)),
         ((1, 1), (4, 4))]


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_bilinear_matches_pytorch(src, dst, align_corners):
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, *src, 3)))
    want = torch_resize(x, dst, "bilinear", align_corners)
    got = images.resize_bilinear(jnp.asarray(x), dst, align_corners=align_corners)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    jitted = jax.jit(images.resize_bilinear, static_argnums=(1, 2))
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(x), dst, align_corners)), want,
                               atol=1e-5)


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_bilinear_gradient_matches_pytorch(src, dst, align_corners):
    """The resize has its own backward pass (transposed interpolation matrices, where the forward
    pass gathers): its input gradient is PyTorch's."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, *src, 3)))
    g = np.asarray(jax.random.normal(jax.random.key(1), (2, *dst, 3)))
    t = torch.from_numpy(np.array(np.moveaxis(x, -1, 1))).requires_grad_()
    out = F.interpolate(t, size=tuple(dst), mode="bilinear", align_corners=align_corners)
    (out * torch.from_numpy(np.array(np.moveaxis(g, -1, 1)))).sum().backward()
    want = np.moveaxis(t.grad.numpy(), 1, -1)
    loss = lambda x: jnp.sum(images.resize_bilinear(x, dst, align_corners) * g)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x))), want,
                               atol=1e-5)


def test_resize_bilinear_conventions_differ_and_take_channelless_maps():
    x = jax.random.normal(jax.random.key(1), (1, 4, 6))  # [N, H, W]: a probability map
    a = images.resize_bilinear(x, (8, 12))
    b = images.resize_bilinear(x, (8, 12), align_corners=True)
    assert a.shape == b.shape == (1, 8, 12)
    assert float(jnp.abs(a - b).max()) > 1e-2  # the choice matters, so presets must name it


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("half_pixel,mode", [(False, "nearest"), (True, "nearest-exact")])
def test_resize_nearest_matches_pytorch_and_keeps_integers(src, dst, half_pixel, mode):
    labels = np.random.default_rng(0).integers(0, 256, (2, *src, 1)).astype(np.uint8)
    want = torch_resize(labels.astype(np.float32), dst, mode).astype(np.uint8)
    got = images.resize_nearest(jnp.asarray(labels), dst, half_pixel=half_pixel)
    assert got.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(got), want)
    # [N, H, W] label maps too, and 255 survives exactly.
    flat = images.resize_nearest(jnp.full((1, *src), 255, jnp.uint8), dst, half_pixel=half_pixel)
    assert flat.shape == (1, *dst) and int(flat.min()) == 255


def test_normalize_numerics_and_inverse_in_numpy_and_jax():
    rgb = np.array([[[10, 120, 250], [0, 0, 0]]], np.float32)
    caffe = images.normalize(rgb, "caffe_bgr")
    np.testing.assert_allclose(caffe[0, 0], [250 - 104.008, 120 - 116.669, 10 - 122.679],
                               rtol=1e-6)
    imnet = images.normalize(jnp.asarray(rgb), "imagenet_rgb")
    np.testing.assert_allclose(
        np.asarray(imnet)[0, 0], [(10 / 255 - 0.485) / 0.229, (120 / 255 - 0.456) / 0.224,
                                  (250 / 255 - 0.406) / 0.225], rtol=1e-5)
    assert caffe.dtype == np.float32 and imnet.dtype == jnp.float32
    for mode in images.NORMALIZATIONS:
        x = images.normalize(rgb, mode)
        np.testing.assert_allclose(images.denormalize(x, mode), rgb, atol=1e-3)
        np.testing.assert_allclose(np.asarray(jax.jit(images.denormalize, static_argnums=1)(
            jnp.asarray(x), mode)), rgb, atol=1e-3)
        shown = images.to_uint8(x, mode)
        assert shown.dtype == np.uint8
        np.testing.assert_array_equal(shown, rgb.astype(np.uint8))
    with pytest.raises(ValueError, match="bgr"):
        images.normalize(rgb, "bgr")


def test_crop_box_grid_batched_and_under_jax():
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.25, 0.75, 0.75, 0.25]], np.float32)
    ys, xs = images.crop_box_grid(boxes, 2, 4)
    assert ys.shape == xs.shape == (2, 2, 4)
    np.testing.assert_allclose(ys[0, :, 0], [0.25, 0.75])
    np.testing.assert_allclose(xs[0, 0], [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(xs[1, 0], [0.6875, 0.5625, 0.4375, 0.3125])  # flipped
    jys, jxs = jax.jit(lambda b: images.crop_box_grid(b, 2, 4, xp=jnp))(jnp.asarray(boxes))
    np.testing.assert_allclose(np.asarray(jys), ys)
    np.testing.assert_allclose(np.asarray(jxs), xs)


def test_methods_and_losses_import_no_tensorflow():
    """A jitted method must not pull TensorFlow in (the GPU image has none)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = ("import sys; import synseg_jax.methods, synseg_jax.losses, synseg_jax.images; "
            "bad = [m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_methods_and_models_never_import_the_data_layer():
    """Layers only import downwards: what a method or a network needs of the data's
    conventions (label colours, normalisation) lives in the neutral `images`."""
    import ast  # noqa: PLC0415
    import pathlib  # noqa: PLC0415

    package = pathlib.Path(images.__file__).parent
    offenders = []
    for path in sorted([*package.glob("methods/*.py"), *package.glob("models/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "synseg_jax":
                names = [f"synseg_jax.{a.name}" for a in node.names]
            offenders += [f"{path.relative_to(package)}: {n}" for n in names
                          if n == "synseg_jax.data" or n.startswith("synseg_jax.data.")]
    assert not offenders, offenders
