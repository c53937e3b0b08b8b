"""Bad input to ``sgd`` and ``sweep`` that used to slip through (issue 10, item 9)."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from hypergrad_fast import sgd, sweep
from hypergrad_fast.models import LogisticRegression
from hypergrad_fast.objectives import Objective


def _quadratic(x, meta, t):
    return 0.5 * anp.sum(x * x)


@pytest.mark.parametrize("alphas", [np.full(4, 0.1 + 0.1j), np.array(["0.1"] * 4)])
def test_sgd_refuses_complex_and_string_schedules(alphas):
    with pytest.raises(TypeError, match="alphas must be real numbers, got dtype"):
        sgd(_quadratic, np.ones(3), alphas, np.full(4, 0.9))


def test_nan_in_the_reverse_pass_names_its_iteration():
    class NanOnTheWayBack(Objective):
        """Finite while training; the reverse pass's recomputed gradient is NaN at t = 2."""

        def value_and_grad(self, x, meta, t):
            return 0.5 * float(x @ x), x.copy()

        def grad_and_hvp(self, x, meta, t, u, d_meta):
            g = x.copy()
            if t == 2:
                g[1] = np.nan
            return g, u.copy(), d_meta

    alphas, betas = np.full(5, 0.1), np.full(5, 0.9)
    with pytest.raises(FloatingPointError, match=r"reverse pass, iteration 2: g\[1\] = nan"):
        grad(lambda x0: anp.sum(sgd(NanOnTheWayBack(), x0, alphas, betas)))(np.ones(3))


def _data(n_in=6, n_out=3, n=12, seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((n, n_in)), np.eye(n_out)[rng.integers(0, n_out, n)]),
            (rng.standard_normal((5, n_in)), np.eye(n_out)[rng.integers(0, n_out, 5)]))


def test_sweep_batch_size_none_is_the_whole_training_set():
    model, data = LogisticRegression(6, 3), _data()
    args = dict(alphas=np.full((2, 4), 0.2), betas=np.full((2, 4), 0.8))
    whole = sweep(model, data, batch_size=None, **args)
    explicit = sweep(model, data, batch_size=12, **args)
    for field in ("valid_loss", "d_alphas", "d_betas", "x_final"):
        assert np.array_equal(getattr(whole, field), getattr(explicit, field))


def test_sweep_custom_functions_returning_nan_are_named():
    model = LogisticRegression(4, 3)

    def grad_fn(x, meta, t):
        return x.copy()

    def hvp_fn(x, meta, t, vec):
        hx = vec.copy()
        if t == 1:
            hx[0, 2] = np.nan
        return hx, None

    def valid_fn(x):
        return 0.5 * (x ** 2).sum(axis=1), x.copy()

    args = dict(alphas=np.full((2, 3), 0.1), betas=np.full((2, 3), 0.9), grad_fn=grad_fn,
                hvp_fn=hvp_fn, valid_fn=valid_fn)
    with pytest.raises(FloatingPointError, match=r"hvp_fn's hx \(iteration 1\)\[0, 2\] = nan"):
        sweep(model.layout, None, **args)

    def nan_valid(x):
        return np.full(x.shape[0], np.nan), x.copy()

    with pytest.raises(FloatingPointError, match=r"valid_fn's loss\[0\] = nan"):
        sweep(model.layout, None, **dict(args, hvp_fn=lambda x, m, t, v: (v.copy(), None),
                                         valid_fn=nan_valid))
