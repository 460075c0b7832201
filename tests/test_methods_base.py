"""Shared method plumbing: pretrained subtrees (backbone or whole model) replace the fresh ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import source_only
from synseg_jax.methods import base


def _role():
    config = source_only.get_config("demo,model.width=0.125,model.init_weights=")
    model = base.segmenter_from_config(config.model)
    tx, _ = base.optimizer_from_config(config.optim)
    return base.init_role(model, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), tx), tx


def _filled(tree, value):
    return jax.tree_util.tree_map(lambda x: np.full(x.shape, value, x.dtype), tree)


@pytest.mark.parametrize("scope", ["backbone", ""])
def test_with_pretrained_replaces_exactly_the_scope(scope):
    role, tx = _role()
    source = role.params[scope] if scope else role.params
    stats = role.collections["batch_stats"][scope] if scope else role.collections["batch_stats"]
    pretrained = {"params": _filled(source, 0.5), "batch_stats": _filled(stats, 2.0)}
    new = base.with_pretrained(role, pretrained, scope, tx)
    replaced = new.params[scope] if scope else new.params
    assert all((x == 0.5).all() for x in jax.tree_util.tree_leaves(replaced))
    if scope:  # the head keeps its own initialisation
        np.testing.assert_array_equal(new.params["head"]["branch0"]["kernel"],
                                      role.params["head"]["branch0"]["kernel"])
    new_stats = new.collections["batch_stats"][scope] if scope else new.collections["batch_stats"]
    assert all((x == 2.0).all() for x in jax.tree_util.tree_leaves(new_stats))


def test_with_pretrained_rejects_other_shapes():
    role, tx = _role()
    wrong = jax.tree_util.tree_map(lambda x: np.zeros(x.shape + (1,), x.dtype), role.params["backbone"])
    with pytest.raises(ValueError, match="'backbone' params do not fit"):
        base.with_pretrained(role, {"params": wrong}, "backbone", tx)
