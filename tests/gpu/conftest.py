"""GPU kernel tests: under the CUDA simulator, or on a real GPU.

The simulator is chosen when numba is first imported (``NUMBA_ENABLE_CUDASIM=1``
in the environment), so it cannot be switched on inside the pytest process that
runs the CPU tests.  ``tests/test_gpu.py`` therefore runs this folder in a
subprocess with the simulator on; run it by hand with::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/gpu

In a process with neither the simulator nor a usable GPU (a plain
``python -m pytest`` on a machine without one) the tests here are not collected.
"""

import pytest

from hypergrad_fast.engine.gpu import gpu_available

collect_ignore_glob = [] if gpu_available() else ["test_*.py"]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Few threads a block, so that the tiny test batches span several blocks."""
    from hypergrad_fast.engine import _gpu_kernels

    monkeypatch.setattr(_gpu_kernels, "THREADS_PER_BLOCK", 8)
