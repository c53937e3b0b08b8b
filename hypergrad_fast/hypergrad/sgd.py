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

import numpy as np
from autograd import builtins as ag_builtins
from autograd.extend import defvjp_argnums, primitive
from autograd.tracer import getval, isbox

from ..objectives import Objective, as_objective
from ._checks import check_decays, check_finite
from .algorithm import CpuBackend, RowObjectives, Schedules, SgdRecovery, forward, reverse

__all__ = ["sgd", "SgdRecovery"]


def _check_schedules(x0, schedules, groups, decays):
    """Validate shapes and values up front; returns (T, n_groups or 0, groups).

    ``schedules`` maps names to (T,) or (T, G) values, the learning rates first;
    those named in ``decays`` must lie in (0, 1].
    """
    if np.ndim(x0) != 1 or np.shape(x0)[0] == 0:
        raise ValueError(f"x0 must be a non-empty 1-D array, got shape {np.shape(x0)}")
    n = np.shape(x0)[0]
    names = list(schedules)
    shapes = {name: np.shape(value) for name, value in schedules.items()}
    first = names[0]
    if len(shapes[first]) not in (1, 2) or shapes[first][0] == 0:
        raise ValueError(f"{first} must have shape (T,) or (T, G), got {shapes[first]}")
    for name in names[1:]:
        if len(shapes[name]) not in (1, 2) or shapes[name][0] != shapes[first][0]:
            raise ValueError(f"{name} must have shape (T,) or (T, G) with the T of {first} "
                             f"({shapes[first][0]}), got {shapes[name]}")
    n_groups, grouped = 0, None
    for name in names:
        shape = shapes[name]
        if len(shape) == 2:
            if groups is None:
                raise ValueError(f"{name} has shape {shape}: pass groups, an int array of "
                                 f"length {n} giving each parameter's column")
            if n_groups and shape[1] != n_groups:
                raise ValueError(f"{grouped} and {name} disagree on the number of groups "
                                 f"({shapes[grouped]} vs {shape})")
            n_groups, grouped = shape[1], grouped or name
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,) or groups.dtype.kind not in "iu":
            raise ValueError(f"groups must be an int array of shape ({n},), got "
                             f"{groups.dtype} {groups.shape}")
        groups = groups.astype(np.int64)
        bad = np.flatnonzero((groups < 0) | (groups >= n_groups)) if n_groups else []
        if len(bad):
            raise ValueError(f"groups[{bad[0]}] = {groups[bad[0]]} is outside [0, {n_groups})")
    for name, a in schedules.items():
        kind = np.asarray(a).dtype.kind
        if kind not in "fiu":
            raise TypeError(f"{name} must be real numbers, got dtype {np.asarray(a).dtype}")
        check_finite(name, np.asarray(a, dtype=np.float64))
    for name in decays:
        check_decays(name, schedules[name])
    return shapes[first][0], n_groups, groups


@dataclass
class _Run:
    """What the forward pass hands to the reverse pass (not differentiated).

    ``make_backend(x0 (1, N), schedules (1, T, G) each, groups, n_groups, frac_bits)``
    builds the optimiser's backend; ``name`` is the function's, for messages.
    """

    name: str
    make_backend: Callable
    objective: Objective
    groups: np.ndarray
    callback: Optional[Callable]
    frac_bits: int
    progress: bool
    backend: Any = None
    x0_fixed: Any = None


def _forward(x0, schedules, meta, run):
    """Algorithm 1 on the exact engine; keeps the engine in ``run`` for the reverse."""
    n_groups = max(a.shape[1] for a in schedules)
    be = run.make_backend(x0[None, :], [a[None] for a in schedules], run.groups, n_groups,
                          run.frac_bits)
    run.x0_fixed = be.state().x
    def on_step(t, be, g):
        run.callback(t, be.engines[0], g[0])

    rows = RowObjectives(run.objective, [meta], want_meta=False)
    forward(be, rows, progress=run.progress,
            callback=None if run.callback is None else on_step)
    run.backend = be
    return be.engines[0].x


def _reverse(run, meta, d_x, need_meta=True):
    """Algorithm 2 over the run's engine: (d_x0, (d_schedule, ...), d_meta).

    Without ``need_meta`` the Hessian-vector products are taken in x alone.
    """
    be = run.backend
    if be is None:
        raise RuntimeError(f"this {run.name} run was already reversed; call {run.name} again")
    run.backend = None  # one reverse pass per forward run
    rows = RowObjectives(run.objective, [meta], want_meta=need_meta)
    d_x = np.asarray(d_x, dtype=np.float64).reshape(1, -1)
    out = reverse(be, rows, d_x, run.x0_fixed, progress=run.progress)
    d_meta = rows.d_metas[0] if need_meta else rows.objective.meta_zeros(meta)
    return out.d_x0[0], tuple(d[0] for d in out.d_schedules), d_meta


def _shaped(part, schedule):
    """A (T, G) per-group part shaped like its (T,) or (T, G) schedule."""
    return part if np.ndim(schedule) == 2 else part.sum(axis=1)


def _as_2d(schedule):
    a = np.asarray(schedule, dtype=np.float64)
    return a if a.ndim == 2 else a[:, None]


@primitive
def _train(run, x0, meta, *schedules):
    """x_T of a run of ``run``'s optimiser; its VJP is the reverse pass."""
    return _forward(np.asarray(x0, dtype=np.float64), [_as_2d(a) for a in schedules], meta,
                    run)


def _train_vjp_maker(argnums, ans, args, kwargs):
    run, _, meta, *schedules = args

    def vjp(g):
        d_x0, d_schedules, d_meta = _reverse(run, meta, g, need_meta=2 in argnums)
        grads = (None, d_x0, d_meta) + tuple(_shaped(d, a) for d, a in zip(d_schedules,
                                                                            schedules))
        return tuple(grads[i] for i in argnums)

    return vjp


defvjp_argnums(_train, _train_vjp_maker)


def train(name, make_backend, loss, x0, schedules, decays, meta, groups, callback, frac_bits,
          progress):
    """Check the inputs and run the primitive: what :func:`sgd` and
    :func:`~.adam.adam` share.  ``schedules`` maps the argument names to their (maybe
    boxed) values, the learning rates first."""
    plain = {k: getval(v) for k, v in schedules.items()}
    _, n_groups, groups = _check_schedules(getval(x0), plain, groups, decays)
    if not n_groups:  # (T,) schedules: one group holds every parameter
        groups = np.zeros(np.shape(getval(x0))[0], dtype=np.int64)
    run = _Run(name=name, make_backend=make_backend, objective=as_objective(loss),
               groups=groups, callback=callback, frac_bits=frac_bits, progress=progress)
    if meta is None:
        meta = np.zeros(0)
    return _train(run, x0, _box_containers(meta), *schedules.values())


def _momentum_backend(x0, schedules, groups, n_groups, frac_bits):
    alphas, betas = schedules
    return CpuBackend(x0, Schedules.of(alphas, betas, groups, n_groups), frac_bits)


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
    if callback is not None:
        user_callback = callback

        def callback(t, engine, g):
            user_callback(t, engine.x, engine.v, g)
    return train("sgd", _momentum_backend, loss, x0, {"alphas": alphas, "betas": betas},
                 ("betas",), meta, groups, callback, frac_bits, progress)
