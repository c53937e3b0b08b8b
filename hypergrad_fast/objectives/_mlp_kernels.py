"""Compiled gradient and Hessian-vector product of the built-in MLP losses (CPU, Numba).

One minibatch of a fully connected classifier (tanh or ReLU hidden layers, a linear
top layer, softmax cross-entropy averaged over the batch), on a flat parameter
vector laid out as :class:`~hypergrad_fast.objectives.layout.ParamLayout` lays out
``W0, b0, W1, b1, ...`` (``W_l`` of shape (n_in, n_out), row-major).  Matrix
products go to BLAS through ``np.dot`` (SciPy's ``cython_blas``); the element-wise
work around them is fused into plain loops.  No fast-math: the reverse pass
recomputes every gradient, which must be the same bits as in the forward pass.

:func:`grad_hvp` computes the gradient ``g`` of the loss and, for a direction ``u``
in parameter space, ``H u`` (Pearlmutter's R-operator, forward over reverse written
out) and ``d/dX (g . u)`` for the batch's inputs ``X``: the gradient pass
(:func:`_grad_tape`, which :func:`value_grad` is too), then the R pass
(:func:`_hvp_from_tape`) on the activations and deltas the gradient pass kept.  Only
the products that ``u`` needs are taken: the gradient pass costs two products with
the widest layer, both passes four.  Run apart (:func:`batch_grad_tape`, then
:func:`batch_hvp_tape`), the two passes serve a direction that depends on ``g``.

Layout arrays (int64): ``sizes`` (L+1,) layer widths, ``w_off`` and ``b_off`` (L,)
the flat offsets of ``W_l`` and ``b_l``.  ``relu`` selects the hidden activation.
"""

import math

import numpy as np
from numba import njit, prange

#: ``cols`` for "every input column": no compaction (see :func:`active_columns`).
ALL_COLUMNS = np.empty(0, dtype=np.int64)

__all__ = ["ALL_COLUMNS", "active_columns", "gather_rows", "value_only", "value_grad",
           "value_grad_all", "grad_hvp", "l2_value_grad", "l2_grad_hvp",
           "batch_value_grad", "batch_grad_hvp", "value_grad_rows", "grad_hvp_rows",
           "tape_size", "batch_grad_tape", "batch_hvp_tape", "l2_hvp"]


@njit(cache=True, nogil=True)
def gather_rows(source, idx, out):
    """``out[:] = source[idx]`` (rows may repeat); returns ``out``."""
    for m in range(idx.shape[0]):
        out[m, :] = source[idx[m], :]
    return out


@njit(cache=True, nogil=True)
def _weights(x, w_off, b_off, sizes, layer):
    n_in, n_out = sizes[layer], sizes[layer + 1]
    start = w_off[layer]
    return (x[start:start + n_in * n_out].reshape((n_in, n_out)),
            x[b_off[layer]:b_off[layer] + n_out])


@njit(cache=True, nogil=True)
def _affine(h, w, bias):
    """``h @ w + bias`` (a new array)."""
    z = np.dot(h, w)
    for m in range(z.shape[0]):
        for j in range(z.shape[1]):
            z[m, j] += bias[j]
    return z


# ---------------------------------------------------------------- inputs' zero columns
# Pixel data has columns that are zero in every row of a minibatch (MNIST: about a
# third of the pixels of 100 digits).  The two products with the inputs then run on
# the other columns alone, ``X[:, cols] @ W0[cols]`` and ``X[:, cols].T @ delta``,
# whose sums hold the same nonzero terms.  Whether and how a minibatch is compacted
# depends on its rows alone, so the forward pass's gradient and the reverse pass's
# recomputation of it take the same path and give the same bits.
COMPACT_MAX_SHARE = 0.875  # compact when at most this share of the columns is active


@njit(cache=True, nogil=True)
def active_columns(source, rows):
    """The columns with a nonzero entry in the rows ``rows`` of ``source``, or an empty array
    when there are more than COMPACT_MAX_SHARE of them (or none): then the products stay
    dense."""
    n_in = source.shape[1]
    active = np.zeros(n_in, dtype=np.uint8)
    for m in range(rows.shape[0]):
        row = source[rows[m]]
        for k in range(n_in):  # branch-free: vectorised
            active[k] |= np.uint8(row[k] != 0.0)
    n_active = 0
    for k in range(n_in):
        n_active += active[k]
    if n_active == 0 or n_active > COMPACT_MAX_SHARE * n_in:
        return np.empty(0, dtype=np.int64)
    cols = np.empty(n_active, dtype=np.int64)
    j = 0
    for k in range(n_in):
        if active[k]:
            cols[j] = k
            j += 1
    return cols


@njit(cache=True, nogil=True)
def _gather_columns(source, rows, cols):
    """``source[rows][:, cols]`` (a new array), without the full rows' copy."""
    out = np.empty((rows.shape[0], cols.shape[0]))
    for m in range(rows.shape[0]):
        row = source[rows[m]]
        for j in range(cols.shape[0]):
            out[m, j] = row[cols[j]]
    return out


@njit(cache=True, nogil=True)
def _take_rows(a, cols):
    out = np.empty((cols.shape[0], a.shape[1]))
    for j in range(cols.shape[0]):
        out[j, :] = a[cols[j], :]
    return out


@njit(cache=True, nogil=True)
def _layer_weights(x, w_off, b_off, sizes, layer, cols):
    """``W_l, b_l`` of ``x``; for layer 0 with ``cols``, the rows ``W0[cols]`` (a copy)."""
    w, bias = _weights(x, w_off, b_off, sizes, layer)
    if layer == 0 and cols.shape[0] > 0:
        return _take_rows(w, cols), bias
    return w, bias


@njit(cache=True, nogil=True)
def _weight_grad(h, delta, out, layer, cols):
    """``out = h.T @ delta``, the (n_in, n_out) gradient of a layer's weights; for layer 0
    with ``cols`` (``h`` holding those columns), rows ``cols`` of it and zeros."""
    if layer > 0 or cols.shape[0] == 0:
        np.dot(h.T, delta, out)
        return
    part = np.dot(h.T, delta)
    j = 0
    for k in range(out.shape[0]):  # each row written once (cols ascending)
        if j < cols.shape[0] and cols[j] == k:
            out[k, :] = part[j, :]
            j += 1
        else:
            out[k, :] = 0.0


# 1 / n! for n = 1 .. 13: Taylor coefficients of expm1 on |r| <= log(2) / 2, where the
# first term left out, r**14 / 14!, is below 2**-53 r.
_EXPM1 = np.array([1.0 / math.factorial(n) for n in range(1, 14)])
_LN2_HI = 6.93147180369123816490e-01  # log(2) in two parts: k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_TANH_CLIP = 20.0  # tanh(20) = 1 - 8.5e-18 rounds to 1.0


@njit(cache=True, nogil=True)
def _tanh_inplace(z):
    """``z = tanh(z)`` element-wise, in branch-free arithmetic that LLVM vectorises.

    ``math.tanh`` is a scalar C call per element (an eighth of NumPy's SIMD speed
    here).  This writes ``tanh(|z|) = -e / (2 + e)`` with ``e = expm1(-2|z|)``, and
    ``expm1(y) = 2**k q(r) + (2**k - 1)`` for ``y = k log 2 + r``, ``q`` the Taylor
    polynomial of expm1: about one ulp from the correctly rounded value, and as
    deterministic as any other arithmetic here.
    """
    flat = z.reshape(-1)
    n = flat.shape[0]
    q = np.empty(n)
    k = np.empty(n, dtype=np.int64)
    for i in range(n):
        y = -2.0 * min(abs(flat[i]), _TANH_CLIP)
        kf = math.floor(y * 1.4426950408889634 + 0.5)
        r = (y - kf * _LN2_HI) - kf * _LN2_LO
        acc = _EXPM1[12]
        for c in range(11, -1, -1):
            acc = acc * r + _EXPM1[c]
        q[i] = acc * r
        k[i] = np.int64(kf)
    bits = (k + np.int64(1023)) << np.int64(52)
    scale = bits.view(np.float64)
    for i in range(n):
        e = scale[i] * q[i] + (scale[i] - 1.0)
        flat[i] = math.copysign(-e / (2.0 + e), flat[i])


@njit(cache=True, nogil=True)
def _activate(z, relu):
    """The hidden activation in place: ``tanh(z)`` or ``max(z, 0)``."""
    if not relu:
        _tanh_inplace(z)
        return
    for m in range(z.shape[0]):
        for j in range(z.shape[1]):
            if z[m, j] < 0.0:
                z[m, j] = 0.0


@njit(cache=True, nogil=True)
def _forward(x, inputs, sizes, w_off, b_off, relu, cols):
    """Hidden activations ``hs`` (hs[0] = inputs) and the top layer's logits; ``inputs``
    holds only columns ``cols`` when that is not empty."""
    n_layers = sizes.shape[0] - 1
    hs = [inputs]
    h = inputs
    for layer in range(n_layers):
        w, bias = _layer_weights(x, w_off, b_off, sizes, layer, cols)
        h = _affine(h, w, bias)
        if layer < n_layers - 1:
            _activate(h, relu)
            hs.append(h)
    return hs, h


@njit(cache=True, nogil=True)
def _softmax_top(logits, targets, denom):
    """Cross-entropy summed over rows / ``denom``, the softmax ``p`` and the logits' delta
    ``(p * sum(t) - t) / denom`` (``denom`` is the whole batch's size, M).

    Per example the loss is ``logsumexp(z) * sum(t) - sum(t * z)`` (the cross-entropy
    of targets ``t``, one-hot or not), with the row maximum subtracted inside exp.
    """
    n_rows, n_out = logits.shape
    p = np.empty_like(logits)
    delta = np.empty_like(logits)
    total = 0.0
    for m in range(n_rows):
        top = logits[m, 0]
        for c in range(1, n_out):
            top = max(top, logits[m, c])
        s = 0.0
        for c in range(n_out):
            e = math.exp(logits[m, c] - top)
            p[m, c] = e
            s += e
        lse = top + math.log(s)
        t_sum = 0.0
        t_dot = 0.0
        for c in range(n_out):
            p[m, c] /= s
            t_sum += targets[m, c]
            t_dot += targets[m, c] * logits[m, c]
        total += lse * t_sum - t_dot
        for c in range(n_out):
            delta[m, c] = (p[m, c] * t_sum - targets[m, c]) / denom
    return total / denom, p, delta


@njit(cache=True, nogil=True)
def _bias_grad(delta, out):
    """``out[j] = sum over rows of delta[:, j]``, rows in order."""
    for j in range(delta.shape[1]):
        out[j] = 0.0
    for m in range(delta.shape[0]):
        for j in range(delta.shape[1]):
            out[j] += delta[m, j]


@njit(cache=True, nogil=True)
def _back_through(d_h, h, relu):
    """The delta of a hidden layer's input from the delta ``d_h`` of its output ``h``."""
    out = np.empty_like(d_h)
    for m in range(d_h.shape[0]):
        for j in range(d_h.shape[1]):
            if relu:
                out[m, j] = d_h[m, j] if h[m, j] > 0.0 else 0.0
            else:
                out[m, j] = d_h[m, j] * (1.0 - h[m, j] * h[m, j])
    return out


@njit(cache=True, nogil=True)
def _n_wrong(logits, targets):
    """Rows whose largest logit is not at their target's largest entry (the first of
    equal ones, as ``np.argmax``): misclassified examples for one-hot targets."""
    wrong = 0
    for m in range(logits.shape[0]):
        guess, label = 0, 0
        for c in range(1, logits.shape[1]):
            if logits[m, c] > logits[m, guess]:
                guess = c
            if targets[m, c] > targets[m, label]:
                label = c
        wrong += guess != label
    return wrong


@njit(cache=True, nogil=True, parallel=True)
def value_only(x, inputs, targets, sizes, w_off, b_off, relu, cols):
    """``(mean cross-entropy, misclassified rows)`` of ``inputs`` against ``targets``, no
    gradient; ``inputs`` and ``cols`` as in :func:`value_grad`.

    From PARTS_MIN_ROWS rows, the rows' two halves run on two cores and their sums
    are added in order (the split depends on the number of rows alone)."""
    n_rows = inputs.shape[0]
    parts = n_parts(n_rows)
    sums = np.empty(parts)
    wrong = np.empty(parts, dtype=np.int64)
    for h in prange(parts):
        lo, hi = _part_rows(n_rows, parts, h)
        _, logits = _forward(x, inputs[lo:hi], sizes, w_off, b_off, relu, cols)
        sums[h], _, _ = _softmax_top(logits, targets[lo:hi], 1.0)
        wrong[h] = _n_wrong(logits, targets[lo:hi])
    total = sums[0]
    for h in range(1, parts):
        total += sums[h]
    return total / n_rows, wrong.sum()


@njit(cache=True, nogil=True)
def _grad_tape(x, inputs, targets, sizes, w_off, b_off, relu, g, denom, cols):
    """The gradient pass of :func:`value_grad`, returning what the R pass reuses:
    ``(value, hs, p, deltas, d_hs)`` with ``hs`` the layers' inputs (hs[0] = inputs),
    ``p`` the softmax, ``deltas[l]`` dloss/dz of layer l's pre-activation and ``d_hs[l]``
    dloss/dh of hidden layer l's output (``d_hs[0]`` an unused placeholder)."""
    n_layers = sizes.shape[0] - 1
    hs, logits = _forward(x, inputs, sizes, w_off, b_off, relu, cols)
    value, p, delta = _softmax_top(logits, targets, denom)
    deltas = [delta] * n_layers
    d_hs = [delta] * n_layers
    for layer in range(n_layers - 1, -1, -1):
        w, _ = _weights(x, w_off, b_off, sizes, layer)
        g_w, g_b = _weights(g, w_off, b_off, sizes, layer)
        _weight_grad(hs[layer], delta, g_w, layer, cols)
        _bias_grad(delta, g_b)
        deltas[layer] = delta
        if layer > 0:
            d_h = np.dot(delta, w.T)
            d_hs[layer] = d_h
            delta = _back_through(d_h, hs[layer], relu)
    return value, hs, p, deltas, d_hs


@njit(cache=True, nogil=True)
def value_grad(x, inputs, targets, sizes, w_off, b_off, relu, g, denom, cols):
    """The rows' cross-entropy summed / ``denom``; writes its gradient in x into ``g`` (N,).

    ``inputs`` holds only the columns ``cols`` of the rows when ``cols`` is not empty
    (the others being zero: :func:`active_columns`)."""
    return _grad_tape(x, inputs, targets, sizes, w_off, b_off, relu, g, denom, cols)[0]


@njit(cache=True, nogil=True, parallel=True)
def value_grad_all(x, inputs, targets, sizes, w_off, b_off, relu, g, cols):
    """The mean cross-entropy of all of ``inputs`` (a validation set) and its gradient in x,
    written into ``g``: :func:`value_only`'s halves of the rows on two cores, each
    differentiated by :func:`value_grad`, the halves' sums added in order; ``inputs``
    and ``cols`` as in :func:`value_grad`."""
    n_rows = inputs.shape[0]
    parts = n_parts(n_rows)
    g_parts, values = np.empty((parts, x.shape[0])), np.empty(parts)
    for h in prange(parts):
        lo, hi = _part_rows(n_rows, parts, h)
        values[h] = value_grad(x, inputs[lo:hi], targets[lo:hi], sizes, w_off, b_off, relu,
                               g_parts[h], n_rows, cols)
    return _total_value_grad(g_parts, values, np.empty(0), x, g)


@njit(cache=True, nogil=True)
def _hvp_from_tape(x, u, targets, hs, p, deltas, d_hs, sizes, w_off, b_off, relu, want_inputs,
                   hu, d_inputs, denom, cols):
    """The R pass: ``hu = H u`` (and with ``want_inputs`` ``d_inputs``) from the gradient
    pass's :func:`_grad_tape` at the same x, rows and ``cols``."""
    n_layers = sizes.shape[0] - 1
    # R pass forward: r_hs[l] = R{hs[l]} (zero for the inputs), r_h ends as R{logits}.
    r_h = np.empty((0, 0))
    r_hs = [r_h]  # R of the inputs is zero: this entry is never read
    for layer in range(n_layers):
        w, _ = _weights(x, w_off, b_off, sizes, layer)
        w_u, b_u = _layer_weights(u, w_off, b_off, sizes, layer, cols)
        r_z = _affine(hs[layer], w_u, b_u)
        if layer > 0:
            r_z += np.dot(r_h, w)
        if layer < n_layers - 1:
            h = hs[layer + 1]
            for m in range(r_z.shape[0]):
                for j in range(r_z.shape[1]):
                    if relu:
                        if h[m, j] <= 0.0:
                            r_z[m, j] = 0.0
                    else:
                        r_z[m, j] *= 1.0 - h[m, j] * h[m, j]
            r_hs.append(r_z)
        r_h = r_z
    n_rows, n_out = p.shape
    r_delta = np.empty_like(p)
    for m in range(n_rows):
        t_sum = 0.0
        mean_r = 0.0
        for c in range(n_out):
            t_sum += targets[m, c]
            mean_r += p[m, c] * r_h[m, c]
        for c in range(n_out):
            r_delta[m, c] = t_sum * p[m, c] * (r_h[m, c] - mean_r) / denom
    for layer in range(n_layers - 1, -1, -1):
        w, _ = _weights(x, w_off, b_off, sizes, layer)
        w_u, _ = _weights(u, w_off, b_off, sizes, layer)
        h_w, h_b = _weights(hu, w_off, b_off, sizes, layer)
        delta = deltas[layer]
        _weight_grad(hs[layer], r_delta, h_w, layer, cols)
        if layer > 0:
            h_w += np.dot(r_hs[layer].T, delta)
        _bias_grad(r_delta, h_b)
        if layer == 0 and not want_inputs:
            break
        r_d_h = np.dot(r_delta, w.T)
        r_d_h += np.dot(delta, w_u.T)
        if layer == 0:
            d_inputs[:, :] = r_d_h
            break
        h, r_h, d_h = hs[layer], r_hs[layer], d_hs[layer]
        new_r_delta = _back_through(r_d_h, h, relu)
        if not relu:
            for m in range(h.shape[0]):
                for j in range(h.shape[1]):
                    new_r_delta[m, j] -= 2.0 * d_h[m, j] * h[m, j] * r_h[m, j]
        r_delta = new_r_delta


@njit(cache=True, nogil=True)
def grad_hvp(x, u, inputs, targets, sizes, w_off, b_off, relu, want_inputs, g, hu, d_inputs,
             denom, cols):
    """Gradient ``g`` and ``hu = H u`` of the rows' cross-entropy summed / ``denom``, in place.

    With ``want_inputs``, also writes ``d_inputs`` (M, n_in) = d/dX (g . u), the
    mixed second derivative through the batch's inputs (for learned training data).
    ``inputs`` and ``cols`` as in :func:`value_grad`.  Returns the loss value.
    """
    value, hs, p, deltas, d_hs = _grad_tape(x, inputs, targets, sizes, w_off, b_off, relu, g,
                                            denom, cols)
    _hvp_from_tape(x, u, targets, hs, p, deltas, d_hs, sizes, w_off, b_off, relu, want_inputs,
                   hu, d_inputs, denom, cols)
    return value


@njit(cache=True, nogil=True)
def l2_value_grad(lam, x, g):
    """The penalty ``0.5 * sum(lam * x**2)`` (summed in order); adds ``lam * x`` to ``g``."""
    total = 0.0
    for i in range(x.shape[0]):
        total += lam[i] * x[i] * x[i]
        g[i] += lam[i] * x[i]
    return 0.5 * total


@njit(cache=True, nogil=True)
def l2_grad_hvp(lam, x, u, g, hu, bounds, d_log_l2):
    """Adds the penalty's ``lam * x`` to ``g``, then :func:`l2_hvp`."""
    for i in range(x.shape[0]):
        g[i] += lam[i] * x[i]
    l2_hvp(lam, x, u, hu, bounds, d_log_l2)


@njit(cache=True, nogil=True)
def l2_hvp(lam, x, u, hu, bounds, d_log_l2):
    """Adds the penalty's ``lam * u`` to ``hu``; with ``d_log_l2`` not empty, adds
    ``d/dlog(lam) (g . u) = lam * x * u`` to it, per group between ``bounds`` (G+1,) when
    those are given, else per weight."""
    for i in range(x.shape[0]):
        hu[i] += lam[i] * u[i]
    if d_log_l2.shape[0] == 0:
        return
    if bounds.shape[0] == 0:
        for i in range(x.shape[0]):
            d_log_l2[i] += lam[i] * x[i] * u[i]
        return
    for grp in range(bounds.shape[0] - 1):
        acc = 0.0
        for i in range(bounds[grp], bounds[grp + 1]):
            acc += lam[i] * x[i] * u[i]
        d_log_l2[grp] += acc


# ---------------------------------------------------------------- a minibatch in parts
# A minibatch of M >= PARTS_MIN_ROWS rows is split into two halves of rows, each
# differentiated on its own core; the halves' sums are added in a fixed order.  The
# split depends on M alone, so the forward pass's gradient and the reverse pass's
# recomputation of it are the same bits, whichever function computes them.
PARTS_MIN_ROWS = 32


@njit(cache=True, nogil=True)
def n_parts(n_rows):
    return 2 if n_rows >= PARTS_MIN_ROWS else 1


@njit(cache=True, nogil=True)
def _part_rows(n_rows, parts, h):
    """First and end row of part h of a minibatch of ``n_rows`` rows."""
    return (n_rows * h) // parts, (n_rows * (h + 1)) // parts


@njit(cache=True, nogil=True)
def _part(idx, parts, h, source, targets):
    """Rows of part h of the minibatch ``idx``: (inputs, targets, first row, end row,
    cols), the inputs compacted to their :func:`active_columns` ``cols``."""
    lo, hi = _part_rows(idx.shape[0], parts, h)
    sub = idx[lo:hi]
    cols = active_columns(source, sub)
    if cols.shape[0] > 0:
        inputs = _gather_columns(source, sub, cols)
    else:
        inputs = gather_rows(source, sub, np.empty((hi - lo, source.shape[1])))
    return (inputs, gather_rows(targets, sub, np.empty((hi - lo, targets.shape[1]))), lo, hi,
            cols)


@njit(cache=True, nogil=True)
def _part_value_grad(h, parts, x, source, targets, idx, sizes, w_off, b_off, relu, g_parts,
                     values):
    inputs, batch_targets, _, _, cols = _part(idx, parts, h, source, targets)
    values[h] = value_grad(x, inputs, batch_targets, sizes, w_off, b_off, relu, g_parts[h],
                           idx.shape[0], cols)


@njit(cache=True, nogil=True)
def _part_grad_hvp(h, parts, x, u, source, targets, idx, sizes, w_off, b_off, relu,
                   want_inputs, g_parts, hu_parts, d_inputs):
    inputs, batch_targets, lo, hi, cols = _part(idx, parts, h, source, targets)
    grad_hvp(x, u, inputs, batch_targets, sizes, w_off, b_off, relu, want_inputs, g_parts[h],
             hu_parts[h], d_inputs[lo:hi] if want_inputs else d_inputs, idx.shape[0], cols)


@njit(cache=True, nogil=True)
def _sum_parts(parts, out):
    """``out = parts[0] + parts[1] + ...``, in that order (one pass over ``out``)."""
    if parts.shape[0] == 1:
        out[:] = parts[0]
        return
    for i in range(out.shape[0]):  # two parts (the kernels' case): one vectorised pass
        acc = parts[0, i] + parts[1, i]
        for h in range(2, parts.shape[0]):
            acc += parts[h, i]
        out[i] = acc


@njit(cache=True, nogil=True)
def _total_value_grad(g_parts, values, lam, x, g):
    """The parts' gradients and values added in order into ``g`` and the returned value,
    plus the penalty ``0.5 sum(lam x**2)`` and its gradient when ``lam`` is not empty."""
    _sum_parts(g_parts, g)
    value = values[0]
    for h in range(1, values.shape[0]):
        value += values[h]
    if lam.shape[0] > 0:
        value += l2_value_grad(lam, x, g)
    return value


@njit(cache=True, nogil=True, parallel=True)
def batch_value_grad(x, source, targets, idx, sizes, w_off, b_off, relu, lam, g):
    """Mean cross-entropy of minibatch ``idx`` of (source, targets), plus the penalty
    ``0.5 sum(lam x**2)`` when ``lam`` is not empty; its gradient written into ``g``."""
    parts = n_parts(idx.shape[0])
    g_parts, values = np.empty((parts, x.shape[0])), np.empty(parts)
    for h in prange(parts):
        _part_value_grad(h, parts, x, source, targets, idx, sizes, w_off, b_off, relu, g_parts,
                         values)
    return _total_value_grad(g_parts, values, lam, x, g)


@njit(cache=True, nogil=True, parallel=True)
def batch_grad_hvp(x, u, source, targets, idx, sizes, w_off, b_off, relu, want_inputs, lam,
                   bounds, g, hu, d_inputs, d_log_l2):
    """Gradient and ``H u`` of :func:`batch_value_grad`'s loss, written into ``g``, ``hu``;
    with ``want_inputs``, ``d_inputs`` (M, n_in) = d/dX (g . u) of the minibatch's
    rows; :func:`l2_grad_hvp` adds the penalty's terms (and to ``d_log_l2``)."""
    parts = n_parts(idx.shape[0])
    g_parts, hu_parts = np.empty((parts, x.shape[0])), np.empty((parts, x.shape[0]))
    for h in prange(parts):
        _part_grad_hvp(h, parts, x, u, source, targets, idx, sizes, w_off, b_off, relu,
                       want_inputs, g_parts, hu_parts, d_inputs)
    _sum_parts(g_parts, g)
    _sum_parts(hu_parts, hu)
    if lam.shape[0] > 0:
        l2_grad_hvp(lam, x, u, g, hu, bounds, d_log_l2)


# ---------------------------------------------------------------- B runs at once
# Row b is what batch_value_grad / batch_grad_hvp give for row b's inputs (the same
# parts in the same order, one after the other), so a setting's bits do not depend
# on the others; the rows go to the cores instead of the parts.
@njit(cache=True, nogil=True, parallel=True)
def value_grad_rows(x, source, targets, idx, sizes, w_off, b_off, relu, lam, g, values):
    """Rows of :func:`batch_value_grad` (``lam`` (B, N) or empty); ``values`` (B,) written."""
    parts = n_parts(idx.shape[0])
    for b in prange(x.shape[0]):
        g_parts, part_values = np.empty((parts, x.shape[1])), np.empty(parts)
        for h in range(parts):
            _part_value_grad(h, parts, x[b], source, targets, idx, sizes, w_off, b_off, relu,
                             g_parts, part_values)
        values[b] = _total_value_grad(g_parts, part_values,
                                      lam[b] if lam.shape[0] > 0 else np.empty(0), x[b], g[b])


@njit(cache=True, nogil=True, parallel=True)
def grad_hvp_rows(x, u, source, targets, idx, sizes, w_off, b_off, relu, lam, bounds, g, hu,
                  d_log_l2):
    """Rows of :func:`batch_grad_hvp` without learned inputs; adds to ``d_log_l2[b]``."""
    parts = n_parts(idx.shape[0])
    no_inputs = np.empty((0, 0))
    for b in prange(x.shape[0]):
        g_parts, hu_parts = np.empty((parts, x.shape[1])), np.empty((parts, x.shape[1]))
        for h in range(parts):
            _part_grad_hvp(h, parts, x[b], u[b], source, targets, idx, sizes, w_off, b_off,
                           relu, False, g_parts, hu_parts, no_inputs)
        _sum_parts(g_parts, g[b])
        _sum_parts(hu_parts, hu[b])
        if lam.shape[0] > 0:
            l2_grad_hvp(lam[b], x[b], u[b], g[b], hu[b], bounds,
                        d_log_l2[b] if d_log_l2.shape[0] > 0 else np.empty(0))


# ---------------------------------------------------------------- the gradient, then H u
# Adam's reverse pass needs H u for a u that depends on the gradient itself.  Instead
# of a gradient pass and then a whole grad_hvp (which runs the gradient pass again),
# batch_grad_tape runs the gradient pass and keeps, per part, what the R pass reads
# (a "tape" in a flat buffer); the caller forms u from g; batch_hvp_tape runs the R
# pass on the tape.  The two halves are _grad_tape and _hvp_from_tape, the functions
# that grad_hvp runs back to back: g and H u are the bits of batch_value_grad and
# batch_grad_hvp.
@njit(cache=True, nogil=True)
def tape_size(sizes, n_rows, n_in):
    """Floats of one part's tape for a minibatch of ``n_rows`` rows: the inputs, each
    hidden layer's output and its delta, the softmax, each layer's delta."""
    n_layers = sizes.shape[0] - 1
    rows = (n_rows + n_parts(n_rows) - 1) // n_parts(n_rows)
    per_row = n_in + sizes[n_layers]
    for layer in range(1, n_layers):
        per_row += 2 * sizes[layer]
    for layer in range(n_layers):
        per_row += sizes[layer + 1]
    return rows * per_row


@njit(cache=True, nogil=True)
def _carve(buf, off, rows, width):
    """The (rows, width) C-contiguous view of ``buf`` at ``off``, and the next offset."""
    return buf[off:off + rows * width].reshape((rows, width)), off + rows * width


@njit(cache=True, nogil=True)
def _tape_views(buf, col_buf, rows, sizes):
    """One part's tape as (cols, hs, p, deltas, d_hs) views of its buffers, ``hs[0]`` the
    (compacted) inputs (``col_buf`` = [number of cols, cols...])."""
    n_layers = sizes.shape[0] - 1
    n_cols = col_buf[0]
    cols = col_buf[1:1 + n_cols]
    inputs, off = _carve(buf, 0, rows, n_cols if n_cols > 0 else sizes[0])
    hs = [inputs]
    for layer in range(1, n_layers):
        h, off = _carve(buf, off, rows, sizes[layer])
        hs.append(h)
    p, off = _carve(buf, off, rows, sizes[n_layers])
    deltas = [p] * n_layers
    d_hs = [p] * n_layers  # d_hs[0] is never read
    for layer in range(n_layers):
        delta, off = _carve(buf, off, rows, sizes[layer + 1])
        deltas[layer] = delta
    for layer in range(1, n_layers):
        d_h, off = _carve(buf, off, rows, sizes[layer])
        d_hs[layer] = d_h
    return cols, hs, p, deltas, d_hs


@njit(cache=True, nogil=True)
def _save_tape(buf, col_buf, sizes, cols, hs, p, deltas, d_hs):
    col_buf[0] = cols.shape[0]
    col_buf[1:1 + cols.shape[0]] = cols
    _, t_hs, t_p, t_deltas, t_d_hs = _tape_views(buf, col_buf, p.shape[0], sizes)
    for layer in range(len(hs)):
        t_hs[layer][:, :] = hs[layer]
        t_deltas[layer][:, :] = deltas[layer]
        if layer > 0:
            t_d_hs[layer][:, :] = d_hs[layer]
    t_p[:, :] = p


@njit(cache=True, nogil=True, parallel=True)
def batch_grad_tape(x, source, targets, idx, sizes, w_off, b_off, relu, lam, g, tape, tape_cols):
    """:func:`batch_value_grad`, also writing part h's tape into ``tape[h]`` and
    ``tape_cols[h]`` ((parts, :func:`tape_size`) float64 and (parts, n_in + 1) int64)."""
    parts = n_parts(idx.shape[0])
    g_parts, values = np.empty((parts, x.shape[0])), np.empty(parts)
    for h in prange(parts):
        inputs, batch_targets, _, _, cols = _part(idx, parts, h, source, targets)
        value, hs, p, deltas, d_hs = _grad_tape(x, inputs, batch_targets, sizes, w_off, b_off,
                                                relu, g_parts[h], idx.shape[0], cols)
        values[h] = value
        _save_tape(tape[h], tape_cols[h], sizes, cols, hs, p, deltas, d_hs)
    return _total_value_grad(g_parts, values, lam, x, g)


@njit(cache=True, nogil=True, parallel=True)
def batch_hvp_tape(x, u, targets, idx, sizes, w_off, b_off, relu, want_inputs, lam, bounds,
                   tape, tape_cols, hu, d_inputs, d_log_l2):
    """``hu = H u`` (and ``d_inputs``, ``d_log_l2`` as in :func:`batch_grad_hvp`) at the x
    and minibatch of the :func:`batch_grad_tape` call that wrote the tapes."""
    parts = n_parts(idx.shape[0])
    hu_parts = np.empty((parts, x.shape[0]))
    for h in prange(parts):
        lo, hi = _part_rows(idx.shape[0], parts, h)
        batch_targets = gather_rows(targets, idx[lo:hi], np.empty((hi - lo, targets.shape[1])))
        cols, hs, p, deltas, d_hs = _tape_views(tape[h], tape_cols[h], hi - lo, sizes)
        _hvp_from_tape(x, u, batch_targets, hs, p, deltas, d_hs, sizes, w_off, b_off, relu,
                       want_inputs, hu_parts[h], d_inputs[lo:hi] if want_inputs else d_inputs,
                       idx.shape[0], cols)
    _sum_parts(hu_parts, hu)
    if lam.shape[0] > 0:
        l2_hvp(lam, x, u, hu, bounds, d_log_l2)

