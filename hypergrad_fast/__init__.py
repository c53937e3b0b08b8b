"""hypergrad_fast: exact hypergradients by running SGD with momentum backwards.

After Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning" (ICML 2015).
"""

from .engine import (
    EngineState,
    ReversibleMomentum,
    beta_numerator,
    effective_beta,
    information_bound,
)

__all__ = [
    "EngineState",
    "ReversibleMomentum",
    "beta_numerator",
    "effective_beta",
    "information_bound",
]
