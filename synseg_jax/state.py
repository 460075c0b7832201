"""TrainState: the step, the run's rng and one entry per role.

A role is a network with its own params, its own non-trainable collections (batch statistics,
spectral-norm vectors) and its own optax state; a frozen role (a teacher) has no optimiser state.
Keeping roles apart is what lets an adversarial step update segmenter, discriminators and
translator with separate optimisers inside one jitted function.
"""

from __future__ import annotations

import zlib
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RoleState:
    params: Any
    collections: Any  # {"batch_stats": ...} or {}: variables that are not trained by gradient
    opt_state: Any  # None for a frozen role

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.collections}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    rng: jax.Array  # raw uint32 key: plain arrays checkpoint and shard like any other
    roles: dict[str, RoleState]

    def step_rng(self, name: str = "") -> jax.Array:
        """A fresh key per step (and per use name), so no key is ever reused."""
        rng = jax.random.fold_in(self.rng, self.step)
        return _named(rng, name) if name else rng


def _named(rng: jax.Array, name: str) -> jax.Array:
    # crc32, not hash(): str hashes change between processes and would break reproducibility.
    return jax.random.fold_in(rng, zlib.crc32(name.encode()) % (2**31))


def init_key(run_rng: jax.Array, role: str) -> jax.Array:
    """The key that initialises `role`: a stream of its own, apart from every other role's and
    from the training loop's (`new_state`), so no key serves two purposes."""
    return _named(run_rng, "init/" + role)


def new_state(run_rng: jax.Array, roles: dict[str, RoleState]) -> TrainState:
    """Step 0 of a run: the roles, and the loop's own key derived from the run's key."""
    return TrainState(step=jnp.zeros((), jnp.int32), rng=_named(run_rng, "loop"), roles=roles)
