"""``hypergrad-fast schedules --optimizer adam`` on a tiny network: results.json with the
momentum run's gallery keys and Adam's b1/b2 schedules, plots, the hyperloss going
down, its hypergradient against a plain Adam loop, exact --resume, a checkpoint of
the other optimiser refused, --data with --quick, and the gallery entry of ``all``."""

import contextlib
import io
import json
from pathlib import Path

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad, value_and_grad
from autograd.tracer import getval

import hypergrad_fast.experiments as registry
from hypergrad_fast import effective_beta
from hypergrad_fast.cli import main
from hypergrad_fast.data import MNIST_ENV
from hypergrad_fast.experiments import gallery
from hypergrad_fast.experiments._args import ConfigError, Experiment
from hypergrad_fast.experiments.schedules import SchedulesConfig, SchedulesProblem
from hypergrad_fast.models import make_train_loss

from experiment_runs import PNG_MAGIC, embedded_digits  # noqa: F401  (an autouse fixture)
from experiment_runs import idx_folder, results as _results, without_times as _without_times

SIZES = {"hidden": (10,), "n_train": 200, "n_valid": 100, "n_test": 100, "iters": 5,
         "batch_size": 50}
TINY = ["--hidden", "10", "--n-train", "200", "--n-valid", "100", "--n-test", "100",
        "--iters", "5", "--batch-size", "50", "--no-progress"]
ADAM = ["schedules", "--optimizer", "adam"]
META = 4
BLOCKS = ["W0", "b0", "W1", "b1"]
#: The momentum run's summary keys, which the gallery shows for both runs.
GALLERY_SUMMARY = {f"{when}_{split}_{what}" for when in ("initial", "final")
                   for split in ("train", "valid", "test") for what in ("loss", "error")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny Adam run of META meta-iterations without --out (so into the default
    folder, below a temporary working directory): (working directory, printed text)."""
    root = tmp_path_factory.mktemp("adam")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(MNIST_ENV, raising=False)
        mp.chdir(root)
        with contextlib.redirect_stdout(printed):
            assert main([*ADAM, *TINY, "--meta-iters", str(META)]) == 0
    return root, printed.getvalue()


def test_the_default_folder_is_its_own(finished):
    root, _ = finished
    assert (root / "out" / "schedules-adam" / "results.json").is_file()
    assert not (root / "out" / "schedules").exists()


def test_results_hold_adam_schedules_with_the_gallery_keys(finished):
    out = finished[0] / "out" / "schedules-adam"
    r = _results(out)
    assert r["experiment"] == "schedules" and "--optimizer adam" in r["command"]
    config = r["config"]
    assert config["optimizer"] == "adam" and "init_beta" not in config
    assert (config["init_log_alpha"], config["init_b1"], config["init_b2"]) == (-5.0, 0.9, 0.99)
    assert r["n_hyperparameters"] == 3 * 5 * 4 + 4
    assert r["blocks"]["names"] == BLOCKS
    for when in ("initial", "final"):
        hp = r["hyperparameters"][when]
        assert set(hp) == {"alphas", "b1s", "b2s", "init_scales"}
        for key in ("alphas", "b1s", "b2s"):
            assert list(hp[key]) == BLOCKS
            values = np.array([hp[key][b] for b in BLOCKS])
            assert values.shape == (4, 5) and np.all(np.isfinite(values)) and np.all(values > 0)
        assert all(0 < b < 1 for key in ("b1s", "b2s") for v in hp[key].values() for b in v)
        assert all(np.isfinite(s) and s > 0 for s in hp["init_scales"].values())
    initial = r["hyperparameters"]["initial"]
    assert initial["alphas"]["W1"] == pytest.approx([np.exp(-5.0)] * 5)
    assert initial["b1s"]["b0"] == pytest.approx([0.9] * 5)
    assert initial["b2s"]["W0"] == pytest.approx([0.99] * 5)
    # The meta-optimisation moved each decay of each block somewhere.
    final = r["hyperparameters"]["final"]
    assert all(final[k][b] != initial[k][b] for k in ("b1s", "b2s") for b in BLOCKS)

    records = r["meta_records"]
    for key in ("valid_loss", "test_error", "grad_norm_log_alphas", "grad_norm_logit_b1s",
                "grad_norm_logit_b2s", "grad_norm_log_scales"):
        assert len(records[key]) == META + 1 and np.all(np.isfinite(records[key])), key
    assert min(records["grad_norm_logit_b1s"]) > 0 and min(records["grad_norm_logit_b2s"]) > 0

    s = r["summary"]
    assert GALLERY_SUMMARY <= set(s)
    assert s["final_valid_loss"] == records["valid_loss"][-1]
    for decay in ("b1", "b2"):
        means = s[f"final_{decay}_mean"]
        assert list(means) == BLOCKS
        assert means["W0"] == pytest.approx(np.mean(final[f"{decay}s"]["W0"]))

    # The learning curves train with Adam too: their last point is the recorded x_T.
    for when, i in (("initial", 0), ("final", -1)):
        curve = r["learning_curves"][when]
        assert curve["iteration"] == list(range(6))
        assert curve["valid_loss"][-1] == pytest.approx(records["valid_loss"][i], rel=1e-9)


def test_plots_include_the_decays_and_are_real_pngs(finished):
    out = finished[0] / "out" / "schedules-adam"
    figures = _results(out)["figures"]
    files = [f["file"] for f in figures]
    assert files == ["learning_rate_schedules.png", "decay_schedules.png",
                     "block_hyperparameters.png", "meta_learning_curve.png",
                     "learning_curves.png"]
    assert "b1 and b2" in figures[1]["caption"]
    for name in files:
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 10_000, name


def test_the_hypergradients_drive_the_validation_loss_down(finished):
    losses = _results(finished[0] / "out" / "schedules-adam")["meta_records"]["valid_loss"]
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < losses[0] - 0.02, losses


def test_the_printed_summary_names_b1_and_b2(finished):
    text = finished[1]
    assert "schedules (Adam)" in text and "valid loss" in text and "test error" in text
    for decay in ("b1", "b2"):
        (line,) = [ln for ln in text.splitlines() if f"learned {decay}" in ln]
        assert all(f"{b} 0." in line for b in BLOCKS), line
    assert str(Path("out") / "schedules-adam" / "results.json") in text


def _reference_hyperloss(problem, h):
    """The validation loss after a plain float64 Adam loop traced by autograd (no exact
    engine, no compiled loss), with the decays as the engine holds them, n / 2**16,
    differentiated as if they were b; sqrt(s) contributes nothing where s = 0 (every
    gradient so far zero), as in the engine's reverse pass."""
    c, train, valid = problem.config, problem.data.train, problem.data.valid
    loss_grad = grad(make_train_loss(problem.model, train.inputs, train.targets,
                                     c.batch_size, seed=c.seed, backend="autograd"))
    blocks = problem.hyper.unflatten(h)
    groups = problem.layout.groups

    def held(logits):
        b = 1.0 / (1.0 + anp.exp(-logits))
        return b + (effective_beta(getval(b)) - getval(b))

    x = anp.exp(blocks["log_scales"][groups]) * problem.noise
    alphas, b1s, b2s = (anp.exp(blocks["log_alphas"]), held(blocks["logit_b1s"]),
                        held(blocks["logit_b2s"]))
    m = s = anp.zeros(len(groups))
    for t in range(c.iters):
        g = loss_grad(x, np.zeros(0), t)
        m = b1s[t][groups] * m + (1.0 - b1s[t][groups]) * g
        s = b2s[t][groups] * s + (1.0 - b2s[t][groups]) * g * g
        pos = getval(s) > 0
        root = anp.where(pos, anp.sqrt(anp.where(pos, s, 1.0)), 0.0)
        x = x - alphas[t][groups] * m / (root + 1e-8)
    return problem.model.loss(x, valid.inputs, valid.targets)


def test_the_hyperloss_and_hypergradient_match_a_plain_adam_loop():
    """Every block, the decays included (a finite difference of the experiment's own
    hyperloss is no check at small steps: s is held to 2**-60, so the function is
    stepwise there)."""
    problem = SchedulesProblem(SchedulesConfig(optimizer="adam", **SIZES))
    rng = np.random.default_rng(1)
    # Away from the flat start, so that a swap of b1 and b2 or of iterations shows.
    h = problem.initial() + 0.3 * rng.standard_normal(problem.hyper.size)
    value, hypergrad = problem.hyperloss_and_grad(h)
    ref_value, ref_grad = value_and_grad(lambda h: _reference_hyperloss(problem, h))(h)
    assert value == pytest.approx(ref_value, rel=1e-7)
    ours, ref = problem.hyper.unflatten(hypergrad), problem.hyper.unflatten(ref_grad)
    assert list(ours) == ["log_alphas", "logit_b1s", "logit_b2s", "log_scales"]
    for name in ours:
        assert np.linalg.norm(ref[name]) > 0, name
        assert np.linalg.norm(ours[name] - ref[name]) <= 1e-4 * np.linalg.norm(ref[name]), name


def test_resume_after_a_shorter_run_is_exact(finished, tmp_path):
    out = tmp_path / "cut"
    assert main([*ADAM, "--out", str(out), *TINY, "--meta-iters", "2"]) == 0
    assert main([*ADAM, "--out", str(out), *TINY, "--meta-iters", str(META), "--resume"]) == 0
    resumed = _results(out)
    assert resumed["runtime"]["resumed_from_meta_iteration"] == 2
    whole = _results(finished[0] / "out" / "schedules-adam")
    assert _without_times(resumed) == _without_times(whole)


def test_a_checkpoint_of_the_other_optimizer_is_refused(finished, tmp_path, capsys):
    out = finished[0] / "out" / "schedules-adam"
    before = {f: (out / f).read_bytes() for f in ("checkpoint.npz", "results.json")}
    # Momentum (the default) resuming Adam's checkpoint.
    assert main(["schedules", "--out", str(out), *TINY, "--meta-iters", str(META + 1),
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config.optimizer: checkpoint has 'adam'" in err and "Traceback" not in err
    assert {f: (out / f).read_bytes() for f in before} == before

    # Adam resuming momentum's checkpoint.
    other = tmp_path / "momentum"
    assert main(["schedules", "--out", str(other), *TINY, "--meta-iters", "1"]) == 0
    capsys.readouterr()
    assert main([*ADAM, "--out", str(other), *TINY, "--meta-iters", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config.optimizer" in err and "'adam'" in err and "Traceback" not in err


def test_an_idx_folder_with_quick(tmp_path):
    data = idx_folder(tmp_path / "mnist")
    out = tmp_path / "o"
    assert main([*ADAM, "--out", str(out), *TINY, "--quick", "--data", str(data)]) == 0
    r = _results(out)
    assert r["config"]["meta_iters"] == 10 and r["config"]["optimizer"] == "adam"
    assert r["data"]["source"] == str(data.resolve())
    assert len(r["meta_records"]["valid_loss"]) == 11
    assert np.all(np.isfinite(r["meta_records"]["valid_loss"]))


def test_settings_are_checked():
    assert SchedulesConfig().init_log_alpha == -1.0
    assert SchedulesConfig(optimizer="adam").init_log_alpha == -5.0
    assert SchedulesConfig(optimizer="adam", init_log_alpha=-4.0).init_log_alpha == -4.0
    with pytest.raises(ConfigError, match="optimizer must be one of 'momentum', 'adam'"):
        SchedulesConfig(optimizer="sgd")
    for field in ("init_b1", "init_b2"):
        with pytest.raises(ConfigError, match=f"{field} must lie in"):
            SchedulesConfig(optimizer="adam", **{field: 1.0})
    # The momentum run's settings and checkpoint key are those it had before Adam.
    momentum = SchedulesConfig()
    assert momentum.to_json()["optimizer"] == "momentum"
    assert not {"init_b1", "init_b2"} & set(momentum.to_json())
    assert "optimizer" not in momentum.run_key("stamp")
    assert SchedulesConfig(optimizer="adam").run_key("stamp")["optimizer"] == "adam"


def test_an_unknown_optimizer_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["schedules", "--optimizer", "sgd"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# -- the gallery: ``all`` runs the Adam variant after ``schedules`` -------------------------


def _fake_schedules():
    """A stand-in ``schedules`` that writes a results.json naming its optimiser."""
    def add_parser(sub):
        p = sub.add_parser("schedules")
        for flag in ("--out", "--data"):
            p.add_argument(flag, default=None)
        p.add_argument("--optimizer", default="momentum")
        p.add_argument("--quick", action="store_true")
        p.add_argument("--no-progress", action="store_true")
        return p

    def run(args):
        folder = Path(args.out)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "experiment": "schedules", "command": f"hypergrad-fast schedules --out {folder}",
            "summary": {"optimizer": args.optimizer}, "figures": []}))
        return 0

    return Experiment("schedules", add_parser, run)


def test_all_runs_the_adam_variant_as_its_own_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "EXPERIMENTS", {"schedules": _fake_schedules(),
                                                  "all": gallery.EXPERIMENT})
    out = tmp_path / "all"
    assert main(["all", "--out", str(out), "--quick", "--no-progress"]) == 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert list(runs) == ["schedules", "schedules-adam"]
    assert runs["schedules-adam"]["argv"] == ["schedules", "--out", str(out / "schedules-adam"),
                                              "--optimizer", "adam", "--quick",
                                              "--no-progress"]
    entries = {e.name: e for e in gallery.read_entries(out)}
    assert {n: (e.status, e.notes) for n, e in entries.items()} == {
        "schedules": ("ok", []), "schedules-adam": ("ok", [])}
    assert entries["schedules-adam"].summary == {"optimizer": "adam"}
    assert entries["schedules"].summary == {"optimizer": "momentum"}
    page = (out / "index.html").read_text()
    assert 'id="exp-schedules-adam"' in page
    # --only picks the variant alone.
    assert main(["all", "--out", str(tmp_path / "only"), "--only", "schedules-adam",
                 "--no-progress"]) == 0
    assert list(json.loads((tmp_path / "only" / "runs.json").read_text())["runs"]) == [
        "schedules-adam"]
