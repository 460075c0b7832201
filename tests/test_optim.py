"""Optimiser chains against hand-computed PyTorch-style updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synseg_jax import optim


def toy_params():
    return {
        "backbone": {
            "conv1": {"kernel": jnp.array([1.0, -2.0, 0.5])},
            "bn1": {"scale": jnp.array([1.5, 0.25]), "bias": jnp.array([0.1, -0.3])},
        },
        "classifier": {"kernel": jnp.array([1.0, -2.0, 0.5])},
    }


def run_steps(tx, params, grads_per_step):
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for grads in grads_per_step:
        params, state = step(params, state, grads)
    return params, state


def test_poly_schedule_values():
    sched = optim.poly_schedule(2.5e-4, 1000, power=0.9)
    assert float(sched(0)) == pytest.approx(2.5e-4, rel=1e-6)
    assert float(sched(500)) == pytest.approx(2.5e-4 * 0.5 ** 0.9, rel=1e-6)
    assert float(sched(1000)) == 0.0
    assert float(sched(1500)) == 0.0
    assert float(jax.jit(sched)(jnp.int32(250))) == pytest.approx(2.5e-4 * 0.75 ** 0.9, rel=1e-6)
    lrs = optim.current_lrs(sched, 500, head_lr_mult=10.0)
    assert float(lrs["base"]) == pytest.approx(2.5e-4 * 0.5 ** 0.9, rel=1e-6)
    assert float(lrs["head"]) == pytest.approx(10 * float(lrs["base"]), rel=1e-6)
    # Train steps report the lr from inside jit, with a traced step.
    traced = jax.jit(lambda step: optim.current_lrs(sched, step, 10.0))(jnp.int32(500))
    assert float(traced["head"]) == pytest.approx(float(lrs["head"]), rel=1e-6)
    constant = optim.current_lrs(1e-3, 7)
    assert float(constant["base"]) == pytest.approx(1e-3) and float(constant["head"]) == \
        pytest.approx(1e-2)

def test_sgd_two_steps_match_pytorch_sgd_by_hand():
    base, wd, mom, max_steps = 0.1, 5e-4, 0.9, 4
    tx = optim.make_optimizer("sgd", optim.poly_schedule(base, max_steps), momentum=mom,
                              weight_decay=wd)
    params = toy_params()
    g1 = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    g2 = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
    new, _ = run_steps(tx, params, [g1, g2])

    lr = [base, base * (1 - 1 / max_steps) ** 0.9]
    for path, mult in ((("backbone", "conv1", "kernel"), 1.0), (("classifier", "kernel"), 10.0),
                       (("backbone", "bn1", "scale"), 1.0)):
        def get(tree):
            for k in path:
                tree = tree[k]
            return np.asarray(tree, np.float64)
        p0 = get(params)
        d1 = get(g1) + wd * p0                    # PyTorch: weight decay joins the gradient
        buf = d1                                  # first step: buf = d
        p1 = p0 - mult * lr[0] * buf
        d2 = get(g2) + wd * p1
        buf = mom * buf + d2                      # no dampening
        p2 = p1 - mult * lr[1] * buf
        np.testing.assert_allclose(get(new) - p0, p2 - p0, rtol=1e-5, err_msg=str(path))


def test_head_moves_ten_times_the_body_for_the_same_gradient():
    tx = optim.make_optimizer("sgd", 0.01, head_lr_mult=10.0)
    params = toy_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.7), params)
    new, _ = run_steps(tx, params, [grads])
    body = np.asarray(new["backbone"]["conv1"]["kernel"] - params["backbone"]["conv1"]["kernel"])
    head = np.asarray(new["classifier"]["kernel"] - params["classifier"]["kernel"])
    np.testing.assert_allclose(head, 10 * body, rtol=1e-5)
    assert np.all(body != 0)


def test_frozen_leaves_stay_bit_identical_and_hold_no_state():
    tx = optim.make_optimizer("sgd", optim.poly_schedule(0.1, 100),
                              frozen_predicate=optim.is_batchnorm)
    params = toy_params()
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 5.0, params)
    new, state = run_steps(tx, params, [grads] * 3)
    for name in ("scale", "bias"):
        before = np.asarray(params["backbone"]["bn1"][name])
        after = np.asarray(new["backbone"]["bn1"][name])
        assert before.tobytes() == after.tobytes()
    assert not np.array_equal(new["backbone"]["conv1"]["kernel"],
                              params["backbone"]["conv1"]["kernel"])
    # Momentum buffers exist for the 3 + 3 trainable numbers only, plus the step counters.
    state_size = sum(np.size(x) for x in jax.tree.leaves(state))
    assert state_size == 6 + 2


def test_frozen_prefixes_match_whole_components():
    params = {"backbone": {"layer1": {"kernel": jnp.ones(2)}, "layer10": {"kernel": jnp.ones(2)}},
              "head": {"kernel": jnp.ones(2)}}
    frozen = optim.under_prefixes(["backbone/layer1"])
    labels = optim.label_params(params, frozen_predicate=frozen)
    assert labels == {"backbone": {"layer1": {"kernel": "frozen"}, "layer10": {"kernel": "body"}},
                      "head": {"kernel": "head"}}
    tx = optim.make_optimizer("sgd", 0.1, frozen_predicate=frozen)
    new, _ = run_steps(tx, params, [jax.tree.map(jnp.ones_like, params)])
    np.testing.assert_array_equal(new["backbone"]["layer1"]["kernel"], jnp.ones(2))
    assert np.all(np.asarray(new["backbone"]["layer10"]["kernel"]) < 1)


def test_default_predicates():
    assert optim.is_head(("params", "ASPPClassifier_0", "conv_6", "kernel"))
    assert optim.is_head(("params", "aux_head", "bias"))
    assert not optim.is_head(("params", "backbone", "layer4_2", "conv3", "kernel"))
    assert optim.is_batchnorm(("params", "layer1_0", "bn2", "scale"))
    assert optim.is_batchnorm(("params", "BatchNorm_0", "bias"))
    assert not optim.is_batchnorm(("params", "conv1", "kernel"))
    assert optim.any_of(optim.is_head, optim.is_batchnorm)(("x", "bn1", "bias"))
    assert optim.param_paths(toy_params())[0] == ("backbone", "bn1", "bias")


@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.5, 0.999)])
def test_adam_two_steps_match_hand_computation(betas):
    b1, b2 = betas
    lr, eps = 1e-2, 1e-8
    tx = optim.make_optimizer("adam", lr, betas=betas, head_lr_mult=10.0)
    params = toy_params()
    g1 = jax.tree.map(lambda p: jnp.linspace(0.2, 1.0, p.size).reshape(p.shape), params)
    g2 = jax.tree.map(lambda p: jnp.linspace(-0.5, 0.4, p.size).reshape(p.shape), params)
    new, _ = run_steps(tx, params, [g1, g2])
    leaves = {"body": (lambda t: t["backbone"]["conv1"]["kernel"], 1.0),
              "head": (lambda t: t["classifier"]["kernel"], 10.0)}
    for group, (sub, mult) in leaves.items():
        p0 = np.asarray(sub(params), np.float64)
        a1, a2 = np.asarray(sub(g1), np.float64), np.asarray(sub(g2), np.float64)
        m = (1 - b1) * a1
        v = (1 - b2) * a1 ** 2
        p1 = p0 - mult * lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
        m = b1 * m + (1 - b1) * a2
        v = b2 * v + (1 - b2) * a2 ** 2
        p2 = p1 - mult * lr * (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + eps)
        # Compare displacements, not parameters: a wrong beta2 shifts p2 by ~1e-5, which a
        # relative tolerance on parameters of size 1 would not see.
        np.testing.assert_allclose(np.asarray(sub(new), np.float64) - p0, p2 - p0, rtol=1e-4,
                                   err_msg=group)


def test_adam_weight_decay_is_l2_added_to_the_gradient():
    lr, wd = 1e-2, 0.1
    tx = optim.make_optimizer("adam", lr, weight_decay=wd)
    params = {"w": jnp.array([2.0, -1.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    new, _ = run_steps(tx, params, [grads, grads])
    p = np.array([2.0, -1.0])
    m = v = 0.0
    for t in (1, 2):
        d = 0.5 + wd * p
        m = 0.9 * m + 0.1 * d
        v = 0.99 * v + 0.01 * d ** 2
        p = p - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(new["w"]) - [2.0, -1.0], p - [2.0, -1.0], rtol=1e-4)


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="sgd"):
        optim.make_optimizer("rmsprop", 0.1)


def test_linear_warmup_ramps_then_follows_the_schedule():
    sched = optim.poly_schedule(1e-2, 100)
    warmed = optim.linear_warmup(sched, 10)
    assert float(warmed(0)) == pytest.approx(0.1 * float(sched(0)), rel=1e-6)
    assert float(warmed(4)) == pytest.approx(0.5 * float(sched(4)), rel=1e-6)
    assert float(jax.jit(warmed)(jnp.int32(9))) == pytest.approx(float(sched(9)), rel=1e-6)
    assert float(warmed(50)) == pytest.approx(float(sched(50)), rel=1e-6)
    assert optim.linear_warmup(sched, 0) is sched
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.linear_warmup(sched, -1)

