"""Exactly reversible Adam: step cost against plain NumPy, bits held against the bound,
and the seed network's hypergradients against autograd through the unrolled loop.

Ratios are measured inside one process (see :mod:`.bench_ratios`): min over repeats,
the two sides taken in turn.
"""

import functools

import numpy as np

from .common import alternating_best, best_of, quadratic_gradient, seed_problem, vector_problem

REPEATS = 15
#: The decays and learning rate of the step benchmarks.
ADAM_ALPHA, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


class NumpyAdam:
    """Plain float64 Adam without bias correction, in place (the same arithmetic)."""

    def __init__(self, x0):
        self.x = np.array(x0, dtype=np.float64)
        self.m = np.zeros_like(self.x)
        self.s = np.zeros_like(self.x)

    def step(self, g, alpha, b1, b2):
        self.m *= b1
        self.m += (1.0 - b1) * g
        self.s *= b2
        self.s += (1.0 - b2) * (g * g)
        self.x -= alpha * self.m / (np.sqrt(self.s) + EPS)


class AdamEngineVsNumpy:
    """Our Adam step and reverse step over the plain NumPy Adam step, N = 1e6."""

    n = 10**6

    def setup(self):
        from hypergrad_fast import ReversibleAdam

        x0, g = vector_problem(self.n)
        self.g = 0.1 * g  # gradients of order 0.1: s well inside its range
        self.ours = ReversibleAdam(x0, eps=EPS)
        self.ours.reserve(4 * REPEATS + 10, B1, B2)
        self.numpy = NumpyAdam(x0)
        for _ in range(3):  # JIT warm-up
            self._ours_step()
            self.numpy.step(self.g, ADAM_ALPHA, B1, B2)

    def _ours_step(self):
        self.ours.step(self.g, ADAM_ALPHA, B1, B2)

    def _ours_unstep(self):
        self.ours.unstep_position(ADAM_ALPHA)
        self.ours.unstep_moments(self.g, B1, B2)

    def _numpy_step(self):
        return best_of(lambda: self.numpy.step(self.g, ADAM_ALPHA, B1, B2), REPEATS)

    def track_adam_step_vs_numpy(self):
        """min time of our Adam step / min time of the NumPy Adam step (target <= 1.5)."""
        return best_of(self._ours_step, REPEATS) / self._numpy_step()

    track_adam_step_vs_numpy.unit = "ratio"

    def track_adam_reverse_vs_numpy(self):
        """min time of our full reverse step / min time of the NumPy step (target <= 2.5)."""
        for _ in range(REPEATS):  # steps to undo
            self._ours_step()
        return best_of(self._ours_unstep, REPEATS) / self._numpy_step()

    track_adam_reverse_vs_numpy.unit = "ratio"


def run_adam_engine(n=1000, n_iter=10**4, b1=B1, b2=B2):
    """(aux_bits, aux_nbytes, bound in bits) after ``n_iter`` steps on a seeded quadratic."""
    from hypergrad_fast import ReversibleAdam, information_bound

    x0, _ = vector_problem(n)
    grad = quadratic_gradient(n)
    engine = ReversibleAdam(x0)
    engine.reserve(n_iter, b1, b2)
    for _ in range(n_iter):
        engine.step(0.1 * grad(engine.x), ADAM_ALPHA, b1, b2)
    bound = float(information_bound(b1) + information_bound(b2)) * n * n_iter
    return engine.aux_bits, engine.aux_nbytes, bound


class AdamBufferBits:
    """Bits both buffers hold after T = 10**4 steps (N = 1000) against the bound
    log2(2**16 / n1) + log2(2**16 / n2) per parameter per iteration (target within 1%)."""

    n, n_iter = 1000, 10**4
    timeout = 300

    def setup(self):
        self.bits, self.nbytes, self.bound = run_adam_engine(self.n, self.n_iter)

    def track_adam_bits_vs_bound(self):
        """Held bits / bound: 1.0 is the entropy bound."""
        return self.bits / self.bound

    track_adam_bits_vs_bound.unit = "ratio"

    def track_adam_allocated_vs_bound(self):
        """Allocated word-stack bytes * 8 / bound (what reserve() sizes for both moments)."""
        return self.nbytes * 8 / self.bound

    track_adam_allocated_vs_bound.unit = "ratio"


def naive_adam(loss, x0, alphas, b1s, b2s, meta=None, *, groups=None, eps=EPS):
    """x_T by a plain float64 Adam loop (no bias correction) that autograd differentiates;
    its tape holds every iterate, so memory grows linearly in T."""
    import autograd.numpy as anp
    from autograd import grad

    loss_grad = grad(loss)
    x, m, s = x0, anp.zeros(np.shape(x0)[0]), anp.zeros(np.shape(x0)[0])
    for t in range(np.shape(alphas)[0]):
        g = loss_grad(x, meta, t)
        b1, b2 = b1s[t][groups], b2s[t][groups]
        m = b1 * m + (1.0 - b1) * g
        s = b2 * s + (1.0 - b2) * g * g
        x = x - alphas[t][groups] * m / (anp.sqrt(s) + eps)
    return x


def adam_problem(n_iter):
    """The benchmarks' seed network problem (:func:`.common.seed_problem`) with Adam's
    (T, G) schedules: alpha 0.01, b1 0.9, b2 0.99."""
    p = seed_problem(n_iter)
    shape = p.alphas.shape
    return p, (np.full(shape, 0.01), np.full(shape, 0.9), np.full(shape, 0.99))


def adam_value_and_hypergrads(problem, impl):
    """The validation loss after Adam training and its gradients with respect to x0,
    alphas, b1s, b2s and meta, by ``impl`` ("ours": ``adam`` with the compiled
    objective, or "naive")."""
    from autograd import value_and_grad

    if impl == "ours":
        try:
            from hypergrad_fast import adam as train
        except ImportError as err:  # an old commit in a history run
            raise NotImplementedError(f"hypergrad_fast.adam is not available: {err}") from None
    else:
        train = naive_adam
    p, (alphas, b1s, b2s) = problem

    def hyperloss(x0, alphas, b1s, b2s, meta):
        x_final = train(p.loss, x0, alphas, b1s, b2s, meta, groups=p.groups)
        return p.valid_loss(x_final)

    return value_and_grad(hyperloss, argnum=(0, 1, 2, 3, 4))(p.x0, alphas, b1s, b2s, p.meta)


class AdamHypergradVsNaive:
    """Value + all Adam hypergradients, ours / autograd through the unrolled Adam loop,
    seed network, T = 100 (target <= 0.4).  Min of 3 each, taken in turn."""

    n_iter = 100
    timeout = 600

    def setup(self):
        self.problem = adam_problem(self.n_iter)
        warm = adam_problem(2)
        for impl in ("ours", "naive"):  # imports, JIT, data
            adam_value_and_hypergrads(warm, impl)

    def track_adam_hypergrad_ours_vs_naive_T100(self):
        """min time of ours / min time of the naive reference, 3 alternating runs each."""
        best = alternating_best({impl: functools.partial(adam_value_and_hypergrads,
                                                         self.problem, impl)
                                 for impl in ("naive", "ours")}, 3)
        return best["ours"] / best["naive"]

    track_adam_hypergrad_ours_vs_naive_T100.unit = "ratio"
