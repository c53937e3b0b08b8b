"""The learning-rate schedules experiment: a function that writes results.json and plots.

``run_schedules`` is the "learning-rate schedules" experiment (Maclaurin, Duvenaud &
Adams 2015, section 3.1): a [784, 50, 50, 50, 10] tanh MLP trained on MNIST for 100
iterations of SGD with momentum, whose learning rate per iteration and per weight or
bias block (100 x 8 = 800 hyperparameters), momentum per block and initial weight
scale per block are meta-optimised with Adam on exact hypergradients of the
validation loss.

With ``optimizer="adam"`` the network is trained with Adam instead
(:func:`~hypergrad_fast.adam`), and its step size, b1 and b2 are learned per
iteration and per block (3 x 800), with the same per-block init scales.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import autograd.numpy as anp
import numpy as np

from ..models import MLP, ParamLayout, make_train_loss
from ..hypergrad import adam, sgd
from ._args import ConfigError, Experiment, widths
from ._runner import (BaseConfig, MlpSizes, MnistProblem,
                      add_common_arguments, command_line, meta_optimize, new_figure,
                      plot_meta_curve, prepare_out, print_summary, records_json, run_facts,
                      save_figure, settings_from_args, write_results)

__all__ = ["ConfigError", "SchedulesConfig", "SchedulesProblem", "QUICK", "OPTIMIZERS",
           "run_schedules"]


class Optimizer(NamedTuple):
    """How the schedules experiment trains with one optimiser.

    train: the primitive, ``train(loss, x0, alphas, *decays, groups=, callback=)``.
    decays: (name, config field of its initial value) of each decay, in ``train``'s
        order; the name is the key in results.json, ``logit_NAME`` the hyperparameter.
    per_iteration: whether the decays are learned per iteration and block (T, G)
        (else per block (G,), the same at every iteration).
    init_log_alpha: the default initial log learning rate.
    """

    train: Callable
    decays: tuple
    per_iteration: bool
    init_log_alpha: float


#: The optimisers the experiment can train with (``--optimizer``).
OPTIMIZERS = {
    "momentum": Optimizer(sgd, (("betas", "init_beta"),), False, -1.0),
    "adam": Optimizer(adam, (("b1s", "init_b1"), ("b2s", "init_b2")), True, -5.0),
}


@dataclass(frozen=True)
class SchedulesConfig(MlpSizes, BaseConfig):
    """Settings of the schedules experiment: :class:`~._runner.BaseConfig`'s and

    hidden: hidden layer widths (units); activation: "tanh" or "relu".
    optimizer: "momentum" (SGD with momentum, the paper's) or "adam" (Adam without
        bias correction, :func:`~hypergrad_fast.adam`).
    init_log_alpha: initial log learning rate (every iteration and block); None: the
        optimiser's default, -1.0 for momentum, -5.0 for Adam.
    init_beta: initial momentum decay (every block), in (0, 1); momentum only.
    init_b1, init_b2: Adam's initial decays (every iteration and block), in (0, 1).
    init_log_scale: initial log of the weight-init scale (every block).

    Adam's defaults, from first principles rather than tuning: with m_0 = s_0 = 0 and
    no bias correction, the first step moves each coordinate by
    alpha (1 - b1) / sqrt(1 - b2) against its gradient's sign; b1 = 0.9, b2 = 0.99
    make that factor 1, and for a steady gradient the uncorrected factor
    (1 - b1**t) / sqrt(1 - b2**t) stays within [1, 2.13] over T = 100 iterations
    (b2 = 0.999 would reach 6.6), so a flat schedule is close to bias-corrected
    Adam's.  A coordinate then moves up to about alpha per step whatever its
    gradient's size: alpha = exp(-5) = 0.0067 is 1/20 of the initial weight scale
    exp(-2), so one step changes a weight by about 5% of its starting size, and 100
    steps of one sign by at most about 5 times it.
    """

    NAME = "schedules"

    hidden: tuple = (50, 50, 50)
    activation: str = "tanh"
    optimizer: str = "momentum"
    init_log_alpha: Optional[float] = None
    init_beta: float = 0.9
    init_b1: float = 0.9
    init_b2: float = 0.99
    init_log_scale: float = -2.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if self.activation not in ("tanh", "relu"):
            raise ConfigError(f"activation must be 'tanh' or 'relu', got {self.activation!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, "
                              f"got {self.optimizer!r}")
        if self.init_log_alpha is None:
            object.__setattr__(self, "init_log_alpha",
                               OPTIMIZERS[self.optimizer].init_log_alpha)
        for name in ("init_beta", "init_b1", "init_b2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
        for name in ("init_log_alpha", "init_log_scale"):
            if not np.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)}")

    def to_json(self) -> dict:
        """All settings as a JSON-able dict, without the initial decays of the
        optimiser not used."""
        d = super().to_json()
        for name, rule in OPTIMIZERS.items():
            if name != self.optimizer:
                for _, field in rule.decays:
                    d.pop(field, None)
        return d

    def run_key(self, data_stamp: str) -> dict:
        """:meth:`~._runner.BaseConfig.run_key`; the momentum run's leaves out
        ``optimizer``, so checkpoints written before there was a choice still resume."""
        key = super().run_key(data_stamp)
        if self.optimizer == "momentum":
            del key["optimizer"]
        return key


#: The --quick settings: fewer meta-iterations, the full training run (measured
#: at about 20 s on a 2-core machine, see the README of the CLI).
QUICK = {"meta_iters": 10}


def _sigmoid(z):
    return 1.0 / (1.0 + anp.exp(-z))


def _logit(p):
    return np.log(p / (1.0 - p))


class SchedulesProblem(MnistProblem):
    """Data, model and a deterministic hyperloss for :class:`SchedulesConfig`.

    Hyperparameters are one flat vector laid out by ``self.hyper``:
    ``log_alphas`` (T, G) log learning rates per iteration and block; the logit of
    each decay, with momentum ``logit_betas`` (G,) per block (broadcast over T), with
    Adam ``logit_b1s`` and ``logit_b2s`` (T, G) per iteration and block;
    ``log_scales`` (G,) log init scale per block; G = 2 x (number of layers).
    """

    def __init__(self, config: SchedulesConfig):
        super().__init__(config)
        self.model = MLP(config.layer_sizes, config.activation)
        self.layout = self.model.layout
        self.rule = OPTIMIZERS[config.optimizer]
        n_groups = self.layout.n_groups
        self._decay_shape = ((config.iters, n_groups) if self.rule.per_iteration
                             else (n_groups,))
        self.hyper = ParamLayout([("log_alphas", (config.iters, n_groups)),
                                  *((f"logit_{name}", self._decay_shape)
                                    for name, _ in self.rule.decays),
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
        blocks = {"log_alphas": np.full((c.iters, g), c.init_log_alpha)}
        for name, field in self.rule.decays:
            blocks[f"logit_{name}"] = np.full(self._decay_shape, _logit(getattr(c, field)))
        blocks["log_scales"] = np.full(g, c.init_log_scale)
        return self.hyper.flatten(blocks)

    def train(self, h, callback=None):
        """x_T trained with hyperparameters h; differentiable.  ``callback(t, x, ...)``
        after each iteration, with the optimiser's state after x."""
        return self.rule.train(self.train_loss, *self.schedules(h), groups=self.layout.groups,
                               callback=callback)

    def schedules(self, h):
        """(x0 (N,), alphas (T, G), then each decay (T, G)) for hyperparameters h;
        differentiable."""
        p = self.hyper.unflatten(h)
        x0 = anp.exp(self.layout.expand(p["log_scales"])) * self.noise
        alphas = anp.exp(p["log_alphas"])
        # Per-block decays are the same at every iteration.
        ones = 1.0 if self.rule.per_iteration else anp.ones((self.config.iters, 1))
        decays = [ones * _sigmoid(p[f"logit_{name}"]) for name, _ in self.rule.decays]
        return (x0, alphas, *decays)

    def learning_curve(self, h) -> dict:
        """Full-set training and validation loss (nats) after each iteration 0..T."""
        h = np.asarray(h, dtype=np.float64)
        x0 = self.schedules(h)[0]
        train_loss, valid_loss = self.eval_loss("train"), self.eval_loss("valid")
        curve = {"iteration": [], "train_loss": [], "valid_loss": []}

        def add(t, x):
            curve["iteration"].append(t)
            curve["train_loss"].append(float(train_loss(x)))
            curve["valid_loss"].append(float(valid_loss(x)))

        add(0, x0)
        self.train(h, callback=lambda t, x, *state: add(t + 1, x))
        return curve

    def describe(self, h) -> dict:
        """Hyperparameters h in natural units, by block, as JSON-able lists and floats:
        ``alphas`` (a list over iterations per block), each decay (momentum's
        ``betas``: one float per block; Adam's ``b1s``, ``b2s``: a list over
        iterations per block), ``init_scales`` (a float per block)."""
        p = self.hyper.unflatten(np.asarray(h, dtype=np.float64))
        names = self.layout.names
        alphas = np.exp(p["log_alphas"])
        out = {"alphas": {n: alphas[:, j].tolist() for j, n in enumerate(names)}}
        for name, _ in self.rule.decays:
            decay = 1.0 / (1.0 + np.exp(-p[f"logit_{name}"]))
            out[name] = {n: (decay[:, j].tolist() if self.rule.per_iteration
                             else float(decay[j])) for j, n in enumerate(names)}
        out["init_scales"] = {n: float(s) for n, s in zip(names, np.exp(p["log_scales"]))}
        return out


# --------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot global state)
# --------------------------------------------------------------------------


def _layer_styles(names):
    """Colour per layer, solid for weights and dashed for biases."""
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return {n: {"color": cmap(int(n[1:]) % 10), "ls": "-" if n[0] == "W" else "--"}
            for n in names}


def _plot_per_layer(axes, key, names, initial, final):
    """Hyperparameter ``key`` of ``initial`` and ``final`` (a list over iterations per
    block) against the iteration, one axis of ``axes`` per layer: weights solid,
    biases dashed, the initial values dotted grey."""
    styles = _layer_styles(names)
    layers = sorted({int(n[1:]) for n in names})
    iters = np.arange(1, len(next(iter(final[key].values()))) + 1)
    for ax, layer in zip(axes, layers):
        for kind in ("W", "b"):
            n = f"{kind}{layer}"
            ax.plot(iters, initial[key][n], color="0.55", ls=":", lw=1.5)
            ax.plot(iters, final[key][n], lw=1.5, **styles[n])
        ax.set_title(f"layer {layer + 1} ({'output' if layer == layers[-1] else 'hidden'})",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)


def _per_layer_legend(fig):
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="k", ls="-", label="learned, weights"),
               Line2D([], [], color="k", ls="--", label="learned, biases"),
               Line2D([], [], color="0.55", ls=":", lw=1.5, label="initial schedule")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)


def plot_schedules(path, names, initial, final, meta_iters):
    """(a) Learned learning rate per iteration: one panel per layer, weights solid,
    biases dashed, the initial schedule dotted grey."""
    layers = sorted({int(n[1:]) for n in names})
    n_cols = min(len(layers), 2)
    n_rows = -(-len(layers) // n_cols)
    fig = new_figure(figsize=(5.2 * n_cols, 3.3 * n_rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, sharex=True, sharey=True, squeeze=False)
                         ).ravel()
    _plot_per_layer(axes, "alphas", names, initial, final)
    for ax in axes[:len(layers)]:
        ax.set_yscale("log")
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    for ax in axes[(n_rows - 1) * n_cols:]:
        ax.set_xlabel("training iteration t")
    for ax in axes[::n_cols]:
        ax.set_ylabel("learning rate α")
    _per_layer_legend(fig)
    fig.suptitle(f"Learned learning-rate schedule per block after {meta_iters} "
                 "meta-iterations")
    save_figure(fig, path)


def plot_decay_schedules(path, names, initial, final, meta_iters):
    """Adam's learned b1 and b2 per iteration: a row per decay, a panel per layer,
    on a logit axis (0.9, 0.99, 0.999 equally spaced)."""
    layers = sorted({int(n[1:]) for n in names})
    rows = (("b1s", "b1 (first moment)"), ("b2s", "b2 (second moment)"))
    fig = new_figure(figsize=(3.4 * len(layers) + 0.6, 2.9 * len(rows) + 0.8),
                     layout="constrained")
    grid = fig.subplots(len(rows), len(layers), sharex=True, sharey="row", squeeze=False)
    from matplotlib.ticker import FuncFormatter, NullFormatter
    for axes, (key, label) in zip(grid, rows):
        _plot_per_layer(axes, key, names, initial, final)
        for ax in axes:
            ax.set_yscale("logit")
            # Plain decimals (0.9, 0.99), not the logit scale's "1 - 10^-2".
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.6g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        axes[0].set_ylabel(label)
    for ax in grid[-1]:
        ax.set_xlabel("training iteration t")
    _per_layer_legend(fig)
    fig.suptitle(f"Learned Adam decays per block after {meta_iters} meta-iterations")
    save_figure(fig, path)


def plot_block_hypers(path, names, fan_in, initial, final):
    """Per-block initial weight scales and (with momentum) momenta, initial vs learned."""
    keys = [k for k in ("init_scales", "betas") if k in final]
    fig = new_figure(figsize=(4.5 * len(keys), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    ax_s = axes[0]
    pos = np.arange(len(names))
    w = 0.38
    for ax, key in zip(axes, keys):
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
    if "betas" in final:
        ax_b = axes[1]
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
#: Adam's run adds the plot of its learned decays.
ADAM_FILES = {**FILES, "decay_plot": "decay_schedules.png"}
#: The output folder of each optimiser's run when --out is not given.
DEFAULT_OUT = {"momentum": "out/schedules", "adam": "out/schedules-adam"}


def run_schedules(config: SchedulesConfig, out_dir, *, resume: bool = False,
                  progress: bool = True, log: Optional[Callable] = None,
                  command: str = "") -> dict:
    """Run the schedules experiment into ``out_dir``; returns the results dict.

    Writes results.json, checkpoint.npz (updated every meta-iteration; with
    ``resume=True`` the run continues from it) and four PNG plots (five with Adam:
    its decays).  ``log`` receives one-line progress messages (default: none);
    ``command`` is the command line stored in results.json.  Raises ConfigError
    before any work if ``out_dir`` cannot be created or written, and removes
    temporary files that a killed earlier run left there.
    """
    log = log or (lambda msg: None)
    is_adam = config.optimizer == "adam"
    files = ADAM_FILES if is_adam else FILES
    paths = prepare_out(out_dir, files)
    start = time.perf_counter()
    problem = SchedulesProblem(config)
    h0 = problem.initial()
    log(f"schedules{' (Adam)' if is_adam else ''}: {config.layer_sizes} "
        f"{config.activation} MLP "
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
        (files["schedules_plot"], "learned learning rate per training iteration and block"),
        (files["block_plot"], "initial weight scale and momentum per block, initial vs "
                              "learned, with 1/sqrt(fan-in)"),
        (files["meta_plot"], "loss and error after training vs meta-iteration"),
        (files["curves_plot"], "training and validation loss per iteration with the "
                               "initial and the learned hyperparameters"),
    ]
    if is_adam:
        for key in ("b1s", "b2s"):
            summary[f"final_{key[:-1]}_mean"] = {n: float(np.mean(final[key][n]))
                                                 for n in names}
        plot_decay_schedules(paths["decay_plot"], names, initial, final, config.meta_iters)
        figures[0] = (files["schedules_plot"],
                      "learned Adam step size alpha per training iteration and block")
        figures[1] = (files["block_plot"], "initial weight scale per block, initial vs "
                                           "learned, with 1/sqrt(fan-in)")
        figures.insert(1, (files["decay_plot"], "learned Adam decays b1 and b2 per "
                                                "training iteration and block"))
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
            "(Maclaurin et al. 2015, 'learning-rate schedules'); with --optimizer adam, "
            "the network trains with Adam and its b1 and b2 are learned per iteration "
            "and block too. Writes results.json, PNG plots and checkpoint.npz (updated "
            "every meta-iteration) into --out."))
    small = add_common_arguments(
        p, "schedules", d, QUICK, "half a minute",
        out_help=f"output folder (default: {DEFAULT_OUT['momentum']}, "
                 f"{DEFAULT_OUT['adam']} with --optimizer adam)")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=d.optimizer,
                   help="how the network trains: SGD with momentum (per-block momenta) "
                        "or Adam without bias correction (b1 and b2 per iteration and "
                        "block) (default: %(default)s)")
    small.add_argument("--hidden", type=widths, default=None, metavar="W,W,...",
                       help=f"hidden layer widths (default: {','.join(map(str, d.hidden))})")
    return p


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    config = SchedulesConfig(**settings_from_args(args, QUICK, extra=("hidden", "optimizer")))
    start = time.perf_counter()
    results = run_schedules(config, args.out or DEFAULT_OUT[config.optimizer],
                            resume=args.resume, progress=not args.no_progress, log=print,
                            command=command_line(args))
    s = results["summary"]
    rows = [(f"{'':22s}{'initial':>10s}", f"{'final':>10s}")]
    for key, label, scale, fmt in (("valid_loss", "valid loss (nats)", 1, ".4f"),
                                   ("valid_error", "valid error (%)", 100, ".2f"),
                                   ("test_loss", "test loss (nats)", 1, ".4f"),
                                   ("test_error", "test error (%)", 100, ".2f")):
        rows.append((f"{label:22s}{scale * s['initial_' + key]:>10{fmt}}",
                     f"{scale * s['final_' + key]:>10{fmt}}"))
    for decay in ("b1", "b2"):
        if f"final_{decay}_mean" in s:
            means = s[f"final_{decay}_mean"]
            rows.append((f"learned {decay}, mean over t, per block",
                         " ".join(f"{n} {v:.3f}" for n, v in means.items())))
    print_summary(results, time.perf_counter() - start, rows)
    print(f"  checkpoint: {results['files']['checkpoint']}")
    return 0


EXPERIMENT = Experiment("schedules", add_parser, run_cli)
