"""Seeded problems and the plain baselines that the benchmarks compare against.

APPEND ONLY: asv compares results across commits, so a problem or baseline that
changes would move every point in the history.  Add new functions at the end;
never change what an existing one returns.

Momentum convention everywhere (the paper's, and the engine's)::

    v <- beta * v - (1 - beta) * g
    x <- x + alpha * v

Sections:

1. constants and seeded vector problems       -- vector_problem, quadratic_gradient
2. baseline (a): plain NumPy momentum          -- NumpyMomentum
3. baseline (b): the 2015 Python-int buffer    -- PythonIntMomentum
4. baseline (c): naive hypergradient           -- naive_sgd
5. the seed network problem                    -- seed_problem, value_and_hypergrads
6. small timing helpers                        -- best_of, env_flag

Nothing here is named ``time_*``/``track_*``/``peakmem_*``: asv would take it for a
benchmark.
"""

import functools
import os
import time
from typing import Any, Callable, NamedTuple

import numpy as np

# ------------------------------------------------------------ 1. constants, vectors

SEED = 0
ALPHA = 0.1
BETA = 0.9
#: Parameter counts of the one-step timings.
STEP_SIZES = (10**4, 10**5, 10**6)
#: The seed network of Maclaurin et al. (2015) and its minibatch size.
SEED_LAYERS = (784, 50, 50, 50, 10)
SEED_BATCH = 200
#: Set to 1 to run the sizes that take many minutes here (see bench_hypergrad.py).
LONG_ENV = "HYPERGRAD_BENCH_LONG"


def vector_problem(n, seed=SEED):
    """``(x0, g)``: float64 (n,) start point ~ N(0, 1) and a gradient ~ 0.01 N(0, 1)."""
    rng = np.random.default_rng((seed, n))
    return rng.standard_normal(n), 0.01 * rng.standard_normal(n)


def quadratic_gradient(n, seed=SEED):
    """``grad(x)`` of a seeded diagonal quadratic, curvatures in [0.1, 1], minimum ~ N(0, 1).

    Stable for ``alpha = 0.1`` at any beta, so long runs stay inside the engine's
    fixed-point range.
    """
    rng = np.random.default_rng((seed, n, 1))
    curvature = rng.uniform(0.1, 1.0, n)
    minimum = rng.standard_normal(n)
    return lambda x: curvature * (x - minimum)


# ------------------------------------------------------------ 2. NumPy momentum


class NumpyMomentum:
    """Baseline (a): the irreversible float64 update, three in-place NumPy passes."""

    def __init__(self, x0):
        self.x = np.array(x0, dtype=np.float64)
        self.v = np.zeros_like(self.x)

    def step(self, g, alpha, beta):
        v = self.v
        v *= beta
        v -= (1.0 - beta) * g
        self.x += alpha * v

    def unstep(self, g, alpha, beta):
        """The float64 reverse step.  Inexact (the paper shows it diverges after a
        few hundred steps); here only as the cost of the same arithmetic backwards."""
        self.x -= alpha * self.v
        self.v += (1.0 - beta) * g
        self.v /= beta


# ------------------------------------------------------------ 3. Python-int buffer

RADIX = float(2**52)  # fixed point with 52 bits after the radix point
BETA_DENOM = 2**16  # beta is held as the rational n / 2**16


def _fixed(values):
    """float64 array -> int64 fixed point (round half to even)."""
    return np.rint(np.asarray(values) * RADIX).astype(np.int64)


class PythonIntMomentum:
    """Baseline (b): the 2015 information buffer, one Python int per parameter.

    ``x`` is an int64 fixed-point NumPy array (as in the 2015 code); ``v`` and the
    buffers are lists of Python ints.  Multiplying ``v`` by ``n / d`` exactly::

        buf = buf * d + v % d;  v = (v // d) * n + buf % n;  buf //= n

    and its inverse with ``n`` and ``d`` swapped.  The per-parameter loop runs in
    the interpreter, and the ints grow by ``log2(d / n)`` bits a step, so its cost
    grows with the number of steps held.
    """

    def __init__(self, x0):
        self.x = _fixed(x0)
        self.v = [0] * self.x.shape[0]
        self.bufs = [0] * self.x.shape[0]

    @staticmethod
    def _numerator(beta):
        return min(max(int(round(beta * BETA_DENOM)), 2), BETA_DENOM)

    def _gradient_term(self, g, n):
        return _fixed((1.0 - n / BETA_DENOM) * np.asarray(g)).tolist()

    def _delta_x(self, alpha):
        return np.rint(alpha * np.array(self.v, dtype=np.float64)).astype(np.int64)

    def step(self, g, alpha, beta):
        n, d = self._numerator(beta), BETA_DENOM
        dg = self._gradient_term(g, n)
        bufs, v_new = self.bufs, [0] * len(self.v)
        for i, v in enumerate(self.v):
            buf = bufs[i] * d + v % d
            v_new[i] = (v // d) * n + buf % n - dg[i]
            bufs[i] = buf // n
        self.v = v_new
        self.x += self._delta_x(alpha)

    def unstep(self, g, alpha, beta):
        """Undo :meth:`step` exactly (same ``g``, ``alpha``, ``beta``)."""
        n, d = self._numerator(beta), BETA_DENOM
        self.x -= self._delta_x(alpha)
        dg = self._gradient_term(g, n)
        bufs, v_old = self.bufs, [0] * len(self.v)
        for i, v in enumerate(self.v):
            v += dg[i]
            buf = bufs[i] * n + v % n
            v_old[i] = (v // n) * d + buf % d
            bufs[i] = buf // d
        self.v = v_old

    @property
    def aux_bits(self):
        """Bits held by the buffers (sum of their bit lengths)."""
        return sum(b.bit_length() for b in self.bufs)


# ------------------------------------------------------------ 4. naive hypergradient


def naive_sgd(loss, x0, alphas, betas, meta=None, *, groups=None):
    """Baseline (c): ``x_T`` by a plain float64 loop that autograd differentiates.

    Same signature and update as ``hypergrad_fast.sgd.sgd``; autograd's tape holds
    every iterate and every intermediate of every gradient, so memory grows
    linearly in T.  (``sgd`` uses ``effective_beta(betas)``; pass those here for
    matching trajectories.)
    """
    import autograd.numpy as anp
    from autograd import grad

    loss_grad = grad(loss)
    x, v = x0, anp.zeros(np.shape(x0)[0])
    for t in range(np.shape(alphas)[0]):
        a = alphas[t] if np.ndim(alphas[t]) == 0 else alphas[t][groups]
        b = betas[t] if np.ndim(betas[t]) == 0 else betas[t][groups]
        v = b * v - (1.0 - b) * loss_grad(x, meta, t)
        x = x + a * v
    return x


# ------------------------------------------------------------ 5. seed network


class SeedProblem(NamedTuple):
    """The hypergradient problem of the benchmarks: seed network, MNIST, T steps.

    Per-layer (T, G) schedules, per-layer L2 in ``meta["log_l2"]``; the hyperloss
    is ``valid_loss(x_T)``, the mean cross-entropy on the validation split, the same
    function for every implementation (see :func:`eval_loss`).
    """

    model: Any
    loss: Callable
    x0: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    meta: dict
    groups: np.ndarray
    valid_loss: Callable

    @property
    def n_params(self):
        return self.x0.shape[0]


@functools.lru_cache(maxsize=1)
def _mnist():
    from hypergrad_fast.data import load_mnist

    return load_mnist(n_train=3000, n_valid=1000, n_test=0, seed=SEED)


def seed_problem(n_iter, seed=SEED):
    """The seed network [784, 50, 50, 50, 10] on 3,000 MNIST digits, batch 200, ``n_iter`` steps."""
    from hypergrad_fast.models import MLP, make_meta, make_train_loss

    data = _mnist()
    model = MLP(SEED_LAYERS, "tanh")
    layout = model.layout
    loss = make_train_loss(model, data.train.inputs, data.train.targets, SEED_BATCH,
                           seed=seed, l2="group")
    meta = make_meta(model, l2="group", log_l2=-8.0)
    x0 = model.init_params(seed, np.log(0.1))
    shape = (n_iter, layout.n_groups)
    return SeedProblem(model, loss, x0, np.full(shape, ALPHA), np.full(shape, BETA), meta,
                       layout.groups, eval_loss(model, data.valid.inputs, data.valid.targets))


def eval_loss(model, inputs, targets):
    """``loss(x)``, the mean cross-entropy on (inputs, targets): ``make_eval_loss``'s
    compiled loss where the package has it (an old commit in a history run: the
    autograd ``model.loss``).  The hyperloss of ours and of the naive reference alike,
    so the two differ only in how they train and differentiate the training.  The
    compiled one leaves NumPy's BLAS threads idle: after a product they spin for about
    0.1 s and slowed the first steps of our reverse pass, which starts right after the
    hyperloss's gradient (5-10 ms instead of 1.5-2 ms for the first ten steps)."""
    try:
        from hypergrad_fast.models import make_eval_loss
    except ImportError:
        return functools.partial(model.loss, inputs=inputs, targets=targets)
    return make_eval_loss(model, inputs, targets)


def trainer(impl):
    """``sgd`` ("ours") or :func:`naive_sgd` ("naive"); NotImplementedError if ours is absent."""
    if impl == "naive":
        return naive_sgd
    try:
        from hypergrad_fast import sgd
    except ImportError as err:  # an old commit in a history run
        raise NotImplementedError(f"hypergrad_fast.sgd is not available: {err}") from None
    return sgd


def value_and_hypergrads(problem, impl):
    """The validation loss after training and its gradients with respect to x0,
    alphas, betas and meta, by ``impl`` ("ours" or "naive")."""
    from autograd import value_and_grad

    train = trainer(impl)
    p = problem

    def hyperloss(x0, alphas, betas, meta):
        x_final = train(p.loss, x0, alphas, betas, meta, groups=p.groups)
        return p.valid_loss(x_final)

    return value_and_grad(hyperloss, argnum=(0, 1, 2, 3))(p.x0, p.alphas, p.betas, p.meta)


# ------------------------------------------------------------ 6. helpers


def best_of(fn, repeats):
    """The smallest wall time of ``repeats`` calls of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def env_flag(name):
    """True when environment variable ``name`` is set to something other than "", "0"."""
    return os.environ.get(name, "") not in ("", "0")


#: Seconds of idle time before each timed call of :func:`alternating_best`.
SETTLE_SECONDS = 0.5


def alternating_best(fns, rounds, settle=None):
    """``{name: smallest wall time}`` of ``rounds`` calls of each ``fns[name]()``, taken
    in turn (a, b, a, b, ...) so that a slow spell of a shared machine falls on all.

    Each timed call starts after ``settle`` seconds of sleep (default SETTLE_SECONDS),
    as in a fresh process: the call before can leave threads busy for a while
    (NumPy's OpenBLAS workers spin about 0.1 s after their last product), and they
    compete with the next call for the two cores.  Both sides get the same pause.
    Measured on the seed network at T = 100: ours took 0.42-0.44 s right after the
    naive reference and 0.35-0.38 s after a 0.3-1 s pause.
    """
    settle = SETTLE_SECONDS if settle is None else settle
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(settle)
            best[name] = min(best[name], best_of(fn, 1))
    return best


# ------------------------------------------------------------ 7. backends and sweeps


def seed_problem_with(n_iter, backend, seed=SEED):
    """:func:`seed_problem` with the training loss of ``backend`` ("compiled" or "autograd")."""
    from hypergrad_fast.models import make_train_loss

    p = seed_problem(n_iter, seed)
    data = _mnist()
    loss = make_train_loss(p.model, data.train.inputs, data.train.targets, SEED_BATCH,
                           seed=seed, l2="group", backend=backend)
    return p._replace(loss=loss)


SWEEP_RUNS, SWEEP_T, SWEEP_BATCH = 16, 100, 100


def sweep_problem(runs=SWEEP_RUNS, n_iter=SWEEP_T, seed=SEED):
    """B logistic-regression settings on 3,000 MNIST digits: (model, data, alphas (B, T),
    betas (B, T), log_init_scales (B, G), log_l2 (B, G))."""
    from hypergrad_fast.models import LogisticRegression

    rng = np.random.default_rng(seed)
    model = LogisticRegression(784, 10)
    g = model.layout.n_groups
    return (model, _mnist(), rng.uniform(0.1, 0.5, (runs, n_iter)),
            rng.uniform(0.5, 0.9, (runs, n_iter)), np.full((runs, g), -3.0),
            np.full((runs, g), -6.0))


def run_sweep(problem):
    """``sweep(device="cpu")`` of :func:`sweep_problem`'s settings."""
    from hypergrad_fast import sweep

    model, data, alphas, betas, scales, log_l2 = problem
    return sweep(model, data, alphas, betas, scales, log_l2, batch_size=SWEEP_BATCH)


def run_sweep_one_by_one(problem):
    """The same settings as separate compiled ``sgd`` runs, each reversed with the
    validation gradient that ``sweep`` uses."""
    from autograd import make_vjp

    from hypergrad_fast import sgd
    from hypergrad_fast.models import make_train_loss

    model, data, alphas, betas, scales, log_l2 = problem
    loss = make_train_loss(model, data.train.inputs, data.train.targets, SWEEP_BATCH,
                           l2="group")
    valid = make_train_loss(model, data.valid.inputs, data.valid.targets, 1)
    noise = np.random.default_rng(0).standard_normal(model.layout.size)
    groups = model.layout.groups
    out = []
    for b in range(len(alphas)):
        x0 = np.exp(scales[b])[groups] * noise

        def train(a, be, meta, x0=x0):
            return sgd(loss, x0, a, be, meta, groups=groups)

        vjp, x_final = make_vjp(train, (0, 1, 2))(alphas[b], betas[b], {"log_l2": log_l2[b]})
        out.append(vjp(valid.evaluate(x_final)[1]))
    return out
