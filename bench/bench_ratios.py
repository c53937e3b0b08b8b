"""Time ratios measured inside one process, as the minimum over repeats.

Both sides of a ratio run in the same process within seconds of each other, so
a loaded or slower machine moves both and the ratio stays put; these are the
numbers to compare across commits and machines.  ``track_*`` values are plain
ratios (unit "ratio"): < 1 means ours is faster for "ours / X", > 1 means ours
is faster for "X / ours".  The garbage collector stays enabled (asv's own timer
disables it), as in real use; it matters for the naive reference, whose tape is
millions of Python objects.
"""

import copy
import functools

from .bench_steps import make_optimiser
from .common import (
    ALPHA,
    BETA,
    alternating_best,
    best_of,
    seed_problem,
    value_and_hypergrads,
    vector_problem,
)

REPEATS = 15


class EngineVsNumpy:
    """Our forward and reverse step over the plain NumPy step, N = 1e6."""

    n = 10**6

    def setup(self):
        x0, self.g = vector_problem(self.n)
        self.ours = make_optimiser("ours", x0, room=1000)
        self.numpy = make_optimiser("numpy", x0)
        for _ in range(3):  # JIT warm-up
            self.ours.step(self.g, ALPHA, BETA)
            self.numpy.step(self.g, ALPHA, BETA)

    def _numpy_step(self):
        return best_of(lambda: self.numpy.step(self.g, ALPHA, BETA), REPEATS)

    def track_step_vs_numpy(self):
        """min time of our step / min time of the NumPy step."""
        return best_of(lambda: self.ours.step(self.g, ALPHA, BETA), REPEATS) / self._numpy_step()

    track_step_vs_numpy.unit = "ratio"

    def track_reverse_vs_numpy(self):
        """min time of our full reverse step / min time of the NumPy forward step."""
        for _ in range(REPEATS):  # steps to undo
            self.ours.step(self.g, ALPHA, BETA)
        ours = best_of(lambda: self.ours.unstep(self.g, ALPHA, BETA), REPEATS)
        return ours / self._numpy_step()

    track_reverse_vs_numpy.unit = "ratio"


class EngineVsPythonInt:
    """The 2015 Python-int buffer against ours, N = 1e4, beta = 0.9.

    "python_int / ours" after T = 200 prior steps is how many times faster our
    step is; "after 2000 / after 200" shows whether a step's cost grows with T.
    """

    n = 10**4
    t_short = 200
    t_long = 2000

    def setup(self):
        x0, self.g = vector_problem(self.n)
        self.at_short = {}
        for impl in ("ours", "python_int"):
            opt = make_optimiser(impl, x0, room=self.t_long + 1000)
            for _ in range(self.t_short):  # includes the JIT warm-up
                opt.step(self.g, ALPHA, BETA)
            self.at_short[impl] = opt

    def _step_time(self, opt, repeats):
        opt = copy.deepcopy(opt)  # a few steps past T do not matter; keep the original
        return best_of(lambda: opt.step(self.g, ALPHA, BETA), repeats)

    def _long_over_short(self, impl, repeats):
        at_long = copy.deepcopy(self.at_short[impl])
        for _ in range(self.t_long - self.t_short):
            at_long.step(self.g, ALPHA, BETA)
        return (self._step_time(at_long, repeats)
                / self._step_time(self.at_short[impl], repeats))

    def track_python_int_vs_ours_T200(self):
        """min step time of the Python-int buffer / ours, after 200 steps."""
        return (self._step_time(self.at_short["python_int"], 5)
                / self._step_time(self.at_short["ours"], REPEATS))

    track_python_int_vs_ours_T200.unit = "ratio"

    def track_ours_T2000_vs_T200(self):
        """Our step time after 2000 steps / after 200 (1.0: flat in T)."""
        return self._long_over_short("ours", REPEATS)

    track_ours_T2000_vs_T200.unit = "ratio"

    def track_python_int_T2000_vs_T200(self):
        """Python-int step time after 2000 steps / after 200 (~8 s of preparation)."""
        return self._long_over_short("python_int", 5)

    track_python_int_T2000_vs_T200.unit = "ratio"
    track_python_int_T2000_vs_T200.timeout = 300


class HypergradVsNaive:
    """Value + all hypergradients, ours / naive, seed network, T = 100 (~1 s each).

    Min of 3 each, the two taken in turn (naive, ours, naive, ours, ...), so that a
    slow spell of a shared machine falls on both.  The naive reference's later runs
    reuse the memory its first run page-faulted in, so its minimum is its fast case.
    """

    n_iter = 100
    timeout = 600

    def setup(self):
        self.problem = seed_problem(self.n_iter)
        warm = seed_problem(2)
        for impl in ("ours", "naive"):  # imports, JIT, data
            value_and_hypergrads(warm, impl)

    def track_hypergrad_ours_vs_naive_T100(self):
        """min time of ours / min time of the naive reference, 3 alternating runs each."""
        best = alternating_best({impl: functools.partial(value_and_hypergrads, self.problem, impl)
                                 for impl in ("naive", "ours")}, 3)
        return best["ours"] / best["naive"]

    track_hypergrad_ours_vs_naive_T100.unit = "ratio"
