"""Every registered experiment on tiny settings: results.json with the gallery keys,
figures, exact --resume after completion and after an interruption, and bad
arguments."""

import shlex

import numpy as np
import pytest

from hypergrad_fast.cli import build_parser, main
from hypergrad_fast.experiments import EXPERIMENTS
from hypergrad_fast.experiments._runner import MnistProblem, command_line

from experiment_runs import PNG_MAGIC, embedded_digits  # noqa: F401  (an autouse fixture)
from experiment_runs import idx_folder, results as _results, without_times as _without_times

SIZES = ["--n-train", "200", "--n-valid", "100", "--n-test", "100", "--iters", "5",
         "--no-progress"]
TINY = {
    "schedules": [*SIZES, "--hidden", "10", "--batch-size", "50"],
    "init-scales": [*SIZES, "--hidden", "10", "--batch-size", "50"],
    "l2-per-weight": [*SIZES, "--batch-size", "50"],
    "learned-data": [*SIZES, "--draws", "3"],
}
SUMMARY_KEYS = {
    "schedules": {"initial_valid_loss", "final_valid_loss", "final_test_error"},
    "init-scales": {"learned_init_scales", "fan_in_heuristic", "ratio_to_heuristic"},
    "l2-per-weight": {"test_error_per_weight", "test_error_shared", "test_loss_per_weight",
                      "test_loss_shared"},
    "learned-data": {"test_error_learned", "test_error_real", "test_error_real_std",
                     "n_draws", "test_loss_learned", "test_loss_real",
                     "test_loss_real_std"},
}
#: The hyperloss evaluation an interrupted run stops at (l2-per-weight: inside its
#: second meta-optimisation, which starts at the fifth with 3 meta-iterations).
INTERRUPT_AT = {"schedules": 3, "init-scales": 3, "l2-per-weight": 6, "learned-data": 3}
NAMES = list(TINY)


def _run(name, out, *extra):
    return main([name, "--out", str(out), *TINY[name], *extra])







def test_every_experiment_of_the_issue_is_registered():
    assert list(EXPERIMENTS) == ["schedules", "init-scales", "l2-per-weight", "learned-data",
                                 "multitask", "chaos", "search", "all"]


@pytest.mark.parametrize("name", NAMES)
def test_results_have_the_gallery_keys_summary_and_figures(name, tmp_path):
    out = tmp_path / name
    assert _run(name, out, "--meta-iters", "2") == 0
    r = _results(out)
    assert r["experiment"] == name
    assert r["command"].startswith(f"hypergrad-fast {name} --out {out} ")
    assert "--meta-iters 2" in r["command"]
    assert SUMMARY_KEYS[name] <= set(r["summary"])
    assert r["data"]["source"] == "embedded 5k subset" and len(r["data"]["sha256"]) == 64
    assert r["config"]["meta_iters"] == 2
    assert r["figures"], "no figures"
    for figure in r["figures"]:
        assert set(figure) == {"file", "caption"} and figure["caption"]
        raw = (out / figure["file"]).read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 10_000, figure["file"]
    records = r["meta_records"]
    for rec in (records.values() if name == "l2-per-weight" else [records]):
        # The compiled hyperloss and the NumPy record: the same validation loss.
        assert len(rec["valid_loss"]) == 3
        assert rec["hyperloss"] == pytest.approx(rec["valid_loss"], rel=1e-12, abs=0)
        assert all(np.isfinite(rec["test_loss"]))


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_an_interruption_and_after_completion_is_exact(name, tmp_path,
                                                                    monkeypatch):
    assert _run(name, tmp_path / "whole", "--meta-iters", "3") == 0
    whole = _without_times(_results(tmp_path / "whole"))

    real = MnistProblem.hyperloss_and_grad
    calls = []

    def interrupted(self, h):
        calls.append(1)
        if len(calls) == INTERRUPT_AT[name]:
            raise KeyboardInterrupt
        return real(self, h)

    monkeypatch.setattr(MnistProblem, "hyperloss_and_grad", interrupted)
    assert _run(name, tmp_path / "cut", "--meta-iters", "3") == 130
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(MnistProblem, "hyperloss_and_grad", real)
    assert _run(name, tmp_path / "cut", "--meta-iters", "3", "--resume") == 0
    assert _without_times(_results(tmp_path / "cut")) == whole
    # Resuming the finished run again evaluates nothing and changes nothing.
    monkeypatch.setattr(MnistProblem, "hyperloss_and_grad", None)
    assert _run(name, tmp_path / "cut", "--meta-iters", "3", "--resume") == 0
    assert _without_times(_results(tmp_path / "cut")) == whole


def test_init_scales_records_the_scales_and_the_heuristic(tmp_path):
    out = tmp_path / "o"
    assert _run("init-scales", out, "--meta-iters", "1") == 0
    r = _results(out)
    s = r["summary"]
    assert list(s["learned_init_scales"]) == ["W0", "b0", "W1", "b1"]
    assert s["fan_in_heuristic"] == pytest.approx({"W0": 784 ** -0.5, "W1": 10 ** -0.5})
    assert s["ratio_to_heuristic"]["W0"] == pytest.approx(
        s["learned_init_scales"]["W0"] * 28)
    assert r["meta_records"]["scale_W0"][0] == pytest.approx(np.exp(-2.0))
    assert r["meta_records"]["scale_W0"][-1] == pytest.approx(s["learned_init_scales"]["W0"])


def test_l2_per_weight_learns_one_penalty_per_weight_and_one_for_the_biases(tmp_path):
    out = tmp_path / "o"
    assert _run("l2-per-weight", out, "--meta-iters", "1") == 0
    r = _results(out)
    assert len(r["learned"]["log_l2_per_weight"]) == 7841  # 7,840 weights + the bias block
    assert len(set(r["learned"]["log_l2_per_weight"])) > 1  # they move apart
    assert (out / "checkpoint_per_weight.npz").is_file()
    assert (out / "checkpoint_shared.npz").is_file()


def test_learned_data_compares_with_real_draws(tmp_path):
    out = tmp_path / "o"
    assert _run("learned-data", out, "--meta-iters", "1") == 0
    r = _results(out)
    assert np.shape(r["learned_images"]) == (10, 784)
    assert len(r["real_draws"]["test_error"]) == r["summary"]["n_draws"] == 3
    assert r["summary"]["test_error_real"] == pytest.approx(
        np.mean(r["real_draws"]["test_error"]))
    # Meta-iteration 0 trains on blank images.
    assert r["meta_records"]["valid_loss"][0] > r["meta_records"]["valid_loss"][-1]


def test_learned_data_reads_an_idx_folder(tmp_path):
    data = idx_folder(tmp_path / "mnist")
    out = tmp_path / "o"
    assert _run("learned-data", out, "--meta-iters", "1", "--data", str(data)) == 0
    assert _results(out)["data"]["source"] == str(data.resolve())


def test_the_command_names_the_flags_given():
    args = build_parser().parse_args(["init-scales", "--quick", "--out",
                                      "out/all/init-scales"])
    assert command_line(args) == "hypergrad-fast init-scales --quick --out out/all/init-scales"
    args = build_parser().parse_args(["learned-data", "--hidden", "20,10", "--seed", "3",
                                      "--out", "o"])
    assert command_line(args) == "hypergrad-fast learned-data --out o --seed 3 --hidden 20,10"


@pytest.mark.parametrize("name", NAMES[1:])
@pytest.mark.parametrize("argv, message", [
    (["--iters", "0"], "--iters: must be >= 1"),
    (["--step-size", "-1"], "--step-size: must be a positive number"),
    (["--meta-iters", "many"], "expected an integer"),
    (["--data", "/nonexistent/folder"], "not a folder"),
    (["--learning-rate", "0"], "must be a positive number"),
])
def test_bad_arguments_exit_with_code_2(name, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err


def test_bad_settings_found_after_parsing_exit_2_with_one_line(tmp_path, capsys):
    assert _run("learned-data", tmp_path / "o", "--batch-size", "11") == 2
    err = capsys.readouterr().err
    assert err.strip() == ("hypergrad-fast learned-data: error: batch_size must be <= 10 "
                           "(the learned images), got 11")
    assert _run("init-scales", tmp_path / "o", "--n-train", "6000") == 2
    assert "available" in capsys.readouterr().err


def test_divergence_exits_1_with_advice(tmp_path, capsys):
    assert _run("init-scales", tmp_path / "o", "--meta-iters", "1",
                "--learning-rate", "1e6") == 1
    err = capsys.readouterr().err
    assert err.startswith("hypergrad-fast init-scales: training diverged at meta-iteration 0")
    assert "Traceback" not in err


def test_l2_after_the_shared_run_diverges_the_advised_command_continues(tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "o"
    real = MnistProblem.hyperloss_and_grad
    shared_calls = []

    def shared_diverges(self, h):
        if getattr(self, "variant", None) == "shared":
            shared_calls.append(1)
            if len(shared_calls) == 2:
                raise FloatingPointError("overflow (simulated)")
        return real(self, h)

    monkeypatch.setattr(MnistProblem, "hyperloss_and_grad", shared_diverges)
    assert _run("l2-per-weight", out, "--meta-iters", "2") == 1
    err = capsys.readouterr().err
    (command,) = [line.strip() for line in err.splitlines()
                  if line.strip().startswith("hypergrad-fast l2-per-weight ")]
    monkeypatch.setattr(MnistProblem, "hyperloss_and_grad", real)
    # The finished per-weight run keeps its step size; the shared one redoes its
    # first step with half of it.
    assert main(shlex.split(command)[1:]) == 0
    steps = _results(out)["meta_step_sizes"]
    assert steps == {"per_weight": [0.1, 0.1], "shared": [0.05, 0.05]}


def test_records_and_curves_agree_across_backends():
    """The compiled backend's per-split losses and errors and its learning curve (the
    compiled eval losses, input columns that are zero throughout left out) are those of
    the NumPy model that ``--backend autograd`` uses."""
    import dataclasses

    from hypergrad_fast.experiments.schedules import SchedulesConfig, SchedulesProblem

    config = SchedulesConfig(n_train=200, n_valid=100, n_test=100, iters=5, hidden=(10,),
                             batch_size=50)
    compiled = SchedulesProblem(config)
    traced = SchedulesProblem(dataclasses.replace(config, backend="autograd"))
    h = compiled.initial()
    h[:5] += 1.0  # a larger learning rate: the errors are neither 0 nor 1
    x = compiled.final_weights(h)
    ours, ref = compiled.evaluate(x), traced.evaluate(x)
    assert set(ours) == set(ref)
    for key in ref:
        if key.endswith("_error"):
            assert 0.0 < ours[key] < 1.0 and ours[key] == ref[key], key
        else:
            assert ours[key] == pytest.approx(ref[key], rel=1e-12, abs=0), key
    assert compiled.eval_loss("train")._compact.shape[1] < 784  # the border left out
    ours, ref = compiled.learning_curve(h), traced.learning_curve(h)
    assert ours["iteration"] == ref["iteration"] == list(range(6))
    for key in ("train_loss", "valid_loss"):
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-11)
