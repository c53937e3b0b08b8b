"""The exact reversible Adam engine (CPU).

The update, with ``m_0 = s_0 = 0`` and ``g_t`` the gradient at ``x_t``::

    m_{t+1} = b1_t m_t + (1 - b1_t) g_t
    s_{t+1} = b2_t s_t + (1 - b2_t) g_t**2
    x_{t+1} = x_t - alpha_t m_{t+1} / (sqrt(s_{t+1}) + eps)

There is no bias correction: fold it into ``alpha_t``.  ``x``, ``m`` and ``s`` are
int64 fixed-point numbers (``frac_bits`` bits after the radix point for x and m,
``s_frac_bits`` for s).  The
moments are decayed accumulators exactly like the momentum engine's velocity: each
decay ``b = n / 2**16`` is rational and the digits its division drops go to an
information buffer of the moment's own (a coder state and a word stack per
parameter), so the cost is ``log2(2**16 / n1) + log2(2**16 / n2)`` bits per
parameter per iteration.  ``g**2`` enters ``s`` exactly as the forward step computed
it, so ``s`` stays >= 0.  The position moves by a deterministic function of the
fixed-point ``(m, s)`` rounded once (:func:`._arith.adam_delta`); the reverse step
adds back the same integer.  The arithmetic is that of :mod:`._arith`, which also
compiles for CUDA; there is no GPU twin of this engine yet.
"""

from typing import NamedTuple

import numpy as np

from . import _cpu_kernels as k
from ._arith import BETA_DENOM, FIXED_LIMIT_BITS, STATE_INIT, STATE_LOW_BITS, WORD_BITS
from ._wrapper import (
    ExactEngine,
    StepOrder,
    buffer_error,
    check_frac_bits,
    check_iterations,
    held_bits,
    stack_contents,
    stack_rows,
)
from .cpu import (FixedPointInputs, Prepared, _made, first_refused, grow_rows, kernel_buffers,
                  reserved_bits, run_growing)

__all__ = ["ReversibleAdam", "AdamState", "S_FRAC_BITS"]

#: Default bits after the radix point of s.  A decay replaces the last 16 bits of a
#: moment by digits from its buffer, so a moment is held to about 2**(16 - frac_bits);
#: s is about g**2, far smaller than m for small gradients, and needs the finer grid
#: more than the range: s < 2**(62 - 60) = 4, that is a mean square gradient below 4
#: (a single step adds (1 - b2) g**2, so one gradient may be far larger).
S_FRAC_BITS = 60


class AdamState(NamedTuple):
    """The whole state of a :class:`ReversibleAdam` engine.

    x, m, s:  int64 fixed-point position and moments, shape (N,)
    coder:    uint64 coder states, shape (2, N): row 0 for m's buffer, row 1 for s's
    height:   int32 stack heights, shape (2, N)
    words:    uint16 word stacks, shape (2, rows, N), rows the highest stack of
              either buffer; zeros above each stack's top (see
              :class:`~.cpu.EngineState`)

    Two engines hold the same numbers exactly when every field is equal.
    """

    x: np.ndarray
    m: np.ndarray
    s: np.ndarray
    coder: np.ndarray
    height: np.ndarray
    words: np.ndarray


class _Moment:
    """One decayed accumulator: fixed-point values, a coder state and a word stack each."""

    def __init__(self, n):
        self.value = np.zeros(n, dtype=np.int64)
        self.coder = np.full(n, STATE_INIT, dtype=np.uint64)
        self.height = np.zeros(n, dtype=np.int32)
        self.words = np.zeros((0, n), dtype=np.uint16)

    def held(self):
        """Bits held per element."""
        return WORD_BITS * self.height + np.log2(self.coder.astype(np.float64)) - STATE_LOW_BITS


class ReversibleAdam(FixedPointInputs, StepOrder):
    """Adam without bias correction that can be run backwards exactly.

    Parameters
    ----------
    x0 : 1-D float64 array of length N, converted to fixed point by the engine's rule.
    eps : float > 0, the constant of the denominator (default 1e-8).
    frac_bits : int
        Bits after the radix point of x and m (default 52): ``|x|, |m| < 2**(62 -
        frac_bits)``.
    s_frac_bits : int
        Bits after the radix point of s (default :data:`S_FRAC_BITS` = 60): ``s <
        2**(62 - s_frac_bits)``, with 60 a mean square gradient below 4.  Lower it
        for larger gradients (s is then held more coarsely).

    A forward step is :meth:`step`; it is undone by :meth:`unstep_position` then
    :meth:`unstep_moments`, each with the inputs of its forward step, last step
    first.  After T steps undone, x is back to x0 bit for bit, m and s to zero and
    the buffers are empty.  A refused call (NaN, a decay outside (0, 1], a value
    leaving the fixed-point range, undo beyond the start) raises and leaves the
    engine exactly as it was.

    The update is::

        m_{t+1} = b1_t m_t + (1 - b1_t) g_t
        s_{t+1} = b2_t s_t + (1 - b2_t) g_t**2
        x_{t+1} = x_t - alpha_t m_{t+1} / (sqrt(s_{t+1}) + eps)

    with m_0 = s_0 = 0; b1 and b2 in (0, 1] are used as
    :func:`~hypergrad_fast.effective_beta` of themselves.
    """

    _SECOND_HALF = "unstep_moments"
    # undoing the position is the momentum engine's method, with this engine's hooks
    unstep_position = ExactEngine.unstep_position

    def __init__(self, x0, eps=1e-8, frac_bits=52, s_frac_bits=S_FRAC_BITS):
        self.frac_bits = check_frac_bits(frac_bits)
        self.s_frac_bits = check_frac_bits(s_frac_bits)
        self._scale = float(2.0**self.frac_bits)
        self._inv_scale = 1.0 / self._scale
        self._s_scale = float(2.0**self.s_frac_bits)
        self.eps = _check_eps(eps)
        x0 = self._vector(x0, "x0", None)
        n = x0.shape[0]
        if n == 0:
            raise ValueError("x0 must hold at least one parameter")
        self._chunk, self._first_fail, self._status, self._scratch = kernel_buffers(n)
        self._x = self._fix(x0, "x0")
        self._m, self._s = _Moment(n), _Moment(n)
        self._terms = np.empty(n), np.empty(n)  # -g and -g**2, what the moments take
        self._decay_cache = {}

    # ----------------------------------------------------------------- properties
    @property
    def size(self):
        """Number of parameters N."""
        return self._x.shape[0]

    @property
    def x(self):
        """Current position as a float64 copy."""
        return k.to_float(self._x, self._inv_scale)

    @property
    def m(self):
        """Current first moment as a float64 copy."""
        return k.to_float(self._m.value, self._inv_scale)

    @property
    def s(self):
        """Current second moment as a float64 copy (>= 0)."""
        return k.to_float(self._s.value, 1.0 / self._s_scale)

    @property
    def aux_bits(self):
        """Information held in both buffers, in bits (summed over parameters)."""
        return sum(held_bits(mo.coder, mo.height) for mo in (self._m, self._s))

    @property
    def aux_nbytes(self):
        """Bytes allocated for the buffers' word stacks (coder states: :attr:`state_nbytes`)."""
        return self._m.words.nbytes + self._s.words.nbytes

    @property
    def state_nbytes(self):
        """Fixed bytes of the two coders (state and stack height per parameter each)."""
        return sum(mo.coder.nbytes + mo.height.nbytes for mo in (self._m, self._s))

    @property
    def state(self):
        """Copies of the exact integer state, as an :class:`AdamState`."""
        moments = (self._m, self._s)
        heights = np.stack([mo.height for mo in moments])
        rows = max(int(heights.max()), 0)
        words = np.zeros((2, rows, self.size), dtype=np.uint16)
        for i, mo in enumerate(moments):
            have = min(rows, mo.words.shape[0])
            words[i, :have] = mo.words[:have]
            stack_contents(words[i], heights[i])
        return AdamState(self._x.copy(), self._m.value.copy(), self._s.value.copy(),
                         np.stack([mo.coder for mo in moments]), heights, words)

    # ----------------------------------------------------------------- capacity
    def reserve(self, iterations, b1, b2):
        """Allocate both buffers' stacks for ``iterations`` more steps at decays b1, b2.

        Each decay is a scalar, (N,), or per step (iterations,), (iterations, N) or
        (iterations, 1), in (0, 1] (as :meth:`ReversibleMomentum.reserve`'s beta).
        """
        iterations = check_iterations(iterations)
        for name, decay, moment in (("b1", b1, self._m), ("b2", b2, self._s)):
            per_param = reserved_bits(decay, iterations, self.size, name)
            grow_rows(moment.words, stack_rows(moment.held().max(), np.max(per_param)))

    # ----------------------------------------------------------------- inputs
    def prepare_decay(self, decay, name="b1"):
        """Validate a decay (scalar or (N,), in (0, 1]) once; pass it as ``b1`` or ``b2``."""
        if isinstance(decay, Prepared):
            return self._prepared(decay, "decay")
        n = self._decay_numerators(decay, name)
        return _made("decay", self.size, n, n if np.ndim(n) == 0 else k.beta_table(n))

    def _decay_arg(self, decay, name):
        """(numerators, kernel argument) for decay ``b1`` or ``b2``."""
        if isinstance(decay, Prepared):
            decay = self._prepared(decay, "decay")
            return decay.numerators, decay.kernel_arg
        n = self._decay_numerators(decay, name)
        if np.ndim(n) == 0:
            return n, n
        kept = self._decay_cache.get(name)
        if kept is None or not np.array_equal(kept[0], n):
            kept = self._decay_cache[name] = k.beta_table(n)
        return n, kept

    def _moment_terms(self, g):
        """-g and -g**2: the moments are the engine's decayed accumulators,
        ``v <- b v - (1 - b) term``, with these terms."""
        neg_g, neg_g2 = self._terms
        np.negative(g, out=neg_g)
        np.multiply(g, g, out=neg_g2)
        np.negative(neg_g2, out=neg_g2)
        return neg_g, neg_g2

    # ----------------------------------------------------------------- the steps
    def step(self, g, alpha, b1, b2):
        """One forward step: the moments from ``g``, then the position from the new moments.

        ``alpha`` is a scalar or (N,); ``b1`` and ``b2`` scalars or (N,) in (0, 1].
        """
        self._before_step()
        g = self._gradient(g)
        a = self._alpha_arg(alpha)
        d1, d2 = self._decay_arg(b1, "b1"), self._decay_arg(b2, "b2")
        terms = self._moment_terms(g)
        done = []
        for moment, term, decay, part in ((self._m, terms[0], d1, "m"),
                                          (self._s, terms[1], d2, "s")):
            bad = self._run_decay(moment, term, decay[1], grow=True)
            if bad >= 0:
                corrupt = self._status[bad] == k.CORRUPT
                self._run_undecay(moment, term, decay[1])
                self._undo(done)
                self._failed(bad, "step", part, g, a, d1, d2, corrupt)
            done.append((moment, term, decay[1]))
        bad = self._run_position(a, 1, False)
        if bad >= 0:
            self._run_position(a, -1, True)
            self._undo(done)
            self._failed(bad, "step", "x", g, a, d1, d2)
        self._after_step()

    def unstep_moments(self, g, b1, b2):
        """Undo the moment half of the last step (after :meth:`unstep_position`).

        ``g``, ``b1`` and ``b2`` must be those of the forward step being undone; the
        digits it stored are popped from the buffers.
        """
        self._before_unstep_velocity()
        g = self._gradient(g)
        d1, d2 = self._decay_arg(b1, "b1"), self._decay_arg(b2, "b2")
        terms = self._moment_terms(g)
        done = []
        for moment, term, decay, part in ((self._s, terms[1], d2, "s"),
                                          (self._m, terms[0], d1, "m")):
            bad = self._run_undecay(moment, term, decay[1])
            if bad >= 0:
                corrupt = self._status[bad] == k.CORRUPT
                self._run_decay(moment, term, decay[1], grow=False)
                self._redo(done)
                self._failed(bad, "unstep_moments", part, g, None, d1, d2, corrupt)
            done.append((moment, term, decay[1]))
        self._after_unstep_velocity()

    def _undo(self, done):
        """Undo whole moment updates of a refused step, last first."""
        self._status.fill(0)
        for moment, term, decay in reversed(done):
            self._run_undecay(moment, term, decay)

    def _redo(self, done):
        """Redo whole moment reversals of a refused unstep, last first."""
        self._status.fill(0)
        for moment, term, decay in reversed(done):
            self._run_decay(moment, term, decay, grow=False)

    def _failed(self, i, stage, part, g, alpha, d1, d2, corrupt=False):
        """Raise the exception naming element i (after the rollback); ``d1``, ``d2`` the
        decay arguments or None, ``corrupt`` whether its buffer refused the step."""
        self._status.fill(0)
        where = f"parameter {i}"
        if corrupt:
            raise buffer_error(stage, f"{where} ({part})")
        if g is not None and not np.isfinite(g[i]):
            raise FloatingPointError(f"g[{i}] = {float(g[i])} is not finite")
        shown = [("x", self._x[i] * self._inv_scale), ("m", self._m.value[i] * self._inv_scale),
                 ("s", self._s.value[i] / self._s_scale)]
        if g is not None:
            shown.append(("g", g[i]))
        if alpha is not None:
            shown.append(("alpha", alpha[i] if np.ndim(alpha) else alpha))
        for name, decay in (("b1", d1), ("b2", d2)):
            if decay is not None:
                n = decay[0]
                shown.append((name, (n[i] if np.ndim(n) else n) / BETA_DENOM))
        what = {"m": "the first moment m", "s": "the second moment s (from g**2)",
                "x": "the position x"}[part]
        values = ", ".join(f"{name}={float(value)!r}" for name, value in shown)
        if part == "s":
            rule = (f"with s_frac_bits={self.s_frac_bits}, s must stay below "
                    f"2**{FIXED_LIMIT_BITS - self.s_frac_bits} (a smaller s_frac_bits "
                    "allows larger gradients)")
        else:
            rule = (f"with frac_bits={self.frac_bits}, |x| and |m| must stay below "
                    f"2**{FIXED_LIMIT_BITS - self.frac_bits}")
        raise OverflowError(f"{stage}: {what} overflows the fixed-point range at {where} "
                            f"(before the {stage}: {values}); {rule}")

    def _kernel_failed(self, i, g, alpha, beta, stage):
        # unstep_position's refusal (ExactEngine's method calls this)
        self._failed(i, stage, "x", None, alpha, None, None)

    # ----------------------------------------------------------------- the kernels
    def _moment_scale(self, moment):
        return self._s_scale if moment is self._s else self._scale

    def _run_decay(self, moment, term, decay, grow):
        args = (moment.value, moment.coder, moment.height, moment.words, term, decay,
                self._moment_scale(moment), self._status, self._scratch, self._chunk,
                self._first_fail)
        if grow:
            run_growing(k.decay, args, self._status, self._first_fail, moment.words,
                        self._refused)
            return self._refused()
        k.decay(*args)
        return first_refused(self._status, self._first_fail)

    def _run_undecay(self, moment, term, decay):
        k.undecay(moment.value, moment.coder, moment.height, moment.words, term, decay,
                  self._moment_scale(moment), self._status, self._chunk, self._first_fail)
        return first_refused(self._status, self._first_fail)

    def _run_position(self, alpha, sign, rollback):
        # On a rollback the status bytes mark the elements to leave alone.
        k.adam_position(self._x, self._m.value, self._s.value, alpha, self.eps,
                        self._inv_scale, 1.0 / self._s_scale, self._scale, np.int64(sign),
                        self._status, self._chunk, self._first_fail)
        return first_refused(self._status, self._first_fail)

    def __repr__(self):
        return (f"ReversibleAdam(N={self.size}, eps={self.eps!r}, frac_bits={self.frac_bits}, "
                f"s_frac_bits={self.s_frac_bits}, "
                f"iterations={self._iterations}, aux_bits={self.aux_bits:.1f})")


def _check_eps(eps):
    """``eps`` as a float > 0 and finite; ValueError otherwise."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.integer,
                                                                np.floating)):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not (np.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return eps
