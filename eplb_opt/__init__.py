"""eplb-opt: expert placement for Mixture-of-Experts serving, with certified gaps.

Quick start::

    import eplb_opt
    phy2log, log2phy, logcnt = eplb_opt.rebalance_experts(weight, 288, 8, 4, 32)
    result = eplb_opt.solve(weight, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    print(result.summary())

See :func:`solve` for shapes and units.
"""

from .bounds import Bounds, lower_bounds
from .errors import (
    EplbOptError,
    ExecutorError,
    InvalidPlanError,
    InvalidProblemError,
    InvalidTypeError,
    SolveInterrupted,
)
from .metrics import balancedness, gpu_loads, slot_loads
from .plan import Plan, derive_maps, plan_violations, verify
from .planfile import PlanFileError, export_tensorrt_llm
from .traces import TraceError, read_trace
from .evaluate import evaluate
from .problem import Problem, make_problem
from .api import SolveResult, rebalance_experts, solve
from .align import align_to_previous, count_moves
from .migrate import Migration
from .trigger import RebalanceDecision, should_rebalance
from .status import warm_up

__version__ = "0.4.0"

__all__ = [
    "Bounds",
    "EplbOptError",
    "ExecutorError",
    "InvalidPlanError",
    "InvalidProblemError",
    "InvalidTypeError",
    "Migration",
    "Plan",
    "PlanFileError",
    "RebalanceDecision",
    "TraceError",
    "Problem",
    "SolveInterrupted",
    "SolveResult",
    "__version__",
    "align_to_previous",
    "count_moves",
    "balancedness",
    "derive_maps",
    "evaluate",
    "export_tensorrt_llm",
    "gpu_loads",
    "lower_bounds",
    "make_problem",
    "plan_violations",
    "read_trace",
    "rebalance_experts",
    "should_rebalance",
    "slot_loads",
    "solve",
    "verify",
    "warm_up",
]
