"""tf.data input pipeline: label mapping, joint augmentation, normalisation, batching.

Input: a ``tf.data.Dataset`` of ``{"image": uint8 [H, W, 3], "label": uint8 [H, W] raw ids}``
(``label`` optional; a scalar label, one class per image, passes through geometry untouched)
that is already this process's shard. Output: batches of fixed-size float32
images, trainId labels, and the ``crop_box`` each training example was cut from.

Crop-box convention
-------------------
``crop_box`` is float32 ``[y0, x0, y1, x1]`` in normalised coordinates of the ORIGINAL image
(0 = its top/left edge, 1 = its bottom/right edge; pixel edges, not pixel centres). Output pixel
``(i, j)`` of an ``out_h x out_w`` crop has its centre at::

    y = y0 + (i + 0.5) / out_h * (y1 - y0)
    x = x0 + (j + 0.5) / out_w * (x1 - x0)

(``images.crop_box_grid`` computes this). A horizontally flipped crop stores ``x0 > x1``, so the formula
stays true without a separate flag. Where the scaled image was smaller than the crop and got
padded, the box reaches outside [0, 1]: those positions are padding. Resizing keeps the box
(normalised coordinates do not change); a downstream feature map of size ``(fh, fw)`` aligned by
half-pixel centres uses the same formula with ``out_h, out_w = fh, fw``.

Randomness
----------
Every random choice comes from stateless TF ops seeded by ``(seed, stream, example position)``,
where the position counts across epochs (so each epoch sees fresh augmentations). The same seed
reproduces the stream bit for bit, whatever the number of parallel map calls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from synseg_jax import images, parallel
from synseg_jax.data.labels import IGNORE_LABEL, UNKNOWN

IMAGE = "image"
LABEL = "label"
CROP_BOX = "crop_box"
UNKNOWN_PIXELS = "unknown_label_pixels"
MASK = "mask"
INDEX = "index"
NAME = "name"  # optional: an example's stored name (eval streams keep it when present)

FULL_BOX = (0.0, 0.0, 1.0, 1.0)

# Padding colour (RGB, 0..255): the Caffe mean, so padded regions normalise to ~0 in both modes.
PAD_RGB = tuple(float(v) for v in images.CAFFE_BGR_MEAN[::-1])

# ITU-R 601 luma weights (also torchvision's), for the saturation and contrast jitter.
_LUMA = (0.299, 0.587, 0.114)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Jitter:
    """Photometric jitter; each op runs with its own probability.

    A strength ``s`` draws a factor from U[1 - s, 1 + s] (torchvision ``ColorJitter`` semantics).
    The real-time DA paper applies each augmentation with p = 0.5 but does not state strengths;
    0.5 is our choice.
    """

    brightness_prob: float = 0.5
    brightness: float = 0.5
    contrast_prob: float = 0.5
    contrast: float = 0.5
    saturation_prob: float = 0.5
    saturation: float = 0.5

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            p, s = getattr(self, f"{name}_prob"), getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}_prob must lie in [0, 1], got {p}")
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"{name} strength must lie in [0, 1], got {s}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """How one domain's training examples are prepared.

    Order: resize → random scale → random crop → flip → jitter → normalise. Jitter is off by
    default (the DeepLab-lineage papers do not use it); pass ``Jitter()`` for the real-time DA
    paper's setting.
    """

    resize: tuple[int, int] | None = None       # (h, w) applied first; None keeps the input size
    scale_range: tuple[float, float] = (1.0, 1.0)  # random scale factor, uniform in [min, max]
    crop: tuple[int, int] | None = None         # (h, w) random crop; None keeps the whole image
    flip_prob: float = 0.5                      # horizontal flip probability (0 disables)
    jitter: Jitter | None = None
    normalization: str = "caffe_bgr"            # one of images.NORMALIZATIONS
    antialias: bool = True                      # antialias image downscaling (PIL-like)

    def __post_init__(self):
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {self.scale_range}")
        if (lo, hi) != (1.0, 1.0) and self.crop is None:
            raise ValueError("a random scale_range needs a crop size, or batches would vary in size")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {self.flip_prob}")
        images.check_normalization(self.normalization)
        for name in ("resize", "crop"):
            size = getattr(self, name)
            if size is not None and (len(size) != 2 or min(size) <= 0):
                raise ValueError(f"{name} must be a positive (h, w) pair, got {size}")




# ------------------------------------------------------------------------------------------------
# Ops on tensors: pure TF, usable eagerly and inside Dataset.map.


def map_labels(label: tf.Tensor, table: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
    """Raw ids → trainIds (uint8) by table lookup, and the int32 count of UNKNOWN pixels.

    Ids the table marks UNKNOWN, or that lie beyond it, become 255 and are counted: they mean
    corrupt or mislabelled input, which the host side reports. ``[H, W, 1]`` labels are squeezed.
    """
    label = tf.convert_to_tensor(label)
    if label.shape.rank == 3:
        label = label[..., 0]
    table = tf.constant(np.asarray(table, np.int32))
    size = table.shape[0]
    ids = tf.cast(label, tf.int32)
    in_table = (ids >= 0) & (ids < size)
    mapped = tf.where(in_table, tf.gather(table, tf.clip_by_value(ids, 0, size - 1)), UNKNOWN)
    unknown = mapped == UNKNOWN
    count = tf.reduce_sum(tf.cast(unknown, tf.int32))
    mapped = tf.where(unknown, IGNORE_LABEL, mapped)
    return tf.cast(mapped, tf.uint8), count


def resize_image(image: tf.Tensor, size, *, antialias: bool = True) -> tf.Tensor:
    """Bilinear resize to ``size = (h, w)``; float32 output in the input's value range.

    ``antialias`` widens the kernel when shrinking (like PIL). TF's antialiased kernel is ~2x
    slower even when enlarging, where it changes nothing, so it only runs when shrinking.
    """
    image = tf.cast(image, tf.float32)
    if not antialias:
        return tf.image.resize(image, size, method="bilinear")
    size = tf.convert_to_tensor(size, tf.int32)
    shrinks = tf.reduce_any(size < tf.shape(image)[:2])
    return tf.cond(shrinks,
                   lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
                   lambda: tf.image.resize(image, size, method="bilinear"))


def resize_label(label: tf.Tensor, size) -> tf.Tensor:
    """Nearest-neighbour resize of an ``[H, W]`` label map, keeping its dtype."""
    return tf.image.resize(label[..., None], size, method="nearest")[..., 0]


def resize(image: tf.Tensor, label: tf.Tensor | None, size, *, antialias: bool = True):
    """Joint resize: bilinear image, nearest label; both land on the same pixel grid."""
    image = resize_image(image, size, antialias=antialias)
    if label is not None:
        label = resize_label(label, size)
    return image, label


def _checked(value: tf.Tensor, actual, expected, message: str) -> tf.Tensor:
    """``value``, but only after asserting ``actual == expected`` (ordered inside tf.data too)."""
    check = tf.debugging.assert_equal(actual, expected, message=message)
    with tf.control_dependencies([check] if check is not None else []):
        return tf.identity(value)


def _compose_box(outer: tf.Tensor, inner: tf.Tensor) -> tf.Tensor:
    """``inner`` is a box in ``outer``'s normalised coordinates; return it in original ones."""
    y0, x0, y1, x1 = tf.unstack(outer)
    iy0, ix0, iy1, ix1 = tf.unstack(inner)
    return tf.stack([y0 + iy0 * (y1 - y0), x0 + ix0 * (x1 - x0),
                     y0 + iy1 * (y1 - y0), x0 + ix1 * (x1 - x0)])


def _pad_rgb(image: tf.Tensor, paddings: tf.Tensor, pad_rgb) -> tf.Tensor:
    # tf.pad takes one scalar fill; a validity mask gives a per-channel fill and leaves real
    # pixels bit-exact (x + 0 * c == x).
    padded = tf.pad(image, paddings)
    valid = tf.pad(tf.ones_like(image[..., :1]), paddings)
    return padded + (1.0 - valid) * tf.constant(pad_rgb, tf.float32)


def random_scale_crop(image: tf.Tensor, label: tf.Tensor | None, crop_box: tf.Tensor,
                      seed: tf.Tensor, *, crop_size, scale_range=(1.0, 1.0),
                      pad_rgb=PAD_RGB, antialias: bool = True):
    """Scale by a factor from U[scale_range], then cut a random ``crop_size`` window.

    If the scaled image is smaller than the crop along an axis, the window sticks out on a random
    side and is filled with ``pad_rgb`` (image) and 255 (label). Returns ``(image float32, label,
    crop_box)`` with the box composed onto the incoming one.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    if label is not None:
        label = _checked(label, tf.shape(label)[:2], shape[:2],
                         "image and label sizes differ; resize the label to the image first")
    lo, hi = scale_range
    if (lo, hi) != (1.0, 1.0):
        factor = tf.random.stateless_uniform([], seeds[0], lo, hi)
        sh = tf.maximum(1, tf.cast(tf.round(tf.cast(h, tf.float32) * factor), tf.int32))
        sw = tf.maximum(1, tf.cast(tf.round(tf.cast(w, tf.float32) * factor), tf.int32))
        image, label = resize(image, label, tf.stack([sh, sw]), antialias=antialias)
    else:
        sh, sw = h, w
    ch, cw = crop_size

    def offset(s, c, sub_seed):
        # Window start in scaled pixels; negative when the image is smaller than the window.
        return tf.random.stateless_uniform([], sub_seed, tf.minimum(0, s - c),
                                           tf.maximum(0, s - c) + 1, dtype=tf.int32)

    oy, ox = offset(sh, ch, seeds[1]), offset(sw, cw, seeds[2])
    y_start, x_start = tf.maximum(oy, 0), tf.maximum(ox, 0)
    y_end, x_end = tf.minimum(oy + ch, sh), tf.minimum(ox + cw, sw)
    paddings = tf.stack([[y_start - oy, oy + ch - y_end], [x_start - ox, ox + cw - x_end]])
    image = _pad_rgb(image[y_start:y_end, x_start:x_end],
                     tf.concat([paddings, [[0, 0]]], axis=0), pad_rgb)
    image = tf.ensure_shape(image, [ch, cw, 3])
    if label is not None:
        label = tf.pad(label[y_start:y_end, x_start:x_end], paddings,
                       constant_values=tf.constant(IGNORE_LABEL, label.dtype))
        label = tf.ensure_shape(label, [ch, cw])
    sh_f, sw_f = tf.cast(sh, tf.float32), tf.cast(sw, tf.float32)
    window = tf.stack([tf.cast(oy, tf.float32) / sh_f, tf.cast(ox, tf.float32) / sw_f,
                       tf.cast(oy + ch, tf.float32) / sh_f, tf.cast(ox + cw, tf.float32) / sw_f])
    return image, label, _compose_box(crop_box, window)


def random_flip(image: tf.Tensor, label: tf.Tensor | None, crop_box: tf.Tensor,
                seed: tf.Tensor, *, prob: float = 0.5):
    """Mirror left-right with probability ``prob``; a flipped box swaps x0 and x1."""
    image = tf.convert_to_tensor(image)
    if label is not None:
        label = tf.convert_to_tensor(label)
    flip = tf.random.stateless_uniform([], seed) < prob
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    if label is not None:
        label = tf.cond(flip, lambda: label[:, ::-1], lambda: label)
    y0, x0, y1, x1 = tf.unstack(crop_box)
    crop_box = tf.where(flip, tf.stack([y0, x1, y1, x0]), crop_box)
    return image, label, crop_box


def _gray(image: tf.Tensor) -> tf.Tensor:
    return tf.tensordot(image, tf.constant(_LUMA, tf.float32), axes=[[-1], [0]])[..., None]


def adjust_brightness(image: tf.Tensor, factor) -> tf.Tensor:
    return tf.clip_by_value(image * factor, 0.0, 255.0)


def adjust_contrast(image: tf.Tensor, factor) -> tf.Tensor:
    """Blend with the image's mean grey level (torchvision semantics)."""
    mean = tf.reduce_mean(_gray(image))
    return tf.clip_by_value(mean + (image - mean) * factor, 0.0, 255.0)


def adjust_saturation(image: tf.Tensor, factor) -> tf.Tensor:
    """Blend with the per-pixel grey image: 0 = greyscale, 1 = unchanged."""
    gray = _gray(image)
    return tf.clip_by_value(gray + (image - gray) * factor, 0.0, 255.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, jitter: Jitter) -> tf.Tensor:
    """Brightness, contrast, saturation in that order, each with its own coin and factor.

    ``image`` is RGB in 0..255 (any dtype); returns float32. A skipped op is an exact identity.
    """
    image = tf.cast(image, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 6)
    ops = ((adjust_brightness, jitter.brightness_prob, jitter.brightness),
           (adjust_contrast, jitter.contrast_prob, jitter.contrast),
           (adjust_saturation, jitter.saturation_prob, jitter.saturation))
    for k, (op, prob, strength) in enumerate(ops):
        if prob <= 0.0:
            continue
        apply = tf.random.stateless_uniform([], seeds[2 * k]) < prob
        factor = tf.random.stateless_uniform([], seeds[2 * k + 1], 1.0 - strength, 1.0 + strength)
        image = tf.cond(apply, lambda op=op, f=factor, x=image: op(x, f), lambda x=image: x)
    return image


def normalize(image: tf.Tensor, mode: str) -> tf.Tensor:
    """RGB 0..255 -> the model's input space (float32); see ``images.normalize``."""
    images.check_normalization(mode)
    return images.normalize(tf.cast(image, tf.float32), mode)


# ------------------------------------------------------------------------------------------------
# Ops on examples.


def example_seed(seed: int, stream: int, index) -> tf.Tensor:
    """Stateless seed for one example: a pure function of (run seed, stream, position)."""
    base = tf.constant([seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def map_example_labels(example: Mapping[str, tf.Tensor], table: np.ndarray) -> dict:
    """Replace ``label`` by trainIds and add ``unknown_label_pixels`` (int32 scalar)."""
    example = dict(example)
    example[LABEL], example[UNKNOWN_PIXELS] = map_labels(example[LABEL], table)
    return example


def augment_example(example: Mapping[str, tf.Tensor], seed: tf.Tensor,
                    config: AugmentConfig) -> dict:
    """Joint augmentation of image and (optional) label; adds ``crop_box``.

    A scalar label (one class per image, e.g. a classification pretraining set) has no pixels to
    align, so geometry leaves it alone. Returns the image as float32 RGB 0..255 (not normalised).
    """
    example = dict(example)
    image = tf.cast(example[IMAGE], tf.float32)
    label = example.get(LABEL)
    if label is not None and label.shape.rank == 0:
        label = None
    box = tf.constant(FULL_BOX, tf.float32)
    scale_seed, flip_seed, jitter_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    if config.resize is not None:
        image, label = resize(image, label, config.resize, antialias=config.antialias)
    if config.crop is not None:
        image, label, box = random_scale_crop(
            image, label, box, scale_seed, crop_size=config.crop,
            scale_range=tuple(config.scale_range), antialias=config.antialias)
    if config.flip_prob > 0:
        image, label, box = random_flip(image, label, box, flip_seed, prob=config.flip_prob)
    if config.jitter is not None:
        image = color_jitter(image, jitter_seed, config.jitter)
    example[IMAGE] = image
    if label is not None:
        example[LABEL] = label
    example[CROP_BOX] = box
    return example


def preprocess_train_example(index, example, *, table: np.ndarray | None, config: AugmentConfig,
                             seed: int, stream: int = 0, keep_label: bool = True) -> dict:
    """map labels → augment → normalise, for one example at stream position ``index``."""
    example = {k: v for k, v in example.items() if k in (IMAGE, LABEL)}
    if keep_label:
        example = map_example_labels(example, table)
    else:
        example.pop(LABEL, None)
    example = augment_example(example, example_seed(seed, stream, index), config)
    example[IMAGE] = normalize(example[IMAGE], config.normalization)
    return example


# ------------------------------------------------------------------------------------------------
# Streams.


def check_not_empty(ds: tf.data.Dataset, name: str) -> None:
    """Raise if ``ds`` has no element (reads at most one), instead of hanging in ``repeat()``."""
    card = int(ds.cardinality())
    if card == 0:
        raise ValueError(f"Dataset {name!r} is empty")
    if card == tf.data.UNKNOWN_CARDINALITY:
        for _ in ds.take(1):
            return
        raise ValueError(f"Dataset {name!r} is empty")


def _stream_seed(seed: int, stream: int) -> int:
    # tf.data shuffle takes one int seed; derive it so each stream shuffles independently.
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def train_stream(ds: tf.data.Dataset, *, config: AugmentConfig, batch_size: int, seed: int,
                 table: np.ndarray | None = None, keep_label: bool = True, stream: int = 0,
                 shuffle_buffer: int = 256, name: str = "train", decode=None,
                 start_batch: int = 0) -> tf.data.Dataset:
    """Endless batches of augmented, normalised examples from one domain.

    shuffle (seeded, new order each epoch) → repeat → number → skip → [decode] → map labels →
    augment → normalise → batch(``batch_size`` = the LOCAL batch, drop_remainder) → prefetch.
    Shuffling before the map lets the augmentation seed follow the stream position across
    epochs, so an image is augmented differently every epoch. The order and every random choice
    are a pure function of (seed, stream, position): ``start_batch=k`` yields exactly the batches
    k, k+1, ... of the stream that starts at 0, which is how a resumed run continues where it
    stopped. With ``decode`` (`datasets.SplitData.decode`), ``ds`` holds encoded images: the
    shuffle buffer and the skipped positions then cost encoded bytes, not pixels.
    Fields: ``image`` float32 [B, h, w, 3], ``crop_box`` float32 [B, 4], and with
    ``keep_label``: ``label`` uint8 [B, h, w], ``unknown_label_pixels`` int32 [B].
    """
    has_label = LABEL in ds.element_spec
    if keep_label and not has_label:
        raise ValueError(f"Dataset {name!r} has no labels but keep_label=True")
    if keep_label and table is None:
        raise ValueError(f"Dataset {name!r}: keep_label=True needs a label table")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    check_not_empty(ds, name)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=_stream_seed(seed, stream),
                        reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate()
    if start_batch:
        ds = ds.skip(start_batch * batch_size)

    def process(index, example):
        if decode is not None:
            example = decode(example)
        return preprocess_train_example(index, example, table=table, config=config, seed=seed,
                                        stream=stream, keep_label=keep_label)

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def paired_stream(source: tf.data.Dataset, target: tf.data.Dataset, *, batch_size: int, seed: int,
                  source_table: np.ndarray, source_config: AugmentConfig,
                  target_config: AugmentConfig | None = None,
                  target_table: np.ndarray | None = None, target_labels: bool = False,
                  target_batch_size: int | None = None, shuffle_buffer: int = 256,
                  source_name: str = "source", target_name: str = "target",
                  source_decode=None, target_decode=None,
                  start_batch: int = 0) -> tf.data.Dataset:
    """Zip a labelled source stream and a target stream into ``{"source": ..., "target": ...}``.

    The target carries ``label`` (and ``unknown_label_pixels``) only with ``target_labels``
    (oracle runs, evaluation); otherwise its labels are dropped before any work is spent on them.
    The two domains draw independent randomness from the same ``seed``; ``start_batch`` and the
    decoders are those of `train_stream`.
    """
    src = train_stream(source, config=source_config, batch_size=batch_size, seed=seed,
                       table=source_table, keep_label=True, stream=0,
                       shuffle_buffer=shuffle_buffer, name=source_name, decode=source_decode,
                       start_batch=start_batch)
    tgt = train_stream(target, config=target_config or source_config,
                       batch_size=target_batch_size or batch_size, seed=seed,
                       table=target_table, keep_label=target_labels, stream=1,
                       shuffle_buffer=shuffle_buffer, name=target_name, decode=target_decode,
                       start_batch=start_batch)
    return tf.data.Dataset.zip(src, tgt).map(lambda s, t: {"source": s, "target": t})


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Batches needed to score ``num_examples`` once; give every process the max over processes."""
    return max(1, math.ceil(num_examples / batch_size))


def _count(ds: tf.data.Dataset, name: str) -> int:
    card = int(ds.cardinality())
    if card == tf.data.INFINITE_CARDINALITY:
        raise ValueError(f"Evaluation dataset {name!r} is infinite")
    if card == tf.data.UNKNOWN_CARDINALITY:
        # One full pass; datasets with a known length (TFDS splits) skip it.
        log.info("Counting the examples of %r (cardinality unknown)", name)
        card = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
    return card


_PAD_FILL = {LABEL: IGNORE_LABEL, INDEX: -1, MASK: False, NAME: b""}


def _pad_batch(batch: dict, batch_size: int) -> dict:
    """Pad a (possibly short) final batch up to ``batch_size`` with masked-out filler."""
    missing = batch_size - tf.shape(batch[MASK])[0]
    out = {}
    for key, value in batch.items():
        paddings = tf.concat([[[0, missing]], tf.zeros([value.shape.rank - 1, 2], tf.int32)], 0)
        fill = tf.constant(_PAD_FILL.get(key, 0), value.dtype)
        out[key] = tf.ensure_shape(tf.pad(value, paddings, constant_values=fill),
                                   [batch_size] + value.shape[1:].as_list())
    return out


def _filler_batch(element_spec: dict, batch_size: int) -> dict:
    return {key: np.full([batch_size] + spec.shape[1:].as_list(), _PAD_FILL.get(key, 0),
                         spec.dtype.as_numpy_dtype)
            for key, spec in element_spec.items()}


def eval_stream(ds: tf.data.Dataset, *, batch_size: int, table: np.ndarray | None = None,
                image_size: tuple[int, int] | None = None, normalization: str = "caffe_bgr",
                num_batches: int | None = None, index_offset: int = 0, antialias: bool = True,
                name: str = "eval") -> tf.data.Dataset:
    """Deterministic, finite batches for scoring; every example appears exactly once.

    Only the IMAGE is resized (to ``image_size``); the label keeps its full resolution, so the
    evaluator upsamples logits to the label size. All labels of the split must share one size
    (and all images, without ``image_size``); the first example fixes it and a different one
    stops iteration with an error naming both sizes. The last batch is padded to ``batch_size``
    and then whole filler batches up to ``num_batches`` (so all processes run equal steps);
    ``mask`` [B] is False on filler, whose ``index`` is -1 and label 255. ``index`` is the
    position in ``ds`` plus ``index_offset`` (pass the shard's start to get global indices).
    A ``name`` in ``ds`` is kept (b"" on filler).
    """
    images.check_normalization(normalization)
    has_label = LABEL in ds.element_spec
    if has_label and table is None:
        raise ValueError(f"Dataset {name!r}: labels need a label table")
    first = next(iter(ds.take(1)), None)
    if first is None:
        raise ValueError(f"Dataset {name!r} is empty")
    label_hw = tuple(int(d) for d in first[LABEL].shape[:2]) if has_label else None
    fixed_image_hw = None if image_size is not None else tuple(int(d) for d in
                                                               first[IMAGE].shape[:2])
    num_real = num_eval_batches(_count(ds, name), batch_size)
    if num_batches is None:
        num_batches = num_real
    elif num_batches < num_real:
        raise ValueError(f"{name!r} needs {num_real} batches of {batch_size} but num_batches="
                         f"{num_batches}; examples would be skipped")

    def process(index, example):
        image = example[IMAGE]
        if image_size is not None:
            image = resize_image(image, image_size, antialias=antialias)
        else:
            image = _checked(
                image, tf.shape(image)[:2], fixed_image_hw,
                f"{name}: without image_size all images must be "
                f"{fixed_image_hw[0]}x{fixed_image_hw[1]} like the first; this one is")
            image = tf.ensure_shape(image, [*fixed_image_hw, 3])
        out = {IMAGE: normalize(image, normalization),
               INDEX: tf.cast(index, tf.int32) + index_offset,
               MASK: tf.constant(True)}
        if NAME in example:
            out[NAME] = example[NAME]
        if has_label:
            label, out[UNKNOWN_PIXELS] = map_labels(example[LABEL], table)
            if label_hw:  # image-level (scalar) labels have no size to check
                label = _checked(label, tf.shape(label), label_hw,
                                 f"{name}: evaluation labels must all be "
                                 f"{label_hw[0]}x{label_hw[1]} like the first; this one is")
            out[LABEL] = tf.ensure_shape(label, label_hw)
        return out

    ds = ds.enumerate().map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).map(lambda b: _pad_batch(b, batch_size))
    if num_batches > num_real:
        filler = _filler_batch(ds.element_spec, batch_size)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(num_batches - num_real))
    return ds.prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------------------------
# Host side.


def _pop_unknown(tree: dict) -> int:
    """Remove every ``unknown_label_pixels`` leaf from a nested batch dict; return their sum."""
    total = 0
    if UNKNOWN_PIXELS in tree:
        total += int(np.sum(tree.pop(UNKNOWN_PIXELS)))
    for value in tree.values():
        if isinstance(value, dict):
            total += _pop_unknown(value)
    return total


class DataCorruptionError(IOError):
    """A damaged dataset file (e.g. a truncated TFRecord shard)."""


class HostIterator(Iterator):
    """Iterate a batched tf.data stream as numpy batches, or global jax Arrays given a mesh.

    Pops ``unknown_label_pixels`` from each batch, warns when a batch had any, and keeps the
    running total in ``self.unknown_label_pixels``. With ``mesh`` the local batches of all
    processes form one global batch sharded over the ``data`` axis.
    """

    def __init__(self, ds: tf.data.Dataset, *, mesh: Any = None, name: str = "data"):
        self._it = ds.as_numpy_iterator()
        self._mesh = mesh
        self.name = name
        self.unknown_label_pixels = 0

    def __next__(self):
        try:
            batch = next(self._it)
        except (tf.errors.DataLossError, tf.errors.FailedPreconditionError) as err:
            # A shard cut inside a record is a DataLossError; one cut between records holds
            # fewer examples than TFDS recorded, which its cardinality check reports. TF names
            # neither the file nor the dataset; the stream's name does (it holds the split and
            # the folder its shards are in).
            if isinstance(err, tf.errors.FailedPreconditionError) and \
                    "expected to contain" not in err.message:
                raise
            raise DataCorruptionError(
                f"{self.name}: a stored data file is damaged ({err.message}). Rebuild the "
                "dataset: `python -m synseg_jax.prepare --overwrite ...` for a real dataset, or "
                "delete the folder of a minicity build to render it again") from None
        unknown = _pop_unknown(batch)
        if unknown:
            self.unknown_label_pixels += unknown
            log.warning("%s: %d label pixels had ids outside the taxonomy and were set to 255 "
                        "(%d so far)", self.name, unknown, self.unknown_label_pixels)
        if self._mesh is not None:
            batch = parallel.to_global(batch, self._mesh)
        return batch
