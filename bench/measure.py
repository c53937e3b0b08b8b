"""Time and peak memory of one hypergradient run, each in a fresh child process.

Peak memory is the child's peak resident set: ``VmHWM`` from
``/proc/self/status`` on Linux (the high-water mark of this process image, which
includes NumPy and Numba memory that tracemalloc would miss).  Not
``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that survives fork + exec, so a
child of a large parent would report the parent's peak.  Elsewhere ru_maxrss is
the fallback.  The child reports it twice: after imports, data and JIT
warm-up (``rss_ready``) and after the measured run (``rss_peak``); the
difference is what the run itself added.  One configuration per process, so
runs never contaminate each other.

The child is started by file path, not with ``-m``, so that only ``bench/`` goes
on its ``sys.path``: under an asv history run it must import the
``hypergrad_fast`` installed in asv's environment, not the working tree.

    python bench/measure.py --impl ours --iterations 100 [--repeats 2]   # one JSON line
"""

import argparse
import json
import os
import subprocess
import sys
import time

if __package__:
    from . import common
else:  # started by path (the child process)
    import common

HERE = os.path.dirname(os.path.abspath(__file__))
#: Exit status of a child whose implementation does not exist at this commit.
UNAVAILABLE = 3


def maxrss_bytes():
    """Peak resident set of this process image so far, in bytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def measure_here(impl, n_iter, repeats=1):
    """Run value + all hypergradients ``repeats`` times after a 2-step warm-up.

    Returns a dict: the minimum wall time (``seconds``), the peak RSS after the
    warm-up (``rss_ready``) and after the runs (``rss_peak``), in bytes.
    """
    common.value_and_hypergrads(common.seed_problem(2), impl)  # imports, JIT, data
    problem = common.seed_problem(n_iter)
    rss_ready = maxrss_bytes()
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        value, _ = common.value_and_hypergrads(problem, impl)
        seconds = min(seconds, time.perf_counter() - start)
    return {"impl": impl, "T": n_iter, "n_params": problem.n_params, "seconds": seconds,
            "repeats": repeats,
            "rss_ready": rss_ready, "rss_peak": maxrss_bytes(), "value": float(value)}


def measure_in_child(impl, n_iter, repeats=1, timeout=None):
    """:func:`measure_here` in a fresh Python process; returns its dict.

    Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds,
    NotImplementedError if the implementation is missing (an old commit) and
    RuntimeError (with the child's stderr) if the child fails otherwise.
    """
    cmd = [sys.executable, os.path.join(HERE, "measure.py"), "--impl", impl,
           "--iterations", str(n_iter), "--repeats", str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode == UNAVAILABLE:
        raise NotImplementedError(done.stderr.strip().splitlines()[-1])
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("ours", "naive"), required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1, help="time = min over repeats")
    args = parser.parse_args(argv)
    try:
        result = measure_here(args.impl, args.iterations, args.repeats)
    except NotImplementedError as err:  # e.g. no hypergrad_fast.sgd at this commit
        print(err, file=sys.stderr)
        sys.exit(UNAVAILABLE)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
