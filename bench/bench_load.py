"""One optimiser step with another process keeping a core busy.

On an idle machine the engine's parallel kernels are the fastest; when another
process computes, a thread team waits for its slowest thread, and the parallel
build can take several times as long as the serial one.  The kernels pick their
build from the timings of their own calls (``hypergrad_fast.engine._cpu_kernels``),
so under load a step should cost at most about what the serial kernels cost.

Here the step and the reverse step are timed idle and with a busy child process
(an interpreter spinning in a loop, started in ``setup``, stopped in
``teardown``), and ``track_*`` ratios compare them, in the same process and under
the same load, with the serial kernels and with the plain NumPy step.  The ratios
are of mean times over ROUNDS alternating calls: the mean includes the kernels'
occasional re-timing of the slower build, which a minimum would leave out.
"""

import contextlib
import subprocess
import sys
import time
import weakref

from .bench_steps import make_optimiser
from .common import ALPHA, BETA, vector_problem

#: Steps taken in setup: the JIT warm-up, and the kernels' first timings under the load.
WARM_STEPS = 8
#: Alternating calls per ratio.
ROUNDS = 20
#: The busy process stops by itself after this long, should nobody stop it.
BUSY_MAX_SECONDS = 300.0

# The child polls its parent: when this process dies (a benchmark timeout kills it),
# the child is re-parented and stops within milliseconds.
_SPIN = """\
import os, sys, time
parent, end = os.getppid(), time.monotonic() + float(sys.argv[1])
print("busy", flush=True)
while os.getppid() == parent and time.monotonic() < end:
    for _ in range(100_000):
        pass
"""


def _kill(proc):
    proc.kill()
    proc.wait()
    proc.stdout.close()


class BusyCore:
    """A child process that keeps one core busy, from construction until :meth:`stop`.

    Also stopped when the object is collected, when this interpreter exits, and by
    itself after ``max_seconds``.
    """

    def __init__(self, max_seconds=BUSY_MAX_SECONDS):
        proc = subprocess.Popen([sys.executable, "-c", _SPIN, str(float(max_seconds))],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # returns once the child runs its loop
        self._stop = weakref.finalize(self, _kill, proc)

    def stop(self):
        """Stop the child (once; later calls do nothing)."""
        self._stop()


def _kernels():
    """The CPU kernel module, if it can be told which build to run."""
    from hypergrad_fast.engine import _cpu_kernels

    if not hasattr(_cpu_kernels, "FORCE_BUILD"):  # an old commit in a history run
        raise NotImplementedError("this commit's kernels cannot be held to one build")
    return _cpu_kernels


def _mean_times(fns, rounds):
    """``{name: mean wall time}`` of ``rounds`` calls of each ``fns[name]()``, taken in turn."""
    total = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            total[name] += time.perf_counter() - start
    return {name: t / rounds for name, t in total.items()}


class StepUnderLoad:
    """Our step and reverse step, idle and with a busy core; N = 1e4 and 1e6, beta = 0.9.

    "serial" is the same engine held to the serial kernels.  At N = 1e4 every kernel
    is serial anyway (below ``PARALLEL_MIN_SIZE``); N = 1e6 is the size where the
    choice of build matters.
    """

    params = ([10**4, 10**6], ["idle", "loaded"])
    param_names = ["N", "load"]
    number = 1

    def setup(self, n, load):
        self.kernels = _kernels()
        x0, self.g = vector_problem(n)
        self.ours = make_optimiser("ours", x0)
        self.serial = make_optimiser("ours", x0)
        self.numpy = make_optimiser("numpy", x0)
        self.busy = BusyCore() if load == "loaded" else None
        self.kernels.forget_timings()  # choose the builds under this load from the start
        for _ in range(WARM_STEPS):
            self.ours.step(self.g, ALPHA, BETA)
            self._serial_step()
            self.numpy.step(self.g, ALPHA, BETA)
        self.ours.unstep(self.g, ALPHA, BETA)  # JIT warm-up of the reverse kernels
        self.ours.step(self.g, ALPHA, BETA)

    def teardown(self, n, load):
        if self.busy is not None:
            self.busy.stop()

    @contextlib.contextmanager
    def _held_to_serial(self):
        old = self.kernels.FORCE_BUILD
        self.kernels.FORCE_BUILD = "serial"
        try:
            yield
        finally:
            self.kernels.FORCE_BUILD = old

    def _serial_step(self):
        with self._held_to_serial():
            self.serial.step(self.g, ALPHA, BETA)

    def _step(self):
        self.ours.step(self.g, ALPHA, BETA)

    def _numpy_step(self):
        self.numpy.step(self.g, ALPHA, BETA)

    def _reverse_step(self):
        self.ours.unstep(self.g, ALPHA, BETA)

    def time_step(self, n, load):
        self._step()

    def time_reverse_step(self, n, load):
        self._reverse_step()

    def time_serial_step(self, n, load):
        self._serial_step()

    def time_numpy_step(self, n, load):
        self._numpy_step()

    def track_step_over_serial(self, n, load):
        """Mean time of our step / of the same step held to the serial kernels."""
        t = _mean_times({"ours": self._step, "serial": self._serial_step}, ROUNDS)
        return t["ours"] / t["serial"]

    track_step_over_serial.unit = "ratio"

    def track_step_over_numpy(self, n, load):
        """Mean time of our step / of the plain NumPy step."""
        t = _mean_times({"ours": self._step, "numpy": self._numpy_step}, ROUNDS)
        return t["ours"] / t["numpy"]

    track_step_over_numpy.unit = "ratio"

    def track_reverse_over_numpy(self, n, load):
        """Mean time of our full reverse step / of the plain NumPy forward step."""
        for _ in range(ROUNDS):  # steps to undo
            self._step()
        t = _mean_times({"ours": self._reverse_step, "numpy": self._numpy_step}, ROUNDS)
        return t["ours"] / t["numpy"]

    track_reverse_over_numpy.unit = "ratio"
