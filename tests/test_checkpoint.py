"""Checkpoints: round trip, one-role restore, a clear error when a checkpoint does not fit, and
survival of a kill -9 in the middle of a save."""

import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synseg_jax import checkpoint
from synseg_jax.state import RoleState, TrainState


def _state(width: int = 3, step: int = 7) -> TrainState:
    params = {"conv": {"kernel": jnp.arange(2.0 * width).reshape(2, width)}, "head": {"b": jnp.ones(4)}}
    opt = optax.sgd(0.1, momentum=0.9)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        rng=jax.random.PRNGKey(3),
        roles={
            "seg": RoleState(params, {"batch_stats": {"mean": jnp.full(width, 2.0)}}, opt.init(params)),
            "disc": RoleState({"w": jnp.ones((5,))}, {}, optax.adam(1e-3).init({"w": jnp.ones((5,))})),
            "teacher": RoleState({"w": jnp.zeros((2,))}, {}, None),
        })


def test_round_trip_restores_every_leaf(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    state = _state()
    ckpt.save(7, state)
    ckpt.wait()
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state)
    restored = ckpt.restore(zeros)
    assert ckpt.latest_step() == 7
    assert isinstance(restored, TrainState)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def test_restore_role_reads_only_that_role(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    state = _state()
    ckpt.save(7, state)
    ckpt.close()
    reader = checkpoint.Checkpointer(str(tmp_path / "ckpt"), read_only=True)
    seg = state.roles["seg"]
    params, collections = reader.restore_role(
        "seg", jax.eval_shape(lambda: seg.params), jax.eval_shape(lambda: seg.collections))
    np.testing.assert_array_equal(params["conv"]["kernel"], seg.params["conv"]["kernel"])
    np.testing.assert_array_equal(collections["batch_stats"]["mean"], 2.0)


def test_mismatched_checkpoint_names_the_keys_and_shapes(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(7, _state(width=3))
    ckpt.close()
    reader = checkpoint.Checkpointer(str(tmp_path / "ckpt"), read_only=True)
    wider = _state(width=5)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"roles/seg/params/conv/kernel.*\(2, 3\).*\(2, 5\)"):
        reader.restore(wider)
    seg = wider.roles["seg"]
    extra = {**seg.params, "new_layer": {"kernel": jnp.ones(2)}}
    with pytest.raises(checkpoint.CheckpointMismatchError, match="missing from the checkpoint.*new_layer"):
        reader.restore_role("seg", extra, seg.collections)


def test_missing_step_lists_available_ones(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(7, _state())
    ckpt.close()
    with pytest.raises(FileNotFoundError, match=r"step 9.*\[7\]"):
        checkpoint.Checkpointer(str(tmp_path / "ckpt"), read_only=True).restore(_state(), step=9)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        checkpoint.Checkpointer(str(tmp_path / "empty")).restore(_state())


_KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    from synseg_jax import checkpoint
    ckpt = checkpoint.Checkpointer(sys.argv[1])
    tree = lambda value: {f"w{i}": np.full((1 << 20,), value, np.float32) for i in range(4)}
    ckpt.save(1, tree(1.0))
    ckpt.wait()
    ckpt.save(2, tree(2.0))  # asynchronous: its files are still being written
    time.sleep(float(sys.argv[2]))
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05, 0.2])
def test_a_kill_during_a_save_leaves_a_restorable_latest_checkpoint(tmp_path, delay):
    """kill -9 at any moment of a save: the latest checkpoint a rerun finds restores whole (the
    earlier one, or the new one if it was committed), and the rerun can save again."""
    directory = str(tmp_path / "ckpt")
    child = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, directory, str(delay)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    ckpt = checkpoint.Checkpointer(directory)
    latest = ckpt.latest_step()
    assert latest in (1, 2)
    if delay == 0.0:  # killed straight after the save began: step 2 cannot have been committed
        assert latest == 1
    target = {f"w{i}": np.zeros((1 << 20,), np.float32) for i in range(4)}
    restored = ckpt.restore(target)
    for leaf in restored.values():
        np.testing.assert_array_equal(leaf, np.float32(latest))
    ckpt.save(3, target)  # a resumed run goes on saving over the debris
    ckpt.wait()
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_loading_variables_from_a_folder_without_them_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="path is empty"):
        checkpoint.load_variables("")
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'notes'} is a folder but holds no"):
        checkpoint.load_variables(str(tmp_path / "notes"))
    with pytest.raises(FileNotFoundError, match="No variables checkpoint at"):
        checkpoint.load_variables(str(tmp_path / "missing"))
    checkpoint.save_variables(str(tmp_path / "saved"), {"params": {"w": np.ones(3, np.float32)}})
    np.testing.assert_array_equal(checkpoint.load_variables(str(tmp_path / "saved"))["params"]["w"],
                                  np.ones(3))
