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
"""

from typing import NamedTuple, Optional

import numpy as np

from ..engine import gpu_available
from ..models import MLP
from ..objectives import ParamLayout
from ..objectives.layout import group_bounds
from ._cuda import CudaBackend, KernelMLP
from ._checks import check_decays, check_finite
from .algorithm import BatchedObjective, CpuBackend, Schedules, forward, reverse

__all__ = ["sweep", "SweepResult"]

_DEVICES = ("cpu", "cuda")


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
                       (summed over settings and parameters).
    """

    valid_loss: np.ndarray
    d_alphas: np.ndarray
    d_betas: np.ndarray
    d_log_init_scales: np.ndarray
    d_meta: Optional[np.ndarray]
    x_final: np.ndarray
    aux_bits: float


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
            raise FloatingPointError(f"the training loss is {values[bad[0]]} at iteration {t} "
                                     f"(setting {bad[0]})")
        return g

    def grad_and_hvp(self, x, t, vec):
        return self.objective.rows_grad_and_hvp(x, self._log_l2, t, vec, self.d_meta)

    def valid(self, x):
        inputs, targets = self._valid_data
        rows = [self.objective.evaluate(row, inputs, targets) for row in x]
        return np.array([r[0] for r in rows]), np.stack([r[1] for r in rows])


def _execute(be, fns, x0, progress=False, inspect=None):
    """Algorithm 1 then Algorithm 2 for all settings on backend ``be``; a SweepResult.

    ``inspect(stage, be)`` (tests only) is called with "forward" after the forward pass.
    """
    runs, _ = be.shape
    start = be.state()
    forward(be, fns, progress=progress)
    if inspect is not None:
        inspect("forward", be)
    x_final = be.get(be.x())
    aux_bits = be.aux_bits
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

    result = SweepResult(valid_loss=valid_loss,
                       d_alphas=shaped(out.d_alphas, be.sched_given[0]),
                       d_betas=shaped(out.d_betas, be.sched_given[1]),
                       d_log_init_scales=be.get(part_scales)[:, 0, :],
                       d_meta=None if d_meta is None else be.get(d_meta),
                       x_final=x_final,
                       aux_bits=aux_bits)
    for field in ("d_alphas", "d_betas", "d_log_init_scales", "d_meta"):
        value = getattr(result, field)
        if value is not None:
            # names [setting, ...]: a non-finite Hessian-vector product (hvp_fn) spreads here
            check_finite(f"{field}", value)
    return result


# =============================================================================== public
def sweep(model, data, alphas, betas, log_init_scales=0.0, meta=None, *, batch_size=None,
          seed=0, x0_noise=0, device="cpu", grad_fn=None, hvp_fn=None, valid_fn=None,
          frac_bits=52, progress=False, _kernels=False, _inspect=None) -> SweepResult:
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
    device : "cpu" or "cuda".  "cuda" needs a usable GPU (or the CUDA simulator) and
        raises RuntimeError otherwise.
    grad_fn, hvp_fn, valid_fn : custom functions, all three or none:
        ``grad_fn(x, meta, t) -> g`` (B, N) training gradients;
        ``hvp_fn(x, meta, t, vec) -> (hx, hmeta)`` with ``hx[b] = H[b] vec[b]`` and
        ``hmeta = d/dmeta sum_b g[b] . vec[b]`` (or None);
        ``valid_fn(x) -> (loss (B,), dloss/dx (B, N))`` at x_T.
        ``x`` and ``vec`` are (B, N) float64 device arrays on "cuda" (return device
        arrays to avoid copies) and host arrays on "cpu"; they are overwritten later,
        so copy what you keep.  Gradients must be deterministic in (x, meta, t).
    frac_bits : bits after the engine's fixed radix point (default 52).
    progress : show tqdm progress bars.

    Returns a :class:`SweepResult`.  Momentum convention: ``v <- beta v - (1 - beta)
    g;  x <- x + alpha v``, ``v0 = 0``.  Raises :class:`~hypergrad_fast.sgd.SgdRecovery`
    if the reverse pass does not return to x0 bit for bit (never expected).
    """
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
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
    elif meta is not None and not hasattr(meta, "shape"):
        meta = _real_array("meta", meta)
    if device == "cuda":
        _require_cuda()

    x0 = np.exp(log_scales)[:, layout.groups] * noise
    sched = Schedules.of(alphas, betas, layout.groups, n_groups)
    if device == "cuda":
        be = CudaBackend(x0, sched, int(frac_bits), group_bounds(layout))
    else:
        be = CpuBackend(x0, sched, int(frac_bits))
    be.sched_given = (alphas, betas)
    if custom:
        fns = _CustomFunctions(be, grad_fn, hvp_fn, valid_fn, meta)
    elif device == "cuda" or _kernels:
        fns = KernelMLP(be, model, train, valid, int(batch_size), int(seed), n_iter, meta)
    else:
        fns = _CompiledRows(model, train, valid, int(batch_size), int(seed), meta, runs)
    return _execute(be, fns, x0, progress=progress, inspect=_inspect)


def _pair(name, value):
    try:
        first, second = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (train, valid) pair or have .train and .valid, "
                        f"got {type(value).__name__}") from None
    return first, second
