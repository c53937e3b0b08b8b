"""The chaos experiment: where exact hypergradients stop being useful.

One global learning rate on a log grid, a fixed momentum, a tanh MLP trained for T
iterations: for every grid point, several seeds (each the initial-weight draw and
the minibatch order) and at least two horizons T, the validation loss after
training and its exact hypergradient with respect to the log learning rate,

    d valid_loss / d log(alpha) = alpha * sum_t d valid_loss / d alpha_t,

from :func:`hypergrad_fast.sweep` (one sweep per (seed, T) trains the whole grid
together).  Small rates give a smooth hypergradient; near the best rate training is
chaotic and the hypergradient swings by orders of magnitude between neighbouring
grid points (Maclaurin, Duvenaud & Adams 2015, section 6, "limitations").

The roughness of a region of the grid is the mean absolute difference of the
seed-mean hypergradient between neighbouring grid points divided by its mean
absolute value there (:func:`roughness`); the summary compares the lowest quarter
of the grid with the points within 0.5 (natural log) of the best rate.

Finished (seed, T) sweeps are kept in ``checkpoint.npz`` (plain arrays and JSON
text, no pickle); ``--resume`` reuses them and gives the same results.  A grid
point whose training overflows is recorded as NaN (``null`` in results.json) and
listed; it never stops the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np

from ..hypergrad import sweep
from ..metaopt import atomic_write
from ..models import MLP
from ._args import ConfigError, Experiment, finite_float, int_at_least, widths
from ._runner import (BaseConfig, MlpSizes, add_common_arguments, command_line, data_stamp,
                      load_splits, new_figure, prepare_out, print_summary, save_figure,
                      settings_from_args, write_results, open_checkpoint,
                      checkpoint_unusable)

__all__ = ["ChaosConfig", "QUICK", "GridSweep", "roughness", "log_learning_rates",
           "analyse_horizon", "sweep_grid", "run_chaos", "EXPERIMENT"]

NAME = "chaos"
#: Version of checkpoint.npz's layout.
CHECKPOINT_VERSION = 1
#: Width (natural log of the learning rate) on either side of the best rate that
#: makes up the "near best" region.
NEAR_BEST = 0.5
#: The "small learning rate" region: this fraction of the grid's span, from its low end.
SMALL_FRACTION = 0.25
#: Grid points at least, so that the lowest quarter holds two neighbours or more.
MIN_GRID_POINTS = 8
#: Slack when comparing grid points with region edges (the grid is a linspace).
_EDGE_SLACK = 1e-9


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosConfig(MlpSizes, BaseConfig):
    """Settings of the chaos experiment: :class:`~._runner.BaseConfig`'s data sizes,
    ``batch_size``, ``seed`` and ``data``, and

    hidden: hidden layer widths (units) of the tanh MLP.
    horizons: the training lengths T (iterations), at least two, kept sorted;
        ``iters`` is always the largest (any value given for it is replaced).
    n_seeds: seeds K; seed k (from ``seed``) draws the initial weights
        (``default_rng(seed + k).standard_normal``) and orders the minibatches.
    grid_points, log_lr_min, log_lr_max: the grid of natural-log learning rates
        (``numpy.linspace``); its spacing must be at most 0.5 so that the region
        within 0.5 of the best rate holds two grid points or more.
    momentum: the fixed momentum decay beta, in (0, 1).
    init_log_scale: log standard deviation of every block's initial draw.

    ``meta_iters`` and ``step_size`` do not apply (there is no meta-optimisation)
    and are left out of :meth:`to_json`; ``backend`` must be "compiled" (the sweep's
    batched objective).
    """

    NAME = NAME

    iters: int = 100
    hidden: tuple = (50, 50, 50)
    horizons: tuple = (50, 100)
    n_seeds: int = 5
    grid_points: int = 41
    log_lr_min: float = -4.0
    log_lr_max: float = 2.0
    momentum: float = 0.9
    init_log_scale: float = -2.0

    def __post_init__(self):
        try:
            horizons = tuple(sorted(int(t) for t in self.horizons))
        except (TypeError, ValueError):
            raise ConfigError(f"horizons must be integers, got {self.horizons!r}") from None
        if len(horizons) < 2 or len(set(horizons)) != len(horizons) or horizons[0] < 1:
            raise ConfigError(f"horizons must be at least two different iteration counts "
                              f">= 1, got {list(self.horizons)}")
        object.__setattr__(self, "horizons", horizons)
        object.__setattr__(self, "iters", horizons[-1])
        super().__post_init__()
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if self.backend != "compiled":
            raise ConfigError(f"{NAME} runs on the sweep's compiled batched objective; "
                              f"backend must be 'compiled', got {self.backend!r}")
        if self.n_seeds < 1:
            raise ConfigError(f"n_seeds must be >= 1, got {self.n_seeds}")
        if self.grid_points < MIN_GRID_POINTS:
            raise ConfigError(f"grid_points must be >= {MIN_GRID_POINTS}, got "
                              f"{self.grid_points}")
        for name in ("log_lr_min", "log_lr_max", "init_log_scale"):
            if not np.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)}")
        if not self.log_lr_min < self.log_lr_max:
            raise ConfigError(f"log_lr_min must be below log_lr_max, got {self.log_lr_min} "
                              f">= {self.log_lr_max}")
        spacing = (self.log_lr_max - self.log_lr_min) / (self.grid_points - 1)
        if spacing > NEAR_BEST + _EDGE_SLACK:
            need = math.ceil((self.log_lr_max - self.log_lr_min) / NEAR_BEST) + 1
            raise ConfigError(f"the grid spacing {spacing:.3g} (natural log) is above "
                              f"{NEAR_BEST}, so no neighbour may lie within {NEAR_BEST} of "
                              f"the best rate; use {need} grid points or more, or a "
                              f"narrower range")
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in (0, 1), got {self.momentum}")

    @property
    def seeds(self) -> tuple:
        """The K seeds: ``seed``, ``seed + 1``, ..."""
        return tuple(range(self.seed, self.seed + self.n_seeds))

    def to_json(self) -> dict:
        """All settings as a JSON-able dict, without the meta-optimiser's (unused)
        ``meta_iters`` and ``step_size``, and ``iters`` (the largest horizon)."""
        d = super().to_json()
        for unused in ("meta_iters", "step_size", "iters"):
            del d[unused]
        return d

    def run_key(self, data_stamp: str) -> dict:
        """What a checkpoint must match: every setting that changes one (seed, T)
        sweep's numbers, with the data known by their content.  Horizons, seeds and
        their number are not part of it: each stored sweep names its own (T, seed),
        so a run with more seeds or horizons reuses the sweeps it shares."""
        d = self.to_json()
        for free in ("horizons", "n_seeds", "seed", "mnist_source"):
            del d[free]
        return {"experiment": self.NAME, **d, "data_sha256": data_stamp}


#: The --quick settings: a smaller network, shorter horizons and two seeds (measured
#: at 12-14 s wall on a 2-core machine, the default run at 110 s).
QUICK = {"hidden": (20, 20), "horizons": (25, 50), "n_seeds": 2}


def log_learning_rates(config: ChaosConfig) -> np.ndarray:
    """The grid: (grid_points,) natural-log learning rates, evenly spaced."""
    return np.linspace(config.log_lr_min, config.log_lr_max, config.grid_points)


# --------------------------------------------------------------------------
# Roughness and the summary of one horizon
# --------------------------------------------------------------------------


def roughness(values) -> float:
    """Mean absolute difference between neighbours of ``values`` (1-D, in grid
    order) divided by their mean absolute value.

    0 for a constant sequence, 2 for one that flips sign at every point
    (``[1, -1, 1, -1]``).  Non-finite entries (diverged points) are left out:
    differences touching them and their own magnitude.  NaN when no neighbouring
    pair is finite or every finite value is 0.  ValueError for fewer than two values.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"roughness needs a 1-D sequence of two values or more, got shape "
                         f"{v.shape}")
    finite = np.isfinite(v)
    pairs = finite[1:] & finite[:-1]
    if not pairs.any():
        return float("nan")
    with np.errstate(over="ignore"):
        steps = np.abs(np.diff(v))[pairs]
        scale = float(np.mean(np.abs(v[finite])))
        change = float(np.mean(steps))
    if scale == 0.0 or not (np.isfinite(scale) and np.isfinite(change)):
        return float("nan")
    return change / scale


def _seed_mean(per_seed: np.ndarray) -> np.ndarray:
    """Mean over seeds (axis 0), NaN at every grid point where any seed diverged."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.mean(per_seed, axis=0)


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _json_list(array) -> list:
    """``array`` as nested lists of floats, None where not finite (results.json
    forbids NaN)."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 0:
        return _finite_or_none(a)
    return [_json_list(row) for row in a]


def analyse_horizon(log_lrs, valid_loss, hypergradient) -> dict:
    """Best rate and roughness of one horizon from per-seed (K, P) validation losses
    and hypergradients (NaN where a setting diverged) on the grid ``log_lrs`` (P,).

    Returns (NumPy values; None where undefined): ``valid_loss`` and
    ``hypergradient`` (seed means, NaN where any seed diverged),
    ``best_log_learning_rate`` (the grid point of lowest seed-mean validation loss)
    and ``best_valid_loss``, ``best_at_grid_edge`` (the best is the first or last
    point: the grid may not reach past it), ``small_lr_region`` and
    ``near_best_region`` ([low, high] log rates), ``roughness_small_lr`` (over the
    lowest quarter of the grid's span), ``roughness_near_best`` (over the points
    within 0.5 of the best), ``roughness_ratio`` (near best / small rates), and
    ``diverged_points`` (grid points where some seed diverged).
    """
    log_lrs = np.asarray(log_lrs, dtype=np.float64)
    valid_loss = np.asarray(valid_loss, dtype=np.float64)
    hypergradient = np.asarray(hypergradient, dtype=np.float64)
    if valid_loss.shape != hypergradient.shape or valid_loss.shape[-1:] != log_lrs.shape:
        raise ValueError(f"valid_loss {valid_loss.shape} and hypergradient "
                         f"{hypergradient.shape} must both be (seeds, {len(log_lrs)})")
    mean_loss, mean_grad = _seed_mean(valid_loss), _seed_mean(hypergradient)
    ok = np.isfinite(mean_loss) & np.isfinite(mean_grad)
    low, high = log_lrs[0], log_lrs[-1]
    small_edge = low + SMALL_FRACTION * (high - low)
    small = log_lrs <= small_edge + _EDGE_SLACK
    out = {"valid_loss": mean_loss, "hypergradient": mean_grad,
           "best_log_learning_rate": None, "best_valid_loss": None,
           "best_at_grid_edge": None,
           "small_lr_region": [float(low), float(small_edge)], "near_best_region": None,
           "roughness_small_lr": _finite_or_none(roughness(mean_grad[small])),
           "roughness_near_best": None, "roughness_ratio": None,
           "diverged_points": int(np.count_nonzero(~ok))}
    if not ok.any():
        return out
    best = int(np.flatnonzero(ok)[np.argmin(mean_loss[ok])])
    best_lr = float(log_lrs[best])
    near = np.abs(log_lrs - best_lr) <= NEAR_BEST + _EDGE_SLACK
    near_best = _finite_or_none(roughness(mean_grad[near]))
    small_lr = out["roughness_small_lr"]
    ratio = (near_best / small_lr if near_best is not None and small_lr not in (None, 0.0)
             else None)
    out.update(best_log_learning_rate=best_lr, best_valid_loss=float(mean_loss[best]),
               best_at_grid_edge=best in (0, len(log_lrs) - 1),
               near_best_region=[float(log_lrs[near][0]), float(log_lrs[near][-1])],
               roughness_near_best=near_best, roughness_ratio=ratio)
    return out


# --------------------------------------------------------------------------
# One (seed, T) sweep over the grid, diverged settings isolated
# --------------------------------------------------------------------------


class GridSweep(NamedTuple):
    """One (seed, T) sweep over the grid: ``valid_loss`` and ``hypergradient``
    (d valid_loss / d log learning rate) (P,), NaN where the setting diverged;
    ``errors`` {grid index: the error that stopped it}; ``seconds`` its wall time."""

    valid_loss: np.ndarray
    hypergradient: np.ndarray
    errors: dict
    seconds: float


def sweep_grid(model, data, log_lrs, iters: int, seed: int, *, momentum: float,
               init_log_scale: float, batch_size: int) -> GridSweep:
    """Train ``model`` at every learning rate exp(``log_lrs``) for ``iters``
    iterations (fixed ``momentum``; initial draw and minibatch order from ``seed``)
    in one :func:`~hypergrad_fast.sweep`, and return each point's validation loss
    and d valid_loss / d log learning rate.

    A batch that overflows (FloatingPointError or OverflowError) is split in halves
    and each half run again, down to single settings, which are then recorded as
    diverged (NaN, with the error).  Each row of a sweep equals a separate run bit
    for bit, so the finite results do not depend on how the grid was split.
    """
    start = time.perf_counter()
    rates = np.exp(np.asarray(log_lrs, dtype=np.float64))
    loss = np.full(len(rates), np.nan)
    grad = np.full(len(rates), np.nan)
    errors = {}

    def run(idx):
        alphas = np.repeat(rates[idx, None], iters, axis=1)
        betas = np.full(alphas.shape, momentum)
        try:
            out = sweep(model, data, alphas, betas, init_log_scale, batch_size=batch_size,
                        seed=seed, x0_noise=seed, device="cpu")
        except (FloatingPointError, OverflowError) as err:
            if len(idx) == 1:
                errors[int(idx[0])] = f"{type(err).__name__}: {err}"
                return
            half = len(idx) // 2
            run(idx[:half])
            run(idx[half:])
            return
        with np.errstate(over="ignore", invalid="ignore"):
            slope = out.d_alphas.sum(axis=1) * rates[idx]
        for row, i in enumerate(idx):
            if np.isfinite(out.valid_loss[row]) and np.isfinite(slope[row]):
                loss[i], grad[i] = out.valid_loss[row], slope[row]
            else:
                errors[int(i)] = (f"FloatingPointError: valid loss {out.valid_loss[row]}, "
                                  f"hypergradient {slope[row]} not finite")

    run(np.arange(len(rates)))
    return GridSweep(loss, grad, dict(sorted(errors.items())), time.perf_counter() - start)


# --------------------------------------------------------------------------
# Checkpoint: finished sweeps as plain arrays and JSON text
# --------------------------------------------------------------------------


def _entry_name(iters: int, seed: int) -> str:
    return f"T{iters}_seed{seed}"


def save_sweeps(path, run_key: dict, sweeps: dict) -> None:
    """Write ``sweeps`` ({(T, seed): GridSweep}) with ``run_key`` to ``path`` (.npz,
    atomically): per sweep ``NAME__valid_loss``, ``NAME__hypergradient`` (float64),
    ``NAME__seconds`` and ``NAME__errors`` (JSON text), NAME = ``T{T}_seed{seed}``."""
    arrays = {"format_version": np.array(CHECKPOINT_VERSION, dtype=np.int64),
              "run_key": np.array(json.dumps(run_key, sort_keys=True))}
    for (iters, seed), s in sorted(sweeps.items()):
        name = _entry_name(iters, seed)
        arrays[f"{name}__valid_loss"] = np.asarray(s.valid_loss, dtype=np.float64)
        arrays[f"{name}__hypergradient"] = np.asarray(s.hypergradient, dtype=np.float64)
        arrays[f"{name}__seconds"] = np.array(float(s.seconds))
        arrays[f"{name}__errors"] = np.array(json.dumps({str(k): v for k, v in
                                                         s.errors.items()}))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_sweeps(path, run_key: dict, n_points: int) -> dict:
    """The finished sweeps ({(T, seed): GridSweep}) in the checkpoint at ``path``;
    {} if there is none.  CheckpointError naming the file when it is unreadable,
    malformed, or was written with other settings (``run_key``)."""
    data = open_checkpoint(path, run_key, CHECKPOINT_VERSION)
    if data is None:
        return {}

    def bad(why):
        return checkpoint_unusable(path, why)

    sweeps = {}
    names = {k.split("__")[0] for k in data if "__" in k}
    for name in sorted(names):
        try:
            iters, seed = (int(part) for part in name[1:].split("_seed"))
            loss = data[f"{name}__valid_loss"]
            grad = data[f"{name}__hypergradient"]
            seconds = float(data[f"{name}__seconds"])
            errors = {int(k): str(v) for k, v in
                      json.loads(str(data[f"{name}__errors"])).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise bad(f"sweep {name} is incomplete or malformed ({err})") from None
        if name != _entry_name(iters, seed):
            raise bad(f"sweep name {name!r} is malformed")
        if loss.shape != (n_points,) or grad.shape != (n_points,) or loss.dtype.kind != "f" \
                or grad.dtype.kind != "f":
            raise bad(f"sweep {name} holds arrays of shapes {loss.shape} and {grad.shape}, "
                      f"expected ({n_points},) floats")
        diverged = ~(np.isfinite(loss) & np.isfinite(grad))
        if set(np.flatnonzero(diverged).tolist()) != set(errors):
            raise bad(f"sweep {name}: its non-finite points and recorded errors disagree")
        sweeps[(iters, seed)] = GridSweep(loss, grad, errors, seconds)
    return sweeps


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def _mark_regions(ax, stats, color_best="k"):
    """Shade the small-rate and near-best regions and mark the best rate."""
    ax.axvspan(*stats["small_lr_region"], color="tab:blue", alpha=0.08, lw=0)
    if stats["near_best_region"] is not None:
        ax.axvspan(*stats["near_best_region"], color="tab:red", alpha=0.10, lw=0)
        ax.axvline(stats["best_log_learning_rate"], color=color_best, ls="--", lw=1)


def _band(ax, x, per_seed, color, label):
    """Seed mean as a line with markers and the min-max over seeds as a band."""
    with np.errstate(invalid="ignore"):
        lo, hi = np.min(per_seed, axis=0), np.max(per_seed, axis=0)
    ax.fill_between(x, lo, hi, color=color, alpha=0.25, lw=0, label="min-max over seeds")
    ax.plot(x, _seed_mean(per_seed), color=color, marker="o", ms=2.5, lw=1.2, label=label)


def plot_valid_loss(path, log_lrs, horizons: dict, n_seeds: int):
    """Validation loss against log learning rate, one panel per horizon T."""
    fig = new_figure(figsize=(4.6 * len(horizons), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(horizons), sharey=True))
    for ax, (iters, h) in zip(axes, horizons.items()):
        _mark_regions(ax, h["stats"])
        _band(ax, log_lrs, h["valid_loss"], "tab:orange", f"mean over {n_seeds} seeds")
        ax.set_yscale("log")
        ax.set_title(f"T = {iters}")
        ax.set_xlabel("log learning rate (natural log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("validation loss after training (nats per example)")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("Validation loss vs learning rate (best dashed; near-best region red, "
                 "small-rate region blue)", fontsize=10)
    save_figure(fig, path)


def _linear_threshold(log_lrs, stats) -> float:
    """Symlog's linear range: the power of ten at or below the median small-rate
    hypergradient, so the smooth part is drawn on the log scale too."""
    high = stats["small_lr_region"][1]
    small = np.abs(stats["hypergradient"][np.asarray(log_lrs) <= high + _EDGE_SLACK])
    small = small[np.isfinite(small) & (small > 0)]
    if not len(small):
        return 1e-2
    return float(10.0 ** math.floor(math.log10(float(np.median(small)))))


def plot_hypergradients(path, log_lrs, horizons: dict, n_seeds: int):
    """d valid loss / d log learning rate against log learning rate on a symmetric
    log scale, one panel per horizon T."""
    from matplotlib.ticker import NullLocator, SymmetricalLogLocator

    largest = list(horizons.values())[-1]["stats"]
    threshold = _linear_threshold(log_lrs, largest)
    fig = new_figure(figsize=(4.6 * len(horizons), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(horizons), sharey=True))
    for ax, (iters, h) in zip(axes, horizons.items()):
        s = h["stats"]
        _mark_regions(ax, s)
        _band(ax, log_lrs, h["hypergradient"], "tab:purple", f"mean over {n_seeds} seeds")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_yscale("symlog", linthresh=threshold)
        # Hypergradients span many decades here: label a few of them only.
        locator = SymmetricalLogLocator(linthresh=threshold, base=10)
        locator.set_params(numticks=9)
        ax.yaxis.set_major_locator(locator)
        ax.yaxis.set_minor_locator(NullLocator())
        rough = s["roughness_ratio"]
        note = f", roughness ratio {rough:.1f}" if rough is not None else ""
        ax.set_title(f"T = {iters}{note}", fontsize=10)
        ax.set_xlabel("log learning rate (natural log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("d valid loss / d log learning rate")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Exact hypergradient of the learning rate: smooth at small rates, chaotic "
                 f"near the best (symmetric log scale, linear within ±{threshold:g})",
                 fontsize=10)
    save_figure(fig, path)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


FILES = {
    "results": "results.json",
    "checkpoint": "checkpoint.npz",
    "loss_plot": "chaos_valid_loss.png",
    "grad_plot": "chaos_hypergradient.png",
}


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=done, desc="sweeps", unit="sweep", leave=False,
                disable=not enabled)


def run_chaos(config: ChaosConfig, out_dir, *, resume: bool = False, progress: bool = True,
              log: Optional[Callable] = None, command: str = "") -> dict:
    """Run the chaos experiment into ``out_dir``; returns the results dict
    (results.json), after writing checkpoint.npz after every (seed, T) sweep and
    two plots.  ``resume`` reuses the finished sweeps of checkpoint.npz."""
    log = log or (lambda msg: None)
    paths = prepare_out(out_dir, FILES)
    start = time.perf_counter()
    data = load_splits(config)
    stamp = data_stamp(data)
    key = config.run_key(stamp)
    log_lrs = log_learning_rates(config)
    done = load_sweeps(paths["checkpoint"], key, len(log_lrs)) if resume else {}
    model = MLP(config.layer_sizes, "tanh")
    todo = [(iters, seed) for iters in config.horizons for seed in config.seeds]
    reused = sum(1 for k in todo if k in done)
    log(f"{NAME}: {config.layer_sizes} tanh MLP, T in {list(config.horizons)}, "
        f"{config.grid_points} log learning rates in [{config.log_lr_min}, "
        f"{config.log_lr_max}], momentum {config.momentum}, {config.n_seeds} seeds: "
        f"{len(todo)} sweeps" + (f" ({reused} from the checkpoint)" if reused else ""))
    with _progress_bar(len(todo), reused, progress) as bar:
        for iters, seed in todo:
            if (iters, seed) in done:
                continue
            result = sweep_grid(model, data, log_lrs, iters, seed, momentum=config.momentum,
                                init_log_scale=config.init_log_scale,
                                batch_size=config.batch_size)
            done[(iters, seed)] = result
            save_sweeps(paths["checkpoint"], key, done)
            for i, why in result.errors.items():
                log(f"  diverged: T={iters}, seed {seed}, log learning rate "
                    f"{log_lrs[i]:.3f}: {why}")
            bar.update(1)

    horizons = {}
    for iters in config.horizons:
        runs = [done[(iters, seed)] for seed in config.seeds]
        loss = np.stack([r.valid_loss for r in runs])
        grad = np.stack([r.hypergradient for r in runs])
        horizons[iters] = {"valid_loss": loss, "hypergradient": grad,
                           "stats": analyse_horizon(log_lrs, loss, grad)}
    diverged = [{"iters": iters, "seed": seed, "log_learning_rate": float(log_lrs[i]),
                 "error": why}
                for iters in config.horizons for seed in config.seeds
                for i, why in done[(iters, seed)].errors.items()]
    top = horizons[config.horizons[-1]]["stats"]
    if top["best_at_grid_edge"]:
        log(f"warning: the best learning rate at T={config.horizons[-1]} is at the edge "
            "of the grid; widen --log-lr-min/--log-lr-max to see past it")
    summary = {
        "iters": config.horizons[-1],
        "n_seeds": config.n_seeds,
        "log_learning_rates": log_lrs.tolist(),
        "valid_loss": _json_list(top["valid_loss"]),
        "hypergradient": _json_list(top["hypergradient"]),
        **{k: top[k] for k in ("best_log_learning_rate", "best_valid_loss",
                               "best_at_grid_edge", "roughness_small_lr",
                               "roughness_near_best", "roughness_ratio",
                               "small_lr_region", "near_best_region")},
        "diverged_settings": len(diverged),
    }
    plot_valid_loss(paths["loss_plot"], log_lrs, horizons, config.n_seeds)
    plot_hypergradients(paths["grad_plot"], log_lrs, horizons, config.n_seeds)
    figures = [(FILES["loss_plot"], "validation loss vs log learning rate, mean and min-max "
                                    "over seeds, one panel per T"),
               (FILES["grad_plot"], "d valid loss / d log learning rate (symlog), mean and "
                                    "min-max over seeds, one panel per T")]
    per_horizon = {
        str(iters): {
            "valid_loss_per_seed": _json_list(h["valid_loss"]),
            "hypergradient_per_seed": _json_list(h["hypergradient"]),
            **{k: (_json_list(v) if isinstance(v, np.ndarray) else v)
               for k, v in h["stats"].items()},
        } for iters, h in horizons.items()}
    sweep_seconds = {_entry_name(*k): done[k].seconds for k in todo}
    return write_results(
        paths["results"], experiment=NAME, command=command, config=config,
        data_sha256=stamp, summary=summary, figures=figures,
        seeds=list(config.seeds), horizons=per_horizon, diverged=diverged,
        runtime={"sweeps_s": float(sum(sweep_seconds.values())),
                 "this_invocation_s": time.perf_counter() - start,
                 "sweeps_from_checkpoint": reused, "per_sweep_s": sweep_seconds},
        files={k: str(p) for k, p in paths.items()})


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def horizon_list(text):
    """An argument ``T,T,...``: two or more different iteration counts >= 1."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated iteration counts like 50,100, got {text!r}") from None
    if len(values) < 2 or len(set(values)) != len(values) or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected two or more different iteration counts >= 1 like 50,100, got {text!r}")
    return values


def unit_interval(text):
    """An argument in the open interval (0, 1)."""
    value = finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def add_parser(sub):
    """The ``chaos`` subcommand's parser, added to ``sub``."""
    d = ChaosConfig()
    # "resolve": the common --iters becomes a list of horizons here, and the
    # meta-optimiser's flags, which do not apply, are hidden (and refused by run_cli).
    p = sub.add_parser(
        NAME, conflict_handler="resolve",
        help="hypergradient of one global learning rate on a grid: smooth at small rates, "
             "chaotic near the best (MNIST MLP)",
        description=(
            "Train a tanh MLP at every learning rate of a log grid (fixed momentum) for "
            "several horizons T and seeds, with exact hypergradients d(validation "
            "loss)/d(log learning rate) from one batched sweep per (seed, T), and measure "
            "how rough the hypergradient is at small rates and near the best rate. Writes "
            "results.json, PNG plots and checkpoint.npz (updated after every sweep) into "
            "--out."))
    quick = {"hidden": ",".join(map(str, QUICK["hidden"])),
             "iters": ",".join(map(str, QUICK["horizons"])), "seeds": QUICK["n_seeds"]}
    small = add_common_arguments(p, NAME, d, quick, "15 s on 2 cores")
    p.add_argument("--iters", type=horizon_list, default=None, metavar="T,T,...",
                   help=f"training horizons, two or more (default: "
                        f"{','.join(map(str, d.horizons))})")
    p.add_argument("--meta-iters", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=("compiled",), default=d.backend,
                   help="derivatives of the training loss: the sweep's compiled batched "
                        "objective only (default: %(default)s)")
    p.add_argument("--seeds", dest="n_seeds", type=int_at_least(1), default=None,
                   metavar="K", help=f"seeds --seed, --seed + 1, ... (initial weights and "
                                     f"minibatch order) (default: {d.n_seeds})")
    p.add_argument("--grid-points", type=int_at_least(MIN_GRID_POINTS), default=None,
                   metavar="P", help=f"learning rates on the grid (default: {d.grid_points})")
    p.add_argument("--log-lr-min", type=finite_float, default=None, metavar="X",
                   help=f"lowest natural-log learning rate (default: {d.log_lr_min})")
    p.add_argument("--log-lr-max", type=finite_float, default=None, metavar="X",
                   help=f"highest natural-log learning rate (default: {d.log_lr_max})")
    p.add_argument("--momentum", type=unit_interval, default=None, metavar="B",
                   help=f"fixed momentum decay beta (default: {d.momentum})")
    p.add_argument("--init-log-scale", type=finite_float, default=None, metavar="S",
                   help=f"log standard deviation of the initial weights and biases "
                        f"(default: {d.init_log_scale})")
    small.add_argument("--hidden", type=widths, default=None, metavar="W,W,...",
                       help=f"hidden layer widths (default: {','.join(map(str, d.hidden))})")
    return p


_EXTRA = ("hidden", "n_seeds", "grid_points", "log_lr_min", "log_lr_max", "momentum",
          "init_log_scale")


def config_from_args(args) -> ChaosConfig:
    """The settings of parsed ``args`` (--quick's apply to what was not given);
    ConfigError for flags that do not apply or settings that do not fit together."""
    for flag, dest in (("--meta-iters", "meta_iters"), ("--step-size", "step_size")):
        if getattr(args, dest, None) is not None:
            raise ConfigError(f"{flag} does not apply: {NAME} trains on a grid of learning "
                              "rates and has no meta-optimisation")
    settings = settings_from_args(args, QUICK, extra=_EXTRA)
    if "iters" in settings:
        settings["horizons"] = settings.pop("iters")
    return ChaosConfig(**settings)


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    config = config_from_args(args)
    start = time.perf_counter()
    results = run_chaos(config, args.out, resume=args.resume, progress=not args.no_progress,
                        log=print, command=command_line(args))
    s = results["summary"]

    def show(value, fmt):
        return "undefined" if value is None else format(value, fmt)

    rows = [("largest T, seeds", f"{s['iters']}, {s['n_seeds']}"),
            ("best log learning rate", show(s["best_log_learning_rate"], ".3f")),
            ("best valid loss (mean over seeds)", show(s["best_valid_loss"], ".4f")),
            ("roughness, lowest quarter of the grid", show(s["roughness_small_lr"], ".4f")),
            ("roughness, within 0.5 of the best", show(s["roughness_near_best"], ".4f")),
            ("roughness ratio (near best / small)", show(s["roughness_ratio"], ".2f")),
            ("diverged settings", str(s["diverged_settings"]))]
    print_summary(results, time.perf_counter() - start, rows)
    if s["best_log_learning_rate"] is None:
        print(f"hypergrad-fast {NAME}: every grid point diverged at T={s['iters']} for some "
              "seed; lower --log-lr-max", file=sys.stderr)
        return 1
    return 0


EXPERIMENT = Experiment(NAME, add_parser, run_cli)
