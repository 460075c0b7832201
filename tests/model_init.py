"""Variables for model tests without XLA's init: compiling ``model.init`` (one threefry kernel per
parameter) takes seconds per tiny net on a CPU, the forward pass far less."""

import jax
import jax.numpy as jnp
import numpy as np


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_init(model, shape=(1, 65, 65, 3)):
    """Outputs and variables as shapes only: no compilation, no allocation."""
    return jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros(shape), train=False))


def host_init(model, x, seed=0, bias_std=0.0):
    """Concrete variables from numpy: He-normal kernels (activations stay O(1) through the net),
    unit BN scale and variance, biases N(0, bias_std) (non-zero makes every bias take part)."""
    _, abstract = abstract_init(model, x.shape)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
        if name == "bias" and bias_std:
            return jnp.asarray(rng.normal(0.0, bias_std, leaf.shape), leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)
