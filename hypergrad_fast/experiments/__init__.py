"""The paper's experiments, one module each, registered for the command line.

Each module defines ``EXPERIMENT`` (:class:`~._args.Experiment`); :data:`EXPERIMENTS`
maps subcommand names to them, in the order the CLI lists them, and the CLI and the
tests read it.
"""

from ._args import Experiment
from .schedules import (QUICK, ConfigError, SchedulesConfig, SchedulesProblem,
                        run_schedules)
from .schedules import EXPERIMENT as _SCHEDULES

#: name -> :class:`Experiment`, one per subcommand.
EXPERIMENTS = {e.name: e for e in (_SCHEDULES,)}

__all__ = ["EXPERIMENTS", "Experiment", "ConfigError", "QUICK", "SchedulesConfig",
           "SchedulesProblem", "run_schedules"]
