"""The command line on a tiny schedules configuration."""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hypergrad_fast.cli import main
from hypergrad_fast.data import MNIST_ENV

from experiment_runs import idx_folder

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
    # The same validation loss, by the hyperloss and by the record (one compiled kernel).
    assert records["hyperloss"] == records["valid_loss"]
    assert records["hyperloss"] != pytest.approx(records["train_loss"], rel=1e-3)
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


# -- divergence: the message says what to type, and that command continues ----------------


def test_after_divergence_the_suggested_command_continues_with_half_the_step(tmp_path, capsys):
    out = tmp_path / "o"
    # Step 3 moves the log learning rates by about 3 per meta-iteration: h_1 trains,
    # h_2's training run overflows.
    assert _run(out, "--meta-iters", "3", "--step-size", "3") == 1
    err = capsys.readouterr().err
    assert "training diverged at meta-iteration 2" in err and "Traceback" not in err
    (command,) = [line.strip() for line in err.splitlines()
                  if line.strip().startswith("hypergrad-fast schedules ")]
    argv = shlex.split(command)[1:]
    assert argv == ["schedules", "--out", str(out), *TINY, "--meta-iters", "3",
                    "--resume", "--step-size", "1.5"]
    with np.load(out / "checkpoint.npz", allow_pickle=False) as npz:
        kept = dict(zip(npz["record_keys"].tolist(), npz["records"].T.tolist()))

    # Resuming with the step that diverged would only diverge again: refused at once.
    assert _run(out, "--meta-iters", "3", "--step-size", "3", "--resume") == 2
    assert "smaller step size" in capsys.readouterr().err

    assert main(argv) == 0
    resumed = _results(out)
    assert resumed["runtime"]["resumed_from_meta_iteration"] == 1
    assert resumed["config"]["step_size"] == 1.5
    assert resumed["meta_step_sizes"] == [3.0, 1.5, 1.5]
    assert resumed["meta_records"]["valid_loss"][:2] == kept["valid_loss"]
    assert all(np.isfinite(resumed["meta_records"]["valid_loss"]))


# -- a bad --out is refused before any work -------------------------------------------------


@pytest.mark.parametrize("case", ["a file", "under a file", "not writable"])
def test_a_bad_out_folder_is_refused_up_front(tmp_path, capsys, monkeypatch, case):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = {"a file": blocker, "under a file": blocker / "sub" / "out",
           "not writable": tmp_path / "ro"}[case]
    if case == "not writable":
        out.mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
            False if Path(p) == out else real_access(p, mode, *a, **k)))

    def no_work(*args, **kwargs):
        raise AssertionError("the data were loaded before --out was checked")

    monkeypatch.setattr("hypergrad_fast.experiments.schedules.SchedulesProblem", no_work)
    assert _run(out, "--meta-iters", "1") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("hypergrad-fast schedules: error: output folder ")
    assert str(out if case == "not writable" else blocker) in err


# -- crafted checkpoints --------------------------------------------------------------------


def test_a_checkpoint_member_claiming_a_huge_array_is_a_clean_error(tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(out, "--meta-iters", "1") == 0
    path = out / "checkpoint.npz"
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
    members["params.npy"] = header.getvalue() + bytes(64)
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    assert _run(out, "--meta-iters", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "unusable" in err and "params" in err and "Traceback" not in err


def test_a_checkpoint_lacking_a_record_field_is_a_clean_error(tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(out, "--meta-iters", "1") == 0
    path = out / "checkpoint.npz"
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    keep = [i for i, k in enumerate(arrays["record_keys"].tolist()) if k != "valid_loss"]
    arrays["record_keys"] = arrays["record_keys"][keep]
    arrays["records"] = np.ascontiguousarray(arrays["records"][:, keep])
    np.savez(path, **arrays)
    assert _run(out, "--meta-iters", "1", "--resume") == 2
    err = capsys.readouterr().err
    assert "valid_loss" in err and "Traceback" not in err


def test_a_fifo_named_checkpoint_npz_is_refused_without_waiting(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    os.mkfifo(out / "checkpoint.npz")

    class Hung(Exception):
        pass

    def alarm(signum, frame):
        raise Hung("--resume waited on the FIFO")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        assert _run(out, "--resume") == 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert "not a regular file" in capsys.readouterr().err


# -- the data source --------------------------------------------------------------------------




@pytest.fixture
def no_mnist_env(monkeypatch):
    monkeypatch.delenv(MNIST_ENV, raising=False)


def test_resume_accepts_the_same_data_folder_spelled_differently(tmp_path, monkeypatch,
                                                                 no_mnist_env):
    data = idx_folder(tmp_path / "mnist")
    out = tmp_path / "o"
    monkeypatch.setenv(MNIST_ENV, str(data))
    assert _run(out, "--meta-iters", "1") == 0
    # A temp file of a writer that died (no process has a pid this large) is removed.
    stale = out / f".results.json.{2**22 + 17}.{'a' * 16}.tmp"
    stale.write_bytes(b"half")
    monkeypatch.setenv(MNIST_ENV, str(data) + "/")
    assert _run(out, "--meta-iters", "2", "--resume") == 0
    assert _results(out)["runtime"]["resumed_from_meta_iteration"] == 1
    assert not stale.exists()


def test_data_option_reads_an_idx_folder_and_resume_refuses_another_source(
        tmp_path, monkeypatch, capsys, no_mnist_env):
    data = idx_folder(tmp_path / "mnist")
    out = tmp_path / "o"
    assert _run(out, "--meta-iters", "1", "--data", str(data)) == 0
    config = _results(out)["config"]
    assert config["mnist_source"] == str(data.resolve())
    monkeypatch.chdir(tmp_path)
    assert _run(out, "--meta-iters", "2", "--resume", "--data", "./mnist/") == 0
    assert _results(out)["runtime"]["resumed_from_meta_iteration"] == 1
    capsys.readouterr()

    other = idx_folder(tmp_path / "other", seed=1)
    assert _run(out, "--meta-iters", "3", "--resume", "--data", str(other)) == 2
    assert "data" in capsys.readouterr().err
    assert _run(out, "--meta-iters", "3", "--resume") == 2  # the embedded digits
    assert "data" in capsys.readouterr().err


def test_data_option_must_name_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["schedules", "--data", str(tmp_path / "missing")])
    assert info.value.code == 2
    assert "argument --data: not a folder" in capsys.readouterr().err


# -- Ctrl-C while starting up -------------------------------------------------------------------

_INTERRUPTED_IMPORT = """
import sys

class Interrupt:
    # Stands for Ctrl-C while the experiments (autograd, the models) are imported.
    def find_spec(self, name, path=None, target=None):
        if name == "hypergrad_fast.experiments":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
from hypergrad_fast.cli import main
sys.exit(main(["schedules", "--help"]))
"""


def test_an_interrupt_during_start_up_prints_one_line_and_exits_130():
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_IMPORT], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 130
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "hypergrad-fast: interrupted; rerun with --resume to continue from the last checkpoint"]
