"""Compiled objectives against autograd, and the one forward/reverse path they run on.

Each compiled derivative is checked, one function at a time, against autograd on
the same loss (``make_train_loss(..., backend="autograd")``); ``sgd`` with both
backends against each other and against the unrolled reference in ``naive.py``;
``sweep(device="cpu")`` rows against separate compiled ``sgd`` runs, bit for bit.
"""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad, make_vjp, value_and_grad

from hypergrad_fast import effective_beta, sgd, sweep
from hypergrad_fast.models import MLP, LogisticRegression, make_train_loss, minibatch
from hypergrad_fast.objectives import AutogradObjective, CompiledMLPLoss, Objective

from naive import unrolled_sgd

MODELS = {
    "logreg": lambda: LogisticRegression(9, 4),
    "tanh": lambda: MLP([7, 5, 3, 4], "tanh"),
    "relu": lambda: MLP([7, 6, 4], "relu"),
}


def _data(model, n=23, seed=0):
    rng = np.random.default_rng(seed)
    n_in, n_out = model.layer_sizes[0], model.layer_sizes[-1]
    return rng.standard_normal((n, n_in)), np.eye(n_out)[rng.integers(0, n_out, n)]


def _meta(model, inputs, l2, learn_inputs, seed=1):
    rng = np.random.default_rng(seed)
    meta = {}
    if l2 == "group":
        meta["log_l2"] = rng.uniform(-3, -1, model.layout.n_groups)
    elif l2 == "weight":
        meta["log_l2"] = rng.uniform(-3, -1, model.layout.size)
    if learn_inputs:
        meta["inputs"] = inputs + 0.1 * rng.standard_normal(inputs.shape)
    return meta


def _pair(model, l2=None, learn_inputs=False, batch_size=7, **kw):
    inputs, targets = _data(model)
    args = (model, inputs, targets, batch_size)
    options = dict(seed=2, l2=l2, learn_inputs=learn_inputs, **kw)
    return (make_train_loss(*args, **options),
            make_train_loss(*args, backend="autograd", **options),
            _meta(model, inputs, l2, learn_inputs))


def _close(a, b, rtol=1e-10):
    scale = max(np.max(np.abs(b)), 1e-300)
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= rtol * scale


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("l2, learn_inputs", [(None, False), ("group", False),
                                              ("weight", False), (None, True),
                                              ("weight", True)])
def test_compiled_derivatives_match_autograd(name, l2, learn_inputs):
    model = MODELS[name]()
    compiled, traced, meta = _pair(model, l2, learn_inputs)
    assert isinstance(compiled, CompiledMLPLoss)
    rng = np.random.default_rng(3)
    x = 0.5 * rng.standard_normal(model.layout.size)
    u = rng.standard_normal(model.layout.size)
    for t in (0, 4):  # the batch of t = 4 straddles two epochs
        value, g = compiled.value_and_grad(x, meta, t)
        ref_value, ref_g = value_and_grad(traced)(x, meta, t)
        _close(value, ref_value)
        _close(g, ref_g)
        zeros = AutogradObjective(traced).meta_zeros(meta)
        g2, hu, d_meta = compiled.grad_and_hvp(x, meta, t, u, compiled.meta_zeros(meta))
        ref_g2, ref_hu, ref_d_meta = AutogradObjective(traced).grad_and_hvp(x, meta, t, u, zeros)
        assert np.array_equal(g2, g), "the reverse pass's gradient must be the forward's bits"
        _close(hu, ref_hu)
        assert set(d_meta) == set(ref_d_meta)
        for key in d_meta:
            _close(d_meta[key], ref_d_meta[key])
        g3, hu3, none = compiled.grad_and_hvp(x, meta, t, u, None)
        assert none is None and np.array_equal(g3, g) and np.array_equal(hu3, hu)


def _adam_like_direction(d_m, d_s):
    """u = a + (c g) d_s, affine in the gradient as Adam's reverse pass is."""
    def direction(g):
        return 0.1 * d_m + (0.02 * g) * d_s
    return direction


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("l2, learn_inputs", [(None, False), ("group", False),
                                              ("weight", True)])
@pytest.mark.parametrize("batch_size", [7, 40])  # one part, and two halves on two cores
def test_grad_then_hvp_is_the_two_calls_bit_for_bit(name, l2, learn_inputs, batch_size):
    """The compiled gradient-then-HVP runs the gradient pass once and keeps its tape;
    it must give the bits of value_and_grad followed by grad_and_hvp(direction(g)), and
    the autograd objective's default must agree with it."""
    model = MODELS[name]()
    compiled, traced, meta = _pair(model, l2, learn_inputs, batch_size=batch_size)
    rng = np.random.default_rng(8)
    x = 0.5 * rng.standard_normal(model.layout.size)
    direction = _adam_like_direction(*rng.standard_normal((2, model.layout.size)))
    seen = []

    def recording(g):
        seen.append(g.copy())
        return direction(g)

    for t in (0, 3):
        _, g_ref = compiled.value_and_grad(x, meta, t)
        _, hu_ref, d_ref = compiled.grad_and_hvp(x, meta, t, direction(g_ref),
                                                 compiled.meta_zeros(meta))
        g, hu, d_meta = compiled.grad_then_hvp(x, meta, t, recording, compiled.meta_zeros(meta))
        assert np.array_equal(seen[-1], g_ref), "direction must get the gradient's bits"
        assert np.array_equal(g, g_ref) and np.array_equal(hu, hu_ref)
        for key in d_ref:
            assert np.array_equal(d_meta[key], d_ref[key])
        g_x, hu_x, none = compiled.grad_then_hvp(x, meta, t, direction, None)
        assert none is None and np.array_equal(g_x, g_ref) and np.array_equal(hu_x, hu_ref)
        objective = AutogradObjective(traced)
        g_a, hu_a, d_a = objective.grad_then_hvp(x, meta, t, direction,
                                                 objective.meta_zeros(meta))
        _close(g_a, g)
        _close(hu_a, hu)
        for key in d_ref:
            _close(d_a[key], d_meta[key])


def test_grad_then_hvp_checks_the_direction():
    compiled, _, meta = _pair(MODELS["tanh"]())
    x = np.zeros(compiled.model.layout.size)
    with pytest.raises(ValueError, match="direction"):
        compiled.grad_then_hvp(x, meta, 0, lambda g: g[:-1], None)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("batch_size", [7, 40])  # one part, and two halves on two cores
def test_inputs_with_zero_columns_take_the_compact_products(activation, batch_size):
    """Pixel-like inputs: a third of the columns zero in every row, many zeros elsewhere.
    The compiled loss multiplies by the nonzero columns alone; it must still match
    autograd, and the reverse pass's gradient must still be the forward's bits."""
    from hypergrad_fast.objectives._mlp_kernels import active_columns

    model = MLP([12, 6, 3], activation)
    rng = np.random.default_rng(21)
    inputs = rng.standard_normal((60, 12)) * (rng.random((60, 12)) < 0.4)
    inputs[:, [0, 3, 4, 9]] = 0.0
    targets = np.eye(3)[rng.integers(0, 3, 60)]
    args = (model, inputs, targets, batch_size)
    compiled = make_train_loss(*args, seed=1, l2="group")
    traced = make_train_loss(*args, seed=1, l2="group", backend="autograd")
    meta = {"log_l2": rng.uniform(-3, -1, model.layout.n_groups)}
    half = minibatch(0, 60, batch_size, 1)[:batch_size // 2]
    assert 0 < active_columns(inputs, half).size <= 8, "the test must reach the compact path"
    x = 0.5 * rng.standard_normal(model.layout.size)
    u = rng.standard_normal(model.layout.size)
    for t in (0, 1):
        value, g = compiled.value_and_grad(x, meta, t)
        ref_value, ref_g = value_and_grad(traced)(x, meta, t)
        _close(value, ref_value)
        _close(g, ref_g)
        g2, hu, d_meta = compiled.grad_and_hvp(x, meta, t, u, compiled.meta_zeros(meta))
        ref = AutogradObjective(traced)
        _, ref_hu, ref_d_meta = ref.grad_and_hvp(x, meta, t, u, ref.meta_zeros(meta))
        assert np.array_equal(g2, g)
        _close(hu, ref_hu)
        _close(d_meta["log_l2"], ref_d_meta["log_l2"])
        # The tape keeps the compacted inputs and their columns.
        g3, hu3, _ = compiled.grad_then_hvp(x, meta, t, lambda _: u, None)
        assert np.array_equal(g3, g) and np.array_equal(hu3, hu)
    # The zero columns' weights get the penalty's gradient alone, to the bit.
    lam = np.exp(meta["log_l2"])[model.layout.groups]
    rows = lambda a: a[model.layout.slices["W0"]].reshape(12, 6)[[0, 3, 4, 9]]  # noqa: E731
    assert np.array_equal(rows(g), rows(lam * x))
    # Through training: the reverse pass recovers x0 and both backends agree.
    T, G = 12, model.layout.n_groups
    alphas, betas = np.full((T, G), 0.1), np.full((T, G), effective_beta(0.9))

    def hyper(loss):
        def f(x0, alphas, betas, meta):
            x_final = sgd(loss, x0, alphas, betas, meta, groups=model.layout.groups)
            return model.loss(x_final, inputs[:20], targets[:20])
        return value_and_grad(f, (0, 1, 2, 3))(0.3 * x, alphas, betas, meta)

    (v_c, g_c), (v_a, g_a) = hyper(compiled), hyper(traced)
    np.testing.assert_allclose(v_c, v_a, rtol=1e-8)
    for mine, theirs in zip(g_c[:3], g_a[:3]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(g_c[3]["log_l2"], g_a[3]["log_l2"], rtol=1e-8, atol=1e-12)


def test_compiled_loss_stays_an_autograd_function():
    model = MODELS["tanh"]()
    compiled, traced, meta = _pair(model, "group")
    x = np.random.default_rng(4).standard_normal(model.layout.size)
    assert compiled(x, meta, 3) == traced(x, meta, 3)
    _close(grad(compiled)(x, meta, 3), compiled.value_and_grad(x, meta, 3)[1])


def test_batches_table_selects_the_rows():
    model = MODELS["logreg"]()
    inputs, targets = _data(model)
    table = np.stack([minibatch(t, len(inputs), 5, seed=9) for t in range(6)])
    default = make_train_loss(model, inputs, targets, 5, seed=9)
    explicit = make_train_loss(model, inputs, targets, 5, batches=table)
    shuffled = make_train_loss(model, inputs, targets, 5, batches=table[::-1])
    x = np.random.default_rng(5).standard_normal(model.layout.size)
    for t in range(6):
        assert default.value_and_grad(x, {}, t)[0] == explicit.value_and_grad(x, {}, t)[0]
        assert explicit(x, {}, t) == explicit.value_and_grad(x, {}, t)[0] or \
            np.isclose(explicit(x, {}, t), explicit.value_and_grad(x, {}, t)[0], rtol=1e-12)
    assert shuffled.value_and_grad(x, {}, 0)[0] == explicit.value_and_grad(x, {}, 5)[0]
    with pytest.raises(ValueError, match=r"iteration 6 has no row in batches"):
        explicit.value_and_grad(x, {}, 6)


@pytest.mark.parametrize("change, match", [
    (dict(inputs=np.zeros((23, 8))), r"inputs must have shape \(n, 9\)"),
    (dict(inputs=np.zeros((23, 9), dtype=complex)), r"inputs must be a real numeric array"),
    (dict(inputs=np.full((23, 9), np.nan)), r"inputs\[0, 0\] = nan is not finite"),
    (dict(targets=np.zeros((22, 4))), r"inputs and targets must have equal lengths"),
    (dict(targets=np.array([["a"] * 4] * 23)), r"targets must be a real numeric array"),
    (dict(batches=np.full((3, 7), 23)), r"batches\[0, 0\] = 23 is outside \[0, 23\)"),
    (dict(batches=np.zeros((3, 7), dtype=float)), r"batches must hold integer"),
    (dict(batches=np.zeros((3, 6), dtype=int)), r"batches must have batch_size = 7 columns"),
    (dict(backend="jax"), r"backend must be one of"),
])
def test_bad_data_is_refused_before_training(change, match):
    model = MODELS["logreg"]()
    inputs, targets = _data(model)
    args = dict(inputs=inputs, targets=targets, batches=None, backend="compiled")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        make_train_loss(model, args["inputs"], args["targets"], 7, batches=args["batches"],
                        backend=args["backend"])


def test_missing_meta_is_named():
    model = MODELS["logreg"]()
    compiled, _, _ = _pair(model, "weight")
    x = np.zeros(model.layout.size)
    with pytest.raises(ValueError, match=r"meta\['log_l2'\]"):
        compiled.value_and_grad(x, {}, 0)
    with pytest.raises(ValueError, match=r"meta\['log_l2'\] must have shape \(40,\)"):
        compiled.value_and_grad(x, {"log_l2": np.zeros(3)}, 0)


# ------------------------------------------------------------------ through sgd
def _hypergrads(loss, model, meta, alphas, betas, x0):
    groups = model.layout.groups

    def f(x0, alphas, betas, meta):
        return model.loss(sgd(loss, x0, alphas, betas, meta, groups=groups), *VALID)

    return value_and_grad(f, (0, 1, 2, 3))(x0, alphas, betas, meta)


VALID = None


@pytest.mark.parametrize("name", ["tanh", "relu"])
@pytest.mark.parametrize("l2, learn_inputs", [("group", False), ("weight", True)])
def test_sgd_backends_agree_with_each_other_and_the_unrolled_loop(name, l2, learn_inputs):
    global VALID
    model = MODELS[name]()
    VALID = _data(model, n=15, seed=8)
    compiled, traced, meta = _pair(model, l2, learn_inputs)
    rng = np.random.default_rng(6)
    T, G = 15, model.layout.n_groups
    alphas = rng.uniform(0.05, 0.2, (T, G))
    betas = effective_beta(rng.uniform(0.6, 0.9, (T, G)))  # exact for the reference
    x0 = 0.3 * rng.standard_normal(model.layout.size)
    v_c, g_c = _hypergrads(compiled, model, meta, alphas, betas, x0)
    v_a, g_a = _hypergrads(traced, model, meta, alphas, betas, x0)

    def naive(x0, alphas, betas, meta):
        x_final = unrolled_sgd(traced, x0, alphas, betas, meta, groups=model.layout.groups)
        return model.loss(x_final, *VALID)

    v_n, g_n = value_and_grad(naive, (0, 1, 2, 3))(x0, alphas, betas, meta)
    for other_v, other_g in ((v_a, g_a), (v_n, g_n)):
        np.testing.assert_allclose(v_c, other_v, rtol=1e-8)
        for mine, theirs in zip(g_c[:3], other_g[:3]):
            np.testing.assert_allclose(mine, theirs, rtol=1e-8, atol=1e-12)
        for key in meta:
            np.testing.assert_allclose(g_c[3][key], other_g[3][key], rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------ sweep rows
def _sweep_setup(model, runs=4, T=9, per_group=True, seed=7):
    rng = np.random.default_rng(seed)
    G = model.layout.n_groups
    shape = (runs, T, G) if per_group else (runs, T)
    return dict(alphas=rng.uniform(0.05, 0.3, shape), betas=rng.uniform(0.5, 0.95, shape),
                log_init_scales=rng.uniform(-2, -1, (runs, G)),
                meta=rng.uniform(-4, -2, (runs, G)))


@pytest.mark.parametrize("name", ["logreg", "relu"])
def test_sweep_rows_equal_separate_compiled_sgd_runs_bit_for_bit(name):
    model = MODELS[name]()
    train, valid = _data(model, seed=10), _data(model, n=11, seed=11)
    s = _sweep_setup(model)
    result = sweep(model, (train, valid), batch_size=6, seed=4, x0_noise=2, **s)
    loss = make_train_loss(model, *train, 6, seed=4, l2="group")
    valid_loss = make_train_loss(model, *valid, 11)
    noise = np.random.default_rng(2).standard_normal(model.layout.size)
    groups = model.layout.groups
    for b in range(len(s["alphas"])):
        x0 = np.exp(s["log_init_scales"][b])[groups] * noise
        meta = {"log_l2": s["meta"][b]}
        run = lambda a, be, m: sgd(loss, x0, a, be, m, groups=groups)  # noqa: E731
        vjp, x_final = make_vjp(run, (0, 1, 2))(s["alphas"][b], s["betas"][b], meta)
        value, d_x = valid_loss.evaluate(x_final)
        d_alphas, d_betas, d_meta = vjp(d_x)
        assert np.array_equal(result.x_final[b], x_final)
        assert result.valid_loss[b] == value
        assert np.array_equal(result.d_alphas[b], d_alphas)
        assert np.array_equal(result.d_betas[b], d_betas)
        assert np.array_equal(result.d_meta[b], d_meta["log_l2"])


def test_a_settings_result_does_not_depend_on_its_batch_mates():
    model = MODELS["tanh"]()
    data = (_data(model, seed=12), _data(model, n=9, seed=13))
    s = _sweep_setup(model, runs=5, per_group=False)
    whole = sweep(model, data, batch_size=5, **s)
    pick = [3, 1]
    part = sweep(model, data, batch_size=5, **{k: v[pick] for k, v in s.items()})
    for field in ("valid_loss", "d_alphas", "d_betas", "d_log_init_scales", "d_meta",
                  "x_final"):
        assert np.array_equal(getattr(whole, field)[pick], getattr(part, field)), field


def test_objective_interface_is_what_sgd_calls():
    """A hand-written Objective (a quadratic) runs through sgd without autograd tracing."""

    class Quadratic(Objective):
        calls = 0

        def value_and_grad(self, x, meta, t):
            Quadratic.calls += 1
            return 0.5 * float(x @ x), x.copy()

        def grad_and_hvp(self, x, meta, t, u, d_meta):
            return x.copy(), u.copy(), d_meta

    x0 = np.linspace(-1, 1, 6)
    alphas, betas = np.full(8, 0.1), np.full(8, 0.75)
    d_x0 = grad(lambda x0: anp.sum(sgd(Quadratic(), x0, alphas, betas) ** 2))(x0)
    ref = grad(lambda x0: anp.sum(unrolled_sgd(lambda x, m, t: 0.5 * anp.sum(x * x), x0,
                                               alphas, betas) ** 2))(x0)
    np.testing.assert_allclose(d_x0, ref, rtol=1e-10)
    assert Quadratic.calls == 8


# ------------------------------------------------------------------ the eval loss
def _eval_data(model, n, zero_columns):
    """Random data; with ``zero_columns``, input columns 0 and 3 are zero in every row (as
    an MNIST set's border pixels), so the compiled eval loss leaves them out."""
    inputs, targets = _data(model, n=n, seed=3)
    if zero_columns:
        inputs[:, [0, 3]] = 0.0
    return inputs, targets


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("n", [5, 41])  # one part, and two halves on two cores
@pytest.mark.parametrize("zero_columns", [False, True])
def test_eval_loss_matches_autograd(name, n, zero_columns):
    """``make_eval_loss``: the compiled value and gradient against ``model.loss`` traced by
    autograd, on a hyperloss that trains first (the usual use)."""
    from hypergrad_fast.models import make_eval_loss

    model = MODELS[name]()
    inputs, targets = _eval_data(model, n, zero_columns)
    compiled = make_eval_loss(model, inputs, targets)
    n_in = model.layer_sizes[0]
    assert compiled._compact.shape == (n, n_in - 2 if zero_columns else n_in)
    traced = make_eval_loss(model, inputs, targets, backend="autograd")
    x = 0.7 * np.random.default_rng(4).standard_normal(model.layout.size)
    value, g = value_and_grad(compiled)(x)
    ref_value, ref_g = value_and_grad(traced)(x)
    _close(value, ref_value, rtol=1e-13)
    _close(g, ref_g, rtol=1e-12)
    assert ref_value == pytest.approx(model.loss(x, inputs, targets), rel=1e-15)
    # Through a scaled input: the chain rule reaches the compiled gradient.
    _close(grad(lambda s: compiled(s * x))(2.0), grad(lambda s: traced(s * x))(2.0))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("zero_columns", [False, True])
def test_eval_loss_value_and_error(name, zero_columns):
    """``value_and_error``: the mean cross-entropy and the misclassified fraction, as
    ``model.loss`` and ``model.error`` compute them."""
    from hypergrad_fast.models import make_eval_loss

    model = MODELS[name]()
    inputs, targets = _eval_data(model, 41, zero_columns)
    compiled = make_eval_loss(model, inputs, targets)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(model.layout.size)
        value, error = compiled.value_and_error(x)
        assert value == pytest.approx(float(model.loss(x, inputs, targets)), rel=1e-13)
        assert value == compiled.value(x)
        assert 0.0 < error < 1.0
        assert error == model.error(x, inputs, targets)


def test_eval_loss_refuses_second_derivatives_and_bad_input():
    from autograd import hessian_vector_product

    from hypergrad_fast.models import make_eval_loss

    model = MODELS["tanh"]()
    inputs, targets = _data(model)
    compiled = make_eval_loss(model, inputs, targets)
    x = np.zeros(model.layout.size)
    with pytest.raises(NotImplementedError, match="differentiable once.*backend='autograd'"):
        hessian_vector_product(compiled)(x, x)
    traced = make_eval_loss(model, inputs, targets, backend="autograd")
    assert np.all(np.isfinite(hessian_vector_product(traced)(x, x)))
    with pytest.raises(ValueError, match=r"x must have shape \(74,\)"):
        compiled(np.zeros(5))
    bad = inputs.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"inputs\[2, 1\] = nan is not finite"):
        make_eval_loss(model, bad, targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        make_eval_loss(model, inputs, targets[:, :2])
    with pytest.raises(ValueError, match="backend must be one of"):
        make_eval_loss(model, inputs, targets, backend="torch")
