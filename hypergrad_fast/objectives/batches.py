"""Which training examples iteration t uses: a pure function of t.

The reverse pass recomputes the gradient of iteration t, so the minibatch of
iteration t must be the same every time it is asked for.  :func:`minibatch` draws
epochs of a seeded permutation; :func:`check_batches` validates an explicit
(T, batch_size) table of example indices.
"""

import functools
import numbers

import numpy as np

__all__ = ["minibatch", "check_batches", "check_int"]


@functools.lru_cache(maxsize=16)
def _epoch_permutation(seed: int, epoch: int, n_examples: int) -> np.ndarray:
    # Cached because the reverse pass asks for the same epochs again; read-only
    # so no caller can corrupt the shared copy.
    perm = np.random.default_rng((seed, epoch)).permutation(n_examples)
    perm.flags.writeable = False
    return perm


def check_int(name, value, minimum) -> int:
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
    t = check_int("t", t, 0)
    n_examples = check_int("n_examples", n_examples, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    start = t * batch_size
    first, last = start // n_examples, (start + batch_size - 1) // n_examples
    if first == last:  # within one epoch: a slice of its permutation
        at = start - first * n_examples
        return _epoch_permutation(seed, first, n_examples)[at:at + batch_size].astype(np.int64)
    positions = np.arange(start, start + batch_size, dtype=np.int64)
    epochs = positions // n_examples
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
        in_epoch = epochs == epoch
        perm = _epoch_permutation(seed, epoch, n_examples)
        out[in_epoch] = perm[positions[in_epoch] % n_examples]
    return out


def check_batches(batches, n_examples: int) -> np.ndarray:
    """A (T, batch_size) table of example indices as read-only int64, checked.

    Raises ValueError naming ``batches`` when it is not 2-D with T, batch_size >= 1,
    not integer, or holds an index outside [0, n_examples).
    """
    a = np.asarray(batches)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"batches must be a (T, batch_size) int array with T, batch_size >= 1, "
                         f"got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"batches must hold integer example indices, got dtype {a.dtype}")
    bad = np.argwhere((a < 0) | (a >= n_examples))
    if len(bad):
        t, m = bad[0]
        raise ValueError(f"batches[{t}, {m}] = {a[t, m]} is outside [0, {n_examples}) "
                         f"(the number of training examples)")
    out = np.array(a, dtype=np.int64)
    out.flags.writeable = False
    return out
