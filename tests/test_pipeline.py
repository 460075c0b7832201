"""Tests for the tf.data input pipeline: every op eagerly and inside Dataset.map, alignment of
labels and crop boxes with pixels, streams, padding, determinism and error paths."""

import logging
import time

import numpy as np
import pytest
import tensorflow as tf

from synseg_jax import images, parallel
from synseg_jax.data import labels as L
from synseg_jax.data import pipeline as P

H, W = 96, 160  # coordinate images: channel 0 = row, channel 1 = column (fits in uint8)


def coord_image(h=H, w=W):
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 7)], -1).astype(np.uint8)


def eager_and_mapped(fn, inputs):
    """Run ``fn(**inputs)`` eagerly and inside Dataset.map; check both agree; return numpy."""
    eager = tf.nest.map_structure(lambda t: t.numpy(), fn(**inputs))
    ds = tf.data.Dataset.from_tensors(inputs).map(lambda d: fn(**d))
    mapped = tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds)))
    tf.nest.map_structure(np.testing.assert_array_equal, eager, mapped)
    return eager


def seed(k):
    return tf.constant([k, 12345], tf.int64)


def make_ds(n, h=H, w=W, label_fn=None, with_label=True):
    """n examples whose image encodes the example number in channel 2."""
    images = np.repeat(coord_image(h, w)[None], n, 0)
    images[..., 2] = np.arange(n, dtype=np.uint8)[:, None, None]
    data = {"image": images}
    if with_label:
        data["label"] = (label_fn(n, h, w) if label_fn else
                         np.tile(np.array([7, 8, 11, 0], np.uint8), n * h * w // 4 + 1)
                         [: n * h * w].reshape(n, h, w))
    return tf.data.Dataset.from_tensor_slices(data)


# ------------------------------------------------------------------------------------------------
# Label mapping


@pytest.mark.parametrize("table_name", ["cityscapes", "synthia", "train_id"])
def test_map_labels_matches_numpy_and_counts_unknown(table_name):
    table = L.label_table(table_name)
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected, unknown = L.map_to_train_ids(raw, table)
    assert unknown > 0  # every table leaves ids 34..254 (at least) outside its taxonomy
    got, count = eager_and_mapped(lambda label: P.map_labels(label, table), {"label": raw})
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.uint8 and count == unknown


def test_map_labels_squeezes_channel_and_counts_ids_beyond_table():
    raw = np.array([[7, 300], [33, 1000]], np.int32)[..., None]
    got, count = eager_and_mapped(lambda label: P.map_labels(label, L.CITYSCAPES_TABLE),
                                  {"label": raw})
    np.testing.assert_array_equal(got, [[0, 255], [18, 255]])
    assert count == 2


def test_unknown_label_pixels_are_warned_and_removed(caplog):
    def labels(n, h, w):
        lab = np.full((n, h, w), 7, np.uint8)
        lab[:, 0, :5] = 200  # 5 unknown pixels per image
        return lab

    ds = P.eval_stream(make_ds(3, 8, 8, labels), batch_size=2, table=L.CITYSCAPES_TABLE)
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        it = P.HostIterator(ds, name="gta5/train")
        batches = list(it)
    assert all(P.UNKNOWN_PIXELS not in b for b in batches)
    assert it.unknown_label_pixels == 15
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2 and "gta5/train: 10 label pixels" in messages[0]
    assert "5 label pixels" in messages[1] and "(15 so far)" in messages[1]
    assert (batches[0]["label"][:, 0, :5] == 255).all()


# ------------------------------------------------------------------------------------------------
# Geometry


def test_resize_keeps_label_on_image_grid():
    def fn(image, label):
        return P.resize(image, label, (61, 203))

    rows = np.repeat(np.arange(H, dtype=np.uint8)[:, None], W, 1)
    image, label = eager_and_mapped(fn, {"image": coord_image(), "label": rows})
    assert image.shape == (61, 203, 3) and image.dtype == np.float32
    assert label.shape == (61, 203) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(H))  # nearest: no invented label values
    assert np.abs(image[..., 0] - label).max() <= 1.0


SCALE_CASES = [  # (scale_range, crop): upscaling, downscaling, and crops larger than the image
    ((1.0, 1.0), (64, 96)),
    ((1.3, 2.0), (64, 96)),
    ((0.5, 0.9), (64, 96)),
    ((0.4, 0.6), (80, 128)),  # scaled image smaller than the crop: padding on random sides
]


def scale_crop_flip(image, label, sd, scale_range, crop, flip_prob):
    img, lab, box = P.random_scale_crop(image, label, tf.constant(P.FULL_BOX), sd,
                                        crop_size=crop, scale_range=scale_range)
    img, lab, box = P.random_flip(img, lab, box, P.example_seed(0, 0, sd[0]), prob=flip_prob)
    return (img, box) if lab is None else (img, lab, box)


@pytest.mark.parametrize("scale_range,crop", SCALE_CASES)
@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_scale_crop_flip_keeps_label_aligned(scale_range, crop, flip_prob):
    rows = np.repeat(np.arange(H, dtype=np.uint8)[:, None], W, 1)
    cols = np.repeat(np.arange(W, dtype=np.uint8)[None, :], H, 0)
    for k in range(3):
        outs = [eager_and_mapped(
            lambda image, label, sd: scale_crop_flip(image, label, sd, scale_range, crop,
                                                     flip_prob),
            {"image": coord_image(), "label": lab, "sd": seed(k)}) for lab in (rows, cols)]
        (image, row_label, box), (image2, col_label, box2) = outs
        np.testing.assert_array_equal(image, image2)  # same seed, same geometry
        np.testing.assert_array_equal(box, box2)
        assert image.shape == (*crop, 3) and row_label.shape == crop
        valid = row_label != 255
        np.testing.assert_array_equal(valid, col_label != 255)
        assert valid.mean() > 0.2
        assert np.abs(image[..., 0] - row_label)[valid].max() <= 1.0
        assert np.abs(image[..., 1] - col_label)[valid].max() <= 1.0
        # Padding carries the pad colour in the image and ignore in the label.
        np.testing.assert_allclose(image[~valid], np.broadcast_to(P.PAD_RGB, image[~valid].shape),
                                   atol=1e-4)
        if scale_range[1] * H < crop[0]:
            assert (~valid).any()


@pytest.mark.parametrize("scale_range,crop", SCALE_CASES)
@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_crop_box_maps_output_pixels_to_original_coordinates(scale_range, crop, flip_prob):
    for k in range(3):
        image, box = eager_and_mapped(
            lambda image, sd: scale_crop_flip(image, None, sd, scale_range, crop, flip_prob),
            {"image": coord_image(), "sd": seed(k)})
        if flip_prob:
            assert box[1] > box[3]
        ys, xs = images.crop_box_grid(box, *crop)
        # Pixel r of the original has its centre at (r + 0.5) / H, and its value is r.
        want_row, want_col = ys * H - 0.5, xs * W - 0.5
        # Away from the borders (where resampling clamps) a linear ramp resamples exactly.
        inner = (want_row > 2) & (want_row < H - 3) & (want_col > 2) & (want_col < W - 3)
        assert inner.mean() > 0.2
        # Antialiased downscaling samples its triangle kernel at whole pixels, which biases
        # a ramp by < 0.06 px; plain bilinear resampling is exact.
        atol = 0.02 if scale_range[0] >= 1.0 else 0.1
        np.testing.assert_allclose(image[..., 0][inner], want_row[inner], atol=atol)
        np.testing.assert_allclose(image[..., 1][inner], want_col[inner], atol=atol)
        outside = (ys < 0) | (ys > 1) | (xs < 0) | (xs > 1)
        np.testing.assert_allclose(image[..., 2][outside], P.PAD_RGB[2], atol=1e-4)


def test_flip_probabilities_and_box():
    image = coord_image(4, 6)
    label = image[..., 1].copy()
    box = tf.constant([0.1, 0.2, 0.6, 0.9])
    for prob, flipped in ((0.0, False), (1.0, True)):
        img, lab, b = eager_and_mapped(
            lambda image, label, sd: P.random_flip(image, label, box, sd, prob=prob),
            {"image": image, "label": label, "sd": seed(1)})
        np.testing.assert_array_equal(img, image[:, ::-1] if flipped else image)
        np.testing.assert_array_equal(lab, label[:, ::-1] if flipped else label)
        np.testing.assert_allclose(b, [0.1, 0.9, 0.6, 0.2] if flipped else [0.1, 0.2, 0.6, 0.9])
    flips = [bool(P.random_flip(image, None, box, seed(k), prob=0.5)[2][1] > 0.5)
             for k in range(40)]
    assert 5 < sum(flips) < 35


def test_scale_crop_rejects_mismatched_label():
    with pytest.raises(tf.errors.InvalidArgumentError, match="sizes differ"):
        P.random_scale_crop(coord_image(), np.zeros((H // 2, W // 2), np.uint8),
                            tf.constant(P.FULL_BOX), seed(0), crop_size=(32, 32))


# ------------------------------------------------------------------------------------------------
# Photometric


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_jitter_probability_zero_is_identity_and_one_changes(op):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    off = P.Jitter(brightness_prob=0.0, contrast_prob=0.0, saturation_prob=0.0)
    on = P.Jitter(**{**dict(brightness_prob=0.0, contrast_prob=0.0, saturation_prob=0.0),
                     f"{op}_prob": 1.0})
    for k in range(4):
        same = eager_and_mapped(lambda image, sd: P.color_jitter(image, sd, off),
                                {"image": image, "sd": seed(k)})
        np.testing.assert_array_equal(same, image.astype(np.float32))
        changed = eager_and_mapped(lambda image, sd: P.color_jitter(image, sd, on),
                                   {"image": image, "sd": seed(k)})
        assert changed.dtype == np.float32 and changed.min() >= 0 and changed.max() <= 255
        assert np.abs(changed - image).mean() > 0.1


def test_jitter_ops_numerics():
    image = tf.constant([[[100.0, 150.0, 200.0], [0.0, 50.0, 250.0]]])
    np.testing.assert_allclose(P.adjust_brightness(image, 1.5), [[[150, 225, 255], [0, 75, 255]]])
    gray = image.numpy() @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(P.adjust_saturation(image, 0.0),
                               np.repeat(gray[..., None], 3, -1), rtol=1e-5)
    np.testing.assert_allclose(P.adjust_contrast(image, 0.0),
                               np.full((1, 2, 3), gray.mean()), rtol=1e-5)
    np.testing.assert_allclose(P.adjust_contrast(image, 1.0), image, rtol=1e-5)


def test_normalize_numerics_and_inverse():
    rgb = np.array([[[10, 120, 250], [0, 0, 0]]], np.uint8)
    caffe = eager_and_mapped(lambda image: P.normalize(image, "caffe_bgr"), {"image": rgb})
    np.testing.assert_allclose(caffe[0, 0], [250 - 104.008, 120 - 116.669, 10 - 122.679],
                               rtol=1e-6)
    imnet = eager_and_mapped(lambda image: P.normalize(image, "imagenet_rgb"), {"image": rgb})
    np.testing.assert_allclose(
        imnet[0, 0], [(10 / 255 - 0.485) / 0.229, (120 / 255 - 0.456) / 0.224,
                      (250 / 255 - 0.406) / 0.225], rtol=1e-5)
    assert caffe.dtype == imnet.dtype == np.float32
    for mode, x in (("caffe_bgr", caffe), ("imagenet_rgb", imnet)):
        # The TF pipeline and the neutral module agree, both ways.
        np.testing.assert_allclose(images.normalize(rgb.astype(np.float32), mode), x, rtol=1e-6)
        np.testing.assert_allclose(images.denormalize(tf.constant(x), mode).numpy(), rgb,
                                   atol=1e-3)
    with pytest.raises(ValueError, match="normalization"):
        P.normalize(rgb, "bgr")


# ------------------------------------------------------------------------------------------------
# Example-level ops and configs


def test_augment_example_eager_and_mapped_with_everything_on():
    config = P.AugmentConfig(resize=(72, 120), scale_range=(0.75, 1.5), crop=(48, 64),
                             flip_prob=0.5, jitter=P.Jitter(), normalization="imagenet_rgb")
    rows = np.repeat(np.arange(H, dtype=np.uint8)[:, None], W, 1)
    for k in range(4):
        out = eager_and_mapped(
            lambda image, label, i: P.preprocess_train_example(
                i, {"image": image, "label": label}, table=L.TRAIN_ID_TABLE, config=config,
                seed=3),
            {"image": coord_image(), "label": rows % 19, "i": tf.constant(k, tf.int64)})
        assert out["image"].shape == (48, 64, 3) and out["label"].shape == (48, 64)
        assert out["crop_box"].shape == (4,) and out["unknown_label_pixels"] == 0


def test_augment_config_validation():
    with pytest.raises(ValueError, match="crop"):
        P.AugmentConfig(scale_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="scale_range"):
        P.AugmentConfig(scale_range=(1.5, 0.5), crop=(8, 8))
    with pytest.raises(ValueError, match="normalization"):
        P.AugmentConfig(normalization="rgb")
    with pytest.raises(ValueError, match="flip_prob"):
        P.AugmentConfig(flip_prob=2.0)
    with pytest.raises(ValueError, match="contrast_prob"):
        P.Jitter(contrast_prob=1.5)


# ------------------------------------------------------------------------------------------------
# Streams

TRAIN_CONFIG = P.AugmentConfig(scale_range=(0.75, 1.25), crop=(32, 48), jitter=P.Jitter())


def take(ds, n):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def test_train_stream_batches_and_fresh_augmentation_each_epoch():
    config = P.AugmentConfig(scale_range=(0.75, 1.25), crop=(32, 48))  # jitter would hide ids
    ds = P.train_stream(make_ds(3), config=config, batch_size=2, seed=0,
                        table=L.CITYSCAPES_TABLE)
    batches = take(ds, 6)  # 12 examples = 4 epochs of 3 images
    b = batches[0]
    assert b["image"].shape == (2, 32, 48, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (2, 32, 48) and b["crop_box"].shape == (2, 4)
    labels = np.concatenate([x["label"] for x in batches])
    assert set(np.unique(labels)) <= {0, 1, 2, 255}  # 7, 8, 11 → 0, 1, 2; 0 → ignore
    boxes = np.concatenate([x["crop_box"] for x in batches])
    assert len({tuple(np.round(bx, 5)) for bx in boxes}) == len(boxes)
    # Every epoch sees each of the 3 images once (channel 2 of the image holds its number).
    ids = [int(round(images.denormalize(img, "caffe_bgr")[..., 2].mean()))
           for x in batches for img in x["image"]]
    for epoch in range(4):
        assert sorted(ids[3 * epoch: 3 * epoch + 3]) == [0, 1, 2]


def test_streams_accept_image_level_labels():
    ds = tf.data.Dataset.from_tensor_slices({"image": np.stack([coord_image()] * 3),
                                             "label": np.array([4, 200, 18], np.int32)})
    config = P.AugmentConfig(resize=(24, 40), flip_prob=1.0)
    train = take(P.train_stream(ds, config=config, batch_size=3, seed=0,
                                table=L.TRAIN_ID_TABLE, shuffle_buffer=1), 1)[0]
    np.testing.assert_array_equal(train["label"], [4, 255, 18])
    np.testing.assert_array_equal(train["unknown_label_pixels"], [0, 1, 0])
    evaluation = take(P.eval_stream(ds, batch_size=2, table=L.TRAIN_ID_TABLE,
                                    image_size=(24, 40)), 5)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in evaluation]),
                                  [4, 255, 18, 255])


def test_train_stream_without_labels_and_label_errors():
    ds = P.train_stream(make_ds(2), config=TRAIN_CONFIG, batch_size=2, seed=0, keep_label=False)
    assert set(ds.element_spec) == {"image", "crop_box"}
    with pytest.raises(ValueError, match="no labels"):
        P.train_stream(make_ds(2, with_label=False), config=TRAIN_CONFIG, batch_size=2, seed=0,
                       table=L.CITYSCAPES_TABLE)


def test_seeded_determinism():
    def stream(seed):
        return P.paired_stream(make_ds(5), make_ds(4), batch_size=2, seed=seed,
                               source_table=L.CITYSCAPES_TABLE, source_config=TRAIN_CONFIG)

    a, b, c = take(stream(7), 4), take(stream(7), 4), take(stream(8), 4)
    tf.nest.map_structure(np.testing.assert_array_equal, a, b)
    assert any(not np.array_equal(x["source"]["crop_box"], y["source"]["crop_box"])
               for x, y in zip(a, c))
    # Source and target draw independent randomness from the same seed.
    assert not np.array_equal(a[0]["source"]["crop_box"], a[0]["target"]["crop_box"])


def test_a_stream_started_at_batch_k_is_the_whole_stream_from_k():
    """What a resumed run relies on: order, shuffles across epochs and augmentation are a pure
    function of the position, so starting at batch k replays batches k, k+1, ... exactly."""
    def stream(start):
        return P.paired_stream(make_ds(5), make_ds(4), batch_size=2, target_batch_size=3, seed=3,
                               source_table=L.CITYSCAPES_TABLE, source_config=TRAIN_CONFIG,
                               start_batch=start)

    whole = take(stream(0), 9)  # several epochs of both domains
    for k in (1, 4, 6):
        tf.nest.map_structure(np.testing.assert_array_equal, take(stream(k), 9 - k), whole[k:])


def test_paired_stream_structure():
    target_config = P.AugmentConfig(crop=(16, 24), normalization="caffe_bgr")
    ds = P.paired_stream(make_ds(4), make_ds(3), batch_size=2, target_batch_size=3, seed=0,
                         source_table=L.GTA5_TABLE, source_config=TRAIN_CONFIG,
                         target_config=target_config)
    batch = take(ds, 1)[0]
    assert set(batch) == {"source", "target"}
    assert set(batch["source"]) == {"image", "label", "crop_box", "unknown_label_pixels"}
    assert set(batch["target"]) == {"image", "crop_box"}
    assert batch["target"]["image"].shape == (3, 16, 24, 3)
    with_labels = P.paired_stream(make_ds(4), make_ds(3), batch_size=2, seed=0,
                                  source_table=L.GTA5_TABLE, source_config=TRAIN_CONFIG,
                                  target_table=L.CITYSCAPES_TABLE, target_labels=True)
    host = next(P.HostIterator(with_labels))
    assert set(host["target"]) == {"image", "label", "crop_box"}
    assert host["target"]["label"].shape == (2, 32, 48)


@pytest.mark.parametrize("num_batches", [None, 5])
def test_eval_stream_scores_every_example_once(num_batches):
    n, bs = 7, 3
    ds = P.eval_stream(make_ds(n), batch_size=bs, table=L.CITYSCAPES_TABLE, image_size=(24, 40),
                       num_batches=num_batches, index_offset=100)
    batches = take(ds, 100)
    assert len(batches) == (num_batches or 3)
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert sorted(index[mask]) == list(range(100, 100 + n))
    assert (index[~mask] == -1).all() and mask.sum() == n
    raw = next(iter(make_ds(1)))["label"].numpy()
    expected, _ = L.map_to_train_ids(raw, L.CITYSCAPES_TABLE)
    for b in batches:
        assert b["image"].shape == (bs, 24, 40, 3)
        assert b["label"].shape == (bs, H, W)  # labels stay at full resolution
        for lab, m in zip(b["label"], b["mask"]):
            np.testing.assert_array_equal(lab, expected if m else np.full((H, W), 255))
        # Padding images are zeros; real images come from the inputs (coordinate ramps).
        assert (b["image"][~b["mask"]] == 0).all()


def test_eval_stream_is_deterministic_and_resizes_varied_images():
    sizes = [(40, 60), (50, 70), (30, 90)]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"image": np.zeros((*s, 3), np.uint8), "label": np.full((20, 30), 7, np.uint8)}
                 for s in sizes),
        output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8),
                          "label": tf.TensorSpec([None, None], tf.uint8)})
    stream = P.eval_stream(ds, batch_size=2, table=L.CITYSCAPES_TABLE, image_size=(16, 24))
    a, b = take(stream, 10), take(stream, 10)
    tf.nest.map_structure(np.testing.assert_array_equal, a, b)
    assert [x["index"].tolist() for x in a] == [[0, 1], [2, -1]]


def test_eval_stream_errors():
    ds = make_ds(5)
    with pytest.raises(ValueError, match="needs 3 batches"):
        P.eval_stream(ds, batch_size=2, table=L.CITYSCAPES_TABLE, image_size=(8, 8), num_batches=2)
    mixed = tf.data.Dataset.from_generator(
        lambda: ({"image": np.zeros((8, 8, 3), np.uint8), "label": np.zeros(s, np.uint8)}
                 for s in [(8, 8), (8, 8), (6, 10)]),
        output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8),
                          "label": tf.TensorSpec([None, None], tf.uint8)})
    stream = P.eval_stream(mixed, batch_size=2, table=L.CITYSCAPES_TABLE, image_size=(8, 8),
                           name="cityscapes/validation")
    with pytest.raises(tf.errors.InvalidArgumentError, match="must all be 8x8"):
        take(stream, 10)
    varied = tf.data.Dataset.from_generator(
        lambda: ({"image": np.zeros((*s, 3), np.uint8)} for s in [(8, 8), (6, 10)]),
        output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8)})
    stream = P.eval_stream(varied, batch_size=2, name="unlabelled")
    with pytest.raises(tf.errors.InvalidArgumentError, match="all images must be 8x8"):
        take(stream, 10)


def test_eval_stream_without_resize_or_labels():
    stream = P.eval_stream(make_ds(3, with_label=False), batch_size=2, num_batches=3,
                           normalization="imagenet_rgb")
    batches = take(stream, 10)
    assert len(batches) == 3 and set(batches[0]) == {"image", "index", "mask"}
    assert batches[0]["image"].shape == (2, H, W, 3)
    np.testing.assert_allclose(images.denormalize(batches[0]["image"][0], "imagenet_rgb")[..., :2],
                               coord_image()[..., :2], atol=1e-3)


@pytest.mark.parametrize("kind", ["train", "paired", "eval"])
@pytest.mark.parametrize("filtered", [False, True])
def test_empty_split_is_an_error_not_a_hang(kind, filtered):
    empty = make_ds(2)
    empty = empty.filter(lambda ex: False) if filtered else empty.take(0)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="'cityscapes/train\\[0:0\\]' is empty"):
        if kind == "train":
            P.train_stream(empty, config=TRAIN_CONFIG, batch_size=2, seed=0,
                           table=L.CITYSCAPES_TABLE, name="cityscapes/train[0:0]")
        elif kind == "paired":
            P.paired_stream(make_ds(2), empty, batch_size=2, seed=0,
                            source_table=L.GTA5_TABLE, source_config=TRAIN_CONFIG,
                            target_name="cityscapes/train[0:0]")
        else:
            P.eval_stream(empty, batch_size=2, table=L.CITYSCAPES_TABLE,
                          name="cityscapes/train[0:0]")
    assert time.perf_counter() - start < 10


def test_host_iterator_forms_global_arrays():
    mesh = parallel.make_mesh()
    ds = P.train_stream(make_ds(2), config=TRAIN_CONFIG, batch_size=2, seed=0,
                        table=L.CITYSCAPES_TABLE)
    batch = next(P.HostIterator(ds, mesh=mesh))
    assert set(batch) == {"image", "label", "crop_box"}
    assert batch["image"].shape == (2, 32, 48, 3)
    assert batch["image"].sharding == parallel.data_sharding(mesh)


def _record_end(path: str, records: int) -> int:
    """Byte offset just after the first `records` TFRecords of a shard (length, crc, data, crc)."""
    offset = 0
    with open(path, "rb") as f:
        for _ in range(records):
            f.seek(offset)
            length = int.from_bytes(f.read(8), "little")
            offset += 8 + 4 + length + 4
    return offset


@pytest.mark.parametrize("cut", ["inside_a_record", "between_records"])
def test_a_truncated_shard_is_named_by_its_dataset_and_folder(tmp_path, cut):
    """TF says only "truncated record at N" (or, cut between records, that the dataset holds
    fewer elements than expected); the error names the split and its folder."""
    import glob  # noqa: PLC0415

    from synseg_jax.data import datasets  # noqa: PLC0415
    from synseg_jax.data.builders.minicity import MinicityOptions  # noqa: PLC0415

    counts = {"sim": 2, "sim_topdown": 2, "real_train": 2, "real_val": 4}
    options = MinicityOptions.create(scene_size=(32, 64), num_examples=counts, workers=1)
    opened = datasets.open_split("minicity", "real_val", data_dir=str(tmp_path),
                                 minicity_options=options)
    (shard,) = glob.glob(str(tmp_path / "minicity" / "*" / "*" / "*real_val.tfrecord*"))
    end = _record_end(shard, 3) - 20 if cut == "inside_a_record" else _record_end(shard, 2)
    with open(shard, "r+b") as f:
        f.truncate(end)
    opened = datasets.open_split("minicity", "real_val", data_dir=str(tmp_path),
                                 minicity_options=options)
    what = "truncated" if cut == "inside_a_record" else "expected to contain 4 elements"
    with pytest.raises(P.DataCorruptionError,
                       match=rf"minicity/real_val in {tmp_path}.*damaged.*{what}"):
        list(P.HostIterator(opened.dataset.batch(4), name=opened.description))


def test_an_unwritable_data_dir_says_what_to_do(tmp_path, monkeypatch):
    from synseg_jax.data import datasets  # noqa: PLC0415
    from synseg_jax.data.builders import minicity as builders  # noqa: PLC0415

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "minicity"))

    monkeypatch.setattr(builders.Minicity, "download_and_prepare", refuse)
    with pytest.raises(datasets.DataDirError,
                       match=rf"Cannot render minicity into the data dir {tmp_path}.*"
                             r"Permission denied.*data.data_dir \(or \$SYNSEG_DATA_DIR\)"):
        datasets.open_split("minicity", "real_val", data_dir=str(tmp_path))


def test_tfds_notices_are_dropped_and_other_messages_kept(caplog):
    from absl import logging as absl_logging  # noqa: PLC0415

    from synseg_jax.data import datasets  # noqa: PLC0415  (importing it installs the filter)
    assert any(type(f).__name__ == "_TfdsNoticeFilter"
               for f in logging.getLogger("absl").filters), datasets
    with caplog.at_level(logging.INFO):
        absl_logging.warning("Using custom data configuration: _MinicityConfig(name='s128')")
        absl_logging.info("Downloading and preparing dataset Unknown size (download: Unknown "
                          "size, generated: Unknown size, total: Unknown size) to /tmp/x...")
        absl_logging.warning("Some other TFDS warning that a user should see")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Some other TFDS warning that a user should see"]


def test_rendering_a_new_minicity_version_names_the_old_data_beside_it(tmp_path, caplog):
    from synseg_jax.data import datasets  # noqa: PLC0415
    config_dir = tmp_path / "minicity" / "s128x256_o64_seed0_n1"
    (config_dir / "1.0.0").mkdir(parents=True)
    with caplog.at_level(logging.INFO):
        datasets._note_other_versions(str(config_dir / "2.0.0"))
    assert any("minicity 1.0.0" in r.getMessage() and str(config_dir) in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    (config_dir / "1.0.0").rmdir()
    with caplog.at_level(logging.INFO):
        datasets._note_other_versions(str(config_dir / "2.0.0"))
    assert not caplog.records


@pytest.mark.parametrize("split", ["real_val", "objects"])
def test_an_encoded_split_decodes_to_the_decoded_one(tmp_path, split):
    """Training streams open splits encoded (shuffling and skipping bytes) and decode late; the
    result must be the eagerly decoded split, example for example."""
    from synseg_jax.data import datasets  # noqa: PLC0415
    from synseg_jax.data.builders.minicity import MinicityOptions  # noqa: PLC0415

    counts = {"sim": 1, "sim_topdown": 1, "real_train": 1, "real_val": 3, "objects": 3}
    options = MinicityOptions.create(scene_size=(32, 64), object_size=16, num_examples=counts,
                                     workers=1)
    kwargs = dict(data_dir=str(tmp_path), minicity_options=options)
    eager = datasets.open_split("minicity", split, **kwargs)
    lazy = datasets.open_split("minicity", split, decode=False, **kwargs)
    assert eager.decode is None and lazy.decode is not None
    assert lazy.dataset.element_spec["image"].dtype == tf.string
    decoded = list(lazy.dataset.map(lazy.decode).as_numpy_iterator())
    expected = list(eager.dataset.as_numpy_iterator())
    assert len(decoded) == len(expected) == 3
    for a, b in zip(decoded, expected):
        tf.nest.map_structure(np.testing.assert_array_equal, a, b)
