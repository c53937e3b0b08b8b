"""hypergrad_fast: exact hypergradients by running SGD with momentum backwards.

After Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning" (ICML 2015).

Layers, bottom up: :mod:`.engine` (exact arithmetic, CPU and GPU kernels and
engines) -> :mod:`.objectives` (what training needs from a loss: autograd adapter,
compiled MLP losses) -> :mod:`.hypergrad` (Algorithms 1 and 2 once; ``sgd`` and
``sweep`` on them) -> :mod:`.models`, :mod:`.data`, :mod:`.metaopt`,
:mod:`.experiments` -> :mod:`.cli`.
"""

import importlib

#: Public name -> the module that defines it.  Imported on first use (PEP 562), so
#: that ``hypergrad-fast --help`` and a Ctrl-C at start-up do not wait for Numba.
_EXPORTS = {
    "AdamState": ".engine",
    "BatchedReversibleMomentum": ".engine",
    "EngineState": ".engine",
    "Prepared": ".engine",
    "ReversibleAdam": ".engine",
    "ReversibleMomentum": ".engine",
    "beta_numerator": ".engine",
    "effective_beta": ".engine",
    "gpu_available": ".engine",
    "information_bound": ".engine",
    "SchedulerLostError": ".hypergrad",
    "SgdRecovery": ".hypergrad",
    "SweepResult": ".hypergrad",
    "adam": ".hypergrad",
    "sgd": ".hypergrad",
    "sweep": ".hypergrad",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hypergrad_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
