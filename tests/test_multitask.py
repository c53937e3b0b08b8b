"""The multitask experiment: the ten tasks, the multitask objective against an
independent autograd reference, the sharing matrices, hypergradients against
finite differences and the autograd backend, and tiny runs end to end
(results.json, figures, exact --resume, an IDX --data folder, bad arguments)."""


import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad, make_vjp, value_and_grad

from hypergrad_fast.cli import build_parser
from hypergrad_fast.data import MnistSplits, Split, write_idx
from hypergrad_fast.experiments import multitask as mt
from hypergrad_fast.experiments._args import ConfigError
from hypergrad_fast.experiments._runner import command_line, settings_from_args
from hypergrad_fast.metaopt import CheckpointError
from hypergrad_fast.models import MLP, make_train_loss
from hypergrad_fast.objectives import minibatch

from experiment_runs import PNG_MAGIC, embedded_digits  # noqa: F401  (an autouse fixture)
from experiment_runs import results as _results, without_times as _without_times

TINY = ["--hidden", "3", "--n-train", "4", "--n-valid", "3", "--n-test", "3", "--iters", "3",
        "--batch-size", "2", "--no-progress"]
TABLE_KEYS = {"train_error", "test_error", "train_loss", "test_loss"}


def _parser():
    return build_parser()


def _run(out, *extra):
    """The subcommand run directly (exceptions propagate, unlike through ``main``)."""
    args = _parser().parse_args(["multitask", "--out", str(out), *TINY, *extra])
    return args.run(args)


def _digits(rng, n_train, n_valid, n_test, side=28):
    """Synthetic MnistSplits holding ten times each count, every image distinct."""
    def split(n):
        labels = rng.integers(0, 10, size=n)
        inputs = rng.random((n, side * side))
        return Split(inputs, np.eye(10)[labels], labels)
    return MnistSplits(*(split(mt.N_TASKS * n) for n in (n_train, n_valid, n_test)))


# --------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------


def test_the_five_permutations_start_with_the_identity_and_disagree_everywhere():
    perms = mt.task_permutations()
    assert perms.shape == (5, 10)
    assert np.array_equal(perms[0], np.arange(10))
    for p in perms:
        assert sorted(p) == list(range(10))
    for a in range(5):
        for b in range(a + 1, 5):
            assert np.all(perms[a] != perms[b])
    assert np.array_equal(mt.task_permutations(), perms)  # fixed


def test_tasks_rotate_relabel_and_use_disjoint_digits():
    rng = np.random.default_rng(0)
    digits = _digits(rng, 3, 2, 4)
    tasks = mt.make_tasks(digits, 3, 2, 4)
    perms = mt.task_permutations()
    assert len(tasks) == 10
    for k, task in enumerate(tasks):
        assert mt.task_rotation(k) == k // 5 and mt.task_permutation(k) == k % 5
        for split, n, task_split in zip(digits, (3, 2, 4), task):
            block = slice(k * n, (k + 1) * n)
            images = split.inputs[block].reshape(n, 28, 28)
            expected = np.rot90(images, k=1, axes=(1, 2)) if k >= 5 else images
            assert np.array_equal(task_split.inputs, expected.reshape(n, 784))
            labels = perms[k % 5][split.labels[block]]
            assert np.array_equal(task_split.labels, labels)
            assert np.array_equal(task_split.targets, np.eye(10)[labels])
    # Each digit serves one task: no image appears twice across tasks and splits.
    upright = [np.rot90(s.inputs.reshape(-1, 28, 28), k=-1, axes=(1, 2)).reshape(-1, 784)
               if k >= 5 else s.inputs for k, t in enumerate(tasks) for s in t]
    rows = np.concatenate(upright)
    assert len(np.unique(rows, axis=0)) == len(rows) == 10 * (3 + 2 + 4)
    with pytest.raises(ValueError, match="expected 10 x 5"):
        mt.make_tasks(digits, 3, 2, 5)


# --------------------------------------------------------------------------
# The objective against an independent autograd reference
# --------------------------------------------------------------------------

SIZES = (6, 4, 3, 5)  # a small [n_in, H, H, n_out] network
N_REF_TASKS = 3


def _reference_loss(x, matrices, t, tied, data, batch_size):
    """Sum over tasks of the minibatch mean cross-entropy of a tanh network, plus
    0.5 sum_ij A_l[i, j] <W_l[i], W_l[j]>, written out with no package code."""
    shapes = [(SIZES[i], SIZES[i + 1]) for i in range(3)]
    sizes = [a * b + b for a, b in shapes]
    net, head = sum(sizes), sizes[0] + sizes[1]

    def unpack(v):
        out, at = [], 0
        for a, b in shapes:
            out.append((anp.reshape(v[at:at + a * b], (a, b)), v[at + a * b:at + a * b + b]))
            at += a * b + b
        return out

    total = 0.0
    layers = [[], [], []]
    for k, (inputs, targets) in enumerate(data):
        if tied:
            v = anp.concatenate([x[:head], x[head + k * sizes[2]:head + (k + 1) * sizes[2]]])
        else:
            v = x[k * net:(k + 1) * net]
        params = unpack(v)
        idx = minibatch(t, len(inputs), batch_size, 0)
        h = inputs[idx]
        for i, (w, b) in enumerate(params):
            z = anp.dot(h, w) + b
            h = anp.tanh(z) if i < 2 else z
        m = anp.max(h, axis=1, keepdims=True)
        logp = h - m - anp.log(anp.sum(anp.exp(h - m), axis=1, keepdims=True))
        total = total - anp.mean(anp.sum(logp * targets[idx], axis=1))
        for i, (w, _) in enumerate(params):
            if not tied or i == 2 or k == 0:
                layers[i].append(anp.reshape(w, (-1,)))
    for a, ws in zip(matrices, layers):
        for i in range(len(ws)):
            for j in range(len(ws)):
                total = total + 0.5 * a[i, j] * anp.sum(ws[i] * ws[j])
    return total


@pytest.mark.parametrize("tied", [False, True])
def test_objective_gradient_hvp_and_meta_derivative_match_autograd(tied):
    rng = np.random.default_rng(1)
    model = MLP(SIZES)
    data = [(rng.random((5, SIZES[0])), np.eye(SIZES[-1])[rng.integers(0, 5, 5)])
            for _ in range(N_REF_TASKS)]
    losses = [make_train_loss(model, i, o, 2) for i, o in data]
    layout = (mt.TaskLayout.tied if tied else mt.TaskLayout.per_task)(model.layout,
                                                                      N_REF_TASKS)
    assert layout.copies() == ((1, 1, 3) if tied else (3, 3, 3))
    objective = mt.MultitaskLoss(layout, losses)
    matrices = []
    for n in layout.copies():
        b = rng.standard_normal((n, n))
        matrices.append(b @ b.T + 0.1 * np.eye(n))
    matrices = tuple(matrices)
    x = 0.5 * rng.standard_normal(layout.size)
    u = rng.standard_normal(layout.size)

    def ref(x_, m_, t_):
        return _reference_loss(x_, m_, t_, tied, data, 2)

    for t in (0, 3):
        value, g = objective.value_and_grad(x, matrices, t)
        ref_value, ref_g = value_and_grad(ref)(x, matrices, t)
        assert value == pytest.approx(ref_value, rel=1e-12)
        assert objective(x, matrices, t) == pytest.approx(ref_value, rel=1e-12)
        np.testing.assert_allclose(g, ref_g, rtol=1e-10, atol=1e-12)

        d_start = tuple(rng.standard_normal(a.shape) for a in matrices)
        g2, hu, d_meta = objective.grad_and_hvp(x, matrices, t, u, d_start)
        vjp, _ = make_vjp(lambda xm: grad(ref)(xm[0], xm[1], t))((x, matrices))
        ref_hu, ref_dm = vjp(u)
        np.testing.assert_array_equal(g2, g)
        np.testing.assert_allclose(hu, ref_hu, rtol=1e-10, atol=1e-12)
        for got, start, want in zip(d_meta, d_start, ref_dm):
            np.testing.assert_allclose(got, start + want, rtol=1e-10, atol=1e-12)
        g3, hu3, none = objective.grad_and_hvp(x, matrices, t, u, None)
        assert none is None
        np.testing.assert_array_equal(hu3, hu)
    with pytest.raises(ValueError, match="sharing matrix 2 must have shape"):
        objective.value_and_grad(x, matrices[:2] + (np.eye(2),), 0)
    with pytest.raises(ValueError, match="x must have shape"):
        objective.value_and_grad(x[1:], matrices, 0)


# --------------------------------------------------------------------------
# Sharing matrices
# --------------------------------------------------------------------------


def test_cholesky_matrices_stay_positive_definite_and_start_at_the_l2_strength():
    rng = np.random.default_rng(2)
    place = mt._lower_placement(10)
    for scale in (0.1, 1.0, 2.0):
        log_diag, lower = scale * rng.standard_normal(10), scale * rng.standard_normal(45)
        a = mt.cholesky_matrix(log_diag, lower, place)
        np.testing.assert_allclose(a, a.T, rtol=1e-12)
        factor = np.linalg.cholesky(a)  # raises unless positive-definite
        # ... and the factor is the parameterisation's: log diagonal, then the rest.
        np.testing.assert_allclose(np.log(np.diag(factor)), log_diag, atol=1e-9)
        np.testing.assert_allclose(factor[np.tril_indices(10, -1)] /
                                   np.exp(log_diag)[np.tril_indices(10, -1)[0]], lower,
                                   rtol=1e-9, atol=1e-9)
    config = mt.MultitaskConfig(init_log_l2=-3.0, n_valid=1, n_test=1)
    digits = _digits(rng, config.n_train, 1, 1)
    matrices = {}
    for variant in mt.VARIANTS:
        problem = mt.MultitaskProblem(config, variant, digits)
        matrices[variant] = [np.asarray(a) for a in problem.matrices(problem.initial())]
    for l in range(3):
        np.testing.assert_allclose(matrices["learned"][l], np.exp(-3.0) * np.eye(10),
                                   rtol=1e-14)
        np.testing.assert_array_equal(matrices["separate"][l], np.exp(-3.0) * np.eye(10))
    assert [m.shape for m in matrices["tied"]] == [(1, 1), (1, 1), (10, 10)]


def test_partial_correlations_and_pair_means():
    corr = mt.partial_correlations(np.array([[2.0, -1.0], [-1.0, 8.0]]))
    np.testing.assert_allclose(corr, [[1.0, 0.25], [0.25, 1.0]])
    # A precision matrix that pulls tasks of one rotation together.
    a = 3.0 * np.eye(10)
    a[:5, :5] -= 0.4
    a[5:, 5:] -= 0.4
    a += 0.4 * np.eye(10)
    means = mt.pair_means(mt.partial_correlations(a))
    assert means["same_rotation"] == pytest.approx(0.4 / 3.0)
    assert means["across_rotation"] == 0.0
    assert means["same_permutation"] == 0.0
    assert means["different_permutation"] == pytest.approx(0.4 / 3.0 * 20 / 40)


# --------------------------------------------------------------------------
# Hypergradients
# --------------------------------------------------------------------------


def test_hypergradients_match_finite_differences_and_the_autograd_backend():
    rng = np.random.default_rng(3)
    settings = dict(hidden=3, n_train=4, n_valid=3, n_test=2, iters=4, batch_size=2)
    digits = _digits(rng, 4, 3, 2)
    for variant in mt.VARIANTS:
        problem = mt.MultitaskProblem(mt.MultitaskConfig(**settings), variant, digits)
        h = problem.initial() + 0.3 * rng.standard_normal(problem.hyper.size)
        value, g = problem.hyperloss_and_grad(h)
        direction = rng.standard_normal(h.size)
        eps = 1e-4
        plus = problem.hyperloss_and_grad(h + eps * direction)[0]
        minus = problem.hyperloss_and_grad(h - eps * direction)[0]
        assert (plus - minus) / (2 * eps) == pytest.approx(g @ direction, rel=1e-5, abs=1e-9)
        assert np.abs(g).max() > 0
        reference = mt.MultitaskProblem(mt.MultitaskConfig(**settings, backend="autograd"),
                                        variant, digits)
        ref_value, ref_g = reference.hyperloss_and_grad(h)
        assert ref_value == pytest.approx(value, rel=1e-12)
        np.testing.assert_allclose(ref_g, g, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


def test_a_run_writes_the_table_the_sharing_matrices_and_the_checks(tmp_path):
    out = tmp_path / "o"
    assert _run(out, "--meta-iters", "2") == 0
    r = _results(out)
    assert r["experiment"] == "multitask"
    assert r["command"].startswith(f"hypergrad-fast multitask --out {out} ")
    assert r["config"]["layer_sizes"] == [784, 3, 3, 10] and r["config"]["n_tasks"] == 10
    assert r["data"]["source"] == "embedded 5k subset" and len(r["data"]["sha256"]) == 64
    s = r["summary"]
    assert set(s["table"]) == set(mt.VARIANTS)
    for variant, row in s["table"].items():
        assert TABLE_KEYS <= set(row)
        assert row["test_loss"] == r["meta_records"][variant]["test_loss"][-1]
        assert len(r["meta_records"][variant]["valid_loss"]) == 3
        # The hyperloss is the summed validation loss; records hold the mean per task.
        np.testing.assert_allclose(r["meta_records"][variant]["hyperloss"],
                                   10 * np.asarray(r["meta_records"][variant]["valid_loss"]),
                                   rtol=1e-12)
    assert set(s["sharing"]) == {"layer0", "layer1", "layer2"}
    for l in range(3):
        corr = np.array(s["sharing"][f"layer{l}"])
        a = np.array(r["learned"]["sharing_matrices"][l])
        assert corr.shape == a.shape == (10, 10)
        np.testing.assert_allclose(np.diag(corr), 1.0)
        np.testing.assert_allclose(corr, corr.T, atol=1e-12)
        np.testing.assert_allclose(corr, mt.partial_correlations(a))
        assert np.all(np.abs(corr) <= 1.0 + 1e-12)
        assert np.abs(corr - np.eye(10)).max() > 0  # the learned matrices moved
    checks = s["checks"]
    first, last = checks["input_layer_couples_same_rotation"], \
        checks["output_layer_couples_same_permutation"]
    assert first["holds"] == (first["same_rotation_mean"] > first["across_rotation_mean"])
    assert last["holds"] == (last["same_permutation_mean"] > last["different_permutation_mean"])
    off = ~np.eye(10, dtype=bool)
    assert first["off_diagonal_sd"] == pytest.approx(np.std(np.array(s["sharing"]["layer0"])[off]))
    assert last["off_diagonal_sd"] == pytest.approx(np.std(np.array(s["sharing"]["layer2"])[off]))
    lowest = checks["learned_lowest_test_loss"]
    losses = {v: s["table"][v]["test_loss"] for v in mt.VARIANTS}
    assert lowest["test_loss"] == losses
    assert lowest["holds"] == (losses["learned"] < min(losses["separate"], losses["tied"]))
    assert len(r["learned"]["hyperparameters"]["learned"]) == 165
    assert len(r["learned"]["hyperparameters"]["tied"]) == 3
    assert len(r["figures"]) == 3
    for figure in r["figures"]:
        raw = (out / figure["file"]).read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 10_000 and figure["caption"]
    for variant in mt.VARIANTS:
        assert (out / f"checkpoint_{variant}.npz").is_file()


def test_resume_after_an_interruption_and_after_completion_is_exact(tmp_path, monkeypatch):
    assert _run(tmp_path / "whole", "--meta-iters", "2") == 0
    whole = _without_times(_results(tmp_path / "whole"))
    real = mt.MultitaskProblem.hyperloss_and_grad
    calls = []

    def interrupted(self, h):
        calls.append(self.variant)
        if len(calls) == 5:  # the second evaluation of the tied variant
            raise KeyboardInterrupt
        return real(self, h)

    monkeypatch.setattr(mt.MultitaskProblem, "hyperloss_and_grad", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", "--meta-iters", "2")
    assert calls[-1] == "tied"
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(mt.MultitaskProblem, "hyperloss_and_grad", real)
    assert _run(tmp_path / "cut", "--meta-iters", "2", "--resume") == 0
    assert _without_times(_results(tmp_path / "cut")) == whole
    # Resuming the finished run again evaluates nothing and changes nothing.
    monkeypatch.setattr(mt.MultitaskProblem, "hyperloss_and_grad", None)
    assert _run(tmp_path / "cut", "--meta-iters", "2", "--resume") == 0
    assert _without_times(_results(tmp_path / "cut")) == whole
    # Another seed is another run: its checkpoint is refused.
    monkeypatch.setattr(mt.MultitaskProblem, "hyperloss_and_grad", real)
    with pytest.raises(CheckpointError, match="different run(.|\n)*seed"):
        _run(tmp_path / "cut", "--meta-iters", "2", "--resume", "--seed", "1")


def _idx_folder(folder, n_train, n_test, side=28):
    rng = np.random.default_rng(4)
    folder.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, size=(n, side, side), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_a_run_reads_an_idx_folder_and_refuses_one_too_small(tmp_path):
    data = _idx_folder(tmp_path / "mnist", 80, 40)
    out = tmp_path / "o"
    assert _run(out, "--meta-iters", "1", "--data", str(data)) == 0
    r = _results(out)
    assert r["data"]["source"] == str(data.resolve())
    assert f"--data {data}" in r["command"]
    assert all(np.isfinite(r["summary"]["table"][v]["test_loss"]) for v in mt.VARIANTS)
    with pytest.raises(ConfigError, match="10 tasks .* only 40 are available"):
        _run(tmp_path / "o2", "--meta-iters", "1", "--data", str(data), "--n-test", "5")
    small = _idx_folder(tmp_path / "small", 80, 40, side=20)
    with pytest.raises(ConfigError, match="images of 400 pixels"):
        _run(tmp_path / "o3", "--meta-iters", "1", "--data", str(small))


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "0"], "--hidden: must be >= 1"),
    (["--learning-rate", "0"], "must be a positive number"),
    (["--data", "/nonexistent/folder"], "not a folder"),
    (["--iters", "0"], "--iters: must be >= 1"),
    (["--meta-iters", "many"], "expected an integer"),
])
def test_bad_arguments_exit_with_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["multitask", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_settings_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="batch_size must be <= n_train"):
        _run(tmp_path / "o", "--batch-size", "5")
    for kwargs, message in (({"momentum": 1.0}, "momentum"), ({"hidden": 2.5}, "hidden"),
                            ({"init_log_l2": float("nan")}, "init_log_l2"),
                            ({"learning_rate": -1.0}, "learning_rate")):
        with pytest.raises(ConfigError, match=message):
            mt.MultitaskConfig(**kwargs)
    with pytest.raises(ValueError, match="variant must be one of"):
        mt.MultitaskProblem(mt.MultitaskConfig(), "shared", _digits(np.random.default_rng(0),
                                                                    50, 50, 300))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        _run(blocker / "o")


def test_quick_the_command_line_and_the_help(capsys):
    args = _parser().parse_args(["multitask", "--quick", "--out", "o", "--hidden", "7"])
    assert command_line(args) == "hypergrad-fast multitask --quick --out o --hidden 7"
    config = mt.MultitaskConfig(**settings_from_args(args, mt.QUICK,
                                                     extra=("hidden", "learning_rate")))
    assert config.meta_iters == mt.QUICK["meta_iters"] and config.hidden == 7
    assert config.layer_sizes == (784, 7, 7, 10)
    with pytest.raises(SystemExit):
        _parser().parse_args(["multitask", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "train examples per task (default: 50)" in help_text


def test_every_task_starts_from_its_own_draw_and_tied_shares_task_0s_hidden_layers():
    rng = np.random.default_rng(5)
    config = mt.MultitaskConfig(hidden=3, n_train=2, n_valid=1, n_test=1, batch_size=2)
    digits = _digits(rng, 2, 1, 1)
    per_task = mt.MultitaskProblem(config, "separate", digits)
    tied = mt.MultitaskProblem(config, "tied", digits)
    assert per_task.x0.size == 10 * per_task.model.layout.size
    nets = [per_task.layout.task_params(per_task.x0, k) for k in range(10)]
    head = per_task.model.layout.slices["W2"].start
    for k in range(10):
        w = tied.layout.task_params(tied.x0, k)
        np.testing.assert_array_equal(w[:head], nets[0][:head])
        np.testing.assert_array_equal(w[head:], nets[k][head:])
        if k:
            assert not np.array_equal(nets[k][:head], nets[0][:head])
    # Biases start at zero, weights at 1/sqrt(fan-in).
    b0 = per_task.model.layout.slices["b0"]
    assert not nets[3][b0].any()
    assert np.std(nets[3][per_task.model.layout.slices["W0"]]) == pytest.approx(784 ** -0.5,
                                                                                rel=0.2)
    # The tied hidden layers learn with the mean of the tasks' gradients.
    assert tied.alphas[0, 1] == pytest.approx(tied.alphas[0, 0] / 10)
    assert tied.groups.sum() == head and not per_task.groups.any()
