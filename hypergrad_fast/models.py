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

import functools
import numbers
from typing import Mapping, Sequence

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

__all__ = [
    "ParamLayout",
    "MLP",
    "LogisticRegression",
    "l2_penalty",
    "minibatch",
    "make_train_loss",
    "make_meta",
]

_L2_MODES = (None, "group", "weight")


class ParamLayout:
    """Map a flat parameter vector to named blocks of given shapes.

    Built from an ordered sequence of ``(name, shape)`` pairs.  Attributes:
    ``size`` (total number of parameters), ``names``, ``shapes``, ``slices``
    (name -> slice of the flat vector), ``n_groups`` (number of blocks) and
    ``groups`` (int64 (size,): the block index of every parameter).
    """

    def __init__(self, blocks: Sequence[tuple[str, Sequence[int]]]):
        names, shapes, slices = [], [], {}
        start = 0
        for name, shape in blocks:
            if not isinstance(name, str):
                raise ValueError(f"block names must be strings, got {name!r}")
            if name in slices:
                raise ValueError(f"duplicate block name {name!r}")
            # Accept a bare int for 1-D blocks as NumPy does.
            if isinstance(shape, numbers.Integral):
                shape = (int(shape),)
            else:
                shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"block {name!r} has a negative dimension: {shape}")
            n = int(np.prod(shape, dtype=np.int64))
            names.append(name)
            shapes.append(shape)
            slices[name] = slice(start, start + n)
            start += n
        if not names:
            raise ValueError("ParamLayout needs at least one block")
        self.names: tuple[str, ...] = tuple(names)
        self.shapes: tuple[tuple[int, ...], ...] = tuple(shapes)
        self.slices: dict[str, slice] = slices
        self.size: int = start
        self.n_groups: int = len(names)
        sizes = [slices[n].stop - slices[n].start for n in names]
        self.groups: np.ndarray = np.repeat(np.arange(self.n_groups, dtype=np.int64), sizes)
        self.groups.flags.writeable = False  # shared by every expand() call
        self._bounds = [slices[name].stop for name in names[:-1]]

    def _check_flat(self, x) -> None:
        if anp.shape(x) != (self.size,):
            raise ValueError(f"expected a flat vector of shape ({self.size},), got {anp.shape(x)}")

    def unflatten(self, x) -> dict:
        """Flat (size,) vector -> dict name -> block of its shape (views; works on ArrayBoxes)."""
        self._check_flat(x)
        # One split rather than a slice per block: autograd's gradient of a slice is an
        # np.add.at into a zero vector, block after block; split's is one concatenate.
        pieces = anp.split(x, self._bounds)
        return {name: anp.reshape(piece, shape)
                for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def flatten(self, blocks: Mapping[str, object]) -> np.ndarray:
        """Dict name -> array -> flat float64 (size,) vector, checking names and shapes."""
        if set(blocks) != set(self.names):
            missing = sorted(set(self.names) - set(blocks))
            extra = sorted(set(blocks) - set(self.names))
            raise ValueError(
                f"block names do not match the layout: missing {missing}, unexpected {extra}"
            )
        out = np.empty(self.size, dtype=np.float64)
        for name, shape in zip(self.names, self.shapes):
            block = np.asarray(blocks[name], dtype=np.float64)
            if block.shape != shape:
                raise ValueError(f"block {name!r} has shape {block.shape}, expected {shape}")
            out[self.slices[name]] = block.ravel()
        return out

    def expand(self, per_group):
        """Per-group values (n_groups,) -> per-parameter values (size,), differentiably."""
        if anp.shape(per_group) != (self.n_groups,):
            raise ValueError(
                f"expected one value per group, shape ({self.n_groups},), "
                f"got {anp.shape(per_group)}"
            )
        return per_group[self.groups]

    def group_of(self, name: str) -> int:
        """The group (block) index of block ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no block named {name!r}; blocks are {list(self.names)}") from None

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        blocks = ", ".join(f"{n}{s}" for n, s in zip(self.names, self.shapes))
        return f"ParamLayout(size={self.size}, blocks=[{blocks}])"


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


@functools.lru_cache(maxsize=16)
def _epoch_permutation(seed: int, epoch: int, n_examples: int) -> np.ndarray:
    # Cached because the reverse pass asks for the same epochs again; read-only
    # so no caller can corrupt the shared copy.
    perm = np.random.default_rng((seed, epoch)).permutation(n_examples)
    perm.flags.writeable = False
    return perm


def _check_int(name, value, minimum) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def minibatch(t: int, n_examples: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """Example indices (batch_size,) int64 of minibatch t, a pure function of (t, seed).

    Each epoch visits every example once, in the order of a permutation drawn
    from ``default_rng((seed, epoch))``; batch t covers positions
    [t * batch_size, (t + 1) * batch_size) of the concatenated epochs, so a
    batch may straddle two epochs.  Being stateless, the reverse pass at
    iteration t sees the same batch as the forward pass did.
    """
    t = _check_int("t", t, 0)
    n_examples = _check_int("n_examples", n_examples, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    start = t * batch_size
    positions = np.arange(start, start + batch_size, dtype=np.int64)
    epochs = positions // n_examples
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
        in_epoch = epochs == epoch
        perm = _epoch_permutation(seed, epoch, n_examples)
        out[in_epoch] = perm[positions[in_epoch] % n_examples]
    return out


def make_train_loss(model, inputs, targets, batch_size, *, seed=0, l2=None, learn_inputs=False):
    """Build ``loss(x, meta, t)``: training objective at iteration t (a scalar).

    Mean cross-entropy over ``minibatch(t, n, batch_size, seed)`` plus, when
    ``l2`` is "group" or "weight", ``l2_penalty(model.layout, x,
    meta["log_l2"])`` with meta["log_l2"] of shape (n_groups,) or (size,).
    With ``learn_inputs=True`` the training inputs come from
    ``meta["inputs"]`` (shape like ``inputs``) so hypergradients reach the
    data.  ``meta`` is a dict; it is ignored when neither option is used.
    """
    if l2 not in _L2_MODES:
        raise ValueError(f"l2 must be one of {_L2_MODES}, got {l2!r}")
    inputs = np.asarray(inputs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if inputs.ndim != 2 or targets.ndim != 2 or len(inputs) != len(targets):
        raise ValueError(
            "inputs and targets must be 2-D with equal lengths, "
            f"got {inputs.shape} and {targets.shape}"
        )
    n_examples = len(inputs)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    layout = model.layout
    l2_shape = {None: None, "group": (layout.n_groups,), "weight": (layout.size,)}[l2]

    def loss(x, meta, t):
        idx = minibatch(t, n_examples, batch_size, seed)
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

    return loss


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
