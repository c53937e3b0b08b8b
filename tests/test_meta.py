"""The meta-optimiser: Adam, records, and checkpoints that resume bit for bit."""

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import zipfile

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import value_and_grad

from hypergrad_fast.metaopt import (
    BASE_RECORD_KEYS,
    FORMAT_VERSION,
    CheckpointError,
    adam_init,
    adam_update,
    load_checkpoint,
    optimize,
)
from hypergrad_fast.models import LogisticRegression, ParamLayout, make_train_loss
from hypergrad_fast.hypergrad.sgd import sgd

N_ITERS = 10  # training iterations of the tiny problem


class TinyProblem:
    """Logistic regression on 100 random examples, T=10: hyperparameters are a log
    learning rate per iteration, one logit momentum and one log init scale."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.model = LogisticRegression(8, 3)
        inputs = rng.standard_normal((100, 8))
        labels = (inputs[:, 0] > 0).astype(int) + (inputs[:, 1] > 0.5)
        targets = np.eye(3)[labels]
        self.train = (inputs[:60], targets[:60])
        self.valid = (inputs[60:], targets[60:])
        self.loss = make_train_loss(self.model, *self.train, 20, seed=seed)
        self.noise = rng.standard_normal(self.model.layout.size)
        self.hyper = ParamLayout([("log_alphas", N_ITERS), ("logit_beta", 1),
                                  ("log_scale", 1)])
        self.calls = 0

    def h0(self):
        return self.hyper.flatten({"log_alphas": np.full(N_ITERS, -1.0),
                                   "logit_beta": [2.0], "log_scale": [-2.0]})

    def hyperloss(self, h):
        p = self.hyper.unflatten(h)
        x0 = anp.exp(p["log_scale"][0]) * self.noise
        betas = anp.ones(N_ITERS) / (1.0 + anp.exp(-p["logit_beta"][0]))
        x_final = sgd(self.loss, x0, anp.exp(p["log_alphas"]), betas)
        return self.model.loss(x_final, *self.valid)

    def __call__(self, h):
        self.calls += 1
        return value_and_grad(self.hyperloss)(h)

    @staticmethod
    def record(h, value, grad):
        return {"h_sum": float(np.sum(h)), "value_again": value}


class Stop(Exception):
    """Raised to simulate a crash in the middle of a run."""


def _crash_after(problem, n_calls):
    def f(h):
        if problem.calls >= n_calls:
            raise Stop
        return problem(h)
    return f


CONFIG = {"problem": "tiny", "seed": 0}


def _run(tmp_path, n_iters, name="ckpt.npz", problem=None, **kwargs):
    problem = problem or TinyProblem()
    kwargs.setdefault("config", CONFIG)
    kwargs.setdefault("record_fn", problem.record)
    return optimize(problem, problem.h0(), n_iters, 0.1, checkpoint=tmp_path / name,
                    progress=False, **kwargs)


def _same_records(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key not in ("iter_time", "wall_time"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# -- Adam -----------------------------------------------------------------------------


def test_adam_first_step_moves_each_coordinate_by_the_step_size():
    state = adam_init(np.zeros(3))
    state = adam_update(state, np.array([1e-3, -5.0, 2.0]), 0.04)
    np.testing.assert_allclose(state.params, [-0.04, 0.04, -0.04], rtol=1e-4)
    assert state.iteration == 1


def test_adam_converges_on_a_quadratic():
    target = np.array([1.0, -2.0, 3.0, 0.5])
    scale = np.array([1.0, 10.0, 0.1, 3.0])

    def f(h):
        return float(np.sum(scale * (h - target) ** 2)), 2 * scale * (h - target)

    result = optimize(f, np.zeros(4), 800, step_size=0.05, progress=False)
    np.testing.assert_allclose(result.params, target, atol=1e-2)
    assert result.records["hyperloss"][-1] < 1e-4 * result.records["hyperloss"][0]


def test_records_have_the_expected_keys_and_one_entry_per_evaluation(tmp_path):
    result = _run(tmp_path, 3)
    assert set(result.records) == set(BASE_RECORD_KEYS) | {"h_sum", "value_again"}
    assert all(len(v) == 4 for v in result.records.values())  # h_0 .. h_3
    np.testing.assert_array_equal(result.records["hyperloss"], result.records["value_again"])
    assert np.all(np.diff(result.records["wall_time"]) > 0)
    assert result.records["hyperloss"][-1] < result.records["hyperloss"][0]
    assert result.state.iteration == 3 and result.resumed_from == 0


def test_checkpoint_is_plain_npz_with_json_config(tmp_path):
    _run(tmp_path, 2)
    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as npz:
        config = json.loads(str(npz["run_config"]))
        assert int(npz["format_version"]) == config["format_version"] == FORMAT_VERSION == 2
        assert npz["records"].shape == (3, len(npz["record_keys"]))
    assert config["config"] == CONFIG
    assert config["optimizer"]["step_size"] == 0.1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- resuming ---------------------------------------------------------------------------


def test_resume_after_a_crash_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    whole = _run(tmp_path, 6, "whole.npz")
    crashing = TinyProblem()
    with pytest.raises(Stop):
        optimize(_crash_after(crashing, 4), crashing.h0(), 6, 0.1, config=CONFIG,
                 checkpoint=tmp_path / "part.npz", record_fn=crashing.record, progress=False)
    # The checkpoint holds the last evaluation, at h_3, with its gradient.
    assert load_checkpoint(tmp_path / "part.npz")["state"].iteration == 3
    resumed_problem = TinyProblem()
    resumed = _run(tmp_path, 6, "part.npz", problem=resumed_problem, resume=True)
    assert resumed.resumed_from == 3
    assert resumed_problem.calls == 3  # evaluations at h_4, h_5, h_6 only
    for a, b in zip(whole.state, resumed.state):
        np.testing.assert_array_equal(a, b)
    _same_records(whole.records, resumed.records)


def test_a_finished_run_continues_to_more_meta_iterations(tmp_path):
    longer = _run(tmp_path, 5, "long.npz")
    _run(tmp_path, 2, "short.npz")
    continued = _run(tmp_path, 5, "short.npz", resume=True)
    assert continued.resumed_from == 2
    np.testing.assert_array_equal(longer.params, continued.params)
    _same_records(longer.records, continued.records)


def test_resuming_a_finished_run_does_no_work(tmp_path):
    first = _run(tmp_path, 3)
    problem = TinyProblem()
    again = _run(tmp_path, 3, problem=problem, resume=True)
    assert problem.calls == 0
    np.testing.assert_array_equal(first.params, again.params)
    for key in first.records:
        np.testing.assert_array_equal(first.records[key], again.records[key])


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hypergrad_fast.metaopt"):
        result = _run(tmp_path, 1, "missing.npz", resume=True)
    assert result.resumed_from == 0
    assert "starting fresh" in caplog.text and "missing.npz" in caplog.text
    assert (tmp_path / "missing.npz").exists()


def test_resume_needs_a_checkpoint_path():
    problem = TinyProblem()
    with pytest.raises(ValueError, match="checkpoint"):
        optimize(problem, problem.h0(), 1, resume=True, progress=False)


def test_asking_for_fewer_meta_iterations_than_done_is_an_error(tmp_path):
    _run(tmp_path, 3)
    with pytest.raises(CheckpointError, match="already holds 3"):
        _run(tmp_path, 2, resume=True)


# -- refusing bad checkpoints ------------------------------------------------------------


def _flip_byte_in(path, needle_array):
    """Flip one bit inside the stored bytes of ``needle_array``."""
    raw = bytearray(path.read_bytes())
    at = raw.find(needle_array.tobytes())
    assert at > 0
    raw[at + 3] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bit flip", "empty"])
def test_a_damaged_checkpoint_is_refused_with_its_name(tmp_path, damage):
    result = _run(tmp_path, 2)
    path = tmp_path / "ckpt.npz"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif damage == "bit flip":
        _flip_byte_in(path, result.state.params)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="unusable") as info:
        _run(tmp_path, 4, resume=True)
    assert str(path) in str(info.value)


def test_a_checkpoint_missing_arrays_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    np.savez(path, params=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"missing arrays .*format_version"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, expected", [
    ({"config": {"problem": "tiny", "seed": 1}}, r"config\.seed: checkpoint has 0, now 1"),
    ({"config": {"problem": "tiny"}}, r"config\.seed: checkpoint has 0, now absent"),
    ({"b1": 0.8}, r"optimizer\.b1: checkpoint has 0\.9, now 0\.8"),
])
def test_a_checkpoint_of_other_settings_is_refused_naming_the_difference(
        tmp_path, change, expected):
    _run(tmp_path, 2)
    with pytest.raises(CheckpointError, match=expected) as info:
        _run(tmp_path, 4, resume=True, **change)
    assert str(tmp_path / "ckpt.npz") in str(info.value)
    assert "different run" in str(info.value)


def test_a_different_step_size_is_refused(tmp_path):
    problem = TinyProblem()
    _run(tmp_path, 1)
    with pytest.raises(CheckpointError, match="step_size: checkpoint has 0.1, now 0.2"):
        optimize(problem, problem.h0(), 2, 0.2, config=CONFIG, checkpoint=tmp_path / "ckpt.npz",
                 resume=True, record_fn=problem.record, progress=False)


def test_different_initial_hyperparameters_are_refused(tmp_path):
    _run(tmp_path, 1)
    problem = TinyProblem()
    h0 = problem.h0()
    h0[3] += 0.5
    with pytest.raises(CheckpointError, match=r"h0\[3\]"):
        optimize(problem, h0, 2, 0.1, config=CONFIG, checkpoint=tmp_path / "ckpt.npz",
                 resume=True, record_fn=problem.record, progress=False)
    with pytest.raises(CheckpointError, match=r"shape: checkpoint has \(12,\), now \(13,\)"):
        optimize(lambda h: (0.0, np.zeros_like(h)), np.zeros(13), 2, 0.1, config=CONFIG,
                 checkpoint=tmp_path / "ckpt.npz", resume=True, progress=False)


def test_other_record_fields_are_refused(tmp_path):
    _run(tmp_path, 1)
    with pytest.raises(CheckpointError, match="record fields"):
        _run(tmp_path, 2, resume=True, record_fn=lambda h, v, g: {"other": 1.0})


def test_a_non_finite_hyperloss_stops_the_run():
    def f(h):
        return float("nan"), np.zeros_like(h)

    with pytest.raises(FloatingPointError, match="meta-iteration 0"):
        optimize(f, np.zeros(2), 3, progress=False)


# -- divergence: continue from the last finite meta-iteration with a smaller step ------


def _diverging_quadratic(limit=1.0):
    """A hyperloss (h - 3)^2 summed whose "training run" is not finite once any |h|
    exceeds ``limit``; counts its calls.  From h0 = 0 with step size 0.6, Adam reaches
    h_1 = 0.6 (finite) and h_2 = 1.19 (diverges)."""
    def f(h):
        f.calls += 1
        if np.max(np.abs(h)) > limit:
            return float("nan"), np.full_like(h, np.nan)
        return float(np.sum((h - 3.0) ** 2)), 2.0 * (h - 3.0)
    f.calls = 0
    return f


def test_after_divergence_a_smaller_step_continues_from_the_last_finite_state(tmp_path):
    path = tmp_path / "ckpt.npz"
    with pytest.raises(FloatingPointError, match="meta-iteration 2"):
        optimize(_diverging_quadratic(), np.zeros(2), 5, 0.6, checkpoint=path, progress=False)
    f = _diverging_quadratic()
    result = optimize(f, np.zeros(2), 3, 0.1, checkpoint=path, resume=True, progress=False)
    assert result.resumed_from == 1
    assert f.calls == 2  # h_2 and h_3 with the new step; h_1's evaluation is kept

    # The same path by hand: Adam's state after one 0.6 step (moments and count kept),
    # then steps of 0.1.
    g = _diverging_quadratic()
    state = adam_update(adam_init(np.zeros(2)), g(np.zeros(2))[1], 0.6)
    losses = [g(np.zeros(2))[0]]
    for _ in range(2):
        value, grad = g(state.params)
        losses.append(value)
        state = adam_update(state, grad, 0.1)
    losses.append(g(state.params)[0])
    for a, b in zip(state, result.state):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(result.records["hyperloss"], losses)
    np.testing.assert_array_equal(result.step_sizes, [0.6, 0.1, 0.1])


def test_after_divergence_the_same_step_size_is_refused_before_any_work(tmp_path):
    path = tmp_path / "ckpt.npz"
    with pytest.raises(FloatingPointError):
        optimize(_diverging_quadratic(), np.zeros(2), 5, 0.6, checkpoint=path, progress=False)
    f = _diverging_quadratic()
    with pytest.raises(CheckpointError, match=r"diverged at meta-iteration 2 .*step size 0\.6"
                                              r".*smaller step size, e\.g\. 0\.3"):
        optimize(f, np.zeros(2), 5, 0.6, checkpoint=path, resume=True, progress=False)
    assert f.calls == 0


def test_divergence_of_the_initial_hyperparameters_says_a_step_size_cannot_help(tmp_path):
    with pytest.raises(FloatingPointError, match="meta-iteration 0") as info:
        optimize(_diverging_quadratic(), np.full(2, 5.0), 3, checkpoint=tmp_path / "c.npz",
                 progress=False)
    assert "initial hyperparameters" in str(info.value)
    assert not (tmp_path / "c.npz").exists()


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    ({"b1": 1.0}, "b1"), ({"b1": -0.1}, "b1"), ({"b2": 1.0}, "b2"), ({"b2": float("nan")}, "b2"),
    ({"eps": 0.0}, "eps"), ({"eps": -1e-8}, "eps"), ({"eps": float("inf")}, "eps"),
    ({"n_iters": 2.7}, "n_iters"), ({"n_iters": -1}, "n_iters"), ({"n_iters": True}, "n_iters"),
    ({"step_size": float("inf")}, "step_size"), ({"step_size": 0.0}, "step_size"),
    ({"step_size": "0.1"}, "step_size"),
])
def test_adam_settings_that_make_nan_or_truncate_are_refused(kwargs, name):
    kwargs = {"n_iters": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        optimize(lambda h: (0.0, np.zeros_like(h)), np.zeros(2), progress=False, **kwargs)


def test_numpy_integers_and_floats_are_accepted_settings():
    result = optimize(lambda h: (float(h @ h), 2 * h), np.ones(2), np.int64(2),
                      np.float64(0.1), b1=np.float32(0.5), progress=False)
    assert result.state.iteration == 2


# -- crafted and odd checkpoint files ------------------------------------------------------


def _rewrite_member(path, name, raw):
    """Replace member ``name`` of the .npz at ``path`` by the bytes ``raw``."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[name] = raw
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)


def _npy_header_only(shape, descr="<f8"):
    """A .npy header claiming ``shape`` followed by 64 bytes: far fewer than it claims."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + bytes(64)


@pytest.mark.parametrize("member, shape", [
    ("params.npy", (2**40,)), ("h0.npy", (2**40,)), ("records.npy", (2**37, 7)),
])
def test_a_header_claiming_a_huge_array_is_refused_before_reading(tmp_path, member, shape):
    _run(tmp_path, 2)
    path = tmp_path / "ckpt.npz"
    _rewrite_member(path, member, _npy_header_only(shape))
    with pytest.raises(CheckpointError, match="unusable") as info:
        _run(tmp_path, 4, resume=True)
    assert str(path) in str(info.value) and member.removesuffix(".npy") in str(info.value)


def _drop_record_key(path, key):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    keys = arrays["record_keys"].tolist()
    keep = [i for i, k in enumerate(keys) if k != key]
    arrays["record_keys"] = arrays["record_keys"][keep]
    arrays["records"] = np.ascontiguousarray(arrays["records"][:, keep])
    np.savez(path, **arrays)


@pytest.mark.parametrize("key", ["wall_time", "hyperloss"])
def test_a_checkpoint_lacking_a_record_field_is_refused_before_any_work(tmp_path, key):
    _run(tmp_path, 2)
    _drop_record_key(tmp_path / "ckpt.npz", key)
    problem = TinyProblem()
    with pytest.raises(CheckpointError, match=key):
        _run(tmp_path, 4, problem=problem, resume=True)
    assert problem.calls == 0


def test_declared_record_keys_are_checked_against_the_checkpoint_before_any_work(tmp_path):
    _run(tmp_path, 2)
    _drop_record_key(tmp_path / "ckpt.npz", "h_sum")
    problem = TinyProblem()
    with pytest.raises(CheckpointError, match="h_sum"):
        _run(tmp_path, 2, problem=problem, resume=True, record_keys=("h_sum", "value_again"))
    assert problem.calls == 0


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _within(seconds):
    """Raise _Timeout in the body after ``seconds`` (SIGALRM interrupts a blocking open)."""
    def alarm(signum, frame):
        raise _Timeout
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_fifo_in_place_of_the_checkpoint_is_refused_without_waiting(tmp_path):
    path = tmp_path / "ckpt.npz"
    os.mkfifo(path)
    with _within(10):
        with pytest.raises(CheckpointError, match="not a regular file"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="not a regular file"):
            _run(tmp_path, 2, resume=True)
        with pytest.raises(CheckpointError, match="not a regular file"):
            _run(tmp_path, 2)  # nor is it replaced by a fresh run


# -- temporary files -------------------------------------------------------------------------

_KILLED_WRITER = """
import os, signal, sys
from hypergrad_fast.metaopt import atomic_write

def write(f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write)
"""


def test_a_temp_file_left_by_a_killed_writer_is_removed_at_the_next_start(tmp_path):
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "ckpt.npz")],
                          timeout=120)
    assert done.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".ckpt.npz.") and left.name.endswith(".tmp")
    dead_pid = left.name.split(".")[3]
    # Kept: a live writer's file (this process's), names not of our pattern, and the
    # dead writer's temporary file for another target than the checkpoint.
    keep = {f".ckpt.npz.{os.getpid()}.{'0' * 16}.tmp", ".ckpt.npz.notes.tmp", "other.tmp",
            f".other.npz.{dead_pid}.{'0' * 16}.tmp"}
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    _run(tmp_path, 1)
    assert {p.name for p in tmp_path.iterdir()} == keep | {"ckpt.npz"}
