"""The chaos experiment on tiny settings: the roughness measure on hand-made inputs,
the hypergradient of the log learning rate against finite differences, results.json,
exact --resume, an IDX --data folder, bad arguments and diverged settings."""

import math

import numpy as np
import pytest

from hypergrad_fast.cli import build_parser
from hypergrad_fast.data import load_mnist, write_idx
from hypergrad_fast.experiments import chaos
from hypergrad_fast.experiments._args import ConfigError
from hypergrad_fast.metaopt import CheckpointError
from hypergrad_fast.models import MLP

from experiment_runs import PNG_MAGIC, embedded_digits  # noqa: F401  (an autouse fixture)
from experiment_runs import results as _results, without_times as _without_times

#: 8 grid points over 3 natural-log units (spacing 0.43), two horizons, two seeds.
TINY = ["--n-train", "100", "--n-valid", "50", "--n-test", "10", "--batch-size", "20",
        "--hidden", "5", "--iters", "2,3", "--seeds", "2", "--grid-points", "8",
        "--log-lr-min", "-2", "--log-lr-max", "1", "--no-progress"]


def _parser():
    return build_parser()


def _run(out, *extra):
    """The subcommand run directly (exceptions propagate, unlike through ``main``)."""
    args = _parser().parse_args(["chaos", "--out", str(out), *TINY, *extra])
    return args.run(args)


# ------------------------------------------------------------------ roughness


def test_roughness_of_hand_made_sequences():
    assert chaos.roughness([3.0, 3.0, 3.0]) == 0.0
    assert chaos.roughness([1.0, -1.0, 1.0, -1.0]) == pytest.approx(2.0)
    assert chaos.roughness([1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.0 / 2.5)
    assert chaos.roughness([-2.0, -4.0]) == pytest.approx(2.0 / 3.0)
    # A diverged point drops out: only the pair (3, 4); scale over 1, 3 and 4.
    assert chaos.roughness([1.0, np.nan, 3.0, 4.0]) == pytest.approx(1.0 / (8.0 / 3.0))
    assert math.isnan(chaos.roughness([np.nan, 1.0, np.nan]))
    assert math.isnan(chaos.roughness([0.0, 0.0]))
    with pytest.raises(ValueError, match="two values"):
        chaos.roughness([1.0])


def test_the_regions_best_rate_and_ratio_of_a_hand_made_grid():
    log_lrs = np.linspace(-4.0, 2.0, 41)  # spacing 0.15
    smooth = -0.5 + 0.01 * np.arange(41)
    chaotic = np.where(np.arange(41) % 2 == 0, 10.0, -10.0)
    grad = np.where(log_lrs > 0.0, chaotic, smooth)
    loss = (log_lrs - 1.25) ** 2 + 0.3
    # Seed 1 diverged at the point of lowest loss (index 35): it cannot be the best,
    # and of its neighbours the lower rate is made the better.
    loss[36] += 0.01
    loss_seeds = np.stack([loss, loss])
    grad_seeds = np.stack([grad - 0.1, grad + 0.1])
    loss_seeds[1, 35] = grad_seeds[1, 35] = np.nan
    s = chaos.analyse_horizon(log_lrs, loss_seeds, grad_seeds)
    assert s["diverged_points"] == 1
    assert s["best_log_learning_rate"] == pytest.approx(log_lrs[34])  # 1.1
    assert s["best_valid_loss"] == pytest.approx(0.15 ** 2 + 0.3)
    assert s["best_at_grid_edge"] is False
    assert s["small_lr_region"] == pytest.approx([-4.0, -2.5])
    assert s["near_best_region"] == pytest.approx([0.65, 1.55])
    small = smooth[:11]  # -4.0 .. -2.5
    assert s["roughness_small_lr"] == pytest.approx(0.01 / np.mean(np.abs(small)))
    # Near the best (0.65 .. 1.55, index 35 missing): pairs that flip sign by 20
    # around index 35's gap, scale 10.
    near = grad.copy()
    near[35] = np.nan
    assert s["roughness_near_best"] == pytest.approx(chaos.roughness(near[31:38]))
    assert s["roughness_near_best"] == pytest.approx(2.0)
    assert s["roughness_ratio"] == pytest.approx(s["roughness_near_best"]
                                                 / s["roughness_small_lr"])
    np.testing.assert_allclose(s["hypergradient"][:31], grad[:31], rtol=1e-12)
    assert math.isnan(s["valid_loss"][35]) and math.isnan(s["hypergradient"][35])


def test_analyse_horizon_with_every_point_diverged_has_no_best():
    log_lrs = np.linspace(0.0, 3.5, 8)
    nan = np.full((2, 8), np.nan)
    s = chaos.analyse_horizon(log_lrs, nan, nan)
    assert s["best_log_learning_rate"] is None and s["roughness_ratio"] is None
    assert s["diverged_points"] == 8
    with pytest.raises(ValueError, match="must both be"):
        chaos.analyse_horizon(log_lrs, nan, nan[:, :7])


# ------------------------------------------------------------------ sweeps


@pytest.fixture(scope="module")
def tiny_problem():
    data = load_mnist(100, 50, 10)
    return MLP([784, 5, 10], "tanh"), data


def test_hypergradient_is_the_derivative_in_the_log_learning_rate(tiny_problem):
    model, data = tiny_problem
    x, h = -0.5, 1e-4
    grid = np.array([x - h, x, x + h])
    out = chaos.sweep_grid(model, data, grid, 4, 0, momentum=0.9, init_log_scale=-2.0,
                           batch_size=20)
    assert out.errors == {}
    finite_difference = (out.valid_loss[2] - out.valid_loss[0]) / (2 * h)
    assert out.hypergradient[1] == pytest.approx(finite_difference, rel=1e-5)
    assert abs(out.hypergradient[1]) > 1e-3


def test_a_diverged_setting_is_isolated_and_the_others_unchanged(tiny_problem, monkeypatch):
    model, data = tiny_problem
    grid = np.linspace(-2.0, 1.0, 8)
    kwargs = dict(momentum=0.9, init_log_scale=-2.0, batch_size=20)
    whole = chaos.sweep_grid(model, data, grid, 3, 1, **kwargs)
    real = chaos.sweep
    bad_rate = np.exp(grid[5])
    batches = []

    def failing(model, data, alphas, *args, **kw):
        batches.append(len(alphas))
        if np.any(alphas[:, 0] == bad_rate):
            raise OverflowError("setting 0: step overflows the fixed-point range (simulated)")
        return real(model, data, alphas, *args, **kw)

    monkeypatch.setattr(chaos, "sweep", failing)
    out = chaos.sweep_grid(model, data, grid, 3, 1, **kwargs)
    assert list(out.errors) == [5] and "simulated" in out.errors[5]
    assert np.isnan(out.valid_loss[5]) and np.isnan(out.hypergradient[5])
    keep = np.arange(8) != 5
    np.testing.assert_array_equal(out.valid_loss[keep], whole.valid_loss[keep])
    np.testing.assert_array_equal(out.hypergradient[keep], whole.hypergradient[keep])
    assert batches[0] == 8 and 1 in batches and len(batches) < 2 * 8


def test_rates_that_overflow_are_recorded_and_the_run_goes_on(tmp_path):
    # e**10 and above overflow the fixed-point range within a few iterations.
    out = tmp_path / "o"
    assert _run(out, "--log-lr-min", "-1", "--log-lr-max", "12", "--grid-points", "27") == 0
    r = _results(out)
    diverged = r["diverged"]
    assert diverged and r["summary"]["diverged_settings"] == len(diverged)
    assert all(d["log_learning_rate"] >= 8.0 and "overflow" in d["error"] for d in diverged)
    grid = r["summary"]["log_learning_rates"]
    top = r["horizons"]["3"]
    first_bad = min(grid.index(d["log_learning_rate"]) for d in diverged if d["iters"] == 3)
    assert top["valid_loss"][first_bad] is None and top["hypergradient"][first_bad] is None
    assert all(v is not None for v in top["valid_loss"][:first_bad])
    assert r["summary"]["best_log_learning_rate"] < grid[first_bad]


# ------------------------------------------------------------------ the run


def test_results_have_the_summary_keys_figures_and_consistent_means(tmp_path):
    out = tmp_path / "o"
    assert _run(out) == 0
    r = _results(out)
    assert r["experiment"] == "chaos"
    assert r["command"] == (f"hypergrad-fast chaos --out {out} --no-progress --batch-size 20 "
                            "--n-train 100 --n-valid 50 --n-test 10 --iters 2,3 --seeds 2 "
                            "--grid-points 8 --log-lr-min -2.0 --log-lr-max 1.0 --hidden 5")
    s = r["summary"]
    assert {"log_learning_rates", "valid_loss", "hypergradient", "best_log_learning_rate",
            "roughness_small_lr", "roughness_near_best", "roughness_ratio"} <= set(s)
    assert s["iters"] == 3 and s["n_seeds"] == 2 and s["diverged_settings"] == 0
    assert s["log_learning_rates"] == pytest.approx(np.linspace(-2, 1, 8).tolist())
    per_seed = r["horizons"]["3"]
    assert np.shape(per_seed["valid_loss_per_seed"]) == (2, 8)
    assert s["valid_loss"] == pytest.approx(np.mean(per_seed["valid_loss_per_seed"], axis=0))
    assert s["hypergradient"] == pytest.approx(
        np.mean(per_seed["hypergradient_per_seed"], axis=0))
    # Different seeds: different weights and minibatches.
    assert per_seed["valid_loss_per_seed"][0] != per_seed["valid_loss_per_seed"][1]
    best = int(np.argmin(s["valid_loss"]))
    assert s["best_log_learning_rate"] == pytest.approx(s["log_learning_rates"][best])
    assert s["roughness_ratio"] == pytest.approx(s["roughness_near_best"]
                                                 / s["roughness_small_lr"])
    assert set(r["horizons"]) == {"2", "3"}
    assert r["seeds"] == [0, 1] and r["config"]["horizons"] == [2, 3]
    assert "meta_iters" not in r["config"] and "iters" not in r["config"]
    assert len(r["figures"]) == 2
    for figure in r["figures"]:
        assert figure["caption"]
        raw = (out / figure["file"]).read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 10_000


def test_resume_after_an_interruption_and_after_completion_is_exact(tmp_path, monkeypatch):
    assert _run(tmp_path / "whole") == 0
    whole = _without_times(_results(tmp_path / "whole"))
    real = chaos.sweep_grid
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(chaos, "sweep_grid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut")
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(chaos, "sweep_grid", real)
    assert _run(tmp_path / "cut", "--resume") == 0
    resumed = _results(tmp_path / "cut")
    assert resumed["runtime"]["sweeps_from_checkpoint"] == 2
    assert _without_times(resumed) == whole
    # Resuming the finished run sweeps nothing and changes nothing; more seeds reuse
    # the four sweeps already done.
    monkeypatch.setattr(chaos, "sweep_grid", None)
    assert _run(tmp_path / "cut", "--resume") == 0
    assert _without_times(_results(tmp_path / "cut")) == whole
    monkeypatch.setattr(chaos, "sweep_grid", real)
    assert _run(tmp_path / "cut", "--resume", "--seeds", "3") == 0
    assert _results(tmp_path / "cut")["runtime"]["sweeps_from_checkpoint"] == 4


def test_resume_refuses_other_settings_and_a_corrupt_checkpoint(tmp_path):
    out = tmp_path / "o"
    assert _run(out, "--iters", "1,2") == 0
    with pytest.raises(CheckpointError, match="differing: momentum"):
        _run(out, "--iters", "1,2", "--resume", "--momentum", "0.8")
    (out / "checkpoint.npz").write_bytes(b"not an npz archive")
    with pytest.raises(CheckpointError, match="unusable"):
        _run(out, "--iters", "1,2", "--resume")
    assert _run(out, "--iters", "1,2") == 0  # without --resume: starts over


def test_an_idx_folder_given_with_data(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    for prefix, n in (("train", 200), ("t10k", 20)):
        write_idx(data / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(data / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))
    out = tmp_path / "o"
    assert _run(out, "--data", str(data), "--iters", "1,2") == 0
    r = _results(out)
    assert r["data"]["source"] == str(data.resolve())
    assert all(v is not None for v in r["summary"]["valid_loss"])
    with pytest.raises(ConfigError, match="only 200 are available"):
        _run(tmp_path / "o2", "--data", str(data), "--n-train", "190")


# ------------------------------------------------------------------ bad settings


@pytest.mark.parametrize("argv, message", [
    (["--iters", "5"], "two or more different iteration counts"),
    (["--iters", "5,5"], "two or more different iteration counts"),
    (["--grid-points", "3"], "must be >= 8"),
    (["--seeds", "0"], "must be >= 1"),
    (["--momentum", "1"], "must lie in (0, 1)"),
    (["--log-lr-max", "inf"], "must be finite"),
    (["--backend", "autograd"], "invalid choice"),
    (["--data", "/nonexistent/folder"], "not a folder"),
])
def test_bad_arguments_exit_with_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["chaos", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--meta-iters", "3"], "--meta-iters does not apply"),
    (["--step-size", "0.1"], "--step-size does not apply"),
    (["--log-lr-min", "1", "--log-lr-max", "-1"], "log_lr_min must be below log_lr_max"),
    (["--log-lr-min", "-4", "--log-lr-max", "2"], "use 13 grid points or more"),
    (["--n-train", "6000"], "available"),
])
def test_bad_settings_found_after_parsing_raise_config_error(argv, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _run(tmp_path / "o", *argv)


def test_config_checks_its_fields():
    assert chaos.ChaosConfig(horizons=(100, 50)).horizons == (50, 100)
    assert chaos.ChaosConfig(horizons=(7, 3), iters=1).iters == 7
    for bad, message in [({"horizons": (5,)}, "at least two"),
                         ({"hidden": (0,)}, "widths must be >= 1"),
                         ({"backend": "autograd"}, "must be 'compiled'"),
                         ({"grid_points": 41, "log_lr_max": 30.0}, "grid spacing"),
                         ({"momentum": 0.0}, "momentum"),
                         ({"init_log_scale": float("nan")}, "finite")]:
        with pytest.raises(ConfigError, match=message):
            chaos.ChaosConfig(**bad)
