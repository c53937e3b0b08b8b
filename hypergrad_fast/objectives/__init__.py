"""Training objectives: what Algorithms 1 and 2 need from a loss at iteration t.

``base`` states the interface and adapts any autograd loss; ``compiled`` holds the
built-in models' losses with Numba gradients and Hessian-vector products, and a
compiled validation loss
(``_mlp_kernels`` on the CPU, ``_gpu_mlp`` per-thread twins for the CUDA sweep);
``layout`` maps the flat parameter vector to named blocks; ``batches`` says which
examples iteration t uses.
"""

from .base import AutogradObjective, Objective, as_objective
from .batches import check_batches, minibatch
from .compiled import CompiledEvalLoss, CompiledMLPLoss
from .layout import ParamLayout

__all__ = ["AutogradObjective", "CompiledEvalLoss", "CompiledMLPLoss", "Objective",
           "ParamLayout", "as_objective", "check_batches", "minibatch"]
