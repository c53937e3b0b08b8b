"""What the experiment tests share: running a subcommand, reading its results.json, and
comparing two runs' results without their wall-clock fields."""

import json

import numpy as np
import pytest

from hypergrad_fast.data import MNIST_ENV, write_idx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: results.json fields that differ between two runs of the same settings.
TIMING_FIELDS = ("iter_time", "wall_time", "runtime", "command", "files")


@pytest.fixture(autouse=True)
def embedded_digits(monkeypatch):
    """The embedded digits, whatever the environment names (import it to use it)."""
    monkeypatch.delenv(MNIST_ENV, raising=False)


def idx_folder(directory, seed=0):
    """A tiny MNIST folder in the standard IDX layout: 300 training and 100 test digits
    of random pixels, labels cycling through 0..9."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for prefix, n in (("train", 300), ("t10k", 100)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte",
                  (np.arange(n) % 10).astype(np.uint8))
    return directory


def results(out):
    """The parsed ``out/results.json``."""
    return json.loads((out / "results.json").read_text())


def without_times(value):
    """results.json content that must agree between runs: wall-clock fields dropped."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMING_FIELDS}
    return value
