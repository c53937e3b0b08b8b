"""The learning-rate schedules experiment: a function that writes results.json and plots.

``run_schedules`` is the "learning-rate schedules" experiment (Maclaurin, Duvenaud &
Adams 2015, section 3.1): a [784, 50, 50, 50, 10] tanh MLP trained on MNIST for 100
iterations of SGD with momentum, whose learning rate per iteration and per weight or
bias block (100 x 8 = 800 hyperparameters), momentum per block and initial weight
scale per block are meta-optimised with Adam on exact hypergradients of the
validation loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import autograd.numpy as anp
import numpy as np

from ..models import MLP, ParamLayout, make_train_loss
from ..hypergrad import sgd
from ._args import ConfigError, Experiment, widths
from ._runner import (BaseConfig, MlpSizes, MnistProblem,
                      add_common_arguments, command_line, meta_optimize, new_figure,
                      plot_meta_curve, prepare_out, print_summary, records_json, run_facts,
                      save_figure, settings_from_args, write_results)

__all__ = ["ConfigError", "SchedulesConfig", "SchedulesProblem", "QUICK", "run_schedules"]



@dataclass(frozen=True)
class SchedulesConfig(MlpSizes, BaseConfig):
    """Settings of the schedules experiment: :class:`~._runner.BaseConfig`'s and

    hidden: hidden layer widths (units); activation: "tanh" or "relu".
    init_log_alpha: initial log learning rate (every iteration and block).
    init_beta: initial momentum decay (every block), in (0, 1).
    init_log_scale: initial log of the weight-init scale (every block).
    """

    NAME = "schedules"

    hidden: tuple = (50, 50, 50)
    activation: str = "tanh"
    init_log_alpha: float = -1.0
    init_beta: float = 0.9
    init_log_scale: float = -2.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if self.activation not in ("tanh", "relu"):
            raise ConfigError(f"activation must be 'tanh' or 'relu', got {self.activation!r}")
        if not 0.0 < self.init_beta < 1.0:
            raise ConfigError(f"init_beta must lie in (0, 1), got {self.init_beta}")
        for name in ("init_log_alpha", "init_log_scale"):
            if not np.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)}")


#: The --quick settings: fewer meta-iterations, the full training run (measured
#: at about 20 s on a 2-core machine, see the README of the CLI).
QUICK = {"meta_iters": 10}


def _sigmoid(z):
    return 1.0 / (1.0 + anp.exp(-z))


class SchedulesProblem(MnistProblem):
    """Data, model and a deterministic hyperloss for :class:`SchedulesConfig`.

    Hyperparameters are one flat vector laid out by ``self.hyper``:
    ``log_alphas`` (T, G) log learning rates per iteration and block,
    ``logit_betas`` (G,) logit of the momentum decay per block (broadcast over T),
    ``log_scales`` (G,) log init scale per block; G = 2 x (number of layers).
    """

    def __init__(self, config: SchedulesConfig):
        super().__init__(config)
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

    def initial(self) -> np.ndarray:
        """The starting hyperparameters h0 (flat float64) from the config."""
        c, g = self.config, self.layout.n_groups
        logit_beta = np.log(c.init_beta / (1.0 - c.init_beta))
        return self.hyper.flatten({
            "log_alphas": np.full((c.iters, g), c.init_log_alpha),
            "logit_betas": np.full(g, logit_beta),
            "log_scales": np.full(g, c.init_log_scale),
        })

    def train(self, h):
        """x_T trained with hyperparameters h; differentiable."""
        x0, alphas, betas = self.schedules(h)
        return sgd(self.train_loss, x0, alphas, betas, groups=self.layout.groups)

    def schedules(self, h):
        """(x0 (N,), alphas (T, G), betas (T, G)) for hyperparameters h; differentiable."""
        p = self.hyper.unflatten(h)
        x0 = anp.exp(self.layout.expand(p["log_scales"])) * self.noise
        alphas = anp.exp(p["log_alphas"])
        betas = anp.ones((self.config.iters, 1)) * _sigmoid(p["logit_betas"])
        return x0, alphas, betas

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
    fig = new_figure(figsize=(5.2 * n_cols, 3.3 * n_rows + 0.5), layout="constrained")
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
    save_figure(fig, path)


def plot_block_hypers(path, names, fan_in, initial, final):
    """Per-block initial weight scales and momenta, initial vs learned."""
    fig = new_figure(figsize=(9, 4), layout="constrained")
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
    save_figure(fig, path)


def plot_learning_curves(path, curves):
    """(c) Training (and validation) loss per iteration, initial vs learned hypers."""
    fig = new_figure(figsize=(7.5, 4.5), layout="constrained")
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
    save_figure(fig, path)


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
                  progress: bool = True, log: Optional[Callable] = None,
                  command: str = "") -> dict:
    """Run the schedules experiment into ``out_dir``; returns the results dict.

    Writes results.json, checkpoint.npz (updated every meta-iteration; with
    ``resume=True`` the run continues from it) and four PNG plots.  ``log``
    receives one-line progress messages (default: none); ``command`` is the command
    line stored in results.json.  Raises ConfigError before any work if ``out_dir``
    cannot be created or written, and removes temporary files that a killed earlier
    run left there.
    """
    log = log or (lambda msg: None)
    paths = prepare_out(out_dir, FILES)
    start = time.perf_counter()
    problem = SchedulesProblem(config)
    h0 = problem.initial()
    log(f"schedules: {config.layer_sizes} {config.activation} MLP "
        f"({problem.layout.size} weights), T={config.iters}, batch {config.batch_size}, "
        f"{h0.size} hyperparameters, {config.meta_iters} meta-iterations")
    meta_start = time.perf_counter()
    result = meta_optimize(problem, config, paths["checkpoint"], resume=resume,
                           progress=progress)
    meta_seconds = time.perf_counter() - meta_start
    curves = {"initial": problem.learning_curve(h0),
              "final": problem.learning_curve(result.params)}
    initial, final = problem.describe(h0), problem.describe(result.params)
    rec = records_json(result)
    names = list(problem.layout.names)
    fan_in = [problem.layout.shapes[problem.layout.group_of(f"W{n[1:]}")][0] for n in names]
    summary = {f"{when}_{key}": rec[key][i]
               for when, i in (("initial", 0), ("final", -1))
               for key in ("train_loss", "train_error", "valid_loss", "valid_error",
                           "test_loss", "test_error")}
    plot_schedules(paths["schedules_plot"], names, initial, final, config.meta_iters)
    plot_block_hypers(paths["block_plot"], names, np.array(fan_in, float), initial, final)
    plot_meta_curve(paths["meta_plot"], rec)
    plot_learning_curves(paths["curves_plot"], curves)
    figures = [
        (FILES["schedules_plot"], "learned learning rate per training iteration and block"),
        (FILES["block_plot"], "initial weight scale and momentum per block, initial vs "
                              "learned, with 1/sqrt(fan-in)"),
        (FILES["meta_plot"], "loss and error after training vs meta-iteration"),
        (FILES["curves_plot"], "training and validation loss per iteration with the "
                               "initial and the learned hyperparameters"),
    ]
    seconds = time.perf_counter() - start
    log(f"meta-optimisation: {meta_seconds:.1f} s in this invocation "
        f"({rec['wall_time'][-1]:.1f} s in all), learning curves and plots: "
        f"{seconds - meta_seconds:.1f} s")
    return write_results(
        paths["results"], experiment="schedules", command=command, config=config,
        data_sha256=problem.data_stamp(), summary=summary, figures=figures,
        blocks={"names": names, "shapes": [list(s) for s in problem.layout.shapes],
                "fan_in": fan_in},
        n_hyperparameters=int(h0.size),
        hyperparameters={"initial": initial, "final": final},
        meta_records=rec,
        # Differ only where a diverged run was resumed with a smaller step size.
        meta_step_sizes=result.step_sizes.tolist(),
        learning_curves=curves,
        **run_facts(float(rec["wall_time"][-1]), seconds,
                    result.resumed_from, paths))


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
            "PNG plots and checkpoint.npz (updated every meta-iteration) into --out."))
    small = add_common_arguments(p, "schedules", d, QUICK, "half a minute")
    small.add_argument("--hidden", type=widths, default=None, metavar="W,W,...",
                       help=f"hidden layer widths (default: {','.join(map(str, d.hidden))})")
    return p


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    config = SchedulesConfig(**settings_from_args(args, QUICK, extra=("hidden",)))
    start = time.perf_counter()
    results = run_schedules(config, args.out, resume=args.resume,
                            progress=not args.no_progress, log=print,
                            command=command_line(args))
    s = results["summary"]
    rows = [(f"{'':22s}{'initial':>10s}", f"{'final':>10s}")]
    for key, label, scale, fmt in (("valid_loss", "valid loss (nats)", 1, ".4f"),
                                   ("valid_error", "valid error (%)", 100, ".2f"),
                                   ("test_loss", "test loss (nats)", 1, ".4f"),
                                   ("test_error", "test error (%)", 100, ".2f")):
        rows.append((f"{label:22s}{scale * s['initial_' + key]:>10{fmt}}",
                     f"{scale * s['final_' + key]:>10{fmt}}"))
    print_summary(results, time.perf_counter() - start, rows)
    print(f"  checkpoint: {results['files']['checkpoint']}")
    return 0


EXPERIMENT = Experiment("schedules", add_parser, run_cli)
