"""benchmarks/step_profile.py sorts XLA thunks into conv / matmul and the rest by reading the
compiled HLO; a wrong parse would put every thunk in one bin."""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import step_profile  # noqa: E402


def test_hlo_index_finds_products_inside_fusions_and_op_names():
    def f(x, w, k):
        y = jax.nn.relu(x @ w) * 2.0 + 1.0
        z = jax.lax.conv_general_dilated(y[None, :, :, None], k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(z).sum()

    args = (jnp.ones((16, 8)), jnp.ones((8, 8)), jnp.ones((3, 3, 1, 2)))
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    op_names, products = step_profile.hlo_index(text)
    assert any(name.endswith("dot_general") for name in op_names.values())
    assert any("transpose(" in name for name in op_names.values())  # backward ops are named
    # Forward and backward products (the matmul, its two gradients, the conv and its two).
    assert len(products) >= 4
    # XLA:CPU wraps products in fusions whose thunks carry the fusion's name: found via calls=.
    assert any("fusion" in name for name in products)
    elementwise = [n for n, op in op_names.items() if op.endswith("/tanh")]
    assert elementwise and not set(elementwise) & products
