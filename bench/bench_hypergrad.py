"""Value + all hypergradients of the seed network, ours beside the naive reference.

The problem (``common.seed_problem``): the [784, 50, 50, 50, 10] tanh network of
Maclaurin et al. (2015), N = 44,860 parameters, 3,000 MNIST digits, batch 200,
per-layer (T, 8) schedules alpha = 0.1, beta = 0.9, per-layer L2; hypergradients
with respect to x0, alphas, betas and the L2 strengths, from one reverse pass.

Sizes, measured on the 2-core development machine (unloaded; a machine shared
with other jobs was 2-3x slower):

* ours: ~13 ms per iteration forward + backward: T = 10, 100, 1000 take about
  0.2 s, 1.5 s, 13 s per call; T = 10000 took 145 s (peak RSS 12.8 MB above the
  ready process).  With time_, peakmem_ and the memory-growth child that is
  ~8 minutes, so T = 10000 is skipped unless ``HYPERGRAD_BENCH_LONG=1`` is set
  (setup raises NotImplementedError otherwise).
* naive: autograd's tape holds ~7.2 MB per iteration here (the minibatch copy,
  activations and every intermediate of every gradient; T = 300 added 2.14 GB),
  so T = 1000 needs ~7 GB and T = 10000 ~72 GB.  Sizes whose estimate exceeds
  ``HYPERGRAD_BENCH_NAIVE_GB`` (default 4) raise NotImplementedError in setup.
  Its speed depends on the allocator: the first run in a process pays the page
  faults of its fresh memory (up to 6x slower at T = 100 than a second run).

At most 3 samples or 30 s per size, one round, no warm-up call (``repeat``,
``rounds``, ``warmup_time`` below): a T = 1000 call is one 13 s sample.
asv's timer disables the garbage collector during a timed call; the in-process
ratios in bench_ratios.py run with it enabled, as a user would.
"""

import os

from .common import BETA, LONG_ENV, env_flag, seed_problem, value_and_hypergrads

#: Peak-memory growth of the naive reference per iteration, measured here (bytes).
NAIVE_BYTES_PER_ITERATION = 7.2e6
NAIVE_GB_ENV = "HYPERGRAD_BENCH_NAIVE_GB"
#: Sizes of ours that take many minutes on this machine: run only with LONG_ENV set.
LONG_T = 10000

_warmed = set()


def check_size(n_iter, impl):
    """Raise NotImplementedError for the documented too-large sizes (see module doc)."""
    if impl == "ours" and n_iter >= LONG_T and not env_flag(LONG_ENV):
        raise NotImplementedError(f"T = {n_iter} takes ~2.5-5 minutes per call here; "
                                  f"set {LONG_ENV}=1 to run it")
    if impl == "naive":
        budget = float(os.environ.get(NAIVE_GB_ENV, "4")) * 1e9
        need = NAIVE_BYTES_PER_ITERATION * n_iter
        if need > budget:
            raise NotImplementedError(
                f"the naive reference needs ~{need / 1e9:.0f} GB at T = {n_iter} "
                f"(budget {budget / 1e9:.0f} GB, {NAIVE_GB_ENV})")


def warm_up(impl):
    """Imports, Numba JIT and data loading, once per process."""
    if impl not in _warmed:
        value_and_hypergrads(seed_problem(2), impl)
        _warmed.add(impl)


class Hypergrad:
    """Wall time and peak RSS of value + all hypergradients for T iterations.

    peakmem is asv's ``ru_maxrss`` of the whole benchmark process (interpreter,
    NumPy, Numba, data, and on Linux the asv runner it was forked from: ~250 MB
    before the run); ``HypergradMemoryGrowth`` isolates the part that grows with T.
    """

    params = ([10, 100, 1000, LONG_T], ["ours", "naive"])
    param_names = ["T", "impl"]
    number = 1
    repeat = (1, 3, 30.0)
    rounds = 1
    min_run_count = 1
    warmup_time = 0.0
    timeout = 3600

    def setup(self, n_iter, impl):
        check_size(n_iter, impl)
        warm_up(impl)
        self.problem = seed_problem(n_iter)

    def time_value_and_hypergrads(self, n_iter, impl):
        value_and_hypergrads(self.problem, impl)

    def peakmem_value_and_hypergrads(self, n_iter, impl):
        value_and_hypergrads(self.problem, impl)


class HypergradMemoryGrowth:
    """Peak-memory growth of ours from T = 100 to larger T, against the bound.

    Each size runs in its own child process (``bench/measure.py``); growth is
    ``(peak - ready)`` at T minus the same at T = 100, where ``ready`` is the
    child's peak RSS after imports, data and JIT warm-up.  The allowance is the
    information bound ``N * (T - 100) * log2(1/beta) / 8`` bytes plus 10 MB.
    """

    params = [1000, LONG_T]
    param_names = ["T"]
    base_T = 100
    slack_bytes = 10e6
    timeout = 3600

    def setup_cache(self):
        from .measure import measure_in_child

        runs = {}
        for n_iter in [self.base_T] + list(self.params):
            try:
                check_size(n_iter, "ours")
                runs[n_iter] = measure_in_child("ours", n_iter)
            except NotImplementedError:  # too long here, or no sgd at this commit
                continue
        return runs

    setup_cache.timeout = 7200

    def setup(self, runs, n_iter):
        from hypergrad_fast import information_bound

        check_size(n_iter, "ours")
        if self.base_T not in runs or n_iter not in runs:
            raise NotImplementedError("hypergrad_fast.sgd is not available at this commit")
        base, run = runs[self.base_T], runs[n_iter]
        self.growth = (run["rss_peak"] - run["rss_ready"]) - (base["rss_peak"] - base["rss_ready"])
        bits = run["n_params"] * (n_iter - self.base_T) * float(information_bound(BETA))
        self.allowance = bits / 8 + self.slack_bytes

    def track_peak_growth(self, runs, n_iter):
        """Extra peak RSS of T iterations over T = 100, bytes."""
        return self.growth

    track_peak_growth.unit = "bytes"

    def track_peak_growth_vs_bound(self, runs, n_iter):
        """Extra peak RSS / (information bound + 10 MB): <= 1 is the claim."""
        return self.growth / self.allowance

    track_peak_growth_vs_bound.unit = "ratio"
