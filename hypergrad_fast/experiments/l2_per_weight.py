"""The per-weight L2 experiment: multinomial logistic regression on MNIST with one
log L2 penalty per parameter, 7,840 for the weights and 10 for the biases
(``make_train_loss(l2="weight")``), meta-optimised on the validation loss, against
one shared L2 strength tuned by hypergradients the same way (Maclaurin, Duvenaud &
Adams 2015, section 3.2).  The penalties are shown as ten 28x28 images, one per
class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import autograd.numpy as anp
import numpy as np

from ..hypergrad import sgd
from ..models import LogisticRegression, ParamLayout, make_train_loss
from ._args import ConfigError, Experiment, positive_float
from ._runner import (N_CLASSES, N_PIXELS, SIDE, BaseConfig, MnistProblem,
                      add_common_arguments, command_line, meta_optimize, new_figure,
                      plot_meta_curve, prepare_out, print_summary, records_json, variants_facts,
                      save_figure, settings_from_args, write_results)

__all__ = ["L2Config", "L2Problem", "QUICK", "run_l2_per_weight"]

NAME = "l2-per-weight"
#: The two meta-optimisations: one penalty per parameter, one for all.
VARIANTS = ("per_weight", "shared")


@dataclass(frozen=True)
class L2Config(BaseConfig):
    """Settings of the l2-per-weight experiment: :class:`~._runner.BaseConfig`'s and

    learning_rate: the fixed learning rate of every iteration.
    momentum: the fixed momentum decay beta, in (0, 1).
    init_log_l2: the starting log L2 strength (every penalty, both variants); the
        penalty is 0.5 * exp(log_l2) * x**2 per parameter, added to the mean
        cross-entropy of the minibatch.
    """

    NAME = NAME

    iters: int = 200
    meta_iters: int = 50
    step_size: float = 0.1
    learning_rate: float = 0.5
    momentum: float = 0.9
    init_log_l2: float = -6.0

    def __post_init__(self):
        super().__post_init__()
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in (0, 1), got {self.momentum}")
        if not np.isfinite(self.init_log_l2):
            raise ConfigError(f"init_log_l2 must be finite, got {self.init_log_l2}")


#: The --quick settings (measured at about 20 s on a 2-core machine).
QUICK = {"meta_iters": 20}


class L2Problem(MnistProblem):
    """The hyperloss of :class:`L2Config` for one variant: ``log_l2`` of shape
    (7,841,) (``per_weight``: one per weight and one for the bias block) or (1,)
    (``shared``); training starts from zero weights with the fixed learning rate and
    momentum.  ``data``: splits already loaded (both variants share them)."""

    def __init__(self, config: L2Config, variant: str, data=None):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        super().__init__(config, data)
        self.variant = variant
        self.model = LogisticRegression(N_PIXELS, N_CLASSES)
        self.layout = self.model.layout
        mode = "weight" if variant == "per_weight" else "group"
        self._n_weights = self.layout.slices["W0"].stop
        n = self._n_weights + 1 if variant == "per_weight" else 1
        self.hyper = ParamLayout([("log_l2", (n,))])
        train = self.data.train
        self.train_loss = make_train_loss(self.model, train.inputs, train.targets,
                                          config.batch_size, seed=config.seed, l2=mode,
                                          backend=config.backend)
        self.x0 = np.zeros(self.layout.size)
        self.alphas = np.full(config.iters, config.learning_rate)
        self.betas = np.full(config.iters, config.momentum)

    def initial(self) -> np.ndarray:
        return np.full(self.hyper.size, self.config.init_log_l2)

    def train(self, h):
        if self.variant == "shared":
            # The one strength, given to every group of the "group" mode.
            log_l2 = h[0] * anp.ones(self.layout.n_groups)
        else:
            log_l2 = self.penalties(h)
        return sgd(self.train_loss, self.x0, self.alphas, self.betas, {"log_l2": log_l2})


    def penalties(self, h):
        """Per-parameter log L2 strengths (7,850) of ``per_weight`` hyperparameters: the
        weights' own, then the bias block's one value for each bias (differentiable)."""
        n = self._n_weights
        return anp.concatenate([h[:n], h[n] * anp.ones(self.layout.size - n)])


def plot_penalties(path, log_l2_weights, shared_log_l2):
    """The per-weight penalties of each class's weights as ten 28x28 images of
    log10 of the L2 strength, one colour scale, with the shared strength marked on
    the colour bar."""
    per_class = np.asarray(log_l2_weights).reshape(N_PIXELS, N_CLASSES) / np.log(10)
    fig = new_figure(figsize=(11, 5), layout="constrained")
    axes = fig.subplots(2, 5)
    lo, hi = float(per_class.min()), float(per_class.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    image = None
    for c, ax in enumerate(axes.ravel()):
        image = ax.imshow(per_class[:, c].reshape(SIDE, SIDE), cmap="viridis", vmin=lo,
                          vmax=hi)
        ax.set_title(f"class {c}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(image, ax=axes, shrink=0.85, label="log10 L2 strength per weight")
    shared = shared_log_l2 / np.log(10)
    if lo <= shared <= hi:
        bar.ax.axhline(shared, color="r", lw=2)
        bar.ax.text(1.05, shared, " shared", color="r", va="center", fontsize=8,
                    transform=bar.ax.get_yaxis_transform())
    fig.suptitle("Learned L2 penalty of every weight, by output class and pixel "
                 "(red: the learned shared strength)")
    save_figure(fig, path)


FILES = {
    "results": "results.json",
    "checkpoint_per_weight": "checkpoint_per_weight.npz",
    "checkpoint_shared": "checkpoint_shared.npz",
    "penalties_plot": "l2_penalties.png",
    "meta_plot": "meta_learning_curve.png",
}


def run_l2_per_weight(config: L2Config, out_dir, *, resume: bool = False,
                      progress: bool = True, log: Optional[Callable] = None,
                      command: str = "") -> dict:
    """Run both meta-optimisations (per weight, then shared) into ``out_dir``, each
    with its own checkpoint; returns the results dict (results.json)."""
    log = log or (lambda msg: None)
    paths = prepare_out(out_dir, FILES)
    start = time.perf_counter()
    per_weight = L2Problem(config, "per_weight")
    shared = L2Problem(config, "shared", data=per_weight.data)
    log(f"{NAME}: logistic regression, T={config.iters}, learning rate "
        f"{config.learning_rate}, momentum {config.momentum}; {per_weight.hyper.size} "
        f"L2 penalties vs 1, {config.meta_iters} meta-iterations each")
    results, records = {}, {}
    for variant, problem in (("per_weight", per_weight), ("shared", shared)):
        results[variant] = meta_optimize(problem, config, paths[f"checkpoint_{variant}"],
                                         resume=resume, progress=progress,
                                         desc=f"{variant} meta-iterations", variant=variant)
        records[variant] = records_json(results[variant])
    log_l2 = results["per_weight"].params
    shared_log_l2 = float(results["shared"].params[0])
    weights = per_weight.layout.unflatten(per_weight.penalties(log_l2))
    summary = {}
    for split in ("valid", "test"):
        for what in ("error", "loss"):
            for variant in VARIANTS:
                key = f"{split}_{what}"
                summary[f"{key}_{variant}"] = records[variant][key][-1]
                summary[f"initial_{key}_{variant}"] = records[variant][key][0]
    summary.update({
        "learned_shared_l2": float(np.exp(shared_log_l2)),
        "per_weight_l2_quantiles": {q: float(np.exp(np.quantile(weights["W0"], float(q))))
                                    for q in ("0.05", "0.5", "0.95")},
        "per_weight_bias_l2": [float(v) for v in np.exp(weights["b0"])],
        "n_penalties_per_weight": int(log_l2.size),
    })
    plot_penalties(paths["penalties_plot"], weights["W0"], shared_log_l2)
    plot_meta_curve(paths["meta_plot"], {"per-weight L2": records["per_weight"],
                                         "shared L2": records["shared"]})
    figures = [(FILES["penalties_plot"], "learned per-weight L2 strengths as one 28x28 "
                                         "image per class"),
               (FILES["meta_plot"], "loss and error after training vs meta-iteration, "
                                    "per-weight (solid) and shared (dashed) L2")]
    return write_results(
        paths["results"], experiment=NAME, command=command, config=config,
        data_sha256=per_weight.data_stamp(), summary=summary, figures=figures,
        learned={"log_l2_per_weight": log_l2.tolist(), "log_l2_shared": shared_log_l2},
        **variants_facts(results, records, start, paths))


def add_parser(sub):
    """The ``l2-per-weight`` subcommand's parser, added to ``sub``."""
    d = L2Config()
    p = sub.add_parser(
        NAME, help="meta-learn one L2 penalty per weight of logistic regression (MNIST)",
        description=(
            "Meta-optimise, with Adam on exact hypergradients of the validation loss, "
            "one log L2 penalty per weight of multinomial logistic regression (7,840) plus "
            "one for the bias block, and, for comparison, one shared L2 strength tuned "
            "the same way. Writes results.json, PNG plots and two checkpoints (updated "
            "every meta-iteration) into --out."))
    add_common_arguments(p, NAME, d, QUICK, "20 s on 2 cores")
    p.add_argument("--learning-rate", type=positive_float, default=None, metavar="A",
                   help=f"fixed learning rate (default: {d.learning_rate})")
    return p


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    config = L2Config(**settings_from_args(args, QUICK, extra=("learning_rate",)))
    start = time.perf_counter()
    results = run_l2_per_weight(config, args.out, resume=args.resume,
                                progress=not args.no_progress, log=print,
                                command=command_line(args))
    s = results["summary"]
    rows = [("", f"{'per weight':>12s}{'shared':>12s}")]
    for key, scale, fmt in (("valid_loss", 1, ".4f"), ("test_loss", 1, ".4f"),
                            ("test_error", 100, ".2f")):
        label = key.replace("_", " ") + (" (%)" if scale == 100 else " (nats)")
        rows.append((label, f"{scale * s[key + '_per_weight']:>12{fmt}}"
                            f"{scale * s[key + '_shared']:>12{fmt}}"))
    rows.append(("learned shared L2 strength", f"{s['learned_shared_l2']:.3g}"))
    print_summary(results, time.perf_counter() - start, rows)
    return 0


EXPERIMENT = Experiment(NAME, add_parser, run_cli)
