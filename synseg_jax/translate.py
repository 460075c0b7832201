"""Translated images of a folder, written as PNGs to look at (the semantic-translation method's
translator; the recipe's translate stages write whole splits the same way).

    python -m synseg_jax.translate --config=configs/semantic_translation.py --workdir=runs/st \\
        --stage=trans1 --images=photos/ --out=translated/ [--direction=target_to_source]

``--stage`` names the recipe's translator stage (its checkpoint holds the translator and the
frozen segmenter that conditions it); leave it out for a single translator run in --workdir.
Each image is resized to ``data.train_resize`` (the size the translator trained on; its own size
when that is empty), segmented, translated, and written as ``<out>/<name>_translated.png``,
``<name>`` being its path inside the folder with "/" as "_". Runs in one process.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import numpy as np
from PIL import Image

from synseg_jax import evaluate, methods, paths, predict, recipe
from synseg_jax.data import pipeline
from synseg_jax.choices import check_choice

SUFFIX = "_translated.png"
DIRECTIONS = {"source_to_target": ("source", "target"), "target_to_source": ("target", "source")}


def translator_of(config, workdir: str, stage: str = "", step: int | None = None):
    """(the stage's config, its method, {role: variables} of what translating needs)."""
    if stage:
        if stage not in config.stages:
            raise ValueError(f"--stage={stage!r} is not a stage of the config; stages: "
                             f"{list(config.stages.keys())}")
        config, workdir = recipe.stage_config(config, workdir, stage), os.path.join(workdir, stage)
    method = methods.build(config)
    if not hasattr(method, "translate"):
        raise ValueError(f"Method {config.method.name!r} (of {workdir}) has no translator; name "
                         "a translator stage with --stage")
    return config, method, evaluate.restore_roles(config, workdir, method.translate_roles, step)


def translate_folder(config, method, variables, folder: str, out_dir: str,
                     direction: str = "source_to_target") -> list[str]:
    """Writes the translation of every image under `folder`; returns the paths written."""
    import tensorflow as tf  # noqa: PLC0415  (resizing as the training pipeline does)

    check_choice("--direction", direction, DIRECTIONS)
    source, target = DIRECTIONS[direction]
    files, skipped = predict.image_files(folder)
    for path in skipped:
        logging.warning("--images: skipped %s (not an image PIL can read)", path)
    if not files:
        raise FileNotFoundError(f"--images: no image files in {folder}")
    size = tuple(config.data.train_resize) or None
    step = jax.jit(lambda x: method.translate(variables, x, source, target))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in files:
        with Image.open(path) as img:
            image = tf.convert_to_tensor(np.asarray(img.convert("RGB")))
        if size is not None:
            image = pipeline.resize_image(image, size)
        x = pipeline.normalize(image, config.data.normalization).numpy()[None]
        name = predict.file_safe(os.path.splitext(os.path.relpath(path, folder))[0])
        out = os.path.join(out_dir, name + SUFFIX)
        Image.fromarray(np.asarray(step(x))[0]).save(out)
        written.append(out)
    logging.info("Wrote %d translations of %s to %s", len(written), folder, out_dir)
    return written


def main(argv):
    from absl import flags  # noqa: PLC0415

    FLAGS = flags.FLAGS
    config = predict.command_config(argv)
    try:
        config, method, variables = translator_of(config, paths.absolute(FLAGS.workdir),
                                                  FLAGS.stage or "", FLAGS.step)
        written = translate_folder(config, method, variables, paths.absolute(FLAGS.images),
                                   paths.absolute(FLAGS.out), FLAGS.direction)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"Wrote {len(written)} translated images to {paths.absolute(FLAGS.out)}")


def _define_flags():
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                    "configs/semantic_translation.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "The run's directory (a recipe's: with --stage).")
    flags.DEFINE_string("stage", None, "The recipe's translator stage, e.g. trans1.")
    flags.DEFINE_string("images", None, "Folder of images to translate (any PIL format).")
    flags.DEFINE_string("out", None, "Folder for <name>_translated.png.")
    flags.DEFINE_string("direction", "source_to_target", "source_to_target (synthetic -> real "
                        "look) or target_to_source.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.mark_flags_as_required(["config", "workdir", "images", "out"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    paths.prepare_config_flag(sys.argv)  # config files import `configs.*`
    app.run(main)
