"""Numba CPU kernels for the reversible momentum step.

Each kernel walks the parameters in fixed-size chunks (one ``prange`` iteration a
chunk) and stops a chunk at its first element that cannot be updated (a non-finite
input or a fixed-point overflow).  Nothing is written for that element, so the
host can undo exactly the elements that were updated (the ``ends`` argument limits
each chunk, and the inverse kernel is run on what the failed call reports in
``done``) and leave the engine as it was.  All arithmetic is in :mod:`._arith`.

Every kernel is compiled twice from one Python function: a parallel version for
large vectors and a serial one for small vectors, where starting the thread team
costs more than it saves (and its spinning threads slow down the BLAS calls of the
model's gradient between steps).
"""

import types

import numpy as np
from numba import njit, prange

from ._arith import (
    BETA_DENOM,
    forward_velocity,
    gradient_term,
    move_position,
    reverse_velocity,
    stack_pop,
    stack_push,
    uniform_code,
)

_INV_DENOM = 1.0 / BETA_DENOM
_I_DENOM = np.int64(BETA_DENOM)
_NO_HEIGHT = np.int64(-(1 << 62))


@njit(cache=True, inline="always")
def _beta_consts(n):
    """Per-beta constants for the kernels: (one_minus_beta, q, r, 1/q, 1/(q+1), 1/n)."""
    q, r = uniform_code(np.uint64(n))
    one_minus_beta = np.float64(_I_DENOM - n) * _INV_DENOM
    return (one_minus_beta, q, r, 1.0 / np.float64(q), 1.0 / np.float64(q + np.uint64(1)),
            1.0 / np.float64(n))


@njit(cache=True, inline="always")
def _chunk_size(n, n_chunks):
    return (n + n_chunks - 1) // n_chunks


def _to_fixed(values, scale, out, ends, done):
    """out[i] = round(values[i] * scale) by the engine's rule; per-chunk stop on failure."""
    chunk = _chunk_size(values.shape[0], ends.shape[0])
    for c in prange(ends.shape[0]):
        i = c * chunk
        while i < ends[c]:
            value, ok = gradient_term(1.0, values[i], scale)
            if not ok:
                break
            out[i] = value
            i += 1
        done[c] = i


def _step(x, v, state, height, words, g, alpha, beta_n, scale, ends, done, top):
    """Fused forward step: ``v <- beta v - (1-beta) g`` then ``x <- x + alpha v``."""
    per_alpha = alpha.shape[0] > 1
    per_beta = beta_n.shape[0] > 1
    omb0, q0, r0, iq0, iq10, _ = _beta_consts(beta_n[0])
    chunk = _chunk_size(x.shape[0], ends.shape[0])
    for c in prange(ends.shape[0]):
        i = c * chunk
        h_top = _NO_HEIGHT
        omb, q, r, iq, iq1, n, a = omb0, q0, r0, iq0, iq10, beta_n[0], alpha[0]
        while i < ends[c]:
            if per_beta:
                n = beta_n[i]
                omb, q, r, iq, iq1, _ = _beta_consts(n)
            if per_alpha:
                a = alpha[i]
            vn, st, word, spill, ok = forward_velocity(v[i], state[i], g[i], omb, n, q, r,
                                                       iq, iq1, scale)
            if not ok:
                break
            xn, ok = move_position(x[i], vn, a, 1)
            if not ok:
                break
            h = np.int64(height[i])
            if spill:
                h, ok = stack_push(words, h, i, word)
                if not ok:
                    break
                height[i] = np.int32(h)
                h_top = max(h_top, h)
            x[i] = xn
            v[i] = vn
            state[i] = st
            i += 1
        done[c] = i
        top[c] = h_top


def _position(x, v, alpha, sign, ends, done):
    """``x <- x + sign * alpha * v`` (sign +1 forward, -1 to undo)."""
    per_alpha = alpha.shape[0] > 1
    chunk = _chunk_size(x.shape[0], ends.shape[0])
    for c in prange(ends.shape[0]):
        i = c * chunk
        a = alpha[0]
        while i < ends[c]:
            if per_alpha:
                a = alpha[i]
            xn, ok = move_position(x[i], v[i], a, sign)
            if not ok:
                break
            x[i] = xn
            i += 1
        done[c] = i


def _decay(v, state, height, words, g, beta_n, scale, ends, done, top):
    """The velocity half of the forward step: ``v <- beta v - (1-beta) g``."""
    per_beta = beta_n.shape[0] > 1
    omb0, q0, r0, iq0, iq10, _ = _beta_consts(beta_n[0])
    chunk = _chunk_size(v.shape[0], ends.shape[0])
    for c in prange(ends.shape[0]):
        i = c * chunk
        h_top = _NO_HEIGHT
        omb, q, r, iq, iq1, n = omb0, q0, r0, iq0, iq10, beta_n[0]
        while i < ends[c]:
            if per_beta:
                n = beta_n[i]
                omb, q, r, iq, iq1, _ = _beta_consts(n)
            vn, st, word, spill, ok = forward_velocity(v[i], state[i], g[i], omb, n, q, r,
                                                       iq, iq1, scale)
            if not ok:
                break
            if spill:
                h, ok = stack_push(words, np.int64(height[i]), i, word)
                if not ok:
                    break
                height[i] = np.int32(h)
                h_top = max(h_top, h)
            v[i] = vn
            state[i] = st
            i += 1
        done[c] = i
        top[c] = h_top


def _undecay(v, state, height, words, g, beta_n, scale, ends, done):
    """The velocity half of the reverse step: ``v <- (v + (1-beta) g) / beta``."""
    per_beta = beta_n.shape[0] > 1
    omb0, q0, r0, iq0, iq10, in0 = _beta_consts(beta_n[0])
    chunk = _chunk_size(v.shape[0], ends.shape[0])
    for c in prange(ends.shape[0]):
        i = c * chunk
        omb, q, r, iq, iq1, inv_n, n = omb0, q0, r0, iq0, iq10, in0, beta_n[0]
        while i < ends[c]:
            if per_beta:
                n = beta_n[i]
                omb, q, r, iq, iq1, inv_n = _beta_consts(n)
            vn, st, fill, ok = reverse_velocity(v[i], state[i], g[i], omb, n, q, r, iq, iq1,
                                                inv_n, scale)
            if not ok:
                break
            if fill:
                word, h = stack_pop(words, np.int64(height[i]), i)
                height[i] = np.int32(h)
                st |= word
            v[i] = vn
            state[i] = st
            i += 1
        done[c] = i


#: Below this many parameters the serial kernels are used.
PARALLEL_MIN_SIZE = 1 << 17


def _renamed(func, suffix):
    """A copy of ``func`` under another name.

    Numba's on-disk cache is keyed by the function's qualified name and source line,
    not by the ``parallel`` flag, so the serial and parallel builds of one function
    would overwrite each other's cache entries.
    """
    copy = types.FunctionType(func.__code__, func.__globals__, func.__name__ + suffix,
                              func.__defaults__, func.__closure__)
    copy.__qualname__ = func.__qualname__ + suffix
    copy.__doc__ = func.__doc__
    return copy


class _Kernel:
    """One kernel function compiled serially and in parallel; picks by vector length."""

    def __init__(self, func):
        self.serial = njit(cache=True)(_renamed(func, "_serial"))
        self.parallel = njit(cache=True, parallel=True)(func)
        self.__doc__ = func.__doc__

    def __call__(self, first, *args):
        big = first.shape[0] >= PARALLEL_MIN_SIZE
        return (self.parallel if big else self.serial)(first, *args)


to_fixed = _Kernel(_to_fixed)
step = _Kernel(_step)
position = _Kernel(_position)
decay = _Kernel(_decay)
undecay = _Kernel(_undecay)
