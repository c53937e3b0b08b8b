"""Batched hyperparameter sweeps: B settings of one model trained and run backwards together.

``sweep(model, data, alphas, betas, ...)`` trains B copies of one model, each with
its own learning-rate and momentum schedules, initial scales and L2 strengths, on
the exact reversible engine (Algorithm 1), then runs all B trainings backwards at
once (Algorithm 2, as in :mod:`hypergrad_fast.sgd`) and returns each setting's final
validation loss with its exact hypergradients.  It is the batched twin of
``autograd.grad`` through :func:`hypergrad_fast.sgd.sgd`::

    x0[b]    = exp(log_init_scales[b, group]) * noise
    x_T[b]   = sgd(train_loss[b], x0[b], alphas[b], betas[b], meta[b])
    valid[b] = mean validation cross-entropy of x_T[b]      (nats per example)

``device="cpu"`` runs one :class:`~hypergrad_fast.engine.ReversibleMomentum` over the
B * N parameters; ``device="cuda"`` runs a
:class:`~hypergrad_fast.gpu_engine.BatchedReversibleMomentum`, and the gradients,
Hessian-vector products and every reverse-pass update stay on the device: per engine
call the host sends the step's learning rates and decays (B numbers for (B, T)
schedules; B * N for (B, T, G) ones, as the engine takes per-element coefficients
from the host) and reads the engine's 16-byte flags.  Both
call the same per-thread functions (:mod:`._gpu_models`), compiled for the CPU with
``@njit`` and for the GPU with ``@cuda.jit``, so the CPU result is a reference for
the GPU one (bit for bit under the CUDA simulator; see that module).

Row b depends on row b's inputs alone (see :mod:`.algorithm`), so the settings can be
run in pieces with the same bits: ``on_error="report"`` reruns a failing batch in
halves down to the settings that fail, which are returned as NaN rows with their
reason in ``SweepResult.status``; ``client=`` (a ``dask.distributed.Client``) runs
contiguous chunks of settings on a cluster's workers (:mod:`._dask`).  Every piece is
run by :func:`_run_settings`, the one code path of a local sweep.
"""

import logging
import math
from typing import NamedTuple, Optional

import numpy as np

from ..engine import gpu_available
from ..engine.cpu import held_bits
from ..models import MLP
from ..objectives import ParamLayout
from ..objectives.layout import group_bounds
from ._cuda import CudaBackend, KernelMLP
from ._checks import check_decays, check_finite
from .algorithm import (BatchedObjective, CpuBackend, Schedules, SgdRecovery, forward,
                        reverse)

__all__ = ["sweep", "SweepResult"]

logger = logging.getLogger(__name__)

_DEVICES = ("cpu", "cuda", "auto")
_ON_ERROR = ("raise", "report")
#: What one setting's training can raise: divergence (a non-finite loss or gradient,
#: fixed-point overflow) and a reverse pass that missed x0.  ``on_error="report"``
#: turns these into a status; anything else (a bug, a bad custom function) raises.
SETTING_ERRORS = (ArithmeticError, SgdRecovery)
#: The status of a setting that trained and reversed with finite results.
OK = "ok"


class SweepResult(NamedTuple):
    """What :func:`sweep` returns; arrays are float64 on the host, row b for setting b.

    valid_loss:        (B,) validation cross-entropy of x_T (nats per example), or what
                       ``valid_fn`` returned.
    d_alphas:          d valid_loss / d alphas, shaped like ``alphas``: (B, T) or (B, T, G).
    d_betas:           d valid_loss / d betas, shaped like ``betas`` (through the
                       effective decay, as in :func:`~hypergrad_fast.sgd.sgd`).
    d_log_init_scales: (B, G) d valid_loss / d log_init_scales.
    d_meta:            d valid_loss / d meta, shaped like ``meta``; None without meta.
    x_final:           (B, N) trained parameters x_T.
    aux_bits:          information held by the engine after the forward pass, in bits
                       (summed over settings and parameters; on the CPU the exactly
                       rounded sum of the per-setting totals, so it does not depend on
                       how the settings were split).
    status:            (B,) tuple of str: ``"ok"``, or for a setting that failed under
                       ``on_error="report"`` ``"setting b: ErrorType: reason"`` (its
                       rows are NaN).  Empty in a SweepResult built by hand.
    """

    valid_loss: np.ndarray
    d_alphas: np.ndarray
    d_betas: np.ndarray
    d_log_init_scales: np.ndarray
    d_meta: Optional[np.ndarray]
    x_final: np.ndarray
    aux_bits: float
    status: tuple = ()

    @property
    def ok(self) -> np.ndarray:
        """(B,) bool: which settings have results (status "ok")."""
        return np.array([s == OK for s in self.status], dtype=bool)

    @property
    def failures(self) -> dict:
        """{setting index: status} of the settings that failed."""
        return {b: s for b, s in enumerate(self.status) if s != OK}


# =============================================================================== validation
def _real_array(name, value):
    a = np.asarray(value)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return np.array(a, dtype=np.float64)


def _schedule(name, value, n_groups, runs_iters=None):
    """A (B, T) or (B, T, G) schedule as float64, checked; ``runs_iters`` is (B, T) to match."""
    a = _real_array(name, value)
    if a.ndim not in (2, 3) or 0 in a.shape[:2]:
        raise ValueError(f"{name} must have shape (B, T) or (B, T, G) with B, T >= 1 and "
                         f"G = {n_groups} parameter groups, got {a.shape}")
    if runs_iters is not None and a.shape[:2] != runs_iters:
        raise ValueError(f"{name} must have the (B, T) = {runs_iters} of alphas, got {a.shape}")
    if a.ndim == 3 and a.shape[2] != n_groups:
        raise ValueError(f"{name} has shape {a.shape}: its last axis must hold one value per "
                         f"parameter group ({n_groups}), got {a.shape[2]}")
    check_finite(name, a)
    return a


def _per_setting(name, value, n_runs, n_groups):
    """A scalar, (G,) or (B, G) value as a finite (B, G) float64 array."""
    a = _real_array(name, value)
    if a.shape not in ((), (n_groups,), (n_runs, n_groups)):
        raise ValueError(f"{name} must be a scalar or have shape ({n_groups},) or "
                         f"({n_runs}, {n_groups}), got {a.shape}")
    a = np.array(np.broadcast_to(a, (n_runs, n_groups)))
    check_finite(name, a)
    return a


def _noise(x0_noise, n_runs, n_params):
    """The fixed draw that x0 scales: a seed for ``default_rng(seed).standard_normal(N)``,
    or an (N,) or (B, N) array."""
    if isinstance(x0_noise, (int, np.integer)) and not isinstance(x0_noise, bool):
        if x0_noise < 0:
            raise ValueError(f"x0_noise as a seed must be >= 0, got {x0_noise}")
        return np.broadcast_to(np.random.default_rng(int(x0_noise)).standard_normal(n_params),
                               (n_runs, n_params))
    a = _real_array("x0_noise", x0_noise)
    if a.shape not in ((n_params,), (n_runs, n_params)):
        raise ValueError(f"x0_noise must be a seed or have shape ({n_params},) or "
                         f"({n_runs}, {n_params}), got {a.shape}")
    check_finite("x0_noise", a)
    return np.broadcast_to(a, (n_runs, n_params))


def _split(name, split, n_in, n_out):
    """(inputs (n, n_in), targets (n, n_out)) float64 from a Split or an (inputs, targets) pair."""
    if hasattr(split, "inputs") and hasattr(split, "targets"):
        inputs, targets = split.inputs, split.targets
    else:
        try:
            inputs, targets = split
        except (TypeError, ValueError):
            raise TypeError(f"{name} data must be an (inputs, targets) pair or have .inputs "
                            f"and .targets, got {type(split).__name__}") from None
    inputs = _real_array(f"{name} inputs", inputs)
    targets = _real_array(f"{name} targets", targets)
    if inputs.ndim != 2 or inputs.shape[1] != n_in or inputs.shape[0] == 0:
        raise ValueError(f"{name} inputs must have shape (n, {n_in}) with n >= 1, "
                         f"got {inputs.shape}")
    if targets.shape != (inputs.shape[0], n_out):
        raise ValueError(f"{name} targets must have shape ({inputs.shape[0]}, {n_out}), "
                         f"got {targets.shape}")
    check_finite(f"{name} inputs", inputs)
    check_finite(f"{name} targets", targets)
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


def _layout(model, custom, kernels):
    if isinstance(model, ParamLayout):
        if not custom:
            raise TypeError("a ParamLayout as model needs grad_fn, hvp_fn and valid_fn; the "
                            "built-in gradients need an MLP or LogisticRegression")
        return model
    layout = getattr(model, "layout", None)
    if not isinstance(layout, ParamLayout):
        raise TypeError(f"model must be a hypergrad_fast.models.MLP or LogisticRegression "
                        f"(or a ParamLayout with grad_fn, hvp_fn, valid_fn), got "
                        f"{type(model).__name__}")
    if not custom:
        if not isinstance(model, MLP):
            raise TypeError(f"the built-in batched gradients support MLP and "
                            f"LogisticRegression models, got {type(model).__name__}")
        if kernels and model.n_layers > 1 and model.activation != "tanh":
            raise ValueError(f"the GPU's batched gradients support tanh hidden layers, got "
                             f"activation={model.activation!r}; use device='cpu', or pass "
                             "grad_fn, hvp_fn and valid_fn")
    return layout


def _require_cuda():
    if gpu_available():
        return
    from ..engine import gpu as gpu_engine

    why = getattr(gpu_engine, "_why_no_gpu", lambda: "cuda.is_available() is False")()
    raise RuntimeError(f"sweep(device='cuda') needs a CUDA GPU, and none is usable here: "
                       f"{why}.  Use device='cpu' (the same computation on the CPU), or set "
                       "NUMBA_ENABLE_CUDASIM=1 before numba is first imported to run the "
                       "CUDA simulator.")


class _CustomFunctions(BatchedObjective):
    """The caller's ``grad_fn``, ``hvp_fn``, ``valid_fn`` as a batched objective (outputs
    checked)."""

    def __init__(self, be, grad_fn, hvp_fn, valid_fn, meta):
        self._be = be
        self._grad_fn, self._hvp_fn, self._valid_fn = grad_fn, hvp_fn, valid_fn
        self._meta = meta
        self.d_meta = None if meta is None else be.zeros(tuple(meta.shape))

    def _states(self, a, name):
        shape = tuple(getattr(a, "shape", np.shape(a)))
        if shape != self._be.shape:
            raise ValueError(f"{name} must return shape {self._be.shape}, got {shape}")
        return self._be.states(a, name)

    def grad(self, x, t):
        return self._states(self._grad_fn(x, self._meta, t), "grad_fn")

    def grad_and_hvp(self, x, t, vec):
        g = self.grad(x, t)
        out = self._hvp_fn(x, self._meta, t, vec)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("hvp_fn must return a pair (hx, hmeta); hmeta may be None")
        if self.d_meta is not None and out[1] is not None:
            _add(self._be, self.d_meta, out[1])
        hx = self._states(out[0], "hvp_fn's hx")
        if self._be.name == "cpu":  # on a GPU, the results are checked once at the end
            check_finite(f"hvp_fn's hx (iteration {t})", hx)
        return g, hx

    def valid(self, x):
        out = self._valid_fn(x)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("valid_fn must return a pair (loss (B,), dloss/dx (B, N))")
        loss = self._be.get(out[0]).astype(np.float64)
        if loss.shape != (self._be.shape[0],):
            raise ValueError(f"valid_fn's loss must have shape ({self._be.shape[0]},), "
                             f"got {loss.shape}")
        check_finite("valid_fn's loss", loss)
        return loss, self._states(out[1], "valid_fn's gradient")


def _add(be, total, part):
    """``total += part`` on the backend (``part`` may be a host array on either)."""
    shape = tuple(getattr(part, "shape", np.shape(part)))
    if shape != tuple(total.shape):
        raise ValueError(f"hvp_fn's hmeta must have the shape of meta {tuple(total.shape)}, "
                         f"got {shape}")
    if not be.is_array(part) or be.name == "cpu":
        part = be.put(part)
    be.run("add_flat", total.size, be.flat(total), be.flat(part))


class _CompiledRows(BatchedObjective):
    """The built-in model on the CPU: its compiled objective, all rows in one call on all
    cores; row b equals a separate ``sgd`` run of the same objective with meta
    ``{"log_l2": log_l2[b]}``."""

    def __init__(self, model, train, valid, batch_size, seed, log_l2, runs):
        from ..models import make_train_loss

        self.objective = make_train_loss(model, train[0], train[1], batch_size, seed=seed,
                                         l2=None if log_l2 is None else "group")
        self._log_l2 = log_l2
        self.d_meta = None if log_l2 is None else np.zeros(log_l2.shape)
        self._valid_data = valid

    def session(self):
        return self.objective.session()

    def grad(self, x, t):
        values, g = self.objective.rows_value_and_grad(x, self._log_l2, t)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            where = f" (setting {bad[0]})" if len(values) > 1 else ""
            raise FloatingPointError(f"the training loss is {values[bad[0]]} at iteration "
                                     f"{t}{where}")
        return g

    def grad_and_hvp(self, x, t, vec):
        return self.objective.rows_grad_and_hvp(x, self._log_l2, t, vec, self.d_meta)

    def valid(self, x):
        inputs, targets = self._valid_data
        rows = [self.objective.evaluate(row, inputs, targets) for row in x]
        return np.array([r[0] for r in rows]), np.stack([r[1] for r in rows])


# =============================================================================== pieces
class _Shared(NamedTuple):
    """What every setting of a sweep shares, checked; sent once to each worker of a cluster.

    model:       the model, or the ParamLayout given with custom functions.
    layout:      its ParamLayout (N parameters in G groups).
    train, valid: (inputs, targets) float64 pairs (None with custom functions).
    batch_size, seed: the minibatches (None, 0 with custom functions).
    frac_bits:   the engine's fractional bits.
    custom:      (grad_fn, hvp_fn, valid_fn), or None for the built-in gradients.
    custom_meta: the meta handed to custom functions unchanged, or None.
    noise:       (N,) the draw that every setting's x0 scales, or None when each
                 setting has its own (then in :class:`_Settings`).
    kernels:     run the GPU's per-thread model kernels on the CPU (tests).
    """

    model: object
    layout: ParamLayout
    train: Optional[tuple]
    valid: Optional[tuple]
    batch_size: Optional[int]
    seed: int
    frac_bits: int
    custom: Optional[tuple]
    custom_meta: object
    noise: Optional[np.ndarray]
    kernels: bool


class _Settings(NamedTuple):
    """The per-setting inputs, checked; row b is setting b.

    alphas, betas: (B, T) or (B, T, G).  log_scales: (B, G).  meta: (B, G) log L2
    strengths of the built-in models, or None.  noise: (B, N), or None when
    :attr:`_Shared.noise` holds the one draw of every setting.
    """

    alphas: np.ndarray
    betas: np.ndarray
    log_scales: np.ndarray
    meta: Optional[np.ndarray]
    noise: Optional[np.ndarray]

    @property
    def n_settings(self) -> int:
        return self.alphas.shape[0]

    def take(self, rows: slice) -> "_Settings":
        """The settings ``rows`` (a slice), contiguous: pickled for a worker, a chunk
        carries its own rows only."""
        return _Settings(*(None if a is None else np.ascontiguousarray(a[rows]) for a in self))


class _Rows(NamedTuple):
    """Results of consecutive settings as host arrays (the fields of :class:`SweepResult`);
    ``bits`` (n,) the bits each setting's buffers hold (0 for a failed one), the addends
    of ``aux_bits``.  Pieces are joined in setting order with :meth:`join`."""

    valid_loss: np.ndarray
    d_alphas: np.ndarray
    d_betas: np.ndarray
    d_log_init_scales: np.ndarray
    d_meta: Optional[np.ndarray]
    x_final: np.ndarray
    bits: np.ndarray
    status: tuple

    @classmethod
    def join(cls, parts) -> "_Rows":
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        arrays = {f: (None if parts[0][i] is None else np.concatenate([p[i] for p in parts]))
                  for i, f in enumerate(cls._fields[:-1])}
        return cls(**arrays, status=sum((p.status for p in parts), ()))

    def result(self) -> SweepResult:
        # fsum: the exactly rounded sum, whichever pieces the per-setting addends came in.
        return SweepResult(*self[:6], aux_bits=math.fsum(self.bits.tolist()),
                           status=self.status)


def _failed_rows(shared, settings, offset, err) -> _Rows:
    """NaN rows for ``settings`` (one, usually), each with the status of ``err``."""
    runs, n_groups = settings.log_scales.shape

    def nan(shape):
        return np.full(shape, np.nan)

    reason = f"{type(err).__name__}: {err}"
    return _Rows(nan(runs), nan(settings.alphas.shape), nan(settings.betas.shape),
                 nan((runs, n_groups)), None if settings.meta is None else nan((runs, n_groups)),
                 nan((runs, shared.layout.size)), np.zeros(runs),
                 tuple(f"setting {offset + b}: {reason}" for b in range(runs)))


def _bits_per_setting(be) -> np.ndarray:
    """(B,) bits held by each setting's buffers: summed per setting, then over settings
    (:meth:`_Rows.result`), so the total does not depend on how the settings were cut."""
    if be.name == "cpu":
        return np.array([e.aux_bits for e in be.engines])
    state = be.state()  # host copies (the word stacks too: a few bytes per parameter)
    return np.array([held_bits(c, h) for c, h in zip(state.coder, state.height)])


def _execute(be, fns, x0, progress=False, inspect=None) -> _Rows:
    """Algorithm 1 then Algorithm 2 for all settings on backend ``be``.

    ``inspect(stage, be)`` (tests only) is called with "forward" after the forward pass.
    """
    runs, _ = be.shape
    start = be.state()
    forward(be, fns, progress=progress)
    if inspect is not None:
        inspect("forward", be)
    x_final = be.get(be.x())
    bits = _bits_per_setting(be)
    loss, d_x = fns.valid(be.x())
    valid_loss = be.get(loss).astype(np.float64)
    out = reverse(be, fns, d_x, start.x, progress=progress)
    n_groups = be.sched.alphas.shape[2]
    part_scales = be.zeros((runs, 1, n_groups))
    be.group_dot(out.d_x0, be.put(x0), out.d_x0, False, part_scales, 0)
    d_meta = fns.d_meta

    def shaped(part, schedule):
        part = be.get(part)
        return part if schedule.ndim == 3 else part.sum(axis=2)

    rows = _Rows(valid_loss=valid_loss,
                 d_alphas=shaped(out.d_alphas, be.sched_given[0]),
                 d_betas=shaped(out.d_betas, be.sched_given[1]),
                 d_log_init_scales=be.get(part_scales)[:, 0, :],
                 d_meta=None if d_meta is None else be.get(d_meta),
                 x_final=x_final, bits=bits, status=(OK,) * runs)
    for field in ("d_alphas", "d_betas", "d_log_init_scales", "d_meta"):
        value = getattr(rows, field)
        if value is not None:
            # names [setting, ...]: a non-finite Hessian-vector product (hvp_fn) spreads here
            check_finite(f"{field}", value)
    return rows


def _resolve_device(device, shared) -> str:
    """"cpu" or "cuda" for ``device``; "auto" is "cuda" where a GPU is usable and the
    GPU's kernels run the model (the built-in models with tanh hidden layers), else
    "cpu".  Decided where the sweep runs: on each worker of a cluster."""
    if device != "auto":
        return device
    model = shared.model
    if shared.custom is not None or not gpu_available():
        return "cpu"
    if model.n_layers > 1 and model.activation != "tanh":
        return "cpu"
    return "cuda"


def _train_and_reverse(shared, s, device, progress, inspect) -> _Rows:
    """One batch of settings ``s`` on ``device``: the local sweep itself."""
    if device == "cuda":
        _require_cuda()
    layout = shared.layout
    noise = shared.noise if s.noise is None else s.noise
    x0 = np.exp(s.log_scales)[:, layout.groups] * noise
    sched = Schedules.of(s.alphas, s.betas, layout.groups, layout.n_groups)
    if device == "cuda":
        be = CudaBackend(x0, sched, shared.frac_bits, group_bounds(layout))
    else:
        be = CpuBackend(x0, sched, shared.frac_bits)
    be.sched_given = (s.alphas, s.betas)
    if shared.custom is not None:
        fns = _CustomFunctions(be, *shared.custom, shared.custom_meta)
    elif device == "cuda" or shared.kernels:
        fns = KernelMLP(be, shared.model, shared.train, shared.valid, shared.batch_size,
                        shared.seed, sched.n_iter, s.meta)
    else:
        fns = _CompiledRows(shared.model, shared.train, shared.valid, shared.batch_size,
                            shared.seed, s.meta, s.n_settings)
    return _execute(be, fns, x0, progress=progress, inspect=inspect)


def _run_settings(shared, settings, *, device="cpu", on_error="raise", offset=0,
                  progress=False, inspect=None) -> _Rows:
    """Train and reverse ``settings`` (numbered from ``offset``): every sweep, local or on
    a cluster's worker, runs here.

    With ``on_error="report"`` a batch that raises one of :data:`SETTING_ERRORS` is run
    again in halves, down to the single settings that fail, which come back as NaN rows
    with their reason; a setting whose validation loss is not finite fails too.  Each
    row is computed from its own inputs alone, so the others keep their bits.
    """
    device = _resolve_device(device, shared)
    if on_error == "raise":
        return _train_and_reverse(shared, settings, device, progress, inspect)
    try:
        rows = _train_and_reverse(shared, settings, device, progress, inspect)
    except SETTING_ERRORS as err:
        runs = settings.n_settings
        if runs == 1:
            return _failed_rows(shared, settings, offset, err)
        half = runs // 2
        return _Rows.join(
            _run_settings(shared, settings.take(part), device=device, on_error=on_error,
                          offset=offset + part.start, progress=progress)
            for part in (slice(0, half), slice(half, runs)))
    bad = np.flatnonzero(~np.isfinite(rows.valid_loss))
    if not len(bad):
        return rows
    # Keep the good stretches of rows; put a failed row in place of each bad one.
    def stretch(lo, hi):
        return _Rows(*(None if a is None else a[lo:hi] for a in rows[:7]),
                     rows.status[lo:hi])

    pieces, start = [], 0
    for b in bad:
        pieces.append(stretch(start, b))
        why = FloatingPointError(f"the validation loss is {rows.valid_loss[b]}")
        pieces.append(_failed_rows(shared, settings.take(slice(b, b + 1)), offset + b, why))
        start = b + 1
    pieces.append(stretch(start, len(rows.status)))
    return _Rows.join(pieces)


# =============================================================================== public
def sweep(model, data, alphas, betas, log_init_scales=0.0, meta=None, *, batch_size=None,
          seed=0, x0_noise=0, device="cpu", grad_fn=None, hvp_fn=None, valid_fn=None,
          frac_bits=52, progress=False, on_error="raise", client=None, chunk_size=None,
          _kernels=False, _inspect=None) -> SweepResult:
    """Train and reverse B hyperparameter settings of one model together; exact hypergradients.

    Parameters
    ----------
    model : :class:`~hypergrad_fast.models.MLP` with tanh hidden layers, or
        :class:`~hypergrad_fast.models.LogisticRegression` (softmax cross-entropy).
        With ``grad_fn``, ``hvp_fn`` and ``valid_fn`` any object with a ``.layout``, or
        a :class:`~hypergrad_fast.models.ParamLayout`, giving N and the G groups.
    data : ``(train, valid)``, or an object with ``.train`` and ``.valid``
        (:class:`~hypergrad_fast.data.MnistSplits`); each split an ``(inputs,
        targets)`` pair or a :class:`~hypergrad_fast.data.Split`, targets one-hot.
        Unused (may be None) with custom functions.
    alphas, betas : (B, T) or (B, T, G) — per setting, the learning rate and momentum
        decay of each iteration (and group).  betas lie in (0, 1] and are used as
        :func:`~hypergrad_fast.effective_beta` of themselves.
    log_init_scales : scalar, (G,) or (B, G) — ``x0[b] = exp(log_init_scales[b,
        group]) * noise``.
    meta : for the built-in models, per-setting log L2 strengths, scalar, (G,) or
        (B, G): the training loss adds ``0.5 * sum(exp(meta[b, group]) * x**2)``;
        None for no penalty.  With custom functions, any array (host, or device for
        ``device="cuda"``) handed to them unchanged; ``d_meta`` has its shape.
    batch_size : examples per minibatch (None: the whole training set); minibatch t is
        :func:`~hypergrad_fast.models.minibatch` ``(t, n_train, batch_size, seed)``,
        the same for every setting (as in :func:`~hypergrad_fast.models.make_train_loss`).
    x0_noise : int seed of ``default_rng(seed).standard_normal(N)`` (default 0), or an
        (N,) or (B, N) array.
    device : "cpu", "cuda" or "auto".  "cuda" needs a usable GPU (or the CUDA
        simulator) and raises RuntimeError otherwise.  "auto" is "cuda" where a GPU is
        usable and the model runs on its kernels (built-in models with tanh hidden
        layers), else "cpu"; with ``client`` each worker decides for itself.
    grad_fn, hvp_fn, valid_fn : custom functions, all three or none:
        ``grad_fn(x, meta, t) -> g`` (B, N) training gradients;
        ``hvp_fn(x, meta, t, vec) -> (hx, hmeta)`` with ``hx[b] = H[b] vec[b]`` and
        ``hmeta = d/dmeta sum_b g[b] . vec[b]`` (or None);
        ``valid_fn(x) -> (loss (B,), dloss/dx (B, N))`` at x_T.
        ``x`` and ``vec`` are (B, N) float64 device arrays on "cuda" (return device
        arrays to avoid copies) and host arrays on "cpu"; they are overwritten later,
        so copy what you keep.  Gradients must be deterministic in (x, meta, t).
        Settings run in pieces (``on_error="report"``, ``client``) take any number of
        rows and need ``meta=None``.
    frac_bits : bits after the engine's fixed radix point (default 52).
    progress : show tqdm progress bars (with ``client``: one bar over the chunks, and
        the cluster's dashboard link, printed once per client).
    on_error : "raise" (default): a setting that diverges (a non-finite loss or
        gradient, fixed-point overflow) or misses x0 raises, and nothing is returned.
        "report": the other settings are returned; the failed ones are NaN rows whose
        ``status`` names the setting and the reason, and a warning is logged.
    client : a ``dask.distributed.Client``: the settings run in chunks on its workers
        (the data and model sent to each worker once), and the results, gathered in
        setting order, equal a local sweep's bit for bit (on GPU workers, to rounding).
        Needs ``pip install "hypergrad_fast[dask]"``.  See :mod:`._dask` for faults.
    chunk_size : settings per chunk with ``client`` (default: the settings spread over
        two chunks per worker thread).

    Returns a :class:`SweepResult`.  Momentum convention: ``v <- beta v - (1 - beta)
    g;  x <- x + alpha v``, ``v0 = 0``.  Raises :class:`~hypergrad_fast.sgd.SgdRecovery`
    if the reverse pass does not return to x0 bit for bit (never expected), and
    :class:`~._dask.SchedulerLostError` if ``client`` loses its scheduler.
    """
    if client is not None:
        from ._dask import require_distributed
        require_distributed("sweep(client=...)")
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
    custom = [f is not None for f in (grad_fn, hvp_fn, valid_fn)]
    if any(custom) and not all(custom):
        missing = [n for n, c in zip(("grad_fn", "hvp_fn", "valid_fn"), custom) if not c]
        raise ValueError(f"pass grad_fn, hvp_fn and valid_fn together; missing {missing}")
    custom = all(custom)
    for name, f in (("grad_fn", grad_fn), ("hvp_fn", hvp_fn), ("valid_fn", valid_fn)):
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be callable, got {type(f).__name__}")
    layout = _layout(model, custom, device == "cuda" or _kernels)
    n_groups, n_params = layout.n_groups, layout.size
    alphas = _schedule("alphas", alphas, n_groups)
    runs, n_iter = alphas.shape[:2]
    betas = _schedule("betas", betas, n_groups, (runs, n_iter))
    check_decays("betas", betas)
    log_scales = _per_setting("log_init_scales", log_init_scales, runs, n_groups)
    noise = _noise(x0_noise, runs, n_params)
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, (int, np.integer)) \
            or not 0 <= frac_bits <= 60:
        raise ValueError(f"frac_bits must be an integer in [0, 60], got {frac_bits!r}")
    train = valid = None
    if not custom:
        meta = None if meta is None else _per_setting("meta", meta, runs, n_groups)
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1 or
                                       not isinstance(batch_size, (int, np.integer))):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if data is None:
            raise ValueError("data must be (train, valid) for the built-in models")
        train, valid = ((data.train, data.valid) if hasattr(data, "train")
                        else _pair("data", data))
        n_in, n_out = model.layer_sizes[0], model.layer_sizes[-1]
        train = _split("train", train, n_in, n_out)
        valid = _split("valid", valid, n_in, n_out)
        if batch_size is None:  # every step on the whole training set
            batch_size = len(train[0])
    else:
        if meta is not None and not hasattr(meta, "shape"):
            meta = _real_array("meta", meta)
        if meta is not None and (client is not None or on_error == "report"):
            raise ValueError("custom functions run in pieces (client=, on_error='report') "
                             "need meta=None: their meta is handed to them whole, so it "
                             "cannot be split by setting")
        batch_size, seed = None, 0
    if device == "cuda" and client is None:
        _require_cuda()

    common = noise.strides[0] == 0  # one draw for every setting (a seed or an (N,) array)
    shared = _Shared(model if not custom else layout, layout, train, valid,
                     None if batch_size is None else int(batch_size), int(seed),
                     int(frac_bits), (grad_fn, hvp_fn, valid_fn) if custom else None,
                     meta if custom else None, noise[0] if common else None, bool(_kernels))
    settings = _Settings(alphas, betas, log_scales, None if custom else meta,
                         None if common else np.asarray(noise))
    if client is None:
        rows = _run_settings(shared, settings, device=device, on_error=on_error,
                             progress=progress, inspect=_inspect)
    else:
        from ._dask import run_on_cluster
        rows = run_on_cluster(client, shared, settings, device=device, on_error=on_error,
                              chunk_size=chunk_size, progress=progress)
    result = rows.result()
    failures = result.failures
    if failures:
        shown = "; ".join(list(failures.values())[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        logger.warning("sweep: %d of %d settings failed: %s%s", len(failures), runs, shown,
                       more)
    return result


def _pair(name, value):
    try:
        first, second = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (train, valid) pair or have .train and .valid, "
                        f"got {type(value).__name__}") from None
    return first, second
