"""Command line: ``hypergrad-fast <experiment> [options]``.

Subcommands: one per registered experiment (:data:`hypergrad_fast.experiments.EXPERIMENTS`),
e.g. ``schedules``, which meta-learns learning-rate schedules, momenta and init
scales of an MLP on MNIST (the paper's 800-hyperparameter experiment).

Exit codes: 0 done; 1 training diverged; 2 bad arguments or a checkpoint that
cannot be resumed (message on stderr, no traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .experiments import EXPERIMENTS

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per experiment."""
    parser = argparse.ArgumentParser(
        prog="hypergrad-fast",
        description="Exact hypergradients by running SGD with momentum backwards "
                    "(Maclaurin, Duvenaud & Adams, ICML 2015).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for experiment in EXPERIMENTS.values():
        experiment.add_parser(sub).set_defaults(run=experiment.run)
    return parser


def main(argv=None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the subcommand; returns the exit code."""
    from .experiments import ConfigError
    from .metaopt import CheckpointError
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
