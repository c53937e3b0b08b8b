"""The exact reversible Adam engine and ``adam``: exact reversal, refusals, hypergradients."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from hypothesis import given, settings, strategies as st

from hypergrad_fast import SgdRecovery, adam, effective_beta, information_bound
from hypergrad_fast.engine import ReversibleAdam
from hypergrad_fast.models import LogisticRegression, MLP, make_train_loss

from naive import round_half_up, unrolled_adam

RTOL = 1e-6


def _states_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ the engine
def _run(engine, grad_fn, alphas, b1s, b2s):
    """T forward steps; returns the gradients."""
    gs = []
    for t in range(len(alphas)):
        g = grad_fn(engine.x, t)
        gs.append(g)
        engine.step(g, alphas[t], b1s[t], b2s[t])
    return gs


def _undo(engine, grad_fn, alphas, b1s, b2s, gs):
    for t in reversed(range(len(alphas))):
        engine.unstep_position(alphas[t])
        g = grad_fn(engine.x, t)
        np.testing.assert_array_equal(g, gs[t])  # x_t came back, so g_t does
        engine.unstep_moments(g, b1s[t], b2s[t])


def _mixed_gradient(size, seed, top=1.0):
    """A deterministic gradient field with scales from 1e-9 to ``top`` and exact zeros."""
    rng = np.random.default_rng(seed)
    scale = top * 10.0 ** rng.uniform(-9, 0, size)
    scale[rng.random(size) < 0.2] = 0.0
    curvature = rng.uniform(0.1, 2.0, size)

    def g(x, t):
        return scale * np.tanh(curvature * x + np.sin(3.0 * x + t))
    return g


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 300), steps=st.integers(1, 40),
       log2_b1=st.floats(-15, 0), log2_b2=st.floats(-15, 0),
       eps=st.sampled_from([1e-8, 1e-4, 1.0]), per_param=st.booleans(),
       s_frac_bits=st.sampled_from([44, 52, 60]), seed=st.integers(0, 2**16))
def test_reversal_is_exact(size, steps, log2_b1, log2_b2, eps, per_param, s_frac_bits, seed):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(size)
    # s < 2**(62 - s_frac_bits): gradients up to 2 ** (30 - s_frac_bits / 2)
    grad_fn = _mixed_gradient(size, seed, top=2.0 ** (30 - s_frac_bits / 2))
    alphas = rng.uniform(0.0, 0.1, steps)
    b1 = 2.0 ** log2_b1
    b2 = 2.0 ** log2_b2
    if per_param:  # per-parameter decays around the drawn ones
        b1s = [np.clip(b1 * rng.uniform(0.5, 1.0, size), 2.0**-15, 1.0) for _ in range(steps)]
        b2s = [np.clip(b2 * rng.uniform(0.5, 1.0, size), 2.0**-15, 1.0) for _ in range(steps)]
    else:
        b1s, b2s = [b1] * steps, [b2] * steps
    engine = ReversibleAdam(x0, eps=eps, s_frac_bits=s_frac_bits)
    start = engine.state
    gs = []
    for t in range(steps):  # until done, or a step is refused (m / eps can leave the range)
        g = grad_fn(engine.x, t)
        before = engine.state
        try:
            engine.step(g, alphas[t], b1s[t], b2s[t])
        except OverflowError:
            assert _states_equal(engine.state, before)
            break
        gs.append(g)
        assert (engine.state.s >= 0).all()
    taken = len(gs)
    _undo(engine, grad_fn, alphas[:taken], b1s[:taken], b2s[:taken], gs)
    assert _states_equal(engine.state, start)
    assert engine.aux_bits == 0.0 and engine.iterations == 0


def test_zero_gradients_keep_the_moments_zero():
    engine = ReversibleAdam(np.linspace(-1, 1, 50))
    start = engine.state
    for _ in range(5):
        engine.step(np.zeros(50), 0.1, 0.9, 0.999)
    assert not engine.state.s.any() and not engine.state.m.any()
    np.testing.assert_array_equal(engine.state.x, start.x)


def test_forward_matches_the_float_recursion():
    rng = np.random.default_rng(3)
    size, steps = 200, 60
    x0 = rng.standard_normal(size)
    curvature = rng.uniform(0.5, 2.0, size)

    def grad_fn(x, t):  # gradients of order 0.1 to 1: s well above its last digits
        return np.tanh(curvature * x) + 0.5 * np.sin(3.0 * x + t)
    b1, b2 = effective_beta(0.9), effective_beta(0.99)
    engine = ReversibleAdam(x0)
    _run(engine, grad_fn, [0.01] * steps, [b1] * steps, [b2] * steps)
    x, m, s = x0.copy(), np.zeros(size), np.zeros(size)
    for t in range(steps):
        g = grad_fn(x, t)
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        x = x - 0.01 * m / (np.sqrt(s) + 1e-8)
    # a decay replaces the last 16 bits of a moment by digits from the buffer: each
    # step moves it by less than 2**16 units of 2**-52 from the exact product
    np.testing.assert_allclose(engine.s, s, rtol=1e-8, atol=0)
    np.testing.assert_allclose(engine.m, m, rtol=0, atol=1e-8)
    np.testing.assert_allclose(engine.x, x, rtol=0, atol=1e-8)


def test_position_moves_by_the_rounded_quotient():
    """x_{t+1} = x_t - round_half_up(2**52 alpha m / (sqrt(s) + eps)) in integers, with the
    quotient computed from the fixed-point moments (m in units of 2**-52, s of 2**-60)
    in IEEE float64, as plain Python does."""
    rng = np.random.default_rng(7)
    size = 40
    engine = ReversibleAdam(rng.standard_normal(size), eps=1e-3)
    for t in range(6):
        g = rng.standard_normal(size) * 10.0 ** rng.uniform(-6, 0, size)
        g[::7] = 0.0
        alpha = float(rng.uniform(0.01, 0.2))
        x_before = engine.state.x
        engine.step(g, alpha, 0.9, 0.99)
        after = engine.state
        for i in range(size):
            denom = np.sqrt(float(after.s[i]) * 2.0**-60) + 1e-3
            step = (float(after.m[i]) * 2.0**-52) / denom
            delta = round_half_up((alpha * step) * 2.0**52)
            assert after.x[i] == x_before[i] - delta, (t, i)


def test_bits_held_match_the_bound():
    rng = np.random.default_rng(5)
    size, steps = 64, 3000
    engine = ReversibleAdam(rng.standard_normal(size))
    engine.reserve(steps, 0.9, 0.999)
    nbytes = engine.aux_nbytes
    grad_fn = _mixed_gradient(size, 6)
    for t in range(steps):
        engine.step(grad_fn(engine.x, t), 1e-3, 0.9, 0.999)
    bound = (information_bound(0.9) + information_bound(0.999)) * size * steps
    assert abs(engine.aux_bits / bound - 1) < 0.01
    assert engine.aux_nbytes == nbytes  # reserve sized both buffers


# ------------------------------------------------------------------ refusals
def _stepped_engine(size=8):
    engine = ReversibleAdam(np.linspace(-1, 1, size), eps=1e-6)
    for t in range(3):
        engine.step(np.cos(np.arange(size) + t), 0.05, 0.9, 0.99)
    return engine


@pytest.mark.parametrize("call, error, match", [
    (lambda e: e.step(np.full(8, np.nan), 0.1, 0.9, 0.99), FloatingPointError, r"g\[0\] = nan"),
    (lambda e: e.step(np.ones(7), 0.1, 0.9, 0.99), ValueError, "g has length 7"),
    (lambda e: e.step(np.ones(8), np.ones(3), 0.9, 0.99), ValueError, "alpha must be"),
    (lambda e: e.step(np.ones(8), np.inf, 0.9, 0.99), FloatingPointError, "alpha = inf"),
    (lambda e: e.step(np.ones(8), 0.1, 1.5, 0.99), ValueError, r"b1 = 1.5 is outside \(0, 1\]"),
    (lambda e: e.step(np.ones(8), 0.1, 0.9, 0.0), ValueError, r"b2 = 0.0 is outside"),
    (lambda e: e.step(np.ones(8), 0.1, 0.9, np.r_[np.ones(7), -1.0]), ValueError,
     r"b2\[7\] = -1.0"),
    (lambda e: e.step(np.r_[np.ones(7), 100.0], 0.1, 0.9, 0.99), OverflowError,
     r"second moment s \(from g\*\*2\) overflows .* parameter 7.*s_frac_bits=60"),
    (lambda e: e.step(np.r_[1e5, np.ones(7)], 0.1, 0.5, 0.99), OverflowError,
     r"first moment m overflows .* parameter 0"),
    (lambda e: e.step(np.r_[np.ones(5), 1.0, 1, 1], 1e5, 0.9, 0.99), OverflowError,
     r"position x overflows .* parameter 0"),
])
def test_refused_step_names_the_culprit_and_changes_nothing(call, error, match):
    engine = _stepped_engine()
    before, bits, iterations = engine.state, engine.aux_bits, engine.iterations
    with pytest.raises(error, match=match):
        call(engine)
    assert _states_equal(engine.state, before)
    assert engine.aux_bits == bits and engine.iterations == iterations


def test_refused_unsteps_change_nothing():
    engine = _stepped_engine()
    before = engine.state
    with pytest.raises(RuntimeError, match="unstep_moments must follow unstep_position"):
        engine.unstep_moments(np.ones(8), 0.9, 0.99)
    engine.unstep_position(0.05)
    mid = engine.state
    with pytest.raises(RuntimeError, match="call unstep_moments first"):
        engine.unstep_position(0.05)
    with pytest.raises(RuntimeError, match="without its unstep_moments"):
        engine.step(np.ones(8), 0.05, 0.9, 0.99)
    with pytest.raises(FloatingPointError, match=r"g\[3\] = nan"):
        engine.unstep_moments(np.r_[np.ones(3), np.nan, np.ones(4)], 0.9, 0.99)
    assert _states_equal(engine.state, mid)
    engine.unstep_moments(np.cos(np.arange(8) + 2), 0.9, 0.99)
    engine.unstep_position(0.05)
    engine.unstep_moments(np.cos(np.arange(8) + 1), 0.9, 0.99)
    engine.unstep_position(0.05)
    engine.unstep_moments(np.cos(np.arange(8) + 0), 0.9, 0.99)
    assert not engine.state.m.any() and not engine.state.s.any()
    assert not _states_equal(engine.state, before)
    with pytest.raises(ValueError, match="no step left to undo"):
        engine.unstep_position(0.05)


@pytest.mark.parametrize("eps, error", [(0.0, ValueError), (-1e-8, ValueError),
                                        (np.nan, ValueError), (np.inf, ValueError),
                                        ("1e-8", TypeError)])
def test_bad_eps(eps, error):
    with pytest.raises(error, match="eps"):
        ReversibleAdam(np.ones(3), eps=eps)
    with pytest.raises(error, match="eps"):
        adam(lambda x, m, t: anp.sum(x * x), np.ones(3), np.ones(2), np.ones(2) * 0.5,
             np.ones(2) * 0.5, eps=eps)


# ------------------------------------------------------------------ hypergradients
def _problem(model, seed=0):
    rng = np.random.default_rng(seed)
    n_in, n_out = model.layout.shapes[0][0], model.layout.shapes[-1][0]
    inputs = rng.standard_normal((120, n_in))
    targets = np.eye(n_out)[rng.integers(0, n_out, 120)]
    loss = make_train_loss(model, inputs, targets, 30, seed=seed, l2="group")
    meta = {"log_l2": np.full(model.layout.n_groups, -3.0) + 0.1 * np.arange(
        model.layout.n_groups)}
    return loss, meta


def _hypergrads(fn, loss, x0, alphas, b1s, b2s, meta, groups, w):
    def hyperloss(x0_, a_, b1_, b2_, m_):
        return anp.dot(w, fn(loss, x0_, a_, b1_, b2_, m_, eps=1e-6, groups=groups))
    return [grad(hyperloss, i)(x0, alphas, b1s, b2s, meta) for i in range(5)]


@pytest.mark.parametrize("per_group", [False, True], ids=["alphas(T,)", "alphas(T,G)"])
@pytest.mark.parametrize("model", [MLP([6, 12, 12, 3], "tanh"), LogisticRegression(20, 4)],
                         ids=["mlp", "logreg"])
def test_hypergradients_match_unrolled_reference(model, per_group):
    n_iter = 50
    rng = np.random.default_rng(1)
    loss, meta = _problem(model)
    layout = model.layout
    x0 = model.init_params(rng, -1.0)
    shape = (n_iter, layout.n_groups) if per_group else (n_iter,)
    alphas = rng.uniform(0.005, 0.02, shape)
    b1s = effective_beta(rng.uniform(0.5, 0.95, shape))
    b2s = effective_beta(rng.uniform(0.9, 0.999, shape))
    w = rng.standard_normal(layout.size)
    ours = _hypergrads(adam, loss, x0, alphas, b1s, b2s, meta, layout.groups, w)
    ref = _hypergrads(unrolled_adam, loss, x0, alphas, b1s, b2s, meta, layout.groups, w)
    for name, o, r in zip(["x0", "alphas", "b1s", "b2s", "meta"], ours, ref):
        if isinstance(r, dict):
            o, r = o["log_l2"], r["log_l2"]
        assert np.max(np.abs(r)) > 0, name
        assert np.shape(o) == np.shape(r), name
        np.testing.assert_allclose(o, r, rtol=RTOL, atol=RTOL * np.max(np.abs(r)), err_msg=name)


def test_plain_callable_loss_and_callback():
    """An autograd loss (no compiled objective), with a callback that sees m and s."""
    target = np.linspace(-1, 1, 10)

    def loss(x, meta, t):
        return anp.sum(meta * (x - target) ** 2 * (1.0 + 0.1 * anp.sin(x + t)))

    x0, meta = np.zeros(10), np.linspace(0.5, 2.0, 10)
    alphas, b1s, b2s = np.full(20, 0.05), effective_beta(np.full(20, 0.8)), \
        effective_beta(np.full(20, 0.95))
    seen = []

    def hyper(x0_, a_, m_):
        return anp.sum(adam(loss, x0_, a_, b1s, b2s, m_,
                            callback=lambda t, x, m, s, g: seen.append((t, s.min()))) ** 2)

    def hyper_ref(x0_, a_, m_):
        return anp.sum(unrolled_adam(loss, x0_, a_, b1s, b2s, m_) ** 2)

    for i in range(3):
        np.testing.assert_allclose(grad(hyper, i)(x0, alphas, meta),
                                   grad(hyper_ref, i)(x0, alphas, meta), rtol=RTOL)
    assert [t for t, _ in seen[:20]] == list(range(20)) and min(s for _, s in seen) >= 0


def test_a_nondeterministic_loss_is_caught():
    calls = []

    def loss(x, meta, t):
        calls.append(t)
        return anp.sum((x - 0.001 * len(calls)) ** 2) * 0.1

    def hyper(a_):
        return anp.sum(adam(loss, np.ones(4), a_, np.full(5, 0.5), np.full(5, 0.5)))

    with pytest.raises(SgdRecovery, match="bit for bit"):
        grad(hyper)(np.full(5, 0.1))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"b1s": np.full(5, 1.5)}, ValueError, r"b1s\[0\] = 1.5 is outside"),
    ({"b2s": np.zeros(5)}, ValueError, r"b2s\[0\] = 0.0 is outside"),
    ({"b2s": np.full(4, 0.9)}, ValueError, "b2s must have shape .* the T of alphas"),
    ({"alphas": np.full((5, 2), 0.1)}, ValueError, "pass groups"),
    ({"alphas": np.r_[0.1, np.nan, 0.1, 0.1, 0.1]}, FloatingPointError, r"alphas\[1\] = nan"),
])
def test_bad_schedules(kwargs, error, match):
    args = {"alphas": np.full(5, 0.1), "b1s": np.full(5, 0.9), "b2s": np.full(5, 0.99)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        adam(lambda x, m, t: anp.sum(x * x), np.ones(4), **args)


def test_divergence_names_the_iteration():
    def loss(x, meta, t):
        return anp.sum(x ** 2) * 10.0 ** (3 * t)

    with pytest.raises(OverflowError, match="iteration [0-9]+: step: the second moment"):
        adam(loss, np.ones(3), np.full(10, 0.1), np.full(10, 0.9), np.full(10, 0.99))


def test_compiled_gradient_then_hvp_gives_the_two_pass_hypergradients_bit_for_bit():
    """The compiled objective's one-gradient-pass reverse step (a tape per half of a
    40-row minibatch, learned inputs and per-group L2) against the default of the
    Objective interface, which computes the gradient and then gradient-and-HVP."""
    from hypergrad_fast.objectives import CompiledMLPLoss, Objective

    class TwoPasses(CompiledMLPLoss):
        grad_then_hvp = Objective.grad_then_hvp

    model = MLP([6, 9, 3], "tanh")
    rng = np.random.default_rng(5)
    inputs = rng.standard_normal((80, 6)) * (rng.random((80, 6)) < 0.6)
    targets = np.eye(3)[rng.integers(0, 3, 80)]
    fused = make_train_loss(model, inputs, targets, 40, seed=2, l2="group", learn_inputs=True)
    two = TwoPasses.__new__(TwoPasses)
    two.__dict__.update(fused.__dict__)
    meta = {"log_l2": np.full(model.layout.n_groups, -3.0), "inputs": inputs.copy()}
    n_iter = 12
    x0 = model.init_params(rng, -1.0)
    alphas = np.full(n_iter, 0.01)
    b1s, b2s = np.full(n_iter, effective_beta(0.9)), np.full(n_iter, effective_beta(0.99))
    w = rng.standard_normal(model.layout.size)
    a = _hypergrads(adam, fused, x0, alphas, b1s, b2s, meta, model.layout.groups, w)
    b = _hypergrads(adam, two, x0, alphas, b1s, b2s, meta, model.layout.groups, w)
    for name, o, r in zip(["x0", "alphas", "b1s", "b2s"], a[:4], b[:4]):
        assert np.array_equal(o, r), name
    for key in ("log_l2", "inputs"):
        assert np.any(a[4][key] != 0) and np.array_equal(a[4][key], b[4][key]), key
