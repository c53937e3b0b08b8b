"""The search experiment: a gradient-refined random (or grid) search of four
hyperparameters, on one machine or a Dask cluster.

S settings of a model on MNIST (logistic regression by default, or a tanh MLP),
each a point h = (log learning rate, logit momentum, log init scale, log L2) drawn
uniformly in those coordinates within the configured ranges (``--samples N``), or
the K^4 points of a grid (``--grid K``).  Every iteration uses the setting's one
learning rate and momentum; every parameter block starts at ``exp(log init scale)``
times one fixed normal draw and is penalised by ``0.5 exp(log L2) |x|^2``.

Each setting is then refined by ``meta_iters`` steps of Adam (its own state, step
size in the units of h) on its exact validation-loss hypergradient, which follows
from :func:`~hypergrad_fast.sweep`'s by the chain rule::

    d/d log lr      = alpha * sum_t d_alphas[t]
    d/d logit mom   = beta (1 - beta) * sum_t d_betas[t]
    d/d log scale   = sum_groups d_log_init_scales
    d/d log L2      = sum_groups d_meta

Meta-iteration i evaluates every setting still being refined in one sweep (with
``--workers N`` or ``--scheduler ADDRESS`` in chunks on a Dask cluster, else in this
process; the results are the same bit for bit on CPU workers), records its losses
and takes its Adam step.  A setting's refined point is the one of lowest validation
loss among those it visited, the start included.

A setting that fails (divergence: a non-finite loss, fixed-point overflow) gets a
status naming the reason and is not refined further; the other settings go on.
``checkpoint.npz`` (plain arrays and JSON text, written atomically) keeps every
setting's state after each sweep; ``--resume`` continues without redoing the
evaluations it holds, to the same final results.  If the scheduler is lost, the
settings whose chunks had finished are kept in the checkpoint too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..hypergrad import SchedulerLostError, sweep
from ..hypergrad._dask import connect, require_distributed
from ..metaopt import AdamState, adam_update, atomic_write
from ..models import MLP, LogisticRegression
from ._args import ConfigError, Experiment, int_at_least, widths
from ._runner import (BaseConfig, N_CLASSES, N_PIXELS, add_common_arguments, command_line,
                      data_stamp, load_splits, new_figure, prepare_out, print_summary,
                      save_figure, settings_from_args, write_results, open_checkpoint,
                      checkpoint_unusable)

__all__ = ["SearchConfig", "QUICK", "HYPERPARAMETERS", "starting_points", "to_sweep_inputs",
           "chain_rule", "run_search", "EXPERIMENT"]

NAME = "search"
#: Version of checkpoint.npz's layout.
CHECKPOINT_VERSION = 1
#: The coordinates of h, in order.
HYPERPARAMETERS = ("log_learning_rate", "logit_momentum", "log_init_scale", "log_l2")
#: Status of a setting still being refined, and of one refined to the end.
PENDING, OK = "pending", "ok"
MODELS = ("logreg", "mlp")


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


def _check_range(name, value, low, high):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (low < lo < hi < high and math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{name} must satisfy {low} < low < high < {high}, got "
                          f"({lo}, {hi})")
    return lo, hi


@dataclass(frozen=True)
class SearchConfig(BaseConfig):
    """Settings of the search: :class:`~._runner.BaseConfig`'s (``meta_iters`` Adam
    steps per setting, ``step_size`` in the units of h) and

    model: "logreg" (logistic regression) or "mlp" (tanh, ``hidden`` widths).
    samples: random settings drawn when ``grid`` is 0.
    grid: points per hyperparameter of a grid (grid**4 settings); 0: random samples.
    lr_range, momentum_range, init_scale_range, l2_range: (low, high) of the learning
        rate, the momentum decay, the initial scale and the L2 strength, in their own
        units; sampled uniformly in log (logit for the momentum) between them.
    device: where each sweep runs its settings, "cpu", "cuda" or "auto" (per worker).
    chunk_size: settings per task on a cluster (None: sweep's default).
    """

    NAME = NAME

    meta_iters: int = 5
    step_size: float = 0.2
    model: str = "logreg"
    hidden: tuple = (50,)
    samples: int = 64
    grid: int = 0
    lr_range: tuple = (0.01, 3.0)
    momentum_range: tuple = (0.5, 0.95)
    init_scale_range: tuple = (1e-3, 0.3)
    l2_range: tuple = (1e-6, 1e-2)
    device: str = "cpu"
    chunk_size: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.backend != "compiled":
            raise ConfigError(f"{NAME} runs on the sweep's compiled batched objective; "
                              f"backend must be 'compiled', got {self.backend!r}")
        if self.model not in MODELS:
            raise ConfigError(f"model must be one of {MODELS}, got {self.model!r}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.model == "mlp" and (not self.hidden or any(h < 1 for h in self.hidden)):
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        if self.grid == 1 or self.grid < 0:
            raise ConfigError(f"grid must be 0 (random samples) or >= 2 points per "
                              f"hyperparameter, got {self.grid}")
        for name, low, high in (("lr_range", 0, math.inf), ("momentum_range", 0, 1),
                                ("init_scale_range", 0, math.inf),
                                ("l2_range", 0, math.inf)):
            object.__setattr__(self, name, _check_range(name, getattr(self, name), low,
                                                        high))
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def n_settings(self) -> int:
        return self.grid ** 4 if self.grid else self.samples

    @property
    def layer_sizes(self) -> tuple:
        hidden = self.hidden if self.model == "mlp" else ()
        return (N_PIXELS, *hidden, N_CLASSES)

    def to_json(self) -> dict:
        d = super().to_json()
        if self.model != "mlp":
            del d["hidden"]
        del d["samples" if self.grid else "grid"]
        d["n_settings"] = self.n_settings
        d["layer_sizes"] = list(self.layer_sizes)
        return d

    def run_key(self, data_stamp: str) -> dict:
        """What a checkpoint must match: every setting that changes a result (all of
        them but the chunk size, which only changes how the work is cut), with the
        data known by their content."""
        d = self.to_json()
        del d["mnist_source"], d["chunk_size"]
        return {"experiment": self.NAME, **d, "data_sha256": data_stamp}


#: The --quick settings (about 10 s on 2 cores in process).
QUICK = {"samples": 16, "iters": 50, "meta_iters": 3, "n_train": 1000}


# --------------------------------------------------------------------------
# Hyperparameters: starting points, sweep inputs, chain rule
# --------------------------------------------------------------------------


def _logit(p):
    return math.log(p / (1.0 - p))


def _bounds(config: SearchConfig) -> np.ndarray:
    """(4, 2) low and high of each coordinate of h."""
    lr, mom, scale, l2 = (config.lr_range, config.momentum_range, config.init_scale_range,
                          config.l2_range)
    return np.array([[math.log(lr[0]), math.log(lr[1])],
                     [_logit(mom[0]), _logit(mom[1])],
                     [math.log(scale[0]), math.log(scale[1])],
                     [math.log(l2[0]), math.log(l2[1])]])


def starting_points(config: SearchConfig) -> np.ndarray:
    """(S, 4) starting h: ``samples`` uniform draws (``default_rng(seed)``) in the
    bounds, or the grid's points (``grid`` evenly spaced per coordinate, the last
    coordinate varying fastest)."""
    bounds = _bounds(config)
    if config.grid:
        axes = [np.linspace(lo, hi, config.grid) for lo, hi in bounds]
        return np.array(list(itertools.product(*axes)), dtype=np.float64)
    rng = np.random.default_rng(config.seed)
    return bounds[:, 0] + (bounds[:, 1] - bounds[:, 0]) * rng.random((config.samples, 4))


def natural(h) -> dict:
    """h (4,) as {learning_rate, momentum, init_scale, l2} in their own units."""
    h = np.asarray(h, dtype=np.float64)
    return {"learning_rate": float(np.exp(h[0])), "momentum": float(1 / (1 + np.exp(-h[1]))),
            "init_scale": float(np.exp(h[2])), "l2": float(np.exp(h[3]))}


def to_sweep_inputs(h, iters: int, n_groups: int):
    """(alphas (n, T), betas (n, T), log_init_scales (n, G), log_l2 (n, G)) for sweep
    from n points h (n, 4)."""
    h = np.asarray(h, dtype=np.float64)
    alphas = np.repeat(np.exp(h[:, 0:1]), iters, axis=1)
    betas = np.repeat(1.0 / (1.0 + np.exp(-h[:, 1:2])), iters, axis=1)
    return alphas, betas, np.repeat(h[:, 2:3], n_groups, axis=1), \
        np.repeat(h[:, 3:4], n_groups, axis=1)


def chain_rule(h, d_alphas, d_betas, d_log_init_scales, d_meta) -> np.ndarray:
    """(n, 4) d valid_loss / d h at the points h (n, 4) from a sweep's hypergradients
    of :func:`to_sweep_inputs` (n, T), (n, T), (n, G), (n, G)."""
    h = np.asarray(h, dtype=np.float64)
    alpha = np.exp(h[:, 0])
    beta = 1.0 / (1.0 + np.exp(-h[:, 1]))
    return np.stack([alpha * d_alphas.sum(axis=1), beta * (1.0 - beta) * d_betas.sum(axis=1),
                     d_log_init_scales.sum(axis=1), d_meta.sum(axis=1)], axis=1)


# --------------------------------------------------------------------------
# The state of every setting, and its checkpoint
# --------------------------------------------------------------------------

#: Per-evaluation records, (S, meta_iters + 1), NaN where not evaluated.
RECORDS = ("valid_loss", "valid_error", "test_loss", "test_error")


class SearchState:
    """Every setting's progress: ``h`` (S, 4) its next point to evaluate, Adam's ``m``
    and ``v`` (S, 4), ``evals`` (S,) evaluations done, ``status`` (S,) str, and per
    evaluation the point ``points`` (S, K + 1, 4), its hypergradient ``grads`` and the
    :data:`RECORDS` (S, K + 1)."""

    def __init__(self, h0, meta_iters):
        n = len(h0)
        self.h0 = np.array(h0, dtype=np.float64)
        self.h = self.h0.copy()
        self.m = np.zeros_like(self.h)
        self.v = np.zeros_like(self.h)
        self.evals = np.zeros(n, dtype=np.int64)
        self.status = [PENDING] * n
        self.points = np.full((n, meta_iters + 1, 4), np.nan)
        self.grads = np.full((n, meta_iters + 1, 4), np.nan)
        self.records = {k: np.full((n, meta_iters + 1), np.nan) for k in RECORDS}
        self.meta_iters = meta_iters

    def next_batch(self):
        """(meta-iteration i, settings) of the next sweep: the pending settings with the
        fewest evaluations, i; None when every setting is done."""
        pending = np.array([s == PENDING for s in self.status])
        if not pending.any():
            return None
        i = int(self.evals[pending].min())
        return i, np.flatnonzero(pending & (self.evals == i))

    def apply(self, i, idx, out, rows, model, data, step_size):
        """Record a sweep's ``rows`` (positions in ``out``) for settings ``idx`` at
        meta-iteration i, and take each one's Adam step (or end it)."""
        ok = out.ok[rows]
        for s, r in zip(idx[~ok], rows[~ok]):
            self.status[s] = (f"failed: {out.status[r]}" if i == 0 else
                              f"stopped at meta-iteration {i}: {out.status[r]}")
        idx, rows = idx[ok], rows[ok]
        if not len(idx):
            return
        grads = chain_rule(self.h[idx], out.d_alphas[rows], out.d_betas[rows],
                           out.d_log_init_scales[rows], out.d_meta[rows])
        self.points[idx, i] = self.h[idx]
        self.grads[idx, i] = grads
        self.records["valid_loss"][idx, i] = out.valid_loss[rows]
        for s, r in zip(idx, rows):
            x = out.x_final[r]
            self.records["valid_error"][s, i] = model.error(x, data.valid.inputs,
                                                            data.valid.targets)
            self.records["test_loss"][s, i] = float(model.loss(x, data.test.inputs,
                                                               data.test.targets))
            self.records["test_error"][s, i] = model.error(x, data.test.inputs,
                                                           data.test.targets)
        self.evals[idx] = i + 1
        if i == self.meta_iters:
            for s in idx:
                self.status[s] = OK
            return
        # Each setting's own Adam; all of them here have taken i steps.
        step = adam_update(AdamState(self.h[idx], self.m[idx], self.v[idx], i), grads,
                           step_size)
        self.h[idx], self.m[idx], self.v[idx] = step.params, step.m, step.v

    # checkpoint.npz
    _ARRAYS = ("h0", "h", "m", "v", "evals", "points", "grads")

    def save(self, path, run_key: dict) -> None:
        arrays = {"format_version": np.array(CHECKPOINT_VERSION, dtype=np.int64),
                  "run_key": np.array(json.dumps(run_key, sort_keys=True)),
                  "status": np.array(json.dumps(self.status))}
        arrays.update({k: getattr(self, k) for k in self._ARRAYS})
        arrays.update({f"record_{k}": v for k, v in self.records.items()})
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path, run_key: dict, h0, meta_iters) -> Optional["SearchState"]:
        """The state in the checkpoint at ``path``; None if there is none.
        CheckpointError naming the file when it is unreadable, malformed or was
        written with other settings."""
        data = open_checkpoint(path, run_key, CHECKPOINT_VERSION)
        if data is None:
            return None

        def bad(why):
            return checkpoint_unusable(path, why)

        state = cls(h0, meta_iters)
        try:
            for k in cls._ARRAYS:
                value = data[k]
                want = getattr(state, k)
                if value.shape != want.shape or value.dtype != want.dtype:
                    raise ValueError(f"{k} has shape {value.shape} and dtype {value.dtype}, "
                                     f"expected {want.shape} {want.dtype}")
                setattr(state, k, value)
            for k in RECORDS:
                value = data[f"record_{k}"]
                if value.shape != state.records[k].shape or value.dtype.kind != "f":
                    raise ValueError(f"record {k} has shape {value.shape}")
                state.records[k] = value
            status = json.loads(str(data["status"]))
            if not (isinstance(status, list) and len(status) == len(h0)
                    and all(isinstance(s, str) for s in status)):
                raise ValueError("status is not one string per setting")
            state.status = status
        except (KeyError, TypeError, ValueError) as err:
            raise bad(f"incomplete or malformed ({err})") from None
        if not np.array_equal(state.h0, np.asarray(h0, dtype=np.float64)):
            raise bad("its starting points differ from this run's")
        return state


# --------------------------------------------------------------------------
# Results and the figure
# --------------------------------------------------------------------------


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _point(state, s, i) -> dict:
    """Setting s's evaluation i: its hyperparameters and losses."""
    out = {**natural(state.points[s, i]), "meta_iteration": int(i)}
    out.update({k: _finite_or_none(state.records[k][s, i]) for k in RECORDS})
    return out


def setting_results(state) -> list:
    """Per setting: index, status, ``start`` and ``refined`` (the evaluation of lowest
    validation loss; None where the start failed) and the validation-loss path."""
    out = []
    for s in range(len(state.h0)):
        loss = state.records["valid_loss"][s]
        done = np.flatnonzero(np.isfinite(loss))
        entry = {"index": s, "status": state.status[s],
                 "start_hyperparameters": natural(state.h0[s]),
                 "start": _point(state, s, 0) if 0 in done else None,
                 "refined": None,
                 "valid_loss_path": [_finite_or_none(v) for v in loss[:state.evals[s]]]}
        if len(done):
            entry["refined"] = _point(state, s, int(done[np.argmin(loss[done])]))
        out.append(entry)
    return out


def summarise(settings: list) -> dict:
    """The best refined and the best starting setting, counts and the median gain."""
    started = [e for e in settings if e["start"] is not None]
    failed = sum(1 for e in settings if e["status"] != OK)
    summary = {"n_settings": len(settings), "n_failed_or_stopped": failed,
               "n_failed_at_start": len(settings) - len(started)}
    if not started:
        return summary
    best = min(started, key=lambda e: e["refined"]["valid_loss"])
    best_start = min(started, key=lambda e: e["start"]["valid_loss"])
    gains = [e["start"]["valid_loss"] - e["refined"]["valid_loss"] for e in started]
    summary.update({
        "best_setting": best["index"],
        "best_refined": best["refined"],
        "best_start_setting": best_start["index"],
        "best_start": best_start["start"],
        "n_improved": sum(1 for g in gains if g > 0),
        "median_valid_loss_gain": float(np.median(gains)),
    })
    return summary


def plot_search(path, settings: list, meta_iters: int):
    """Left: validation loss of every setting before and after refinement, settings
    sorted by their starting loss; right: the same against the learning rate."""
    started = sorted((e for e in settings if e["start"] is not None),
                     key=lambda e: e["start"]["valid_loss"])
    fig = new_figure(figsize=(11, 4.2), layout="constrained")
    ax_rank, ax_lr = fig.subplots(1, 2, sharey=True)
    rank = np.arange(len(started))
    before = np.array([e["start"]["valid_loss"] for e in started])
    after = np.array([e["refined"]["valid_loss"] for e in started])
    ax_rank.vlines(rank, after, before, color="grey", lw=0.6)
    ax_rank.plot(rank, before, "o", ms=3.5, color="tab:blue", label="sampled")
    ax_rank.plot(rank, after, "o", ms=3.5, color="tab:orange",
                 label=f"refined (best of {meta_iters} meta-iterations)")
    ax_rank.set_xlabel("setting, sorted by sampled validation loss")
    ax_rank.set_ylabel("validation loss after training (nats per example)")
    ax_rank.set_yscale("log")
    lr0 = np.array([e["start"]["learning_rate"] for e in started])
    lr1 = np.array([e["refined"]["learning_rate"] for e in started])
    for a, b, c, d in zip(lr0, lr1, before, after):
        ax_lr.plot([a, b], [c, d], color="grey", lw=0.6)
    ax_lr.plot(lr0, before, "o", ms=3.5, color="tab:blue", label="sampled")
    ax_lr.plot(lr1, after, "o", ms=3.5, color="tab:orange", label="refined")
    failed = [e for e in settings if e["start"] is None]
    if failed and len(before):
        top = float(np.max(before))
        ax_lr.plot([e["start_hyperparameters"]["learning_rate"] for e in failed],
                   [top] * len(failed), "x", color="tab:red",
                   label=f"failed at the start ({len(failed)})")
    ax_lr.set_xscale("log")
    ax_lr.set_xlabel("learning rate")
    for ax in (ax_rank, ax_lr):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Gradient-refined search: {len(settings)} settings, validation loss "
                 "before and after refinement", fontsize=10)
    save_figure(fig, path)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


FILES = {
    "results": "results.json",
    "checkpoint": "checkpoint.npz",
    "plot": "search_valid_loss.png",
}


def _where(workers, scheduler) -> str:
    if scheduler is not None:
        return f"the Dask cluster at {scheduler}"
    if workers is not None:
        return f"a local Dask cluster of {workers} worker processes"
    return "this process"


def run_search(config: SearchConfig, out_dir, *, resume: bool = False, progress: bool = True,
               workers: Optional[int] = None, scheduler: Optional[str] = None,
               log: Optional[Callable] = None, command: str = "") -> dict:
    """Run the search into ``out_dir`` (in this process, on a local cluster of
    ``workers`` processes, or on the cluster at ``scheduler``); returns the results
    dict (results.json), after writing checkpoint.npz after every sweep and the plot.
    ``resume`` continues from checkpoint.npz.  Raises
    :class:`~hypergrad_fast.SchedulerLostError` after saving what had finished."""
    log = log or (lambda msg: None)
    if workers is not None or scheduler is not None:
        require_distributed("--workers/--scheduler")  # before any work
    paths = prepare_out(out_dir, FILES)
    start = time.perf_counter()
    data = load_splits(config)
    stamp = data_stamp(data)
    key = config.run_key(stamp)
    h0 = starting_points(config)
    state = (SearchState.load(paths["checkpoint"], key, h0, config.meta_iters)
             if resume else None)
    reused = 0 if state is None else int(state.evals.sum())
    state = state or SearchState(h0, config.meta_iters)
    model = (LogisticRegression(N_PIXELS, N_CLASSES) if config.model == "logreg"
             else MLP(config.layer_sizes, "tanh"))
    kind = "grid" if config.grid else "random"
    log(f"{NAME}: {model!r}, {config.n_settings} {kind} settings of (learning rate, "
        f"momentum, init scale, L2), T = {config.iters}, {config.meta_iters} "
        f"meta-iterations each, in {_where(workers, scheduler)}"
        + (f" ({reused} evaluations from the checkpoint)" if reused else ""))
    n_groups = model.layout.n_groups
    sweep_seconds = 0.0
    from tqdm.auto import tqdm
    total = config.n_settings * (config.meta_iters + 1)
    with connect(workers, scheduler) as client, \
            tqdm(total=total, initial=reused, desc="evaluations", unit="setting",
                 leave=False, disable=not progress) as bar:
        while (batch := state.next_batch()) is not None:
            i, idx = batch
            tick = time.perf_counter()
            try:
                inputs = to_sweep_inputs(state.h[idx], config.iters, n_groups)
                out = sweep(model, data, *inputs, batch_size=config.batch_size, seed=config.seed,
                            x0_noise=config.seed, device=config.device, on_error="report",
                            client=client, chunk_size=config.chunk_size,
                            progress=progress and client is not None)
            except SchedulerLostError as err:
                done = np.asarray(err.finished, dtype=np.int64)
                if len(done) and err.result is not None:
                    state.apply(i, idx[done], err.result, done, model, data, config.step_size)
                    state.save(paths["checkpoint"], key)
                raise
            sweep_seconds += time.perf_counter() - tick
            state.apply(i, idx, out, np.arange(len(idx)), model, data, config.step_size)
            state.save(paths["checkpoint"], key)
            bar.update(len(idx))
            losses = state.records["valid_loss"][idx, i]
            best = np.nanmin(losses) if np.isfinite(losses).any() else float("nan")
            log(f"  meta-iteration {i}: {len(idx)} settings in "
                f"{time.perf_counter() - tick:.1f} s, best valid loss {best:.4f}, "
                f"{int(np.count_nonzero(~out.ok))} failed")
            for b in np.flatnonzero(~out.ok):
                log(f"    setting {idx[b]}: {out.status[b]}")

    settings = setting_results(state)
    summary = summarise(settings)
    plot_search(paths["plot"], settings, config.meta_iters)
    figures = [(FILES["plot"], "validation loss of every setting as sampled and after "
                               "hypergradient refinement, by rank and by learning rate")]
    return write_results(
        paths["results"], experiment=NAME, command=command, config=config,
        data_sha256=stamp, summary=summary, figures=figures, settings=settings,
        runtime={"sweeps_s": sweep_seconds, "this_invocation_s": time.perf_counter() - start,
                 "evaluations_from_checkpoint": reused,
                 "ran_in": _where(workers, scheduler)},
        files={k: str(p) for k, p in paths.items()})


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def value_range(text):
    """An argument ``LOW,HIGH``: two numbers."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers LOW,HIGH like 0.01,3, got "
                                         f"{text!r}") from None
    return low, high


def add_parser(sub):
    """The ``search`` subcommand's parser, added to ``sub``."""
    d = SearchConfig()
    p = sub.add_parser(
        NAME, conflict_handler="resolve",
        help="gradient-refined random or grid search of learning rate, momentum, init "
             "scale and L2, in process or on a Dask cluster (MNIST)",
        description=(
            "Sample settings of (learning rate, momentum, init scale, L2) for a model on "
            "MNIST, refine each by a few meta-iterations of Adam on its exact "
            "validation-loss hypergradient, and report every setting's starting and "
            "refined hyperparameters and losses. Each meta-iteration is one batched "
            "sweep, on a Dask cluster with --workers or --scheduler. Writes "
            "results.json, a PNG plot and checkpoint.npz (after every sweep) into --out."))
    small = add_common_arguments(p, NAME, d, QUICK, "10 s on 2 cores")
    p.add_argument("--backend", choices=("compiled",), default=d.backend,
                   help="derivatives of the training loss: the sweep's compiled batched "
                        "objective only (default: %(default)s)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--samples", type=int_at_least(1), default=None, metavar="N",
                       help=f"random settings (default: {d.samples})")
    which.add_argument("--grid", type=int_at_least(2), default=None, metavar="K",
                       help="a grid of K points per hyperparameter (K^4 settings) instead "
                            "of random samples")
    p.add_argument("--model", choices=MODELS, default=None,
                   help=f"logistic regression or a tanh MLP (default: {d.model})")
    for flag, name, what in (("--lr-range", "lr_range", "learning rate"),
                             ("--momentum-range", "momentum_range", "momentum decay"),
                             ("--init-scale-range", "init_scale_range", "initial scale"),
                             ("--l2-range", "l2_range", "L2 strength")):
        low, high = getattr(d, name)
        p.add_argument(flag, dest=name, type=value_range, default=None, metavar="LOW,HIGH",
                       help=f"range of the {what} (default: {low:g},{high:g})")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="where each sweep's settings train: auto is cuda on workers "
                        f"that have a GPU (default: {d.device})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int_at_least(1), default=None, metavar="N",
                       help="run the sweeps on a local Dask cluster of N worker "
                            "processes (needs dask.distributed)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the sweeps on the Dask cluster at ADDRESS, e.g. "
                            "tcp://10.0.0.1:8786 (needs dask.distributed)")
    p.add_argument("--chunk-size", type=int_at_least(1), default=None, metavar="N",
                   help="settings per task on a cluster (default: two chunks per worker "
                        "thread)")
    small.add_argument("--hidden", type=widths, default=None, metavar="W,W,...",
                       help=f"hidden layer widths of --model mlp (default: "
                            f"{','.join(map(str, d.hidden))})")
    return p


_EXTRA = ("samples", "grid", "model", "hidden", "lr_range", "momentum_range",
          "init_scale_range", "l2_range", "device", "chunk_size")


def config_from_args(args) -> SearchConfig:
    """The settings of parsed ``args`` (--quick's apply to what was not given)."""
    return SearchConfig(**settings_from_args(args, QUICK, extra=_EXTRA))


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    config = config_from_args(args)
    start = time.perf_counter()
    try:
        results = run_search(config, args.out, resume=args.resume,
                             progress=not args.no_progress, workers=args.workers,
                             scheduler=args.scheduler, log=print,
                             command=command_line(args))
    except ImportError as err:  # --workers or --scheduler without dask.distributed
        raise ConfigError(str(err)) from None
    except SchedulerLostError as err:
        print(f"hypergrad-fast {NAME}: {err}\nThe checkpoint in {args.out} keeps every "
              "finished evaluation; rerun with --resume to continue.", file=sys.stderr)
        return 1
    s = results["summary"]
    rows = [("settings (failed or stopped)",
             f"{s['n_settings']} ({s['n_failed_or_stopped']})")]
    if "best_refined" in s:
        b, b0 = s["best_refined"], s["best_start"]
        rows += [("best sampled: valid / test loss",
                  f"{b0['valid_loss']:.4f} / {b0['test_loss']:.4f} "
                  f"(setting {s['best_start_setting']})"),
                 ("best refined: valid / test loss",
                  f"{b['valid_loss']:.4f} / {b['test_loss']:.4f} "
                  f"(setting {s['best_setting']})"),
                 ("  learning rate, momentum", f"{b['learning_rate']:.4g}, "
                                               f"{b['momentum']:.4g}"),
                 ("  init scale, L2", f"{b['init_scale']:.4g}, {b['l2']:.4g}"),
                 ("  test error", f"{100 * b['test_error']:.1f}%"),
                 ("settings improved by refinement", f"{s['n_improved']}")]
    print_summary(results, time.perf_counter() - start, rows)
    if "best_refined" not in s:
        print(f"hypergrad-fast {NAME}: every setting failed at its start; narrow the "
              "ranges (--lr-range first)", file=sys.stderr)
        return 1
    return 0


EXPERIMENT = Experiment(NAME, add_parser, run_cli)
