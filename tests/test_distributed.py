"""``sweep(client=...)`` on a real LocalCluster of two worker processes, and the
per-setting status of ``on_error="report"``: the cluster's result equals the local
sweep's bit for bit, the data go to each worker once, a worker killed mid-sweep
loses nothing, a diverging setting is reported while the others are returned, and a
lost scheduler raises SchedulerLostError.  (Without dask.distributed: test_search.py.)"""

import contextlib
import logging
import os
import threading
import time

import numpy as np
import pytest

from hypergrad_fast import SchedulerLostError, sweep
from hypergrad_fast.hypergrad import _dask
from hypergrad_fast.models import LogisticRegression, MLP

distributed = pytest.importorskip("distributed")

RUNS, ITERS, BATCH, SEED = 10, 12, 20, 3
MODEL = LogisticRegression(30, 5)


def _data(model=MODEL, n_train=200, n_valid=50, seed=0):
    rng = np.random.default_rng(seed)
    n_in, n_out = model.layer_sizes[0], model.layer_sizes[-1]
    return ((rng.standard_normal((n_train, n_in)), np.eye(n_out)[rng.integers(0, n_out, n_train)]),
            (rng.standard_normal((n_valid, n_in)), np.eye(n_out)[rng.integers(0, n_out, n_valid)]))


def _args(runs=RUNS, model=MODEL, per_group=False, diverge=(), seed=1):
    rng = np.random.default_rng(seed)
    g = model.layout.n_groups
    shape = (runs, ITERS, g) if per_group else (runs, ITERS)
    alphas = rng.uniform(0.05, 0.4, shape)
    alphas[list(diverge)] = 1e5  # overflows the fixed-point range within a few steps
    return dict(model=model, data=_data(model), alphas=alphas,
                betas=rng.uniform(0.5, 0.95, shape),
                log_init_scales=rng.uniform(-3.0, -1.0, (runs, g)),
                meta=rng.uniform(-6.0, -2.0, (runs, g)), batch_size=BATCH, seed=SEED)


def _assert_same(a, b, rows=None):
    """Every field of SweepResults ``a`` and ``b`` equal bit for bit (``a``'s ``rows``)."""
    for field in a._fields:
        x, y = getattr(a, field), getattr(b, field)
        if field == "aux_bits":
            if rows is None:
                assert x == y
        elif field == "status":
            assert (x if rows is None else tuple(x[r] for r in rows)) == y
        else:
            x = x if rows is None else x[rows]
            assert np.array_equal(x, y, equal_nan=True), field


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each, for the whole module; closed even when a
    test fails."""
    cluster = _dask.local_cluster(2, silence_logs=logging.ERROR)
    try:
        with distributed.Client(cluster) as c:
            c.wait_for_workers(2, timeout=60)
            # Both workers load the package now, so that neither is still starting when
            # the first test checks that both took part.
            c.run(lambda: __import__("hypergrad_fast.hypergrad.sweep"))
            yield c
    finally:
        cluster.close()


def _two_workers(client):
    client.wait_for_workers(2, timeout=60)
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2


# ------------------------------------------------------------------ equality


@pytest.mark.parametrize("per_group, own_noise, wide", [(False, False, True),
                                                        (True, True, False)])
def test_cluster_sweep_equals_the_local_sweep_bit_for_bit(client, per_group, own_noise, wide):
    args = _args(per_group=per_group)
    if own_noise:  # one x0 draw per setting: sliced with the settings
        args["x0_noise"] = np.random.default_rng(7).standard_normal((RUNS, MODEL.layout.size))
    blas = contextlib.nullcontext()
    if wide:
        # MNIST's width, 1,000 validation examples and minibatches split in two parts:
        # BLAS calls large enough that a multithreaded BLAS would sum in another order.
        # Dask's workers start their BLAS with one thread (and so does this process once
        # a cluster set OPENBLAS_NUM_THREADS=1 here before it loaded SciPy's BLAS): the
        # local reference gets two, so the bits must not depend on them.
        import scipy.linalg.cython_blas  # noqa: F401  (SciPy's BLAS, for threadpoolctl)
        from threadpoolctl import threadpool_limits

        model = LogisticRegression(784, 10)
        args.update(model=model, data=_data(model, n_train=300, n_valid=1000),
                    batch_size=50, log_init_scales=-3.0, meta=-5.0)
        blas = threadpool_limits(limits=2, user_api="blas")
    with blas:
        local = sweep(**args)
    with distributed.get_task_stream(client) as stream:
        remote = sweep(**args, client=client, chunk_size=3)
    _assert_same(remote, local)
    assert remote.status == ("ok",) * RUNS
    chunks = [t for t in stream.data if t["key"].startswith(_dask.CHUNK_PREFIX)]
    assert len(chunks) == 4  # 10 settings in chunks of at most 3: 2, 3, 2, 3
    assert len({t["worker"] for t in chunks}) == 2  # both workers took part


def test_chunks_and_the_default_chunk_size():
    assert _dask._bounds(10, 3) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert _dask._bounds(4, 10) == [(0, 4)]
    assert _dask._bounds(5, 1) == [(i, i + 1) for i in range(5)]


def test_device_auto_is_decided_on_each_worker(client):
    from hypergrad_fast.hypergrad.sweep import _resolve_device

    shared = type("Shared", (), {"model": MLP([3, 4, 2], "relu"), "custom": None})()
    on_workers = client.run(lambda: _resolve_device("auto", shared))
    assert set(on_workers.values()) == {"cpu"}  # no GPU on these workers
    args = _args(runs=3)
    _assert_same(sweep(**args, device="auto", client=client), sweep(**args))


def test_data_go_to_each_worker_once_not_with_every_task(client, monkeypatch):
    args = _args()
    calls = {"scatter": [], "submit": []}
    real_scatter, real_submit = client.scatter, client.submit

    def scatter(data, **kwargs):
        calls["scatter"].append(kwargs)
        return real_scatter(data, **kwargs)

    def submit(fn, *task_args, **kwargs):
        calls["submit"].append(task_args)
        return real_submit(fn, *task_args, **kwargs)

    monkeypatch.setattr(client, "scatter", scatter)
    monkeypatch.setattr(client, "submit", submit)
    _dask._SCATTERED.clear()
    sweep(**args, client=client, chunk_size=2)
    assert len(calls["scatter"]) == 1 and calls["scatter"][0]["broadcast"] is True
    payload = _dask._SCATTERED[client.id][1]
    assert len(client.who_has([payload])[payload.key]) == 2  # a copy on each worker
    train_bytes = args["data"][0][0].nbytes
    assert len(calls["submit"]) == 5
    for shared, settings, *_ in calls["submit"]:
        assert isinstance(shared, distributed.Future) and shared.key == payload.key
        assert sum(a.nbytes for a in settings if a is not None) < train_bytes / 10
    # The next sweep with the same data and model reuses the copy; other data are sent.
    sweep(**dict(args, alphas=args["alphas"] * 0.5), client=client)
    assert len(calls["scatter"]) == 1
    sweep(**dict(args, batch_size=BATCH + 1), client=client)
    assert len(calls["scatter"]) == 2


# ------------------------------------------------------------------ faults


class _KillOnce(distributed.WorkerPlugin):
    """Kills its worker process when a sweep chunk starts there, once per marker file."""

    name = "kill-once"

    def __init__(self, marker):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith(_dask.CHUNK_PREFIX):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(1)


def test_a_worker_killed_mid_sweep_has_its_chunks_rerun_with_the_same_results(client,
                                                                              tmp_path):
    args = _args()
    local = sweep(**args)
    before = set(client.run(os.getpid).values())
    marker = tmp_path / "killed"
    client.register_plugin(_KillOnce(str(marker)))
    try:
        remote = sweep(**args, client=client, chunk_size=2)
    finally:
        client.unregister_worker_plugin(_KillOnce.name)
    assert marker.exists(), "no worker was killed"
    assert int(marker.read_text()) in before
    _assert_same(remote, local)
    _two_workers(client)  # the nanny restarted it (later tests want two)
    assert int(marker.read_text()) not in set(client.run(os.getpid).values())


def test_a_diverging_setting_is_reported_and_the_others_returned(client, caplog):
    bad = (2, 7)
    args = _args(diverge=bad)
    good = [b for b in range(RUNS) if b not in bad]
    alone = sweep(**{**args, **{k: args[k][good] for k in
                                ("alphas", "betas", "log_init_scales", "meta")}})
    with caplog.at_level(logging.WARNING, logger="hypergrad_fast.hypergrad.sweep"):
        local = sweep(**args, on_error="report")
    assert "2 of 10 settings failed: setting 2: OverflowError" in caplog.text
    remote = sweep(**args, on_error="report", client=client, chunk_size=4)
    _assert_same(remote, local)
    _assert_same(local, alone, rows=good)  # the good settings keep their bits
    assert list(local.failures) == list(bad)
    for b in bad:
        assert local.status[b].startswith(f"setting {b}: OverflowError: ")
        assert "fixed-point range" in local.status[b]
        assert np.isnan(local.valid_loss[b]) and np.isnan(local.d_alphas[b]).all()
    assert local.ok.tolist() == [b not in bad for b in range(RUNS)]
    # "raise" (the default) stops at the first failure, on the cluster too.
    with pytest.raises(OverflowError, match="fixed-point range"):
        sweep(**args, client=client, chunk_size=4)


def test_a_lost_scheduler_raises_a_clear_error_with_what_finished():
    # A cluster of its own (in this process, one worker thread) that the test closes.
    args = _args(runs=6)
    args["alphas"] = np.repeat(args["alphas"], 20, axis=1)  # longer chunks
    args["betas"] = np.repeat(args["betas"], 20, axis=1)
    local = sweep(**args)
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                       dashboard_address=":0", silence_logs=logging.ERROR)
    client = distributed.Client(cluster)
    try:
        def close_after_first_chunk():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                states = [ts.state for key, ts in cluster.scheduler.tasks.items()
                          if str(key).startswith(_dask.CHUNK_PREFIX)]
                if "memory" in states:
                    break
                time.sleep(0.01)
            cluster.close()

        closer = threading.Thread(target=close_after_first_chunk)
        closer.start()
        with pytest.raises(SchedulerLostError, match="scheduler or the client's connection "
                                                     "to it was lost") as info:
            sweep(**args, client=client, chunk_size=1)
        closer.join()
    finally:
        client.close()
        cluster.close()
    err = info.value
    assert len(err.finished) < 6
    assert f"{len(err.finished)} of 6 settings had finished" in str(err)
    finished = list(err.finished)
    for b in range(6):
        if b in finished:
            assert err.result.status[b] == "ok"
            assert np.array_equal(err.result.x_final[b], local.x_final[b])
        else:
            assert "not run" in err.result.status[b] and np.isnan(err.result.valid_loss[b])
    # A client that is closed already is refused before anything is sent.
    with pytest.raises(SchedulerLostError, match="the client is closed"):
        sweep(**args, client=client)
