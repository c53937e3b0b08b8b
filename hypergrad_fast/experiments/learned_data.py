"""The learned-training-data experiment: ten training images, one per label 0..9,
every pixel a hyperparameter (7,840), start blank; a model (logistic regression, or
a tanh MLP with ``--hidden``) is trained on them alone and the pixels are
meta-optimised on the validation loss over real digits (Maclaurin, Duvenaud & Adams
2015, section 3.3).  Compared with the same model trained the same way on ten real
images, one per class, averaged over random draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import autograd.numpy as anp
import numpy as np

from ..hypergrad import sgd
from ..models import MLP, ParamLayout, make_train_loss
from ._args import ConfigError, Experiment, int_at_least, positive_float, widths
from ._runner import (N_CLASSES, N_PIXELS, SIDE, BaseConfig, MlpSizes, MnistProblem,
                      add_common_arguments, command_line, meta_optimize, new_figure,
                      plot_meta_curve, prepare_out, print_summary, records_json, run_facts,
                      save_figure, settings_from_args, write_results)

__all__ = ["LearnedDataConfig", "LearnedDataProblem", "QUICK", "run_learned_data"]

NAME = "learned-data"


@dataclass(frozen=True)
class LearnedDataConfig(MlpSizes, BaseConfig):
    """Settings of the learned-data experiment: :class:`~._runner.BaseConfig`'s
    (``batch_size`` counts learned images per minibatch, at most 10; ``n_train`` is
    the pool the real images are drawn from) and

    hidden: hidden layer widths of a tanh MLP; () for logistic regression.
    learning_rate, momentum: the fixed training schedule (momentum beta in (0, 1)).
    n_draws: draws of ten real images (one per class) for the comparison.

    The initial weights are a fixed draw (seed ``seed``) with standard deviation
    1/sqrt(fan-in) per weight block, the usual heuristic; biases start at zero.
    """

    NAME = NAME

    n_train: int = 1000
    batch_size: int = N_CLASSES
    iters: int = 100
    meta_iters: int = 200
    step_size: float = 0.05
    hidden: tuple = ()
    learning_rate: float = 0.5
    momentum: float = 0.9
    n_draws: int = 10

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if self.batch_size > N_CLASSES:
            raise ConfigError(f"batch_size must be <= {N_CLASSES} (the learned images), "
                              f"got {self.batch_size}")
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in (0, 1), got {self.momentum}")
        if self.n_draws < 1:
            raise ConfigError(f"n_draws must be >= 1, got {self.n_draws}")


#: The --quick settings (measured at about 12 s on a 2-core machine).
QUICK = {"meta_iters": 50}


class LearnedDataProblem(MnistProblem):
    """The hyperloss of :class:`LearnedDataConfig`: hyperparameters ``pixels``
    (10, 784), image c labelled c; the model is trained on them alone from a fixed
    weight draw with the fixed schedule."""

    def __init__(self, config: LearnedDataConfig):
        super().__init__(config)
        self.model = MLP(config.layer_sizes, "tanh")
        self.layout = self.model.layout
        self.hyper = ParamLayout([("pixels", (N_CLASSES, N_PIXELS))])
        self.targets = np.eye(N_CLASSES)
        # The inputs given here only fix the shape: the loss reads meta["inputs"].
        self.train_loss = make_train_loss(self.model, np.zeros((N_CLASSES, N_PIXELS)),
                                          self.targets, config.batch_size, seed=config.seed,
                                          learn_inputs=True, backend=config.backend)
        scales = np.array([s[0] ** -0.5 if n[0] == "W" else 0.0
                           for n, s in zip(self.layout.names, self.layout.shapes)])
        noise = np.random.default_rng(config.seed).standard_normal(self.layout.size)
        self.x0 = self.layout.expand(scales) * noise
        self.alphas = np.full(config.iters, config.learning_rate)
        self.betas = np.full(config.iters, config.momentum)

    def initial(self) -> np.ndarray:
        return np.zeros(self.hyper.size)  # blank images

    def train(self, h):
        images = anp.reshape(h, (N_CLASSES, N_PIXELS))
        return sgd(self.train_loss, self.x0, self.alphas, self.betas, {"inputs": images})

    def real_draws(self) -> list:
        """``n_draws`` sets of ten real training images, image c of class c, as flat
        hyperparameter vectors (draws seeded by the config's seed)."""
        train = self.data.train
        by_class = [np.flatnonzero(train.labels == c) for c in range(N_CLASSES)]
        missing = [c for c, idx in enumerate(by_class) if len(idx) == 0]
        if missing:
            raise ConfigError(f"the {len(train.labels)} training digits hold no example of "
                              f"class {missing[0]}; raise --n-train")
        rng = np.random.default_rng([self.config.seed, 1])
        return [train.inputs[[rng.choice(idx) for idx in by_class]].ravel()
                for _ in range(self.config.n_draws)]


def plot_images(path, pixels, title):
    """The ten images (10, 784) as a 2x5 grid, grey scale centred on 0."""
    images = np.asarray(pixels).reshape(N_CLASSES, SIDE, SIDE)
    fig = new_figure(figsize=(10, 4.8), layout="constrained")
    axes = fig.subplots(2, 5)
    limit = max(float(np.abs(images).max()), 1e-9)
    image = None
    for c, ax in enumerate(axes.ravel()):
        image = ax.imshow(images[c], cmap="gray", vmin=-limit, vmax=limit)
        ax.set_title(f"label {c}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.85, label="pixel value (real digits: 0 to 1)")
    fig.suptitle(title)
    save_figure(fig, path)


FILES = {
    "results": "results.json",
    "checkpoint": "checkpoint.npz",
    "images_plot": "learned_images.png",
    "meta_plot": "meta_learning_curve.png",
}


def run_learned_data(config: LearnedDataConfig, out_dir, *, resume: bool = False,
                     progress: bool = True, log: Optional[Callable] = None,
                     command: str = "") -> dict:
    """Run the learned-data experiment into ``out_dir``; returns the results dict
    (results.json), after writing checkpoint.npz every meta-iteration and two plots."""
    log = log or (lambda msg: None)
    paths = prepare_out(out_dir, FILES)
    start = time.perf_counter()
    problem = LearnedDataProblem(config)
    draws = problem.real_draws()  # before the meta-run: a bad pool fails at once
    model = "logistic regression" if not config.hidden else f"{config.layer_sizes} tanh MLP"
    log(f"{NAME}: {model} trained on 10 learned images, T={config.iters}, "
        f"{problem.hyper.size} pixels, {config.meta_iters} meta-iterations")
    result = meta_optimize(problem, config, paths["checkpoint"], resume=resume,
                           progress=progress)
    rec = records_json(result)
    real = [problem.evaluate(problem.final_weights(h)) for h in draws]
    test_error_real = np.array([r["test_error"] for r in real])
    test_loss_real = np.array([r["test_loss"] for r in real])
    summary = {
        "test_error_learned": rec["test_error"][-1],
        "test_error_real": float(test_error_real.mean()),
        "test_error_real_std": float(test_error_real.std()),
        "n_draws": len(draws),
        "test_loss_learned": rec["test_loss"][-1],
        "test_loss_real": float(test_loss_real.mean()),
        "test_loss_real_std": float(test_loss_real.std()),
        "valid_loss_learned": rec["valid_loss"][-1],
        "valid_loss_blank": rec["valid_loss"][0],
    }
    pixels = result.params.reshape(N_CLASSES, N_PIXELS)
    plot_images(paths["images_plot"], pixels,
                f"Ten learned training images after {config.meta_iters} meta-iterations")
    # The "train" split is the pool of real digits: never trained on here.
    plot_meta_curve(paths["meta_plot"], rec, title="of the model trained on them",
                    split_names={"train": "real training pool (not trained on)"})
    figures = [(FILES["images_plot"], "the ten learned training images, one per label"),
               (FILES["meta_plot"], "loss and error of the model trained on the learned "
                                    "images vs meta-iteration")]
    return write_results(
        paths["results"], experiment=NAME, command=command, config=config,
        data_sha256=problem.data_stamp(), summary=summary, figures=figures,
        learned_images=pixels.tolist(),
        real_draws={"test_error": test_error_real.tolist(),
                    "test_loss": test_loss_real.tolist()},
        meta_records=rec, meta_step_sizes=result.step_sizes.tolist(),
        **run_facts(float(rec["wall_time"][-1]), time.perf_counter() - start,
                    result.resumed_from, paths))


def add_parser(sub):
    """The ``learned-data`` subcommand's parser, added to ``sub``."""
    d = LearnedDataConfig()
    p = sub.add_parser(
        NAME, help="meta-learn ten training images, every pixel a hyperparameter (MNIST)",
        description=(
            "Meta-optimise, with Adam on exact hypergradients of the validation loss, "
            "every pixel of ten training images (one per label, starting blank) on which "
            "alone a model is trained, and compare with ten real images per draw. Writes "
            "results.json, PNG plots and checkpoint.npz (updated every meta-iteration) "
            "into --out."))
    small = add_common_arguments(p, NAME, d, QUICK, "15 s on 2 cores")
    small.add_argument("--hidden", type=widths, default=None, metavar="W,W,...",
                       help="hidden layer widths of a tanh MLP (default: none, logistic "
                            "regression)")
    small.add_argument("--draws", dest="n_draws", type=int_at_least(1), default=None,
                       metavar="N", help=f"draws of ten real images (default: {d.n_draws})")
    p.add_argument("--learning-rate", type=positive_float, default=None, metavar="A",
                   help=f"fixed learning rate (default: {d.learning_rate})")
    return p


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    config = LearnedDataConfig(**settings_from_args(
        args, QUICK, extra=("hidden", "n_draws", "learning_rate")))
    start = time.perf_counter()
    results = run_learned_data(config, args.out, resume=args.resume,
                               progress=not args.no_progress, log=print,
                               command=command_line(args))
    s = results["summary"]
    rows = [("test error, learned images (%)", f"{100 * s['test_error_learned']:.2f}"),
            (f"test error, real images (%, {s['n_draws']} draws)",
             f"{100 * s['test_error_real']:.2f} +- {100 * s['test_error_real_std']:.2f}"),
            ("test loss, learned images (nats)", f"{s['test_loss_learned']:.4f}"),
            ("test loss, real images (nats)",
             f"{s['test_loss_real']:.4f} +- {s['test_loss_real_std']:.4f}")]
    print_summary(results, time.perf_counter() - start, rows)
    return 0


EXPERIMENT = Experiment(NAME, add_parser, run_cli)
