"""One meta-iteration of each experiment: the validation loss and its hypergradient
through the experiment's inner training run, at the default size.

The problem (data, model, compiled objective) is built in ``setup``, with one
evaluation to compile the kernels; ``time_hypergradient`` times one more.
"""

from hypergrad_fast.experiments.init_scales import InitScalesConfig, InitScalesProblem
from hypergrad_fast.experiments.l2_per_weight import L2Config, L2Problem
from hypergrad_fast.experiments.learned_data import LearnedDataConfig, LearnedDataProblem
from hypergrad_fast.experiments.schedules import SchedulesConfig, SchedulesProblem

PROBLEMS = {
    "schedules": lambda: SchedulesProblem(SchedulesConfig()),
    "init-scales": lambda: InitScalesProblem(InitScalesConfig()),
    "l2-per-weight": lambda: L2Problem(L2Config(), "per_weight"),
    "learned-data": lambda: LearnedDataProblem(LearnedDataConfig()),
}


class ExperimentHypergradient:
    """Wall time of one hyperloss and hypergradient of each experiment (default size)."""

    params = [list(PROBLEMS)]
    param_names = ["experiment"]
    number = 1
    repeat = (1, 3, 30.0)
    timeout = 600

    def setup(self, experiment):
        self.problem = PROBLEMS[experiment]()
        self.h0 = self.problem.initial()
        self.problem.hyperloss_and_grad(self.h0)

    def time_hypergradient(self, experiment):
        self.problem.hyperloss_and_grad(self.h0)
