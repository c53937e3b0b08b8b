"""A batch of exact reversible SGD-with-momentum runs on a CUDA GPU.

:class:`BatchedReversibleMomentum` runs B independent copies of the CPU engine
(:class:`~hypergrad_fast.engine.ReversibleMomentum`) side by side, one GPU thread
per (run, parameter) element, with the same arithmetic (:mod:`._arith`), so each
run's state equals that of a CPU engine fed the same inputs, bit for bit.  Each
run may have its own ``alpha`` and ``beta`` (a hyperparameter sweep), or one per
parameter.

Without a usable GPU the class raises :class:`RuntimeError` when constructed;
importing this module needs no GPU.  The CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``
in the environment before numba is first imported) runs it on the CPU, slowly.
"""

import numpy as np

from ._arith import BETA_DENOM, STATE_INIT, WORD_BITS
from ._wrapper import (
    EngineState,
    ExactEngine,
    beta_numerator,
    buffer_error,
    check_coefficients,
    check_decays,
    check_frac_bits,
    check_iterations,
    held_bits,
    information_bound,
    overflow_error,
    stack_contents,
    stack_rows,
    value_error,
)
from .cpu import Prepared


class _LazyCuda:
    """``numba.cuda``, imported at the first attribute read: the import takes about 0.45 s
    here, which a CPU-only run need not pay.  :func:`_cuda_module` says whether it can be
    imported at all."""

    def __getattr__(self, name):
        module = _cuda_module()
        if module is None:
            raise RuntimeError(_why_no_gpu())
        return getattr(module, name)


_CUDA = []  # [numba.cuda or None, the import's exception or None], once imported


def _cuda_module():
    """``numba.cuda``, or None when it cannot be imported (then ``_CUDA[1]`` says why)."""
    if not _CUDA:
        try:  # numba-cuda imports without a driver; this only guards a broken install
            from numba import cuda as module
            _CUDA[:] = [module, None]
        except Exception as exc:  # pragma: no cover - depends on the installation
            _CUDA[:] = [None, exc]
    return _CUDA[0]


cuda = _LazyCuda()

__all__ = ["BatchedReversibleMomentum", "gpu_available"]


def _simulator_on():
    # numba.cuda imports its config as ``config`` (numba-cuda and numba's old built-in target)
    module = _cuda_module()
    return module is not None and bool(getattr(getattr(module, "config", None),
                                               "ENABLE_CUDASIM", 0))


def gpu_available() -> bool:
    """True when a CUDA GPU is usable here, or when the CUDA simulator is on."""
    if _cuda_module() is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def _why_no_gpu():
    """The reason no GPU can be used, as text."""
    module = _cuda_module()
    if module is None:
        error = _CUDA[1]
        return f"numba.cuda cannot be imported ({type(error).__name__}: {error})"
    try:
        module.get_current_device()
    except Exception as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split()).rstrip(' :.')}"
    return "cuda.is_available() is False"


def _require_gpu():
    if not gpu_available():
        raise RuntimeError(
            "BatchedReversibleMomentum needs a CUDA GPU, and none is usable here: "
            f"{_why_no_gpu()}.  (For testing without a GPU, set NUMBA_ENABLE_CUDASIM=1 "
            "in the environment before numba is first imported.)")


def _is_device_array(a):
    """True for objects that live on the GPU (numba, CuPy, PyTorch...)."""
    if hasattr(a, "__cuda_array_interface__"):
        return True
    return _simulator_on() and cuda.devicearray.is_cuda_ndarray(a)


def _as_device(a):
    """A numba device array viewing ``a`` (no copy)."""
    if _simulator_on():
        return a  # the simulator's device arrays are the only kind it knows
    return cuda.as_cuda_array(a)


class _Coefficients:
    """Device buffers for per-run and per-element coefficients, reused across calls."""

    def __init__(self, dtype, runs, size):
        self._dtype = dtype
        self._shape = {1: runs, 2: size}
        self._buffers = {}
        self._dummy = cuda.device_array(1, dtype=dtype)

    def args(self, mode, values):
        """(array, scalar value, mode) kernel arguments for validated ``values``."""
        if mode == 0:
            return self._dummy, self._dtype.type(values[0]), mode
        buf = self._buffers.get(mode)
        if buf is None:
            buf = self._buffers[mode] = cuda.device_array(self._shape[mode], dtype=self._dtype)
        buf.copy_to_device(np.ascontiguousarray(values, dtype=self._dtype))
        return buf, self._dtype.type(0), mode


class BatchedReversibleMomentum(ExactEngine):
    """B runs of SGD with momentum, on the GPU, each of which can be run backwards exactly.

    Momentum convention, per run b (the paper's Algorithm 1)::

        v[b] <- beta[b] * v[b] - (1 - beta[b]) * g[b]
        x[b] <- x[b] + alpha[b] * v[b]

    Parameters
    ----------
    x0 : float64 array of shape (B, N): B runs of N parameters.  A host array, or a
        device array (anything with ``__cuda_array_interface__``: numba, CuPy,
        PyTorch), converted to fixed point on the device.
    v0 : like ``x0``, default zeros.
    frac_bits : int
        Bits after the radix point (default 52); values must satisfy
        ``|value| < 2**(62 - frac_bits)``.

    ``alpha`` and ``beta`` are, at every call, a scalar (all runs), an array of
    shape (B,) (one per run) or of shape (B, N) (one per parameter); ``beta`` in
    (0, 1] is used as :func:`~hypergrad_fast.engine.effective_beta` of itself.
    ``g`` is a (B, N) float64 array on the host or on the device; a device array
    is used in place, with no copy through the host.

    Every call reads back 16 bytes to learn whether an element failed.  A call
    refused with an exception leaves the engine exactly as it was: the elements
    that were updated are undone on the device.

    The word stacks are one device array of shape (rows, B * N).  When a step
    needs a row more, a larger array is allocated and the old one copied into
    it, so for a moment both are held: size it once with :meth:`reserve`.
    """

    def __init__(self, x0, v0=None, frac_bits=52):
        frac_bits = check_frac_bits(frac_bits)
        _require_gpu()
        from . import _gpu_kernels as gk

        self._k = gk
        self.frac_bits = frac_bits
        self._scale = float(2.0**self.frac_bits)
        self._top_height = 0  # bound on every stack's height (highest ever reached)
        x0 = self._states(x0, "x0", None)
        if x0.shape[0] * x0.shape[1] == 0:
            raise ValueError("x0 must hold at least one run of at least one parameter")
        self._shape = (int(x0.shape[0]), int(x0.shape[1]))
        size = self.size
        self._status = cuda.device_array(size, dtype=np.uint8)  # all zero between calls
        self._launch(gk.fill, self._status, np.uint8(0))
        self._flags_host = np.array([gk.NO_FAIL, 0], dtype=np.int64)
        self._flags = cuda.to_device(self._flags_host)
        self._x = self._fix(x0, "x0")
        if v0 is None:
            self._v = cuda.device_array(size, dtype=np.int64)
            self._launch(gk.fill, self._v, np.int64(0))
        else:
            self._v = self._fix(self._states(v0, "v0", self._shape), "v0")
        self._coder = cuda.device_array(size, dtype=np.uint64)
        self._launch(gk.fill, self._coder, np.uint64(STATE_INIT))
        self._height = cuda.device_array(size, dtype=np.int32)
        self._launch(gk.fill, self._height, np.int32(0))
        self._words = cuda.device_array((0, size), dtype=np.uint16)
        self._g_buf = None
        self._alpha = _Coefficients(np.dtype(np.float64), self._shape[0], size)
        self._beta = _Coefficients(np.dtype(np.int64), self._shape[0], size)

    # ----------------------------------------------------------------- properties
    @property
    def shape(self):
        """(B, N): runs, parameters per run."""
        return self._shape

    @property
    def size(self):
        """Number of elements B * N."""
        return self._shape[0] * self._shape[1]

    @property
    def x(self):
        """Current positions as a host float64 (B, N) copy."""
        return (self._x.copy_to_host() / self._scale).reshape(self._shape)

    @property
    def v(self):
        """Current velocities as a host float64 (B, N) copy."""
        return (self._v.copy_to_host() / self._scale).reshape(self._shape)

    def x_device(self, out=None):
        """Current positions as a float64 (B, N) device array (into ``out`` if given).

        For gradients computed on the device: nothing goes through the host.
        """
        return self._to_float(self._x, out, "out")

    def v_device(self, out=None):
        """Current velocities as a float64 (B, N) device array (into ``out`` if given)."""
        return self._to_float(self._v, out, "out")

    def _to_float(self, values, out, name):
        """Convert into ``out`` and return ``out`` itself (a CuPy or PyTorch array stays one)."""
        if out is None:
            out = view = cuda.device_array(self._shape, dtype=np.float64)
        elif not _is_device_array(out):
            raise TypeError(f"{name} must be a device array")
        else:
            view = _as_device(out)  # on a GPU a new numba view of the caller's memory
            if view.dtype != np.float64 or tuple(view.shape) != self._shape \
                    or not view.is_c_contiguous():
                raise ValueError(f"{name} must be a C-contiguous float64 device array of "
                                 f"shape {self._shape}")
        self._launch(self._k.to_float, values, self._scale, view.reshape(self.size))
        return out

    @property
    def aux_bits(self):
        """Information held in the buffers, in bits (summed over runs and parameters)."""
        return held_bits(self._coder.copy_to_host(), self._height.copy_to_host())

    @property
    def aux_nbytes(self):
        """Bytes allocated on the device for the word stacks."""
        return self._words.shape[0] * self.size * 2

    @property
    def state_nbytes(self):
        """Fixed device bytes of the coders (state and stack height per element)."""
        return self.size * (8 + 4)

    @property
    def state(self):
        """Host copies of the exact integer state, as an :class:`EngineState`.

        x, v, coder, height have shape (B, N); words has shape (rows, B, N) with
        rows the highest stack; ``words[:, b]`` is run b's buffer as the CPU
        engine lays it out, zeros above each stack's top included, so a refused
        call leaves every field equal (see :class:`EngineState`).
        """
        height = self._height.copy_to_host()
        rows = max(int(height.max()), 0)
        words = self._words[:rows].copy_to_host() if rows else np.zeros((0, self.size),
                                                                        np.uint16)
        stack_contents(words, height)
        return EngineState(self._x.copy_to_host().reshape(self._shape),
                           self._v.copy_to_host().reshape(self._shape),
                           self._coder.copy_to_host().reshape(self._shape),
                           height.reshape(self._shape),
                           words.reshape((rows,) + self._shape))

    # ----------------------------------------------------------------- capacity
    def reserve(self, iterations, beta):
        """Allocate the word stacks for ``iterations`` more steps at decay ``beta``.

        Sizing up front means the device array is never regrown (and copied)
        during the run.  ``beta`` is a scalar, per run (B,), per element (B, N),
        or a sequence of per-step values of shape (iterations,),
        (iterations, B) or (iterations, B, N).  Where a shape fits both readings
        (iterations == B), the per-run reading wins, as on the CPU engine.
        ``iterations`` is an integer >= 0 and every beta must be in (0, 1]
        (ValueError naming the first that is not).
        """
        iterations = check_iterations(iterations)
        bits = information_bound(check_decays(beta))
        runs, n = self._shape
        if bits.shape in ((), (runs,), (runs, n)):
            new_bits = bits * iterations
        elif bits.shape in ((iterations,), (iterations, runs), (iterations, runs, n)):
            new_bits = bits.sum(axis=0)
        else:
            raise ValueError(
                f"beta must be a scalar or have shape ({runs},), ({runs}, {n}), "
                f"({iterations},), ({iterations}, {runs}) or ({iterations}, {runs}, {n}), "
                f"got shape {bits.shape}")
        # The stacks' heights are bounded by the highest reached (no device reduction of
        # the coders): at most 16 (top + 1) bits held.
        self._grow(stack_rows(WORD_BITS * (self._top_height + 1), np.max(new_bits)))

    def _grow(self, rows):
        """Make room for ``rows`` words per element.

        A new device array is allocated, the old rows copied into it (device to
        device) and the new rows zeroed; the old array is freed afterwards, so for
        a moment both are held.
        """
        have = self._words.shape[0]
        if rows <= have:
            return
        words = cuda.device_array((rows, self.size), dtype=np.uint16)
        if have:
            words[:have].copy_to_device(self._words)
        self._launch(self._k.fill, words[have:].reshape((rows - have) * self.size),
                     np.uint16(0))
        self._words = words

    def _ensure_room(self):
        """Room for one more word on every stack, growing by a quarter at a time.

        (The CPU engine grows by 1/16 in place; here each growth is a full copy.)
        """
        need = self._top_height + 1
        have = self._words.shape[0]
        if need > have:
            self._grow(max(need, have + max(have // 4, 2)))

    # ----------------------------------------------------------------- validation
    def _states(self, a, name, shape):
        """A (B, N) float64 array on the device, as a flat (B * N,) device array."""
        if _is_device_array(a):
            a = _as_device(a)
            if a.dtype != np.float64:
                raise TypeError(f"{name} on the device must be float64, got dtype {a.dtype}")
            self._check_shape(a.shape, name, shape)
            if not a.is_c_contiguous():
                raise ValueError(f"{name} on the device must be C-contiguous")
            return a
        a = np.asarray(a)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
        self._check_shape(a.shape, name, shape)
        return cuda.to_device(np.ascontiguousarray(a, dtype=np.float64))

    @staticmethod
    def _check_shape(got, name, shape):
        got = tuple(got)
        if shape is None:
            if len(got) != 2:
                raise ValueError(f"{name} must be a 2-D array (runs, parameters), "
                                 f"got shape {got}")
        elif got != shape:
            raise ValueError(f"{name} has shape {got}, expected {shape}")

    def _fix(self, values, name):
        """The fixed-point image of a (B, N) float64 device array, flat."""
        flat = values.reshape(values.shape[0] * values.shape[1])
        out = cuda.device_array(flat.shape[0], dtype=np.int64)
        self._launch(self._k.to_fixed, flat, self._scale, out, self._status, self._flags)
        bad = self._read_flags()
        if bad >= 0:
            self._clear_failure()
            self._raise_value(name, bad, float(flat[bad:bad + 1].copy_to_host()[0]))
        return out

    def _where(self, name, j):
        b, i = divmod(int(j), self._shape[1])
        return f"{name}[{b}, {i}]"

    def _raise_value(self, name, j, value):
        raise value_error(self._where(name, j), value, self.frac_bits)

    def _coefficient(self, value, name, unit_interval=False):
        """Validate a coefficient: returns (mode, flat float64 values)."""
        if isinstance(value, Prepared):
            raise TypeError(f"{name} is a Prepared, which only the CPU engine takes; pass "
                            "the plain value (a scalar, (B,) or (B, N) array)")
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
        runs, n = self._shape
        if arr.ndim == 0:
            mode, a = self._k.SCALAR, np.array([float(arr)])
        elif arr.shape == (runs,):
            mode, a = self._k.PER_RUN, np.ascontiguousarray(arr, dtype=np.float64)
        elif arr.shape == (runs, n):
            mode, a = self._k.PER_ELEMENT, np.ascontiguousarray(arr, dtype=np.float64).ravel()
        else:
            raise ValueError(f"{name} must be a scalar or have shape ({runs},) or "
                             f"({runs}, {n}), got shape {arr.shape}")

        def where(i):
            if mode == self._k.PER_ELEMENT:
                return self._where(name, i)
            return f"{name}[{i}]" if mode == self._k.PER_RUN else name

        return mode, check_coefficients(a, where, unit_interval)

    def _alpha_arg(self, alpha):
        mode, a = self._coefficient(alpha, "alpha")
        return self._alpha.args(mode, a)

    def _beta_arg(self, beta):
        mode, b = self._coefficient(beta, "beta", unit_interval=True)
        return self._beta.args(mode, beta_numerator(b))

    def _gradient(self, g):
        """``g`` as a flat float64 device array: a device input in place, a host one copied."""
        if _is_device_array(g):
            d = _as_device(g)
            if d.dtype != np.float64:
                raise TypeError(f"g on the device must be float64, got dtype {d.dtype}")
            self._check_shape(d.shape, "g", self._shape)
            if not d.is_c_contiguous():
                raise ValueError("g on the device must be C-contiguous")
            return d.reshape(self.size)
        a = np.asarray(g)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"g must be a real numeric array, got dtype {a.dtype}")
        self._check_shape(a.shape, "g", self._shape)
        if self._g_buf is None:
            self._g_buf = cuda.device_array(self.size, dtype=np.float64)
        self._g_buf.copy_to_device(np.ascontiguousarray(a, dtype=np.float64).ravel())
        return self._g_buf

    # ----------------------------------------------------------------- launching
    def _launch(self, kernel, first, *args):
        self._k.launch(kernel, first.shape[0], first, *args)

    def _read_flags(self):
        """Fetch the flags; note the stack top; return the first failing index or -1."""
        self._flags.copy_to_host(self._flags_host)
        self._top_height = max(self._top_height, int(self._flags_host[self._k.TOP]))
        bad = int(self._flags_host[self._k.FIRST_FAIL])
        return -1 if bad == self._k.NO_FAIL else bad

    def _clear_failure(self):
        """Back to 'all zero between calls' after a failed call."""
        self._launch(self._k.fill, self._status, np.uint8(0))
        self._flags_host[self._k.FIRST_FAIL] = self._k.NO_FAIL
        self._flags_host[self._k.TOP] = self._top_height
        self._flags.copy_to_device(self._flags_host)

    def _forward(self, g, alpha_args, beta_args, masked):
        k = self._k
        n = np.int64(self._shape[1])
        top = np.int64(self._top_height)
        if alpha_args is None:
            self._launch(k.decay, self._v, self._coder, self._height, self._words, g,
                         *beta_args, n, self._scale, top, masked, self._status, self._flags)
        else:
            self._launch(k.step, self._x, self._v, self._coder, self._height, self._words, g,
                         *alpha_args, *beta_args, n, self._scale, top, masked, self._status,
                         self._flags)

    def _position(self, alpha_args, sign, masked):
        self._launch(self._k.position, self._x, self._v, *alpha_args, np.int64(sign),
                     np.int64(self._shape[1]), masked, self._status, self._flags)

    def _undecay(self, g, beta_args, masked):
        self._launch(self._k.undecay, self._v, self._coder, self._height, self._words, g,
                     *beta_args, np.int64(self._shape[1]), self._scale, masked, self._status,
                     self._flags)

    def _element(self, array, j):
        return array[j:j + 1].copy_to_host()[0]

    def _kernel_failed(self, j, g, alpha_args, beta_args, stage):
        """Turn a refused element into an exception naming it (after the rollback)."""
        corrupt = self._element(self._status, j) == self._k.CORRUPT
        self._clear_failure()
        b, i = divmod(j, self._shape[1])
        location = f"run {b}, parameter {i}"
        if corrupt:
            raise buffer_error(stage, location, int(self._element(self._height, j)) < 0)
        g_j = None if g is None else float(self._element(g, j))
        if g_j is not None and not np.isfinite(g_j):
            raise FloatingPointError(f"g[{b}, {i}] = {g_j} is not finite")

        def coef(args):
            arr, value, mode = args
            if mode == self._k.SCALAR:
                return value.item()
            return self._element(arr, j if mode == self._k.PER_ELEMENT else b).item()

        raise overflow_error(stage, location, self.frac_bits,
                             self._element(self._x, j) / self._scale,
                             self._element(self._v, j) / self._scale, g_j,
                             None if alpha_args is None else coef(alpha_args),
                             None if beta_args is None else coef(beta_args) / BETA_DENOM)

    # ----------------------------------------------------------------- the kernels
    # (the step methods, with their rollback, are ExactEngine's)
    def _run_step(self, g, alpha_args, beta_args):
        self._ensure_room()
        self._forward(g, alpha_args, beta_args, False)
        return self._read_flags()

    def _run_position(self, alpha_args, sign, rollback):
        self._position(alpha_args, sign, rollback)
        return -1 if rollback else self._read_flags()

    def _run_undecay(self, g, beta_args, rollback):
        if not rollback:
            self._ensure_room()  # for the decay that would undo a refused call
        self._undecay(g, beta_args, rollback)
        return -1 if rollback else self._read_flags()

    def _run_decay(self, g, beta_args, rollback):
        self._forward(g, None, beta_args, rollback)
        return self._read_flags()

    def __repr__(self):
        runs, n = self._shape
        return (f"BatchedReversibleMomentum(B={runs}, N={n}, frac_bits={self.frac_bits}, "
                f"iterations={self._iterations})")
