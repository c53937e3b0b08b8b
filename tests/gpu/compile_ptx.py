"""Compile the GPU kernels to PTX for sm_90 without a GPU, and report on them as JSON.

Run by ``tests/test_gpu.py`` in a subprocess, without the simulator.  The CUDA
simulator runs the kernels as Python, so it cannot catch what only the real
compiler sees (typing and lowering in numba-cuda, NVVM); this script can, on any
machine with libNVVM and libdevice (a CUDA toolkit), GPU or not.

It needs two patches of numba-cuda internals, only because there is no device:
device functions ask the current device for its compute capability, and
numba-cuda looks libdevice up together with NVRTC, which may be missing.  Where
a patch point or a library is missing, the script reports ``skip``, not failure.

Output: one JSON line, ``{"status": "ok" | "skip" | "fail", "reason": ...,
"kernels": {name: {"fma_f64": n, "approx_f64": n, "lines": n}}}``.
"""

import glob
import json
import os
import sys
import types


def _report(status, reason="", kernels=None):
    print(json.dumps({"status": status, "reason": reason, "kernels": kernels or {}}))
    sys.exit(0)


def _libdevice():
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    roots += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "nvvm", "libdevice", "libdevice*.bc")))
        if root and found:
            return found[0]
    return None


def _patch():
    from numba.cuda import dispatcher
    from numba.cuda.cudadrv import nvvm

    path = _libdevice()
    if path is None:
        raise FileNotFoundError("no libdevice*.bc under CUDA_HOME or /usr/local/cuda*")
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    nvvm.get_libdevice = lambda: path
    with open(path, "rb") as f:
        code = f.read()
    nvvm.open_libdevice = lambda: code


def _kernel_arguments(gk):
    """Example arguments of every kernel, as the engine passes them (host stand-ins)."""
    import numpy as np

    n = 4
    i64, u64 = np.zeros(n, np.int64), np.zeros(n, np.uint64)
    i32, f64, u8 = np.zeros(n, np.int32), np.zeros(n, np.float64), np.zeros(n, np.uint8)
    words = np.zeros((2, n), np.uint16)
    flags = np.zeros(2, np.int64)
    alpha = (f64, np.float64(0), 0)
    beta = (i64, np.int64(0), 0)
    common = (np.int64(n), 1.0)
    return {
        "step": (i64, i64, u64, i32, words, f64, *alpha, *beta, *common, np.int64(0), False,
                 u8, flags),
        "decay": (i64, u64, i32, words, f64, *beta, *common, np.int64(0), False, u8, flags),
        "position": (i64, i64, *alpha, np.int64(-1), np.int64(n), False, u8, flags),
        "adam_position": (i64, i64, i64, *alpha, 1e-8, 1.0, 1.0, 1.0, np.int64(1), np.int64(n),
                          False, u8, flags),
        "undecay": (i64, u64, i32, words, f64, *beta, *common, False, u8, flags),
        "to_fixed": (f64, 1.0, i64, u8, flags),
        "to_float": (i64, 1.0, f64),
        "fill": (u64, np.uint64(0)),
    }


def main():
    os.environ.setdefault("NUMBA_FORCE_CUDA_CC", "9.0")  # read when numba.cuda is imported
    try:
        import numba
        from numba import cuda

        if cuda.config.ENABLE_CUDASIM:
            _report("skip", "the CUDA simulator is on")
        _patch()
        from hypergrad_fast.engine import _gpu_kernels as gk
    except SystemExit:
        raise
    except Exception as exc:
        _report("skip", f"cannot set up compilation: {type(exc).__name__}: {exc}")

    from numba.core.errors import NumbaError as CoreNumbaError
    from numba.cuda.core.errors import NumbaError as CudaNumbaError

    kernels = {}
    for name, args in _kernel_arguments(gk).items():
        sig = tuple(numba.typeof(a) for a in args)
        try:
            ptx, _ = cuda.compile_ptx(getattr(gk, name).py_func, sig, cc=(9, 0))
        except (CoreNumbaError, CudaNumbaError) as exc:
            _report("fail", f"{name}: {type(exc).__name__}: {exc}", kernels)
        except Exception as exc:  # NVVM or a library missing: the environment, not the code
            _report("skip", f"{name}: {type(exc).__name__}: {exc}", kernels)
        kernels[name] = {"fma_f64": ptx.count("fma.rn.f64"), "lines": ptx.count("\n"),
                         # square roots and divisions not rounded by IEEE (approximations)
                         "approx_f64": sum(ptx.count(op) for op in ("sqrt.approx",
                                                                     "div.approx",
                                                                     "div.full"))}
    _report("ok", "", kernels)


if __name__ == "__main__":
    main()
