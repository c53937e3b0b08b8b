"""Command line: ``hypergrad-fast <experiment> [options]``.

Subcommands:
  schedules   meta-learn learning-rate schedules, momenta and init scales of an MLP
              on MNIST (the paper's 800-hyperparameter experiment).

Exit codes: 0 done; 1 training diverged; 2 bad arguments or a checkpoint that
cannot be resumed (message on stderr, no traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["main", "build_parser"]


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _widths(text):
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 50,50,50, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be >= 1, got {text!r}")
    return widths


def _add_schedules(sub):
    from .experiments import QUICK, SchedulesConfig
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
    p.add_argument("--meta-iters", type=_int_at_least(0), default=None,
                   metavar="N",
                   help=f"meta-iterations (Adam steps) (default: {d.meta_iters})")
    p.add_argument("--iters", type=_int_at_least(1), default=d.iters, metavar="T",
                   help="training iterations (default: %(default)s)")
    p.add_argument("--step-size", type=_positive_float, default=d.step_size,
                   metavar="S", help="Adam step size, in log/logit units of the "
                                     "hyperparameters (default: %(default)s)")
    p.add_argument("--seed", type=_int_at_least(0), default=d.seed, metavar="S",
                   help="seed of the weight draw and the minibatch order; the data split "
                        "is fixed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    small = p.add_argument_group("problem size (for tests and experiments)")
    small.add_argument("--hidden", type=_widths, default=d.hidden, metavar="W,W,...",
                       help=f"hidden layer widths (default: {','.join(map(str, d.hidden))})")
    small.add_argument("--batch-size", type=_int_at_least(1), default=d.batch_size,
                       metavar="B", help="examples per minibatch (default: %(default)s)")
    for split, default in (("train", d.n_train), ("valid", d.n_valid), ("test", d.n_test)):
        small.add_argument(f"--n-{split}", type=_int_at_least(1), default=default,
                           metavar="N", help=f"{split} examples (default: %(default)s)")
    p.set_defaults(run=_run_schedules)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per experiment."""
    parser = argparse.ArgumentParser(
        prog="hypergrad-fast",
        description="Exact hypergradients by running SGD with momentum backwards "
                    "(Maclaurin, Duvenaud & Adams, ICML 2015).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_schedules(sub)
    return parser


def _run_schedules(args) -> int:
    from .experiments import QUICK, SchedulesConfig, run_schedules
    settings = dict(hidden=args.hidden, n_train=args.n_train, n_valid=args.n_valid,
                    n_test=args.n_test, iters=args.iters, batch_size=args.batch_size,
                    step_size=args.step_size, seed=args.seed)
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


def main(argv=None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the subcommand; returns the exit code."""
    from .experiments import ConfigError
    from .meta import CheckpointError
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except (CheckpointError, ConfigError) as err:
        print(f"hypergrad-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, OverflowError) as err:
        print(f"hypergrad-fast {args.command}: training diverged: {err}\n"
              "Try a smaller --step-size; --resume continues from the last checkpoint.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nhypergrad-fast {args.command}: interrupted; rerun with --resume to "
              "continue from the last checkpoint", file=sys.stderr)
        return 130
