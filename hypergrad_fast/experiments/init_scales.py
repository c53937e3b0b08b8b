"""The initialisation-scales experiment: meta-learn one log initial scale per weight
and bias block of a tanh MLP (8 for [784, 50, 50, 50, 10]) on the validation loss,
with a fixed learning rate and momentum, and compare the learned weight scales with
the 1/sqrt(fan-in) heuristic (Maclaurin, Duvenaud & Adams 2015, section 3.1, where
the learned scales came out close to it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import autograd.numpy as anp
import numpy as np

from ..hypergrad import sgd
from ..models import MLP, ParamLayout, make_train_loss
from ._args import ConfigError, Experiment, positive_float, widths
from ._runner import (BaseConfig, MlpSizes, MnistProblem,
                      add_common_arguments, command_line, meta_optimize, new_figure,
                      plot_meta_curve, prepare_out, print_summary, records_json, run_facts,
                      save_figure, settings_from_args, write_results)

__all__ = ["InitScalesConfig", "InitScalesProblem", "QUICK", "run_init_scales"]

NAME = "init-scales"


@dataclass(frozen=True)
class InitScalesConfig(MlpSizes, BaseConfig):
    """Settings of the init-scales experiment: :class:`~._runner.BaseConfig`'s and

    hidden: hidden layer widths (units), tanh units.
    learning_rate: the fixed learning rate of every iteration and block.
    momentum: the fixed momentum decay beta, in (0, 1).
    init_log_scale: the starting log initial scale of every block.
    """

    NAME = NAME

    meta_iters: int = 100
    step_size: float = 0.05
    hidden: tuple = (50, 50, 50)
    learning_rate: float = 0.3
    momentum: float = 0.9
    init_log_scale: float = -2.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in (0, 1), got {self.momentum}")
        if not np.isfinite(self.init_log_scale):
            raise ConfigError(f"init_log_scale must be finite, got {self.init_log_scale}")


#: The --quick settings: fewer meta-iterations on the full training run (measured at
#: about 18 s on a 2-core machine).
QUICK = {"meta_iters": 30}


class InitScalesProblem(MnistProblem):
    """The hyperloss of :class:`InitScalesConfig`: hyperparameters ``log_scales``
    (G,), one per block; x0 = exp(log_scale[block]) * a fixed standard-normal draw,
    trained with the fixed learning rate and momentum."""

    def __init__(self, config: InitScalesConfig):
        super().__init__(config)
        self.model = MLP(config.layer_sizes, "tanh")
        self.layout = self.model.layout
        self.hyper = ParamLayout([("log_scales", (self.layout.n_groups,))])
        train = self.data.train
        self.train_loss = make_train_loss(self.model, train.inputs, train.targets,
                                          config.batch_size, seed=config.seed,
                                          backend=config.backend)
        # A fixed draw keeps the hyperloss a deterministic function of the scales.
        self.noise = np.random.default_rng(config.seed).standard_normal(self.layout.size)
        self.alphas = np.full(config.iters, config.learning_rate)
        self.betas = np.full(config.iters, config.momentum)

    def initial(self) -> np.ndarray:
        return np.full(self.layout.n_groups, self.config.init_log_scale)

    def train(self, h):
        x0 = anp.exp(self.layout.expand(h)) * self.noise
        return sgd(self.train_loss, x0, self.alphas, self.betas)

    @property
    def record_keys(self) -> tuple:
        """The base records and ``scale_<block>`` (the scale evaluated)."""
        return (*super().record_keys, *(f"scale_{n}" for n in self.layout.names))

    def record(self, h, value, grad) -> dict:
        out = super().record(h, value, grad)
        for name, log_scale in zip(self.layout.names, np.asarray(h)):
            out[f"scale_{name}"] = float(np.exp(log_scale))
        return out

    def fan_in(self) -> dict:
        """{weight block: its fan-in (rows of the weight matrix)}."""
        return {n: s[0] for n, s in zip(self.layout.names, self.layout.shapes) if n[0] == "W"}


def plot_scales(path, names, records, heuristic):
    """Scale of every block against meta-iteration; weights solid, biases dotted,
    1/sqrt(fan-in) dashed for each weight block in its colour."""
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    fig = new_figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    for n in names:
        color = cmap(int(n[1:]) % 10)
        values = records[f"scale_{n}"]
        meta = np.arange(len(values))
        ax.plot(meta, values, color=color, ls="-" if n[0] == "W" else ":", lw=1.8,
                label=f"{n} learned")
        if n in heuristic:
            ax.axhline(heuristic[n], color=color, ls="--", lw=1,
                       label=f"{n}: 1/√fan-in = {heuristic[n]:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("initial scale (standard deviation of the draw)")
    ax.set_title("Learned initialisation scale per block (W weights, b biases)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncols=2, loc="best")
    save_figure(fig, path)


FILES = {
    "results": "results.json",
    "checkpoint": "checkpoint.npz",
    "scales_plot": "init_scales.png",
    "meta_plot": "meta_learning_curve.png",
}


def run_init_scales(config: InitScalesConfig, out_dir, *, resume: bool = False,
                    progress: bool = True, log: Optional[Callable] = None,
                    command: str = "") -> dict:
    """Run the init-scales experiment into ``out_dir``; returns the results dict
    (results.json), after writing checkpoint.npz every meta-iteration and two plots."""
    log = log or (lambda msg: None)
    paths = prepare_out(out_dir, FILES)
    start = time.perf_counter()
    problem = InitScalesProblem(config)
    log(f"{NAME}: {config.layer_sizes} tanh MLP, T={config.iters}, learning rate "
        f"{config.learning_rate}, momentum {config.momentum}, {problem.layout.n_groups} "
        f"log scales, {config.meta_iters} meta-iterations")
    result = meta_optimize(problem, config, paths["checkpoint"], resume=resume,
                           progress=progress)
    rec = records_json(result)
    names = list(problem.layout.names)
    learned = {n: float(np.exp(v)) for n, v in zip(names, result.params)}
    heuristic = {n: float(1.0 / np.sqrt(f)) for n, f in problem.fan_in().items()}
    summary = {
        "learned_init_scales": learned,
        "fan_in_heuristic": heuristic,
        "ratio_to_heuristic": {n: learned[n] / heuristic[n] for n in heuristic},
        "initial_init_scale": float(np.exp(config.init_log_scale)),
        **{f"{when}_{key}": rec[key][i] for when, i in (("initial", 0), ("final", -1))
           for key in ("valid_loss", "valid_error", "test_loss", "test_error")},
    }
    plot_scales(paths["scales_plot"], names, rec, heuristic)
    plot_meta_curve(paths["meta_plot"], rec)
    figures = [(FILES["scales_plot"], "learned initial scale per block vs meta-iteration, "
                                      "1/sqrt(fan-in) dashed"),
               (FILES["meta_plot"], "loss and error after training vs meta-iteration")]
    return write_results(
        paths["results"], experiment=NAME, command=command, config=config,
        data_sha256=problem.data_stamp(), summary=summary, figures=figures,
        blocks={"names": names, "shapes": [list(s) for s in problem.layout.shapes]},
        meta_records=rec, meta_step_sizes=result.step_sizes.tolist(),
        **run_facts(float(rec["wall_time"][-1]), time.perf_counter() - start,
                    result.resumed_from, paths))


def add_parser(sub):
    """The ``init-scales`` subcommand's parser, added to ``sub``."""
    d = InitScalesConfig()
    p = sub.add_parser(
        NAME, help="meta-learn the initial weight and bias scale of every layer (MNIST MLP)",
        description=(
            "Meta-optimise, with Adam on exact hypergradients of the validation loss, "
            "the log initial scale of every weight and bias block of a tanh MLP trained "
            "with a fixed learning rate and momentum, and compare the learned weight "
            "scales with 1/sqrt(fan-in). Writes results.json, PNG plots and "
            "checkpoint.npz (updated every meta-iteration) into --out."))
    small = add_common_arguments(p, NAME, d, QUICK, "20 s on 2 cores")
    small.add_argument("--hidden", type=widths, default=None, metavar="W,W,...",
                       help=f"hidden layer widths (default: {','.join(map(str, d.hidden))})")
    p.add_argument("--learning-rate", type=positive_float, default=None, metavar="A",
                   help=f"fixed learning rate (default: {d.learning_rate})")
    return p


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    config = InitScalesConfig(**settings_from_args(args, QUICK,
                                                   extra=("hidden", "learning_rate")))
    start = time.perf_counter()
    results = run_init_scales(config, args.out, resume=args.resume,
                              progress=not args.no_progress, log=print,
                              command=command_line(args))
    s = results["summary"]
    rows = [(f"{n} scale (learned / 1/sqrt(fan-in))",
             f"{s['learned_init_scales'][n]:.4f} / {h:.4f} = {s['ratio_to_heuristic'][n]:.2f}")
            for n, h in s["fan_in_heuristic"].items()]
    rows += [(f"{key.replace('_', ' ')} initial -> final",
              f"{s['initial_' + key]:.4f} -> {s['final_' + key]:.4f}")
             for key in ("valid_loss", "test_loss", "test_error")]
    print_summary(results, time.perf_counter() - start, rows)
    return 0


EXPERIMENT = Experiment(NAME, add_parser, run_cli)
