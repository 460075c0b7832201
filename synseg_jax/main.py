"""Entry point: python -m synseg_jax.main --config=configs/road.py[:preset,key=value] --workdir=DIR.

Thin on purpose: flags in, `recipe.run` out.
"""

import logging as py_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from synseg_jax import checkpoint, parallel, paths, recipe, train  # noqa: E402
from synseg_jax.data import datasets, pipeline  # noqa: E402
from synseg_jax.methods import base  # noqa: E402

# Errors that describe a run's situation (a diverged loss, a checkpoint that does not fit, a
# missing file), as opposed to a bug: reported by their message alone.
EXPECTED_ERRORS = (train.NonFiniteLossError, train.ConfigChangedError,
                   checkpoint.CheckpointMismatchError, FileNotFoundError, FileExistsError,
                   pipeline.DataCorruptionError, datasets.DataDirError,
                   recipe.StageError)

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/road.py:demo",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if possible) or eval.")
flags.DEFINE_integer("step", None, "--mode=eval: checkpoint step (default: latest).")
flags.DEFINE_string("stage", None, "--mode=eval of a recipe: the stage to score, a train stage "
                    "or an ensemble (default: the last train stage).")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir even though the config differs from the one it was trained "
                  "with in what is trained (the changed keys are logged).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_enum("distributed", "flags", ["flags", "auto"],
                  "flags: one process unless the three flags above describe a multi-process job. "
                  "auto: join the job the environment describes (SLURM, Cloud TPU), taking from "
                  "it whatever of the three flags is not given.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv, file_config=None):
    """`file_config`: the config as its file and `:arg` give it, before `--config.*` flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                          FLAGS.process_id,
                                          auto_detect=FLAGS.distributed == "auto")
    logging.set_verbosity(logging.INFO)
    # Our progress goes through the stdlib root logger; libraries that log through absl (orbax's
    # per-save chatter, clu) are kept to warnings so the progress lines stay readable.
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)
    py_logging.getLogger("jax").setLevel(py_logging.WARNING)
    config = FLAGS.config
    paths.resolve_config_paths(config)
    if file_config is not None:
        try:
            base.check_model_overrides(file_config, config)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
    try:
        recipe.run(config, paths.absolute(FLAGS.workdir), FLAGS.mode, FLAGS.step,
                   FLAGS.allow_config_change, FLAGS.stage)
    except EXPECTED_ERRORS as error:
        # What a user did or must do, said once: no traceback around it.
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except train.StopRequested as stopped:
        # Its own exit code, so that a job script requeues this run rather than report a failure.
        print(f"stopped: {stopped}", file=sys.stderr, flush=True)
        sys.exit(stopped.exit_code)


def check_config_flag(argv):
    """Loads ``--config`` once before absl does and exits with one line if it cannot be built (a
    missing file, an unknown key, a value of the wrong type): absl would report the same message
    inside two chained tracebacks. Returns the loaded config (None without the flag)."""
    value = paths.config_flag_from_argv(argv)
    if value is None:
        return None  # absl reports the missing flag
    path, _, arg = value.partition(":")
    try:
        return recipe.load_config_file(paths.absolute(path), arg or None)
    except (FileNotFoundError, KeyError, ValueError, TypeError, AttributeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: --config={value}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    # The config file is imported while flags are parsed, before main() runs.
    paths.prepare_config_flag(sys.argv)
    loaded = check_config_flag(sys.argv)
    app.run(lambda argv: main(argv, loaded))
