"""Checkpoints: round trip, one-role restore, and a clear error when a checkpoint does not fit."""

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
