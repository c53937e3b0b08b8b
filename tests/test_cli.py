"""The command line on a tiny schedules configuration."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hypergrad_fast.cli import main

TINY = ["--hidden", "10", "--n-train", "200", "--n-valid", "100", "--n-test", "100",
        "--iters", "5", "--batch-size", "50", "--no-progress"]
PLOTS = ["learning_rate_schedules.png", "block_hyperparameters.png",
         "meta_learning_curve.png", "learning_curves.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(out, *extra):
    return main(["schedules", "--out", str(out), *TINY, *extra])


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny run with 2 meta-iterations (shared: each run takes a second or two)."""
    out = tmp_path_factory.mktemp("run") / "sched"
    assert _run(out, "--meta-iters", "2") == 0
    return out


def test_results_json_holds_config_hyperparameters_records_and_curves(finished):
    r = _results(finished)
    assert r["experiment"] == "schedules"
    assert r["config"]["layer_sizes"] == [784, 10, 10]
    assert r["config"]["iters"] == 5 and r["config"]["meta_iters"] == 2
    assert r["n_hyperparameters"] == 5 * 4 + 4 + 4
    blocks = r["blocks"]["names"]
    assert blocks == ["W0", "b0", "W1", "b1"]
    for when in ("initial", "final"):
        hp = r["hyperparameters"][when]
        assert set(hp) == {"alphas", "betas", "init_scales"}
        assert all(len(hp["alphas"][b]) == 5 for b in blocks)
        assert all(0 < hp["betas"][b] < 1 for b in blocks)
        assert all(hp["init_scales"][b] > 0 for b in blocks)
        curve = r["learning_curves"][when]
        assert curve["iteration"] == list(range(6))
        assert len(curve["train_loss"]) == len(curve["valid_loss"]) == 6
    assert r["hyperparameters"]["initial"]["alphas"]["W0"] == pytest.approx([np.exp(-1)] * 5)
    records = r["meta_records"]
    for key in ("train_loss", "train_error", "valid_loss", "valid_error", "test_loss",
                "test_error", "grad_norm", "wall_time", "hyperloss"):
        assert len(records[key]) == 3, key
    assert records["hyperloss"] == records["valid_loss"]
    assert r["summary"]["final_valid_loss"] == records["valid_loss"][-1]
    assert r["summary"]["final_valid_loss"] < r["summary"]["initial_valid_loss"]


def test_plots_are_real_pngs(finished):
    for name in PLOTS:
        raw = (finished / name).read_bytes()
        assert raw[:8] == PNG_MAGIC, name
        assert len(raw) > 10_000, name


def test_summary_is_printed(tmp_path, capsys):
    assert _run(tmp_path / "o", "--meta-iters", "1") == 0
    out = capsys.readouterr().out
    assert "valid loss" in out and "test error" in out
    assert str(tmp_path / "o" / "results.json") in out


def test_resume_with_more_meta_iterations_matches_a_longer_run(tmp_path):
    assert _run(tmp_path / "long", "--meta-iters", "3") == 0
    assert _run(tmp_path / "short", "--meta-iters", "1") == 0
    assert _run(tmp_path / "short", "--meta-iters", "3", "--resume") == 0
    long, resumed = _results(tmp_path / "long"), _results(tmp_path / "short")
    assert resumed["runtime"]["resumed_from_meta_iteration"] == 1
    assert resumed["hyperparameters"]["final"] == long["hyperparameters"]["final"]
    assert resumed["meta_records"]["valid_loss"] == long["meta_records"]["valid_loss"]
    # Resuming a finished run again changes nothing.
    assert _run(tmp_path / "short", "--meta-iters", "3", "--resume") == 0
    assert _results(tmp_path / "short")["hyperparameters"] == resumed["hyperparameters"]


def test_resume_with_other_settings_fails_cleanly(finished, capsys):
    before = (finished / "checkpoint.npz").read_bytes()
    assert _run(finished, "--meta-iters", "3", "--resume", "--seed", "5") == 2
    err = capsys.readouterr().err
    assert "config.seed: checkpoint has 0, now 5" in err
    assert str(finished / "checkpoint.npz") in err
    assert "Traceback" not in err
    assert (finished / "checkpoint.npz").read_bytes() == before  # left untouched


def test_a_corrupt_checkpoint_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"PK\x03\x04 truncated")
    assert _run(out, "--resume") == 2
    err = capsys.readouterr().err
    assert "unusable" in err and "checkpoint.npz" in err


def test_too_much_data_is_a_clean_error(tmp_path, capsys):
    assert main(["schedules", "--out", str(tmp_path), *TINY, "--n-train", "6000"]) == 2
    assert "available" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["schedules", "--iters", "0"], "--iters: must be >= 1"),
    (["schedules", "--step-size", "-1"], "--step-size: must be a positive number"),
    (["schedules", "--meta-iters", "many"], "expected an integer"),
    (["schedules", "--hidden", "50,x"], "comma-separated integers"),
    (["nonsense"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_with_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "hypergrad_fast", "schedules", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "--resume" in done.stdout
