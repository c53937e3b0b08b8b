"""CUDA kernels for the batched reversible momentum step: the GPU twins of :mod:`._cpu_kernels`.

One thread per element of a batch of B runs of N parameters.  The state lives in
flat device arrays of B * N elements (element ``j = run * N + param``): x, v int64
fixed point, coder uint64, height int32, and the word stacks ``words`` uint16 of
shape (rows, B * N), word h of element j at ``words[h, j]`` -- the CPU layout with
B * N columns.  All arithmetic is in :mod:`._arith`; the kernels only load, call
its element helpers and store, so the CPU and GPU engines cannot drift apart.

Coefficients come in three layouts, chosen per call by a mode flag:
``SCALAR`` (the ``*_value`` argument), ``PER_RUN`` (an array of B) and
``PER_ELEMENT`` (an array of B * N).  ``beta`` is passed as its integer numerator
``n`` (``beta = n / 2**16``), as on the CPU.

Errors: an element that cannot be updated (a non-finite input, a fixed-point
overflow, or a full or corrupt stack) is left untouched, its status byte is set
to ``FAIL`` (or ``CORRUPT``) and ``flags[FIRST_FAIL]`` receives the smallest
failing flat index (``cuda.atomic.min``).  Every other element is updated.  The
host then runs the inverse kernel with ``masked=True``: masked kernels skip the
elements whose status is not ``OK``, so exactly the updated elements are undone.
Between calls the status array is all zero and unmasked kernels never read it.

Stack heights: an element's forward step pushes at most one word, so after a
forward kernel every height is at most ``top_known + 1`` (``top_known`` being the
host's bound on all heights).  An element that reaches that height stores it in
``flags[TOP]``; all such stores write the same value, so the race is harmless
and no atomic is needed.  The host reads both flags after every call (16 bytes).

Floating point and fused multiply-add.  NVVM contracts ``a * b + c`` into an
FMA by default: libNVVM's ``-fma`` option defaults to 1, and numba-cuda 0.30
only ever passes ``fma=True`` (with its fast-math option), never ``fma=0``; the
``@cuda.jit`` decorator offers no way to pass it.  The PTX it emits uses
``mul.f64``/``add.f64`` without a rounding modifier, which ptxas may fuse too.
The float -> fixed conversions are safe anyway:

* ``gradient_term``: ``((1 - beta) * g) * 2**frac_bits`` -- the second product
  is exact, so fusing it with the rounding's ``y - floor(y)`` gives the same
  value; the first product feeds a multiplication, not an addition, and cannot
  be contracted (re-association is not allowed without fast-math).
* ``position_delta``: ``alpha * v`` is rounded by ``fixed_round``, which first
  passes the product through a select (``y if ok else 0.0``), so ``y - floor(y)``
  subtracts from the select, not from the product: there is no multiply-add
  pattern.  If that select ever went, ``alpha * v - floor(alpha * v)`` could
  become an FMA and round near-ties differently from the CPU.

Checked with numba-cuda 0.30.4 and CUDA 13.0 for sm_90: the PTX of every kernel
holds no ``fma.rn.f64`` (``tests/test_gpu.py`` checks this on any machine with
libNVVM), and in the SASS both roundings are ``DMUL``, ``FSEL``,
``FRND.F64.FLOOR``, ``DADD``; the only ``DFMA`` are inside the correctly rounded
reciprocals ``1.0 / q`` etc. of ``beta_constants`` (IEEE division, as on the
CPU).  ``bench/gpu_check.py`` compares the GPU with the CPU bit for bit on real
hardware.

No kernel or helper uses fast-math.
"""

import numpy as np
from numba import cuda

from . import _arith
from ._arith import gradient_term, stack_pop, stack_push
from ._cpu_kernels import CORRUPT, FAIL, OK

#: Coefficient layouts (the ``*_mode`` kernel arguments).
SCALAR = 0
PER_RUN = 1
PER_ELEMENT = 2

#: Slots of the int64 ``flags`` array.
FIRST_FAIL = 0  # smallest failing flat index, NO_FAIL when none
TOP = 1  # highest stack height reached by a push (a bound kept by the host)
NO_FAIL = np.int64(np.iinfo(np.int64).max)

#: Threads per block of every launch (tests lower it so tiny inputs span several blocks).
THREADS_PER_BLOCK = 256

_PLUS = np.int64(1)


def _device(func):
    """``func`` of :mod:`._arith` compiled as a CUDA device function from its own source.

    The helpers marked ``register_jitable(inline="always")`` would be inlined by
    numba's (``numba.core``) IR inliner, whose IR numba-cuda 0.30.4 cannot lower
    (every binary operation of the inlined body fails to type as
    ``mul(omitted(default=Undefined), ...)``: ``numba.core.ir.UNDEFINED`` is not
    ``numba.cuda.core.ir.UNDEFINED``).  A device function made from the same
    Python function needs no IR inlining; NVVM inlines it (``forceinline``).
    The simulator runs the Python function as it is.
    """
    if getattr(getattr(cuda, "config", None), "ENABLE_CUDASIM", 0):
        return cuda.jit(device=True)(func)  # the simulator's jit takes no forceinline
    return cuda.jit(device=True, forceinline=True)(func)


beta_constants = _device(_arith.beta_constants)
forward_velocity = _device(_arith.forward_velocity)
reverse_velocity = _device(_arith.reverse_velocity)
move_position = _device(_arith.move_position)
move_adam = _device(_arith.move_adam)


@cuda.jit(device=True)
def _coef(values, value, mode, j, run):
    """Element j's coefficient: ``value``, ``values[run]`` or ``values[j]`` by ``mode``."""
    if mode == PER_ELEMENT:
        return values[j]
    if mode == PER_RUN:
        return values[run]
    return value


@cuda.jit(device=True)
def _fail(status, flags, j, code):
    status[j] = code
    cuda.atomic.min(flags, FIRST_FAIL, j)


@cuda.jit(device=True)
def _forward(j, x, v, coder, height, words, g, alpha, alpha_value, alpha_mode, beta_n,
             beta_value, beta_mode, n_params, scale, top_known, masked, status, flags,
             move_x):
    """``v <- beta v - (1-beta) g`` (and ``x <- x + alpha v`` when ``move_x``) for element j."""
    if masked and status[j] != OK:
        return
    run = j // n_params
    b = _coef(beta_n, beta_value, beta_mode, j, run)
    omb, q, r, iq, iq1, _ = beta_constants(b)
    vn, st, word, spill, ok = forward_velocity(v[j], coder[j], g[j], omb, b, q, r, iq, iq1,
                                               scale)
    xn = np.int64(0)
    if move_x:
        xn, ok_x = move_position(x[j], vn, _coef(alpha, alpha_value, alpha_mode, j, run),
                                 _PLUS)
        ok = ok and ok_x
    if not ok:
        _fail(status, flags, j, FAIL)
        return
    if spill:
        # stack_push writes nothing when it fails, so the element stays untouched
        h, pushed = stack_push(words, np.int64(height[j]), j, word)
        if not pushed:
            _fail(status, flags, j, CORRUPT)
            return
        height[j] = np.int32(h)
        if h > top_known:
            flags[TOP] = h
    v[j] = vn
    coder[j] = st
    if move_x:
        x[j] = xn


@cuda.jit
def step(x, v, coder, height, words, g, alpha, alpha_value, alpha_mode, beta_n, beta_value,
         beta_mode, n_params, scale, top_known, masked, status, flags):
    """Fused forward step: ``v <- beta v - (1-beta) g`` then ``x <- x + alpha v``."""
    j = np.int64(cuda.grid(1))
    if j < x.shape[0]:
        _forward(j, x, v, coder, height, words, g, alpha, alpha_value, alpha_mode, beta_n,
                 beta_value, beta_mode, n_params, scale, top_known, masked, status, flags,
                 True)


@cuda.jit
def decay(v, coder, height, words, g, beta_n, beta_value, beta_mode, n_params, scale,
          top_known, masked, status, flags):
    """The velocity half of the forward step: ``v <- beta v - (1-beta) g``."""
    j = np.int64(cuda.grid(1))
    if j < v.shape[0]:
        _forward(j, v, v, coder, height, words, g, g, 0.0, SCALAR, beta_n, beta_value,
                 beta_mode, n_params, scale, top_known, masked, status, flags, False)


@cuda.jit
def position(x, v, alpha, alpha_value, alpha_mode, sign, n_params, masked, status, flags):
    """``x <- x + sign * alpha * v`` (sign +1 forward, -1 to undo)."""
    j = np.int64(cuda.grid(1))
    if j >= x.shape[0] or (masked and status[j] != OK):
        return
    a = _coef(alpha, alpha_value, alpha_mode, j, j // n_params)
    xn, ok = move_position(x[j], v[j], a, np.int64(sign))
    if ok:
        x[j] = xn
    else:
        _fail(status, flags, j, FAIL)


@cuda.jit
def adam_position(x, m, s, alpha, alpha_value, alpha_mode, eps, inv_scale_m, inv_scale_s,
                  scale, sign, n_params, masked, status, flags):
    """Adam's ``x <- x - sign * alpha * m / (sqrt(s) + eps)`` (sign +1 forward, -1 to
    undo): the twin of the CPU kernel, on the same :func:`._arith.adam_delta`.  Adam's
    moments are decayed by :func:`decay` / :func:`undecay`.  (No GPU Adam engine
    launches it yet.)"""
    j = np.int64(cuda.grid(1))
    if j >= x.shape[0] or (masked and status[j] != OK):
        return
    a = _coef(alpha, alpha_value, alpha_mode, j, j // n_params)
    xn, ok = move_adam(x[j], m[j], s[j], a, eps, inv_scale_m, inv_scale_s, scale,
                       np.int64(sign))
    if ok:
        x[j] = xn
    else:
        _fail(status, flags, j, FAIL)


@cuda.jit
def undecay(v, coder, height, words, g, beta_n, beta_value, beta_mode, n_params, scale,
            masked, status, flags):
    """The velocity half of the reverse step: ``v <- (v + (1-beta) g) / beta``."""
    j = np.int64(cuda.grid(1))
    if j >= v.shape[0] or (masked and status[j] != OK):
        return
    b = _coef(beta_n, beta_value, beta_mode, j, j // n_params)
    omb, q, r, iq, iq1, inv_n = beta_constants(b)
    vn, st, fill, ok = reverse_velocity(v[j], coder[j], g[j], omb, b, q, r, iq, iq1, inv_n,
                                        scale)
    if not ok:
        _fail(status, flags, j, FAIL)
        return
    if fill:
        word, h = stack_pop(words, np.int64(height[j]), j)
        height[j] = np.int32(h)
        st = st | word
    v[j] = vn
    coder[j] = st


@cuda.jit
def to_fixed(values, scale, out, status, flags):
    """``out[j] = round(values[j] * scale)`` by the engine's rule; failures flagged."""
    j = np.int64(cuda.grid(1))
    if j >= values.shape[0]:
        return
    value, ok = gradient_term(1.0, values[j], scale)
    if ok:
        out[j] = value
    else:
        _fail(status, flags, j, FAIL)


@cuda.jit
def to_float(values, scale, out):
    """``out[j] = values[j] / scale``: fixed point back to float64, as the host does it."""
    j = cuda.grid(1)
    if j < values.shape[0]:
        out[j] = np.float64(values[j]) / scale


@cuda.jit
def fill(out, value):
    """``out[:] = value`` for a 1-D array."""
    j = cuda.grid(1)
    if j < out.shape[0]:
        out[j] = value


def launch(kernel, size, *args):
    """Run ``kernel`` over ``size`` elements, THREADS_PER_BLOCK threads a block."""
    if size > 0:
        blocks = -(-size // THREADS_PER_BLOCK)
        kernel[blocks, THREADS_PER_BLOCK](*args)
