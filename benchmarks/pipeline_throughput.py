"""Images/s of the train and eval streams of synseg_jax.data.pipeline, measured on the host.

    python benchmarks/pipeline_throughput.py                 # both sources below
    python benchmarks/pipeline_throughput.py --source png --num-images 32
    python benchmarks/pipeline_throughput.py --source gta5 --threads 1   # one tf.data thread

Sources: ``memory`` (128x256 uint8 arrays held in memory, the demo's size) and ``png``
(1024x512 image + label PNGs written to a temp dir and read back with decode_png), ``gta5``
(GTA5-size 1914x1052 PNG pairs held encoded, decoded after the shuffle as the TFDS splits are,
then the gta5 preset's resize to 1280x720 and 512x1024 crop), and ``minicity``. A new source
(minicity, a TFDS split) is one more entry in ``SOURCES``: a function returning the dataset of
``{"image", "label"}`` and the train / eval settings that suit its image size.

Timing covers tf.data work and the host-side conversion to numpy (``HostIterator``), not
device transfer. Prints a markdown table; ``machine`` names the platform and CPU count.
``--threads N`` gives tf.data a private pool of N threads (default: one per core), which is how
the images/s one host core delivers is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from synseg_jax.data import datasets, labels, pipeline


@dataclasses.dataclass(frozen=True)
class Source:
    dataset: tf.data.Dataset
    description: str
    train: pipeline.AugmentConfig
    eval_size: tuple[int, int]
    table: np.ndarray = dataclasses.field(default_factory=lambda: labels.CITYSCAPES_TABLE)
    # For an encoded dataset (datasets.open_split(decode=False)): the training stream decodes
    # after shuffling, as training does; evaluation reads it decoded.
    decode: Callable[[dict], dict] | None = None


def synthetic_pair(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A street-ish image (smooth bands plus noise, so PNGs compress like photos) and raw ids."""
    rows = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    cols = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    tint = rng.uniform(0, 255, (1, 1, 3)).astype(np.float32)
    image = 0.5 * tint + 80 * rows + 40 * np.sin(6 * cols + rng.uniform(0, 6))
    image = image + rng.normal(0, 6, (h, w, 3))
    ids = np.array([7, 8, 11, 21, 23, 26], np.uint8)  # road, sidewalk, building, veg, sky, car
    band = np.minimum((rows[..., 0] * 4 + cols[..., 0] * 2).astype(int), len(ids) - 1)
    label = np.broadcast_to(ids[band], (h, w))
    return np.clip(image, 0, 255).astype(np.uint8), np.ascontiguousarray(label)


def memory_source(num_images: int, seed: int = 0) -> Source:
    rng = np.random.default_rng(seed)
    pairs = [synthetic_pair(rng, 128, 256) for _ in range(num_images)]
    ds = tf.data.Dataset.from_tensor_slices({"image": np.stack([p[0] for p in pairs]),
                                             "label": np.stack([p[1] for p in pairs])})
    train = pipeline.AugmentConfig(scale_range=(0.75, 1.25), crop=(128, 256),
                                   jitter=pipeline.Jitter())
    return Source(ds, "in-memory 128x256", train, eval_size=(128, 256))


def png_source(num_images: int, directory: str, seed: int = 0) -> Source:
    rng = np.random.default_rng(seed)
    image_paths, label_paths = [], []
    for i in range(num_images):
        image, label = synthetic_pair(rng, 512, 1024)
        for array, kind, paths in ((image, "image", image_paths), (label[..., None], "label",
                                                                    label_paths)):
            path = os.path.join(directory, f"{i:05d}_{kind}.png")
            tf.io.write_file(path, tf.io.encode_png(array))
            paths.append(path)

    def decode(image_path, label_path):
        return {"image": tf.io.decode_png(tf.io.read_file(image_path), channels=3),
                "label": tf.io.decode_png(tf.io.read_file(label_path), channels=1)[..., 0]}

    ds = tf.data.Dataset.from_tensor_slices((image_paths, label_paths)).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    train = pipeline.AugmentConfig(scale_range=(0.75, 1.25), crop=(256, 512),
                                   jitter=pipeline.Jitter())
    return Source(ds, "PNG 1024x512 (decode_png)", train, eval_size=(256, 512))


def minicity_source(num_images: int, split: str = "real_train") -> Source:
    """minicity as the demo trains on it: TFDS shards in the default data dir (built if missing),
    read encoded and decoded after the shuffle."""
    opened = datasets.open_split("minicity", split, decode=False)
    train = pipeline.AugmentConfig(resize=(128, 256), scale_range=(0.75, 1.25), crop=(96, 192))
    return Source(opened.dataset.take(num_images), f"minicity {split} 128x256 (TFDS)", train,
                  eval_size=(128, 256), table=opened.label_table, decode=opened.decode)


def gta5_source(num_images: int, seed: int = 0) -> Source:
    """GTA5-size frames (1914x1052) as PNG bytes, decoded after the shuffle, then the gta5
    preset's training (resize to 1280x720, 512x1024 crop, flip) and evaluation size."""
    rng = np.random.default_rng(seed)
    encoded = {"image": [], "label": []}
    for _ in range(num_images):
        image, label = synthetic_pair(rng, 1052, 1914)
        encoded["image"].append(tf.io.encode_png(image).numpy())
        encoded["label"].append(tf.io.encode_png(label[..., None]).numpy())

    def decode(example):
        return {"image": tf.io.decode_png(example["image"], channels=3),
                "label": tf.io.decode_png(example["label"], channels=1)[..., 0]}

    train = pipeline.AugmentConfig(resize=(720, 1280), crop=(512, 1024))
    return Source(tf.data.Dataset.from_tensor_slices(encoded), "GTA5-size PNG 1914x1052",
                  train, eval_size=(720, 1280), decode=decode)


SOURCES: dict[str, Callable[[int, str], Source]] = {
    "memory": lambda n, tmp: memory_source(n),
    "png": lambda n, tmp: png_source(n, tmp),
    "minicity": lambda n, tmp: minicity_source(n),
    "gta5": lambda n, tmp: gta5_source(n),
}


def images_per_second(batches, batch_size: int, warmup: int, steps: int | None) -> float:
    """Throughput after ``warmup`` batches, over ``steps`` batches (None: until exhausted)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    count, start = 0, time.perf_counter()
    for _ in (range(steps) if steps is not None else iter(int, 1)):
        try:
            next(it)
        except StopIteration:
            break
        count += 1
    return count * batch_size / (time.perf_counter() - start)


def benchmark(source: Source, batch_size: int, steps: int,
              threads: int | None = None) -> dict[str, float]:
    table = source.table
    options = tf.data.Options()
    if threads:  # the whole pipeline's parallel maps share this many threads
        options.threading.private_threadpool_size = threads
    train = pipeline.train_stream(source.dataset, config=source.train, batch_size=batch_size,
                                  seed=0, table=table, shuffle_buffer=64, decode=source.decode)
    train = train.with_options(options)
    results = {"train": images_per_second(pipeline.HostIterator(train), batch_size, 2, steps)}
    # The eval stream is finite: time one full pass (a second pass re-reads the source).
    decoded = source.dataset.map(source.decode) if source.decode else source.dataset
    evaluation = pipeline.eval_stream(decoded, batch_size=batch_size, table=table,
                                      image_size=source.eval_size,
                                      normalization=source.train.normalization)
    evaluation = evaluation.with_options(options)
    results["eval"] = images_per_second(pipeline.HostIterator(evaluation), batch_size, 1, None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=[*SOURCES, "all"], default="all")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed train batches")
    parser.add_argument("--threads", type=int, default=0,
                        help="tf.data threads (private pool); 0 = tf.data's default")
    args = parser.parse_args()
    machine = f"{platform.platform()}, {platform.processor() or platform.machine()}, " \
              f"{os.cpu_count()} CPUs"
    names = list(SOURCES) if args.source == "all" else [args.source]
    threads = args.threads or "default"
    print("| source | train crop | eval image | batch | tf.data threads | train images/s "
          "| eval images/s | machine |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            source = SOURCES[name](args.num_images, tmp)
            result = benchmark(source, args.batch_size, args.steps, args.threads or None)
            crop = "x".join(map(str, source.train.crop))
            size = "x".join(map(str, source.eval_size))
            print(f"| {source.description} | {crop} | {size} | {args.batch_size} | {threads} "
                  f"| {result['train']:.1f} | {result['eval']:.1f} | {machine} |", flush=True)


if __name__ == "__main__":
    main()
