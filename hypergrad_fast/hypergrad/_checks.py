"""Input checks shared by ``sgd`` and ``sweep``: each names the first offending element."""

import numpy as np

__all__ = ["format_index", "check_finite", "check_decays"]


def format_index(multi_index):
    """``(2, 5)`` -> ``"[2, 5]"``."""
    return "[" + ", ".join(str(int(i)) for i in multi_index) + "]"


def check_finite(name, a):
    """FloatingPointError naming the first non-finite element of array ``a``."""
    a = np.asarray(a)
    finite = np.isfinite(a)
    if not finite.all():
        i = np.unravel_index(np.argmin(finite), a.shape)
        raise FloatingPointError(f"{name}{format_index(i)} = {a[i]} is not finite")


def check_decays(name, a):
    """ValueError naming the first element of ``a`` outside (0, 1]."""
    a = np.asarray(a, dtype=np.float64)
    inside = (a > 0) & (a <= 1)
    if not inside.all():
        i = np.unravel_index(np.argmin(inside), a.shape)
        raise ValueError(f"{name}{format_index(i)} = {a[i]} is outside (0, 1]")
