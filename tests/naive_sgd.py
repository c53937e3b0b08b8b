"""The naive hypergradient reference: autograd straight through an unrolled loop.

It stores every iterate (memory linear in T) and is obviously correct: the same
recursion as ``hypergrad_fast.sgd`` in float64, ``v <- beta v - (1-beta) g;
x <- x + alpha v``, v0 = 0.  Pass effective betas to compare with ``sgd``.
"""

import autograd.numpy as anp
from autograd import grad


def unrolled_sgd(loss, x0, alphas, betas, meta=None, *, groups=None):
    """x_T by the plain loop; differentiable in every argument by autograd."""
    loss_grad = grad(loss)
    x, v = x0, anp.zeros(x0.shape[0])
    for t in range(alphas.shape[0]):
        g = loss_grad(x, meta, t)
        a = alphas[t] if anp.ndim(alphas[t]) == 0 else alphas[t][groups]
        b = betas[t] if anp.ndim(betas[t]) == 0 else betas[t][groups]
        v = b * v - (1.0 - b) * g
        x = x + a * v
    return x
