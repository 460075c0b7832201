"""Every registered method keeps the protocol the loop relies on, on a tiny config: roles, one
jitted step with well-named finite metrics and an lr per optimised role, predict's class count,
and a restore of the evaluated role alone from a checkpoint."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import (adversarial, pretrain, road, self_training, semantic_translation,
                     source_only, structure, tsg_ssi)
from synseg_jax import checkpoint, inputs, methods
from synseg_jax import state as state_lib
from synseg_jax.methods import base
from tests.tiny import TINY_DATA_AND_MODEL

TINY = [o for o in TINY_DATA_AND_MODEL if not o.startswith("data.minicity")] + [
    "train.batch_size=2", "data.minicity.object_size=16"]

# Every registered method with the config file and overrides that make it runnable.
CONFIGS = {
    "source_only": (source_only, []),
    "classifier": (pretrain, ["model.stage_sizes=(1,1,1,1)", "model.width=0.125"]),
    "road": (road, ["method.disc_hidden=(8,8)"]),
    "adversarial": (adversarial, ["method.disc_widths=(4,4,4,4)", "fda.beta=0.05"]),
    "self_training": (self_training, ["method.name=self_training", "data.target=minicity",
                                    "data.target_split=real_train", "data.target_labels=True"]),
    "structure": (structure, ["method.rec_width=8", "method.rec_res_blocks=1",
                              "method.disc_width=4"]),
    "tsg_ssi": (tsg_ssi, []),
    # A translator stage: its segmenter is frozen (init.seg.path names weights the recipe would
    # load; a random one stands in here) and it has no evaluated role.
    "semantic_translation": (semantic_translation, [
        "method.name=semantic_translation", "init.seg.path=unused", "init.seg.scope=",
        "method.translator_dim=4", "method.translator_res=2", "method.spade_hidden=4",
        "method.disc_dim=4", "method.disc_scales=2", "method.disc_layers=2"]),
}


def test_every_registered_method_is_covered():
    assert sorted(CONFIGS) == sorted(methods.METHODS)


def fake_batch(config, rng):
    def fill(spec):
        if spec.dtype == jnp.float32 and spec.shape[-1] == 4:  # crop boxes
            return jnp.tile(jnp.asarray([0.0, 0.0, 1.0, 1.0]), (*spec.shape[:-1], 1))
        if jnp.issubdtype(spec.dtype, jnp.integer):
            return jnp.asarray(rng.integers(0, config.model.num_classes, spec.shape), spec.dtype)
        return jnp.asarray(rng.normal(size=spec.shape) * 30, spec.dtype)
    return jax.tree_util.tree_map(fill, inputs.abstract_batch(config))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_protocol(name, tmp_path):
    module, extra = CONFIGS[name]
    config = module.get_config(",".join(["demo", *TINY, *extra]))
    method = methods.build(config)
    batch = fake_batch(config, np.random.default_rng(0))
    run_key = jax.random.PRNGKey(0)
    state = jax.jit(method.init)(run_key, batch, {})
    assert set(state.roles) == set(method.roles)
    # The loop's key is derived apart from the run key and from every role's init key.
    assert np.array_equal(state.rng, state_lib.new_state(run_key, {}).rng)
    used = [np.asarray(run_key)] + [np.asarray(state_lib.init_key(run_key, r)) for r in state.roles]
    assert not any(np.array_equal(state.step_rng(), k) or np.array_equal(state.rng, k)
                   for k in used)

    new_state, metrics = jax.jit(method.train_step)(state, batch)
    assert int(new_state.step) == 1
    for key, value in metrics.items():
        assert key.split("/")[0] in ("loss", "lr", "train"), key
        assert np.ndim(value) == 0 and np.isfinite(float(value)), key
    assert any(k.startswith("loss/") for k in metrics)
    for role, role_state in new_state.roles.items():
        if role_state.opt_state is not None:
            assert f"lr/{role}" in metrics, role
    # The role a later stage takes: the evaluated one, or (a translator stage) the first trained.
    role = base.eval_role_of(method) or next(
        r for r in method.roles if new_state.roles[r].opt_state is not None)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                     state.roles[role].params, new_state.roles[role].params)
    assert any(jax.tree_util.tree_leaves(changed))  # the step trained that role

    images = batch["source"]["image"]
    if base.eval_role_of(method) is not None:
        logits = method.predict(new_state.roles[role].variables, images)
        assert logits.shape[0] == images.shape[0]
        assert logits.shape[-1] == config.model.num_classes
    else:  # a stage without an evaluated role produces images instead
        translated = method.translate(
            {r: new_state.roles[r].variables for r in method.translate_roles}, images)
        assert translated.shape == images.shape and translated.dtype == jnp.uint8

    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(1, new_state)
    ckpt.close()
    abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0), inputs.abstract_batch(config), {})
    reader = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    params, collections = reader.restore_role(role, abstract.roles[role].params,
                                              abstract.roles[role].collections)
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(new_state.roles[role].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_json_holds_only_the_method_fields_of_the_method_that_ran():
    so = source_only.get_config("demo")
    assert set(so.method.keys()) == {"name", "aux_weight"}
    ro = road.get_config("demo")
    assert {"dist", "lambda_spt", "grid"} <= set(ro.method.keys())
    assert "lambda_pseudo" not in ro.method and "dist" not in self_training.get_config("demo").method


def test_a_method_built_from_a_config_without_its_fields_names_them():
    config = source_only.get_config("demo,method.name=road")
    with pytest.raises(ValueError, match=r"'road' reads config fields \['method.dist'.*configs/road.py"):
        methods.build(config)
