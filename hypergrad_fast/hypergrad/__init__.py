"""Hypergradients: Algorithms 1 and 2 once (``algorithm``), and the two ways to call them.

:func:`sgd` is an autograd primitive for one training run of any objective, and
:func:`adam` its twin for Adam;
:func:`sweep` trains and reverses B hyperparameter settings of a built-in model
together, on the CPU or a GPU (``_cuda``), or in chunks on a Dask cluster (``_dask``).
"""

from ._dask import SchedulerLostError, local_cluster
from .adam import adam
from .algorithm import SgdRecovery
from .sgd import sgd
from .sweep import SweepResult, sweep

__all__ = ["SchedulerLostError", "SgdRecovery", "SweepResult", "adam", "local_cluster", "sgd",
           "sweep"]
