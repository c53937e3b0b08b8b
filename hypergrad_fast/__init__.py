"""hypergrad_fast: exact hypergradients by running SGD with momentum backwards.

After Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning" (ICML 2015).

Layers, bottom up: :mod:`.engine` (exact arithmetic, CPU and GPU kernels and
engines) -> :mod:`.objectives` (what training needs from a loss: autograd adapter,
compiled MLP losses) -> :mod:`.hypergrad` (Algorithms 1 and 2 once; ``sgd`` and
``sweep`` on them) -> :mod:`.models`, :mod:`.data`, :mod:`.metaopt`,
:mod:`.experiments` -> :mod:`.cli`.
"""

from .engine import (
    BatchedReversibleMomentum,
    EngineState,
    Prepared,
    ReversibleMomentum,
    beta_numerator,
    effective_beta,
    gpu_available,
    information_bound,
)
from .hypergrad import SgdRecovery, SweepResult, sgd, sweep

__all__ = [
    "BatchedReversibleMomentum",
    "gpu_available",
    "sgd",
    "sweep",
    "SgdRecovery",
    "SweepResult",
    "EngineState",
    "Prepared",
    "ReversibleMomentum",
    "beta_numerator",
    "effective_beta",
    "information_bound",
]
