"""What the experiment tests share: running a subcommand, reading its results.json, and
comparing two runs' results without their wall-clock fields."""

import json

import pytest

from hypergrad_fast.data import MNIST_ENV

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: results.json fields that differ between two runs of the same settings.
TIMING_FIELDS = ("iter_time", "wall_time", "runtime", "command", "files")


@pytest.fixture(autouse=True)
def embedded_digits(monkeypatch):
    """The embedded digits, whatever the environment names (import it to use it)."""
    monkeypatch.delenv(MNIST_ENV, raising=False)


def results(out):
    """The parsed ``out/results.json``."""
    return json.loads((out / "results.json").read_text())


def without_times(value):
    """results.json content that must agree between runs: wall-clock fields dropped."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMING_FIELDS}
    return value
