"""The GPU side of the sweep: a backend over a batched GPU engine and the batched MLP.

:class:`CudaBackend` holds a :class:`~hypergrad_fast.engine.BatchedReversibleMomentum`
and launches the reverse pass's element-wise steps as CUDA kernels; :class:`KernelMLP`
computes the training gradients, Hessian-vector products and validation loss of
B runs of an MLP at once with the per-thread kernels of
:mod:`~hypergrad_fast.objectives._gpu_mlp`.  ``KernelMLP`` also runs on the
:class:`~.algorithm.CpuBackend` with the ``@njit`` twins of those kernels: the CPU
reference of the GPU path, bit for bit under the CUDA simulator.
"""

import numpy as np

from ..engine import BatchedReversibleMomentum
from ..objectives import _gpu_mlp, minibatch
from ..objectives.layout import group_bounds
from .algorithm import BatchedObjective, MomentumRule

__all__ = ["CudaBackend", "KernelMLP"]


class CudaBackend(MomentumRule):
    """Device arrays, a :class:`BatchedReversibleMomentum`, the ``@cuda.jit`` kernels."""

    name = "cuda"

    def __init__(self, x0, sched, frac_bits, bounds):
        from numba import cuda

        from ..engine import _gpu_kernels

        self._cuda = cuda
        self._launch = _gpu_kernels.launch
        self._kernels = _gpu_mlp.gpu_kernels()
        self.shape = x0.shape
        self.sched = sched
        self.engine = BatchedReversibleMomentum(x0, frac_bits=frac_bits)
        self._x = cuda.device_array(self.shape, dtype=np.float64)
        self._v = cuda.device_array(self.shape, dtype=np.float64)
        self.groups = self.put(sched.groups, np.int64)
        self._bounds = self.put(bounds, np.int64)
        self.alphas, self.betas_eff = self.put(sched.alphas), self.put(sched.betas_eff)
        # The engine takes B numbers for schedules constant over groups, else B * N.
        self._per_group = [not (a == a[:, :, :1]).all() for a in (sched.alphas, sched.betas)]

    def _row(self, which, t):
        schedule = (self.sched.alphas, self.sched.betas)[which]
        if self._per_group[which]:
            return schedule[:, t, :][:, self.sched.groups]
        return schedule[:, t, 0]

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

    @property
    def aux_bits(self):
        return self.engine.aux_bits

    def reserve(self):
        runs, n = self.shape
        n_iter, worst = self.sched.n_iter, self.sched.worst_column()
        if (n_iter, runs) == (runs, n):  # (T, B) would read as per-element (B, N)
            self.engine.reserve(n_iter, np.broadcast_to(worst[:, None, None], (n_iter, runs, n)))
        else:
            self.engine.reserve(n_iter, np.broadcast_to(worst[:, None], (n_iter, runs)))

    def step(self, g, t):
        self.engine.step(g, self._row(0, t), self._row(1, t))

    def unstep_position(self, t):
        self.engine.unstep_position(self._row(0, t))

    def unstep_velocity(self, g, t):
        self.engine.unstep_velocity(g, self._row(1, t))

    def group_dot(self, a, c, e, use_e, out, t):
        runs, n_groups = self.shape[0], self._bounds.shape[0] - 1
        self.run("group_dot", runs * n_groups, a, c, e, use_e, self._bounds, out, np.int64(t))

    def velocity_cotangent(self, d_v, d_x, t):
        self.run("velocity_cotangent", d_v.size, d_v, d_x, self.alphas, np.int64(t), self.groups)

    def hvp_direction(self, vec, d_v, t):
        self.run("hvp_direction", d_v.size, vec, d_v, self.betas_eff, np.int64(t), self.groups)

    def after_hvp(self, d_x, hx, d_v, t):
        self.run("after_hvp", d_v.size, d_x, hx, d_v, self.betas_eff, np.int64(t), self.groups)

    def state(self):
        return self.engine.state


class KernelMLP(BatchedObjective):
    """Batched training gradient, HVP and validation loss of a tanh MLP on a backend.

    The batched objective of :func:`~.algorithm.reverse`: ``grad(x, t)``,
    ``grad_and_hvp(x, t, vec)`` (which adds ``d/dlog_l2 (g . vec)`` to ``d_meta``
    when there is a penalty) and ``valid(x)``; all rows at once, in kernels.
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
        self._bounds = be.put(group_bounds(layout), np.int64)
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
        self.d_meta = be.zeros((runs, layout.n_groups)) if self._has_l2 else None
        self._runs, self._n_params, self._n_groups = runs, n_params, layout.n_groups

    def _example_pass(self, x, data, idx, t, n_examples):
        self._be.run("example_pass", self._runs * n_examples, x, *data, idx, np.int64(t),
                     np.int64(n_examples), *self._layout, self._H, self._D, self._losses)

    def _param_grad(self, x, inputs, idx, t, n_examples, l2, out):
        self._be.run("param_grad", self._runs * self._n_params, x, inputs, idx, np.int64(t),
                     np.int64(n_examples), *self._layout, self._H, self._D, l2, self._groups,
                     out)

    def grad(self, x, t):
        self._example_pass(x, self._train, self._idx, t, self._batch)
        self._param_grad(x, self._train[0], self._idx, t, self._batch, self._l2, self._g)
        return self._g

    def grad_and_hvp(self, x, t, vec):
        g = self.grad(x, t)  # also leaves the activations the R pass reads
        be, t, m = self._be, np.int64(t), np.int64(self._batch)
        be.run("example_r_pass", self._runs * self._batch, x, vec, *self._train, self._idx, t, m,
               *self._layout, self._H, self._D, self._RH, self._RD)
        be.run("param_hvp", self._runs * self._n_params, x, vec, self._train[0], self._idx, t, m,
               *self._layout, self._H, self._D, self._RH, self._RD, self._l2, self._groups,
               self._hx)
        if self._has_l2:
            be.run("l2_meta", self._runs * self._n_groups, x, vec, self._l2, self._bounds,
                   self._h_meta)
            be.run("add_flat", self._runs * self._n_groups, be.flat(self.d_meta),
                   be.flat(self._h_meta))
        return g, self._hx

    def valid(self, x):
        self._example_pass(x, self._valid, self._valid_idx, 0, self._n_valid)
        self._param_grad(x, self._valid[0], self._valid_idx, 0, self._n_valid, self._no_l2,
                         self._g_valid)
        self._be.run("mean_rows", self._runs, self._losses, np.int64(self._n_valid),
                     self._loss_valid)
        return self._loss_valid, self._g_valid

