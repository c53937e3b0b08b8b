"""Numba CPU kernels for the reversible momentum step.

Each kernel walks the parameters in fixed-size chunks (one ``prange`` iteration a
chunk) in two loops:

1. a branch-free loop that updates every element (LLVM vectorises it) and writes a
   status byte per element: ``FAIL`` for an element that cannot be updated (a
   non-finite input or a fixed-point overflow; it is left untouched), ``STACK``
   for one whose coder must move a word to or from its stack;
2. a scalar loop that does those rare stack moves and finds the chunk's first
   failure and highest stack.

Elements whose status is ``FAIL`` on entry are skipped: after a failed call the
host runs the inverse kernel with the same status array, which undoes exactly the
elements that were updated, and the engine is as it was.  The status array is all
zero between calls.  All arithmetic is in :mod:`._arith`.

Every kernel is compiled twice from one Python function, a serial and a parallel
build, which give identical bits.  Small vectors always take the serial build:
starting the thread team costs more than it saves (and its spinning threads slow
down the BLAS calls of the model's gradient between steps).  For large vectors the
faster build is picked at run time from the calls' own timings (see
:class:`_Choice`): on an idle machine that is the parallel one, but when other
processes keep cores busy the thread team waits for its slowest thread, and the
serial build can be the faster.
"""

import math
import time
import types

import numpy as np
from numba import njit, prange, types as nbtypes
from numba.extending import overload

from ._arith import (
    beta_constants,
    forward_velocity,
    gradient_term,
    move_adam,
    move_position,
    reverse_velocity,
    stack_pop,
    stack_push,
)

#: Status byte values.
OK = np.uint8(0)
FAIL = np.uint8(1)  # non-finite input or fixed-point overflow; element untouched
STACK = np.uint8(2)  # done, but a word must still move to or from the stack
CORRUPT = np.uint8(4)  # a nonzero word must go below the bottom of an overdrawn stack
ROOM = np.uint8(8)  # the stack's column is full: grow the word array and retry
SKIP = np.uint8(16)  # already done: skipped by a retry

_NO_INDEX = np.int64(-1)


def _at(coef, i):
    """``coef[i]`` for a per-parameter array, ``coef`` itself for a scalar."""
    return coef[i] if np.ndim(coef) else coef


@overload(_at, inline="always")
def _at_overload(coef, i):
    # Scalars and arrays compile to separate kernels, so the choice costs nothing in
    # the loop and keeps it free of loads the vectoriser cannot speculate.
    if isinstance(coef, nbtypes.Array):
        return lambda coef, i: coef[i]
    return lambda coef, i: coef


def _part(coef, lo, hi):
    """``coef[lo:hi]`` for a per-parameter array, ``coef`` itself for a scalar."""
    return coef[lo:hi] if np.ndim(coef) else coef


@overload(_part, inline="always")
def _part_overload(coef, lo, hi):
    if isinstance(coef, nbtypes.Array):
        return lambda coef, lo, hi: coef[lo:hi]
    if isinstance(coef, nbtypes.BaseTuple):  # a per-parameter table of beta constants
        return lambda coef, lo, hi: (coef[0][lo:hi], coef[1][lo:hi], coef[2][lo:hi],
                                     coef[3][lo:hi], coef[4][lo:hi], coef[5][lo:hi],
                                     coef[6][lo:hi])
    return lambda coef, lo, hi: coef


def _beta_at(beta, i):
    """(n, 1 - beta, q, r, 1/q, 1/(q+1), 1/n) of parameter i."""


@overload(_beta_at, inline="always")
def _beta_at_overload(beta, i):
    # A scalar numerator: the constants are loop-invariant and computed once.  A
    # per-parameter table (see beta_table): loads, since a division per element would
    # cost more than the step itself.
    if isinstance(beta, nbtypes.BaseTuple):
        return lambda beta, i: (beta[0][i], beta[1][i], beta[2][i], beta[3][i], beta[4][i],
                                beta[5][i], beta[6][i])
    return lambda beta, i: (np.int64(beta),) + beta_constants(beta)


@njit(cache=True)
def to_float(fixed, inv_scale):
    """A new float64 array ``fixed * inv_scale``: the value of each fixed-point number
    (``inv_scale`` a power of two, so the product is the exact quotient, rounded once,
    as NumPy's ``fixed / scale``)."""
    out = np.empty(fixed.shape[0])
    for i in range(fixed.shape[0]):
        out[i] = np.float64(fixed[i]) * inv_scale
    return out


@njit(cache=True)
def beta_table(beta_n):
    """Per-parameter beta constants, (n, 1 - beta, q, r, 1/q, 1/(q+1), 1/n) arrays.

    Computed by :func:`._arith.beta_constants` itself, so a table gives the kernels
    exactly the values they would compute per element.
    """
    size = beta_n.shape[0]
    omb, inv_q, inv_q1, inv_n = (np.empty(size), np.empty(size), np.empty(size),
                                 np.empty(size))
    q = np.empty(size, dtype=np.uint64)
    r = np.empty(size, dtype=np.uint64)
    for i in range(size):
        omb[i], q[i], r[i], inv_q[i], inv_q1[i], inv_n[i] = beta_constants(beta_n[i])
    return (beta_n.astype(np.int64), omb, q, r, inv_q, inv_q1, inv_n)


@njit(cache=True, inline="always")
def _status(before, ok, stack):
    """The new status byte, computed with selects (no branches).

    An element whose status was not OK on entry was skipped and keeps it.
    """
    new = np.uint8(np.int64(not ok) | (np.int64(ok & stack) << 1))
    return new if before == OK else before


# The element loops below run on one chunk's slices: LLVM vectorises a loop over
# ``range(len(slice))`` but not the same loop over ``range(lo, hi)`` of whole arrays.

@njit(cache=True)
def _fix_loop(values, scale, out, status):
    n_bad = 0
    for i in range(values.shape[0]):
        value, ok = gradient_term(1.0, values[i], scale)
        out[i] = value
        status[i] = _status(OK, ok, False)
        n_bad += not ok
    return n_bad


@njit(cache=True)
def _forward_loop(x, v, state, height, rows, g, alpha, beta_n, scale, status, scratch,
                  move_x):
    for i in range(v.shape[0]):
        b, omb, q, r, iq, iq1, _ = _beta_at(beta_n, i)
        vn, st, word, spill, ok = forward_velocity(v[i], state[i], g[i], omb, b, q, r, iq,
                                                   iq1, scale)
        if move_x:
            xn, ok_x = move_position(x[i], vn, _at(alpha, i), 1)
            ok &= ok_x
        # A spilled word needs a free row, or a zero word below an overdrawn stack.
        h = height[i]
        full = spill & (h >= rows)
        overdrawn = spill & (h < 0) & (word != 0)
        before = status[i]
        good = ok & (before == OK) & (not full) & (not overdrawn)
        if move_x:
            x[i] = xn if good else x[i]
        v[i] = vn if good else v[i]
        state[i] = st if good else state[i]
        scratch[i] = np.uint16(word)
        new = ROOM if full else (CORRUPT if overdrawn else (STACK if spill else OK))
        new = new if ok else FAIL
        status[i] = new if before == OK else before


@njit(cache=True, inline="always")
def _set_position(x, i, xn, ok, status):
    """``x[i] = xn`` where the element's move is ``ok`` and its status was OK (left as it
    was otherwise, its status saying why); returns 1 for an element not moved, else 0."""
    before = status[i]
    good = ok & (before == OK)
    x[i] = xn if good else x[i]
    status[i] = _status(before, ok, False)
    return np.int64(not good)


@njit(cache=True)
def _position_loop(x, v, alpha, sign, status):
    n_bad = 0
    for i in range(x.shape[0]):
        xn, ok = move_position(x[i], v[i], _at(alpha, i), sign)
        n_bad += _set_position(x, i, xn, ok, status)
    return n_bad


@njit(cache=True)
def _reverse_loop(v, state, g, beta_n, scale, status):
    for i in range(v.shape[0]):
        b, omb, q, r, iq, iq1, inv_n = _beta_at(beta_n, i)
        vn, st, fill, ok = reverse_velocity(v[i], state[i], g[i], omb, b, q, r, iq, iq1,
                                            inv_n, scale)
        before = status[i]
        good = ok & (before == OK)
        v[i] = vn if good else v[i]
        state[i] = st if good else state[i]
        status[i] = _status(before, ok, fill)


@njit(cache=True)
def _first_failure(status, lo, hi):
    for i in range(lo, hi):
        if status[i] != OK and status[i] != SKIP:
            return np.int64(i)
    return _NO_INDEX


@njit(cache=True)
def _push_spills(status, scratch, height, words, lo, hi):
    """Second loop of the forward kernels: push the spilled words.

    Returns the first failing index of the chunk, or -1.  The status bytes are
    scanned eight at a time (the array is padded to a multiple of 8 and chunks
    start at multiples of 8): most are zero.
    """
    first = _NO_INDEX
    packed = status.view(np.uint64)
    for w in range(lo >> 3, (hi + 7) >> 3):
        if packed[w] == 0:
            continue
        for i in range(w << 3, min((w << 3) + 8, hi)):
            s = status[i]
            if s == STACK:  # room was checked by the first loop
                h, _ = stack_push(words, np.int64(height[i]), i, scratch[i])
                height[i] = np.int32(h)
                s = OK
                status[i] = s
            if s != OK and s != SKIP and first < 0:
                first = np.int64(i)
    return first


@njit(cache=True)
def _pop_fills(status, state, height, words, lo, hi):
    """Second loop of the reverse kernel: refill the coders from their stacks."""
    first = _NO_INDEX
    packed = status.view(np.uint64)
    for w in range(lo >> 3, (hi + 7) >> 3):
        if packed[w] == 0:
            continue
        for i in range(w << 3, min((w << 3) + 8, hi)):
            s = status[i]
            if s == STACK:
                word, h = stack_pop(words, np.int64(height[i]), i)
                height[i] = np.int32(h)
                state[i] |= word
                status[i] = OK
            elif s != OK and s != SKIP and first < 0:
                first = np.int64(i)
    return first


def _to_fixed(values, scale, out, status, chunk, first_fail):
    """out[i] = round(values[i] * scale) by the engine's rule."""
    n = values.shape[0]
    for c in prange(first_fail.shape[0]):
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        n_bad = _fix_loop(values[lo:hi], scale, out[lo:hi], status[lo:hi])
        first_fail[c] = _first_failure(status, lo, hi) if n_bad else _NO_INDEX


def _step(x, v, state, height, words, g, alpha, beta_n, scale, status, scratch, chunk,
          first_fail):
    """Fused forward step: ``v <- beta v - (1-beta) g`` then ``x <- x + alpha v``."""
    n = x.shape[0]
    for c in prange(first_fail.shape[0]):
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        _forward_loop(x[lo:hi], v[lo:hi], state[lo:hi], height[lo:hi], words.shape[0],
                      g[lo:hi], _part(alpha, lo, hi), _part(beta_n, lo, hi), scale,
                      status[lo:hi], scratch[lo:hi], True)
        first_fail[c] = _push_spills(status, scratch, height, words, lo, hi)


def _position(x, v, alpha, sign, status, chunk, first_fail):
    """``x <- x + sign * alpha * v`` (sign +1 forward, -1 to undo)."""
    n = x.shape[0]
    for c in prange(first_fail.shape[0]):
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        n_bad = _position_loop(x[lo:hi], v[lo:hi], _part(alpha, lo, hi), sign, status[lo:hi])
        first_fail[c] = _first_failure(status, lo, hi) if n_bad else _NO_INDEX


def _decay(v, state, height, words, g, beta_n, scale, status, scratch, chunk, first_fail):
    """The velocity half of the forward step: ``v <- beta v - (1-beta) g``."""
    n = v.shape[0]
    for c in prange(first_fail.shape[0]):
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        _forward_loop(v[lo:hi], v[lo:hi], state[lo:hi], height[lo:hi], words.shape[0],
                      g[lo:hi], 0.0, _part(beta_n, lo, hi), scale, status[lo:hi],
                      scratch[lo:hi], False)
        first_fail[c] = _push_spills(status, scratch, height, words, lo, hi)


def _undecay(v, state, height, words, g, beta_n, scale, status, chunk, first_fail):
    """The velocity half of the reverse step: ``v <- (v + (1-beta) g) / beta``."""
    n = v.shape[0]
    for c in prange(first_fail.shape[0]):
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        _reverse_loop(v[lo:hi], state[lo:hi], g[lo:hi], _part(beta_n, lo, hi), scale,
                      status[lo:hi])
        first_fail[c] = _pop_fills(status, state, height, words, lo, hi)


#: Below this many parameters the serial kernels are used.
PARALLEL_MIN_SIZE = 1 << 15
#: "serial" or "parallel" to run that build at every size (tests, benchmarks);
#: None to choose by size and timings.
FORCE_BUILD = None
#: The share of kernel time spent timing again the build that was slower.
RETIME_SHARE = 1 / 32
#: The weight of a call's time in the running mean of the faster build's time.
LATEST_WEIGHT = 1 / 8
#: Kinds of call remembered per kernel; more are forgotten all at once.
MAX_CHOICES = 64

_SERIAL, _PARALLEL = 0, 1


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


class _Choice:
    """Which build of a kernel is faster for one kind of call, timed on the calls themselves.

    Each build's first call is not counted (it may compile or load from the cache,
    and it touches cold memory); its second gives it a time in seconds.  From then
    on the faster build runs, its time a running mean of its calls (weight
    LATEST_WEIGHT on the latest), and the slower build is timed again once the
    faster one has run for ``1 / RETIME_SHARE`` times the slower one's last time:
    re-timing costs at most about RETIME_SHARE of the kernel time, however slow the
    slower build has become.

    With another process computing, the parallel build's calls vary: most as fast
    as idle, some several times slower (a thread that lost its core holds up the
    team).  The running mean weighs both as they come, so the build with the
    smaller mean time wins, and a load that slows a build several times over
    shows within a call or two.
    """

    def __init__(self):
        self.calls = [0, 0]  # per build
        self.seconds = [math.inf, math.inf]  # per build: the time of one call
        self.since_retime = 0.0  # seconds the faster build ran since the slower was timed

    def pick(self):
        """The build to run next: _SERIAL or _PARALLEL."""
        for build in (_SERIAL, _PARALLEL):
            if self.calls[build] < 2:
                return build
        fast = _SERIAL if self.seconds[_SERIAL] <= self.seconds[_PARALLEL] else _PARALLEL
        slow = 1 - fast
        return slow if self.since_retime * RETIME_SHARE >= self.seconds[slow] else fast

    def record(self, build, seconds):
        """Note that a call of ``build`` took ``seconds``."""
        self.calls[build] += 1
        if self.calls[build] == 1:
            return
        mine, other = self.seconds[build], self.seconds[1 - build]
        if math.isfinite(mine) and mine <= other:  # the faster build
            self.seconds[build] = mine + LATEST_WEIGHT * (seconds - mine)
            self.since_retime += seconds
        else:  # its first time, or the slower build timed again: the old time is stale
            self.seconds[build] = seconds
            self.since_retime = 0.0


class _Kernel:
    """One kernel function compiled serially and in parallel, calling the faster.

    Below PARALLEL_MIN_SIZE elements the serial build runs.  Above, one
    :class:`_Choice` per kind of call (vector length and argument types: a scalar
    or per-parameter beta costs differently) picks the build.
    """

    instances = []

    def __init__(self, func):
        self.serial = njit(cache=True)(_renamed(func, "_serial"))
        self.parallel = njit(cache=True, parallel=True)(func)
        self.__doc__ = func.__doc__
        self.choices = {}
        _Kernel.instances.append(self)

    def __call__(self, first, *args):
        n = first.shape[0]
        if FORCE_BUILD is not None:
            return getattr(self, FORCE_BUILD)(first, *args)
        if n < PARALLEL_MIN_SIZE:
            return self.serial(first, *args)
        key = (n,) + tuple(map(type, args))
        choice = self.choices.get(key)
        if choice is None:
            if len(self.choices) >= MAX_CHOICES:
                self.choices.clear()
            choice = self.choices[key] = _Choice()
        build = choice.pick()
        start = time.perf_counter()
        result = (self.parallel if build == _PARALLEL else self.serial)(first, *args)
        choice.record(build, time.perf_counter() - start)
        return result


def forget_timings():
    """Start every kernel's choice of build afresh (benchmarks that change the load)."""
    for kernel in _Kernel.instances:
        kernel.choices.clear()


to_fixed = _Kernel(_to_fixed)
step = _Kernel(_step)
position = _Kernel(_position)
decay = _Kernel(_decay)
undecay = _Kernel(_undecay)


# --- Adam -----------------------------------------------------------------------------
# Adam's moments m and s are decayed accumulators, updated by the velocity kernels
# above (``decay`` / ``undecay``, each with its own coder and stacks); only the
# position update is Adam's own.

# error_model="numpy": the quotient's denominator is >= eps > 0, and Python's
# zero-division check (a branch per element) would stop the loop from vectorising.
@njit(cache=True, error_model="numpy")
def _adam_position_loop(x, m, s, alpha, eps, inv_scale_m, inv_scale_s, scale, sign, status):
    n_bad = 0
    for i in range(x.shape[0]):
        xn, ok = move_adam(x[i], m[i], s[i], _at(alpha, i), eps, inv_scale_m, inv_scale_s,
                           scale, sign)
        n_bad += _set_position(x, i, xn, ok, status)
    return n_bad


def _adam_position(x, m, s, alpha, eps, inv_scale_m, inv_scale_s, scale, sign, status, chunk,
                   first_fail):
    """``x <- x - sign * alpha * m / (sqrt(s) + eps)`` (sign +1 forward, -1 to undo)."""
    n = x.shape[0]
    for c in prange(first_fail.shape[0]):
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        n_bad = _adam_position_loop(x[lo:hi], m[lo:hi], s[lo:hi], _part(alpha, lo, hi), eps,
                                    inv_scale_m, inv_scale_s, scale, sign, status[lo:hi])
        first_fail[c] = _first_failure(status, lo, hi) if n_bad else _NO_INDEX


adam_position = _Kernel(_adam_position)
