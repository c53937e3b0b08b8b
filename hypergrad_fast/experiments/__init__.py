"""The paper's experiments, one module each, registered for the command line.

Each module defines ``EXPERIMENT`` (:class:`~._args.Experiment`); :data:`EXPERIMENTS`
maps subcommand names to them, in the order the CLI lists them, and the CLI and the
tests read it.  What they share (settings, data, the checkpointed meta-optimisation,
results.json with the gallery keys, figures, common flags) lives in :mod:`._runner`.

``schedules`` learned learning-rate schedules, momenta and init scales (with
``--optimizer adam``: Adam's alpha, b1 and b2 schedules);
``init-scales`` learned initial scales vs 1/sqrt(fan-in); ``l2-per-weight`` one L2
penalty per logistic-regression weight vs one shared; ``learned-data`` ten learned
training images vs ten real ones; ``multitask`` learned weight sharing across ten related tasks vs separate and tied
networks; ``chaos`` validation loss and its hypergradient on
a grid of learning rates, where the hypergradient turns rough near the best; ``search`` a
gradient-refined random or grid search of four hyperparameters, in process or on a Dask
cluster; ``all`` runs them all and writes an offline gallery.
"""

from ._args import Experiment
from .schedules import (QUICK, ConfigError, SchedulesConfig, SchedulesProblem,
                        run_schedules)
from .schedules import EXPERIMENT as _SCHEDULES
from .init_scales import EXPERIMENT as _INIT_SCALES
from .l2_per_weight import EXPERIMENT as _L2_PER_WEIGHT
from .learned_data import EXPERIMENT as _LEARNED_DATA
from .multitask import EXPERIMENT as _MULTITASK
from .chaos import EXPERIMENT as _CHAOS
from .search import EXPERIMENT as _SEARCH
from .gallery import EXPERIMENT as _ALL

#: name -> :class:`Experiment`, one per subcommand.
EXPERIMENTS = {e.name: e for e in (_SCHEDULES, _INIT_SCALES, _L2_PER_WEIGHT,
                                   _LEARNED_DATA, _MULTITASK, _CHAOS, _SEARCH, _ALL)}

__all__ = ["EXPERIMENTS", "Experiment", "ConfigError", "QUICK", "SchedulesConfig",
           "SchedulesProblem", "run_schedules"]
