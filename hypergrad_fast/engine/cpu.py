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
from ._arith import BETA_DENOM, STATE_INIT, STATE_LOW_BITS, WORD_BITS
from ._wrapper import (  # noqa: F401  (the names this module has always offered)
    EngineState,
    ExactEngine,
    StepOrder,
    beta_numerator,
    buffer_error,
    check_coefficients,
    check_decays,
    check_frac_bits,
    check_iterations,
    effective_beta,
    held_bits,
    information_bound,
    overflow_error,
    stack_contents,
    stack_rows,
    value_error,
)

#: Parameters per kernel chunk: the granularity of error reporting and rollback.
CHUNK = 1 << 14


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


def kernel_buffers(n):
    """``(chunk, first_fail, status, scratch)`` for kernels over n elements.

    Chunks start at multiples of 8 and the status array is padded to a multiple of 8:
    the kernels scan status bytes eight at a time.  Equal chunks of at most CHUNK, an
    even number of them when there are several: the parallel kernels hand whole
    chunks to the two cores.  The status array is all zero between calls.
    """
    n_chunks = -(-n // CHUNK)
    n_chunks += n_chunks % 2 if n_chunks > 1 else 0
    chunk = -(-(-(-n // n_chunks)) // 8) * 8
    n_chunks = -(-n // chunk)
    return (chunk, np.empty(n_chunks, dtype=np.int64), np.zeros(-(-n // 8) * 8, dtype=np.uint8),
            np.empty(n, dtype=np.uint16))


def grow_rows(words, rows):
    """Make room for ``rows`` words per column of ``words``, in place.

    ``ndarray.resize`` reallocates the buffer; for large arrays the C library remaps
    the pages instead of copying, so two full copies are never held.
    """
    if rows > words.shape[0]:
        words.resize((rows, words.shape[1]), refcheck=False)


def run_growing(kernel, args, status, first_fail, words, refused):
    """Run a kernel that may push words onto ``words``; grow it when a column is full.

    Elements that found their column full were left untouched (status ROOM): after
    growing by at least one row (1/16 of the rows at a time) the kernel runs again
    on them alone, the others being marked SKIP.  Growing only when a word has
    nowhere to go keeps the allocation within a row of what is held.  A call that
    some element refuses (``refused()`` >= 0) does not grow: it is rolled back, and
    the allocation stays as it was too.
    """
    kernel(*args)
    bad = _first(first_fail)
    if bad < 0 or status[bad] != k.ROOM or refused() >= 0:
        return
    room = status == k.ROOM
    have = words.shape[0]
    grow_rows(words, max(have + 1, have + have // 16))
    status[status == k.OK] = k.SKIP
    status[room] = k.OK
    kernel(*args)
    status[status == k.SKIP] = k.OK


def reserved_bits(decay, iterations, n, name):
    """The bits that ``iterations`` steps at ``decay`` add per parameter, (N,) or a scalar.

    ``decay`` is a scalar, (N,), or per step (iterations,), (iterations, N) or
    (iterations, 1), every value in (0, 1] (ValueError naming ``name`` otherwise);
    where a shape fits both readings (iterations == N), the per-parameter one wins.
    """
    try:
        bits = information_bound(check_decays(decay))
    except ValueError as err:
        raise ValueError(str(err).replace("beta", name, 1)) from None
    if bits.shape in ((), (n,)):
        return bits * iterations
    if bits.shape in ((iterations,), (iterations, n), (iterations, 1)):
        return bits.sum(axis=0)
    raise ValueError(f"{name} must be a scalar or have shape ({n},), ({iterations},), "
                     f"({iterations}, {n}) or ({iterations}, 1), got shape {bits.shape}")


def first_refused(status, first_fail):
    """The first element that a kernel refused (not merely ROOM), or -1."""
    bad = _first(first_fail)
    if bad < 0 or status[bad] != k.ROOM:
        return bad
    refused = np.flatnonzero((status == k.FAIL) | (status == k.CORRUPT))
    return int(refused[0]) if refused.size else -1


class FixedPointInputs:
    """Validation of the inputs of a CPU engine with ``size``, ``frac_bits``, ``_scale``
    and kernel buffers (:func:`kernel_buffers`): vectors, fixed-point conversion,
    learning rates, :class:`Prepared` values; shared by :class:`ReversibleMomentum`
    and :class:`~.adam.ReversibleAdam`."""

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
        return first_refused(self._status, self._first_fail)

    def _raise_value(self, name, index, value):
        raise value_error(f"{name}[{index}]", value, self.frac_bits)

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
        return check_coefficients(a, lambda i: f"{name}[{i}]" if arr.ndim else name,
                                  unit_interval)

    def prepare_alpha(self, alpha):
        """Validate ``alpha`` (scalar or (N,)) once; pass the result as ``alpha`` to the steps."""
        if isinstance(alpha, Prepared):
            return self._prepared(alpha, "alpha")
        arg = _for_kernel(self._coefficient(alpha, "alpha"))
        if isinstance(arg, np.ndarray) and np.may_share_memory(arg, np.asarray(alpha)):
            arg = arg.copy()  # what was validated must not change with the caller's array
        return _made("alpha", self.size, None, arg)

    def _prepare_checked_alpha(self, alpha):
        """:meth:`prepare_alpha` of a value its caller has already checked: a finite float,
        or a fresh finite float64 (N,) array that nobody else holds (a schedule's row,
        expanded; the passes validate whole schedules up front)."""
        return _made("alpha", self.size, None, float(alpha) if np.ndim(alpha) == 0 else alpha)

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

    def _decay_numerators(self, value, name):
        """The validated numerators of decay ``value`` (scalar or (N,), in (0, 1]): an int,
        or an (N,) int64 array."""
        return _for_kernel(beta_numerator(self._coefficient(value, name, unit_interval=True)))

    def _gradient(self, g):
        return self._vector(g, "g", self.size)


class ReversibleMomentum(FixedPointInputs, ExactEngine):
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
        self._chunk, self._first_fail, self._status, self._scratch = kernel_buffers(n)
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
        return k.to_float(self._x, 1.0 / self._scale)

    @property
    def v(self):
        """Current velocity as a float64 copy."""
        return k.to_float(self._v, 1.0 / self._scale)

    def fixed_v(self):
        """``(v_fixed, inv_scale)``: the fixed-point velocity itself (int64 (N,), not a copy:
        read it, never write it) and ``1 / scale``; :attr:`v` is ``v_fixed * inv_scale``.
        For loops that read v once without the copy (the reverse pass's cotangents)."""
        return self._v, 1.0 / self._scale

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
        per_param = reserved_bits(beta, iterations, self.size, "beta")
        # The fullest stack decides: stacks fill at different rates with per-parameter betas.
        held = WORD_BITS * self._height + np.log2(self._coder.astype(np.float64)) \
            - STATE_LOW_BITS
        self._grow(stack_rows(held.max(), np.max(per_param)))

    def _grow(self, rows):
        grow_rows(self._words, rows)

    def _forward(self, kernel, *args):
        """Run a kernel that may push words, growing the stacks (see :func:`run_growing`)."""
        run_growing(kernel, args, self._status, self._first_fail, self._words, self._refused)

    def prepare_beta(self, beta):
        """Validate ``beta`` (scalar or (N,), in (0, 1]) once; pass the result as ``beta``."""
        if isinstance(beta, Prepared):
            return self._prepared(beta, "beta")
        n = self._beta_numerators(beta)
        return _made("beta", self.size, n, n if np.ndim(n) == 0 else k.beta_table(n))

    def _beta_numerators(self, beta):
        """The validated numerators of ``beta``: an int, or an (N,) int64 array."""
        return self._decay_numerators(beta, "beta")

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

    def _kernel_failed(self, i, g, alpha, beta, stage):
        """Turn a refused element into an exception naming it (after the rollback)."""
        corrupt = self._status[i] == k.CORRUPT
        self._status.fill(0)
        if corrupt:
            raise buffer_error(stage, f"parameter {i}")
        if g is not None and not np.isfinite(g[i]):
            raise FloatingPointError(f"g[{i}] = {float(g[i])} is not finite")
        a = None if alpha is None else (alpha[i] if np.ndim(alpha) else alpha)
        b = None
        if beta is not None:
            n = beta[0]
            b = (n[i] if np.ndim(n) else n) / BETA_DENOM
        raise overflow_error(stage, f"parameter {i}", self.frac_bits, self._x[i] / self._scale,
                             self._v[i] / self._scale, None if g is None else g[i], a, b)

    # ----------------------------------------------------------------- the kernels
    # (the step methods, with their rollback, are ExactEngine's)
    def _run_step(self, g, alpha, beta):
        self._forward(k.step, self._x, self._v, self._coder, self._height, self._words, g,
                      alpha, beta[1], self._scale, self._status, self._scratch, self._chunk,
                      self._first_fail)
        return self._refused()

    def _run_position(self, alpha, sign, rollback):
        # On a rollback the status bytes mark the elements to leave alone.
        k.position(self._x, self._v, alpha, sign, self._status, self._chunk, self._first_fail)
        return _first(self._first_fail)

    def _run_undecay(self, g, beta, rollback):
        k.undecay(self._v, self._coder, self._height, self._words, g, beta[1], self._scale,
                  self._status, self._chunk, self._first_fail)
        return _first(self._first_fail)

    def _run_decay(self, g, beta, rollback):
        k.decay(self._v, self._coder, self._height, self._words, g, beta[1], self._scale,
                self._status, self._scratch, self._chunk, self._first_fail)
        return _first(self._first_fail)

    def __repr__(self):
        return (f"ReversibleMomentum(N={self.size}, frac_bits={self.frac_bits}, "
                f"iterations={self._iterations}, aux_bits={self.aux_bits:.1f})")
