"""Differentiable models and training losses over a flat parameter vector.

Everything here is written with ``autograd.numpy`` so that losses can be
differentiated by autograd with respect to the parameters ``x`` and the
hyperparameters in ``meta`` (L2 strengths, even the training inputs).
Parameters live in one flat float64 vector; ``ParamLayout`` maps it to named
blocks and assigns each block a *group* index, so per-group hyperparameters
(one initial scale or L2 strength per weight matrix / bias) expand to
per-parameter arrays with ``layout.expand``.
"""

from __future__ import annotations

from typing import Sequence

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from .objectives.batches import check_int as _check_int
from .objectives.batches import check_batches, minibatch
from .objectives.compiled import CompiledEvalLoss, CompiledMLPLoss
from .objectives.layout import ParamLayout

__all__ = [
    "ParamLayout",
    "MLP",
    "LogisticRegression",
    "l2_penalty",
    "minibatch",
    "make_train_loss",
    "make_eval_loss",
    "make_meta",
]

_L2_MODES = (None, "group", "weight")


def _logsumexp_rows(z):
    """log(sum(exp(z), axis=1)) as a column, stable for large logits.

    Subtracting the row maximum keeps exp() from overflowing.  The result does not
    depend on it, so it is taken as a constant (``getval``): its gradient terms would
    cancel, and leaving them out saves autograd the max's derivative at every order.
    """
    m = anp.max(getval(z), axis=1, keepdims=True)
    return m + anp.log(anp.sum(anp.exp(z - m), axis=1, keepdims=True))


class MLP:
    """A fully connected classifier with softmax outputs.

    ``layer_sizes`` = (n_in, hidden..., n_out); hidden layers use ``activation``
    ("tanh" or "relu"), the last layer is linear followed by log-softmax.
    Parameters: blocks "W0", "b0", "W1", "b1", ... of shapes (n_in, n_out)
    and (n_out,), in ``self.layout``.
    """

    def __init__(self, layer_sizes: Sequence[int], activation: str = "tanh"):
        sizes = [int(s) for s in layer_sizes]
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(
                f"layer_sizes needs at least two positive sizes, got {list(layer_sizes)}"
            )
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        self.layer_sizes: tuple[int, ...] = tuple(sizes)
        self.activation = activation
        blocks = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            blocks += [(f"W{i}", (n_in, n_out)), (f"b{i}", (n_out,))]
        self.layout = ParamLayout(blocks)
        self.n_layers = len(sizes) - 1

    def _activate(self, z):
        if self.activation == "tanh":
            return anp.tanh(z)
        return anp.maximum(z, 0.0)

    def log_probs(self, x, inputs):
        """Log class probabilities, (n, n_out), for inputs (n, n_in) under parameters x (size,)."""
        if anp.ndim(inputs) != 2 or anp.shape(inputs)[1] != self.layer_sizes[0]:
            raise ValueError(
                f"inputs must have shape (n, {self.layer_sizes[0]}), got {anp.shape(inputs)}"
            )
        p = self.layout.unflatten(x)
        h = inputs
        for i in range(self.n_layers):
            z = anp.dot(h, p[f"W{i}"]) + p[f"b{i}"]
            h = self._activate(z) if i < self.n_layers - 1 else z
        return h - _logsumexp_rows(h)

    def loss(self, x, inputs, targets):
        """Mean softmax cross-entropy (nats per example) against one-hot targets (n, n_out)."""
        return -anp.mean(anp.sum(self.log_probs(x, inputs) * targets, axis=1))

    def error(self, x, inputs, targets) -> float:
        """Fraction of examples misclassified (argmax prediction != target class)."""
        predicted = np.argmax(self.log_probs(np.asarray(x), np.asarray(inputs)), axis=1)
        targets = np.asarray(targets)
        # One-hot rows, or already integer labels.
        labels = targets if targets.ndim == 1 else np.argmax(targets, axis=1)
        return float(np.mean(predicted != labels))

    def init_params(self, rng, log_scales) -> np.ndarray:
        """Random flat x0 (size,): standard normal times exp(log_scales) of each group.

        ``rng`` is a np.random.Generator (or a seed for default_rng);
        ``log_scales`` is a scalar or one value per group, shape (n_groups,).
        """
        rng = np.random.default_rng(rng)
        log_scales = np.asarray(log_scales, dtype=np.float64)
        if log_scales.ndim == 0:
            scales = np.full(self.layout.size, np.exp(log_scales))
        else:
            scales = np.exp(self.layout.expand(log_scales))
        return rng.standard_normal(self.layout.size) * scales

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(layer_sizes={list(self.layer_sizes)}, activation={self.activation!r})"


class LogisticRegression(MLP):
    """Multinomial logistic regression: an MLP with no hidden layer (blocks "W0", "b0")."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__([n_in, n_out])

    def __repr__(self) -> str:
        return f"LogisticRegression(n_in={self.layer_sizes[0]}, n_out={self.layer_sizes[1]})"


def l2_penalty(layout: ParamLayout, x, log_l2):
    """0.5 * sum(exp(log_l2) * x**2), with log_l2 per group (n_groups,) or per weight (size,)."""
    shape = anp.shape(log_l2)
    if shape == (layout.n_groups,):
        log_l2 = layout.expand(log_l2)
    elif shape != (layout.size,):
        raise ValueError(
            f"log_l2 must have shape ({layout.n_groups},) (per group) or "
            f"({layout.size},) (per weight), got {shape}"
        )
    return 0.5 * anp.sum(anp.exp(log_l2) * x**2)


_BACKENDS = ("compiled", "autograd")


def _data_array(name, value, ncols=None):
    a = np.asarray(value)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != 2 or len(a) == 0 or (ncols is not None and a.shape[1] != ncols):
        cols = "n_cols" if ncols is None else ncols
        raise ValueError(f"{name} must have shape (n, {cols}) with n >= 1, got {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise ValueError(f"{name}[{i}, {j}] = {a[i, j]} is not finite")
    return a


def _model_data(model, inputs, targets, backend):
    """Check the backend and model; ``inputs`` and ``targets`` as validated float64 arrays."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(model, MLP):
        raise TypeError(f"model must be an MLP or LogisticRegression, got {type(model).__name__}")
    inputs = _data_array("inputs", inputs, model.layer_sizes[0])
    targets = _data_array("targets", targets, model.layer_sizes[-1])
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets must have equal lengths, got {inputs.shape} and "
                         f"{targets.shape}")
    return inputs, targets


def make_eval_loss(model, inputs, targets, *, backend="compiled"):
    """Build ``loss(x)``: the mean cross-entropy of ``model`` with weights x on fixed data
    (a validation set: the usual hyperloss), differentiable by autograd.

    ``backend="compiled"`` (default) returns a
    :class:`~hypergrad_fast.objectives.CompiledEvalLoss`: Numba value and gradient,
    autograd differentiates it once, in x (higher derivatives raise
    NotImplementedError).  ``backend="autograd"`` returns ``model.loss`` on the data,
    differentiable to any order.  The data are checked as by :func:`make_train_loss`.
    """
    inputs, targets = _model_data(model, inputs, targets, backend)
    if backend == "compiled":
        return CompiledEvalLoss(model, inputs, targets)

    def loss(x):
        return model.loss(x, inputs, targets)

    return loss


def make_train_loss(model, inputs, targets, batch_size, *, seed=0, l2=None, learn_inputs=False,
                    batches=None, backend="compiled"):
    """Build ``loss(x, meta, t)``: the training objective at iteration t (a scalar).

    Mean cross-entropy over the minibatch of iteration t, ``minibatch(t, n,
    batch_size, seed)`` or, when ``batches`` (a (T, batch_size) int array) is given,
    its row t; plus, when ``l2`` is "group" or "weight", ``l2_penalty(model.layout,
    x, meta["log_l2"])`` with meta["log_l2"] of shape (n_groups,) or (size,).  With
    ``learn_inputs=True`` the training inputs come from ``meta["inputs"]`` (shape
    like ``inputs``) so hypergradients reach the data.  ``meta`` is a dict; it is
    ignored when neither option is used.

    ``backend="compiled"`` (default) returns a
    :class:`~hypergrad_fast.objectives.CompiledMLPLoss`: :func:`~hypergrad_fast.sgd`
    uses its Numba gradient and Hessian-vector product, and it is still callable
    (and differentiable by autograd) as ``loss(x, meta, t)``.  ``backend="autograd"``
    returns the plain autograd function.  Data of the wrong shape or dtype,
    non-finite data and batch indices out of range raise ValueError naming the array.
    """
    if l2 not in _L2_MODES:
        raise ValueError(f"l2 must be one of {_L2_MODES}, got {l2!r}")
    inputs, targets = _model_data(model, inputs, targets, backend)
    n_examples = len(inputs)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    if batches is not None:
        batches = check_batches(batches, n_examples)
        if batches.shape[1] != batch_size:
            raise ValueError(f"batches must have batch_size = {batch_size} columns, got "
                             f"shape {batches.shape}")
    layout = model.layout
    l2_shape = {None: None, "group": (layout.n_groups,), "weight": (layout.size,)}[l2]

    def batch(t):
        if batches is None:
            return minibatch(t, n_examples, batch_size, seed)
        if not 0 <= t < len(batches):
            raise ValueError(f"iteration {t} has no row in batches (shape {batches.shape})")
        return batches[t]

    def loss(x, meta, t):
        idx = batch(t)
        if learn_inputs:
            if anp.shape(meta["inputs"]) != inputs.shape:
                raise ValueError(
                    f"meta['inputs'] must have shape {inputs.shape}, "
                    f"got {anp.shape(meta['inputs'])}"
                )
            batch_inputs = meta["inputs"][idx]
        else:
            batch_inputs = inputs[idx]
        value = model.loss(x, batch_inputs, targets[idx])
        if l2 is not None:
            # Check the mode's shape here: l2_penalty alone would accept either.
            if anp.shape(meta["log_l2"]) != l2_shape:
                raise ValueError(f"meta['log_l2'] must have shape {l2_shape} for l2={l2!r}")
            value = value + l2_penalty(layout, x, meta["log_l2"])
        return value

    if backend == "autograd":
        return loss
    return CompiledMLPLoss(model, inputs, targets, batch_size, seed, batches, l2,
                           bool(learn_inputs), loss)


def make_meta(model, inputs=None, *, l2=None, log_l2=0.0) -> dict:
    """A starting ``meta`` dict for ``make_train_loss`` with the same options.

    Holds "log_l2" (filled with ``log_l2``, shaped for the ``l2`` mode) when
    ``l2`` is set and a float64 copy of ``inputs`` as "inputs" when given.
    """
    if l2 not in _L2_MODES:
        raise ValueError(f"l2 must be one of {_L2_MODES}, got {l2!r}")
    meta = {}
    if l2 is not None:
        n = model.layout.n_groups if l2 == "group" else model.layout.size
        meta["log_l2"] = np.full(n, float(log_l2))
    if inputs is not None:
        meta["inputs"] = np.array(inputs, dtype=np.float64)
    return meta
