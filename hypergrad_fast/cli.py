"""Command line: ``hypergrad-fast <experiment> [options]``.

Subcommands: one per registered experiment (:data:`hypergrad_fast.experiments.EXPERIMENTS`),
e.g. ``schedules``, which meta-learns learning-rate schedules, momenta and init
scales of an MLP on MNIST (the paper's 800-hyperparameter experiment).

Exit codes: 0 done; 1 training diverged (the message says the command that continues
with a smaller step size), or ``search`` lost its Dask scheduler (rerun with
``--resume``); 2 bad arguments, a missing optional dependency (``dask``), an output folder that cannot be written,
or a checkpoint that cannot be resumed (message on stderr, no traceback); 130
interrupted.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

__all__ = ["main", "build_parser"]

PROG = "hypergrad-fast"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per experiment."""
    # Imported here, not at the top: it loads autograd and the models, and main()
    # runs it where Ctrl-C is caught.
    from .experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact hypergradients by running SGD with momentum backwards "
                    "(Maclaurin, Duvenaud & Adams, ICML 2015).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for experiment in EXPERIMENTS.values():
        experiment.add_parser(sub).set_defaults(run=experiment.run)
    return parser


def _resume_command(argv, step_size: float) -> str:
    """The shell command that reruns ``argv`` with ``--resume --step-size step_size``.

    Drops the ``--resume`` and ``--step-size`` already in ``argv`` when spelled out;
    argparse keeps the last value given, so an abbreviation left in is overridden.
    """
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--step-size":
            skip_value = True
        elif arg != "--resume" and not arg.startswith("--step-size="):
            kept.append(arg)
    return shlex.join([PROG, *kept, "--resume", "--step-size", repr(step_size)])


def _divergence_advice(err, argv) -> str:
    """What to do after :class:`~hypergrad_fast.metaopt.DivergenceError` ``err``."""
    if err.checkpoint is None:
        return ("The initial hyperparameters already give a non-finite training run; a "
                "smaller --step-size cannot help.")
    return (f"The checkpoint keeps meta-iteration {err.meta_iteration - 1}, the last whose "
            "training run was finite, and Adam's state. To continue from there with half "
            "the step size, run:\n  " + _resume_command(argv, err.step_size / 2))


def main(argv=None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the subcommand; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    label = PROG  # with the subcommand once it is known
    # Everything that can take a moment, imports included, runs inside this try, so
    # that Ctrl-C at any point ends with one line and exit code 130.
    try:
        from .experiments import ConfigError
        from .metaopt import CheckpointError, DivergenceError

        args = build_parser().parse_args(argv)
        label = f"{PROG} {args.command}"
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            return args.run(args)
        except (CheckpointError, ConfigError) as err:
            print(f"{label}: error: {err}", file=sys.stderr)
            return 2
        except DivergenceError as err:
            print(f"{label}: training diverged at meta-iteration {err.meta_iteration}: "
                  f"{err.reason}\n{_divergence_advice(err, argv)}", file=sys.stderr)
            return 1
        except (FloatingPointError, OverflowError) as err:
            print(f"{label}: training diverged: {err}\n"
                  "Try a smaller --step-size; --resume continues from the last checkpoint.",
                  file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print(f"\n{label}: interrupted; rerun with --resume to continue from the last "
              "checkpoint", file=sys.stderr)
        return 130
