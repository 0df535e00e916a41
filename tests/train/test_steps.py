import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import models, steps


def _setup(norm="batch", lr=1e-2, tx=None):
    model = models.build_model("mlp", (8, 8, 1), norm=norm, seed=0, mlp_width=16, mlp_depth=2)
    graphdefs, params, rest = steps.split_model(model)
    schedule = steps.make_schedule("constant", lr, 100)
    tx = tx or steps.make_optimizer("adam", schedule)
    state = steps.init_state(params, rest, tx, seed=0)
    train_step = jax.jit(steps.make_train_step(graphdefs.train, tx, schedule))
    eval_step = jax.jit(steps.make_eval_step(graphdefs.eval))
    return state, train_step, eval_step


@pytest.fixture(scope="module")
def bn_setup():
    # Built and compiled once for the module: every step here is pure, so
    # tests can share the initial state.
    return _setup()


def _batch(seed=0, n=32):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int32))


def _copy(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_step_learns_a_fixed_batch_and_updates_running_stats(bn_setup):
    state, train_step, _ = bn_setup
    batch = _batch()
    stats0 = _copy(state.model_state)
    losses = []
    for _ in range(30):
        state, m = train_step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30 and int(state.bad_steps) == 0
    assert not _equal(stats0, state.model_state)


def test_train_step_is_pure(bn_setup):
    state, train_step, _ = bn_setup
    a, ma = train_step(state, _batch())
    b, mb = train_step(state, _batch())
    assert _equal(a, b) and float(ma["loss"]) == float(mb["loss"])


def test_nan_batch_leaves_params_optimizer_and_stats_unchanged(bn_setup):
    state, train_step, _ = bn_setup
    state, _ = train_step(state, _batch(0))
    before = _copy(state)
    x, y = _batch(1)
    x[3, 2, 2, 0] = np.nan
    for expected_bad in (1, 2, 3):
        state, m = train_step(state, (x, y))
        assert not bool(m["finite"]) and int(m["bad_steps"]) == expected_bad
    assert _equal(before.params, state.params)
    assert _equal(before.opt_state, state.opt_state)
    assert _equal(before.model_state, state.model_state)
    assert int(state.step) == int(before.step)  # no update was applied
    # A good step resets the consecutive count and trains again.
    state, m = train_step(state, _batch(2))
    assert bool(m["finite"]) and int(m["bad_steps"]) == 0
    assert not _equal(before.params, state.params)


def test_inf_gradient_is_caught_too():
    state, train_step, _ = _setup(norm="none")
    x, y = _batch()
    x[0, 0, 0, 0] = np.inf
    new, m = train_step(state, (x, y))
    assert not bool(m["finite"])
    assert _equal(state.params, new.params)


def test_an_update_that_overflows_is_caught():
    # Updates of 3.4e39 * gradient: past float32's largest value wherever
    # |gradient| > 0.1, while the loss and gradient stay finite.
    tx = optax.chain(optax.scale(-3.4e38), optax.scale(10.0))
    state, train_step, _ = _setup(norm="batch", tx=tx)
    new, m = train_step(state, _batch())
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"]) and int(m["bad_steps"]) == 1
    assert _equal(state.params, new.params)
    assert _equal(state.model_state, new.model_state)


def test_running_statistics_that_overflow_are_caught(bn_setup):
    # Inputs of ~1e20: the batch variance, ~1e40, is infinite in float32,
    # while batch norm's outputs, the loss and the gradient stay finite.
    state, train_step, _ = bn_setup
    x, y = _batch()
    new, m = train_step(state, (1e20 * x, y))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"])
    assert _equal(state.params, new.params)
    assert _equal(state.model_state, new.model_state)


def test_eval_step_ignores_padding(bn_setup):
    state, _, eval_step = bn_setup
    x, y = _batch(n=10)
    full = eval_step(state, (x, y, np.ones(10, bool)))
    junk_x = np.concatenate([x, np.full((6, 8, 8, 1), 1e3, np.float32)])
    junk_y = np.concatenate([y, np.zeros(6, np.int32)])
    mask = np.arange(16) < 10
    padded = eval_step(state, (junk_x, junk_y, mask))
    assert float(padded["count"]) == 10
    np.testing.assert_allclose(float(padded["loss_sum"]), float(full["loss_sum"]), rtol=1e-6)
    assert float(padded["correct"]) == float(full["correct"])


@pytest.mark.parametrize("name", ["adam", "sgd", "adamw"])
def test_optimizers_and_weight_decay_mask(name):
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    tx = steps.make_optimizer(name, optax.constant_schedule(0.1), weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # With zero gradients only decay moves anything, and only the kernel.
    assert float(jnp.abs(updates["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["kernel"]).max()) > 0.0


def test_each_step_logs_the_learning_rate_it_applies():
    # The cosine schedule warms up from 0: the first update moves nothing,
    # the second uses schedule(1); a skipped (NaN) step does not advance it.
    model = models.build_model("mlp", (8, 8, 1), norm="batch", seed=0, mlp_width=16, mlp_depth=2)
    graphdefs, params, rest = steps.split_model(model)
    schedule = steps.make_schedule("cosine", 0.1, 20)
    tx = steps.make_optimizer("adam", schedule)
    state0 = steps.init_state(params, rest, tx, seed=0)
    train_step = jax.jit(steps.make_train_step(graphdefs.train, tx, schedule))
    x, y = _batch()
    state1, m1 = train_step(state0, (x, y))
    assert float(m1["lr"]) == 0.0 and _equal(state1.params, state0.params)
    nan_state, m_nan = train_step(state1, (np.full_like(x, np.nan), y))
    assert not bool(m_nan["finite"]) and float(m_nan["lr"]) == float(schedule(1))
    state2, m2 = train_step(nan_state, (x, y))
    assert float(m2["lr"]) == float(schedule(1)) > 0.0
    assert not _equal(state2.params, state1.params)


def test_sgd_is_nesterov_momentum_0_9():
    # velocity v = g + 0.9 v; update = -lr (g + 0.9 v): the look-ahead step.
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros((2,))}
    tx = steps.make_optimizer("sgd", optax.constant_schedule(0.1))
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    velocity = jax.tree.map(np.zeros_like, params)
    for _ in range(3):
        grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        velocity = jax.tree.map(lambda g, v: g + 0.9 * v, grads, velocity)
        expected = jax.tree.map(lambda g, v: -0.1 * (g + 0.9 * v), grads, velocity)
        for key in params:
            np.testing.assert_allclose(updates[key], expected[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["cosine", "onecycle", "constant"])
def test_schedules_peak_at_lr(name):
    schedule = steps.make_schedule(name, 0.1, 200)
    values = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(201)))
    assert values.max() == pytest.approx(0.1, rel=1e-3)
    if name != "constant":
        assert values[-1] < 0.01 and values[0] < 0.1


@pytest.mark.parametrize("name", ["cosine", "onecycle", "constant"])
@pytest.mark.parametrize("total", [1, 2, 3, 20, 21])
def test_short_schedules_still_reach_lr(name, total):
    # A run of a single step (one batch, one epoch) must still train.
    schedule = steps.make_schedule(name, 0.1, total)
    values = np.asarray([schedule(i) for i in range(total)])
    assert np.isfinite(values).all()
    assert values.max() == pytest.approx(0.1, rel=1e-3)


def test_make_mesh_rejects_more_devices_than_visible():
    assert steps.make_mesh(1) is None
    with pytest.raises(ValueError, match="--devices 999 but only"):
        steps.make_mesh(999)


def _library_fusion_bodies(hlo: str) -> list[str]:
    """Bodies of the computations XLA:CPU hands to YNNPACK."""
    called = re.findall(r"calls=(%[\w.-]+), [^\n]*__ynn_fusion", hlo)
    return [hlo.split(f"{name} ", 1)[1].split("\n}", 1)[0] for name in called]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_jit_steps_leave_convolutions_to_xla_on_cpu_deterministically():
    model = models.build_model("cnn", (8, 8, 1), norm="batch", seed=0)
    graphdefs, params, rest = steps.split_model(model)
    schedule = steps.make_schedule("constant", 1e-2, 100)
    # SGD: the update is linear in the gradients, so it shows their
    # difference (Adam's first step is lr * sign(g) and amplifies it).
    tx = steps.make_optimizer("sgd", schedule)
    state = steps.init_state(params, rest, tx, seed=0)
    step_fn = steps.make_train_step(graphdefs.train, tx, schedule)
    train_step, _ = steps.jit_steps(step_fn, steps.make_eval_step(graphdefs.eval), None)
    batch = _batch()
    library = _library_fusion_bodies(train_step.lower(state, batch).compile().as_text())
    default = _library_fusion_bodies(jax.jit(step_fn).lower(state, batch).compile().as_text())
    # Dots and reductions only; XLA's default also hands over convolutions
    # in jaxlib 0.10 (0.8's left them to XLA already).
    assert library and all(re.search(r" (dot|reduce|reduce-window)\(", body) for body in library)
    if jax.__version_info__ >= (0, 10):
        assert any(" convolution(" in body for body in default)
    # Same step as plain jit up to summation order (float32 sums over a
    # batch of 32: well within 1e-5), and bit-identical from call to call,
    # which bit-for-bit resume relies on.
    expected, _ = jax.jit(step_fn)(_copy(state), batch)
    first, _ = train_step(_copy(state), batch)
    again, _ = train_step(_copy(state), batch)
    assert _equal(first, again)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
