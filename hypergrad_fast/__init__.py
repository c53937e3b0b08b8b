"""hypergrad_fast: exact hypergradients by running SGD with momentum backwards.

After Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning" (ICML 2015).
"""

from .engine import (
    EngineState,
    Prepared,
    ReversibleMomentum,
    beta_numerator,
    effective_beta,
    information_bound,
)
from .gpu_engine import BatchedReversibleMomentum, gpu_available
from .sgd import sgd
from .sweep import SweepResult, sweep

__all__ = [
    "BatchedReversibleMomentum",
    "gpu_available",
    "sgd",
    "sweep",
    "SweepResult",
    "EngineState",
    "Prepared",
    "ReversibleMomentum",
    "beta_numerator",
    "effective_beta",
    "information_bound",
]
