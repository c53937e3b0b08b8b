"""The README's Python examples of the engine, ``sgd`` and ``adam`` run as written."""

import re
from pathlib import Path

import numpy as np

from experiment_runs import embedded_digits  # noqa: F401  (the examples load the embedded digits)

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title):
    """The ```python blocks of the README section headed ``## title``."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"no section {title!r} in the README"
    blocks = re.findall(r"```python\n(.*?)```", match.group(1), re.S)
    assert blocks, f"no Python example in {title!r}"
    return blocks


def test_engine_example():
    namespace = {}
    for block in _section_code("Using the engine"):
        exec(compile(block, "README: Using the engine", "exec"), namespace)  # noqa: S102
    assert namespace["eng"].iterations == 0


def test_hypergradient_and_adam_examples():
    """The sgd example, then the Adam example, which continues it (same names)."""
    namespace = {}
    for title in ("Hypergradients", "Adam, exactly reversible"):
        for block in _section_code(title):
            exec(compile(block, f"README: {title}", "exec"), namespace)  # noqa: S102
    hypergrad = namespace["hypergrad"]
    assert hypergrad.shape == (50, 4) and np.isfinite(hypergrad).all() and hypergrad.any()
    for name in ("d_log_alphas", "d_b1s", "d_b2s"):
        value = namespace[name]
        assert value.shape == (100, 4) and np.isfinite(value).all() and value.any(), name
