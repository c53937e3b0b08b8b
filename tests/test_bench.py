"""The asv suite in bench/ runs: every benchmark method once, and ``asv check``.

Each benchmark class is instantiated, its ``setup_cache`` (if any) and ``setup``
are called and every ``time_*``/``peakmem_*``/``track_*`` method is called once,
for each combination of parameters in which the size axes ("N", "T") take their
smallest value and the other axes (implementation, beta) take every value.
NotImplementedError is never accepted here: it is reserved for the documented
too-large sizes, which ``test_too_large_sizes_are_skipped`` checks separately.

Benchmarks without parameters that would take tens of seconds at their real
sizes are shrunk through class attributes listed in ``SHRINK`` (the code paths
are the same; only the counts differ).
"""

import importlib
import inspect
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a package beside hypergrad_fast/, not installed

BENCH_MODULES = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))
PREFIXES = ("time_", "peakmem_", "track_", "mem_")
SIZE_AXES = {"N", "T"}

#: class name -> attributes set on the instance before setup (smaller counts).
SHRINK = {
    "EngineVsPythonInt": {"t_short": 20, "t_long": 40},
    "HypergradVsNaive": {"n_iter": 3},
    "HypergradVsNaiveT1000": {"n_iter": 3},
    "CompiledVsAutogradObjective": {"n_iter": 3},
    "SweepVsSeparateRuns": {"runs": 2, "n_iter": 3},
    "HypergradMemoryGrowth": {"base_T": 2, "params": [4]},
    "AdamBufferBits": {"n_iter": 50},
    "AdamHypergradVsNaive": {"n_iter": 3},
    "DistributedSweep": {"runs": 4, "n_iter": 2, "repeats": 1, "overhead_chunks": 2},
}


def _benchmark_classes():
    for name in BENCH_MODULES:
        module = importlib.import_module(f"bench.{name}")
        for cls_name, cls in vars(module).items():
            if (inspect.isclass(cls) and cls.__module__ == module.__name__
                    and not cls_name.startswith("_")
                    and any(m.startswith(PREFIXES) for m in dir(cls))):
                yield pytest.param(cls, id=f"{name}.{cls_name}")


def _smallest_params(cls, shrink):
    """Parameter tuples: smallest value on size axes, every value on the others."""
    params = shrink.get("params", getattr(cls, "params", []))
    if not params:
        return [()]
    names = list(getattr(cls, "param_names", []))
    if not isinstance(params[0], (list, tuple)):  # one axis, given as a flat list
        params = [params]
    axes = [[min(values)] if name in SIZE_AXES else list(values)
            for name, values in zip(names, params)]
    return list(itertools.product(*axes))


def test_there_are_benchmarks():
    assert len(list(_benchmark_classes())) >= 8


@pytest.mark.parametrize("cls", list(_benchmark_classes()))
def test_benchmark_runs_at_smallest_params(cls, monkeypatch):
    import bench.common

    monkeypatch.setattr(bench.common, "SETTLE_SECONDS", 0.01)  # the pause, shortened
    shrink = SHRINK.get(cls.__name__, {})
    methods = sorted(m for m in dir(cls) if m.startswith(PREFIXES))
    cache_instance = cls()
    for attr, value in shrink.items():
        setattr(cache_instance, attr, value)
    combos = _smallest_params(cls, shrink)
    if hasattr(cls, "setup_cache"):
        # setup_cache reads self.params: give it only the combinations run here.
        if combos != [()]:
            cache_instance.params = [sorted(set(axis)) for axis in zip(*combos)]
            if len(cache_instance.params) == 1:
                cache_instance.params = cache_instance.params[0]
        cache = (cache_instance.setup_cache(),)
    else:
        cache = ()
    for combo in combos:
        for method in methods:
            bench = cls()
            for attr, value in shrink.items():
                setattr(bench, attr, value)
            args = cache + tuple(combo)
            if hasattr(bench, "setup"):
                bench.setup(*args)
            result = getattr(bench, method)(*args)
            if method.startswith("track_"):
                assert np.isfinite(result), (method, combo, result)


def test_too_large_sizes_are_skipped(monkeypatch):
    from bench.bench_hypergrad import LONG_T, NAIVE_GB_ENV, check_size
    from bench.bench_steps import OneStep
    from bench.common import LONG_ENV

    monkeypatch.delenv(LONG_ENV, raising=False)
    monkeypatch.delenv(NAIVE_GB_ENV, raising=False)
    with pytest.raises(NotImplementedError):
        check_size(LONG_T, "ours")
    with pytest.raises(NotImplementedError):
        check_size(1000, "naive")
    check_size(100, "naive")
    check_size(1000, "ours")
    monkeypatch.setenv(LONG_ENV, "1")
    check_size(LONG_T, "ours")
    with pytest.raises(NotImplementedError):
        OneStep().setup(10**6, "python_int")


def test_python_int_baseline_reverses_exactly():
    from bench.common import ALPHA, BETA, PythonIntMomentum, vector_problem

    x0, g = vector_problem(50)
    opt = PythonIntMomentum(x0)
    start = opt.x.copy()
    for _ in range(30):
        opt.step(g, ALPHA, BETA)
    assert opt.aux_bits > 0
    for _ in range(30):
        opt.unstep(g, ALPHA, BETA)
    assert np.array_equal(opt.x, start) and not any(opt.v) and not any(opt.bufs)


def test_naive_reference_matches_sgd():
    import autograd.numpy as anp
    from autograd import grad

    from bench.common import naive_sgd
    from hypergrad_fast import effective_beta
    from hypergrad_fast.models import MLP, make_train_loss
    from hypergrad_fast import sgd

    rng = np.random.default_rng(0)
    model = MLP([5, 7, 3])
    inputs, targets = rng.standard_normal((40, 5)), np.eye(3)[rng.integers(0, 3, 40)]
    loss = make_train_loss(model, inputs, targets, 10)
    x0 = model.init_params(rng, -1.0)
    alphas = np.full(20, 0.3)
    betas = effective_beta(np.full(20, 0.9))

    def hyper(train):
        return lambda a: anp.sum(train(loss, x0, a, betas, None) ** 2)

    np.testing.assert_allclose(grad(hyper(sgd))(alphas), grad(hyper(naive_sgd))(alphas),
                               rtol=1e-6)


@pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed")
def test_asv_check(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))  # asv machine writes ~/.asv-machine.json
    for cmd in (["asv", "machine", "--yes", "--machine", "ci"],
                ["asv", "check", "--python=same"]):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"


def test_seed_ratios_report_both_optimisers(monkeypatch):
    """``python -m bench.report --seed-ratios``: momentum and Adam, ours / naive."""
    import bench.common
    from bench import report

    monkeypatch.setattr(bench.common, "SETTLE_SECONDS", 0.01)
    out = report.seed_ratios(rounds=1, settle=None, n_iter=3)
    assert set(out) == {"momentum", "adam"}
    for r in out.values():
        assert r["ours"] > 0 and r["naive"] > 0
        assert r["ratio"] == r["ours"] / r["naive"]


def test_main_job_pairs_time_both_backends():
    """``python -m bench.report --main-job``: the CLI's schedules run with each backend, in
    turn, in child processes (tiny settings here)."""
    from bench import report

    pairs = report.main_job_pairs(1, extra=("--n-train", "100", "--n-valid", "50",
                                            "--n-test", "50", "--iters", "3", "--hidden", "5",
                                            "--batch-size", "20", "--meta-iters", "1"))
    assert len(pairs) == 1 and all(s > 0 for s in pairs[0])
