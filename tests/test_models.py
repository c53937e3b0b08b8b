"""Tests for hypergrad_fast.models: layouts, MLP losses, L2, minibatches, gradients."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from hypergrad_fast.models import (
    MLP,
    LogisticRegression,
    ParamLayout,
    l2_penalty,
    make_meta,
    make_train_loss,
    minibatch,
)

# ---------------------------------------------------------------- helpers


def central_diff(f, x, v, eps=1e-5):
    """Directional derivative of scalar f at x along v, O(eps^2) accurate."""
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


def check_directional(f, g, x, rng, n_dirs=3, rtol=1e-6):
    """Compare <grad f(x), v> from autograd with central differences."""
    for _ in range(n_dirs):
        v = rng.standard_normal(np.shape(x))
        analytic = float(np.sum(g * v))
        numeric = central_diff(f, x, v)
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=1e-9)


def small_problem(seed=0, n=12, sizes=(6, 5, 4), activation="tanh"):
    rng = np.random.default_rng(seed)
    model = MLP(sizes, activation=activation)
    inputs = rng.standard_normal((n, sizes[0]))
    labels = rng.integers(0, sizes[-1], size=n)
    targets = np.eye(sizes[-1])[labels]
    x = model.init_params(rng, np.log(0.7))
    return model, inputs, targets, x, rng


# ---------------------------------------------------------------- ParamLayout


def test_layout_attributes():
    lay = ParamLayout([("W", (3, 2)), ("b", (2,)), ("s", ()), ("V", 4)])
    assert lay.size == 6 + 2 + 1 + 4
    assert lay.names == ("W", "b", "s", "V")
    assert lay.shapes == ((3, 2), (2,), (), (4,))
    assert lay.n_groups == 4
    assert lay.slices["b"] == slice(6, 8) and lay.slices["s"] == slice(8, 9)
    np.testing.assert_array_equal(lay.groups, [0] * 6 + [1] * 2 + [2] + [3] * 4)
    assert lay.groups.dtype == np.int64
    assert lay.group_of("s") == 2
    with pytest.raises(KeyError, match="nope"):
        lay.group_of("nope")
    r = repr(lay)
    assert "size=13" in r and "W(3, 2)" in r and "V(4,)" in r


def test_layout_flatten_unflatten_round_trip():
    lay = ParamLayout([("W", (3, 2)), ("b", (2,)), ("s", ())])
    x = np.arange(lay.size, dtype=np.float64) * 1.5
    blocks = lay.unflatten(x)
    assert blocks["W"].shape == (3, 2) and blocks["s"].shape == ()
    np.testing.assert_array_equal(blocks["W"], x[:6].reshape(3, 2))  # C order
    back = lay.flatten(blocks)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, x)
    again = lay.unflatten(lay.flatten({"s": 7, "b": [1, 2], "W": np.ones((3, 2))}))
    assert float(again["s"]) == 7.0


def test_layout_validation():
    with pytest.raises(ValueError, match="duplicate"):
        ParamLayout([("a", (2,)), ("a", (3,))])
    lay = ParamLayout([("a", (2,)), ("b", (3,))])
    with pytest.raises(ValueError, match="shape"):
        lay.flatten({"a": np.zeros(2), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="missing"):
        lay.flatten({"a": np.zeros(2)})
    with pytest.raises(ValueError):
        lay.unflatten(np.zeros(4))
    with pytest.raises(ValueError):
        lay.expand(np.zeros(3))


def test_layout_expand_and_unflatten_are_differentiable():
    lay = ParamLayout([("a", (2, 2)), ("b", (3,))])
    w = np.array([0.3, -1.2])

    def f(per_group):
        return anp.sum(lay.expand(per_group) ** 2)

    # d/dw_k sum_i w_{g(i)}^2 = 2 * count_k * w_k
    np.testing.assert_allclose(grad(f)(w), 2 * np.array([4, 3]) * w)

    def h(x):
        blocks = lay.unflatten(x)
        return anp.sum(blocks["a"][0] * 2.0) + anp.sum(blocks["b"] ** 2)

    x = np.arange(7.0)
    np.testing.assert_allclose(grad(h)(x), [2, 2, 0, 0, 8, 10, 12])


def test_mlp_layout_and_validation():
    model = MLP([4, 3, 2])
    assert model.layout.names == ("W0", "b0", "W1", "b1")
    assert model.layout.shapes == ((4, 3), (3,), (3, 2), (2,))
    assert model.layout.size == 4 * 3 + 3 + 3 * 2 + 2
    lr = LogisticRegression(5, 3)
    assert lr.layout.names == ("W0", "b0") and lr.layout.size == 18
    with pytest.raises(ValueError, match="activation"):
        MLP([2, 2], activation="sigmoid")
    with pytest.raises(ValueError):
        MLP([3])
    with pytest.raises(ValueError):
        model.log_probs(np.zeros(model.layout.size), np.zeros((2, 5)))


def test_init_params_scales():
    model = MLP([50, 40, 10])
    log_scales = np.log([2.0, 0.01, 0.5, 1e-3])
    x = model.init_params(np.random.default_rng(0), log_scales)
    assert x.shape == (model.layout.size,)
    blocks = model.layout.unflatten(x)
    # The sample std of 2000 standard normals is within a few percent of 1.
    assert blocks["W0"].std() == pytest.approx(2.0, rel=0.1)
    assert blocks["W1"].std() == pytest.approx(0.5, rel=0.15)
    assert np.abs(blocks["b1"]).max() < 1e-2
    scalar = model.init_params(np.random.default_rng(0), 0.0)
    expected = np.random.default_rng(0).standard_normal(model.layout.size)
    np.testing.assert_array_equal(scalar, expected)
    np.testing.assert_array_equal(x, model.init_params(np.random.default_rng(0), log_scales))
    with pytest.raises(ValueError):
        model.init_params(np.random.default_rng(0), np.zeros(3))


# ---------------------------------------------------------------- MLP outputs


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_log_probs_normalised_and_stable(activation):
    model, inputs, targets, x, _ = small_problem(activation=activation)
    lp = model.log_probs(x, inputs)
    assert lp.shape == (len(inputs), 4)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-12)
    # Huge logits must not overflow to inf/nan.
    lp_big = model.log_probs(x * 1e4, inputs)
    assert np.all(np.isfinite(lp_big)) and np.all(lp_big <= 0)
    np.testing.assert_allclose(np.exp(lp_big).sum(1), 1.0, rtol=1e-12)


def test_loss_matches_naive_softmax():
    model, inputs, targets, x, _ = small_problem(sizes=(6, 4))
    p = model.layout.unflatten(x)
    logits = inputs @ p["W0"] + p["b0"]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    naive = -np.mean(np.log((probs * targets).sum(1)))
    assert model.loss(x, inputs, targets) == pytest.approx(naive, rel=1e-12)


def test_relu_hidden_layer_matches_naive():
    model, inputs, targets, x, _ = small_problem(activation="relu")
    p = model.layout.unflatten(x)
    h = np.maximum(inputs @ p["W0"] + p["b0"], 0)
    logits = h @ p["W1"] + p["b1"]
    expected = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(model.log_probs(x, inputs), expected, rtol=1e-12, atol=1e-14)


def test_error_of_perfect_and_wrong_classifier():
    model = LogisticRegression(10, 10)
    labels = np.arange(40) % 10
    inputs = np.eye(10)[labels]  # inputs are one-hot codes of the class
    targets = np.eye(10)[labels]
    perfect = model.layout.flatten({"W0": 5.0 * np.eye(10), "b0": np.zeros(10)})
    assert model.error(perfect, inputs, targets) == 0.0
    assert isinstance(model.error(perfect, inputs, targets), float)
    assert model.error(perfect, inputs, labels) == 0.0  # integer labels accepted
    shifted = model.layout.flatten({"W0": 5.0 * np.roll(np.eye(10), 1, axis=1), "b0": np.zeros(10)})
    assert model.error(shifted, inputs, targets) == 1.0
    # Bias towards class 0 only: right exactly on the class-0 examples.
    b = np.zeros(10)
    b[0] = 1.0
    biased = model.layout.flatten({"W0": np.zeros((10, 10)), "b0": b})
    assert model.error(biased, inputs, targets) == pytest.approx(0.9)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_loss_gradient_matches_finite_differences(activation):
    model, inputs, targets, x, rng = small_problem(seed=3, activation=activation)
    f = lambda x_: model.loss(x_, inputs, targets)  # noqa: E731
    check_directional(f, grad(f)(x), x, rng)


def test_loss_gradient_wrt_inputs():
    model, inputs, targets, x, rng = small_problem(seed=4)
    f = lambda inp: model.loss(x, inp, targets)  # noqa: E731
    check_directional(f, grad(f)(inputs), inputs, rng)


@pytest.mark.parametrize("l2", ["group", "weight"])
def test_train_loss_meta_gradients(l2):
    model, inputs, targets, x, rng = small_problem(seed=5, n=10)
    loss = make_train_loss(model, inputs, targets, batch_size=4, seed=2, l2=l2, learn_inputs=True)
    n = model.layout.n_groups if l2 == "group" else model.layout.size
    meta = {
        "log_l2": rng.normal(-1.0, 0.5, size=n),
        "inputs": inputs + 0.1 * rng.standard_normal(inputs.shape),
    }
    t = 3  # a batch that straddles the first epoch boundary (positions 12..15)
    g_meta = grad(loss, 1)(x, meta, t)
    assert set(g_meta) == {"log_l2", "inputs"}

    f_l2 = lambda v: loss(x, {"log_l2": v, "inputs": meta["inputs"]}, t)  # noqa: E731
    check_directional(f_l2, g_meta["log_l2"], meta["log_l2"], rng)
    f_in = lambda v: loss(x, {"log_l2": meta["log_l2"], "inputs": v}, t)  # noqa: E731
    check_directional(f_in, g_meta["inputs"], meta["inputs"], rng)
    f_x = lambda v: loss(v, meta, t)  # noqa: E731
    check_directional(f_x, grad(loss, 0)(x, meta, t), x, rng)

    # Only this iteration's batch receives input gradient.
    touched = np.flatnonzero(np.abs(g_meta["inputs"]).sum(1) > 0)
    np.testing.assert_array_equal(touched, np.unique(minibatch(t, 10, 4, seed=2)))


def test_train_loss_value():
    model, inputs, targets, x, rng = small_problem(seed=6, n=9)
    log_l2 = np.array([-1.0, -2.0, 0.5, -3.0])
    loss = make_train_loss(model, inputs, targets, 4, seed=1, l2="group")
    idx = minibatch(5, 9, 4, seed=1)
    expected = model.loss(x, inputs[idx], targets[idx]) + l2_penalty(model.layout, x, log_l2)
    assert loss(x, {"log_l2": log_l2}, 5) == pytest.approx(expected, rel=1e-14)
    plain = make_train_loss(model, inputs, targets, 4, seed=1)
    assert plain(x, None, 5) == pytest.approx(model.loss(x, inputs[idx], targets[idx]), rel=1e-14)
    with pytest.raises(ValueError, match="log_l2"):
        loss(x, {"log_l2": np.zeros(model.layout.size)}, 0)  # wrong shape for "group"
    with pytest.raises(ValueError, match="l2"):
        make_train_loss(model, inputs, targets, 4, l2="l1")


def test_make_meta():
    model = MLP([3, 2])
    meta = make_meta(model, np.ones((4, 3)), l2="weight", log_l2=-2.0)
    np.testing.assert_array_equal(meta["log_l2"], np.full(model.layout.size, -2.0))
    assert meta["inputs"].shape == (4, 3) and meta["inputs"].dtype == np.float64
    assert set(make_meta(model, l2="group")) == {"log_l2"}
    assert make_meta(model) == {}


# ---------------------------------------------------------------- L2 penalty


def test_l2_penalty_shapes_and_values():
    lay = ParamLayout([("a", (2,)), ("b", (3,))])
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    per_group = np.log([2.0, 0.5])
    expected = 0.5 * (2.0 * (1 + 4) + 0.5 * (9 + 16 + 25))
    assert l2_penalty(lay, x, per_group) == pytest.approx(expected)
    per_weight = np.log([2.0, 2.0, 0.5, 0.5, 0.5])
    assert l2_penalty(lay, x, per_weight) == pytest.approx(expected)
    for bad in (np.zeros(3), np.zeros((2, 1)), 0.0):
        with pytest.raises(ValueError, match="log_l2"):
            l2_penalty(lay, x, bad)


def test_l2_penalty_gradients():
    lay = ParamLayout([("a", (2, 2)), ("b", (3,))])
    rng = np.random.default_rng(7)
    x = rng.standard_normal(lay.size)
    log_l2 = rng.standard_normal(lay.n_groups)
    g_x = grad(l2_penalty, 1)(lay, x, log_l2)
    np.testing.assert_allclose(g_x, np.exp(lay.expand(log_l2)) * x)
    f = lambda v: l2_penalty(lay, x, v)  # noqa: E731
    check_directional(f, grad(f)(log_l2), log_l2, rng)


# ---------------------------------------------------------------- minibatches


@pytest.mark.parametrize("n, batch", [(10, 3), (12, 4), (7, 7), (5, 8)])
def test_minibatch_covers_each_epoch_once(n, batch):
    stream = np.concatenate([minibatch(t, n, batch, seed=4) for t in range(3 * n)])
    assert all(len(minibatch(t, n, batch, seed=4)) == batch for t in range(3))
    epochs = stream[: (len(stream) // n) * n].reshape(-1, n)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    # Different epochs are shuffled differently.
    assert any(not np.array_equal(epochs[0], e) for e in epochs[1:])


def test_minibatch_deterministic():
    a = [minibatch(t, 100, 16, seed=3) for t in range(20)]
    # Asked for in another order, in between other seeds: the same batches.
    for t in reversed(range(20)):
        minibatch(t, 100, 16, seed=9)
        np.testing.assert_array_equal(minibatch(t, 100, 16, seed=3), a[t])
    assert a[0].dtype == np.int64
    assert not np.array_equal(minibatch(0, 100, 16, seed=4), a[0])
    # Callers cannot corrupt the cached permutation through the result.
    b = minibatch(0, 100, 16, seed=3)
    b[:] = 0
    np.testing.assert_array_equal(minibatch(0, 100, 16, seed=3), a[0])


def test_minibatch_validation():
    for args in [(-1, 10, 2), (0, 0, 2), (0, 10, 0), (1.5, 10, 2)]:
        with pytest.raises(ValueError):
            minibatch(*args)
    assert np.array_equal(minibatch(np.int64(2), 10, 3), minibatch(2, 10, 3))
