"""Exact integer arithmetic shared by the CPU and GPU kernels.

Everything here is written once and compiles for both targets: each helper is a
``register_jitable`` function, so ``@njit`` kernels and ``@cuda.jit`` kernels inline
the very same code, and the CUDA simulator runs it as plain Python on NumPy scalars.
Every operand is given an explicit NumPy integer type, because Numba (and NumPy 2
promotion in the simulator) turns a mixed int64/uint64 expression into float64.

Four facts live here and nowhere else:

* the fixed-point rounding rule (:func:`fixed_round`),
* the information-buffer coding (:func:`forward_velocity`, :func:`reverse_velocity`,
  :func:`stack_push`, :func:`stack_pop`),
* the rational form of the decay ``beta = n / d`` (:data:`BETA_DENOM`),
* Adam's position increment as a function of the fixed-point moments
  (:func:`adam_delta`).  Adam's moments are decayed accumulators like the momentum's
  velocity, and use the same coding.

The information buffer is a range-ANS coder per parameter: a 64-bit state in
``[2**48, 2**64)`` plus a stack of 16-bit words stored in a column of a shared 2-D
array ``words[row, column]``.  Symbols are coded with a precision of ``2**32``
(frequencies summing to ``2**32``), so the uniform base-``n`` digits that the
decay needs are coded with frequencies that differ from ``2**32 / n`` by less
than one part in 65,000: their coding loss is far below 0.1% of the bound.
"""

import math

import numpy as np
from numba.extending import register_jitable

# --- fixed point --------------------------------------------------------------------
#: Largest magnitude (exclusive) of a fixed-point integer held in x or v.  Keeping
#: two bits of headroom below 2**63 means a sum of two held values never wraps.
FIXED_LIMIT_BITS = 62
FIXED_LIMIT = float(2.0**FIXED_LIMIT_BITS)

# --- the rational decay ---------------------------------------------------------------
#: beta is held as n / BETA_DENOM with an integer n in [BETA_MIN_NUMER, BETA_DENOM].
BETA_DENOM_BITS = 16
BETA_DENOM = 1 << BETA_DENOM_BITS
#: n = 1 would need a 2**32 coding frequency, one more bit than the coder keeps.
BETA_MIN_NUMER = 2

# --- the coder ------------------------------------------------------------------------
WORD_BITS = 16  # bits per stored word
PREC_BITS = 32  # coding precision: frequencies sum to 2**PREC_BITS
STATE_LOW_BITS = 48  # coder state lives in [2**48, 2**64)

_U_WORD_BITS = np.uint64(WORD_BITS)
_U_WORD_MASK = np.uint64((1 << WORD_BITS) - 1)
_U_PREC_BITS = np.uint64(PREC_BITS)
_U_PREC_MASK = np.uint64((1 << PREC_BITS) - 1)
_U_PREC_TOTAL = np.uint64(1 << PREC_BITS)
_U_STATE_LOW = np.uint64(1 << STATE_LOW_BITS)
#: Renormalisation bound in units of the frequency: push while state >= f * 2**32.
_U_PUSH_SHIFT = np.uint64(STATE_LOW_BITS - PREC_BITS + WORD_BITS)
_U_DIGIT_BITS = np.uint64(BETA_DENOM_BITS)
_I_DIGIT_BITS = np.int64(BETA_DENOM_BITS)
_I_DIGIT_MASK = np.int64(BETA_DENOM - 1)
_I_DENOM = np.int64(BETA_DENOM)
_INV_DENOM = 1.0 / BETA_DENOM
_I_ZERO = np.int64(0)
_I_ONE = np.int64(1)
_I_LIMIT = np.int64(1 << FIXED_LIMIT_BITS)
#: |floor(v / n)| must stay below this for ``floor(v / n) * d`` to fit the range.
_I_HIGH_LIMIT = np.int64(1 << (FIXED_LIMIT_BITS - BETA_DENOM_BITS))
_U_ZERO = np.uint64(0)
_U_ONE = np.uint64(1)

#: Initial coder state: the smallest value of the state interval (holds 0 bits).
STATE_INIT = np.uint64(1 << STATE_LOW_BITS)


@register_jitable
def fixed_round(y):
    """Round a float already scaled by ``2**frac_bits`` to the nearest integer.

    Ties round up (towards +inf).  Returns ``(value, ok)``; ``ok`` is False for NaN,
    infinities and magnitudes that do not fit the fixed-point range, and then
    ``value`` is 0.  ``y - floor(y)`` is exact for every float.

    Fused multiply-add: when ``y`` is a product (``alpha * v`` in
    :func:`position_delta`), a GPU compiler could fuse it with ``- floor(y)`` and
    skip the product's rounding.  The select below stands between the product and
    the subtraction, so there is no multiply-add to fuse; ``tests/test_gpu.py``
    checks the compiled kernels for ``fma.rn.f64``.  Keep it.
    """
    ok = abs(y) < FIXED_LIMIT
    # A select, not a branch: keeps the CPU loops vectorisable, and keeps the GPU
    # compiler from contracting a product into the subtraction below.
    y = y if ok else 0.0
    f = math.floor(y)
    f = f + 1.0 if y - f >= 0.5 else f
    return np.int64(f), ok


@register_jitable
def fixed_fits(value):
    """True when a fixed-point integer lies inside the held range."""
    return (value < _I_LIMIT) & (value > -_I_LIMIT)


@register_jitable
def position_delta(alpha, v):
    """The fixed-point increment ``alpha * v`` for the position update.

    ``v`` is the fixed-point velocity; the product of a real number and a fixed-point
    number with the same radix point is rounded by the one rule, so a forward
    ``x + delta`` and a reverse ``x - delta`` see the same integer.
    """
    return fixed_round(alpha * np.float64(v))


@register_jitable
def gradient_term(one_minus_beta, g, scale):
    """The fixed-point velocity decrement ``(1 - beta) * g`` (``scale = 2**frac_bits``)."""
    return fixed_round((one_minus_beta * g) * scale)


# --- exact division by a run-time divisor, without the hardware divider -------------


@register_jitable
def udiv_small(a, b, inv_b):
    """``(a // b, a % b)`` for uint64 ``a < 2**63`` and ``b`` whose quotient is below 2**32.

    ``inv_b`` is ``1.0 / b``.  The float estimate is off by at most one; the
    integer correction makes the result exact.
    """
    # Through int64: converting uint64 <-> float64 costs a branchy sequence on x86.
    q = np.uint64(np.int64(np.float64(np.int64(a)) * inv_b))
    p = q * b
    if p > a:
        q -= _U_ONE
        p -= b
    r = a - p
    if r >= b:
        q += _U_ONE
        r -= b
    return q, r


@register_jitable
def floordiv_signed(a, n, inv_n):
    """Python-style ``(a // n, a % n)`` for int64 ``|a| < 2**63`` and ``2 <= n <= 2**16``.

    A first float estimate is within ``2**10`` of the quotient; the remainder it
    leaves is small enough for a second, nearly exact float step and a last
    integer correction.
    """
    q = np.int64(np.float64(a) * inv_n)
    r = a - q * n
    q += np.int64(math.floor(np.float64(r) * inv_n))
    r = a - q * n
    if r < _I_ZERO:
        q -= _I_ONE
        r += n
    elif r >= n:
        q += _I_ONE
        r -= n
    return q, r


# --- the word stack -----------------------------------------------------------------


@register_jitable
def stack_push(words, height, col, word):
    """Put ``word`` on top of column ``col``'s stack.  Returns (height, ok).

    Below the bottom of the stack (a negative height, after words were borrowed
    from an empty stack) only zero words can come back, so anything else marks a
    corrupted buffer; a full column marks a buffer that was not grown.
    """
    ok = True
    if height >= _I_ZERO:
        if height < words.shape[0]:
            words[height, col] = np.uint16(word)
        else:
            ok = False
    elif word != _U_ZERO:
        ok = False
    return height + _I_ONE, ok


@register_jitable
def stack_pop(words, height, col):
    """Take the top word of column ``col``'s stack.  Returns (word, height).

    An empty stack yields zero words, which keeps popping defined and exactly
    invertible for every input sequence.
    """
    height -= _I_ONE
    word = _U_ZERO
    if height >= _I_ZERO:
        word = np.uint64(words[height, col])
    return word, height


# --- the coder ------------------------------------------------------------------------
#
# A digit of base 2**16 is pushed with frequency 2**16 (of 2**32): the state, always in
# [2**48, 2**64), gives up its low word and the digit takes the place of its second
# word.  A digit of base n is coded with the frequencies of uniform_code(n).  The
# forward step pushes a base-2**16 digit and pops a base-n digit; nearly always the
# pop needs exactly the word the push gave up, so the element helpers below hand it
# straight back and touch the stack only in the remaining cases ("spill" and "fill").


@register_jitable
def uniform_code(n):
    """Frequencies for a uniform digit in [0, n): (q, r), 2**32 = q * n + r.

    The first r digits get frequency q + 1 and the others q, so the frequencies
    sum to exactly 2**32.  The division goes through float64 with an integer
    correction: a hardware integer division per element would stop the kernels'
    loops from vectorising when beta differs per parameter.
    """
    total = np.int64(1 << PREC_BITS)
    ni = np.int64(n)
    q = np.int64(np.float64(total) / np.float64(ni))
    r = total - q * ni
    q = q - _I_ONE if r < _I_ZERO else (q + _I_ONE if r >= ni else q)
    return np.uint64(q), np.uint64(total - q * ni)


@register_jitable(inline="always")
def beta_constants(n):
    """Everything the kernels need to know about ``beta = n / d``.

    Returns ``(one_minus_beta, q, r, 1/q, 1/(q+1), 1/n)`` with (q, r) =
    ``uniform_code(n)``; ``1 - n/d`` is exact in float64.
    """
    n = np.int64(n)
    q, r = uniform_code(np.uint64(n))
    one_minus_beta = np.float64(_I_DENOM - n) * _INV_DENOM
    return (one_minus_beta, q, r, 1.0 / np.float64(q), 1.0 / np.float64(q + _U_ONE),
            1.0 / np.float64(n))


@register_jitable
def _uniform_slot(digit, q, r):
    """(cum, freq) of ``digit`` in the uniform code (q, r), without branches.

    Digits below r have frequency q + 1, so ``cum = digit * q + min(digit, r)``.
    """
    return digit * q + min(digit, r), q + np.uint64(digit < r)


@register_jitable
def _floor_quotient(a, b, inv_b):
    """``a // b`` for int64 ``|a| < 2**33`` and ``0 < b < 2**32``; exact."""
    q = np.int64(math.floor(np.float64(a) * inv_b))
    p = q * b
    if p > a:
        q -= _I_ONE
    elif a - p >= b:
        q += _I_ONE
    return q


@register_jitable
def _decode_uniform(state, q, r, inv_q, inv_q1):
    """Decode a uniform digit in [0, n) from ``state``, before renormalisation.

    Returns (digit, state) with the new state in [2**32, 2**64).  Both candidate
    digits are computed and the larger taken: the slot layout makes that the right
    one, and it avoids a branch that the processor cannot predict.
    """
    slot = np.int64(state & _U_PREC_MASK)
    qi = np.int64(q)
    ri = np.int64(r)
    if_low = _floor_quotient(slot, qi + _I_ONE, inv_q1)  # right when digit < r
    if_high = ri + _floor_quotient(slot - ri * (qi + _I_ONE), qi, inv_q)  # right otherwise
    digit = np.uint64(max(if_low, if_high))
    cum, freq = _uniform_slot(digit, q, r)
    return digit, freq * (state >> _U_PREC_BITS) + (np.uint64(slot) - cum)


@register_jitable(inline="always")
def forward_velocity(v, state, g, one_minus_beta, n, q, r, inv_q, inv_q1, scale):
    """``v <- (n/d) v - (1 - n/d) g`` exactly, for one parameter.

    Pushes ``v mod d`` (d = 2**16) and pops a digit in [0, n), which becomes the low
    digit of ``floor(v / d) * n``.  Returns ``(v, state, word, spill, ok)``: when
    ``spill`` is True the caller must push ``word`` on the parameter's stack.
    ``ok`` is False (and nothing is to be written) for a non-finite or too large
    gradient term or result.  Net buffer growth: log2(d / n) bits.
    """
    gt, ok = gradient_term(one_minus_beta, g, scale)
    low = np.uint64(v & _I_DIGIT_MASK)
    high = v >> _I_DIGIT_BITS  # floor(v / d): an arithmetic shift
    word = state & _U_WORD_MASK
    state = ((state >> _U_PREC_BITS) << _U_PREC_BITS) | (low << _U_DIGIT_BITS) \
        | ((state >> _U_WORD_BITS) & _U_WORD_MASK)
    digit, state = _decode_uniform(state, q, r, inv_q, inv_q1)
    spill = state >= _U_STATE_LOW
    # otherwise renormalise with the word the push gave up
    state = state if spill else (state << _U_WORD_BITS) | word
    v = high * n + np.int64(digit) - gt
    return v, state, word, spill, ok & fixed_fits(v)


@register_jitable(inline="always")
def reverse_velocity(v, state, g, one_minus_beta, n, q, r, inv_q, inv_q1, inv_n, scale):
    """``v <- (v + (1 - n/d) g) * d / n`` exactly: the inverse of :func:`forward_velocity`.

    Returns ``(v, state, fill, ok)``: when ``fill`` is True the caller must pop the
    top word of the parameter's stack and OR it into ``state``.
    """
    gt, ok = gradient_term(one_minus_beta, g, scale)
    v = v + gt
    ok &= fixed_fits(v)
    high, low = floordiv_signed(v if ok else _I_ZERO, n, inv_n)
    ok &= (high < _I_HIGH_LIMIT) & (high > -_I_HIGH_LIMIT)
    # push the digit `low` of base n
    cum, freq = _uniform_slot(np.uint64(low), q, r)
    emit = (state >> _U_PUSH_SHIFT) >= freq
    word = state & _U_WORD_MASK
    if emit:
        state = state >> _U_WORD_BITS
    else:
        word = _U_ZERO
    quot, rem = udiv_small(state, freq, inv_q1 if freq > q else inv_q)
    state = (quot << _U_PREC_BITS) + cum + rem
    # pop the digit of base d: a shift, leaving the state in [2**32, 2**48)
    slot = state & _U_PREC_MASK
    digit = slot >> _U_DIGIT_BITS
    state = (((state >> _U_PREC_BITS) << _U_DIGIT_BITS) + (slot & _U_WORD_MASK)) << _U_WORD_BITS
    return high * _I_DENOM + np.int64(digit), state | word, not emit, ok


@register_jitable(inline="always")
def move_position(x, v, alpha, sign):
    """``x + sign * alpha * v`` in fixed point.  Returns (x, ok)."""
    dx, ok = position_delta(alpha, v)
    x = x + sign * dx
    return x, ok & fixed_fits(x)


# --- Adam's position update -------------------------------------------------------


@register_jitable
def adam_delta(alpha, m, s, eps, inv_scale_m, inv_scale_s, scale):
    """The fixed-point decrement ``alpha * m / (sqrt(s) + eps)`` of Adam's position update.

    ``m`` and ``s`` are the fixed-point moments (``inv_scale_*`` the powers of two
    that give their values) and ``scale = 2**frac_bits`` that of x.  A deterministic
    function of the integers, rounded once by :func:`fixed_round`: the forward step
    subtracts it and the reverse step adds back the same integer.  ``s >= 0``, so
    ``sqrt`` is defined; ``eps > 0`` keeps the quotient finite.  IEEE division and
    square root are correctly rounded on both targets, so the integer is the same on
    the CPU and the GPU.  Returns ``(delta, ok)``.
    """
    denom = math.sqrt(np.float64(s) * inv_scale_s) + eps
    step = (np.float64(m) * inv_scale_m) / denom
    return fixed_round((alpha * step) * scale)


@register_jitable(inline="always")
def move_adam(x, m, s, alpha, eps, inv_scale_m, inv_scale_s, scale, sign):
    """``x - sign * alpha * m / (sqrt(s) + eps)`` in fixed point.  Returns (x, ok)."""
    dx, ok = adam_delta(alpha, m, s, eps, inv_scale_m, inv_scale_s, scale)
    x = x - sign * dx
    return x, ok & fixed_fits(x)
