"""What the CPU and GPU engines share above their kernels, written once.

:class:`ExactEngine` holds the order of half-steps and the three step methods with
their rollback: a call that some element refuses undoes the elements it updated
and raises an exception naming the refused one, so the engine is left exactly as
it was.  :class:`~.cpu.ReversibleMomentum` and :class:`~.gpu.BatchedReversibleMomentum`
supply the kernel launches (``_run_*``) and the argument handling as hooks.

Beside it: the decays' rational form (:func:`beta_numerator`, :func:`effective_beta`,
:func:`information_bound`), the validation of arguments and coefficients, the
messages for refused values and elements, and the stack sizing of ``reserve``.
"""

from typing import NamedTuple

import numpy as np

from ._arith import BETA_DENOM, BETA_MIN_NUMER, FIXED_LIMIT_BITS, STATE_LOW_BITS, WORD_BITS

__all__ = ["EngineState", "ExactEngine", "StepOrder", "beta_numerator", "effective_beta",
           "information_bound", "held_bits", "stack_contents", "check_frac_bits",
           "check_iterations", "check_decays", "check_coefficients", "value_error",
           "overflow_error", "buffer_error", "stack_rows"]


# ----------------------------------------------------------------- the decays
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


# ----------------------------------------------------------------- the buffers
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


def stack_rows(held_max, new_max):
    """Rows of words that ``reserve`` allocates: the fullest element holds ``held_max``
    bits (or at most that many) and takes ``new_max`` more.

    A stack of h words and a state holding s in [0, 16) bits hold 16 h + s bits, so
    the height reached is floor(bits / 16); one bit of slack covers the coder's small
    per-element deviations from the bound.
    """
    return int(np.floor((held_max + new_max + 1.0) / WORD_BITS))


class EngineState(NamedTuple):
    """The whole state of a :class:`~.cpu.ReversibleMomentum` engine.

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


# ----------------------------------------------------------------- validation
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


def check_coefficients(values, where, unit_interval=False):
    """Check a step's flat float64 coefficients: all finite (FloatingPointError), and
    with ``unit_interval`` all in (0, 1] (ValueError); ``where(i)`` names element i."""
    finite = np.isfinite(values)
    if not finite.all():
        i = int(np.argmin(finite))
        raise FloatingPointError(f"{where(i)} = {values[i]} is not finite")
    if unit_interval:
        inside = (values > 0.0) & (values <= 1.0)
        if not inside.all():
            i = int(np.argmin(inside))
            raise ValueError(f"{where(i)} = {values[i]} is outside (0, 1]")
    return values


def _range_rule(frac_bits):
    return (f"with frac_bits={frac_bits}, |x| and |v| must stay below "
            f"2**{FIXED_LIMIT_BITS - frac_bits}")


def value_error(where, value, frac_bits):
    """The exception for a starting value that is not finite or not representable."""
    if not np.isfinite(value):
        return FloatingPointError(f"{where} = {float(value)} is not finite")
    return OverflowError(f"{where} = {float(value)!r} leaves the fixed-point range: "
                         + _range_rule(frac_bits))


def overflow_error(stage, location, frac_bits, x, v, g=None, alpha=None, beta=None):
    """The exception for an element whose step ``stage`` would leave the fixed-point range."""
    values = [("x", x), ("v", v), ("g", g), ("alpha", alpha), ("beta", beta)]
    shown = ", ".join(f"{name}={float(value)!r}" for name, value in values if value is not None)
    return OverflowError(f"{stage} overflows the fixed-point range at {location} ({shown}); "
                         + _range_rule(frac_bits))


def buffer_error(stage, location, overdrawn=True):
    """The exception for an element whose information buffer cannot take the step."""
    if overdrawn:
        return RuntimeError(
            f"{stage} refused: the information buffer of {location} was overdrawn (reverse "
            "steps popped more than forward steps pushed, e.g. undoing a step with another "
            "beta or gradient than it was taken with), so this step cannot be stored exactly")
    return RuntimeError(f"internal error: the information buffer of {location} is corrupt "
                        "or was not grown")


# ----------------------------------------------------------------- the engine
class StepOrder:
    """The order of forward and reverse half-steps, shared by the CPU and GPU engines.

    A reverse step is ``unstep_position`` then ``unstep_velocity``; a forward step may
    not start in between, and no more steps can be undone than were taken.  The
    engine methods call ``_before_*`` first and ``_after_*`` once they succeeded.
    """

    _iterations = 0
    _position_undone = False
    #: The method that undoes the rest of a step after ``unstep_position``.
    _SECOND_HALF = "unstep_velocity"

    @property
    def iterations(self):
        """Forward steps taken minus steps undone."""
        return self._iterations

    def _before_step(self):
        if self._position_undone:
            raise RuntimeError(f"unstep_position was called without its {self._SECOND_HALF}; "
                               "finish the reverse step first")

    def _after_step(self):
        self._iterations += 1

    def _before_unstep_position(self):
        if self._position_undone:
            raise RuntimeError(f"unstep_position called twice; call {self._SECOND_HALF} first")
        if self._iterations <= 0:
            raise ValueError("no step left to undo: the engine is back at its first state")

    def _after_unstep_position(self):
        self._position_undone = True

    def _before_unstep_velocity(self):
        if not self._position_undone:
            raise RuntimeError(f"{self._SECOND_HALF} must follow unstep_position")

    def _after_unstep_velocity(self):
        self._position_undone = False
        self._iterations -= 1


class ExactEngine(StepOrder):
    """The step methods of an exact engine, with the rollback of refused calls.

    Subclasses implement the hooks:

    * ``_gradient(g)``, ``_alpha_arg(alpha)``, ``_beta_arg(beta)``: validate an
      argument and return what the kernels take (opaque here);
    * ``_run_step(g, a, b)``, ``_run_position(a, sign, rollback)``,
      ``_run_undecay(g, b, rollback)``, ``_run_decay(g, b, rollback)``: launch a kernel
      and return the first element it refused, or -1.  With ``rollback`` the kernel
      runs on the elements that the refused call updated, to undo them;
    * ``_kernel_failed(j, g, a, b, stage)``: raise the exception naming element j
      (after the rollback).
    """

    def step(self, g, alpha, beta):
        """One forward step: ``v <- beta v - (1-beta) g``, then ``x <- x + alpha v``.

        ``beta`` in (0, 1] is used as :func:`effective_beta` of itself.
        """
        self._before_step()
        g, a, b = self._gradient(g), self._alpha_arg(alpha), self._beta_arg(beta)
        bad = self._run_step(g, a, b)
        if bad >= 0:  # undo the elements that were updated; the others were left alone
            self._run_position(a, -1, True)
            self._run_undecay(g, b, True)
            self._kernel_failed(bad, g, a, b, "step")
        self._after_step()

    def unstep_position(self, alpha):
        """Undo the position half of the last step: ``x <- x - alpha v`` (exact)."""
        self._before_unstep_position()
        a = self._alpha_arg(alpha)
        bad = self._run_position(a, -1, False)
        if bad >= 0:
            self._run_position(a, 1, True)
            self._kernel_failed(bad, None, a, None, "unstep_position")
        self._after_unstep_position()

    def unstep_velocity(self, g, beta):
        """Undo the velocity half of the last step: ``v <- (v + (1-beta) g) / beta``.

        ``g`` and ``beta`` must be those of the forward step being undone; the
        digits it stored are popped from the buffers.
        """
        self._before_unstep_velocity()
        g, b = self._gradient(g), self._beta_arg(beta)
        bad = self._run_undecay(g, b, False)
        if bad >= 0:
            self._run_decay(g, b, True)
            self._kernel_failed(bad, g, None, b, "unstep_velocity")
        self._after_unstep_velocity()
