"""SGD with momentum as an autograd primitive whose VJP runs training backwards.

``x_T = sgd(loss, x0, alphas, betas, meta)`` trains with the paper's Algorithm 1 on
the exact engine; its vector-Jacobian product is Algorithm 2: it undoes the steps
exactly, recomputes each gradient on the way back, and accumulates the gradients
of x0, the learning-rate and momentum schedules and ``meta`` with one
Hessian-vector product per iteration.  Memory is that of the information buffer
(about log2(1/beta) bits per parameter per iteration), not of the trajectory.
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional

import autograd.numpy as anp
import numpy as np
from autograd import builtins as ag_builtins
from autograd import grad, make_vjp, value_and_grad
from autograd.extend import defvjp_argnums, primitive, vspace
from autograd.tracer import getval, isbox

from .engine import ReversibleMomentum, effective_beta

__all__ = ["sgd", "SgdRecovery"]


class SgdRecovery(RuntimeError):
    """The reverse pass did not return to x0 bit for bit (never expected)."""


@dataclass
class _Run:
    """What the forward pass hands to the reverse pass (not differentiated)."""

    loss: Callable
    groups: Optional[np.ndarray]
    callback: Optional[Callable]
    frac_bits: int
    progress: bool
    engine: Any = None
    x0_fixed: Any = None


def _per_param(schedule_t, groups):
    """A row of a (T,) or (T, G) schedule as a scalar or a per-parameter array."""
    if np.ndim(schedule_t) == 0:
        return float(schedule_t)
    return schedule_t[groups]


class _Rows:
    """The rows of a (T,) or (T, G) schedule, each turned into per-step values once.

    ``rows[t]`` is ``make(per_param)`` for row t, where ``per_param`` is the row as a
    scalar or expanded to parameters.  The last two distinct rows are kept, keyed by
    their values: a schedule that holds its rows (constant per group, as a fixed
    schedule is) is expanded and handed to the engine's validation once, not at
    every step of both passes; a learned schedule costs what it did without this.
    """

    def __init__(self, schedule, groups, make):
        self._schedule, self._groups, self._make = schedule, groups, make
        self._kept = {}

    def __getitem__(self, t):
        row = self._schedule[t]
        key = row.tobytes()
        value = self._kept.get(key)
        if value is None:
            value = self._make(_per_param(row, self._groups))
            if len(self._kept) == 2:
                del self._kept[next(iter(self._kept))]
            self._kept[key] = value
        return value


class _GroupSums:
    """``sums(values)``: per-group sums of per-parameter values, (G,) float64.

    Groups laid out in contiguous blocks (as :class:`~hypergrad_fast.models.ParamLayout`
    lays them out) are summed block by block with ``np.add.reduceat``; other
    layouts go through ``np.bincount``.
    """

    def __init__(self, groups, n_groups):
        self._groups, self._n_groups = groups, n_groups
        self._starts = None
        if np.all(groups[1:] >= groups[:-1]):
            self._present = np.bincount(groups, minlength=n_groups) > 0
            self._starts = np.searchsorted(groups, np.arange(n_groups))[self._present]

    def __call__(self, values):
        if self._starts is None:
            return np.bincount(self._groups, weights=values, minlength=self._n_groups)
        out = np.zeros(self._n_groups)
        out[self._present] = np.add.reduceat(values, self._starts)
        return out


def _progress(iterable, enabled, desc, total):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _index(multi_index):
    return "[" + ", ".join(str(int(i)) for i in multi_index) + "]"


def _check_schedules(x0, alphas, betas, groups):
    """Validate shapes and values up front; returns (T, n_groups or 0, groups)."""
    if np.ndim(x0) != 1 or np.shape(x0)[0] == 0:
        raise ValueError(f"x0 must be a non-empty 1-D array, got shape {np.shape(x0)}")
    n = np.shape(x0)[0]
    a_shape, b_shape = np.shape(alphas), np.shape(betas)
    if len(a_shape) not in (1, 2) or a_shape[0] == 0:
        raise ValueError(f"alphas must have shape (T,) or (T, G), got {a_shape}")
    if len(b_shape) not in (1, 2) or b_shape[0] != a_shape[0]:
        raise ValueError(f"betas must have shape (T,) or (T, G) with the T of alphas "
                         f"({a_shape[0]}), got {b_shape}")
    n_groups = 0
    for name, shape in (("alphas", a_shape), ("betas", b_shape)):
        if len(shape) == 2:
            if groups is None:
                raise ValueError(f"{name} has shape {shape}: pass groups, an int array of "
                                 f"length {n} giving each parameter's column")
            if n_groups and shape[1] != n_groups:
                raise ValueError(f"alphas and betas disagree on the number of groups "
                                 f"({a_shape} vs {b_shape})")
            n_groups = shape[1]
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,) or groups.dtype.kind not in "iu":
            raise ValueError(f"groups must be an int array of shape ({n},), got "
                             f"{groups.dtype} {groups.shape}")
        groups = groups.astype(np.int64)
        bad = np.flatnonzero((groups < 0) | (groups >= n_groups)) if n_groups else []
        if len(bad):
            raise ValueError(f"groups[{bad[0]}] = {groups[bad[0]]} is outside [0, {n_groups})")
    for name, a in (("alphas", alphas), ("betas", betas)):
        a = np.asarray(a, dtype=np.float64)
        finite = np.isfinite(a)
        if not finite.all():
            i = np.unravel_index(np.argmin(finite), a.shape)
            raise FloatingPointError(f"{name}{_index(i)} = {a[i]} is not finite")
    b = np.asarray(betas, dtype=np.float64)
    inside = (b > 0) & (b <= 1)
    if not inside.all():
        i = np.unravel_index(np.argmin(inside), b.shape)
        raise ValueError(f"betas{_index(i)} = {b[i]} is outside (0, 1]")
    return a_shape[0], n_groups, groups


def _forward(x0, alphas, betas, meta, run):
    """Algorithm 1 on the exact engine; leaves the engine in ``run`` for the reverse."""
    loss, groups = run.loss, run.groups
    n_iter = alphas.shape[0]
    value0 = loss(x0, meta, 0)
    if np.ndim(value0) != 0:
        raise ValueError(f"loss must return a scalar, got shape {np.shape(value0)}")
    eng = ReversibleMomentum(x0, frac_bits=run.frac_bits)
    eng.reserve(n_iter, betas)
    run.x0_fixed = eng.state.x
    loss_grad = value_and_grad(loss)
    alpha_rows = _Rows(alphas, groups, eng.prepare_alpha)
    beta_rows = _Rows(betas, groups, eng.prepare_beta)
    for t in _progress(range(n_iter), run.progress, "sgd forward", n_iter):
        x = eng.x
        value, g = loss_grad(x, meta, t)
        if not np.isfinite(value):
            raise FloatingPointError(f"the training loss is {value} at iteration {t}")
        try:
            eng.step(g, alpha_rows[t], beta_rows[t])
        except (OverflowError, FloatingPointError) as err:
            raise type(err)(f"iteration {t}: {err}") from None
        if run.callback is not None:
            run.callback(t, eng.x, eng.v, g)
    run.engine = eng
    return eng.x


def _reverse(run, alphas, betas, meta, d_x, need_meta=True):
    """Algorithm 2: undo the run exactly and accumulate all hypergradients.

    Without ``need_meta`` the Hessian-vector products are taken in x alone, which
    skips the work of differentiating the loss in its meta inputs.
    """
    eng, loss, groups = run.engine, run.loss, run.groups
    if eng is None:
        raise RuntimeError("this sgd run was already reversed; call sgd again")
    run.engine = None  # one reverse pass per forward run
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    n_iter = alphas.shape[0]
    d_x = np.array(d_x, dtype=np.float64)
    d_v = np.zeros_like(d_x)
    d_alphas = np.zeros_like(alphas)
    d_betas = np.zeros_like(betas)
    meta_space = vspace(meta)
    d_meta = meta_space.zeros()
    n_groups = max(d_alphas.shape[1:] + d_betas.shape[1:], default=0)
    group_sums = _GroupSums(groups, n_groups) if n_groups else None

    def accumulate(total, t, a, b):  # total[t] += sum(a * b), per group for (T, G)
        if total.ndim == 1:
            total[t] += np.dot(a, b)
        else:
            total[t] += group_sums(a * b)

    def beta_row(beta):  # the engine's beta, its effective value, and -(1 - that)
        beta_eff = effective_beta(beta)
        return eng.prepare_beta(beta), beta_eff, beta_eff - 1.0

    alpha_rows = _Rows(alphas, groups, lambda alpha: (eng.prepare_alpha(alpha), alpha))
    beta_rows = _Rows(betas, groups, beta_row)
    for t in _progress(range(n_iter - 1, -1, -1), run.progress, "sgd reverse", n_iter):
        alpha_k, alpha = alpha_rows[t]
        beta_k, beta_eff, neg_one_minus_beta = beta_rows[t]
        accumulate(d_alphas, t, d_x, eng.v)
        eng.unstep_position(alpha_k)
        d_v += alpha * d_x
        if need_meta:
            hvp, g = make_vjp(lambda xm: grad(loss)(xm[0], xm[1], t))((eng.x, meta))
        else:
            hvp, g = make_vjp(lambda x: grad(loss)(x, meta, t))(eng.x)
        eng.unstep_velocity(g, beta_k)
        accumulate(d_betas, t, d_v, eng.v + g)
        if need_meta:
            h_x, h_meta = hvp(neg_one_minus_beta * d_v)
            d_meta = meta_space.add(d_meta, h_meta)
        else:
            h_x = hvp(neg_one_minus_beta * d_v)
        d_x += h_x
        d_v *= beta_eff
    state = eng.state
    if not (np.array_equal(state.x, run.x0_fixed) and not state.v.any()):
        raise SgdRecovery("the reverse pass did not recover x0 bit for bit; the loss or its "
                          "minibatches must be deterministic in (x, meta, t)")
    return d_x, d_alphas, d_betas, d_meta


@primitive
def _sgd(x0, alphas, betas, meta, run):
    return _forward(np.asarray(x0, dtype=np.float64), np.asarray(alphas, dtype=np.float64),
                    np.asarray(betas, dtype=np.float64), meta, run)


def _sgd_vjp_maker(argnums, ans, args, kwargs):
    _, alphas, betas, meta, run = args

    def vjp(g):
        grads = _reverse(run, alphas, betas, meta, g, need_meta=3 in argnums)
        return tuple(grads[i] for i in argnums)

    return vjp


defvjp_argnums(_sgd, _sgd_vjp_maker)


def _box_containers(meta):
    """Rebuild plain containers holding boxed leaves so autograd sees one boxed value."""
    if isinstance(meta, (tuple, list)) and not isbox(meta):
        items = [_box_containers(m) for m in meta]
        return (ag_builtins.tuple(items) if isinstance(meta, tuple)
                else ag_builtins.list(items))
    if isinstance(meta, dict) and not isbox(meta):
        return ag_builtins.dict({k: _box_containers(m) for k, m in meta.items()})
    return meta


def sgd(loss, x0, alphas, betas, meta=None, *, groups=None, callback=None, frac_bits=52,
        progress=False):
    """Train with SGD with momentum, exactly reversibly; differentiable by autograd.

    Parameters
    ----------
    loss : callable ``loss(x, meta, t) -> scalar``
        The training loss at iteration ``t`` (autograd.numpy); its minibatch must be
        a deterministic function of ``t``.
    x0 : (N,) float64 — initial weights.
    alphas, betas : (T,) or (T, G) — learning rates and momentum decays per
        iteration (and per group).  betas lie in (0, 1] and are used as
        :func:`~hypergrad_fast.effective_beta` of themselves.
    meta : array or autograd container (tuple/list/dict) of arrays, or None —
        any other input of the loss (regularisation, training data).
    groups : (N,) int array — each parameter's column in (T, G) schedules.
    callback : ``callback(t, x, v, g)`` after each forward iteration.

    Returns ``x_T`` (N,).  ``autograd.grad`` through it returns exact-trajectory
    hypergradients for ``x0``, ``alphas``, ``betas`` and ``meta`` from one reverse
    pass; the reverse pass checks that it returned to ``x0`` bit for bit.
    Update rule: ``v <- beta v - (1 - beta) g;  x <- x + alpha v``, ``v0 = 0``.
    """
    run = _Run(loss=loss, groups=None if groups is None else np.asarray(groups),
               callback=callback, frac_bits=frac_bits, progress=progress)
    if meta is None:
        meta = np.zeros(0)
    _, _, run.groups = _check_schedules(getval(x0), getval(alphas), getval(betas), run.groups)
    return _sgd(x0, alphas, betas, _box_containers(meta), run)
