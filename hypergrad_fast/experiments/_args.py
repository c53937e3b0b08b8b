"""What every experiment gives the command line, and the argument types and checks
they share."""

import argparse
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

__all__ = ["ConfigError", "Experiment", "existing_folder", "int_at_least",
           "finite_float", "positive_float", "prepare_out_dir", "widths"]


class ConfigError(ValueError):
    """An experiment's settings are invalid (bad sizes, values out of range, an output
    folder that cannot be written, data that cannot be loaded)."""


class Experiment(NamedTuple):
    """A registered experiment: ``add_parser(subparsers)`` adds its subcommand and
    returns the parser; ``run(args)`` runs it and returns the exit code."""

    name: str
    add_parser: Callable
    run: Callable


def int_at_least(minimum):
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


def finite_float(text):
    """An argument that is a finite number (any sign)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def widths(text):
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 50,50,50, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be >= 1, got {text!r}")
    return widths


def existing_folder(text):
    """An argument naming a folder that exists; returned as typed."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"not a folder: {text}")
    return text


def prepare_out_dir(path) -> Path:
    """The output folder ``path``, created with its parents if missing; raises
    :class:`ConfigError` with a one-line reason unless it is a folder this process
    can create files in."""
    out = Path(path)
    if os.path.lexists(out) and not out.is_dir():
        raise ConfigError(f"output folder {out} exists and is not a folder")
    # Path.exists() is False below a regular file, so the nearest existing parent
    # that is no folder is the file in the way.
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"output folder {out} cannot be created: {blocker} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output folder {out} cannot be created: "
                          f"{err.strerror or err}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {out} is not writable")
    return out
