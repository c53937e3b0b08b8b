"""One optimiser step: the exact engine beside plain NumPy and the 2015 Python-int buffer.

Every timed call starts from a freshly set-up state: the asv runner installed
here re-runs ``setup`` before each timed call when a benchmark has one (asv#966),
and ``number = 1`` keeps other runners to one call per sample.
"""

import copy
import itertools

from .common import (ALPHA, BETA, STEP_SIZES, NumpyMomentum, PythonIntMomentum,
                     vector_problem)

#: Steps taken in setup before the timed step, so the buffer is not empty.
PRIOR_STEPS = 10
#: The 2015 buffer runs a Python loop over the parameters: about 0.3 us each per
#: step here (30 ms at N = 1e5, ~0.3 s at N = 1e6), so it is timed only up to this N.
PYTHON_INT_MAX_N = 10**5


class _Ours:
    """The exact engine behind the baselines' ``step``/``unstep`` interface."""

    def __init__(self, x0, room):
        from hypergrad_fast import ReversibleMomentum

        self.engine = ReversibleMomentum(x0)
        self.engine.reserve(room, BETA)  # no buffer growth inside a timed call

    def step(self, g, alpha, beta):
        self.engine.step(g, alpha, beta)

    def unstep(self, g, alpha, beta):
        self.engine.unstep_position(alpha)
        self.engine.unstep_velocity(g, beta)


def make_optimiser(impl, x0, room=1000):
    """"ours", "numpy" or "python_int" momentum started at ``x0``."""
    if impl == "ours":
        return _Ours(x0, room)
    if impl == "numpy":
        return NumpyMomentum(x0)
    if impl == "python_int":
        return PythonIntMomentum(x0)
    raise ValueError(f"unknown implementation {impl!r}")


class OneStep:
    """Wall time of one forward step and one reverse step, after 10 prior steps.

    "numpy"'s reverse is the float64 division by beta: inexact (the paper shows it
    diverges), timed only as the cost of the same arithmetic backwards.  "ours"'s
    reverse is ``unstep_position`` + ``unstep_velocity``, exact.  "python_int" only
    for N <= 1e5 (see PYTHON_INT_MAX_N).
    """

    params = (list(STEP_SIZES), ["ours", "numpy", "python_int"])
    param_names = ["N", "impl"]
    number = 1

    def setup(self, n, impl):
        if impl == "python_int" and n > PYTHON_INT_MAX_N:
            raise NotImplementedError("the Python-int buffer takes ~0.3 s a step at N = 1e6; "
                                      f"timed only for N <= {PYTHON_INT_MAX_N}")
        x0, self.g = vector_problem(n)
        self.opt = make_optimiser(impl, x0)
        for _ in range(PRIOR_STEPS):  # also the JIT warm-up
            self.opt.step(self.g, ALPHA, BETA)
        self.opt.unstep(self.g, ALPHA, BETA)  # JIT warm-up of the reverse kernels
        self.opt.step(self.g, ALPHA, BETA)

    def time_step(self, n, impl):
        self.opt.step(self.g, ALPHA, BETA)

    def time_reverse_step(self, n, impl):
        self.opt.unstep(self.g, ALPHA, BETA)


class StepAfterT:
    """Wall time of one forward step after T prior steps, N = 1e4, beta = 0.9.

    The 2015 buffer's ints grow by log2(1/beta) = 0.152 bits a step (30 bits at
    T = 200, 304 at T = 2000); the engine's per-step work does not depend on T.
    The states after T steps are built once in ``setup_cache`` (the Python-int one
    takes ~10 s for T = 2000) and copied before every timed call.
    """

    params = ([200, 2000], ["ours", "python_int"])
    param_names = ["T", "impl"]
    number = 1
    n = 10**4

    def setup_cache(self):
        x0, g = vector_problem(self.n)
        states = {}
        for n_prior, impl in itertools.product(*self.params):
            opt = make_optimiser(impl, x0, room=n_prior + 1000)
            for _ in range(n_prior):
                opt.step(g, ALPHA, BETA)
            states[n_prior, impl] = opt
        return states

    setup_cache.timeout = 600

    def setup(self, states, n_prior, impl):
        _, self.g = vector_problem(self.n)
        self.opt = copy.deepcopy(states[n_prior, impl])
        if impl == "ours":  # JIT warm-up on a throwaway copy
            copy.deepcopy(self.opt).step(self.g, ALPHA, BETA)

    def time_step(self, states, n_prior, impl):
        self.opt.step(self.g, ALPHA, BETA)

