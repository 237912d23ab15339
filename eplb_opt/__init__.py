"""eplb-opt: expert placement for Mixture-of-Experts serving, with certified gaps.

Quick start::

    import eplb_opt
    phy2log, log2phy, logcnt = eplb_opt.rebalance_experts(weight, 288, 8, 4, 32)
    result = eplb_opt.solve(weight, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    print(result.summary())

See :func:`solve` for shapes and units.
"""

from typing import TYPE_CHECKING, Any

# Light modules (numpy only) load with the package.  The rest (torch, OR-Tools) loads
# on first use of a name below, so that ``import eplb_opt.heuristics`` and the CLI's
# start stay light (torch is imported only where a torch tensor is met).
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
from .planfile import PlanFileError, export_tensorrt_llm
from .traces import TraceError, read_trace
from .problem import Problem, make_problem
from .trigger import RebalanceDecision, should_rebalance
from .status import warm_up

_LAZY = {
    "Plan": ".plan", "derive_maps": ".plan", "plan_violations": ".plan", "verify": ".plan",
    "SolveResult": ".api", "rebalance_experts": ".api", "solve": ".api",
    "Migration": ".result",
    "align_to_previous": ".align", "count_moves": ".align", "evaluate": ".evaluate",
    "replay": ".replay",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .api import SolveResult, rebalance_experts, solve
    from .align import align_to_previous, count_moves
    from .evaluate import evaluate
    from .result import Migration
    from .plan import Plan, derive_maps, plan_violations, verify
    from .replay import replay


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eplb_opt' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# The one place the version is written: pyproject.toml reads it from here (setuptools
# ``attr:``, statically), so keep it a plain string literal.
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
    "replay",
    "should_rebalance",
    "slot_loads",
    "solve",
    "verify",
    "warm_up",
]
