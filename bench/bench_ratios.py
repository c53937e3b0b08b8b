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
    LONG_ENV,
    alternating_best,
    best_of,
    env_flag,
    run_sweep,
    run_sweep_one_by_one,
    seed_problem,
    seed_problem_with,
    sweep_problem,
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


class HypergradVsNaiveT1000:
    """As :class:`HypergradVsNaive` at T = 1000 (~15 s and ~7 GB for the naive reference);
    set HYPERGRAD_BENCH_LONG=1 to run it."""

    n_iter = 1000
    timeout = 1200

    def setup(self):
        if self.n_iter >= 1000 and not env_flag(LONG_ENV):
            raise NotImplementedError(f"T = 1000 against the naive reference: set {LONG_ENV}=1")
        HypergradVsNaive.setup(self)

    def track_hypergrad_ours_vs_naive_T1000(self):
        """min time of ours / min time of the naive reference, 2 alternating runs each."""
        best = alternating_best({impl: functools.partial(value_and_hypergrads, self.problem, impl)
                                 for impl in ("naive", "ours")}, 2)
        return best["ours"] / best["naive"]

    track_hypergrad_ours_vs_naive_T1000.unit = "ratio"


class CompiledVsAutogradObjective:
    """Value + all hypergradients through ``sgd``, seed network, T = 100: the compiled
    objective over the autograd one (the same loss, traced at every step)."""

    n_iter = 100
    timeout = 600

    def setup(self):
        self.problems = {b: seed_problem_with(self.n_iter, b) for b in ("compiled", "autograd")}
        for b in self.problems:
            value_and_hypergrads(seed_problem_with(2, b), "ours")

    def track_compiled_vs_autograd_T100(self):
        """min time compiled / min time autograd, 3 alternating runs each."""
        best = alternating_best({b: functools.partial(value_and_hypergrads, p, "ours")
                                 for b, p in self.problems.items()}, 3)
        return best["compiled"] / best["autograd"]

    track_compiled_vs_autograd_T100.unit = "ratio"


class SweepVsSeparateRuns:
    """``sweep(device="cpu")`` of B = 16 logistic-regression settings, T = 100, over the
    same 16 settings as separate compiled ``sgd`` runs (equal results, bit for bit)."""

    runs, n_iter = 16, 100
    timeout = 600

    def setup(self):
        self.problem = sweep_problem(self.runs, self.n_iter)
        warm = sweep_problem(runs=2, n_iter=2)
        run_sweep(warm)
        run_sweep_one_by_one(warm)

    def track_sweep_vs_separate_B16_T100(self):
        """min time of the sweep / min time of the separate runs, 3 alternating runs each."""
        best = alternating_best({"sweep": functools.partial(run_sweep, self.problem),
                                 "separate": functools.partial(run_sweep_one_by_one,
                                                               self.problem)}, 3)
        return best["sweep"] / best["separate"]

    track_sweep_vs_separate_B16_T100.unit = "ratio"
