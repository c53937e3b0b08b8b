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

from . import _gpu_models
from .engine import EngineState, ReversibleMomentum, effective_beta, information_bound
from .gpu_engine import BatchedReversibleMomentum, gpu_available
from .models import MLP, ParamLayout, minibatch
from .sgd import SgdRecovery

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
def _index(multi_index):
    return "[" + ", ".join(str(int(i)) for i in multi_index) + "]"


def _real_array(name, value):
    a = np.asarray(value)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return np.array(a, dtype=np.float64)


def _check_finite(name, a):
    finite = np.isfinite(a)
    if not finite.all():
        i = np.unravel_index(np.argmin(finite), a.shape)
        raise FloatingPointError(f"{name}{_index(i)} = {a[i]} is not finite")


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
    _check_finite(name, a)
    return a


def _per_setting(name, value, n_runs, n_groups):
    """A scalar, (G,) or (B, G) value as a finite (B, G) float64 array."""
    a = _real_array(name, value)
    if a.shape not in ((), (n_groups,), (n_runs, n_groups)):
        raise ValueError(f"{name} must be a scalar or have shape ({n_groups},) or "
                         f"({n_runs}, {n_groups}), got {a.shape}")
    a = np.array(np.broadcast_to(a, (n_runs, n_groups)))
    _check_finite(name, a)
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
    _check_finite("x0_noise", a)
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
    _check_finite(f"{name} inputs", inputs)
    _check_finite(f"{name} targets", targets)
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


def _layout(model, custom):
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
        if model.n_layers > 1 and model.activation != "tanh":
            raise ValueError(f"the built-in batched gradients support tanh hidden layers, got "
                             f"activation={model.activation!r}; pass grad_fn, hvp_fn and "
                             "valid_fn for other models")
    return layout


def _require_cuda():
    if gpu_available():
        return
    from . import gpu_engine

    why = getattr(gpu_engine, "_why_no_gpu", lambda: "cuda.is_available() is False")()
    raise RuntimeError(f"sweep(device='cuda') needs a CUDA GPU, and none is usable here: "
                       f"{why}.  Use device='cpu' (the same computation on the CPU), or set "
                       "NUMBA_ENABLE_CUDASIM=1 before numba is first imported to run the "
                       "CUDA simulator.")


# =============================================================================== backends
class _Schedules(NamedTuple):
    """The schedules as given and as per-group (B, T, G) arrays for the kernels."""

    alphas: np.ndarray  # (B, T) or (B, T, G)
    betas: np.ndarray  # (B, T) or (B, T, G), nominal (the engine rounds them itself)
    alphas_full: np.ndarray  # (B, T, G)
    betas_eff_full: np.ndarray  # (B, T, G) effective decays


def _full(schedule, n_groups):
    if schedule.ndim == 3:
        return np.ascontiguousarray(schedule)
    return np.ascontiguousarray(np.repeat(schedule[:, :, None], n_groups, axis=2))


def _worst_column(betas_eff_full):
    """The (T,) decay schedule of the (setting, group) that stores the most bits."""
    bits = information_bound(betas_eff_full).sum(axis=1)
    b, g = np.unravel_index(np.argmax(bits), bits.shape)
    return betas_eff_full[b, :, g]


class _CpuBackend:
    """Host arrays, one CPU engine over the B * N parameters, the ``@njit`` twins."""

    name = "cpu"

    def __init__(self, x0, groups, frac_bits):
        self.shape = x0.shape
        self._groups = groups
        self.engine = ReversibleMomentum(x0.ravel(), frac_bits=frac_bits)
        self._loops = _gpu_models.cpu_loops()

    def run(self, name, n_threads, *args):
        getattr(self._loops, name)(np.int64(n_threads), *args)

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
        """``a`` as a C-contiguous float64 array (no copy when it is one)."""
        return np.ascontiguousarray(a, dtype=np.float64)

    def x(self):
        return self.engine.x.reshape(self.shape)

    def v(self):
        return self.engine.v.reshape(self.shape)

    def coefficient(self, schedule, t):
        row = schedule[:, t]
        if row.ndim == 1:
            return np.repeat(row, self.shape[1])
        return row[:, self._groups].ravel()

    def gradient(self, g):
        return np.asarray(g).reshape(-1)

    def reserve(self, n_iter, worst):
        self.engine.reserve(n_iter, worst[:, None])

    def state(self):
        """The engine's exact state with x, v, coder, height as (B, N), words (rows, B, N)."""
        s = self.engine.state
        return EngineState(*(a.reshape(self.shape) for a in s[:4]),
                           s.words.reshape((-1,) + self.shape))


class _CudaBackend:
    """Device arrays, a :class:`BatchedReversibleMomentum`, the ``@cuda.jit`` kernels."""

    name = "cuda"

    def __init__(self, x0, groups, frac_bits):
        from numba import cuda

        from . import _gpu_kernels

        self._cuda = cuda
        self._launch = _gpu_kernels.launch
        self._kernels = _gpu_models.gpu_kernels()
        self.shape = x0.shape
        self._groups = groups
        self.engine = BatchedReversibleMomentum(x0, frac_bits=frac_bits)
        self._x = cuda.device_array(self.shape, dtype=np.float64)
        self._v = cuda.device_array(self.shape, dtype=np.float64)

    def run(self, name, n_threads, *args):
        # the launcher reads THREADS_PER_BLOCK at call time (tests lower it)
        self._launch(getattr(self._kernels, name), n_threads, np.int64(n_threads), *args)

    def put(self, a, dtype=np.float64):
        return self._cuda.to_device(np.ascontiguousarray(a, dtype=dtype))

    def zeros(self, shape):
        return self._cuda.to_device(np.zeros(shape))

    def get(self, a):
        return self._device(a).copy_to_host() if self.is_array(a) else np.array(a)

    def flat(self, a):
        return a.reshape(a.size)

    def is_array(self, a):
        """True for arrays on the device (numba, CuPy, PyTorch...)."""
        if hasattr(a, "__cuda_array_interface__"):
            return True
        return bool(self._cuda.config.ENABLE_CUDASIM) and \
            self._cuda.devicearray.is_cuda_ndarray(a)

    def _device(self, a):
        if self._cuda.config.ENABLE_CUDASIM:
            return a
        return self._cuda.as_cuda_array(a)

    def states(self, a, name):
        """``a`` as a C-contiguous float64 device array: a device input as it is, a host one
        copied."""
        if not self.is_array(a):
            return self.put(a)
        d = self._device(a)
        if d.dtype != np.float64 or not d.is_c_contiguous():
            raise TypeError(f"{name} on the device must be a C-contiguous float64 array, got "
                            f"dtype {d.dtype}")
        return d

    def own(self, a, name):
        """A float64 C-contiguous device copy of ``a`` (host or device) the caller may overwrite."""
        if not self.is_array(a):
            return self.put(a)
        d = self.states(a, name)
        out = self._cuda.device_array(d.shape, dtype=np.float64)
        out.copy_to_device(d)
        return out

    def x(self):
        return self.engine.x_device(out=self._x)

    def v(self):
        return self.engine.v_device(out=self._v)

    def coefficient(self, schedule, t):
        row = schedule[:, t]
        return row if row.ndim == 1 else row[:, self._groups]

    def gradient(self, g):
        return g

    def reserve(self, n_iter, worst):
        runs, n = self.shape
        if (n_iter, runs) == (runs, n):  # (T, B) would read as per-element (B, N)
            self.engine.reserve(n_iter, np.broadcast_to(worst[:, None, None], (n_iter, runs, n)))
        else:
            self.engine.reserve(n_iter, np.broadcast_to(worst[:, None], (n_iter, runs)))

    def state(self):
        return self.engine.state


# =============================================================================== models
class _BuiltinMLP:
    """Batched training gradient, HVP and validation loss of a tanh MLP on a backend.

    ``hvp(x, meta, t, vec)`` reuses the activations that ``grad(x, meta, t)`` left in
    the workspace, so it must follow ``grad`` at the same x and t (as the reverse
    pass calls them).
    """

    def __init__(self, be, model, train, valid, batch_size, seed, n_iter, log_l2):
        layout = model.layout
        runs, n_params = be.shape
        self._be = be
        sizes = np.array(model.layer_sizes, dtype=np.int64)
        n_layers = sizes.shape[0] - 1
        self._layout = (
            be.put(sizes, np.int64),
            be.put([layout.slices[f"W{i}"].start for i in range(n_layers)], np.int64),
            be.put([layout.slices[f"b{i}"].start for i in range(n_layers)], np.int64),
            be.put(np.concatenate([[0], np.cumsum(sizes[1:-1])]), np.int64),
        )
        n_units = int(sizes[1:].sum())
        self._groups = be.put(layout.groups, np.int64)
        self._bounds = be.put(_group_bounds(layout), np.int64)
        n_train = train[0].shape[0]
        self._train = (be.put(train[0]), be.put(train[1]))
        self._valid = (be.put(valid[0]), be.put(valid[1]))
        self._batch = batch_size
        self._n_valid = valid[0].shape[0]
        self._idx = be.put(np.stack([minibatch(t, n_train, batch_size, seed)
                                     for t in range(n_iter)]), np.int64)
        self._valid_idx = be.put(np.arange(self._n_valid)[None, :], np.int64)
        rows = max(batch_size, self._n_valid)
        self._H = be.zeros((runs, rows, n_units))
        self._D = be.zeros((runs, rows, n_units))
        self._RH = be.zeros((runs, batch_size, n_units))
        self._RD = be.zeros((runs, batch_size, n_units))
        self._losses = be.zeros((runs, rows))
        self._g = be.zeros((runs, n_params))
        self._hx = be.zeros((runs, n_params))
        self._g_valid = be.zeros((runs, n_params))
        self._loss_valid = be.zeros(runs)
        self._has_l2 = log_l2 is not None
        strengths = np.exp(log_l2) if self._has_l2 else np.zeros((runs, layout.n_groups))
        self._l2 = be.put(strengths)
        self._no_l2 = be.zeros((runs, layout.n_groups))
        self._h_meta = be.zeros((runs, layout.n_groups))
        self._runs, self._n_params, self._n_groups = runs, n_params, layout.n_groups

    def _example_pass(self, x, data, idx, t, n_examples):
        self._be.run("example_pass", self._runs * n_examples, x, *data, idx, np.int64(t),
                     np.int64(n_examples), *self._layout, self._H, self._D, self._losses)

    def _param_grad(self, x, inputs, idx, t, n_examples, l2, out):
        self._be.run("param_grad", self._runs * self._n_params, x, inputs, idx, np.int64(t),
                     np.int64(n_examples), *self._layout, self._H, self._D, l2, self._groups,
                     out)

    def grad(self, x, meta, t):
        self._example_pass(x, self._train, self._idx, t, self._batch)
        self._param_grad(x, self._train[0], self._idx, t, self._batch, self._l2, self._g)
        return self._g

    def hvp(self, x, meta, t, vec):
        be, t, m = self._be, np.int64(t), np.int64(self._batch)
        be.run("example_r_pass", self._runs * self._batch, x, vec, *self._train, self._idx, t, m,
               *self._layout, self._H, self._D, self._RH, self._RD)
        be.run("param_hvp", self._runs * self._n_params, x, vec, self._train[0], self._idx, t, m,
               *self._layout, self._H, self._D, self._RH, self._RD, self._l2, self._groups,
               self._hx)
        if not self._has_l2:
            return self._hx, None
        be.run("l2_meta", self._runs * self._n_groups, x, vec, self._l2, self._bounds,
               self._h_meta)
        return self._hx, self._h_meta

    def valid(self, x):
        self._example_pass(x, self._valid, self._valid_idx, 0, self._n_valid)
        self._param_grad(x, self._valid[0], self._valid_idx, 0, self._n_valid, self._no_l2,
                         self._g_valid)
        self._be.run("mean_rows", self._runs, self._losses, np.int64(self._n_valid),
                     self._loss_valid)
        return self._loss_valid, self._g_valid


class _CustomFunctions:
    """The caller's ``grad_fn``, ``hvp_fn``, ``valid_fn``, with their outputs checked."""

    def __init__(self, be, grad_fn, hvp_fn, valid_fn):
        self._be = be
        self._grad_fn, self._hvp_fn, self._valid_fn = grad_fn, hvp_fn, valid_fn

    def _states(self, a, name):
        shape = tuple(getattr(a, "shape", np.shape(a)))
        if shape != self._be.shape:
            raise ValueError(f"{name} must return shape {self._be.shape}, got {shape}")
        return self._be.states(a, name)

    def grad(self, x, meta, t):
        return self._states(self._grad_fn(x, meta, t), "grad_fn")

    def hvp(self, x, meta, t, vec):
        out = self._hvp_fn(x, meta, t, vec)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("hvp_fn must return a pair (hx, hmeta); hmeta may be None")
        return self._states(out[0], "hvp_fn's hx"), out[1]

    def valid(self, x):
        out = self._valid_fn(x)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("valid_fn must return a pair (loss (B,), dloss/dx (B, N))")
        loss = self._be.get(out[0]).astype(np.float64)
        if loss.shape != (self._be.shape[0],):
            raise ValueError(f"valid_fn's loss must have shape ({self._be.shape[0]},), "
                             f"got {loss.shape}")
        return loss, self._states(out[1], "valid_fn's gradient")


def _group_bounds(layout):
    return np.array([layout.slices[n].start for n in layout.names] + [layout.size],
                    dtype=np.int64)


# =============================================================================== the run
def _progress(iterable, enabled, desc, total):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _execute(be, fns, meta, sched, layout, x0, progress=False, inspect=None):
    """Algorithm 1 then Algorithm 2 for all settings on backend ``be``; a SweepResult.

    ``inspect(stage, be)`` (tests only) is called with "forward" after the forward pass.
    """
    runs, n_params = be.shape
    n_iter = sched.alphas.shape[1]
    n_groups = layout.n_groups
    eng = be.engine
    groups, bounds = be.put(layout.groups, np.int64), be.put(_group_bounds(layout), np.int64)
    alphas, betas_eff = be.put(sched.alphas_full), be.put(sched.betas_eff_full)
    be.reserve(n_iter, _worst_column(sched.betas_eff_full))
    start = be.state()

    for t in _progress(range(n_iter), progress, "sweep forward", n_iter):
        g = fns.grad(be.x(), meta, t)
        try:
            eng.step(be.gradient(g), be.coefficient(sched.alphas, t),
                     be.coefficient(sched.betas, t))
        except (OverflowError, FloatingPointError) as err:
            where = f" (flat index = setting * {n_params} + parameter)" if be.name == "cpu" else ""
            raise type(err)(f"iteration {t}: {err}{where}") from None
    if inspect is not None:
        inspect("forward", be)
    x_final = be.get(be.x())
    aux_bits = eng.aux_bits

    loss, d_x = fns.valid(be.x())
    valid_loss = be.get(loss).astype(np.float64)
    d_x = be.own(d_x, "valid_fn's gradient")
    d_v, vec = be.zeros((runs, n_params)), be.zeros((runs, n_params))
    part_alphas = be.zeros((runs, n_iter, n_groups))
    part_betas = be.zeros((runs, n_iter, n_groups))
    d_meta = None if meta is None else be.zeros(tuple(meta.shape))
    n_elem, n_part = runs * n_params, runs * n_groups
    for t in _progress(range(n_iter - 1, -1, -1), progress, "sweep reverse", n_iter):
        be.run("group_dot", n_part, d_x, be.v(), d_x, False, bounds, part_alphas, np.int64(t))
        eng.unstep_position(be.coefficient(sched.alphas, t))
        be.run("velocity_cotangent", n_elem, d_v, d_x, alphas, np.int64(t), groups)
        be.run("hvp_direction", n_elem, vec, d_v, betas_eff, np.int64(t), groups)
        x = be.x()
        g = fns.grad(x, meta, t)
        hx, h_meta = fns.hvp(x, meta, t, vec)
        eng.unstep_velocity(be.gradient(g), be.coefficient(sched.betas, t))
        be.run("group_dot", n_part, d_v, be.v(), g, True, bounds, part_betas, np.int64(t))
        be.run("after_hvp", n_elem, d_x, hx, d_v, betas_eff, np.int64(t), groups)
        if d_meta is not None and h_meta is not None:
            _add(be, d_meta, h_meta)

    end = be.state()
    if not (np.array_equal(end.x, start.x) and not end.v.any()):
        raise SgdRecovery("the reverse pass did not recover x0 bit for bit; the gradients "
                          "must be deterministic functions of (x, meta, t)")
    part_scales = be.zeros((runs, 1, n_groups))
    be.run("group_dot", n_part, d_x, be.put(x0), d_x, False, bounds, part_scales, np.int64(0))

    def shaped(part, schedule):
        part = be.get(part)
        return part if schedule.ndim == 3 else part.sum(axis=2)

    return SweepResult(valid_loss=valid_loss,
                       d_alphas=shaped(part_alphas, sched.alphas),
                       d_betas=shaped(part_betas, sched.betas),
                       d_log_init_scales=be.get(part_scales)[:, 0, :],
                       d_meta=None if d_meta is None else be.get(d_meta),
                       x_final=x_final,
                       aux_bits=aux_bits)


def _add(be, total, part):
    """``total += part`` on the backend (``part`` may be a host array on either)."""
    shape = tuple(getattr(part, "shape", np.shape(part)))
    if shape != tuple(total.shape):
        raise ValueError(f"hvp_fn's hmeta must have the shape of meta {tuple(total.shape)}, "
                         f"got {shape}")
    if not be.is_array(part) or be.name == "cpu":
        part = be.put(part)
    be.run("add_flat", total.size, be.flat(total), be.flat(part))


# =============================================================================== public
def sweep(model, data, alphas, betas, log_init_scales=0.0, meta=None, *, batch_size=None,
          seed=0, x0_noise=0, device="cpu", grad_fn=None, hvp_fn=None, valid_fn=None,
          frac_bits=52, progress=False) -> SweepResult:
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
    batch_size : examples per minibatch; minibatch t is
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
    layout = _layout(model, custom)
    n_groups, n_params = layout.n_groups, layout.size
    alphas = _schedule("alphas", alphas, n_groups)
    runs, n_iter = alphas.shape[:2]
    betas = _schedule("betas", betas, n_groups, (runs, n_iter))
    inside = (betas > 0) & (betas <= 1)
    if not inside.all():
        i = np.unravel_index(np.argmin(inside), betas.shape)
        raise ValueError(f"betas{_index(i)} = {betas[i]} is outside (0, 1]")
    log_scales = _per_setting("log_init_scales", log_init_scales, runs, n_groups)
    noise = _noise(x0_noise, runs, n_params)
    if not isinstance(frac_bits, (int, np.integer)) or not 0 <= frac_bits <= 60:
        raise ValueError(f"frac_bits must be an integer in [0, 60], got {frac_bits!r}")
    if not custom:
        meta = None if meta is None else _per_setting("meta", meta, runs, n_groups)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if data is None:
            raise ValueError("data must be (train, valid) for the built-in models")
        train, valid = ((data.train, data.valid) if hasattr(data, "train")
                        else _pair("data", data))
        n_in, n_out = model.layer_sizes[0], model.layer_sizes[-1]
        train = _split("train", train, n_in, n_out)
        valid = _split("valid", valid, n_in, n_out)
    elif meta is not None and not hasattr(meta, "shape"):
        meta = _real_array("meta", meta)
    if device == "cuda":
        _require_cuda()

    x0 = np.exp(log_scales)[:, layout.groups] * noise
    sched = _Schedules(alphas, betas, _full(alphas, n_groups),
                       _full(effective_beta(betas), n_groups))
    backend = _CudaBackend if device == "cuda" else _CpuBackend
    be = backend(x0, layout.groups, int(frac_bits))
    if custom:
        fns = _CustomFunctions(be, grad_fn, hvp_fn, valid_fn)
    else:
        fns = _BuiltinMLP(be, model, train, valid, int(batch_size), int(seed), n_iter, meta)
    return _execute(be, fns, meta, sched, layout, x0, progress=progress)


def _pair(name, value):
    try:
        first, second = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (train, valid) pair or have .train and .valid, "
                        f"got {type(value).__name__}") from None
    return first, second
