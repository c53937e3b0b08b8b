"""The multitask experiment: learned weight sharing across ten related MNIST tasks
(the weight-sharing experiment of Maclaurin, Duvenaud & Adams 2015).

Ten tasks are built from MNIST digits: five 10-way digit tasks whose labels go
through five fixed permutations (the first the identity), and the same five on
images rotated by 90 degrees.  Task ``k`` has rotation ``k // 5`` and permutation
``k % 5``: tasks 0-4 see upright digits, 5-9 rotated ones, and tasks ``p`` and
``p + 5`` share a label mapping.  Each task has few examples (50 training, 50
validation, 300 test by default, no digit used twice), so networks trained alone
overfit.

Every task has its own tanh network [784, H, H, 10]; all of them train together as
one parameter vector on the sum of their training losses plus a sharing penalty,
for each weight layer ``l``

    0.5 * sum_ij A_l[i, j] <w_l[i], w_l[j]>,

``w_l[i]`` task i's flattened weight matrix of layer l (biases are not penalised).
Three ways of sharing are meta-optimised the same way, by Adam on exact
hypergradients of the summed validation loss:

* ``separate``: ``A_l = lambda_l I`` (3 log strengths);
* ``tied``: the hidden layers are one network for all tasks, each task keeps its
  own output layer (a per-task readout: the permuted tasks map one digit to
  different labels, which no single readout can do), with one L2 strength per
  layer (3 log strengths);
* ``learned``: ``A_l = L_l L_l^T`` with ``L_l = diag(exp(d_l)) M_l``, ``M_l`` unit
  lower triangular: a Cholesky factor with a log diagonal, positive-definite for
  every value of its 3 x (10 + 45) = 165 hyperparameters.

The learned matrices are shown as partial correlations of the tasks' weights under
the Gaussian prior whose precision is ``A_l``: ``-A_ij / sqrt(A_ii A_jj)`` off the
diagonal, 1 on it.  Positive means the penalty pulls the two tasks' weights
together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from ..data import MnistSplits, Split, load_mnist
from ..hypergrad import sgd
from ..models import MLP, ParamLayout, make_train_loss
from ..objectives import Objective
from ._args import ConfigError, Experiment, int_at_least, positive_float
from ._runner import (N_CLASSES, N_PIXELS, SIDE, SPLITS, BaseConfig, MnistProblem,
                      add_common_arguments, command_line, data_stamp, meta_optimize,
                      new_figure, plot_meta_curve, prepare_out, print_summary, records_json,
                      variants_facts, save_figure, settings_from_args, write_results)

__all__ = ["MultitaskConfig", "MultitaskProblem", "MultitaskLoss", "TaskLayout", "QUICK",
           "VARIANTS", "make_tasks", "task_permutations", "partial_correlations",
           "run_multitask"]

NAME = "multitask"
#: The three ways of sharing, meta-optimised one after the other.
VARIANTS = ("separate", "tied", "learned")
#: Tasks: N_ROTATIONS x N_PERMUTATIONS; task k has rotation k // N_PERMUTATIONS and
#: permutation k % N_PERMUTATIONS.
N_PERMUTATIONS = 5
N_ROTATIONS = 2
N_TASKS = N_PERMUTATIONS * N_ROTATIONS
#: Weight layers of the [784, H, H, 10] network, each with its sharing matrix.
N_LAYERS = 3
#: Seed of the five label permutations: part of the problem's definition, the same
#: for every --seed and every data set.
PERMUTATION_SEED = 20150601


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MultitaskConfig(BaseConfig):
    """Settings of the multitask experiment: :class:`~._runner.BaseConfig`'s, with
    ``n_train``, ``n_valid``, ``n_test`` and ``batch_size`` counted per task (ten
    tasks), and

    hidden: width H of both tanh hidden layers of every task's [784, H, H, 10] network.
    learning_rate: the fixed learning rate (per task's mean cross-entropy; the tied
        network's shared layers use it divided by the number of tasks, so that they
        move with the tasks' mean gradient).
    momentum: the fixed momentum decay beta, in (0, 1).
    init_log_l2: the starting log L2 strength of every layer, every variant: the
        learned matrices start at ``exp(init_log_l2) * I``.

    Initial weights: an independent draw for every task (seeded by ``seed``) of
    standard deviation 1/sqrt(fan-in), biases zero; the tied network's hidden layers
    take task 0's draw.  (Identical draws would line the tasks' hidden units up by
    output label from the start, which favours sharing between tasks of one
    permutation in every layer before any learning.)
    """

    NAME = NAME

    n_train: int = 50
    n_valid: int = 50
    n_test: int = 300
    iters: int = 100
    batch_size: int = 25
    meta_iters: int = 40
    step_size: float = 0.2
    hidden: int = 50
    learning_rate: float = 0.3
    momentum: float = 0.9
    init_log_l2: float = -4.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.hidden, bool) or int(self.hidden) != self.hidden or self.hidden < 1:
            raise ConfigError(f"hidden must be an integer >= 1, got {self.hidden!r}")
        object.__setattr__(self, "hidden", int(self.hidden))
        if self.batch_size > self.n_train:
            raise ConfigError(f"batch_size must be <= n_train (training examples per task, "
                              f"{self.n_train}), got {self.batch_size}")
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in (0, 1), got {self.momentum}")
        if not np.isfinite(self.init_log_l2):
            raise ConfigError(f"init_log_l2 must be finite, got {self.init_log_l2}")

    @property
    def layer_sizes(self) -> tuple:
        """Every task's network: (784, H, H, 10)."""
        return (N_PIXELS, self.hidden, self.hidden, N_CLASSES)

    def to_json(self) -> dict:
        """All settings as a JSON-able dict, with ``layer_sizes`` and ``n_tasks``."""
        return {**super().to_json(), "layer_sizes": list(self.layer_sizes),
                "n_tasks": N_TASKS}


#: The --quick settings (measured at about 30 s on a 2-core machine).
QUICK = {"meta_iters": 5}


# --------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------


def task_permutations() -> np.ndarray:
    """The five label permutations (5, 10) int64: row 0 the identity; any two rows
    differ at every digit (so tasks of different permutations disagree on every
    label).  Fixed: drawn from ``PERMUTATION_SEED``."""
    rng = np.random.default_rng(PERMUTATION_SEED)
    rows = [np.arange(N_CLASSES)]
    while len(rows) < N_PERMUTATIONS:
        candidate = rng.permutation(N_CLASSES)
        if all(np.all(candidate != row) for row in rows):
            rows.append(candidate)
    return np.array(rows, dtype=np.int64)


def task_rotation(k: int) -> int:
    """Task k's rotation index (0: upright, 1: 90 degrees counter-clockwise)."""
    return k // N_PERMUTATIONS


def task_permutation(k: int) -> int:
    """Task k's permutation index (0: the identity)."""
    return k % N_PERMUTATIONS


def task_name(k: int) -> str:
    """A short label: rotation in degrees and permutation, e.g. ``90°/π2``."""
    return f"{90 * task_rotation(k)}°/π{task_permutation(k)}"


def _task_split(split: Split, rows: slice, rotation: int, permutation: np.ndarray) -> Split:
    images = split.inputs[rows].reshape(-1, SIDE, SIDE)
    if rotation:
        images = np.rot90(images, k=rotation, axes=(1, 2))
    labels = permutation[split.labels[rows]]
    return Split(np.ascontiguousarray(images.reshape(-1, N_PIXELS)),
                 np.eye(N_CLASSES)[labels], labels)


def make_tasks(digits: MnistSplits, n_train: int, n_valid: int, n_test: int) -> list:
    """The ten tasks' splits (a list of :class:`~hypergrad_fast.data.MnistSplits`)
    from ``digits``, which holds ten times each count: task k takes the k-th block
    of each split (so no digit serves two tasks or two splits), rotates its images by
    ``90 * task_rotation(k)`` degrees and relabels digit d as
    ``task_permutations()[task_permutation(k), d]``."""
    perms = task_permutations()
    counts = dict(zip(SPLITS, (n_train, n_valid, n_test)))
    for name, split in zip(SPLITS, digits):
        if len(split.labels) != N_TASKS * counts[name]:
            raise ValueError(f"the {name} split holds {len(split.labels)} digits, expected "
                             f"{N_TASKS} x {counts[name]}")
    tasks = []
    for k in range(N_TASKS):
        parts = [_task_split(split, slice(k * counts[name], (k + 1) * counts[name]),
                             task_rotation(k), perms[task_permutation(k)])
                 for name, split in zip(SPLITS, digits)]
        tasks.append(MnistSplits(*parts))
    return tasks


def load_task_digits(config: MultitaskConfig) -> MnistSplits:
    """Ten times the per-task counts of digits (disjoint splits, data seed 0);
    ConfigError with a one-line reason when they cannot be loaded."""
    try:
        digits = load_mnist(N_TASKS * config.n_train, N_TASKS * config.n_valid,
                            N_TASKS * config.n_test, path=config.data)
    except (ValueError, OSError) as err:
        raise ConfigError(f"cannot load MNIST ({config.data_source()}) for {N_TASKS} tasks "
                          f"of {config.n_train} training, {config.n_valid} validation and "
                          f"{config.n_test} test digits: {err}") from None
    if digits.train.inputs.shape[1] != N_PIXELS:
        raise ConfigError(f"{config.data_source()}: images of {digits.train.inputs.shape[1]} "
                          f"pixels, expected {SIDE} x {SIDE} = {N_PIXELS}")
    return digits


# --------------------------------------------------------------------------
# Where each task's network lives in the trained vector
# --------------------------------------------------------------------------


class LayerCopies(NamedTuple):
    """The copies of one weight matrix in the trained vector x: row i is
    ``x[base + i * stride + offset : ... + width]``, ``rows`` of them."""

    base: int
    rows: int
    stride: int
    offset: int
    width: int


class TaskLayout:
    """How the tasks' networks sit in the one trained vector x.

    ``pieces[k]``: task k's network vector (``net_size``) as contiguous pieces
    ``(start, stop, at)``: ``x[start:stop]`` is its ``[at, at + stop - start)``.
    ``layers[l]``: :class:`LayerCopies` of weight matrix ``W{l}``: one row per task
    (``separate``, ``learned``, and the tied network's readout) or one row for all
    (the tied network's hidden layers).  ``n_shared``: the first ``n_shared``
    parameters serve every task (a piece either lies among them or after them);
    ``shared`` is that as a bool (size,).  Build with :meth:`per_task` or :meth:`tied`.
    """

    def __init__(self, net: ParamLayout, n_tasks: int, size: int, pieces, layers,
                 n_shared: int):
        self.net, self.n_tasks, self.size = net, n_tasks, size
        self.net_size = net.size
        self.pieces = tuple(tuple(p) for p in pieces)
        self.layers = tuple(layers)
        self.n_shared = n_shared
        self.shared = np.arange(size) < n_shared

    @classmethod
    def per_task(cls, net: ParamLayout, n_tasks: int) -> "TaskLayout":
        """Every task has its whole network: x is n_tasks network vectors in a row."""
        p = net.size
        pieces = [[(k * p, (k + 1) * p, 0)] for k in range(n_tasks)]
        layers = [LayerCopies(0, n_tasks, p, net.slices[f"W{l}"].start,
                              _length(net.slices[f"W{l}"])) for l in range(N_LAYERS)]
        return cls(net, n_tasks, n_tasks * p, pieces, layers, 0)

    @classmethod
    def tied(cls, net: ParamLayout, n_tasks: int) -> "TaskLayout":
        """One network for all tasks except the output layer (``W2``, ``b2``), which
        every task has its own: x is the shared layers, then n_tasks readouts."""
        head = net.slices[f"W{N_LAYERS - 1}"].start  # the shared layers come first
        readout = net.size - head
        size = head + n_tasks * readout
        pieces = [[(0, head, 0), (head + k * readout, head + (k + 1) * readout, head)]
                  for k in range(n_tasks)]
        layers = []
        for l in range(N_LAYERS - 1):
            s = net.slices[f"W{l}"]
            layers.append(LayerCopies(s.start, 1, _length(s), 0, _length(s)))
        s = net.slices[f"W{N_LAYERS - 1}"]
        layers.append(LayerCopies(head, n_tasks, readout, s.start - head, _length(s)))
        return cls(net, n_tasks, size, pieces, layers, head)

    def task_params(self, x, k: int):
        """Task k's network vector (net_size,) from x (NumPy or autograd)."""
        parts = [x[start:stop] for start, stop, _ in self.pieces[k]]
        return parts[0] if len(parts) == 1 else anp.concatenate(parts)

    def add_task(self, out: np.ndarray, k: int, part: np.ndarray):
        """``out += `` task k's network vector ``part`` scattered into x's layout,
        where ``out`` is zero outside the shared parameters (task k's own pieces are
        copied, not added: no other task writes them)."""
        for start, stop, at in self.pieces[k]:
            if start < self.n_shared:
                out[start:stop] += part[at:at + stop - start]
            else:
                out[start:stop] = part[at:at + stop - start]

    def zeros_shared(self) -> np.ndarray:
        """An array for :meth:`add_task`: zero on the shared parameters, the rest
        left to the tasks' pieces (which cover it)."""
        out = np.empty(self.size)
        out[:self.n_shared] = 0.0
        return out

    def layer(self, x, l: int):
        """The copies of weight matrix l in x, (rows, width): a view for NumPy input
        (writing to it writes x), differentiable for autograd input."""
        c = self.layers[l]
        block = anp.reshape(x[c.base:c.base + c.rows * c.stride], (c.rows, c.stride))
        return block[:, c.offset:c.offset + c.width]

    def copies(self) -> tuple:
        """Rows of every layer's sharing matrix."""
        return tuple(c.rows for c in self.layers)

    def from_networks(self, networks) -> np.ndarray:
        """x holding task k's network ``networks[k]`` (net_size,); the shared
        parameters come from task 0's."""
        x = np.zeros(self.size)
        for k, w in enumerate(networks):
            for start, stop, at in self.pieces[k]:
                if k == 0 or start >= self.n_shared:
                    x[start:stop] = w[at:at + stop - start]
        return x


def _length(s: slice) -> int:
    return s.stop - s.start


# --------------------------------------------------------------------------
# The training objective
# --------------------------------------------------------------------------


def sharing_penalty(layout: TaskLayout, x, matrices):
    """``sum_l 0.5 * sum_ij A_l[i, j] <w_l[i], w_l[j]>`` (autograd-differentiable)."""
    total = 0.0
    for l, a in enumerate(matrices):
        w = layout.layer(x, l)
        total = total + 0.5 * anp.sum(w * anp.dot(a, w))
    return total


def make_autograd_loss(layout: TaskLayout, task_losses):
    """The multitask training loss ``loss(x, matrices, t)`` written with autograd:
    the sum of the tasks' losses (``task_losses[k](w, meta, t)``) on their networks
    plus :func:`sharing_penalty`."""
    def loss(x, matrices, t):
        total = sharing_penalty(layout, x, matrices)
        for k, task_loss in enumerate(task_losses):
            total = total + task_loss(layout.task_params(x, k), {}, t)
        return total
    return loss


class MultitaskLoss(Objective):
    """Sum of the tasks' training losses plus the sharing penalty, with derivatives
    from the tasks' compiled objectives and the penalty's closed forms.

    ``meta`` is the tuple of sharing matrices ``(A_0, A_1, A_2)``, ``A_l`` of shape
    (rows, rows) for ``layout.copies()``.  With ``g_l = A_l W_l`` the penalty's
    gradient, its Hessian-vector product is ``A_l U_l`` and ``d/dA_l (g . u)`` is
    ``U_l W_l^T``, returned symmetrised (``A_l`` is symmetric, so only the symmetric
    part is defined).  Callable as ``loss(x, meta, t)`` through
    :func:`make_autograd_loss`, the reference.
    """

    def __init__(self, layout: TaskLayout, task_losses):
        if len(task_losses) != layout.n_tasks:
            raise ValueError(f"expected {layout.n_tasks} task losses, got {len(task_losses)}")
        self.layout = layout
        self.task_losses = list(task_losses)
        self._autograd_loss = make_autograd_loss(layout, task_losses)

    def __call__(self, x, meta, t):
        return self._autograd_loss(x, meta, t)

    def __repr__(self):
        return (f"MultitaskLoss({self.layout.n_tasks} tasks, {self.layout.size} parameters, "
                f"copies per layer {self.layout.copies()})")

    def session(self):
        """The tasks' objectives' session (BLAS on one thread for compiled ones)."""
        return self.task_losses[0].session()

    def _matrices(self, meta):
        copies = self.layout.copies()
        if not isinstance(meta, (tuple, list)) or len(meta) != len(copies):
            raise ValueError(f"meta must be a tuple of {len(copies)} sharing matrices, got "
                             f"{type(meta).__name__}")
        out = []
        for l, (a, n) in enumerate(zip(meta, copies)):
            a = np.asarray(a, dtype=np.float64)
            if a.shape != (n, n):
                raise ValueError(f"sharing matrix {l} must have shape ({n}, {n}), got {a.shape}")
            out.append(a)
        return out

    def _check_x(self, x):
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.shape != (self.layout.size,):
            raise ValueError(f"x must have shape ({self.layout.size},), got {x.shape}")
        return x

    def value_and_grad(self, x, meta, t):
        x = self._check_x(x)
        matrices = self._matrices(meta)
        g = self.layout.zeros_shared()
        value = 0.0
        for k, task_loss in enumerate(self.task_losses):
            v, g_k = task_loss.value_and_grad(self.layout.task_params(x, k), {}, t)
            value += v
            self.layout.add_task(g, k, g_k)
        for l, a in enumerate(matrices):
            w = self.layout.layer(x, l)
            aw = a @ w
            value += 0.5 * float(np.vdot(w, aw))
            self.layout.layer(g, l)[...] += aw
        return value, g

    def grad_and_hvp(self, x, meta, t, u, d_meta):
        x = self._check_x(x)
        u = np.ascontiguousarray(u, dtype=np.float64)
        matrices = self._matrices(meta)
        g, hu = self.layout.zeros_shared(), self.layout.zeros_shared()
        for k, task_loss in enumerate(self.task_losses):
            g_k, hu_k, _ = task_loss.grad_and_hvp(self.layout.task_params(x, k), {}, t,
                                                  self.layout.task_params(u, k), None)
            self.layout.add_task(g, k, g_k)
            self.layout.add_task(hu, k, hu_k)
        d_out = None if d_meta is None else []
        for l, a in enumerate(matrices):
            w, u_l = self.layout.layer(x, l), self.layout.layer(u, l)
            self.layout.layer(g, l)[...] += a @ w
            self.layout.layer(hu, l)[...] += a @ u_l
            if d_out is not None:
                uw = u_l @ w.T
                d_out.append(np.asarray(d_meta[l]) + 0.5 * (uw + uw.T))
        return g, hu, (None if d_out is None else tuple(d_out))


# --------------------------------------------------------------------------
# Sharing matrices from hyperparameters
# --------------------------------------------------------------------------


def _lower_placement(n: int) -> np.ndarray:
    """(n * n, n (n - 1) / 2) 0/1 matrix placing a vector below the diagonal of an
    n x n matrix (row-major, in ``np.tril_indices(n, -1)`` order)."""
    rows, cols = np.tril_indices(n, -1)
    place = np.zeros((n * n, len(rows)))
    place[rows * n + cols, np.arange(len(rows))] = 1.0
    return place


def cholesky_matrix(log_diag, lower, place):
    """``A = L L^T``, ``L = diag(exp(log_diag)) (I + strictly lower part from
    lower)``: positive-definite for every finite input (autograd-differentiable)."""
    n = anp.shape(log_diag)[0]
    unit = np.eye(n) + anp.reshape(anp.dot(place, lower), (n, n))
    factor = anp.exp(log_diag)[:, None] * unit
    return anp.dot(factor, factor.T)


def partial_correlations(a) -> np.ndarray:
    """A positive-definite sharing matrix normalised like a correlation: the partial
    correlations ``-A_ij / sqrt(A_ii A_jj)`` of the tasks' weights under the Gaussian
    prior of precision A, with 1 on the diagonal (positive: pulled together)."""
    a = np.asarray(a, dtype=np.float64)
    d = np.sqrt(np.diag(a))
    out = -a / np.outer(d, d)
    np.fill_diagonal(out, 1.0)
    return out


def pair_means(corr: np.ndarray) -> dict:
    """Mean partial correlation over task pairs i < j of the same rotation, of
    different rotations, of the same permutation and of different permutations."""
    n = corr.shape[0]
    groups = {"same_rotation": [], "across_rotation": [], "same_permutation": [],
              "different_permutation": []}
    for i in range(n):
        for j in range(i + 1, n):
            rot = "same_rotation" if task_rotation(i) == task_rotation(j) else "across_rotation"
            perm = ("same_permutation" if task_permutation(i) == task_permutation(j)
                    else "different_permutation")
            groups[rot].append(corr[i, j])
            groups[perm].append(corr[i, j])
    return {k: float(np.mean(v)) for k, v in groups.items()}


# --------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------


class MultitaskProblem(MnistProblem):
    """The hyperloss of one variant of :class:`MultitaskConfig`: the summed validation
    cross-entropy of the ten tasks' trained networks.

    Hyperparameters: ``separate`` and ``tied``: ``log_l2`` (3,), one log strength per
    layer; ``learned``: ``log_diag`` (3, 10) and ``lower`` (3, 45), the Cholesky
    factors of the three sharing matrices (see :func:`cholesky_matrix`).  Records:
    loss and error averaged over the tasks.  ``digits``: the digits already loaded
    (:func:`load_task_digits`, shared by the variants).
    """

    def __init__(self, config: MultitaskConfig, variant: str, digits=None):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        super().__init__(config, load_task_digits(config) if digits is None else digits)
        self.variant = variant
        self.tasks = make_tasks(self.data, config.n_train, config.n_valid, config.n_test)
        self.model = MLP(config.layer_sizes, "tanh")
        net = self.model.layout
        self.layout = (TaskLayout.tied if variant == "tied" else TaskLayout.per_task)(
            net, N_TASKS)
        task_losses = [make_train_loss(self.model, task.train.inputs, task.train.targets,
                                       config.batch_size, seed=config.seed,
                                       backend=config.backend) for task in self.tasks]
        self.train_loss = (MultitaskLoss(self.layout, task_losses)
                           if config.backend == "compiled"
                           else make_autograd_loss(self.layout, task_losses))
        scales = np.array([s[0] ** -0.5 if n[0] == "W" else 0.0
                           for n, s in zip(net.names, net.shapes)])
        rng = np.random.default_rng(config.seed)
        self.x0 = self.layout.from_networks(
            [net.expand(scales) * rng.standard_normal(net.size) for _ in range(N_TASKS)])
        # The tied hidden layers get the sum of ten tasks' gradients: their own group
        # with the learning rate divided by ten moves them with the mean.
        self.groups = self.layout.shared.astype(np.int64)
        rates = [config.learning_rate, config.learning_rate / N_TASKS]
        self.alphas = np.tile(rates, (config.iters, 1))
        self.betas = np.full((config.iters, 2), config.momentum)
        if variant == "learned":
            n_lower = N_TASKS * (N_TASKS - 1) // 2
            self.hyper = ParamLayout([("log_diag", (N_LAYERS, N_TASKS)),
                                      ("lower", (N_LAYERS, n_lower))])
            self._place = _lower_placement(N_TASKS)
        else:
            self.hyper = ParamLayout([("log_l2", (N_LAYERS,))])

    def initial(self) -> np.ndarray:
        """Every variant starts at ``A_l = exp(init_log_l2) I`` (per copy)."""
        if self.variant == "learned":
            return np.concatenate([np.full(N_LAYERS * N_TASKS, 0.5 * self.config.init_log_l2),
                                   np.zeros(self.hyper.size - N_LAYERS * N_TASKS)])
        return np.full(N_LAYERS, self.config.init_log_l2)

    def matrices(self, h) -> tuple:
        """The sharing matrices (A_0, A_1, A_2) of hyperparameters h (differentiable)."""
        if self.variant == "learned":
            p = self.hyper.unflatten(h)
            return tuple(cholesky_matrix(p["log_diag"][l], p["lower"][l], self._place)
                         for l in range(N_LAYERS))
        return tuple(anp.exp(h[l]) * np.eye(n) for l, n in enumerate(self.layout.copies()))

    def train(self, h):
        return sgd(self.train_loss, self.x0, self.alphas, self.betas, self.matrices(h),
                   groups=self.groups)

    def data_stamp(self) -> str:
        """SHA-256 of the ten tasks' splits (the digits as rotated and relabelled)."""
        if self._stamp is None:
            self._stamp = data_stamp([split for task in self.tasks for split in task])
        return self._stamp

    def hyperloss(self, h):
        """Summed validation cross-entropy of the ten tasks (nats)."""
        x_final = self.train(h)
        self._last = (np.array(getval(h)), np.array(getval(x_final)))
        total = 0.0
        for k, task in enumerate(self.tasks):
            total = total + self.model.loss(self.layout.task_params(x_final, k),
                                            task.valid.inputs, task.valid.targets)
        return total

    def evaluate(self, x) -> dict:
        """Loss (nats per example) and error (fraction) of every split, averaged over
        the tasks (equal sizes: the pooled means)."""
        x = np.asarray(x)
        out = {f"{s}_{w}": 0.0 for s in SPLITS for w in ("loss", "error")}
        for k, task in enumerate(self.tasks):
            w = self.layout.task_params(x, k)
            for name, split in zip(SPLITS, task):
                out[f"{name}_loss"] += float(self.model.loss(w, split.inputs, split.targets))
                out[f"{name}_error"] += self.model.error(w, split.inputs, split.targets)
        return {k: v / N_TASKS for k, v in out.items()}


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def plot_sharing(path, correlations):
    """The three learned sharing matrices as partial correlations, one image each,
    rotation blocks outlined."""
    fig = new_figure(figsize=(14, 5), layout="constrained")
    axes = fig.subplots(1, N_LAYERS)
    names = [task_name(k) for k in range(N_TASKS)]
    image = None
    for l, (ax, corr) in enumerate(zip(axes, correlations)):
        image = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
        for i in range(N_TASKS):
            for j in range(N_TASKS):
                if i != j:
                    ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=5.5)
        edge = N_PERMUTATIONS - 0.5
        ax.axhline(edge, color="k", lw=1)
        ax.axvline(edge, color="k", lw=1)
        ax.set_xticks(range(N_TASKS), names, rotation=90, fontsize=7)
        ax.set_yticks(range(N_TASKS), names, fontsize=7)
        which = {0: "input layer W0", N_LAYERS - 1: f"output layer W{N_LAYERS - 1}"}
        ax.set_title(which.get(l, f"hidden layer W{l}"))
    fig.colorbar(image, ax=axes, shrink=0.8,
                 label="partial correlation -A_ij / sqrt(A_ii A_jj)")
    fig.suptitle("Learned sharing between tasks (rotation°/permutation; "
                 "red: weights pulled together)")
    save_figure(fig, path)


def plot_table(path, table):
    """Train and test loss and error of the three variants, as bars."""
    fig = new_figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    positions = np.arange(len(VARIANTS))
    for ax, what, scale, unit in ((axes[0], "loss", 1, "nats per example"),
                                  (axes[1], "error", 100, "%")):
        for shift, split, color in ((-0.2, "train", "tab:blue"), (0.2, "test", "tab:green")):
            values = [scale * table[v][f"{split}_{what}"] for v in VARIANTS]
            bars = ax.bar(positions + shift, values, width=0.4, color=color, label=split)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(positions, VARIANTS)
        ax.set_ylabel(f"{what} ({unit})")
        ax.set_title(f"{what.capitalize()} averaged over the {N_TASKS} tasks")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------

FILES = {
    "results": "results.json",
    **{f"checkpoint_{v}": f"checkpoint_{v}.npz" for v in VARIANTS},
    "sharing_plot": "sharing_matrices.png",
    "table_plot": "comparison.png",
    "meta_plot": "meta_learning_curve.png",
}

READOUT_NOTE = ("tied: layers W0, b0, W1, b1 are one network for all tasks and every task "
                "has its own output layer W2, b2, because tasks of different permutations "
                "give one digit different labels, which one shared readout cannot fit")


def _checks(table, sharing_means, correlations) -> dict:
    """The three expectations of the experiment, each with its numbers; the sharing
    checks also give the standard deviation of the matrix's off-diagonal partial
    correlations, the scale against which a difference of means is small or not."""
    test_loss = {v: table[v]["test_loss"] for v in VARIANTS}
    first, last = sharing_means["layer0"], sharing_means[f"layer{N_LAYERS - 1}"]
    spread = [float(np.std(c[~np.eye(len(c), dtype=bool)])) for c in correlations]
    return {
        "learned_lowest_test_loss": {
            "holds": bool(test_loss["learned"] < min(test_loss["separate"], test_loss["tied"])),
            "test_loss": test_loss},
        "input_layer_couples_same_rotation": {
            "holds": bool(first["same_rotation"] > first["across_rotation"]),
            "same_rotation_mean": first["same_rotation"],
            "across_rotation_mean": first["across_rotation"],
            "off_diagonal_sd": spread[0]},
        "output_layer_couples_same_permutation": {
            "holds": bool(last["same_permutation"] > last["different_permutation"]),
            "same_permutation_mean": last["same_permutation"],
            "different_permutation_mean": last["different_permutation"],
            "off_diagonal_sd": spread[N_LAYERS - 1]},
    }


def run_multitask(config: MultitaskConfig, out_dir, *, resume: bool = False,
                  progress: bool = True, log: Optional[Callable] = None,
                  command: str = "") -> dict:
    """Run the three meta-optimisations (separate, tied, learned) into ``out_dir``,
    each with its own checkpoint; returns the results dict (results.json)."""
    log = log or (lambda msg: None)
    paths = prepare_out(out_dir, FILES)
    start = time.perf_counter()
    digits = load_task_digits(config)
    problems = {v: MultitaskProblem(config, v, digits) for v in VARIANTS}
    log(f"{NAME}: {N_TASKS} tasks x {config.layer_sizes} tanh MLPs, {config.n_train} "
        f"training digits per task, T={config.iters}; sharing separate / tied / learned "
        f"({', '.join(str(p.hyper.size) for p in problems.values())} hyperparameters), "
        f"{config.meta_iters} meta-iterations each")
    results, records = {}, {}
    for variant, problem in problems.items():
        results[variant] = meta_optimize(problem, config, paths[f"checkpoint_{variant}"],
                                         resume=resume, progress=progress,
                                         desc=f"{variant} meta-iterations", variant=variant)
        records[variant] = records_json(results[variant])
    table = {v: {key: records[v][key][-1] for key in
                 ("train_error", "test_error", "train_loss", "test_loss", "valid_loss",
                  "valid_error")} for v in VARIANTS}
    learned = problems["learned"]
    matrices = [np.asarray(a) for a in learned.matrices(results["learned"].params)]
    correlations = [partial_correlations(a) for a in matrices]
    sharing = {f"layer{l}": c.tolist() for l, c in enumerate(correlations)}
    means = {f"layer{l}": pair_means(c) for l, c in enumerate(correlations)}
    summary = {
        "table": table,
        "sharing": sharing,
        "checks": _checks(table, means, correlations),
        "sharing_pair_means": means,
        "learned_l2_separate": [float(v) for v in np.exp(results["separate"].params)],
        "learned_l2_tied": [float(v) for v in np.exp(results["tied"].params)],
        "initial_test_loss": {v: records[v]["test_loss"][0] for v in VARIANTS},
        "readout": READOUT_NOTE,
        "tasks": [task_name(k) for k in range(N_TASKS)],
    }
    plot_sharing(paths["sharing_plot"], correlations)
    plot_table(paths["table_plot"], table)
    plot_meta_curve(paths["meta_plot"], {v: records[v] for v in VARIANTS},
                    title="(mean over tasks)")
    figures = [(FILES["sharing_plot"], "the three learned sharing matrices as partial "
                                       "correlations between the tasks' weights"),
               (FILES["table_plot"], "train and test loss and error of separate, tied and "
                                     "learned sharing"),
               (FILES["meta_plot"], "loss and error after training vs meta-iteration: "
                                    "separate (solid), tied (dashed), learned (dotted)")]
    return write_results(
        paths["results"], experiment=NAME, command=command, config=config,
        data_sha256=learned.data_stamp(), summary=summary, figures=figures,
        learned={"sharing_matrices": [a.tolist() for a in matrices],
                 "hyperparameters": {v: results[v].params.tolist() for v in VARIANTS}},
        permutations=task_permutations().tolist(),
        **variants_facts(results, records, start, paths))


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def add_parser(sub):
    """The ``multitask`` subcommand's parser, added to ``sub``."""
    d = MultitaskConfig()
    p = sub.add_parser(
        NAME, help="meta-learn weight sharing across ten related MNIST tasks",
        description=(
            "Ten MNIST tasks (five label permutations, upright and rotated by 90 "
            "degrees), one tanh network each, trained together with a sharing penalty "
            "0.5 sum_ij A[i, j] <w_i, w_j> per layer. Meta-optimises, with Adam on "
            "exact hypergradients of the summed validation loss, a learned "
            "positive-definite 10x10 matrix A per layer, against separate networks "
            "(A = lambda I) and tied hidden layers with per-task readouts, tuned the "
            "same way. Sizes are per task. Writes results.json, PNG plots and three "
            "checkpoints (updated every meta-iteration) into --out."))
    small = add_common_arguments(p, NAME, d, QUICK, "30 s on 2 cores")
    for action in small._group_actions:
        if action.dest.startswith("n_") or action.dest == "batch_size":
            action.help = action.help.replace(" (default", " per task (default")
    small.add_argument("--hidden", type=int_at_least(1), default=None, metavar="H",
                       help=f"width of both hidden layers (default: {d.hidden})")
    p.add_argument("--learning-rate", type=positive_float, default=None, metavar="A",
                   help=f"fixed learning rate (default: {d.learning_rate})")
    return p


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; the exit code."""
    config = MultitaskConfig(**settings_from_args(args, QUICK,
                                                  extra=("hidden", "learning_rate")))
    start = time.perf_counter()
    results = run_multitask(config, args.out, resume=args.resume,
                            progress=not args.no_progress, log=print,
                            command=command_line(args))
    s = results["summary"]
    rows = [("", "".join(f"{v:>10s}" for v in VARIANTS))]
    for key, scale in (("train_loss", 1), ("test_loss", 1), ("train_error", 100),
                       ("test_error", 100)):
        label = key.replace("_", " ") + (" (%)" if scale == 100 else " (nats)")
        rows.append((label, "".join(f"{scale * s['table'][v][key]:>10.3f}" for v in VARIANTS)))
    for name, check in s["checks"].items():
        numbers = ", ".join(f"{k} {v:.3f}" for k, v in check.items()
                            if isinstance(v, float))
        rows.append((name.replace("_", " "), f"{check['holds']}" +
                     (f" ({numbers})" if numbers else "")))
    print_summary(results, time.perf_counter() - start, rows)
    return 0


EXPERIMENT = Experiment(NAME, add_parser, run_cli)
