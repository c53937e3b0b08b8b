"""``sweep(..., client=...)``: a sweep's settings in chunks on a Dask cluster.

The B settings are cut into contiguous chunks of nearly equal size; each chunk is
one task that runs :func:`.sweep._run_settings`, the local sweep's own code, on a
worker, and the chunks' rows are joined in setting order.  Row b of a sweep depends
on row b's inputs alone, so the result equals a local sweep's bit for bit wherever
the workers compute as this process does (CPU workers: the same compiled kernels);
on GPU workers it equals it to rounding (see the README's GPU section).
``device="auto"`` is decided on each worker: CUDA where it has a usable GPU.

Data once: what every setting shares (model, data, the x0 draw:
:class:`.sweep._Shared`) is scattered to every worker once (``broadcast=True``: one
copy through the scheduler, then copied between the workers) and each task carries only its own settings' schedules and scales and a reference to
that copy.  The copy is kept, one per client, for the next sweep with the same
shared inputs (the search's next meta-iteration): it is sent again only when they
change.  A worker that joins later fetches it from a peer.

Faults:

* A worker that dies has its chunks rerun on another by the scheduler, and a chunk
  is deterministic, so nothing is lost and the bits are the same.  A chunk running on
  ``distributed.scheduler.allowed-failures`` (default 3) workers that all died is
  given up: ``distributed.KilledWorker`` is raised.  No ``retries=``: an exception a
  chunk raises is deterministic (divergence), so running it again would only repeat it.
* A setting that fails raises its error here under ``on_error="raise"`` (the other
  chunks are cancelled); under ``"report"`` its chunk returns it as a failed row.
* A lost scheduler, or a client closed while the sweep runs, raises
  :class:`SchedulerLostError`, which holds the settings that finished.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import uuid
from typing import Optional

import numpy as np

__all__ = ["INSTALL", "SchedulerLostError", "require_distributed", "run_on_cluster",
           "local_cluster", "connect", "worker_threads", "CHUNK_PREFIX", "THREADS_ENV"]

#: How to install what this module needs.
INSTALL = 'pip install "hypergrad_fast[dask]"'
#: Every chunk task's key starts with this (``hypergrad-sweep-<call>-<first>-<end>``).
CHUNK_PREFIX = "hypergrad-sweep"
#: Chunks per worker thread when ``chunk_size`` is not given: two, so that a worker
#: that finishes early takes a chunk from a slower one.
CHUNKS_PER_THREAD = 2

#: A worker's chunks run their Numba kernels on this many threads when it is set
#: (:func:`local_cluster` sets it); else on Numba's default, every core.
THREADS_ENV = "HYPERGRAD_FAST_WORKER_THREADS"

#: client id -> (token of the shared inputs, the Future of their scattered copy).
_SCATTERED: dict = {}


class SchedulerLostError(RuntimeError):
    """The Dask scheduler, or the client's connection to it, was lost during a sweep.

    finished: the indices of the settings whose chunks had finished.
    result:   a :class:`~.sweep.SweepResult` of all B settings: the finished ones'
              results, NaN rows with status ``"setting b: not run: ..."`` for the rest.
    """

    def __init__(self, message, finished=(), result=None):
        super().__init__(message)
        self.finished = tuple(finished)
        self.result = result


def require_distributed(what: str):
    """The ``distributed`` module; ImportError saying what to install when it is missing
    (``what`` names the feature that needs it)."""
    try:
        import distributed
    except ImportError as err:
        raise ImportError(f"{what} needs dask.distributed, which is not installed here; "
                          f"install it with: {INSTALL}") from err
    return distributed


def _chunk(shared, settings, device, on_error, offset):
    """One task: the local sweep of ``settings`` (setting ``offset`` first) on this worker."""
    from .sweep import _run_settings

    threads = os.environ.get(THREADS_ENV)
    if threads:
        import numba
        # Per calling thread, and read at run time: NUMBA_NUM_THREADS would have to be
        # set before numba is first imported, which a spawned worker may have done.
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    return _run_settings(shared, settings, device=device, on_error=on_error, offset=offset)


def _bounds(runs: int, size: int) -> list:
    """Contiguous (first, end) chunks of at most ``size`` settings, sizes within one."""
    n = math.ceil(runs / size)
    edges = [runs * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _default_chunk_size(client, runs: int) -> int:
    """Settings per chunk: the settings spread over CHUNKS_PER_THREAD chunks per thread."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    threads = sum(w.get("nthreads", 1) for w in workers.values()) or 1
    return max(1, math.ceil(runs / (CHUNKS_PER_THREAD * threads)))


def _scatter_once(client, shared):
    """The Future of ``shared`` on every worker: scattered now, or kept from the last
    sweep on this client with the same shared inputs."""
    from dask.base import tokenize

    token = tokenize(shared)
    held = _SCATTERED.get(client.id)
    if held is not None and held[0] == token and held[1].status == "finished":
        return held[1]
    for cid in [cid for cid, (_, f) in _SCATTERED.items() if f.status != "finished"]:
        del _SCATTERED[cid]  # copies of closed clients, or lost
    _SCATTERED.pop(client.id, None)  # release the old copy before sending the new one
    # A list, so that the tuple is one piece of data (not scattered item by item).
    [future] = client.scatter([shared], broadcast=True, hash=False)
    _SCATTERED[client.id] = (token, future)
    return future


_announced: set = set()


def _announce(client):
    """Print the dashboard link, once per client."""
    if client.id in _announced:
        return
    _announced.add(client.id)
    # Without bokeh the scheduler still serves HTTP at that link, but no dashboard.
    try:
        served = client.run_on_scheduler(_has_bokeh)
    except Exception:  # noqa: BLE001 - a scheduler that refuses run_on_scheduler
        served = True
    from tqdm.auto import tqdm

    # tqdm.write: a line that does not tear a progress bar in two.
    if served:
        tqdm.write(f"Dask dashboard: {client.dashboard_link}")
    else:
        tqdm.write("Dask dashboard: not served (the scheduler needs bokeh: pip install "
                   "'bokeh>=3.1')")


def _has_bokeh():
    import importlib.util
    return importlib.util.find_spec("bokeh") is not None


def _lost_errors(distributed):
    """What a lost scheduler or closed client raises on the client's side."""
    from distributed.comm.core import CommClosedError
    return (concurrent.futures.CancelledError, CommClosedError, OSError, TimeoutError)


def run_on_cluster(client, shared, settings, *, device, on_error, chunk_size=None,
                   progress=False):
    """:func:`.sweep._run_settings` of ``settings`` in chunks on ``client``'s workers;
    the joined :class:`.sweep._Rows`, in setting order."""
    from .sweep import _Rows, _failed_rows

    distributed = require_distributed("sweep(client=...)")
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a dask.distributed.Client, got "
                        f"{type(client).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1
                                   or not isinstance(chunk_size, (int, np.integer))):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    lost = _lost_errors(distributed)
    runs = settings.n_settings
    bounds = []
    done = {}

    def lost_error(why):
        finished = [b for lo, hi in bounds if lo in done for b in range(lo, hi)]
        not_run = RuntimeError(f"not run: {why}")
        rows = _Rows.join(done[lo] if lo in done else
                          _failed_rows(shared, settings.take(slice(lo, hi)), lo, not_run)
                          for lo, hi in bounds) if bounds else None
        return SchedulerLostError(
            f"the Dask scheduler or the client's connection to it was lost ({why}); "
            f"{len(finished)} of {runs} settings had finished (their results are in this "
            "error's .result)", finished, None if rows is None else rows.result())

    if client.status not in ("running", "newly-created"):
        raise lost_error(f"the client is {client.status}")
    try:
        size = int(chunk_size) if chunk_size is not None else _default_chunk_size(client,
                                                                                   runs)
        bounds = _bounds(runs, size)
        payload = _scatter_once(client, shared)
        call = uuid.uuid4().hex[:12]
        futures = {client.submit(_chunk, payload, settings.take(slice(lo, hi)), device,
                                 on_error, lo, key=f"{CHUNK_PREFIX}-{call}-{lo}-{hi}"): lo
                   for lo, hi in bounds}
    except lost as err:
        raise lost_error(f"{type(err).__name__}: {err}") from err
    if progress:
        _announce(client)
    from tqdm.auto import tqdm

    failed = None
    bar = tqdm(total=len(bounds), desc="sweep chunks", unit="chunk", leave=False,
               disable=not progress)
    try:
        for future in distributed.as_completed(list(futures)):
            if future.status == "error":
                failed = future
                break
            done[futures[future]] = future.result()
            bar.update(1)
    except lost as err:
        raise lost_error(f"{type(err).__name__}: {err}") from err
    finally:
        bar.close()
        if len(done) < len(bounds):  # an error, Ctrl-C or a lost scheduler: stop the rest
            with contextlib.suppress(Exception):
                client.cancel([f for f in futures if f.status == "pending"])
    if failed is not None:
        failed.result()  # raises the chunk's own error (a setting that failed)
    return _Rows.join(done[lo] for lo, _ in bounds)


def worker_threads(n_workers: int) -> int:
    """Compute threads for each of ``n_workers`` worker processes on this machine: its
    cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // n_workers)


def local_cluster(n_workers: int, **kwargs):
    """A ``distributed.LocalCluster`` of ``n_workers`` worker processes, one task
    thread each, whose Numba kernels use :func:`worker_threads` threads (so the
    processes together use every core once, not once each).  ``kwargs`` go to
    LocalCluster (e.g. ``silence_logs``).

    Two of Dask's defaults slow a sweep's worker, and are off here (measured on 2
    cores, 32 logistic-regression settings at T = 100: 2.3 s in this process, 5.7 s on
    a worker with both, 3.1 s without the first, 2.25 s without either):

    * the nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns
      off glibc's adaptive mmap threshold, so every array over 128 kB is mapped and
      unmapped afresh;
    * the worker's statistical profiler samples the task thread's stack every 10 ms
      under the GIL (it feeds the dashboard's Profile page, which stays empty here).
    """
    import dask

    distributed = require_distributed("a local Dask cluster")
    # (Dask's nanny already sets OMP, MKL and OpenBLAS to one thread in its workers.)
    options = dict(n_workers=n_workers, threads_per_worker=1, processes=True,
                   dashboard_address=":0", env={THREADS_ENV: str(worker_threads(n_workers))})
    options.update(kwargs)
    # None unsets the variable.  The nannies read both when they are made (in here) and
    # keep them for the workers they restart.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                          "distributed.worker.profile.enabled": False}):
        return distributed.LocalCluster(**options)


@contextlib.contextmanager
def connect(workers: Optional[int] = None, scheduler: Optional[str] = None, *,
            what: str = "--workers/--scheduler", **cluster_kwargs):
    """A client for ``sweep(client=...)``, closed at the end: a :func:`local_cluster` of
    ``workers`` processes (closed too), the existing cluster at ``scheduler`` (an
    address such as ``tcp://host:8786``), or None (run in this process) when neither
    is given.  ImportError naming ``what`` when dask.distributed is missing."""
    if workers is not None and scheduler is not None:
        raise ValueError("give workers or scheduler, not both")
    if workers is None and scheduler is None:
        yield None
        return
    distributed = require_distributed(what)
    # Dask logs every start and stop at INFO; a program that shows INFO on the root
    # logger (the CLI) would print them all.  Warnings (a worker that died) still show.
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        if scheduler is not None:
            client = distributed.Client(scheduler)
            try:
                yield client
            finally:
                client.close()
            return
        with local_cluster(workers, **cluster_kwargs) as cluster, \
                distributed.Client(cluster) as client:
            yield client
    finally:
        logger.setLevel(level)
