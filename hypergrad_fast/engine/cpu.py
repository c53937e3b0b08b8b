"""The exact reversible SGD-with-momentum engine (CPU).

Momentum convention (the paper's Algorithm 1)::

    v <- beta * v - (1 - beta) * g
    x <- x + alpha * v

``x`` and ``v`` are held as int64 fixed-point numbers with ``frac_bits`` bits after
the radix point; ``beta`` is held as the rational ``n / 2**16``; the digits that the
division by ``2**16`` drops are kept in a per-parameter information buffer, so
every step can be undone bit for bit at a net cost of ``log2(2**16 / n)`` bits
per parameter per iteration.
"""

from typing import NamedTuple

import numpy as np

from . import _cpu_kernels as k
from ._arith import (
    BETA_DENOM,
    BETA_MIN_NUMER,
    FIXED_LIMIT_BITS,
    STATE_INIT,
    STATE_LOW_BITS,
    WORD_BITS,
)

#: Parameters per kernel chunk: the granularity of error reporting and rollback.
CHUNK = 1 << 14


def beta_numerator(beta):
    """The integer ``n`` with ``beta ~= n / 2**16`` that the engine uses.

    ``beta`` is a scalar or an array in (0, 1]; values below ``2 / 2**16`` are held
    as ``2 / 2**16`` (the coder needs ``n >= 2``).  Inputs are not validated here.
    """
    n = np.rint(np.asarray(beta, dtype=np.float64) * BETA_DENOM).astype(np.int64)
    return np.clip(n, BETA_MIN_NUMER, BETA_DENOM)


def effective_beta(beta):
    """The decay actually applied for ``beta``: ``beta_numerator(beta) / 2**16``."""
    return beta_numerator(beta) / BETA_DENOM


def information_bound(beta):
    """Entropy bound in bits per parameter per iteration: ``log2(2**16 / n)``."""
    return np.log2(BETA_DENOM / beta_numerator(beta))


def held_bits(coder, height):
    """Bits held by information buffers with these coder states and stack heights.

    A stack of h words and a coder state s in [2**48, 2**64) hold 16 h + log2(s) - 48
    bits; summed over every element (in the order of the flattened arrays).
    """
    held = np.log2(np.asarray(coder).astype(np.float64)) - STATE_LOW_BITS
    return float(WORD_BITS * np.asarray(height).astype(np.float64).sum() + held.sum())


def stack_contents(words, height):
    """The word stacks as :class:`EngineState` reports them, from a host copy of the rows.

    ``words`` is a (rows, columns) copy of the lowest rows of the word array and
    ``height`` the columns' stack heights; ``words[h, i]`` is kept for ``h < height[i]``
    and set to 0 above (in place).  Returns ``words``.
    """
    # A pop, and the rollback of a refused push, leave the word in memory above the
    # new top: free space, which must not show in the state.  Rows below the lowest
    # stack are all live.
    for h in range(max(int(height.min()), 0), words.shape[0]):
        words[h, height <= h] = 0
    return words


def check_frac_bits(frac_bits):
    """``frac_bits`` as an int in [0, 60]; ValueError for anything else (bools included)."""
    if (isinstance(frac_bits, (bool, np.bool_)) or not isinstance(frac_bits, (int, np.integer))
            or not 0 <= frac_bits <= 60):
        raise ValueError(f"frac_bits must be an integer in [0, 60], got {frac_bits!r}")
    return int(frac_bits)


def check_iterations(iterations):
    """``iterations`` as an int >= 0; ValueError for anything else (bools included)."""
    if (isinstance(iterations, (bool, np.bool_))
            or not isinstance(iterations, (int, np.integer)) or iterations < 0):
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    return int(iterations)


def check_decays(beta):
    """``beta`` (any shape) as float64, every value a decay in (0, 1].

    Raises ValueError naming the first value that is not (NaN and infinities
    included), TypeError for a non-real dtype.
    """
    arr = np.asarray(beta)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"beta must be real, got dtype {arr.dtype}")
    a = arr.astype(np.float64, copy=False)  # a broadcast (T, B, N) view stays a view
    bad = ~((a > 0.0) & (a <= 1.0))  # NaN fails both comparisons
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), a.shape)
        where = "beta" + (f"[{', '.join(str(int(i)) for i in index)}]" if index else "")
        value = a[index]
        problem = "is outside (0, 1]" if np.isfinite(value) else "is not finite"
        raise ValueError(f"{where} = {value} {problem}")
    return a


class EngineState(NamedTuple):
    """The whole state of a :class:`ReversibleMomentum` engine.

    x, v:     int64 fixed-point position and velocity, shape (N,)
    coder:    uint64 coder state per parameter, in [2**48, 2**64)
    height:   int32 number of 16-bit words each parameter has on its stack
              (negative after borrowing from an empty stack)
    words:    uint16 word stacks, shape (rows, N) with rows the highest stack (0 if
              none is above 0): words[h, i] is word h of parameter i for
              h < height[i], and 0 for h >= height[i]

    Two engines hold the same numbers exactly when every field is equal
    (``np.array_equal``): the memory above a stack's top is free space, never
    part of the state, so a refused call leaves the whole state as it was.
    """

    x: np.ndarray
    v: np.ndarray
    coder: np.ndarray
    height: np.ndarray
    words: np.ndarray


class _PreparedFields(NamedTuple):
    name: str  # "alpha" or "beta"
    size: int  # the engine size it was prepared for
    numerators: object  # beta: the numerators n (int or (N,) int64); alpha: None
    kernel_arg: object  # what the kernels take: a float / int, an array or a table


class Prepared(_PreparedFields):
    """An ``alpha`` or ``beta`` validated once, to pass to the steps again and again.

    Made by :meth:`ReversibleMomentum.prepare_alpha` / :meth:`~ReversibleMomentum.prepare_beta`
    only: the engines refuse (TypeError) a ``Prepared`` built by hand or with
    ``_replace``, whose fields nobody validated.  A schedule that repeats its
    coefficients saves their validation and, for per-parameter betas, the table
    of their constants at every step.  Its arrays are the engine's own copies.
    """

    # No ``__slots__ = ()``: an instance has a __dict__ for the mark below, which
    # copies and pickles keep and which tuple construction (by hand, ``_make``,
    # ``_replace``) never sets.
    _made_by_engine = False


def _made(name, size, numerators, kernel_arg):
    """A :class:`Prepared` marked as made (and validated) by an engine."""
    prepared = Prepared(name, size, numerators, kernel_arg)
    prepared._made_by_engine = True
    return prepared


def _for_kernel(coef):
    """A one-element coefficient as a scalar: the kernels compile a scalar version."""
    return coef[0].item() if coef.shape[0] == 1 else coef


def _first(first_fail):
    """The first failing index over all chunks, or -1."""
    bad = first_fail[first_fail >= 0]
    return int(bad.min()) if bad.size else -1


class StepOrder:
    """The order of forward and reverse half-steps, shared by the CPU and GPU engines.

    A reverse step is ``unstep_position`` then ``unstep_velocity``; a forward step may
    not start in between, and no more steps can be undone than were taken.  The
    engine methods call ``_before_*`` first and ``_after_*`` once they succeeded.
    """

    _iterations = 0
    _position_undone = False

    @property
    def iterations(self):
        """Forward steps taken minus steps undone."""
        return self._iterations

    def _before_step(self):
        if self._position_undone:
            raise RuntimeError("unstep_position was called without its unstep_velocity; "
                               "finish the reverse step first")

    def _after_step(self):
        self._iterations += 1

    def _before_unstep_position(self):
        if self._position_undone:
            raise RuntimeError("unstep_position called twice; call unstep_velocity first")
        if self._iterations <= 0:
            raise ValueError("no step left to undo: the engine is back at its first state")

    def _after_unstep_position(self):
        self._position_undone = True

    def _before_unstep_velocity(self):
        if not self._position_undone:
            raise RuntimeError("unstep_velocity must follow unstep_position")

    def _after_unstep_velocity(self):
        self._position_undone = False
        self._iterations -= 1


class ReversibleMomentum(StepOrder):
    """SGD with momentum that can be run backwards exactly.

    Parameters
    ----------
    x0, v0 : 1-D float64 arrays of the same length N (``v0`` defaults to zeros).
        Converted to fixed point with the engine's rounding rule.
    frac_bits : int
        Bits after the radix point (default 52).  Values must satisfy
        ``|value| < 2**(62 - frac_bits)``.

    After ``T`` calls of :meth:`step` and ``T`` matching reverse steps
    (:meth:`unstep_position` then :meth:`unstep_velocity`, each with the inputs of
    its forward step, last step first), ``x`` and ``v`` are back to their starting
    fixed-point values bit for bit and the buffer is empty.  A call refused with an
    exception leaves the engine exactly as it was.
    """

    def __init__(self, x0, v0=None, frac_bits=52):
        self.frac_bits = check_frac_bits(frac_bits)
        self._scale = float(2.0**self.frac_bits)
        x0 = self._vector(x0, "x0", None)
        n = x0.shape[0]
        if n == 0:
            raise ValueError("x0 must hold at least one parameter")
        v0 = np.zeros(n) if v0 is None else self._vector(v0, "v0", n)
        # Chunks start at multiples of 8 and the status array is padded to a multiple
        # of 8: the kernels scan status bytes eight at a time.
        size = -(-n // -(-n // CHUNK))  # equal chunks of at most CHUNK
        self._chunk = -(-size // 8) * 8
        n_chunks = -(-n // self._chunk)
        self._first_fail = np.empty(n_chunks, dtype=np.int64)
        self._status = np.zeros(-(-n // 8) * 8, dtype=np.uint8)  # all zero between calls
        self._scratch = np.empty(n, dtype=np.uint16)
        self._x = self._fix(x0, "x0")
        self._v = self._fix(v0, "v0")
        self._coder = np.full(n, STATE_INIT, dtype=np.uint64)
        self._height = np.zeros(n, dtype=np.int32)
        self._words = np.zeros((0, n), dtype=np.uint16)
        self._beta_cache = None

    # ----------------------------------------------------------------- properties
    @property
    def size(self):
        """Number of parameters N."""
        return self._x.shape[0]

    @property
    def x(self):
        """Current position as a float64 copy."""
        return self._x / self._scale

    @property
    def v(self):
        """Current velocity as a float64 copy."""
        return self._v / self._scale

    @property
    def aux_bits(self):
        """Information held in the buffer, in bits (summed over parameters)."""
        return held_bits(self._coder, self._height)

    @property
    def aux_nbytes(self):
        """Bytes allocated for the buffer's word stacks.

        The 8-byte coder state and 4-byte height per parameter are a fixed
        overhead, reported by :attr:`state_nbytes`.
        """
        return self._words.nbytes

    @property
    def state_nbytes(self):
        """Fixed bytes of the coder (state and stack height per parameter)."""
        return self._coder.nbytes + self._height.nbytes

    @property
    def state(self):
        """Copies of the exact integer state, as an :class:`EngineState`.

        ``words`` holds each stack's words and zeros above its top (see
        :class:`EngineState`).
        """
        height = self._height.copy()
        rows = max(int(height.max()), 0)
        return EngineState(self._x.copy(), self._v.copy(), self._coder.copy(), height,
                           stack_contents(self._words[:rows].copy(), height))

    # ----------------------------------------------------------------- capacity
    def reserve(self, iterations, beta):
        """Allocate the word stacks for ``iterations`` more steps at decay ``beta``.

        Sizing up front means the buffer is never regrown during the run.
        ``iterations`` is an integer >= 0; ``beta`` is a scalar, a per-parameter
        array (N,), or a sequence of per-step values, shape (iterations,),
        (iterations, N) or (iterations, 1); every value must be in (0, 1]
        (ValueError naming the first that is not).  Where a shape fits both
        readings (iterations == N), the per-parameter reading wins.
        """
        iterations = check_iterations(iterations)
        bits = information_bound(check_decays(beta))
        n = self.size
        if bits.shape in ((), (n,)):
            per_param = bits * iterations
        elif bits.shape in ((iterations,), (iterations, n), (iterations, 1)):
            per_param = bits.sum(axis=0)
        else:
            raise ValueError(
                f"beta must be a scalar or have shape ({n},), ({iterations},), "
                f"({iterations}, {n}) or ({iterations}, 1), got shape {bits.shape}")
        # The fullest stack decides: stacks fill at different rates with per-parameter betas.
        held = WORD_BITS * self._height + np.log2(self._coder.astype(np.float64)) \
            - STATE_LOW_BITS
        # A stack of h words and a state holding s in [0, 16) bits hold 16 h + s bits, so
        # the height reached is floor(bits / 16); one bit of slack covers the coder's
        # small per-parameter deviations from the bound.
        rows = int(np.floor((held.max() + np.max(per_param) + 1.0) / WORD_BITS))
        self._grow(rows)

    def _grow(self, rows):
        """Make room for ``rows`` words per parameter, in place.

        ``ndarray.resize`` reallocates the buffer; for large arrays the C library
        remaps the pages instead of copying, so two full copies are never held.
        """
        if rows <= self._words.shape[0]:
            return
        self._words.resize((rows, self.size), refcheck=False)

    def _forward(self, kernel, *args):
        """Run a kernel that may push words; grow the word array when a column is full.

        Elements that found their column full were left untouched (status ROOM):
        after growing by at least one row (1/16 of the rows at a time) the kernel
        runs again on them alone, the others being marked SKIP.  Growing only when
        a word has nowhere to go keeps the allocation within a row of what is held.
        A call that some element refuses does not grow: it is rolled back, and the
        allocation stays as it was too.
        """
        kernel(*args)
        bad = _first(self._first_fail)
        if bad < 0 or self._status[bad] != k.ROOM or self._refused() >= 0:
            return
        status = self._status
        room = status == k.ROOM
        have = self._words.shape[0]
        self._grow(max(have + 1, have + have // 16))
        status[status == k.OK] = k.SKIP
        status[room] = k.OK
        kernel(*args)
        status[status == k.SKIP] = k.OK

    # ----------------------------------------------------------------- validation
    def _vector(self, a, name, n):
        a = np.asarray(a)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
        a = np.ascontiguousarray(a, dtype=np.float64)
        if a.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
        if n is not None and a.shape[0] != n:
            raise ValueError(f"{name} has length {a.shape[0]}, expected {n}")
        return a

    def _fix(self, values, name):
        out = np.empty(values.shape[0], dtype=np.int64)
        k.to_fixed(values, self._scale, out, self._status, self._chunk, self._first_fail)
        bad = _first(self._first_fail)
        if bad >= 0:
            self._status.fill(0)
            self._raise_value(name, bad, values[bad])
        return out

    def _refused(self):
        """The first element that a kernel refused (not merely ROOM), or -1."""
        bad = _first(self._first_fail)
        if bad < 0 or self._status[bad] != k.ROOM:
            return bad
        refused = np.flatnonzero((self._status == k.FAIL) | (self._status == k.CORRUPT))
        return int(refused[0]) if refused.size else -1

    def _raise_value(self, name, index, value):
        if not np.isfinite(value):
            raise FloatingPointError(f"{name}[{index}] = {float(value)} is not finite")
        raise OverflowError(
            f"{name}[{index}] = {float(value)!r} leaves the fixed-point range: with frac_bits="
            f"{self.frac_bits}, |x| and |v| must stay below 2**{FIXED_LIMIT_BITS - self.frac_bits}")

    def _coefficient(self, value, name, unit_interval=False):
        """A scalar or per-parameter float64 coefficient, validated (as a 1- or N-array)."""
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
        if arr.ndim == 0:
            a = np.array([float(arr)])
        elif arr.shape == (self.size,):
            a = np.ascontiguousarray(arr, dtype=np.float64)
        else:
            raise ValueError(f"{name} must be a scalar or have shape ({self.size},), "
                             f"got shape {arr.shape}")
        finite = np.isfinite(a)
        if not finite.all():
            i = int(np.argmin(finite))
            where = f"{name}[{i}]" if np.ndim(value) else name
            raise FloatingPointError(f"{where} = {a[i]} is not finite")
        if unit_interval:
            inside = (a > 0.0) & (a <= 1.0)
            if not inside.all():
                i = int(np.argmin(inside))
                where = f"{name}[{i}]" if np.ndim(value) else name
                raise ValueError(f"{where} = {a[i]} is outside (0, 1]")
        return a

    def prepare_alpha(self, alpha):
        """Validate ``alpha`` (scalar or (N,)) once; pass the result as ``alpha`` to the steps."""
        if isinstance(alpha, Prepared):
            return self._prepared(alpha, "alpha")
        arg = _for_kernel(self._coefficient(alpha, "alpha"))
        if isinstance(arg, np.ndarray) and np.may_share_memory(arg, np.asarray(alpha)):
            arg = arg.copy()  # what was validated must not change with the caller's array
        return _made("alpha", self.size, None, arg)

    def prepare_beta(self, beta):
        """Validate ``beta`` (scalar or (N,), in (0, 1]) once; pass the result as ``beta``."""
        if isinstance(beta, Prepared):
            return self._prepared(beta, "beta")
        n = self._beta_numerators(beta)
        return _made("beta", self.size, n, n if np.ndim(n) == 0 else k.beta_table(n))

    def _beta_numerators(self, beta):
        """The validated numerators of ``beta``: an int, or an (N,) int64 array."""
        return _for_kernel(beta_numerator(self._coefficient(beta, "beta", unit_interval=True)))

    def _prepared(self, value, name):
        """A :class:`Prepared` ``value`` checked for use as ``name`` on this engine."""
        if not value._made_by_engine:
            raise TypeError(
                f"{name} is a Prepared that no engine made (built by hand or with "
                f"_replace), so its fields were never validated; make it with "
                f"prepare_{name}(), or pass the plain value")
        if value.name != name or value.size != self.size:
            raise ValueError(f"{name} was prepared as {value.name} for an engine of size "
                             f"{value.size}; this is {name} for size {self.size}")
        return value

    def _alpha_arg(self, alpha):
        """The kernel argument for ``alpha``: a float or a per-parameter array."""
        if isinstance(alpha, Prepared):
            return self._prepared(alpha, "alpha").kernel_arg
        return _for_kernel(self._coefficient(alpha, "alpha"))

    def _beta_arg(self, beta):
        """(numerators, kernel argument) for ``beta``: a scalar numerator, or a table.

        Per-parameter betas go to the kernels as a table of their constants
        (:func:`._cpu_kernels.beta_table`), kept while the betas stay the same, as
        they do step after step in a schedule that is constant per group.
        """
        if isinstance(beta, Prepared):
            beta = self._prepared(beta, "beta")
            return beta.numerators, beta.kernel_arg
        n = self._beta_numerators(beta)
        if np.ndim(n) == 0:
            return n, n
        if self._beta_cache is None or not np.array_equal(self._beta_cache[0], n):
            self._beta_cache = k.beta_table(n)
        return n, self._beta_cache

    def _gradient(self, g):
        return self._vector(g, "g", self.size)

    def _kernel_failed(self, i, g, alpha, beta_n, stage):
        """Turn a refused element into an exception naming it (after the rollback)."""
        corrupt = self._status[i] == k.CORRUPT
        self._status.fill(0)
        if corrupt:
            raise RuntimeError(
                f"{stage} refused: the information buffer of parameter {i} was overdrawn "
                "(reverse steps popped more than forward steps pushed, e.g. undoing a step "
                "with another beta or gradient than it was taken with), so this step "
                "cannot be stored exactly")
        if g is not None and not np.isfinite(g[i]):
            raise FloatingPointError(f"g[{i}] = {float(g[i])} is not finite")
        a = None if alpha is None else (alpha[i] if np.ndim(alpha) else alpha)
        b = None if beta_n is None else (beta_n[i] if np.ndim(beta_n) else beta_n) / BETA_DENOM
        raise OverflowError(
            f"{stage} overflows the fixed-point range at parameter {i} "
            f"(x={float(self._x[i] / self._scale)!r}, v={float(self._v[i] / self._scale)!r}"
            + ("" if g is None else f", g={float(g[i])!r}")
            + ("" if a is None else f", alpha={float(a)!r}")
            + ("" if b is None else f", beta={float(b)!r}")
            + f"); with frac_bits={self.frac_bits}, |x| and |v| must stay below "
              f"2**{FIXED_LIMIT_BITS - self.frac_bits}")

    # ----------------------------------------------------------------- the steps
    def step(self, g, alpha, beta):
        """One forward step: ``v <- beta v - (1-beta) g``, then ``x <- x + alpha v``.

        ``alpha`` and ``beta`` are scalars or per-parameter arrays; ``beta`` in (0, 1]
        is used as :func:`effective_beta` of itself.  Either may be a :class:`Prepared`
        value from :meth:`prepare_alpha` / :meth:`prepare_beta`, as in every step method.
        """
        self._before_step()
        g = self._gradient(g)
        alpha = self._alpha_arg(alpha)
        beta_n, beta_k = self._beta_arg(beta)
        self._forward(k.step, self._x, self._v, self._coder, self._height, self._words, g,
                      alpha, beta_k, self._scale, self._status, self._scratch, self._chunk,
                      self._first_fail)
        bad = self._refused()
        if bad >= 0:  # undo the elements that were updated; the status marks the others
            k.position(self._x, self._v, alpha, -1, self._status, self._chunk,
                       self._first_fail)
            k.undecay(self._v, self._coder, self._height, self._words, g, beta_k, self._scale,
                      self._status, self._chunk, self._first_fail)
            self._kernel_failed(bad, g, alpha, beta_n, "step")
        self._after_step()

    def unstep_position(self, alpha):
        """Undo the position half of the last step: ``x <- x - alpha v`` (exact)."""
        self._before_unstep_position()
        alpha = self._alpha_arg(alpha)
        k.position(self._x, self._v, alpha, -1, self._status, self._chunk, self._first_fail)
        bad = _first(self._first_fail)
        if bad >= 0:
            k.position(self._x, self._v, alpha, 1, self._status, self._chunk, self._first_fail)
            self._kernel_failed(bad, None, alpha, None, "unstep_position")
        self._after_unstep_position()

    def unstep_velocity(self, g, beta):
        """Undo the velocity half of the last step: ``v <- (v + (1-beta) g) / beta``.

        ``g`` and ``beta`` must be those of the forward step being undone; the
        digits it stored are popped from the buffer.
        """
        self._before_unstep_velocity()
        g = self._gradient(g)
        beta_n, beta_k = self._beta_arg(beta)
        k.undecay(self._v, self._coder, self._height, self._words, g, beta_k, self._scale,
                  self._status, self._chunk, self._first_fail)
        bad = _first(self._first_fail)
        if bad >= 0:
            k.decay(self._v, self._coder, self._height, self._words, g, beta_k, self._scale,
                    self._status, self._scratch, self._chunk, self._first_fail)
            self._kernel_failed(bad, g, None, beta_n, "unstep_velocity")
        self._after_unstep_velocity()

    def __repr__(self):
        return (f"ReversibleMomentum(N={self.size}, frac_bits={self.frac_bits}, "
                f"iterations={self._iterations}, aux_bits={self.aux_bits:.1f})")
