"""Hypergradients through ``sgd`` against references that store the whole trajectory."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from hypergrad_fast import effective_beta
from hypergrad_fast.models import LogisticRegression, MLP, make_train_loss
from hypergrad_fast.hypergrad.sgd import SgdRecovery, sgd

from naive import unrolled_sgd

RTOL = 1e-6


def _problem(model, n_examples=120, batch=30, seed=0, l2="group", learn_inputs=False):
    rng = np.random.default_rng(seed)
    n_in = model.layout.shapes[0][0]
    n_out = model.layout.shapes[-1][0]
    inputs = rng.standard_normal((n_examples, n_in))
    targets = np.eye(n_out)[rng.integers(0, n_out, n_examples)]
    loss = make_train_loss(model, inputs, targets, batch, seed=seed, l2=l2,
                           learn_inputs=learn_inputs)
    meta = {}
    if l2 == "group":
        meta["log_l2"] = np.full(model.layout.n_groups, -3.0) + 0.1 * np.arange(
            model.layout.n_groups)
    if learn_inputs:
        meta["inputs"] = inputs
    return loss, meta, inputs, targets


def _hypergrads(fn, loss, x0, alphas, betas, meta, groups, w):
    """All four hypergradients of ``w . fn(...)`` in one call per argument."""
    def hyperloss(x0_, a_, b_, m_):
        return anp.dot(w, fn(loss, x0_, a_, b_, m_, groups=groups))
    return [grad(hyperloss, i)(x0, alphas, betas, meta) for i in range(4)]


def _assert_close(ours, ref, what):
    if isinstance(ref, dict):
        for key in ref:
            _assert_close(ours[key], ref[key], f"{what}[{key!r}]")
        return
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.max(np.abs(ref)),
                               err_msg=what)


@pytest.mark.parametrize("per_group", [False, True], ids=["alphas(T,)", "alphas(T,G)"])
@pytest.mark.parametrize("model", [MLP([6, 12, 12, 3], "tanh"), LogisticRegression(20, 4)],
                         ids=["mlp", "logreg"])
def test_hypergradients_match_unrolled_reference(model, per_group):
    n_iter = 50
    rng = np.random.default_rng(1)
    loss, meta, _, _ = _problem(model)
    layout = model.layout
    x0 = model.init_params(rng, -1.0)
    shape = (n_iter, layout.n_groups) if per_group else (n_iter,)
    alphas = rng.uniform(0.2, 0.6, shape)
    betas = effective_beta(rng.uniform(0.5, 0.95, shape))
    w = rng.standard_normal(layout.size)
    ours = _hypergrads(sgd, loss, x0, alphas, betas, meta, layout.groups, w)
    ref = _hypergrads(unrolled_sgd, loss, x0, alphas, betas, meta, layout.groups, w)
    for name, o, r in zip(["x0", "alphas", "betas", "meta"], ours, ref):
        assert np.max(np.abs(r if not isinstance(r, dict) else r["log_l2"])) > 0, name
        _assert_close(o, r, name)


def test_forward_matches_float_recursion():
    model = MLP([5, 8, 3], "relu")
    loss, meta, _, _ = _problem(model)
    rng = np.random.default_rng(2)
    x0 = model.init_params(rng, -1.0)
    alphas, betas = np.full(30, 0.4), effective_beta(np.full(30, 0.9))
    ours = sgd(loss, x0, alphas, betas, meta)
    ref = unrolled_sgd(loss, x0, alphas, betas, meta)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_against_central_differences():
    model = MLP([4, 6, 2], "tanh")
    loss, meta, _, _ = _problem(model, n_examples=40, batch=10)
    rng = np.random.default_rng(3)
    x0 = model.init_params(rng, -0.5)
    n_iter = 20
    alphas = rng.uniform(0.2, 0.5, n_iter)
    betas = effective_beta(np.full(n_iter, 0.8))
    w = rng.standard_normal(model.layout.size)

    def hyperloss(x0_, a_, m_):
        return anp.dot(w, sgd(loss, x0_, a_, betas, m_))

    g_x0, g_alpha, g_meta = (grad(hyperloss, i)(x0, alphas, meta) for i in range(3))
    eps = 1e-5
    for _ in range(3):
        d = rng.standard_normal(model.layout.size)
        fd = (hyperloss(x0 + eps * d, alphas, meta) - hyperloss(x0 - eps * d, alphas, meta))
        np.testing.assert_allclose(fd / (2 * eps), np.dot(g_x0, d), rtol=1e-5)
        d = rng.standard_normal(n_iter)
        fd = (hyperloss(x0, alphas + eps * d, meta) - hyperloss(x0, alphas - eps * d, meta))
        np.testing.assert_allclose(fd / (2 * eps), np.dot(g_alpha, d), rtol=1e-5)
        d = rng.standard_normal(model.layout.n_groups)
        plus = {"log_l2": meta["log_l2"] + eps * d}
        minus = {"log_l2": meta["log_l2"] - eps * d}
        fd = hyperloss(x0, alphas, plus) - hyperloss(x0, alphas, minus)
        np.testing.assert_allclose(fd / (2 * eps), np.dot(g_meta["log_l2"], d), rtol=1e-5)


def test_composes_with_init_scales_and_learned_training_data():
    """grad of a validation loss through x0(h) and through the training inputs in meta."""
    model = MLP([5, 7, 3], "tanh")
    loss, meta, inputs, targets = _problem(model, n_examples=30, batch=10, l2=None,
                                           learn_inputs=True)
    rng = np.random.default_rng(4)
    noise = rng.standard_normal(model.layout.size)
    groups = model.layout.groups
    n_iter = 15
    alphas, betas = np.full(n_iter, 0.5), effective_beta(np.full(n_iter, 0.9))
    valid_in, valid_t = inputs[:10] + 0.1, targets[:10]

    def hyperloss(log_scales, data, fn):
        x0 = anp.exp(log_scales)[groups] * noise
        x_final = fn(loss, x0, alphas, betas, {"inputs": data})
        return model.loss(x_final, valid_in, valid_t)

    log_scales = np.full(model.layout.n_groups, -1.0)
    for argnum in (0, 1):
        ours = grad(hyperloss, argnum)(log_scales, meta["inputs"], sgd)
        ref = grad(hyperloss, argnum)(log_scales, meta["inputs"], unrolled_sgd)
        assert np.max(np.abs(ref)) > 0
        _assert_close(ours, ref, f"argnum {argnum}")


def test_plain_call_and_callback():
    model = LogisticRegression(6, 3)
    loss, meta, _, _ = _problem(model, l2=None)
    seen = []
    x0 = np.zeros(model.layout.size)
    out = sgd(loss, x0, np.full(7, 0.3), np.full(7, 0.9), callback=lambda t, x, v, g:
              seen.append((t, float(np.abs(x).sum()))))
    assert [t for t, _ in seen] == list(range(7))
    assert seen[-1][1] == pytest.approx(np.abs(out).sum())


def test_nondeterministic_loss_is_caught_by_the_recovery_check():
    model = LogisticRegression(4, 2)
    loss, meta, _, _ = _problem(model, l2=None)
    rng = np.random.default_rng(5)

    def noisy(x, m, t):
        return loss(x, m, t) + 1e-3 * rng.standard_normal() * anp.sum(x)

    f = lambda a: anp.sum(sgd(noisy, np.zeros(model.layout.size), a, np.full(5, 0.9)))
    with pytest.raises(SgdRecovery, match="bit for bit"):
        grad(f)(np.full(5, 0.3))


def _quadratic(x, meta, t):
    return anp.sum(x**2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alphas=np.ones((3, 2))), ValueError, "pass groups"),
    (dict(betas=np.full(4, 0.9)), ValueError, "betas must have shape"),
    (dict(betas=np.full(3, 1.5)), ValueError, r"betas\[0\] = 1.5 is outside"),
    (dict(alphas=np.array([0.1, np.nan, 0.1])), FloatingPointError, r"alphas\[1\] = nan"),
    (dict(alphas=np.ones((3, 2)), groups=np.array([0, 1, 2])), ValueError,
     r"groups\[2\] = 2 is outside \[0, 2\)"),
    (dict(alphas=np.ones((3, 2)), groups=np.array([0, 1])), ValueError, "groups must be"),
    (dict(x0=np.zeros((3, 1))), ValueError, "x0 must be a non-empty 1-D"),
])
def test_bad_schedules_are_refused_up_front(kwargs, error, match):
    calls = []

    def loss(x, meta, t):
        calls.append(t)
        return _quadratic(x, meta, t)

    args = dict(x0=np.ones(3), alphas=np.full(3, 0.1), betas=np.full(3, 0.9))
    args.update(kwargs)
    groups = args.pop("groups", None)
    with pytest.raises(error, match=match):
        sgd(loss, args["x0"], args["alphas"], args["betas"], groups=groups)
    assert calls == []  # nothing was computed before the refusal


def test_bad_losses_name_the_problem():
    with pytest.raises(ValueError, match="scalar"):
        sgd(lambda x, m, t: x * 2, np.ones(3), np.full(3, 0.1), np.full(3, 0.9))
    nan_late = lambda x, m, t: anp.sum(x**2) * (np.nan if t == 2 else 1.0)
    with pytest.raises(FloatingPointError, match="iteration 2"):
        sgd(nan_late, np.ones(3), np.full(3, 0.1), np.full(3, 0.9))
    huge = lambda x, m, t: anp.sum(x**2) * (1e30 if t == 4 else 1.0)
    with pytest.raises(OverflowError, match="iteration 4"):
        sgd(huge, np.ones(3), np.full(6, 0.1), np.full(6, 0.9))


@pytest.mark.parametrize("layout", ["blocks", "shuffled", "empty group"])
def test_per_group_sums_do_not_depend_on_the_group_layout(layout):
    """Blocks are summed with reduceat, other layouts with bincount: same hypergradients."""
    model = LogisticRegression(8, 3)
    loss, meta, _, _ = _problem(model, l2=None)
    n, n_iter, n_groups = model.layout.size, 12, 4
    rng = np.random.default_rng(7)
    x0 = 0.1 * rng.standard_normal(n)
    present = 3 if layout == "empty group" else n_groups  # group 3 may have no parameter
    groups = np.sort(rng.integers(0, present, n))  # contiguous blocks
    if layout == "shuffled":
        groups = rng.permutation(groups)
    alphas = rng.uniform(0.1, 0.3, (n_iter, n_groups))
    betas = effective_beta(rng.uniform(0.5, 0.9, (n_iter, n_groups)))
    w = rng.standard_normal(n)
    ours = _hypergrads(sgd, loss, x0, alphas, betas, meta, groups, w)
    ref = _hypergrads(unrolled_sgd, loss, x0, alphas, betas, meta, groups, w)
    for name, o, r in zip(["x0", "alphas", "betas"], ours, ref):
        _assert_close(o, r, name)
    assert np.all((ours[1] != 0).any(axis=0) == (np.bincount(groups, minlength=4) > 0))


@pytest.mark.parametrize("per_group", [False, True], ids=["alphas(T,)", "alphas(T,G)"])
def test_fused_cotangents_equal_the_element_wise_steps(per_group, monkeypatch):
    """With contiguous groups, the CPU backend runs each reverse step's cotangents in two
    fused passes; the hypergradients are those of the element-wise steps (the per-thread
    functions' arithmetic, which the GPU runs), bit for bit."""
    from hypergrad_fast.hypergrad import algorithm

    model = MLP([6, 12, 12, 3], "tanh")
    loss, meta, _, _ = _problem(model)
    rng = np.random.default_rng(5)
    x0 = model.init_params(rng, -1.0)
    n_iter, n_groups = 30, model.layout.n_groups
    alphas = rng.uniform(0.2, 0.6, (n_iter, n_groups) if per_group else (n_iter,))
    betas = rng.uniform(0.5, 0.95, (n_iter, n_groups))
    w = rng.standard_normal(model.layout.size)
    fused = _hypergrads(sgd, loss, x0, alphas, betas, meta, model.layout.groups, w)
    for name in ("position_cotangents", "direction", "moment_cotangents"):
        monkeypatch.setattr(algorithm.CpuBackend, name, getattr(algorithm.MomentumRule, name))
    steps = _hypergrads(sgd, loss, x0, alphas, betas, meta, model.layout.groups, w)
    for name, a, b in zip(["x0", "alphas", "betas"], fused, steps):
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert np.abs(a).max() > 0, name
    np.testing.assert_array_equal(fused[3]["log_l2"], steps[3]["log_l2"])
