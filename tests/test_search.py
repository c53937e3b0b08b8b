"""The search experiment on tiny settings: starting points, the chain rule against
finite differences, results.json and the plot, failed settings, and a search run on a
Dask cluster, interrupted and resumed (and cut by a lost scheduler), that ends with
the results of one uninterrupted run in this process; and, without dask.distributed,
``client=``, ``--workers`` and ``--scheduler`` saying what to install."""

import logging
import sys

import numpy as np
import pytest

from hypergrad_fast import SchedulerLostError, sweep
from hypergrad_fast.cli import build_parser, main
from hypergrad_fast.experiments import search
from hypergrad_fast.experiments._args import ConfigError
from hypergrad_fast.metaopt import CheckpointError
from hypergrad_fast.models import LogisticRegression

from experiment_runs import PNG_MAGIC, embedded_digits  # noqa: F401  (an autouse fixture)
from experiment_runs import results as _results, without_times as _without_times

#: A 2^4 grid (16 settings), 2 meta-iterations.
TINY = ["--n-train", "200", "--n-valid", "100", "--n-test", "100", "--batch-size", "50",
        "--iters", "10", "--meta-iters", "2", "--grid", "2", "--no-progress"]


def _run(out, *extra):
    return main(["search", "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """results.json of the tiny search run in this process, uninterrupted."""
    out = tmp_path_factory.mktemp("search") / "whole"
    assert _run(out) == 0
    return _without_times(_results(out))


# ------------------------------------------------------------------ pieces


def test_starting_points_fill_the_ranges():
    config = search.SearchConfig(grid=3, lr_range=(0.01, 1.0), momentum_range=(0.5, 0.9))
    h = search.starting_points(config)
    assert h.shape == (81, 4)
    assert np.exp(h[:, 0]).min() == pytest.approx(0.01)
    assert np.exp(h[:, 0]).max() == pytest.approx(1.0)
    assert search.natural(h[-1])["momentum"] == pytest.approx(0.9)
    assert len(np.unique(h[:, 3])) == 3 and h[0, 3] != h[1, 3]  # the last varies fastest
    config = search.SearchConfig(samples=50, seed=4)
    h = search.starting_points(config)
    lo, hi = search._bounds(config).T
    assert h.shape == (50, 4) and (h >= lo).all() and (h <= hi).all()
    assert np.array_equal(h, search.starting_points(config))  # seeded
    assert not np.array_equal(h, search.starting_points(search.SearchConfig(samples=50)))


def test_chain_rule_against_finite_differences():
    rng = np.random.default_rng(0)
    model = LogisticRegression(20, 3)
    data = ((rng.standard_normal((60, 20)), np.eye(3)[rng.integers(0, 3, 60)]),
            (rng.standard_normal((30, 20)), np.eye(3)[rng.integers(0, 3, 30)]))
    h = np.array([np.log(0.2), 1.0, np.log(0.1), np.log(1e-2)])
    eps = 1e-5
    points = np.vstack([h] + [h + s * eps * np.eye(4)[k] for k in range(4) for s in (1, -1)])

    def run(p):
        return sweep(model, data, *search.to_sweep_inputs(p, 8, model.layout.n_groups),
                     batch_size=20)

    out = run(points)
    grad = search.chain_rule(points[:1], out.d_alphas[:1], out.d_betas[:1],
                             out.d_log_init_scales[:1], out.d_meta[:1])[0]
    numeric = (out.valid_loss[1::2] - out.valid_loss[2::2]) / (2 * eps)
    # The momentum is rounded to n / 2**16 by the engine: its difference quotient is not
    # the derivative; check it on a grid step of 2**-16 instead.
    np.testing.assert_allclose(grad[[0, 2, 3]], numeric[[0, 2, 3]], rtol=1e-4)
    beta = 1 / (1 + np.exp(-h[1]))
    step = 2.0 ** -16 / (beta * (1 - beta))  # one unit of n in logit coordinates
    wide = points[:1].repeat(2, axis=0)
    wide[0, 1] += 8 * step
    wide[1, 1] -= 8 * step
    ends = run(wide).valid_loss
    np.testing.assert_allclose(grad[1], (ends[0] - ends[1]) / (16 * step), rtol=2e-2)


def test_config_and_arguments_are_checked(tmp_path):
    for bad in (dict(grid=1), dict(samples=0), dict(lr_range=(1.0, 0.1)),
                dict(momentum_range=(0.5, 1.0)), dict(model="cnn"), dict(backend="autograd"),
                dict(device="gpu")):
        with pytest.raises(ConfigError):
            search.SearchConfig(**bad)
    for argv in (["--grid", "2", "--samples", "3"], ["--workers", "2", "--scheduler", "x"],
                 ["--grid", "1"], ["--lr-range", "0.1"]):
        with pytest.raises(SystemExit) as info:
            main(["search", "--out", str(tmp_path / "o"), *argv])
        assert info.value.code == 2
    assert main(["search", "--out", str(tmp_path / "o"), "--lr-range", "1,0.1"]) == 2


# ------------------------------------------------------------------ the run


def test_results_have_every_setting_the_summary_and_the_plot(tmp_path, whole):
    r = whole
    assert r["experiment"] == "search" and r["config"]["n_settings"] == 16
    assert "samples" not in r["config"] and r["config"]["grid"] == 2
    assert len(r["settings"]) == 16
    for i, s in enumerate(r["settings"]):
        assert s["index"] == i and s["status"] == "ok"
        assert s["start"]["meta_iteration"] == 0 and len(s["valid_loss_path"]) == 3
        assert s["refined"]["valid_loss"] == min(s["valid_loss_path"])
        assert s["start"]["learning_rate"] == pytest.approx(
            s["start_hyperparameters"]["learning_rate"])
        assert set(s["refined"]) >= {"learning_rate", "momentum", "init_scale", "l2",
                                     "valid_loss", "valid_error", "test_loss", "test_error"}
    summary = r["summary"]
    best = min(r["settings"], key=lambda s: s["refined"]["valid_loss"])
    assert summary["best_setting"] == best["index"] and summary["best_refined"] == best["refined"]
    assert summary["n_failed_or_stopped"] == 0 and summary["n_improved"] >= 1
    # Refinement moved the hyperparameters.
    assert any(s["refined"]["meta_iteration"] > 0 for s in r["settings"])
    [figure] = r["figures"]
    out = tmp_path / "plot"
    search.plot_search(out / figure["file"], r["settings"], 2)
    assert (out / figure["file"]).read_bytes()[:8] == PNG_MAGIC


def test_failed_settings_get_a_status_and_are_not_refined(tmp_path, caplog):
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING):
        assert _run(out, "--lr-range", "1,1e5", "--grid", "2", "--meta-iters", "1") == 0
    r = _results(out)
    failed = [s for s in r["settings"] if s["status"] != "ok"]
    assert failed and len(failed) < 16
    for s in failed:
        if s["status"].startswith("failed: "):
            assert s["start"] is None and s["refined"] is None and s["valid_loss_path"] == []
            assert "setting " in s["status"] and "Error" in s["status"]
        else:
            assert s["status"].startswith("stopped at meta-iteration 1: ")
            assert s["refined"]["meta_iteration"] == 0
    assert r["summary"]["n_failed_or_stopped"] == len(failed)
    assert any(s["start"] is not None for s in r["settings"])


@pytest.fixture(scope="module")
def scheduler():
    """A LocalCluster of two worker processes for this module; its address."""
    from hypergrad_fast.hypergrad import _dask
    pytest.importorskip("distributed")
    cluster = _dask.local_cluster(2, silence_logs=logging.ERROR)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def test_on_a_cluster_interrupted_and_resumed_gives_the_in_process_results(
        tmp_path, monkeypatch, whole, scheduler):
    real = search.sweep
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["client"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "cut"
    monkeypatch.setattr(search, "sweep", interrupted)
    assert _run(out, "--scheduler", scheduler) == 130
    assert calls[0] is not None  # it ran on the cluster
    assert not (out / "results.json").exists() and (out / "checkpoint.npz").exists()
    monkeypatch.setattr(search, "sweep", real)
    assert _run(out, "--resume", "--workers", "2") == 0  # a cluster of its own
    resumed = _results(out)
    assert resumed["runtime"]["evaluations_from_checkpoint"] == 16
    assert resumed["runtime"]["ran_in"] == "a local Dask cluster of 2 worker processes"
    assert _without_times(resumed) == whole
    # Resuming the finished search sweeps nothing and changes nothing.
    monkeypatch.setattr(search, "sweep", None)
    assert _run(out, "--resume") == 0
    assert _without_times(_results(out)) == whole


def test_a_lost_scheduler_keeps_the_finished_settings(tmp_path, monkeypatch, whole, capsys):
    real = search.sweep
    calls = []

    def lost_midway(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second meta-iteration: the first 5 settings finished
            status = out.status[:5] + ("setting 5: not run",) * 11
            nan = np.full_like(out.valid_loss, np.nan)
            nan[:5] = out.valid_loss[:5]
            raise SchedulerLostError("lost", range(5), out._replace(valid_loss=nan,
                                                                   status=status))
        return out

    out = tmp_path / "o"
    monkeypatch.setattr(search, "sweep", lost_midway)
    assert _run(out) == 1
    assert "rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(search, "sweep", real)
    assert _run(out, "--resume") == 0
    resumed = _results(out)
    assert resumed["runtime"]["evaluations_from_checkpoint"] == 16 + 5
    assert _without_times(resumed) == whole


def test_resume_refuses_other_settings_and_a_corrupt_checkpoint(tmp_path):
    out = tmp_path / "o"
    assert _run(out, "--meta-iters", "0") == 0
    args = build_parser().parse_args(["search", *TINY, "--meta-iters", "0", "--step-size",
                                      "0.5"])
    with pytest.raises(CheckpointError, match="differing: step_size"):
        search.run_search(search.config_from_args(args), out, resume=True, progress=False)
    (out / "checkpoint.npz").write_bytes(b"not an npz archive")
    assert _run(out, "--meta-iters", "0", "--resume") == 2


# ------------------------------------------------------------------ without dask


def test_without_dask_client_and_workers_say_what_to_install(monkeypatch, capsys, tmp_path):
    """(Here, not in test_distributed.py, which is skipped where dask is missing.)"""
    from hypergrad_fast.hypergrad import _dask

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    model = LogisticRegression(5, 2)
    rng = np.random.default_rng(0)
    args = dict(model=model, data=((rng.standard_normal((8, 5)), np.eye(2)[[0, 1] * 4]),) * 2,
                alphas=np.full((2, 3), 0.1), betas=np.full((2, 3), 0.9))
    with pytest.raises(ImportError, match=r'pip install "hypergrad_fast\[dask\]"'):
        sweep(**args, client=object())
    with pytest.raises(ImportError, match=r"--workers.*pip install \"hypergrad_fast\[dask\]\""):
        with _dask.connect(workers=2):
            pass
    for flags in (["--workers", "2"], ["--scheduler", "tcp://127.0.0.1:1"]):
        assert main(["search", "--out", str(tmp_path / "o"), "--no-progress", *flags]) == 2
        err = capsys.readouterr().err
        assert 'pip install "hypergrad_fast[dask]"' in err and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoint.npz").exists()
    # Without client= nothing needs dask.
    assert sweep(**args).status == ("ok", "ok")
