"""``sweep`` on a local Dask cluster: throughput, overhead per chunk, data transfer.

All figures come from :func:`measure`, run once in one process (asv's
``setup_cache``; ``python -m bench.bench_distributed`` prints them): sweep throughput
in settings per second for B = 64 logistic-regression settings at T = 100 in process
and on LocalClusters of 1 and 2 worker processes, the overhead per chunk (scheduling,
transfer and (de)serialisation: the wall time of a one-worker sweep in single-setting
chunks minus the chunks' compute time, per chunk), and the time to send the shared
data to the workers.  Each throughput is the best of ``repeats`` sweeps after a
warm-up sweep that loads the kernels and sends the data.

Worker processes are spawned with one task thread each and share the machine's
cores between them (``hypergrad_fast.hypergrad._dask.local_cluster``): one worker
runs its kernels on every core, two on half each.  Needs dask.distributed
(``pip install "hypergrad_fast[dask]"``); without it ``setup_cache`` raises
NotImplementedError.
"""

import argparse
import json
import logging
import time

import numpy as np

from .common import SWEEP_BATCH, best_of, sweep_problem

#: The settings of the throughput figures (the issue's B = 64 at T = 100).
RUNS, N_ITER = 64, 100


def _sweep(problem, **kwargs):
    from hypergrad_fast import sweep

    model, data, alphas, betas, scales, log_l2 = problem
    return sweep(model, data, alphas, betas, scales, log_l2, batch_size=SWEEP_BATCH, **kwargs)


def _cluster_figures(problem, workers, repeats, overhead_chunks, runs):
    """Throughput on a LocalCluster of ``workers`` processes; with one worker also the
    overhead per chunk and the time to send the shared data."""
    import distributed

    from hypergrad_fast.hypergrad import _dask
    from hypergrad_fast.hypergrad.sweep import _Shared

    out = {}
    with _dask.connect(workers=workers, silence_logs=logging.ERROR) as client:
        client.wait_for_workers(workers)
        warm = tuple(a[:2 * workers] if isinstance(a, np.ndarray) else a for a in problem)
        _sweep(warm, client=client, chunk_size=1)  # kernels loaded, data sent
        seconds = best_of(lambda: _sweep(problem, client=client), repeats)
        out["settings_per_second"] = runs / seconds
        if workers != 1:
            return out
        # Overhead per chunk: single-setting chunks run one after another on the one
        # worker thread; what the wall time holds beyond their compute time.
        part = tuple(a[:overhead_chunks] if isinstance(a, np.ndarray) else a for a in problem)
        best = float("inf")
        for _ in range(max(repeats, 2)):
            with distributed.get_task_stream(client) as stream:
                start = time.perf_counter()
                _sweep(part, client=client, chunk_size=1)
                wall = time.perf_counter() - start
            compute = sum(s["stop"] - s["start"] for t in stream.data
                          if str(t["key"]).startswith(_dask.CHUNK_PREFIX)
                          for s in t["startstops"] if s["action"] == "compute")
            best = min(best, (wall - compute) / overhead_chunks)
        out["overhead_per_chunk_s"] = best
        out["compute_per_setting_s"] = compute / overhead_chunks
        # The shared inputs (model, 3,000 x 784 training and 1,000 x 784 validation
        # digits, the x0 draw), scattered to the worker as a sweep does.
        model, data = problem[0], problem[1]
        shared = _Shared(model, model.layout, (data.train.inputs, data.train.targets),
                         (data.valid.inputs, data.valid.targets), SWEEP_BATCH, 0, 52, None,
                         None, np.zeros(model.layout.size), False)
        _dask._SCATTERED.pop(client.id, None)
        start = time.perf_counter()
        future = _dask._scatter_once(client, shared)
        out["scatter_s"] = time.perf_counter() - start
        out["shared_bytes"] = sum(a.nbytes for pair in shared[2:4] for a in pair)
        del future
        _dask._SCATTERED.pop(client.id, None)
    return out


def measure(runs=RUNS, n_iter=N_ITER, repeats=2, overhead_chunks=16):
    """Every figure of this file, in this process: {name: value}."""
    try:
        import distributed  # noqa: F401
    except ImportError as err:
        raise NotImplementedError(f"dask.distributed is not installed: {err}") from None
    problem = sweep_problem(runs, n_iter)
    _sweep(tuple(a[:2] if isinstance(a, np.ndarray) else a for a in problem))  # JIT, data
    figures = {"runs": runs, "n_iter": n_iter,
               "in_process_settings_per_second":
                   runs / best_of(lambda: _sweep(problem), repeats)}
    one = _cluster_figures(problem, 1, repeats, min(overhead_chunks, runs), runs)
    two = _cluster_figures(problem, 2, repeats, overhead_chunks, runs)
    figures.update({"one_worker_settings_per_second": one["settings_per_second"],
                    "two_workers_settings_per_second": two["settings_per_second"],
                    "two_over_one_worker": two["settings_per_second"]
                    / one["settings_per_second"],
                    "overhead_per_chunk_s": one["overhead_per_chunk_s"],
                    "compute_per_setting_s": one["compute_per_setting_s"],
                    "scatter_s": one["scatter_s"], "shared_bytes": one["shared_bytes"]})
    return figures


class DistributedSweep:
    """Settings per second in process and on 1 and 2 local worker processes, the ratio
    2 / 1 workers, and the overhead per chunk, all measured in one process."""

    runs = RUNS
    n_iter = N_ITER
    repeats = 2
    overhead_chunks = 16
    timeout = 900

    def setup_cache(self):
        return measure(self.runs, self.n_iter, self.repeats, self.overhead_chunks)

    setup_cache.timeout = 900

    def track_settings_per_second_in_process(self, figures):
        """B = 64 settings / best sweep time, in this process (every core)."""
        return figures["in_process_settings_per_second"]

    track_settings_per_second_in_process.unit = "settings/s"

    def track_settings_per_second_1_worker(self, figures):
        """The same on a LocalCluster of one worker process (every core)."""
        return figures["one_worker_settings_per_second"]

    track_settings_per_second_1_worker.unit = "settings/s"

    def track_settings_per_second_2_workers(self, figures):
        """The same on two worker processes (half the cores each)."""
        return figures["two_workers_settings_per_second"]

    track_settings_per_second_2_workers.unit = "settings/s"

    def track_2_workers_over_1(self, figures):
        """Throughput of 2 workers / 1 worker (> 1: two beat one)."""
        return figures["two_over_one_worker"]

    track_2_workers_over_1.unit = "ratio"

    def track_overhead_per_chunk(self, figures):
        """Seconds per chunk beyond its compute time: scheduling, transfer, (de)serialising."""
        return figures["overhead_per_chunk_s"]

    track_overhead_per_chunk.unit = "seconds"

    def track_scatter(self, figures):
        """Seconds to send the shared data (model, training and validation digits) to a worker."""
        return figures["scatter_s"]

    track_scatter.unit = "seconds"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_distributed",
                                description="Print this file's figures, measured in one "
                                            "process.")
    p.add_argument("--runs", type=int, default=RUNS)
    p.add_argument("--iters", type=int, default=N_ITER)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    f = measure(args.runs, args.iters, args.repeats)
    if args.json:
        print(json.dumps(f, indent=1))
        return
    print(f"B = {f['runs']} logistic-regression settings, T = {f['n_iter']}, "
          f"batch {SWEEP_BATCH}, 3,000 MNIST digits")
    print(f"  in process:        {f['in_process_settings_per_second']:7.2f} settings/s")
    print(f"  1 worker process:  {f['one_worker_settings_per_second']:7.2f} settings/s")
    print(f"  2 worker processes:{f['two_workers_settings_per_second']:7.2f} settings/s "
          f"({f['two_over_one_worker']:.2f} x 1 worker)")
    print(f"  overhead per chunk: {1e3 * f['overhead_per_chunk_s']:.1f} ms "
          f"(compute {1e3 * f['compute_per_setting_s']:.1f} ms per setting, 1 worker)")
    print(f"  shared data: {f['shared_bytes'] / 1e6:.1f} MB sent to a worker in "
          f"{1e3 * f['scatter_s']:.0f} ms")


if __name__ == "__main__":
    main()
