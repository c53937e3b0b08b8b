"""Compiled training losses of the built-in models: no autograd tracing per step.

:class:`CompiledMLPLoss` is the :class:`~.base.Objective` of an
:class:`~hypergrad_fast.models.MLP` (tanh or ReLU hidden layers, any widths) or a
:class:`~hypergrad_fast.models.LogisticRegression`: mean softmax cross-entropy over
the minibatch of iteration t, plus optional L2 penalties (per group or per weight,
``meta["log_l2"]``), optionally on training inputs learned as ``meta["inputs"]``.
Its gradient and Hessian-vector product are the Numba kernels of
:mod:`._mlp_kernels`; it is still callable as ``loss(x, meta, t)`` through the
equivalent autograd loss, so ``autograd.grad(loss)`` keeps working.

Build it with :func:`hypergrad_fast.models.make_train_loss` (``backend="compiled"``,
the default), which validates the data.
"""

import threading

import numpy as np
from autograd.extend import defvjp, primitive
from autograd.tracer import isbox

from . import _mlp_kernels as kernels
from .base import Objective
from .batches import minibatch
from .layout import block_offsets, group_bounds

__all__ = ["CompiledMLPLoss", "CompiledEvalLoss", "one_blas_thread"]

_EMPTY = np.empty(0)


class _OneBlasThread:
    """BLAS on one thread while the kernels run their parts (or runs) on all cores.

    The kernels split the work across cores themselves; BLAS threads on top of that
    oversubscribe the cores (measured here: 5-10x slower).  Results do not depend on
    the kernels' thread count; a multithreaded BLAS call would change them (its sums in
    another order: seen in the last bits of a 1,000-example validation gradient), so
    every kernel call runs under this.  The libraries' own setters are called directly: a
    ``threadpool_limits`` scan of the loaded libraries at every call costs more than
    a small minibatch's gradient.  Re-entrant: the outermost ``with`` sets and
    restores, so a whole pass holds one setting (switching BLAS back to its threads
    between steps wakes threads that then compete with the kernels' own).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._libraries = None
        self._depth = 0
        self._before = ()

    def _scan(self):
        # The kernels' np.dot calls SciPy's BLAS (``cython_blas``), a library of its own
        # beside NumPy's: load it first, or the scan misses it.
        import scipy.linalg.cython_blas  # noqa: F401
        from threadpoolctl import ThreadpoolController

        return [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                if self._libraries is None:
                    self._libraries = self._scan()
                self._before = [lib.get_num_threads() for lib in self._libraries]
                for lib in self._libraries:
                    lib.set_num_threads(1)
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._libraries, self._before):
                    lib.set_num_threads(n)
        return False


_one_blas_thread = _OneBlasThread()


def one_blas_thread():
    """The context manager that keeps every BLAS library of the process on one thread
    while it is held (re-entrant): what the compiled objectives hold around each pass."""
    return _one_blas_thread
_NO_BOUNDS = np.empty(0, dtype=np.int64)


class _ModelKernels:
    """What every compiled loss of a model passes to the kernels: the layer widths, the
    weights' and biases' offsets in x, the activation; the check of x's shape."""

    def __init__(self, model):
        self.model = model
        self._size = model.layout.size
        self._sizes = np.array(model.layer_sizes, dtype=np.int64)
        self._w_off, self._b_off = block_offsets(model.layout, model.n_layers)
        self._relu = model.activation == "relu"

    def _check_x(self, x):
        if np.shape(x) != (self._size,):
            raise ValueError(f"x must have shape ({self._size},), got {np.shape(x)}")


class CompiledMLPLoss(_ModelKernels, Objective):
    """Mean cross-entropy (+ L2) of an MLP on minibatch t, with compiled derivatives.

    Parameters (already validated by ``make_train_loss``)
    ----------
    model : an MLP / LogisticRegression (``layer_sizes``, ``activation``, ``layout``).
    inputs, targets : (n, n_in) and (n, n_out) C-contiguous float64.
    batch_size, seed : minibatch t is ``minibatch(t, n, batch_size, seed)``...
    batches : ...unless this (T, batch_size) int64 table is given: row t.
    l2 : None, "group" or "weight" — the shape of ``meta["log_l2"]``.
    learn_inputs : the training inputs are ``meta["inputs"]`` instead of ``inputs``.
    autograd_loss : the same loss written with autograd, for ``__call__``.
    """

    def __init__(self, model, inputs, targets, batch_size, seed, batches, l2, learn_inputs,
                 autograd_loss):
        super().__init__(model)
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed, self.batches = batch_size, seed, batches
        self.l2, self.learn_inputs = l2, learn_inputs
        self._autograd_loss = autograd_loss
        layout = model.layout
        self._l2_shape = {None: None, "group": (layout.n_groups,), "weight": (layout.size,)}[l2]
        self._groups = layout.groups
        self._bounds = group_bounds(layout)
        self._strength_key, self._strength = None, None

    def __call__(self, x, meta, t):
        """The loss value, traced by autograd (so ``grad(loss)`` works as for any loss)."""
        return self._autograd_loss(x, meta, t)

    def __repr__(self):
        extras = "".join([f", l2={self.l2!r}" if self.l2 else "",
                          ", learn_inputs=True" if self.learn_inputs else ""])
        return (f"CompiledMLPLoss({self.model!r}, n={len(self.targets)}, "
                f"batch_size={self.batch_size}{extras})")

    # ------------------------------------------------------------------ inputs
    def batch(self, t):
        """The example indices of iteration t, int64 (batch_size,)."""
        if self.batches is None:
            return minibatch(t, len(self.targets), self.batch_size, self.seed)
        if not 0 <= t < len(self.batches):
            raise ValueError(f"iteration {t} has no row in batches (shape {self.batches.shape})")
        return self.batches[t]

    def _source(self, x, meta):
        """The inputs the minibatches are drawn from (``meta["inputs"]`` when learned)."""
        self._check_x(x)
        if self.learn_inputs:
            return self._meta_array(meta, "inputs", self.inputs.shape)
        return self.inputs

    def _meta_array(self, meta, key, shape):
        try:
            value = meta[key]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"this loss needs meta[{key!r}] of shape {shape}; meta is "
                             f"{type(meta).__name__}") from None
        value = np.asarray(value, dtype=np.float64)
        if value.shape != shape:
            raise ValueError(f"meta[{key!r}] must have shape {shape}, got {value.shape}")
        return np.ascontiguousarray(value)

    def _strengths(self, meta):
        """exp(meta["log_l2"]) per parameter, kept while log_l2 stays the same."""
        log_l2 = self._meta_array(meta, "log_l2", self._l2_shape)
        key = log_l2.tobytes()
        if key != self._strength_key:
            per_param = log_l2[self._groups] if self.l2 == "group" else log_l2
            self._strength_key, self._strength = key, np.exp(per_param)
        return self._strength

    # ------------------------------------------------------------------ the objective
    def session(self):
        """BLAS on one thread while it is held: the kernels use the cores themselves."""
        return _one_blas_thread

    def _penalty(self, meta):
        return _EMPTY if self.l2 is None else self._strengths(meta)

    def value_and_grad(self, x, meta, t):
        x = np.ascontiguousarray(x, dtype=np.float64)
        source = self._source(x, meta)
        g = np.empty(self._size)
        with _one_blas_thread:
            value = kernels.batch_value_grad(x, source, self.targets, self.batch(t), self._sizes,
                                             self._w_off, self._b_off, self._relu,
                                             self._penalty(meta), g)
        return value, g

    def grad_and_hvp(self, x, meta, t, u, d_meta):
        x = np.ascontiguousarray(x, dtype=np.float64)
        u = np.ascontiguousarray(u, dtype=np.float64)
        source = self._source(x, meta)
        idx = self.batch(t)
        g, hu = np.empty(self._size), np.empty(self._size)
        want_inputs, d_inputs, d_log_l2, bounds = self._hvp_outputs(d_meta, idx, source)
        with _one_blas_thread:
            kernels.batch_grad_hvp(x, u, source, self.targets, idx, self._sizes, self._w_off,
                                   self._b_off, self._relu, want_inputs, self._penalty(meta),
                                   bounds, g, hu, d_inputs, d_log_l2)
        return g, hu, self._meta_cotangent(d_meta, want_inputs, d_inputs, idx)

    def grad_then_hvp(self, x, meta, t, direction, d_meta):
        # The gradient pass keeps its activations and deltas (a tape per part of the
        # minibatch), and the R pass reuses them: one gradient pass instead of two.
        x = np.ascontiguousarray(x, dtype=np.float64)
        source = self._source(x, meta)
        idx = self.batch(t)
        g, hu = np.empty(self._size), np.empty(self._size)
        parts = kernels.n_parts(len(idx))
        tape = np.empty((parts, kernels.tape_size(self._sizes, len(idx), source.shape[1])))
        tape_cols = np.empty((parts, source.shape[1] + 1), dtype=np.int64)
        lam = self._penalty(meta)
        with _one_blas_thread:
            kernels.batch_grad_tape(x, source, self.targets, idx, self._sizes, self._w_off,
                                    self._b_off, self._relu, lam, g, tape, tape_cols)
            u = np.ascontiguousarray(direction(g), dtype=np.float64)
            if u.shape != g.shape:
                raise ValueError(f"direction(g) must have shape {g.shape}, got {u.shape}")
            want_inputs, d_inputs, d_log_l2, bounds = self._hvp_outputs(d_meta, idx, source)
            kernels.batch_hvp_tape(x, u, self.targets, idx, self._sizes, self._w_off,
                                   self._b_off, self._relu, want_inputs, lam, bounds, tape,
                                   tape_cols, hu, d_inputs, d_log_l2)
        return g, hu, self._meta_cotangent(d_meta, want_inputs, d_inputs, idx)

    def _hvp_outputs(self, d_meta, idx, source):
        """What the R pass writes besides H u: (want_inputs, d_inputs, d_log_l2, bounds);
        ``d_meta["log_l2"]`` becomes the (copied) array that the kernel adds to."""
        has_dict = isinstance(d_meta, dict)
        want_inputs = self.learn_inputs and has_dict
        d_inputs = np.empty((len(idx), source.shape[1]) if want_inputs else (0, 0))
        d_log_l2 = _EMPTY
        if self.l2 is not None and has_dict:
            d_log_l2 = np.array(d_meta["log_l2"], dtype=np.float64)
            d_meta["log_l2"] = d_log_l2
        bounds = self._bounds if self.l2 == "group" else _NO_BOUNDS
        return want_inputs, d_inputs, d_log_l2, bounds

    @staticmethod
    def _meta_cotangent(d_meta, want_inputs, d_inputs, idx):
        """``d_meta`` with the minibatch's input cotangents added to its rows."""
        if want_inputs:
            d_all = np.array(d_meta["inputs"], dtype=np.float64)
            np.add.at(d_all, idx, d_inputs)
            d_meta["inputs"] = d_all
        return d_meta

    # ------------------------------------------------------------------ B runs at once
    def rows_value_and_grad(self, x, log_l2, t):
        """``(values (B,), g (B, N))`` of B parameter rows, row b with per-group penalty
        ``log_l2[b]`` (or none when ``log_l2`` is None); row b has the bits of
        ``value_and_grad(x[b], {"log_l2": log_l2[b]}, t)``.  Runs on all cores."""
        g, values = np.empty(x.shape), np.empty(x.shape[0])
        with _one_blas_thread:
            kernels.value_grad_rows(x, self.inputs, self.targets, self.batch(t), self._sizes,
                                    self._w_off, self._b_off, self._relu, self._rows_l2(log_l2),
                                    g, values)
        return values, g

    def rows_grad_and_hvp(self, x, log_l2, t, u, d_log_l2):
        """Rows of ``grad_and_hvp``; adds row b's ``d/dlog_l2`` to ``d_log_l2[b]`` (B, G)."""
        g, hu = np.empty(x.shape), np.empty(x.shape)
        with _one_blas_thread:
            kernels.grad_hvp_rows(x, u, self.inputs, self.targets, self.batch(t), self._sizes,
                                  self._w_off, self._b_off, self._relu, self._rows_l2(log_l2),
                                  self._bounds, g, hu,
                                  np.empty((0, 0)) if d_log_l2 is None else d_log_l2)
        return g, hu

    def _rows_l2(self, log_l2):
        if self.l2 is None or log_l2 is None:
            return np.empty((0, self._size))
        key = ("rows", log_l2.tobytes())
        if key != self._strength_key:
            self._strength_key = key
            self._strength = np.ascontiguousarray(np.exp(log_l2[:, self._groups]))
        return self._strength

    def evaluate(self, x, inputs=None, targets=None):
        """``(mean cross-entropy, its gradient in x)`` on whole data (default: the training
        set), no penalty: a validation loss for the sweeps."""
        inputs = self.inputs if inputs is None else np.ascontiguousarray(inputs, np.float64)
        targets = self.targets if targets is None else np.ascontiguousarray(targets, np.float64)
        g = np.empty(self._size)
        # One BLAS thread, as in the passes: a multithreaded BLAS sums in another order,
        # so the bits would depend on the threads the process's BLAS started with (a
        # Dask worker's start with one).
        with _one_blas_thread:
            value = kernels.value_grad(np.ascontiguousarray(x, dtype=np.float64), inputs,
                                       targets, self._sizes, self._w_off, self._b_off,
                                       self._relu, g, len(inputs), kernels.ALL_COLUMNS)
        return value, g


class CompiledEvalLoss(_ModelKernels):
    """``loss(x)``: the mean cross-entropy of a model on fixed data (a validation set), with
    a compiled value and gradient; autograd differentiates it once, in x.

    Build it with :func:`hypergrad_fast.models.make_eval_loss`.  The value is
    :func:`._mlp_kernels.value_only`, the gradient (its VJP)
    :func:`._mlp_kernels.value_grad_all`: the rows' two halves on two cores, BLAS on one
    thread.  The data's input columns that are zero in every row (an MNIST set's
    border pixels: about 150 of 784) are left out of the products, once, here: the
    loss keeps a copy of the other columns.  As a hyperloss it also keeps NumPy's BLAS
    threads idle: they spin for about 0.1 s after each product and would compete with
    the reverse pass that starts right after the hyperloss's gradient.
    """

    def __init__(self, model, inputs, targets):
        super().__init__(model)
        self.inputs, self.targets = inputs, targets
        self._cols = kernels.active_columns(inputs, np.arange(len(inputs), dtype=np.int64))
        self._compact = (np.ascontiguousarray(inputs[:, self._cols]) if len(self._cols)
                         else inputs)

    def __repr__(self):
        return f"CompiledEvalLoss({self.model!r}, n={len(self.targets)})"

    def __call__(self, x):
        return _eval_loss(self, x)

    def _metrics(self, x):
        """``(mean cross-entropy, misclassified rows)`` at x."""
        self._check_x(x)
        with _one_blas_thread:
            return kernels.value_only(np.ascontiguousarray(x, dtype=np.float64), self._compact,
                                      self.targets, self._sizes, self._w_off, self._b_off,
                                      self._relu, self._cols)

    def value(self, x):
        """The mean cross-entropy at x (a float)."""
        return float(self._metrics(x)[0])

    def value_and_error(self, x):
        """``(mean cross-entropy, error)`` at x: the error is the fraction of examples
        whose largest logit is not at their target's largest entry (one-hot targets:
        misclassified)."""
        value, wrong = self._metrics(x)
        return float(value), int(wrong) / len(self.targets)

    def value_and_grad(self, x):
        """``(value, gradient (N,))`` at x."""
        self._check_x(x)
        x = np.ascontiguousarray(x, dtype=np.float64)
        g = np.empty(self._size)
        with _one_blas_thread:
            value = kernels.value_grad_all(x, self._compact, self.targets, self._sizes,
                                           self._w_off, self._b_off, self._relu, g, self._cols)
        return value, g


@primitive
def _eval_loss(loss, x):
    return loss.value(x)


def _eval_loss_vjp(ans, loss, x):
    if isbox(x):
        raise NotImplementedError(
            "a compiled eval loss is differentiable once; for higher derivatives build it "
            "with make_eval_loss(..., backend='autograd')")

    def vjp(d_ans):
        return d_ans * loss.value_and_grad(x)[1]

    return vjp


defvjp(_eval_loss, None, _eval_loss_vjp)
