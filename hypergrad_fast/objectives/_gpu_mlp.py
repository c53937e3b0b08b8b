"""Batched tanh-MLP gradients and Hessian-vector products: CUDA kernels and their CPU twins.

For B parameter vectors ``x`` (B, N) of one :class:`~hypergrad_fast.models.MLP` (tanh
hidden layers, softmax cross-entropy; a
:class:`~hypergrad_fast.models.LogisticRegression` is the case with no hidden layer)
and one shared minibatch, these compute, for every run b at once:

* the training gradient ``g[b] = d/dx [mean CE + 0.5 sum(l2[b, group] x**2)]``,
* the exact Hessian-vector product ``H[b] vec[b]`` by Pearlmutter's R-operator
  (forward-over-reverse written out for tanh and softmax), and
  ``d/dl2 (g[b] . vec[b])`` per group, from which the log-L2 hypergradient follows,
* the small element-wise and per-group steps of the reverse pass (Algorithm 2).

Each step is one *per-thread function* (``register_jitable``), written once and
compiled twice: ``*_cpu`` runs it in an ``@njit`` loop over all threads, and
:func:`gpu_kernels` wraps it in a ``@cuda.jit`` kernel with one CUDA thread per
index.  Every thread writes only its own outputs and sums in a fixed order, with no
atomics, so results are deterministic: the reverse pass recomputes each gradient
bit for bit, which exact reversal needs.  Under the CUDA simulator the kernels run
the same Python function on NumPy scalars, so CPU and simulator agree bit for bit
(IEEE float64 without fused multiply-adds, ``math.exp``/``log``/``tanh`` from the
same C library).  On a real GPU NVVM contracts ``a * b + c`` into FMAs and libdevice
rounds ``exp``/``tanh`` its own way, so results differ from the CPU twin in the
last bits (and each stays deterministic).

Two kinds of pass, each split in two launches so that no thread sums over another
thread's results:

1. per (run, example), ``B * M`` threads: forward pass, softmax cross-entropy and
   backward pass of one example, storing every unit's activation ``H`` and delta
   ``D`` (``dloss/dz``) in a workspace of shape (B, M_max, U), U the number of
   non-input units; the R pass adds ``RH`` (R of the activations; of the logits at
   the top) and ``RD`` (R of the deltas);
2. per (run, parameter), ``B * N`` threads: sum over the M examples.

Layout arrays (int64), from the model's :class:`~hypergrad_fast.models.ParamLayout`:
``sizes`` (L+1,) layer widths; ``w_off`` and ``b_off`` (L,) flat offsets of the
blocks ``W_l`` (n_in, n_out, row-major) and ``b_l``; ``u_off`` (L,) offset of layer
l's output units in a workspace row; ``bounds`` (G+1,) start of each parameter group
(groups are contiguous blocks).  Minibatches are rows of ``idx`` (T, M): example m
of step t is ``inputs[idx[t, m]]``.

No fast-math anywhere.
"""

import functools
import inspect
import math
import types

import numpy as np
from numba import njit
from numba.extending import register_jitable

#: numba.cuda, imported by :func:`gpu_kernels` (a CPU run never pays for the import);
#: the GPU wrappers read this global when they compile.
cuda = None

__all__ = ["gpu_kernels", "cpu_loops", "KERNEL_NAMES"]

#: name -> per-thread function ``f(k, *args)``, in the order they are defined.
_PER_THREAD = {}


def _per_thread(func):
    """Register ``func(k, *args)``, the work of thread k, as a kernel of this module: it is
    compiled for both targets (``register_jitable``) and wrapped, under its name, as a
    CPU loop and a CUDA kernel (:func:`cpu_loops`, :func:`gpu_kernels`)."""
    _PER_THREAD[func.__name__] = register_jitable(func)
    return func


# ---------------------------------------------------------------------- helpers
@register_jitable
def _unit_in(inputs, idx, t, H, b, m, layer, u_off, i):
    """Input unit i of ``layer`` for example m: a data column at layer 0, else an activation."""
    if layer == 0:
        return inputs[idx[t, m], i]
    return H[b, m, u_off[layer - 1] + i]


@register_jitable
def _log_sum_exp(H, b, m, start, n):
    """log(sum(exp(logits))) of the n logits from ``H[b, m, start]``, shifted by their max."""
    top = H[b, m, start]
    for c in range(1, n):
        z = H[b, m, start + c]
        if z > top:
            top = z
    total = 0.0
    for c in range(n):
        total += math.exp(H[b, m, start + c] - top)
    return top + math.log(total)


@register_jitable
def _locate(p, sizes, w_off, b_off):
    """(layer, is_bias, i, j) of flat parameter p: ``W_layer[i, j]`` or ``b_layer[j]``."""
    n_layers = sizes.shape[0] - 1
    for layer in range(n_layers):
        n_out = sizes[layer + 1]
        if p < b_off[layer]:
            q = p - w_off[layer]
            i = q // n_out
            return layer, False, i, q - i * n_out
        if p < b_off[layer] + n_out:
            return layer, True, np.int64(0), p - b_off[layer]
    return np.int64(-1), True, np.int64(0), np.int64(0)  # not reached for p < N


# ------------------------------------------------------------- per-thread functions
@_per_thread
def example_pass(k, x, inputs, targets, idx, t, n_examples, sizes, w_off, b_off, u_off, H, D,
                 losses):
    """Thread (b, m) = divmod(k, M): forward, cross-entropy and backward pass of one example.

    Writes ``H[b, m]`` (tanh activations; logits at the top), ``D[b, m]`` (dCE/dz of
    every unit, not yet divided by M) and ``losses[b, m]`` (nats).
    """
    b = k // n_examples
    m = k - b * n_examples
    n_layers = sizes.shape[0] - 1
    for layer in range(n_layers):
        n_in = sizes[layer]
        n_out = sizes[layer + 1]
        for j in range(n_out):
            s = x[b, b_off[layer] + j]
            for i in range(n_in):
                s += (_unit_in(inputs, idx, t, H, b, m, layer, u_off, i)
                      * x[b, w_off[layer] + i * n_out + j])
            H[b, m, u_off[layer] + j] = math.tanh(s) if layer < n_layers - 1 else s
    # softmax cross-entropy against the target row y: CE = sum(y) lse - y . z
    n_cls = sizes[n_layers]
    top = u_off[n_layers - 1]
    row = idx[t, m]
    lse = _log_sum_exp(H, b, m, top, n_cls)
    y_sum = 0.0
    loss = 0.0
    for c in range(n_cls):
        y = targets[row, c]
        y_sum += y
        loss += y * (lse - H[b, m, top + c])
    losses[b, m] = loss
    for c in range(n_cls):
        D[b, m, top + c] = math.exp(H[b, m, top + c] - lse) * y_sum - targets[row, c]
    # backward: the delta of a hidden unit from the deltas of the layer above
    for layer in range(n_layers - 1, 0, -1):
        n_out = sizes[layer + 1]
        for i in range(sizes[layer]):
            s = 0.0
            for j in range(n_out):
                s += x[b, w_off[layer] + i * n_out + j] * D[b, m, u_off[layer] + j]
            h = H[b, m, u_off[layer - 1] + i]
            D[b, m, u_off[layer - 1] + i] = s * (1.0 - h * h)


@_per_thread
def param_grad(k, x, inputs, idx, t, n_examples, sizes, w_off, b_off, u_off, H, D, l2,
               groups, g):
    """Thread (b, p) = divmod(k, N): ``g[b, p]`` = mean over examples + L2 term."""
    n_params = x.shape[1]
    b = k // n_params
    p = k - b * n_params
    layer, is_bias, i, j = _locate(p, sizes, w_off, b_off)
    col = u_off[layer] + j
    acc = 0.0
    if is_bias:
        for m in range(n_examples):
            acc += D[b, m, col]
    else:
        for m in range(n_examples):
            acc += _unit_in(inputs, idx, t, H, b, m, layer, u_off, i) * D[b, m, col]
    g[b, p] = acc / n_examples + l2[b, groups[p]] * x[b, p]


@_per_thread
def example_r_pass(k, x, vec, inputs, targets, idx, t, n_examples, sizes, w_off, b_off, u_off,
                   H, D, RH, RD):
    """Thread (b, m): the R-operator along ``vec[b]`` of one example's forward and backward pass.

    Needs ``H`` and ``D`` of :func:`example_pass` at the same (x, t).  Writes ``RH[b, m]``
    (R of the tanh activations; R of the logits at the top) and ``RD[b, m]`` (R of
    the deltas).
    """
    b = k // n_examples
    m = k - b * n_examples
    n_layers = sizes.shape[0] - 1
    for layer in range(n_layers):
        n_in = sizes[layer]
        n_out = sizes[layer + 1]
        for j in range(n_out):
            s = vec[b, b_off[layer] + j]
            for i in range(n_in):
                w = w_off[layer] + i * n_out + j
                s += _unit_in(inputs, idx, t, H, b, m, layer, u_off, i) * vec[b, w]
                if layer > 0:
                    s += RH[b, m, u_off[layer - 1] + i] * x[b, w]
            u = u_off[layer] + j
            if layer < n_layers - 1:
                h = H[b, m, u]
                RH[b, m, u] = (1.0 - h * h) * s
            else:
                RH[b, m, u] = s
    # R of the softmax delta p * sum(y) - y:  sum(y) * p * (Rz - p . Rz)
    n_cls = sizes[n_layers]
    top = u_off[n_layers - 1]
    row = idx[t, m]
    lse = _log_sum_exp(H, b, m, top, n_cls)
    y_sum = 0.0
    p_rz = 0.0
    for c in range(n_cls):
        y_sum += targets[row, c]
        p_rz += math.exp(H[b, m, top + c] - lse) * RH[b, m, top + c]
    for c in range(n_cls):
        RD[b, m, top + c] = y_sum * math.exp(H[b, m, top + c] - lse) * (RH[b, m, top + c] - p_rz)
    # R of the backward pass: delta = s (1 - h^2) with s = W . delta_above
    for layer in range(n_layers - 1, 0, -1):
        n_out = sizes[layer + 1]
        for i in range(sizes[layer]):
            s = 0.0
            r_s = 0.0
            for j in range(n_out):
                w = w_off[layer] + i * n_out + j
                d = D[b, m, u_off[layer] + j]
                s += x[b, w] * d
                r_s += vec[b, w] * d + x[b, w] * RD[b, m, u_off[layer] + j]
            u = u_off[layer - 1] + i
            h = H[b, m, u]
            RD[b, m, u] = r_s * (1.0 - h * h) - 2.0 * h * RH[b, m, u] * s


@_per_thread
def param_hvp(k, x, vec, inputs, idx, t, n_examples, sizes, w_off, b_off, u_off, H, D, RH, RD,
              l2, groups, hx):
    """Thread (b, p): ``hx[b, p] = (H[b] vec[b])[p]``, the R of :func:`param_grad`."""
    n_params = x.shape[1]
    b = k // n_params
    p = k - b * n_params
    layer, is_bias, i, j = _locate(p, sizes, w_off, b_off)
    col = u_off[layer] + j
    acc = 0.0
    if is_bias:
        for m in range(n_examples):
            acc += RD[b, m, col]
    elif layer == 0:  # the inputs do not depend on x
        for m in range(n_examples):
            acc += inputs[idx[t, m], i] * RD[b, m, col]
    else:
        below = u_off[layer - 1] + i
        for m in range(n_examples):
            acc += H[b, m, below] * RD[b, m, col] + RH[b, m, below] * D[b, m, col]
    hx[b, p] = acc / n_examples + l2[b, groups[p]] * vec[b, p]


@_per_thread
def l2_meta(k, x, vec, l2, bounds, out):
    """Thread (b, group): ``out[b, group] = l2 * sum(x * vec)`` over the group.

    That is ``d/dlog_l2 (g[b] . vec[b])`` for the penalty ``0.5 exp(log_l2) x**2``.
    """
    n_groups = bounds.shape[0] - 1
    b = k // n_groups
    grp = k - b * n_groups
    acc = 0.0
    for i in range(bounds[grp], bounds[grp + 1]):
        acc += x[b, i] * vec[b, i]
    out[b, grp] = l2[b, grp] * acc


@_per_thread
def mean_rows(k, losses, n_examples, out):
    """Thread b: ``out[b] = mean(losses[b, :n_examples])`` (summed in order)."""
    acc = 0.0
    for m in range(n_examples):
        acc += losses[k, m]
    out[k] = acc / n_examples


@_per_thread
def group_dot(k, a, c, e, use_e, bounds, out, t):
    """Thread (b, group): ``out[b, t, group] = sum(a * (c + e))`` over the group (``a * c``
    without ``use_e``), summed in order."""
    n_groups = bounds.shape[0] - 1
    b = k // n_groups
    grp = k - b * n_groups
    acc = 0.0
    if use_e:
        for i in range(bounds[grp], bounds[grp + 1]):
            acc += a[b, i] * (c[b, i] + e[b, i])
    else:
        for i in range(bounds[grp], bounds[grp + 1]):
            acc += a[b, i] * c[b, i]
    out[b, t, grp] = acc


@_per_thread
def velocity_cotangent(k, d_v, d_x, alphas, t, groups):
    """Thread (b, i): ``d_v += alpha * d_x`` with alpha = ``alphas[b, t, group(i)]``."""
    n_params = d_v.shape[1]
    b = k // n_params
    i = k - b * n_params
    d_v[b, i] += alphas[b, t, groups[i]] * d_x[b, i]


@_per_thread
def hvp_direction(k, vec, d_v, betas, t, groups):
    """Thread (b, i): ``vec = -(1 - beta) * d_v``, beta the effective decay of step t."""
    n_params = d_v.shape[1]
    b = k // n_params
    i = k - b * n_params
    vec[b, i] = -(1.0 - betas[b, t, groups[i]]) * d_v[b, i]


@_per_thread
def after_hvp(k, d_x, hx, d_v, betas, t, groups):
    """Thread (b, i): ``d_x += hx``; ``d_v *= beta``."""
    n_params = d_v.shape[1]
    b = k // n_params
    i = k - b * n_params
    d_x[b, i] += hx[b, i]
    d_v[b, i] *= betas[b, t, groups[i]]


@_per_thread
def add_flat(k, dst, src):
    """Thread k: ``dst[k] += src[k]`` (1-D views)."""
    dst[k] += src[k]


# ------------------------------------------------- the wrappers, generated
# Each per-thread function is wrapped twice from one template: as a CPU loop over
# the threads, ``name_cpu(n_threads, *args)``, and as a CUDA kernel with one thread
# per index, ``name_gpu(n_threads, *args)``.  The wrappers spell out the function's
# own parameters (CUDA kernels take no ``*args``), read from its signature.
_TEMPLATES = {
    "cpu": """
def {name}_cpu(n_threads, {params}):
    for k in range(n_threads):
        {name}(k, {params})
""",
    "gpu": """
def {name}_gpu(n_threads, {params}):
    k = np.int64(cuda.grid(1))
    if k < n_threads:
        {name}(k, {params})
""",
}


def _wrapper(target, name):
    """The plain Python wrapper ``name_<target>`` of per-thread function ``name``.

    It is defined in this module's globals (the simulator swaps the globals of
    kernels, and numba's cache locates a function by its file), under a name of
    its own, so that each wrapper has its own cache entry.
    """
    params = ", ".join(list(inspect.signature(_PER_THREAD[name]).parameters)[1:])
    source = _TEMPLATES[target].format(name=name, params=params)
    exec(compile(source, __file__, "exec"), globals())  # noqa: S102 - our own template
    return globals()[f"{name}_{target}"]


#: Every per-thread function, by name; ``cpu_loops().name`` and ``gpu_kernels().name``
#: run it.
KERNEL_NAMES = tuple(_PER_THREAD)


@functools.lru_cache(maxsize=None)
def cpu_loops():
    """The CPU twins, as a namespace ``name -> loop(n_threads, *args)`` (``@njit``, cached
    on disk), built on first use."""
    return types.SimpleNamespace(**{name: njit(cache=True)(_wrapper("cpu", name))
                                    for name in KERNEL_NAMES})


@functools.lru_cache(maxsize=None)
def gpu_kernels():
    """The CUDA kernels, as a namespace ``name -> kernel(n_threads, *args)``.

    Built on first use, so the CPU twins work even where ``numba.cuda`` cannot be
    imported.  Compilation happens at the first launch of each kernel.  Launch with
    ``hypergrad_fast.engine._gpu_kernels.launch(kernel, n_threads, n_threads, *args)``.
    """
    global cuda
    from ..engine.gpu import _cuda_module, _why_no_gpu

    cuda = _cuda_module()
    if cuda is None:  # pragma: no cover - depends on the installation
        raise RuntimeError(_why_no_gpu())
    return types.SimpleNamespace(**{name: cuda.jit(_wrapper("gpu", name))
                                    for name in KERNEL_NAMES})
