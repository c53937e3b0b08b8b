"""Adam as an autograd primitive whose VJP runs training backwards exactly.

``x_T = adam(loss, x0, alphas, b1s, b2s, meta)`` trains with Adam (no bias
correction) on the exact reversible engine
:class:`~hypergrad_fast.engine.ReversibleAdam`; its vector-Jacobian product is the
reverse pass of :func:`~.algorithm.reverse`, the same as ``sgd``'s, with Adam's
local steps (:class:`AdamRule`).  Memory is that of the two information buffers,
about ``log2(1/b1) + log2(1/b2)`` bits per parameter per iteration.
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from ..engine import ReversibleAdam, effective_beta, information_bound
from ..engine._cpu_kernels import _at
from ..engine._wrapper import check_frac_bits
from ..engine.adam import S_FRAC_BITS, _check_eps
from .algorithm import HostBackend, _flat
from .sgd import train

__all__ = ["adam", "AdamSchedules", "AdamCpuBackend"]


class AdamSchedules(NamedTuple):
    """Per-setting, per-iteration, per-group coefficients of Adam runs, (B, T, G) each.

    alphas: learning rates; b1s, b2s: the decays as given; b1s_eff, b2s_eff: the decays
    the engine uses (:func:`~hypergrad_fast.effective_beta`); groups: (N,) int64.
    """

    alphas: np.ndarray
    b1s: np.ndarray
    b2s: np.ndarray
    b1s_eff: np.ndarray
    b2s_eff: np.ndarray
    groups: np.ndarray

    @classmethod
    def of(cls, alphas, b1s, b2s, groups, n_groups):
        """From (B, T) or (B, T, G) float64 arrays (checked by the caller)."""
        shape = alphas.shape[:2] + (n_groups,)

        def full(a):
            a = a[:, :, None] if a.ndim == 2 else a
            return np.ascontiguousarray(np.broadcast_to(a, shape), dtype=np.float64)

        b1s, b2s = full(b1s), full(b2s)
        return cls(full(alphas), b1s, b2s, effective_beta(b1s), effective_beta(b2s),
                   np.asarray(groups, np.int64))

    @property
    def n_iter(self):
        return self.alphas.shape[1]


class AdamRule:
    """The reverse pass's local steps for Adam (host arrays).

    Forward step t, with u = m_{t+1} / (sqrt(s_{t+1}) + eps)::

        m_{t+1} = b1 m_t + (1 - b1) g_t;  s_{t+1} = b2 s_t + (1 - b2) g_t**2
        x_{t+1} = x_t - alpha u

    Going back with the cotangents d_x, d_m, d_s of x_{t+1}, m_{t+1}, s_{t+1}::

        d_alphas[t] += -d_x . u  (per group)
        d_m += -alpha d_x / (sqrt(s) + eps)
        d_s += alpha d_x m / (2 sqrt(s) (sqrt(s) + eps)**2)  (0 where s = 0)
        undo the position; g_t at x_t; H w with w = (1 - b1) d_m + 2 (1 - b2) g_t d_s
        undo m and s; d_b1s[t] += d_m . (m_t - g_t); d_b2s[t] += d_s . (s_t - g_t**2)
        d_x += H w;  d_m *= b1;  d_s *= b2

    The derivative of sqrt at s = 0 is infinite; s = 0 means that every gradient so
    far was zero (or rounded to zero in g**2), where the term is taken as 0.
    """

    #: The Hessian-vector product's direction depends on g_t.
    needs_gradient = True

    def begin_reverse(self):
        runs, n_params = self.shape
        n_iter, n_groups = self.sched.n_iter, self.sched.alphas.shape[2]
        self._d_m, self._d_s = np.zeros((runs, n_params)), np.zeros((runs, n_params))
        self._scratch = np.empty((runs, n_params)), np.empty((runs, n_params))
        self._d_sched = tuple(np.zeros((runs, n_iter, n_groups)) for _ in range(3))

    def position_cotangents(self, d_x, t):
        m, s = self._rows("m"), self._rows("s")
        neg_u = self._scratch[0]
        _position_cotangents(d_x.ravel(), m.ravel(), s.ravel(), _flat(self._alpha_values[t]),
                             self.eps, neg_u.ravel(), self._d_m.ravel(), self._d_s.ravel())
        self.group_dot(d_x, neg_u, d_x, False, self._d_sched[0], t)

    def direction(self, g, t):
        w = self._scratch[0]
        _direction(g.ravel(), self._d_m.ravel(), self._d_s.ravel(),
                   _flat(self._b1_values[t]), _flat(self._b2_values[t]), w.ravel())
        return w

    def moment_cotangents(self, d_x, g, hx, t):
        m, s = self._rows("m"), self._rows("s")
        neg_g, neg_g2 = self._scratch
        _negated_terms(g.ravel(), neg_g.ravel(), neg_g2.ravel())
        self.group_dot(self._d_m, m, neg_g, True, self._d_sched[1], t)
        self.group_dot(self._d_s, s, neg_g2, True, self._d_sched[2], t)
        _decay_cotangents(d_x.ravel(), hx.ravel(), self._d_m.ravel(), self._d_s.ravel(),
                          _flat(self._b1_values[t]), _flat(self._b2_values[t]))

    def back_at_start(self, x0_state):
        end = self.state()
        return np.array_equal(end.x, x0_state) and not end.m.any() and not end.s.any()

    def schedule_cotangents(self):
        """(d_alphas, d_b1s, d_b2s), each (B, T, G)."""
        return self._d_sched


# The reverse pass's element-wise work, one loop each over the flat (B * N) arrays;
# a coefficient is a scalar or a flat per-element array.  error_model="numpy": the
# denominators are >= eps > 0, and Python's zero-division checks would stop the
# loops from vectorising.
@njit(cache=True, error_model="numpy")
def _position_cotangents(d_x, m, s, alpha, eps, neg_u, d_m, d_s):
    """``neg_u = -m / (sqrt(s) + eps)``; the cotangents that ``x - alpha u`` sends to m, s."""
    for i in range(d_x.shape[0]):
        root = math.sqrt(s[i])
        denom = root + eps
        neg_u[i] = -(m[i] / denom)
        scaled = _at(alpha, i) * d_x[i] / denom
        d_m[i] -= scaled
        to_s = scaled * m[i] / (2.0 * root * denom)
        d_s[i] += to_s if s[i] > 0.0 else 0.0  # s = 0: every gradient so far was 0


@njit(cache=True, error_model="numpy")
def _direction(g, d_m, d_s, b1, b2, out):
    """``out = (1 - b1) d_m + 2 (1 - b2) g d_s``: the cotangent of g_t."""
    for i in range(g.shape[0]):
        out[i] = (1.0 - _at(b1, i)) * d_m[i] + (2.0 * (1.0 - _at(b2, i))) * g[i] * d_s[i]


@njit(cache=True)
def _negated_terms(g, neg_g, neg_g2):
    for i in range(g.shape[0]):
        neg_g[i] = -g[i]
        neg_g2[i] = -(g[i] * g[i])


@njit(cache=True)
def _decay_cotangents(d_x, hx, d_m, d_s, b1, b2):
    """``d_x += H w``; ``d_m *= b1``; ``d_s *= b2``."""
    for i in range(d_x.shape[0]):
        d_x[i] += hx[i]
        d_m[i] *= _at(b1, i)
        d_s[i] *= _at(b2, i)


class AdamCpuBackend(AdamRule, HostBackend):
    """One :class:`ReversibleAdam` per setting (row); host arrays."""

    def __init__(self, x0, sched: AdamSchedules, eps, frac_bits, s_frac_bits=S_FRAC_BITS):
        self.eps = eps
        self.engines = [ReversibleAdam(row, eps=eps, frac_bits=frac_bits,
                                       s_frac_bits=s_frac_bits) for row in x0]
        self._setup(x0, sched)
        self._alpha = self._per_engine(sched.alphas, "_prepare_checked_alpha")
        self._b1 = self._per_engine(sched.b1s, "prepare_decay")
        self._b2 = self._per_engine(sched.b2s, "prepare_decay")
        self._alpha_values = self._values(sched.alphas)
        self._b1_values = self._values(sched.b1s_eff)
        self._b2_values = self._values(sched.b2s_eff)

    @property
    def aux_bits(self):
        return sum(e.aux_bits for e in self.engines)

    def reserve(self):
        for b, e in enumerate(self.engines):
            bits = [information_bound(d[b]).sum(axis=0) for d in (self.sched.b1s_eff,
                                                                  self.sched.b2s_eff)]
            # the group whose stacks grow the most, for each moment
            worst = [d[b][:, np.argmax(w)][:, None] for d, w in
                     zip((self.sched.b1s_eff, self.sched.b2s_eff), bits)]
            e.reserve(self.sched.n_iter, *worst)

    def step(self, g, t):
        self._each(lambda b, e: e.step(g[b], self._alpha[b][t], self._b1[b][t], self._b2[b][t]))

    def unstep_position(self, t):
        self._each(lambda b, e: e.unstep_position(self._alpha[b][t]))

    def unstep_moments(self, g, t):
        self._each(lambda b, e: e.unstep_moments(g[b], self._b1[b][t], self._b2[b][t]))

    def state(self):
        """x, m and s as (B, N) int64 (the reverse pass's end check)."""
        states = [e.state for e in self.engines]
        return _Positions(*(np.stack([getattr(s, f) for s in states]) for f in ("x", "m", "s")))


class _Positions(NamedTuple):
    x: np.ndarray
    m: np.ndarray
    s: np.ndarray


def _adam_backend(eps, s_frac_bits):
    def make(x0, schedules, groups, n_groups, frac_bits):
        return AdamCpuBackend(x0, AdamSchedules.of(*schedules, groups, n_groups), eps,
                              frac_bits, s_frac_bits)
    return make


def adam(loss, x0, alphas, b1s, b2s, meta=None, *, eps=1e-8, groups=None, callback=None,
         frac_bits=52, s_frac_bits=S_FRAC_BITS, progress=False):
    """Train with Adam, exactly reversibly; differentiable by autograd.

    With ``m_0 = s_0 = 0`` and ``g_t = grad L(x_t, meta, t)``::

        m_{t+1} = b1_t m_t + (1 - b1_t) g_t
        s_{t+1} = b2_t s_t + (1 - b2_t) g_t**2
        x_{t+1} = x_t - alpha_t m_{t+1} / (sqrt(s_{t+1}) + eps)

    There is no bias correction, so per-iteration schedules stay simple; fold it
    into ``alpha_t`` (``alpha_t * sqrt(1 - b2**(t+1)) / (1 - b1**(t+1))``).

    Parameters
    ----------
    loss : callable ``loss(x, meta, t) -> scalar`` (autograd.numpy), or an
        :class:`~hypergrad_fast.objectives.Objective` such as the compiled losses of
        :func:`~hypergrad_fast.models.make_train_loss`.  Minibatches must be a
        deterministic function of ``t``.
    x0 : (N,) float64 — initial weights.
    alphas, b1s, b2s : (T,) or (T, G) — learning rates and the two decays per
        iteration (and per group).  b1s and b2s lie in (0, 1] and are held as
        rationals n / 2**16 (:func:`~hypergrad_fast.effective_beta`).
    meta : array or autograd container of arrays, or None — the loss's other input.
    eps : float > 0 (default 1e-8).
    groups : (N,) int array — each parameter's column in (T, G) schedules.
    callback : ``callback(t, x, m, s, g)`` after each forward iteration.
    frac_bits : bits after the fixed radix point of x and m (default 52).
    s_frac_bits : the same for s (default 60: s, about the mean square gradient,
        must stay below 4; lower it for larger gradients).

    Returns ``x_T`` (N,).  ``autograd.grad`` through it gives the exact-trajectory
    gradients for ``x0``, ``alphas``, ``b1s``, ``b2s`` (through the effective decays)
    and ``meta`` from one reverse pass, which checks that it came back to ``x0`` bit
    for bit (:class:`~hypergrad_fast.SgdRecovery` otherwise).
    """
    eps = _check_eps(eps)
    s_frac_bits = check_frac_bits(s_frac_bits)
    if callback is not None:
        user_callback = callback

        def callback(t, engine, g):
            user_callback(t, engine.x, engine.m, engine.s, g)
    return train("adam", _adam_backend(eps, s_frac_bits), loss, x0,
                 {"alphas": alphas, "b1s": b1s, "b2s": b2s}, ("b1s", "b2s"), meta, groups,
                 callback, frac_bits, progress)
