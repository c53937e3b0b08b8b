"""What the forward and reverse passes need from a training loss, and its autograd adapter.

Algorithm 1 needs, at iteration t, the gradient of the training loss
``L(x, meta, t)`` in x; Algorithm 2 needs the same gradient again together with
the products of its Jacobians with a vector ``u`` that is known before the
gradient is (``H u = d/dx (g . u)`` and ``d/dmeta (g . u)``).  An
:class:`Objective` supplies exactly these two.  Any autograd ``loss(x, meta, t)``
becomes one through :class:`AutogradObjective`; the built-in models have compiled
ones (:mod:`.compiled`) that trace nothing at each step.

Both methods must be deterministic: the reverse pass recomputes each gradient
and hands it to the engine, which undoes the step only with the same bits.
"""

import contextlib

import numpy as np
from autograd import grad, make_vjp, value_and_grad
from autograd.extend import vspace

__all__ = ["Objective", "AutogradObjective", "as_objective"]


class Objective:
    """A training loss at iteration t, as the forward and reverse passes use it.

    Subclasses implement :meth:`value_and_grad` and :meth:`grad_and_hvp`; ``meta``
    is the loss's other input (an array, an autograd container of arrays, or an
    empty array), handed over unchanged.
    """

    def value_and_grad(self, x, meta, t):
        """``(L(x, meta, t), dL/dx)``: a float and an (N,) float64 array."""
        raise NotImplementedError

    def grad_and_hvp(self, x, meta, t, u, d_meta):
        """``(g, H u, d_meta')`` at x: the gradient, its x-Jacobian times ``u``, and

        ``d_meta' = d_meta + d/dmeta (g . u)`` when ``d_meta`` is not None (it may be
        updated in place; use the returned value).  With ``d_meta=None`` the meta
        part is skipped and None returned.
        """
        raise NotImplementedError

    def grad_then_hvp(self, x, meta, t, direction, d_meta):
        """:meth:`grad_and_hvp` with ``u = direction(g)``, a function of the gradient at x
        itself (Adam's reverse pass): ``(g, H u, d_meta')``.  By default the gradient,
        then :meth:`grad_and_hvp` (which computes it again, the same bits); the compiled
        objectives run the gradient pass once."""
        _, g = self.value_and_grad(x, meta, t)
        _, hu, d_meta = self.grad_and_hvp(x, meta, t, direction(g), d_meta)
        return g, hu, d_meta

    def meta_zeros(self, meta):
        """A zero cotangent shaped like ``meta``."""
        return vspace(meta).zeros()

    def session(self):
        """A context manager that the passes hold around all their calls (the compiled
        objectives keep BLAS on one thread in it); by default it does nothing."""
        return contextlib.nullcontext()


class AutogradObjective(Objective):
    """Any ``loss(x, meta, t)`` written with ``autograd.numpy``, traced at every call."""

    def __init__(self, loss):
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(x, meta, t), got "
                            f"{type(loss).__name__}")
        self.loss = loss
        self._value_and_grad = value_and_grad(loss)
        self._grad_x = grad(loss)

    def value_and_grad(self, x, meta, t):
        try:
            return self._value_and_grad(x, meta, t)
        except TypeError:
            shape = np.shape(self.loss(x, meta, t))
            if shape != ():
                raise ValueError(f"loss must return a scalar, got shape {shape}") from None
            raise

    def grad_and_hvp(self, x, meta, t, u, d_meta):
        if d_meta is None:  # differentiate in x alone: no work spent on meta
            hvp, g = make_vjp(lambda x_: self._grad_x(x_, meta, t))(x)
            return g, hvp(u), None
        hvp, g = make_vjp(lambda xm: self._grad_x(xm[0], xm[1], t))((x, meta))
        h_x, h_meta = hvp(u)
        return g, h_x, vspace(meta).add(d_meta, h_meta)


def as_objective(loss) -> Objective:
    """``loss`` itself if it is an :class:`Objective`, else its autograd adapter."""
    return loss if isinstance(loss, Objective) else AutogradObjective(loss)
