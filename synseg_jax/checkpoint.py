"""Every orbax call lives here: save, resume, restore one role, check that a checkpoint fits.

Checkpoints are PyTree checkpoints of the whole TrainState, so evaluation can restore the `seg`
role alone (a partial restore) without building discriminators, teachers or optimiser states.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from synseg_jax import paths, trees


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model the config builds."""


class Checkpointer:
    """Numbered checkpoints of a TrainState in `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, read_only: bool = False):
        self.directory = paths.absolute(str(directory))  # orbax refuses relative paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, read_only=read_only, create=not read_only)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.PyTreeCheckpointHandler())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        # Wait for the previous async save first: two in flight would race on old-step deletion.
        self._manager.wait_until_finished()
        self._manager.save(step, args=ocp.args.PyTreeSave(state), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return step

    def _check_fits(self, step: int, target: Any, prefixes: tuple[str, ...] = ()) -> None:
        saved = trees.shapes(self._manager.item_metadata(step).tree)
        if prefixes:  # a partial restore compares only the subtrees it asks for
            saved = {k: v for k, v in saved.items() if k.startswith(prefixes)}
        problem = trees.describe_mismatch(saved, trees.shapes(target), "checkpoint", "config")
        if problem:
            raise CheckpointMismatchError(
                f"Checkpoint {self.directory} step {step} does not fit the model built from "
                f"the config:\n{problem}")

    def _restore(self, target: Any, step: int | None, prefixes: tuple[str, ...]) -> Any:
        step = self._resolve_step(step)
        abstract = jax.tree_util.tree_map(_abstract, target)
        self._check_fits(step, abstract, prefixes)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        logging.info("Restoring %s step %d", self.directory, step)
        return self._manager.restore(step, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=bool(prefixes)))

    def restore(self, target: Any, step: int | None = None) -> Any:
        """The whole state, in the structure (and shardings) of `target`; latest step by default."""
        return self._restore(target, step, ())

    def restore_role(self, role: str, params: Any, collections: Any,
                     step: int | None = None) -> tuple[Any, Any]:
        """Only one role's params and collections (no optimiser state, no other role)."""
        item = {"roles": {role: {"params": params, "collections": collections}}}
        prefixes = (f"roles/{role}/params/", f"roles/{role}/collections/")
        restored = self._restore(item, step, prefixes)["roles"][role]
        return restored["params"], restored["collections"]


def save_variables(path: str, variables: Any) -> None:
    """Writes a standalone variables tree (e.g. a pretrained backbone's params and batch_stats)."""
    with ocp.PyTreeCheckpointer() as writer:
        writer.save(paths.absolute(path), variables, force=True)


def load_variables(path: str) -> Any:
    """Reads a tree written by `save_variables` (or by the weight importer) as numpy arrays."""
    if not path:
        raise FileNotFoundError("No variables checkpoint: the path is empty (a config's "
                                "init.<role>.path)")
    path = paths.absolute(path)
    if not epath.Path(path).is_dir():  # epath, as orbax: the folder may be in a gs:// bucket
        raise FileNotFoundError(f"No variables checkpoint at {path} (a config's init.<role>.path)")
    with ocp.PyTreeCheckpointer() as reader:
        found = reader.metadata(path)
        if found is None or found.item_metadata is None:
            raise FileNotFoundError(f"{path} is a folder but holds no variables checkpoint (one "
                                    "written by import_weights or a finished run's export)")
        metadata = found.item_metadata.tree
        target = jax.tree_util.tree_map(
            lambda m: np.zeros(m.shape, m.dtype), metadata,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        return reader.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
