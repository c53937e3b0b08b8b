"""The exact reversible engine: fixed-point arithmetic and information buffers.

``_arith`` holds the arithmetic once (rounding rule, rational decays, the coder);
``_cpu_kernels`` and ``_gpu_kernels`` compile it for ``@njit`` and ``@cuda.jit``;
``cpu`` and ``gpu`` wrap those kernels as engines with validation and rollback;
``adam`` is the exact reversible Adam engine on the same arithmetic (CPU).
"""

from .cpu import (
    EngineState,
    Prepared,
    ReversibleMomentum,
    beta_numerator,
    effective_beta,
    information_bound,
)
from .gpu import BatchedReversibleMomentum, gpu_available
from .adam import AdamState, ReversibleAdam

__all__ = [
    "AdamState",
    "BatchedReversibleMomentum",
    "EngineState",
    "Prepared",
    "ReversibleAdam",
    "ReversibleMomentum",
    "beta_numerator",
    "effective_beta",
    "gpu_available",
    "information_bound",
]
