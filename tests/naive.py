"""Slow, obviously-correct references for the engine tests (plain Python, no Numba).

Nothing here imports ``hypergrad_fast``: a reference that shared code with the
engine could share its bugs.  Momentum convention, as in the engine::

    v <- beta * v - (1 - beta) * g
    x <- x + alpha * v

Sections (append new references at the end, each self-contained):

1. exact fixed-point rounding            -- round_half_up, to_fixed, beta_numerator
2. the paper's information buffer        -- PythonIntBuffer
3. a reversible momentum engine on it    -- NaiveReversibleMomentum
4. float64 momentum and its error bound  -- float_momentum, fixed_point_error_bound
5. drivers shared by engine and reference -- run_forward, run_reverse
6. float64 SGD unrolled for autograd     -- unrolled_sgd
7. float64 Adam unrolled for autograd    -- unrolled_adam
"""

import math
from fractions import Fraction

import autograd.numpy as anp
import numpy as np
from autograd import grad

#: beta is held as n / BETA_DENOM (Maclaurin et al. store it as a rational n / d).
BETA_DENOM = 1 << 16
#: The engine's coder needs n >= 2; beta below 2 / 2**16 is held as 2 / 2**16.
BETA_MIN_NUMER = 2

# ------------------------------------------------------------ 1. exact rounding


def round_half_up(value):
    """``floor(value + 1/2)`` computed exactly: nearest integer, ties towards +inf.

    ``value`` is an int, a float (taken at its exact binary value) or a Fraction.
    """
    return math.floor(Fraction(value) + Fraction(1, 2))


def to_fixed(value, frac_bits):
    """The fixed-point integer of a float: ``round_half_up(value * 2**frac_bits)``."""
    return round_half_up(Fraction(float(value)) * (1 << frac_bits))


def beta_numerator(beta):
    """``n`` with ``beta ~= n / 2**16``: nearest (ties to even), clipped to [2, 2**16]."""
    return min(max(round(Fraction(float(beta)) * BETA_DENOM), BETA_MIN_NUMER), BETA_DENOM)


def _per_param(coef, size):
    """A scalar or length-``size`` coefficient as a list of ``size`` floats."""
    arr = np.asarray(coef, dtype=np.float64)
    return [float(c) for c in (np.full(size, arr) if arr.ndim == 0 else arr)]


# ------------------------------------------------------------ 2. information buffer


class PythonIntBuffer:
    """The paper's information buffer: one arbitrary-precision integer per parameter.

    :meth:`multiply` is the exact rational multiply of an integer ``v`` by ``n / d``
    from Maclaurin, Duvenaud & Adams (2015)::

        buf = buf * d + (v mod d);  v = (v div d) * n + (buf mod n);  buf = buf div n

    and :meth:`divide` is its inverse.  Each multiply stores ``log2(d / n)`` bits
    net, so :attr:`bits` is the information the reversal needs.  (The engine codes
    the same digits with a range-ANS coder; the digits it hands back differ, so
    the trajectories differ in the low bits, but the information is the same.)
    """

    def __init__(self, size):
        self.bufs = [0] * size

    def multiply(self, i, v, n, d=BETA_DENOM):
        """``v * n / d`` rounded by a digit taken from buffer ``i``; returns the new v."""
        buf = self.bufs[i] * d + v % d
        v = (v // d) * n + buf % n
        self.bufs[i] = buf // n
        return v

    def divide(self, i, v, n, d=BETA_DENOM):
        """The inverse of :meth:`multiply`: ``v * d / n`` exactly, restoring buffer ``i``."""
        buf = self.bufs[i] * n + v % n
        v = (v // n) * d + buf % d
        self.bufs[i] = buf // d
        return v

    @property
    def bits(self):
        """Information held, in bits: the sum over parameters of ``log2(buf + 1)``."""
        return sum(math.log2(b + 1) for b in self.bufs)

    @property
    def empty(self):
        return all(b == 0 for b in self.bufs)


# ------------------------------------------------------------ 3. reference engine


class NaiveReversibleMomentum:
    """The engine's API on Python integers and a :class:`PythonIntBuffer`.

    ``x`` and ``v`` are integers in units of ``2**-frac_bits`` (unbounded);
    ``alpha * v`` and ``(1 - beta) * g`` are rounded exactly by :func:`round_half_up`,
    the same rule forward and backward, so every step is exactly undone.
    """

    def __init__(self, x0, v0=None, frac_bits=52):
        self.frac_bits = frac_bits
        self._x = [to_fixed(a, frac_bits) for a in x0]
        self._v = [0] * len(self._x) if v0 is None else [to_fixed(a, frac_bits) for a in v0]
        self.buffer = PythonIntBuffer(len(self._x))
        self.iterations = 0

    @property
    def size(self):
        return len(self._x)

    @property
    def x(self):
        # int / int is correctly rounded, as is the engine's int64 -> float64 / 2**k.
        return np.array([a / (1 << self.frac_bits) for a in self._x])

    @property
    def v(self):
        return np.array([a / (1 << self.frac_bits) for a in self._v])

    @property
    def state(self):
        """(x, v, buffers): copies of the exact integer state."""
        return list(self._x), list(self._v), list(self.buffer.bufs)

    @property
    def aux_bits(self):
        return self.buffer.bits

    def _gradient_term(self, g, n):
        return round_half_up(Fraction(BETA_DENOM - n, BETA_DENOM) * Fraction(float(g))
                             * (1 << self.frac_bits))

    def _delta(self, alpha, v):
        return round_half_up(Fraction(alpha) * v)

    def step(self, g, alpha, beta):
        alpha, beta = _per_param(alpha, self.size), _per_param(beta, self.size)
        for i in range(self.size):
            n = beta_numerator(beta[i])
            self._v[i] = self.buffer.multiply(i, self._v[i], n) - self._gradient_term(g[i], n)
            self._x[i] += self._delta(alpha[i], self._v[i])
        self.iterations += 1

    def unstep_position(self, alpha):
        alpha = _per_param(alpha, self.size)
        for i in range(self.size):
            self._x[i] -= self._delta(alpha[i], self._v[i])

    def unstep_velocity(self, g, beta):
        beta = _per_param(beta, self.size)
        for i in range(self.size):
            n = beta_numerator(beta[i])
            self._v[i] = self.buffer.divide(i, self._v[i] + self._gradient_term(g[i], n), n)
        self.iterations -= 1


# ------------------------------------------------------------ 4. float64 reference

EPS = 2.0**-53  # unit roundoff of float64


def float_momentum(x0, v0, grad, alphas, betas):
    """The recursion in float64.  Returns ``(xs, vs, gs)``.

    ``grad(x, t)`` is the gradient at step ``t``; ``alphas[t]`` and ``betas[t]`` are
    scalars or per-parameter arrays (pass the *effective* betas to compare with the
    engine).  ``xs`` and ``vs`` have shape (T + 1, N) (index 0 is the start), ``gs``
    (T, N).
    """
    x = np.array(x0, dtype=np.float64)
    v = np.zeros_like(x) if v0 is None else np.array(v0, dtype=np.float64)
    xs, vs, gs = [x], [v], []
    for t in range(len(alphas)):
        g = np.asarray(grad(x, t), dtype=np.float64)
        v = betas[t] * v - (1.0 - betas[t]) * g
        x = x + alphas[t] * v
        xs.append(x)
        vs.append(v)
        gs.append(g)
    return np.array(xs), np.array(vs), np.array(gs)


def fixed_point_error_bound(xs, vs, gs, alphas, betas, frac_bits, lipschitz, grad_bound,
                            decay_ulps):
    """Bounds ``(ex, ev)`` on ``|X_t - x_t|`` and ``|V_t - v_t|`` (shape (T + 1, N)).

    ``X, V`` is a fixed-point run with unit ``u = 2**-frac_bits`` whose gradient is
    ``G_t = f(fl(X_t))`` (``fl``: the float64 of the fixed-point value), and ``x, v``
    is :func:`float_momentum` with ``g_t = f(x_t)`` (``xs, vs, gs`` its outputs), for an
    elementwise ``f`` with Lipschitz constant ``lipschitz`` and ``|f| <= grad_bound``.

    Per step, with ``eps = 2**-53``, the fixed-point run makes these errors:

    * decay: ``|V' + (1-b) G - b V| <= decay_ulps * u`` (``decay_ulps`` is a property
      of the scheme: any ``floor(V / d) * n + digit`` with ``0 <= digit < n`` gives
      ``n``; the engine's coder pops a digit within 2 of ``(V mod d) * n / d``, so 2);
    * the gradient term ``(1-b) G`` on the grid: ``u/2 + eps (1-b) |G|`` (one float
      product, then rounding to the grid);
    * the position increment ``alpha V'`` on the grid: ``u/2 + 2.0001 eps |alpha V'|``
      (``fl(V')``, one float product, then rounding to the grid);
    * the gradient itself: ``|G - g| <= L (|X - x| + eps |X|) + 8 eps grad_bound``
      (``fl(X)``, and a few ulps for evaluating ``f`` in float64 at two points);

    and the float run makes ``2.0001 eps`` times the sum of magnitudes of each line
    (two roundings each).  The error recursion follows by the triangle inequality;
    it is linear in ``T`` when ``lipschitz`` is 0 and otherwise grows as the
    linearised dynamics allow, which is the most a correct engine can promise.
    """
    u = 2.0**-frac_bits
    eps2 = 2.0001 * EPS
    xs, vs, gs = np.abs(xs), np.abs(vs), np.abs(gs)
    ex = np.full(xs.shape[1], u / 2.0)
    ev = np.where(vs[0] != 0, u / 2.0, 0.0)
    exs, evs = [ex], [ev]
    # With a Lipschitz gradient the bound can grow exponentially and overflow to inf
    # on long runs: it then says nothing about the later steps, which callers skip.
    with np.errstate(over="ignore", invalid="ignore"):
        _bound_steps(exs, evs, xs, vs, gs, alphas, betas, u, eps2, lipschitz, grad_bound,
                     decay_ulps)
    return np.array(exs), np.array(evs)


def _bound_steps(exs, evs, xs, vs, gs, alphas, betas, u, eps2, lipschitz, grad_bound,
                 decay_ulps):
    ex, ev = exs[-1], evs[-1]
    for t in range(gs.shape[0]):
        a, b = np.abs(alphas[t]), np.asarray(betas[t], dtype=np.float64)
        dg = lipschitz * (ex + EPS * (xs[t] + ex)) + 8 * EPS * grad_bound
        ev = (b * ev + (1 - b) * dg + (decay_ulps + 0.5) * u + EPS * (1 - b) * grad_bound
              + eps2 * (b * vs[t] + (1 - b) * gs[t]))
        ex = (ex + a * ev + u / 2.0 + eps2 * a * (vs[t + 1] + ev)
              + eps2 * (xs[t] + a * vs[t + 1]))
        exs.append(ex)
        evs.append(ev)


# ------------------------------------------------------------ 5. drivers


def run_forward(engine, grad, alphas, betas, record=None):
    """``len(alphas)`` forward steps, the gradient taken at the engine's current x.

    ``record(engine, t)``, if given, is called before step ``t`` and once at the end.
    """
    for t in range(len(alphas)):
        if record is not None:
            record(engine, t)
        engine.step(grad(engine.x, t), alphas[t], betas[t])
    if record is not None:
        record(engine, len(alphas))


def run_reverse(engine, grad, alphas, betas, check=None):
    """Undo the steps of :func:`run_forward`, last first (Algorithm 2's loop).

    The gradient of step ``t`` is recomputed at the restored ``x_t``.  ``check(engine,
    t)``, if given, is called after step ``t`` is undone.
    """
    for t in reversed(range(len(alphas))):
        engine.unstep_position(alphas[t])
        engine.unstep_velocity(grad(engine.x, t), betas[t])
        if check is not None:
            check(engine, t)


# ------------------------------------------------------------ 6. unrolled hypergradients
#
# autograd straight through an unrolled float64 loop of the same recursion as
# ``hypergrad_fast.sgd``: it stores every iterate (memory linear in T) and is
# obviously correct.  Pass effective betas to compare with ``sgd``.


def unrolled_sgd(loss, x0, alphas, betas, meta=None, *, groups=None):
    """x_T by the plain loop; differentiable in every argument by autograd."""
    loss_grad = grad(loss)
    x, v = x0, anp.zeros(x0.shape[0])
    for t in range(alphas.shape[0]):
        g = loss_grad(x, meta, t)
        a = alphas[t] if anp.ndim(alphas[t]) == 0 else alphas[t][groups]
        b = betas[t] if anp.ndim(betas[t]) == 0 else betas[t][groups]
        v = b * v - (1.0 - b) * g
        x = x + a * v
    return x


# ------------------------------------------------------------ 7. unrolled Adam
# The recursion of ``hypergrad_fast.adam`` (no bias correction) as a plain float64
# loop, differentiable in every argument by autograd.  Pass effective decays to
# compare with ``adam``.


def unrolled_adam(loss, x0, alphas, b1s, b2s, meta=None, *, eps=1e-8, groups=None):
    """x_T by the plain loop: m <- b1 m + (1-b1) g; s <- b2 s + (1-b2) g**2;
    x <- x - alpha m / (sqrt(s) + eps), with m0 = s0 = 0."""
    loss_grad = grad(loss)
    x = x0
    m, s = anp.zeros(x0.shape[0]), anp.zeros(x0.shape[0])

    def at(schedule, t):
        return schedule[t] if anp.ndim(schedule[t]) == 0 else schedule[t][groups]

    for t in range(alphas.shape[0]):
        g = loss_grad(x, meta, t)
        b1, b2 = at(b1s, t), at(b2s, t)
        m = b1 * m + (1.0 - b1) * g
        s = b2 * s + (1.0 - b2) * g * g
        x = x - at(alphas, t) * m / (anp.sqrt(s) + eps)
    return x
