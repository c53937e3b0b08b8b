"""The GPU engine, from the ordinary test process.

The GPU kernel tests live in ``tests/gpu/``.  They need the CUDA simulator (or a
GPU), and the simulator can only be switched on before numba is first imported,
which the CPU tests in this process have already done; so here they run in a
subprocess with ``NUMBA_ENABLE_CUDASIM=1``, and a plain ``python -m pytest``
exercises the GPU kernels on any machine.  A second subprocess compiles the
kernels to PTX with the real CUDA compiler (no GPU needed), which the simulator
cannot check.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hypergrad_fast
from hypergrad_fast.engine.gpu import BatchedReversibleMomentum, _simulator_on, gpu_available

REPO = Path(__file__).resolve().parent.parent
GPU_TESTS = Path(__file__).resolve().parent / "gpu"


def _python(args, timeout, **env):
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=dict(os.environ, **env),
                            capture_output=True, text=True, timeout=timeout)
    return result, f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.mark.skipif(_simulator_on(), reason="the simulator is on here: tests/gpu runs directly")
def test_gpu_kernels_under_the_simulator():
    result, output = _python(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(GPU_TESTS)],
                             timeout=900, NUMBA_ENABLE_CUDASIM="1")
    assert result.returncode == 0, output
    assert " passed" in result.stdout and "skipped" not in result.stdout, output


@pytest.mark.skipif(_simulator_on(), reason="compiles for the real target, not the simulator")
def test_kernels_compile_to_ptx_without_contracted_multiply_adds():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, str(GPU_TESTS / "compile_ptx.py")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["status"] == "skip":
        pytest.skip(f"no CUDA compiler here: {report['reason']}")
    assert report["status"] == "ok", report["reason"]
    assert set(report["kernels"]) >= {"step", "decay", "position", "undecay", "to_fixed"}
    # the float -> fixed roundings must not be fused with the products before them
    assert all(k["fma_f64"] == 0 for k in report["kernels"].values()), report["kernels"]
    # Adam's position: IEEE square root and division, as on the CPU
    assert all(k["approx_f64"] == 0 for k in report["kernels"].values()), report["kernels"]
    assert "adam_position" in report["kernels"]


@pytest.mark.skipif(gpu_available(), reason="a GPU (or the simulator) is usable here")
def test_without_a_gpu_construction_fails_clearly():
    assert gpu_available() is False
    with pytest.raises(RuntimeError, match=r"BatchedReversibleMomentum needs a CUDA GPU, and "
                                           r"none is usable here: \w+") as info:
        BatchedReversibleMomentum(np.zeros((2, 3)))
    assert "NUMBA_ENABLE_CUDASIM=1" in str(info.value)


def test_import_needs_no_gpu():
    # this process has imported both; without a GPU neither may have failed
    assert hypergrad_fast.__name__ == "hypergrad_fast"
    assert callable(gpu_available)
    with pytest.raises(ValueError, match="frac_bits must be an integer in"):
        BatchedReversibleMomentum(np.zeros((1, 1)), frac_bits=-1)


def test_cpu_work_does_not_import_numba_cuda():
    """numba.cuda takes about half a second to import: the CPU paths (the experiments'
    modules, a compiled sgd run, gpu_available's answer aside) never touch it."""
    code = """
import sys
import numpy as np
from hypergrad_fast import sgd
from hypergrad_fast.experiments import schedules
from hypergrad_fast.models import MLP, make_train_loss
model = MLP([5, 4, 3], "tanh")
rng = np.random.default_rng(0)
loss = make_train_loss(model, rng.standard_normal((40, 5)), np.eye(3)[rng.integers(0, 3, 40)], 10)
sgd(loss, model.init_params(0, -1.0), np.full(3, 0.1), np.full(3, 0.9))
print("imported" if "numba.cuda" in sys.modules else "not imported")
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["not", "imported"], result.stdout
