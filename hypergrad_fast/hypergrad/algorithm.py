"""Algorithms 1 and 2 of the paper, written once, for one training run or B of them.

:func:`forward` runs the forward pass (Algorithm 1) on an exact engine and
:func:`reverse` the reverse pass (Algorithm 2): it undoes every step bit for bit,
recomputes each gradient with the Hessian-vector product it needs, and
accumulates the hypergradients.  :func:`~hypergrad_fast.sgd` (one run, any
objective) and :func:`~hypergrad_fast.sweep` (B runs, on the CPU or a GPU) are
both these two functions with a backend and a batched objective:

* a *backend* holds the engine(s) of the (B, N) parameters, the schedules, and runs the
  reverse pass's element-wise steps: :class:`CpuBackend` here,
  :class:`~._cuda.CudaBackend` on a GPU.  The element-wise steps are the per-thread
  functions of :mod:`~hypergrad_fast.objectives._gpu_mlp`, compiled for both.
* a *batched objective* gives the (B, N) gradients and Hessian-vector products and
  accumulates the meta cotangents: :class:`RowObjectives` runs an
  :class:`~hypergrad_fast.objectives.Objective` row by row, the sweep's compiled
  rows run together on all cores, :class:`~._cuda.KernelMLP` runs all rows in
  batched kernels.

Row b of a run depends on row b's inputs alone: the engine is element-wise, each
row's objective calls are separate, and the group sums of one row add its own
terms in parameter order.  So B settings run together give each one the same bits
as running it alone, whichever settings share its batch.

Momentum convention: ``v <- beta v - (1 - beta) g;  x <- x + alpha v``, ``v0 = 0``.
"""

import contextlib
from typing import NamedTuple

import numpy as np
from numba import njit

from ..engine import EngineState, ReversibleMomentum, effective_beta, information_bound
from ..engine._cpu_kernels import _at
from ..engine.cpu import held_bits
from ..objectives import _gpu_mlp

__all__ = ["SgdRecovery", "Schedules", "CpuBackend", "BatchedObjective", "RowObjectives",
           "forward", "reverse"]


class SgdRecovery(RuntimeError):
    """The reverse pass did not return to x0 bit for bit (never expected)."""


class Schedules(NamedTuple):
    """Per-setting, per-iteration, per-group coefficients, as the backends take them.

    alphas:    (B, T, G) learning rates.
    betas:     (B, T, G) momentum decays as given (the engine rounds them itself).
    betas_eff: (B, T, G) the decays the engine uses (:func:`effective_beta`).
    groups:    (N,) int64, each parameter's column in G.
    """

    alphas: np.ndarray
    betas: np.ndarray
    betas_eff: np.ndarray
    groups: np.ndarray

    @classmethod
    def of(cls, alphas, betas, groups, n_groups):
        """From (B, T) or (B, T, G) float64 arrays (checked by the caller); a (B, T) or
        (B, T, 1) schedule holds one value for every group."""
        alphas, betas = (a[:, :, None] if a.ndim == 2 else a for a in (alphas, betas))
        shape = alphas.shape[:2] + (n_groups,)

        def full(a):
            return np.ascontiguousarray(np.broadcast_to(a, shape), dtype=np.float64)

        betas = full(betas)
        return cls(full(alphas), betas, effective_beta(betas), np.asarray(groups, np.int64))

    @property
    def n_iter(self):
        return self.alphas.shape[1]

    def worst_column(self):
        """The (T,) decays of the (setting, group) whose stacks grow the most."""
        bits = information_bound(self.betas_eff).sum(axis=1)
        b, g = np.unravel_index(np.argmax(bits), bits.shape)
        return self.betas_eff[b, :, g]


@njit(cache=True)
def _group_sums(a, c, e, use_e, groups, out, t):
    """``out[b, t, group] = sum of a * (c + e)`` (``a * c`` without ``use_e``) per group.

    Terms are added in parameter order from 0.0: for contiguous groups exactly the
    order (and so the bits) of the per-group kernel ``group_dot``, which
    :meth:`CpuBackend.group_dot` runs for such groups.
    """
    n_runs, n_params = a.shape
    for b in range(n_runs):
        for grp in range(out.shape[2]):
            out[b, t, grp] = 0.0
        if use_e:
            for i in range(n_params):
                out[b, t, groups[i]] += a[b, i] * (c[b, i] + e[b, i])
        else:
            for i in range(n_params):
                out[b, t, groups[i]] += a[b, i] * c[b, i]


@njit(cache=True)
def _fill_blocks(rows, bounds):
    """A (B, G) row of per-group values as one flat (B * N) array, each value over its
    group's block ``bounds[g]:bounds[g + 1]``."""
    n_params = bounds[-1]
    out = np.empty(rows.shape[0] * n_params)
    for b in range(rows.shape[0]):
        for grp in range(rows.shape[1]):
            out[b * n_params + bounds[grp]:b * n_params + bounds[grp + 1]] = rows[b, grp]
    return out


class _Coefficients:
    """The engine's prepared coefficient for row t of a (B, T, G) schedule.

    The last two distinct rows are kept, keyed by their values, so a schedule that
    holds its rows is expanded and validated once, not at every step of both passes.
    A row with one value throughout goes to the engine as a scalar.
    """

    def __init__(self, schedule, groups, prepare, bounds=None):
        self._schedule, self._groups, self._prepare = schedule, groups, prepare
        # With ``bounds``, the (G + 1,) block edges of groups that are contiguous blocks
        # in order (the models' layouts), a row expands by filling each block with its
        # value, several times faster than a gather.
        self._bounds = bounds
        self._kept = {}

    def _expand(self, row):
        if self._bounds is not None:
            return _fill_blocks(row, self._bounds)
        return row[:, self._groups].ravel()

    def __getitem__(self, t):
        row = self._schedule[:, t, :]
        key = row.tobytes()
        value = self._kept.get(key)
        if value is None:
            first = row.flat[0]
            per_param = first if (row == first).all() else self._expand(row)
            value = self._prepare(per_param)
            if len(self._kept) == 2:
                del self._kept[next(iter(self._kept))]
            self._kept[key] = value
        return value


class MomentumRule:
    """The reverse pass's local steps for SGD with momentum, on a backend with the
    element-wise steps ``group_dot``, ``velocity_cotangent``, ``hvp_direction`` and
    ``after_hvp`` (:class:`CpuBackend`, :class:`~._cuda.CudaBackend`).

    Going back through step t with the cotangents d_x, d_v of x_{t+1}, v_{t+1}::

        d_alphas[t] += d_x . v_{t+1} (per group);   d_v += alpha_t d_x
        undo the position; g_t and H u at x_t, u = -(1 - beta_t) d_v; undo v
        d_betas[t] += d_v . (v_t + g_t) (per group); d_x += H u;  d_v *= beta_t
    """

    #: The Hessian-vector product's direction does not depend on g_t.
    needs_gradient = False

    def begin_reverse(self):
        runs, n_params = self.shape
        n_iter, n_groups = self.sched.n_iter, self.sched.alphas.shape[2]
        self._d_v, self._vec = self.zeros((runs, n_params)), self.zeros((runs, n_params))
        self._d_sched = tuple(self.zeros((runs, n_iter, n_groups)) for _ in range(2))

    def position_cotangents(self, d_x, t):
        self.group_dot(d_x, self.v(), d_x, False, self._d_sched[0], t)
        self.velocity_cotangent(self._d_v, d_x, t)

    def direction(self, g, t):
        self.hvp_direction(self._vec, self._d_v, t)
        return self._vec

    def unstep_moments(self, g, t):
        self.unstep_velocity(g, t)

    def moment_cotangents(self, d_x, g, hx, t):
        self.group_dot(self._d_v, self.v(), g, True, self._d_sched[1], t)
        self.after_hvp(d_x, hx, self._d_v, t)

    def back_at_start(self, x0_state):
        end = self.state()
        return np.array_equal(end.x, x0_state) and not end.v.any()

    def schedule_cotangents(self):
        """(d_alphas, d_betas), each (B, T, G)."""
        return self._d_sched


class HostBackend:
    """What the backends of host arrays with one CPU engine per setting (row) share.

    Subclasses make ``self.engines`` and call :meth:`_setup`.  Each row has its own
    engine, so a setting's coefficients stay scalars when its schedule row is
    constant over groups (the engine's cheapest path) and its result is that of a
    separate run by construction.
    """

    name = "cpu"

    def _setup(self, x0, sched):
        self.shape = x0.shape
        self.sched = sched
        self._loops = _gpu_mlp.cpu_loops()
        self.groups = sched.groups
        n_groups = sched.alphas.shape[2]
        self._bounds = None
        if np.all(self.groups[1:] >= self.groups[:-1]):  # contiguous blocks
            self._bounds = np.searchsorted(self.groups, np.arange(n_groups + 1)).astype(np.int64)

    def _per_engine(self, schedule, prepare):
        """Row b's coefficients of a (B, T, G) schedule, prepared by engine b's method
        named ``prepare``."""
        return [_Coefficients(schedule[b:b + 1], self.groups, getattr(e, prepare), self._bounds)
                for b, e in enumerate(self.engines)]

    def _values(self, schedule, prepare=None):
        """The float values of a (B, T, G) schedule at t: scalars or (B, N) arrays (or
        what ``prepare`` makes of one)."""
        shaped = self._shaped if prepare is None else (lambda v: prepare(self._shaped(v)))
        return _Coefficients(schedule, self.groups, shaped, self._bounds)

    def _shaped(self, per_param):
        """A scalar, or a flat per-parameter row as (B, N)."""
        return per_param if np.ndim(per_param) == 0 else per_param.reshape(self.shape)

    # arrays
    def put(self, a, dtype=np.float64):
        return np.array(a, dtype=dtype, order="C")

    def zeros(self, shape):
        return np.zeros(shape)

    def get(self, a):
        return np.array(a)

    def flat(self, a):
        return a.reshape(-1)

    def is_array(self, a):
        return isinstance(a, np.ndarray)

    def own(self, a, name):
        """A C-contiguous float64 copy of ``a`` that the caller may overwrite."""
        return np.array(a, dtype=np.float64, order="C")

    def states(self, a, name):
        return np.ascontiguousarray(a, dtype=np.float64)

    def run(self, name, n_threads, *args):
        getattr(self._loops, name)(np.int64(n_threads), *args)

    # the engines
    def _rows(self, name):
        if len(self.engines) == 1:
            return getattr(self.engines[0], name).reshape(self.shape)
        return np.stack([getattr(e, name) for e in self.engines])

    def x(self):
        return self._rows("x")

    def _each(self, call):
        for b, engine in enumerate(self.engines):
            try:
                call(b, engine)
            except (OverflowError, FloatingPointError, ValueError, RuntimeError) as err:
                if len(self.engines) == 1:
                    raise
                raise type(err)(f"setting {b}: {err}") from None

    def group_dot(self, a, c, e, use_e, out, t):
        """``out[:, t, group] = per-group sums of a * (c + e)`` (``a * c`` without ``use_e``)."""
        if self._bounds is not None:
            runs, n_groups = self.shape[0], self._bounds.shape[0] - 1
            self.run("group_dot", runs * n_groups, a, c, e, use_e, self._bounds, out,
                     np.int64(t))
        else:
            _group_sums(a, c, e, use_e, self.groups, out, np.int64(t))


class CpuBackend(MomentumRule, HostBackend):
    """One :class:`ReversibleMomentum` per setting (row); host arrays."""

    def __init__(self, x0, sched: Schedules, frac_bits):
        self.engines = [ReversibleMomentum(row, frac_bits=frac_bits) for row in x0]
        self._setup(x0, sched)
        self._alpha = self._per_engine(sched.alphas, "_prepare_checked_alpha")
        self._beta = self._per_engine(sched.betas, "prepare_beta")
        self._alpha_values = self._values(sched.alphas)
        self._beta_values = self._values(sched.betas_eff,
                                         lambda b: (b, -(1.0 - b)))

    def v(self):
        return self._rows("v")

    @property
    def aux_bits(self):
        """Bits held by the information buffers of every row."""
        if len(self.engines) == 1:
            return self.engines[0].aux_bits
        state = self.state()
        return held_bits(state.coder, state.height)

    def reserve(self):
        worst = self.sched.worst_column()[:, None]
        for e in self.engines:
            e.reserve(self.sched.n_iter, worst)

    def step(self, g, t):
        self._each(lambda b, e: e.step(g[b], self._alpha[b][t], self._beta[b][t]))

    def unstep_position(self, t):
        self._each(lambda b, e: e.unstep_position(self._alpha[b][t]))

    def unstep_velocity(self, g, t):
        self._each(lambda b, e: e.unstep_velocity(g[b], self._beta[b][t]))

    def state(self):
        """The exact state with x, v, coder, height as (B, N), words (rows, B, N)."""
        states = [e.state for e in self.engines]
        rows = max(s.words.shape[0] for s in states)
        words = np.zeros((rows,) + self.shape, dtype=states[0].words.dtype)
        for b, s in enumerate(states):
            words[:s.words.shape[0], b] = s.words
        return EngineState(*(np.stack([getattr(s, f) for s in states])
                             for f in ("x", "v", "coder", "height")), words)

    # With contiguous groups, each row's cotangents in one fused pass (the same bits).
    def position_cotangents(self, d_x, t):
        if self._bounds is None:
            return super().position_cotangents(d_x, t)
        s = self.sched
        for b, engine in enumerate(self.engines):
            _position_cotangents(d_x[b], *engine.fixed_v(), s.alphas[b, t], s.betas_eff[b, t],
                                 self._bounds, self._d_v[b], self._vec[b],
                                 self._d_sched[0][b, t])

    def direction(self, g, t):
        if self._bounds is None:
            return super().direction(g, t)
        return self._vec  # made by position_cotangents

    def moment_cotangents(self, d_x, g, hx, t):
        if self._bounds is None:
            return super().moment_cotangents(d_x, g, hx, t)
        for b, engine in enumerate(self.engines):
            _moment_cotangents(self._d_v[b], *engine.fixed_v(), g[b], self.sched.betas_eff[b, t],
                               self._bounds, d_x[b], hx[b], self._d_sched[1][b, t])

    # The reverse pass's element-wise steps: each one IEEE operation per element, as in
    # the per-thread kernels of the GPU, so the bits are the same (one compiled loop
    # each, with Numba's default IEEE flags, so no multiply-add is contracted).
    def velocity_cotangent(self, d_v, d_x, t):
        """``d_v += alpha_t * d_x``."""
        _add_product(d_v.reshape(-1), _flat(self._alpha_values[t]), d_x.reshape(-1))

    def hvp_direction(self, vec, d_v, t):
        """``vec = -(1 - beta_t) * d_v`` (beta_t the effective decay)."""
        _scaled(vec.reshape(-1), _flat(self._beta_values[t][1]), d_v.reshape(-1))

    def after_hvp(self, d_x, hx, d_v, t):
        """``d_x += hx``; ``d_v *= beta_t``."""
        _add_and_scale(d_x.reshape(-1), hx.reshape(-1), d_v.reshape(-1),
                       _flat(self._beta_values[t][0]))


def _flat(coef):
    """A scalar, or a (B, N) coefficient as a flat view."""
    return coef if np.ndim(coef) == 0 else coef.reshape(-1)


@njit(cache=True)
def _add_product(out, coef, a):
    for i in range(out.shape[0]):
        out[i] += _at(coef, i) * a[i]


@njit(cache=True)
def _scaled(out, coef, a):
    for i in range(out.shape[0]):
        out[i] = _at(coef, i) * a[i]


@njit(cache=True)
def _add_and_scale(d_x, hx, d_v, coef):
    for i in range(d_x.shape[0]):
        d_x[i] += hx[i]
        d_v[i] *= _at(coef, i)


# One run's reverse-pass cotangents in one pass over the parameters, for groups that are
# contiguous blocks (the models' layouts).  Per element, the IEEE operations of
# group_dot, velocity_cotangent, hvp_direction and after_hvp (the per-thread functions
# that the GPU runs), in the same order, and v's value as to_float computes it: the
# same bits, without the velocity's float copy, the per-parameter coefficient rows and
# five more passes.
@njit(cache=True)
def _position_cotangents(d_x, v_fixed, inv_scale, alphas, betas_eff, bounds, d_v, vec, out):
    """``out[grp] = sum(d_x * v)`` per group; ``d_v += alpha d_x``; ``vec = -(1 - beta) d_v``
    (alphas, betas_eff (G,): step t's values per group)."""
    for grp in range(bounds.shape[0] - 1):
        alpha, factor = alphas[grp], -(1.0 - betas_eff[grp])
        acc = 0.0
        for i in range(bounds[grp], bounds[grp + 1]):
            acc += d_x[i] * (np.float64(v_fixed[i]) * inv_scale)
            d_v[i] += alpha * d_x[i]
            vec[i] = factor * d_v[i]
        out[grp] = acc


@njit(cache=True)
def _moment_cotangents(d_v, v_fixed, inv_scale, g, betas_eff, bounds, d_x, hx, out):
    """``out[grp] = sum(d_v * (v + g))`` per group; ``d_x += hx``; ``d_v *= beta``."""
    for grp in range(bounds.shape[0] - 1):
        beta = betas_eff[grp]
        acc = 0.0
        for i in range(bounds[grp], bounds[grp + 1]):
            acc += d_v[i] * (np.float64(v_fixed[i]) * inv_scale + g[i])
            d_x[i] += hx[i]
            d_v[i] *= beta
        out[grp] = acc


class BatchedObjective:
    """What :func:`forward` and :func:`reverse` call for B runs at once:

    ``grad(x, t) -> g`` and ``grad_and_hvp(x, t, vec) -> (g, H vec)`` on (B, N)
    backend arrays, row b for run b, accumulating meta cotangents on the side;
    :meth:`grad_then_hvp`, when the direction depends on g; and :meth:`session`,
    held around each pass.
    """

    def session(self):
        """A context manager held around a whole pass (default: nothing)."""
        return contextlib.nullcontext()

    def grad_then_hvp(self, x, t, direction):
        """``(g, H u)`` with ``u = direction(g)`` a function of the gradient itself (Adam's
        reverse pass).  By default the gradient, then :meth:`grad_and_hvp` (which
        computes it again, the same bits)."""
        return self.grad_and_hvp(x, t, direction(self.grad(x, t)))


class RowObjectives(BatchedObjective):
    """B runs of one :class:`~hypergrad_fast.objectives.Objective`, each with its own meta,
    evaluated row after row; ``want_meta`` accumulates ``d/dmeta`` of each row's
    Hessian-vector products.  (``sgd`` uses one row; the sweep's built-in objective
    runs its rows together in compiled code instead.)
    """

    def __init__(self, objective, metas, want_meta):
        self.objective, self.metas = objective, list(metas)
        self.d_metas = [objective.meta_zeros(m) for m in self.metas] if want_meta else None

    def session(self):
        return self.objective.session()

    def _rows(self, one):
        return [one(b) for b in range(len(self.metas))]

    def _where(self, b):
        return f" (setting {b})" if len(self.metas) > 1 else ""

    def grad(self, x, t):
        def one(b):
            value, g = self.objective.value_and_grad(x[b], self.metas[b], t)
            if np.ndim(value) != 0:
                raise ValueError(f"loss must return a scalar, got shape {np.shape(value)}")
            if not np.isfinite(value):
                raise FloatingPointError(f"the training loss is {value} at iteration {t}"
                                         + self._where(b))
            return g
        return _stack(self._rows(one))

    def grad_and_hvp(self, x, t, vec):
        def one(b):
            d_meta = None if self.d_metas is None else self.d_metas[b]
            g, hx, d_meta = self.objective.grad_and_hvp(x[b], self.metas[b], t, vec[b], d_meta)
            if self.d_metas is not None:
                self.d_metas[b] = d_meta
            return g, hx
        rows = self._rows(one)
        return _stack([r[0] for r in rows]), _stack([r[1] for r in rows])

    def grad_then_hvp(self, x, t, direction):
        if len(self.metas) > 1:  # the direction takes all rows' gradients at once
            return super().grad_then_hvp(x, t, direction)
        # One run: the objective's own (the compiled ones run the gradient pass once).
        d_meta = None if self.d_metas is None else self.d_metas[0]
        g, hx, d_meta = self.objective.grad_then_hvp(
            x[0], self.metas[0], t, lambda g_row: direction(g_row.reshape(1, -1))[0], d_meta)
        if self.d_metas is not None:
            self.d_metas[0] = d_meta
        return _stack([g]), _stack([hx])


def _stack(rows):
    if len(rows) == 1:
        return np.asarray(rows[0], dtype=np.float64).reshape(1, -1)
    return np.stack(rows).astype(np.float64, copy=False)


def _progress(iterable, enabled, desc, total):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _at_iteration(err, t, phase):
    """The engine's error with the pass and iteration in front (the backend has already
    put the setting in front for B runs)."""
    return type(err)(f"{phase}iteration {t}: {err}")


def forward(be, objective, progress=False, callback=None):
    """Algorithm 1: train every row for the schedules' T iterations on ``be``."""
    n_iter = be.sched.n_iter
    be.reserve()
    with objective.session():
        for t in _progress(range(n_iter), progress, "forward", n_iter):
            g = objective.grad(be.x(), t)
            try:
                be.step(g, t)
            except (OverflowError, FloatingPointError) as err:
                raise _at_iteration(err, t, "") from None
            if callback is not None:
                callback(t, be, g)


class Reversed(NamedTuple):
    """What the reverse pass returns, as backend arrays."""

    d_x0: object  # (B, N)
    d_schedules: tuple  # (B, T, G) each, in the backend's order: alphas, then the decays

    @property
    def d_alphas(self):
        return self.d_schedules[0]

    @property
    def d_betas(self):
        """Momentum's decays (through the effective decays)."""
        return self.d_schedules[1]


def reverse(be, objective, d_x, x0_state, progress=False):
    """Algorithm 2: undo the run on ``be`` and accumulate the hypergradients.

    ``d_x`` is the (B, N) cotangent of x_T (it is not overwritten); ``x0_state`` the
    engine's fixed-point x at the start, to check that the reverse pass came back to
    it bit for bit.  The update rule's local steps are the backend's
    (:class:`MomentumRule`, :class:`~.adam.AdamRule`); one iteration back is:
    the cotangents that the position update sends to the schedule and the optimiser
    state; undo the position; the gradient at x_t with one Hessian-vector product;
    undo the optimiser state with that gradient; the cotangents of the state update.
    """
    n_iter = be.sched.n_iter
    d_x = be.own(d_x, "d_x")
    be.begin_reverse()
    with objective.session():
        for t in _progress(range(n_iter - 1, -1, -1), progress, "reverse", n_iter):
            be.position_cotangents(d_x, t)
            try:
                be.unstep_position(t)
            except (OverflowError, FloatingPointError, RuntimeError) as err:
                raise _at_iteration(err, t, "reverse pass, ") from None
            x = be.x()
            if be.needs_gradient:
                g, hx = objective.grad_then_hvp(x, t, lambda g: be.direction(g, t))
            else:
                g, hx = objective.grad_and_hvp(x, t, be.direction(None, t))
            try:
                be.unstep_moments(g, t)
            except (OverflowError, FloatingPointError, RuntimeError) as err:
                raise _at_iteration(err, t, "reverse pass, ") from None
            be.moment_cotangents(d_x, g, hx, t)
    if not be.back_at_start(x0_state):
        raise SgdRecovery("the reverse pass did not recover x0 bit for bit; the loss (or "
                          "gradient functions) and minibatches must be deterministic in "
                          "(x, meta, t)")
    return Reversed(d_x, be.schedule_cotangents())
