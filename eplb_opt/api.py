"""Public entry points: :func:`solve` and the DeepSeek-compatible :func:`rebalance_experts`.

:func:`solve` runs named stages over one :class:`_Call` state:

1. :func:`eplb_opt.problem.validate_solve` checks every argument and, with ``history``,
   forms the loads the plan is for (:func:`eplb_opt.problem.forecast_loads`; masked GPUs
   then go to :func:`eplb_opt.masked.solve_masked`, which runs this pipeline per
   sub-problem);
2. :func:`_initial_plan`: the heuristic (or spill) plan, verified, and the closed-form
   certified bounds (:mod:`eplb_opt.bounds`);
3. :func:`_refine_exact`: exact mode's refinement (:mod:`eplb_opt.exact`, or Ray);
4. :func:`_refine_windows`: the worst / mean search over windows;
5. :func:`_plan_migration`: the plan near ``previous`` (:mod:`eplb_opt.migrate`);
6. :func:`eplb_opt.result.build_result`: figures, statuses and the frozen result.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import heuristics

from .bounds import Bounds, lower_bounds
from .budget import Budget, collector_paused
from .errors import EplbOptError, InvalidPlanError, SolveInterrupted
from .metrics import gpu_loads
from .plan import derive_checked_maps, derive_maps, verify
from .problem import OBJECTIVES, Problem, SolveOptions, make_problem, validate_solve
from .result import Migration, SolveResult, build_result

__all__ = ["SolveResult", "solve", "rebalance_experts", "check_plan", "OBJECTIVES"]

# Improving steps per layer of the search over windows (heuristic mode; exact mode runs
# until its share of the budget is spent, deterministic mode this many times 4).
ROBUST_STEPS = 64


def check_plan(problem: Problem, phy2log: np.ndarray, allow_duplicates: bool = True,
               home: np.ndarray | None = None, **maps: Any) -> None:
    """Verify ``phy2log`` ``[L, R]`` for ``problem`` (:func:`eplb_opt.plan.verify`; with
    ``home``, the spill policy's rule too); raises :class:`InvalidPlanError`."""
    if home is not None:
        _verify_primaries(problem, phy2log, home)
    verify(
        phy2log, problem.num_experts, problem.num_replicas, problem.num_gpus, num_groups=problem.num_groups,
        num_nodes=problem.num_nodes, hierarchical=problem.hierarchical, num_layers=problem.num_layers,
        allow_duplicates=allow_duplicates, **maps,
    )


def _verify_primaries(problem: Problem, phy2log: np.ndarray, home: np.ndarray) -> None:
    """The spill policy's rule: every expert has a replica on its home node."""
    R, N = problem.num_replicas, problem.num_nodes
    node = np.arange(R) // (R // N)
    L, E = home.shape
    present = np.zeros((L, E, N), dtype=bool)
    present[np.arange(L)[:, None], phy2log, node[None, :]] = True
    ok = np.take_along_axis(present, home[:, :, None], axis=2)[:, :, 0]
    if not ok.all():  # pragma: no cover - a spill search bug, never a user error
        l, e = (int(x) for x in np.argwhere(~ok)[0])
        raise InvalidPlanError(f"spill plan: expert {e} of layer {l} has no replica on its home node {home[l, e]}")


@dataclass
class _Call:
    """One :func:`solve` call as its stages run: the validated input, the budget, and the
    plan, certified bound and notes settled so far (what an interrupt returns)."""

    problem: Problem
    options: SolveOptions
    start: float
    budget: Budget | None
    bounds: Bounds
    phy2log: np.ndarray             # [L, R] the current plan, always verified
    lower_bound: np.ndarray         # [L] certified so far
    attempted: np.ndarray           # [L] layers a solver worked on
    events: list[str]
    home: np.ndarray | None = None  # [L, E] the spill policy's home nodes
    conditional: np.ndarray | None = None
    migration: Migration | None = None
    stage: str = "exact refinement"

    def result(self) -> SolveResult:
        """The :class:`SolveResult` of the plan as it stands."""
        return build_result(
            self.problem, self.options, self.start, self.phy2log, bounds=self.bounds,
            lower_bound=self.lower_bound, events=self.events, attempted=self.attempted,
            conditional=self.conditional, migration=self.migration, home=self.home,
        )


def solve(
    weight: Any, *, num_replicas: int, num_groups: int = 1, num_nodes: int = 1, num_gpus: int,
    mode: str = "heuristic", time_limit: float | None = None, seed: int = 0, policy: str = "auto",
    deterministic: bool = False, workers: int | None = None, tolerance: float = 1e-4,
    allow_duplicates: bool = True, executor: str | None = None, ray_address: str | None = None,
    previous: Any = None, max_balance_loss: float | None = None, node_move_cost: float = 4.0,
    bytes_per_expert: int | None = None, objective: str = "sum", cross_node_cost: float = 1.0,
    masked_gpus: Any = None, history: Any = None, forecast: str | None = None,
) -> SolveResult:
    """Plan expert placement for every layer and certify how good it is.

    Args:
        weight: ``[L, E]`` non-negative, finite per-expert loads of each layer (tokens
            routed to the expert in the recording window; any real dtype, torch tensor on
            any device or numpy array), or ``[W, L, E]`` for ``W`` windows (``objective``).
        num_replicas: ``R`` slots per layer, ``>= E``, a multiple of ``num_gpus``.
        num_groups, num_nodes, num_gpus: expert groups (the hierarchical policy places
            whole groups on nodes), server nodes, GPUs in total.
        mode: ``"heuristic"`` (no solver, no OR-Tools import) or ``"exact"`` (the
            heuristic plan refined under the time limit, :mod:`eplb_opt.exact`).
        time_limit: seconds for the whole call (:mod:`eplb_opt.budget`).  ``None``: 10 s
            in exact mode, no limit in heuristic mode; ``0``: no refinement.  The call
            returns within ``max(time_limit, heuristic time)`` plus a few milliseconds.
        seed: fixes every random choice.
        policy: ``"auto"`` (hierarchical when ``num_groups % num_nodes == 0``, else
            global), ``"hierarchical"``, ``"global"`` or ``"spill"`` (every expert keeps
            a replica on its group's home node, others go anywhere at
            ``cross_node_cost``; :mod:`heuristics.spill`; bounds are the global policy's).
        deterministic: budgets of work, not wall clock: the plan depends only on the
            input, ``seed``, ``time_limit`` and ``workers`` (:mod:`eplb_opt.budget`).
        workers: CP-SAT threads.  Default: the cores available, or 1 when
            ``deterministic`` or with Ray (a plan must not depend on the machine).
        tolerance: a layer within this certified gap is ``"optimal"`` and left alone.
        allow_duplicates: when False, no GPU holds two replicas of one expert (needs at
            most ``E / N`` slots per GPU).
        executor, ray_address: ``"ray"`` fans exact refinement out as Ray tasks
            (:mod:`eplb_opt.distributed`; ``ray_address`` ``None``, ``"auto"`` or
            ``"ray://HOST:PORT"``).
        previous: ``[L, R]`` the placement deployed now: the plan then stays within
            ``max_balance_loss`` (default 0) of the best plan found without it and moves
            the fewest weights, a copy across nodes costing ``node_move_cost`` copies
            within one; ``bytes_per_expert`` reports bytes (:mod:`eplb_opt.migrate`).
        objective: with ``[W, L, E]`` windows: ``"sum"`` plans for their total,
            ``"worst"`` / ``"mean"`` lower the worst / mean window's busiest GPU per layer
            (:mod:`heuristics.robust`; no CP-SAT; not with ``previous``).
        cross_node_cost: ``policy="spill"``: cost per unit of load served off its home
            node (``inf``: the hierarchical plan; ``0``: locality traded freely).
        masked_gpus: failed or drained GPUs that must hold nothing: GPU ids, a ``[G]`` or
            ``[L, G]`` bool mask, or one id list per layer (:mod:`eplb_opt.masked`; global
            policy over the active GPUs; an explicit ``"hierarchical"`` is refused).
        history: ``[H, L, E]`` past windows, oldest first, the last just before
            ``weight`` (then the latest window ``[L, E]``, never 3-D: a 3-D ``weight``
            holds the windows a plan serves).  The plan is for the window to come, from
            ``history + [weight]`` by ``forecast``; the figures are for those loads.
            ``None``: the plan for ``weight``, exactly as without the argument.
        forecast: with ``history``, ``"windows-ema"`` (default: a hedge over the windows
            weighted ``4 ** -age``; ``"ema"`` where hedges are refused, with ``previous``
            or ``policy="spill"``), ``"ema"``, ``"last"``, ``"mean"``, ``"windows-worst"``
            or ``"windows-mean"`` (:func:`eplb_opt.problem.forecast_loads`; next-window and
            in-window figures of each in docs/USAGE.md).  No effect without history.

    Returns:
        :class:`~eplb_opt.result.SolveResult`: the verified plan and its certificate.

    Raises:
        InvalidProblemError / InvalidTypeError: bad input, or options that conflict
        (:mod:`eplb_opt.problem`'s ``HISTORY_CONFLICTS``, ``CONFLICTS``), named.
    """
    start = time.perf_counter()
    problem, options = validate_solve(
        weight, num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus,
        mode=mode, time_limit=time_limit, seed=seed, policy=policy, deterministic=deterministic, workers=workers,
        tolerance=tolerance, allow_duplicates=allow_duplicates, executor=executor, ray_address=ray_address,
        previous=previous, max_balance_loss=max_balance_loss, node_move_cost=node_move_cost,
        bytes_per_expert=bytes_per_expert, objective=objective, cross_node_cost=cross_node_cost,
        masked_gpus=masked_gpus, history=history, forecast=forecast)
    return _run(problem, options, start)


def _run(problem: Problem, options: SolveOptions, start: float) -> SolveResult:
    """Stages 2-6 of a validated call (masked GPUs: per sub-problem), with the cyclic
    garbage collector paused when exact mode runs on a wall clock
    (:func:`eplb_opt.budget.collector_paused`)."""
    with collector_paused(problem.mode == "exact" and not options.deterministic):
        return _stages(problem, options, start)


def _stages(problem: Problem, options: SolveOptions, start: float) -> SolveResult:
    if options.mask is not None:
        from .masked import solve_masked

        return solve_masked(problem, options, start)
    call = _initial_plan(problem, options, start)
    try:
        _refine_exact(call)
        _refine_windows(call)
        _plan_migration(call)
    except SolveInterrupted:
        raise
    except KeyboardInterrupt:
        raise _interrupted(call) from None
    return call.result()


def _initial_plan(problem: Problem, options: SolveOptions, start: float) -> _Call:
    """Stage 2: the heuristic plan (the spill search under ``policy="spill"``),
    verified, and the closed-form certified bounds."""
    home = None
    if problem.policy == "spill":
        phy2log, home = _spill(problem, options.cross_node_cost, options.allow_duplicates)
    else:
        phy2log = _plan_numpy(problem, options.allow_duplicates)
    check_plan(problem, phy2log, options.allow_duplicates, home=home)
    bounds = lower_bounds(
        problem.weight, problem.num_replicas, problem.num_gpus, hierarchical=problem.hierarchical,
        num_groups=problem.num_groups, num_nodes=problem.num_nodes,
    )
    budget = Budget.of_call(problem.time_limit, problem.mode, start, options.deterministic)
    events = [] if options.forecast is None else [
        f"planned for forecast={options.forecast!r} of the next window from {options.history_windows} history "
        "window(s) and weight"]
    return _Call(problem, options, start, budget, bounds, phy2log, bounds.lower_bound.copy(),
                 np.zeros(problem.num_layers, dtype=bool), events, home)


def _plan_numpy(problem: Problem, allow_duplicates: bool = True) -> np.ndarray:
    return heuristics.place(
        problem.weight, problem.num_replicas, problem.plan_groups, problem.plan_nodes, problem.num_gpus,
        allow_duplicates=allow_duplicates,
    ).phy2log


def _spill(problem: Problem, lam: float, allow_dup: bool) -> tuple[np.ndarray, np.ndarray]:
    """The spill policy's plan and every expert's home node ``[L, E]``."""
    from .heuristics.spill import nothing_can_spill, spill_refine

    w, R, G, N = problem.weight, problem.num_replicas, problem.num_gpus, problem.num_nodes
    hier = heuristics.place(w, R, problem.num_groups, N, G, allow_duplicates=allow_dup)
    home = np.repeat(hier.node_of_group, problem.num_experts // problem.num_groups, axis=1)
    glob = counts = None
    if lam == float("inf"):
        pass                                     # nothing spills: the hierarchical plan stays
    elif nothing_can_spill(N, R, problem.num_experts):     # the global plan is a start too
        glob = heuristics.place(w, R, 1, 1, G, allow_duplicates=allow_dup).phy2log
    else:                                        # its replica counts seed the spill search
        counts = heuristics.replica_counts_of(w, R, 1, 1, G)
    out = spill_refine(w, hier.phy2log, home, G, N, lam, allow_duplicates=allow_dup, global_plan=glob,
                       global_counts=counts)
    return out, home


def _refine_exact(call: _Call) -> None:
    """Stage 3, exact mode: the heuristic plan refined under the budget (half of it with
    ``previous``) by :func:`eplb_opt.exact.refine` (or Ray tasks); proven bounds join
    the certified bound."""
    problem, options = call.problem, call.options
    if options.use_ray and problem.mode != "exact":
        call.events.append("executor='ray' fans out exact refinement only; heuristic mode ran in this process")
    spill = problem.policy == "spill"
    if problem.mode == "exact" and spill:
        call.events.append("policy='spill': CP-SAT is not used for this policy; the spill search ran as in "
                           "heuristic mode")
    if problem.mode != "exact" or options.robust or spill:
        return
    budget = call.budget.part(0.5 if options.previous is not None else 1.0)
    if budget.seconds <= 0 or budget.expired():
        call.events.append("solver skipped: no time left after the heuristic plan (time_limit)")
        return
    from . import exact  # imports OR-Tools when a model is built

    warm = call.phy2log
    try:
        outcome = _run_refinement(call, budget)
    except exact.RefineInterrupted as stop:
        # Keep what the refinement finished (verified) for the caller.
        _take_outcome(call, stop.outcome, warm, "interrupted exact refinement")
        if options.previous is not None:
            raise
        improved = int((gpu_loads(problem.weight, call.phy2log, problem.num_gpus).max(axis=1)
                        < gpu_loads(problem.weight, warm, problem.num_gpus).max(axis=1) * (1 - 1e-12)).sum())
        call.events.append(f"interrupted (KeyboardInterrupt) during exact refinement; the plan is the heuristic "
                           f"plan improved on {improved} of {problem.num_layers} layer(s) before the interrupt")
        raise SolveInterrupted("interrupted during exact refinement", stage=call.stage,
                               partial=call.result()) from None
    _take_outcome(call, outcome, warm, "exact refinement")


def _run_refinement(call: _Call, budget: Budget) -> Any:
    """:func:`eplb_opt.exact.refine` (or :func:`eplb_opt.distributed.refine`) on the
    call's plan; returns its :class:`~eplb_opt.exact.ExactOutcome`."""
    problem, options = call.problem, call.options
    common = dict(
        num_gpus=problem.num_gpus, num_nodes=problem.plan_nodes, num_groups=problem.plan_groups,
        tolerance=options.tolerance, workers=options.workers, deterministic=options.deterministic,
        seed=problem.seed, allow_duplicates=options.allow_duplicates, budget=budget.seconds,
    )
    if options.use_ray:
        from . import distributed

        outcome, _ = distributed.refine(
            problem.weight, call.phy2log, lower_bound=call.lower_bound,
            seconds=budget.deadline - time.perf_counter(), ray_address=options.ray_address, **common,
        )
        return outcome
    from . import exact

    return exact.refine(problem.weight, call.phy2log, lower_bound=call.lower_bound, deadline=budget.deadline,
                        **common)


def _take_outcome(call: _Call, outcome: Any, warm: np.ndarray, what: str) -> None:
    """Merge a refinement's outcome into the call: its events, attempted layers, plan
    (where it verifies and is nowhere worse than ``warm``), proven and conditional bounds."""
    call.events.extend(outcome.events)
    call.attempted = outcome.attempted
    call.phy2log = _accept(call, outcome.phy2log, warm, what)
    better = np.isfinite(outcome.proven) & (outcome.proven > call.lower_bound)
    call.lower_bound[better] = outcome.proven[better]
    call.conditional = outcome.conditional


def _accept(call: _Call, candidate: np.ndarray, warm: np.ndarray, what: str) -> np.ndarray:
    """``candidate`` where it verifies and is nowhere worse than ``warm`` (checked, not
    assumed), else ``warm``; events say which."""
    problem = call.problem
    try:
        check_plan(problem, candidate, call.options.allow_duplicates)
    except EplbOptError as exc:  # pragma: no cover - a refinement bug, reported
        msg = f"{what} returned an invalid plan ({exc}); fell back to the heuristic plan"
        call.events.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        call.attempted = np.zeros(problem.num_layers, dtype=bool)
        return warm
    old = gpu_loads(problem.weight, warm, problem.num_gpus).max(axis=1)
    new = gpu_loads(problem.weight, candidate, problem.num_gpus).max(axis=1)
    worse = np.flatnonzero(new > old * (1 + 1e-12))
    if worse.size:  # pragma: no cover - defensive
        candidate = candidate.copy()
        candidate[worse] = warm[worse]
        call.events.append(f"kept the heuristic plan on {worse.size} layer(s) the refinement made worse")
    return candidate


def _refine_windows(call: _Call) -> None:
    """Stage 4, ``objective="worst"`` / ``"mean"`` over windows: local search from the
    plan for the total (:mod:`heuristics.robust`); exact mode keeps searching until the
    deadline (deterministic: 4x the steps)."""
    problem, options = call.problem, call.options
    if not options.robust:
        return
    from .heuristics.robust import robust_refine

    call.stage = "robust refinement"
    kw = dict(num_gpus=problem.num_gpus, num_nodes=problem.plan_nodes, objective=options.objective,
              allow_duplicates=options.allow_duplicates)
    exact_mode = problem.mode == "exact"
    deadline = call.budget.deadline if exact_mode and not options.deterministic else None
    windows = options.windows
    out, converged = robust_refine(windows, call.phy2log, max_steps=ROBUST_STEPS, deadline=deadline, **kw)
    if exact_mode:
        # The layers the step cap cut carry on (deterministic: 4x the steps; otherwise
        # until the deadline).
        more = np.flatnonzero(~converged)
        steps = 4 * ROBUST_STEPS if options.deterministic else 1_000_000
        out, again = robust_refine(windows, out, max_steps=steps, deadline=deadline, layers=more, **kw)
        converged[more] = again[more]
        call.events.append(f"objective={options.objective!r}: CP-SAT is not used for this objective; the search "
                           "over windows had the whole time_limit")
    if deadline is not None and time.perf_counter() >= deadline and not converged.all():
        call.events.append(f"objective={options.objective!r}: time ran out with {int((~converged).sum())} "
                           "layer(s) still improving")
    call.phy2log = out
    check_plan(problem, out, options.allow_duplicates)


def _plan_migration(call: _Call) -> None:
    """Stage 5, with ``previous``: the plan within ``max_balance_loss`` of the current
    one that moves least from the deployed placement (:func:`eplb_opt.migrate.replan`);
    exact mode gives the CP-SAT move model the second half of the budget.  Layers the
    repair has not reached by the deadline keep the relabelled plan (events say so)."""
    problem, options = call.problem, call.options
    if options.previous is None:
        return
    from . import migrate
    call.stage = "migration planning"
    b = call.budget
    exact_time = None
    if problem.mode == "exact" and b.seconds > 0:
        exact_time = (b.deadline, b.seconds * 0.5)
    G = problem.num_gpus
    nodes = problem.num_nodes if G % problem.num_nodes == 0 else 1   # physical nodes, for move costs
    phy2log, migration, events = migrate.replan(
        problem.weight, options.previous, call.phy2log, num_gpus=G, num_nodes=nodes,
        hierarchical=problem.hierarchical, max_balance_loss=options.max_balance_loss,
        num_groups=problem.num_groups, node_move_cost=options.node_move_cost,
        allow_duplicates=options.allow_duplicates, exact=exact_time is not None,
        deadline=None if b is None or options.deterministic else b.deadline,
        exact_deadline=None if exact_time is None else exact_time[0],
        exact_budget=0.0 if exact_time is None else exact_time[1],
        deterministic=options.deterministic, seed=problem.seed, workers=options.workers,
        bytes_per_expert=options.bytes_per_expert,
    )
    call.events.extend(events)
    check_plan(problem, phy2log, options.allow_duplicates)
    call.phy2log, call.migration = phy2log, migration


def _interrupted(call: _Call) -> SolveInterrupted:
    """The exception for a ``KeyboardInterrupt`` during a stage: with the last plan
    finished as ``partial`` -- except with ``previous``, where the fresh plan is not the
    plan near it that the caller asked for."""
    stage = call.stage
    if call.options.previous is not None:
        return SolveInterrupted(f"interrupted during {stage}; no plan near `previous` was finished", stage=stage,
                                partial=None)
    call.events.append(f"interrupted (KeyboardInterrupt) during {stage}; the plan is the last one finished")
    return SolveInterrupted(f"interrupted during {stage}", stage=stage, partial=call.result())


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    mode: str = "heuristic",
    time_limit: float | None = None,
    seed: int = 0,
    policy: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in replacement for DeepSeek EPLB's ``rebalance_experts``.

    Args:
        weight: ``[L, E]`` load statistics of every logical expert.
        num_replicas: number of physical experts ``R``, a multiple of ``num_gpus``.
        num_groups: number of expert groups.
        num_nodes: number of server nodes (intra-node links are faster).
        num_gpus: number of GPUs, a multiple of ``num_nodes`` under the hierarchical policy.
        mode, time_limit, seed, policy: as in :func:`solve`.

    Returns:
        ``(phy2log [L, R], log2phy [L, E, R - E + 1], logcnt [L, E])``, torch.int64 on
        CPU: the expert of each physical slot, the slots of each expert padded with -1,
        and the replica count of each expert.  The plan is verified before it is returned.
    """
    if mode == "exact" or policy == "spill":
        result = solve(
            weight, num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes,
            num_gpus=num_gpus, mode=mode, time_limit=time_limit, seed=seed, policy=policy,
        )
        phy2log = result.plan.to_numpy()[0]
        problem_E = result.plan.num_experts
        log2phy, logcnt = derive_maps(phy2log, problem_E)
        return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
    problem = make_problem(
        weight, num_replicas, num_groups, num_nodes, num_gpus,
        mode=mode, time_limit=time_limit, seed=seed, policy=policy,
    )
    phy2log = _plan_numpy(problem)
    maps = derive_checked_maps(phy2log, problem.num_experts, problem.num_gpus, hierarchical=problem.hierarchical,
                               num_groups=problem.num_groups, num_nodes=problem.num_nodes)
    if maps is None:                         # the rule-by-rule checks, which name what is wrong
        maps = derive_maps(phy2log, problem.num_experts)
        check_plan(problem, phy2log, logcnt=maps[1])
    log2phy, logcnt = maps
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
