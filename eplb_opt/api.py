"""Public entry points: :func:`solve` and the DeepSeek-compatible :func:`rebalance_experts`."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import heuristics

from .bounds import Bounds, lower_bounds
from .errors import EplbOptError, InvalidPlanError, InvalidProblemError, InvalidTypeError, SolveInterrupted
from .metrics import balancedness, gpu_loads, slot_loads
from .migrate import Migration
from .plan import Plan, derive_maps, verify
from .problem import Problem, _choice, as_weight, make_problem

__all__ = ["SolveResult", "solve", "rebalance_experts"]


@dataclass(frozen=True)
class SolveResult:
    """Outcome of :func:`solve`.

    Attributes:
        plan: the verified :class:`~eplb_opt.plan.Plan`.
        max_load: ``[L]`` float64 busiest GPU per layer, in the input's load units.
        mean_load: ``[L]`` float64 mean GPU load per layer (``max_load`` can never go
            below it).
        lower_bound: ``[L]`` float64 certified lower bound on any plan's busiest GPU
            under the policy (counts and group placement free), for the float64 image
            of the input (integer loads above 2**53 are read as float64), rounded down.
            Scope: with ``allow_duplicates=False`` it bounds the no-duplicate problem
            (no GPU holds two replicas of one expert), which can be higher than the
            problem with duplicates; with ``masked_gpus`` it bounds the global policy
            over the active GPUs; with ``policy="spill"`` it is the global policy's
            bound (valid for spill plans too).  A bound from a CP-SAT model is only
            taken from a model whose loads are rounded down to integers of at most
            ``2**24`` (:mod:`eplb_opt.cpsat`), and a bound that contradicts the plan
            is dropped (closed-form bound instead) and named in ``events``.
        gap: ``[L]`` float64 ``1 - lower_bound / max_load`` (0 where ``max_load == 0``),
            against that bound and so with the same scope.
        status: per layer ``"optimal"`` (the plan's exact max load, float rounding
            included, is within ``tolerance`` of the certified bound; a solver's own
            "optimal" is never taken on trust), ``"feasible"`` (a solver ran and the gap
            is above tolerance) or ``"heuristic"`` (no solver ran, or it failed; see
            ``events``).
        balancedness: ``sum_l mean_g load / sum_l max_g load`` over the plan.
        slot_balancedness: the same over the ``R`` slots.
        runtime: wall-clock seconds of the call.
        events: short notes on what happened (solver skipped, timed out, failed, ...).
        policy: the policy applied, ``"hierarchical"`` or ``"global"``.
        bounds: the bound components (see :mod:`eplb_opt.bounds`).
        tolerance: the gap tolerance used for ``status``.
        conditional_bound: ``[L]`` float, exact mode only: bounds a CP-SAT model proved
            for the plan's replica counts and group placement (NaN where none).  They
            hold only for those choices and are never merged into ``lower_bound``.
        migration: with ``previous``: moves, transfers and the baseline
            (:class:`eplb_opt.migrate.Migration`).
        objective: ``"sum"``, ``"worst"`` or ``"mean"``.  With ``[W, L, E]`` windows and
            ``"worst"`` / ``"mean"``, ``max_load``, ``lower_bound``, ``gap`` and
            ``status`` are per layer the worst (mean) window's busiest GPU and the
            largest (mean) of the windows' certified bounds; ``mean_load``,
            ``balancedness`` and ``slot_balancedness`` always describe the summed load.
        window_balancedness: with windows, the plan's balancedness on each window.
        off_node_share: ``policy="spill"``: share of the load served by replicas outside
            their expert's home node.
    """

    plan: Plan
    max_load: np.ndarray
    mean_load: np.ndarray
    lower_bound: np.ndarray
    gap: np.ndarray
    status: tuple[str, ...]
    balancedness: float
    slot_balancedness: float
    runtime: float
    events: tuple[str, ...]
    policy: str
    bounds: Bounds = field(repr=False)
    tolerance: float = 1e-4
    conditional_bound: np.ndarray | None = field(default=None, repr=False)
    migration: Migration | None = field(default=None, repr=False)
    objective: str = "sum"
    window_balancedness: tuple[float, ...] | None = None
    off_node_share: float | None = None

    @property
    def moves(self) -> np.ndarray | None:
        """``[L]`` replicas moved from ``previous`` (None when no ``previous`` was given)."""
        return None if self.migration is None else self.migration.moves

    @property
    def transfers(self) -> np.ndarray | None:
        """The weight copies from ``previous`` (see :class:`eplb_opt.migrate.Migration`)."""
        return None if self.migration is None else self.migration.transfers

    @property
    def balancedness_ceiling(self) -> float:
        """Certified upper bound on the balancedness of any plan under the policy:
        ``sum_l mean_load / sum_l lower_bound`` (1.0 when every load is zero)."""
        return min(1.0, _ratio(self.mean_load, self.lower_bound)) if self.lower_bound.sum() > 0 else 1.0

    @property
    def policy_capped(self) -> np.ndarray:
        """``[L]`` bool: layers where the hierarchical policy itself lifts the bound
        above what the global policy could reach (by more than ``tolerance``)."""
        return self.bounds.lower_bound > self.bounds.global_bound * (1 + self.tolerance)

    def summary(self, per_layer: bool = False) -> str:
        """A human-readable table: overall figures, then (optionally) one row per layer."""
        L = len(self.max_load)
        counts = {s: self.status.count(s) for s in ("optimal", "feasible", "heuristic")}
        lines = [
            f"policy {self.policy}: {L} layers x {self.plan.num_experts} experts, "
            f"{self.plan.num_replicas} replicas",
            f"balancedness {self.balancedness:.6f} (slot-level {self.slot_balancedness:.6f})",
            f"gap to certified bound: max {self.gap.max():.4%}, mean {self.gap.mean():.4%}",
            f"no plan under this policy can beat balancedness {self.balancedness_ceiling:.6f} (certified)",
            "status: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v),
            f"runtime {self.runtime * 1e3:.1f} ms",
        ]
        capped = int(self.policy_capped.sum())
        if capped:
            lines.append(
                f"{capped} layer(s) are capped by the hierarchical policy: their bound is above "
                "the global policy's (try policy='global' where cross-node traffic allows)"
            )
        if self.window_balancedness is not None:
            lines.append(f"objective {self.objective!r} over {len(self.window_balancedness)} windows; balancedness "
                         "per window " + ", ".join(f"{b:.4f}" for b in self.window_balancedness))
        if self.migration is not None:
            lines.append(self.migration.summary())
        for ev in self.events:
            lines.append(f"event: {ev}")
        if per_layer:
            lines.append(f"{'layer':>5} {'max load':>14} {'lower bound':>14} {'gap':>9} {'balance':>8} status")
            for l in range(L):
                bal = self.mean_load[l] / self.max_load[l] if self.max_load[l] > 0 else 1.0
                lines.append(
                    f"{l:>5} {self.max_load[l]:>14.6g} {self.lower_bound[l]:>14.6g} "
                    f"{self.gap[l]:>9.4%} {bal:>8.5f} {self.status[l]}"
                )
        return "\n".join(lines)


def _ratio(a: np.ndarray, b: np.ndarray) -> float:
    tb = float(np.sum(b))
    return 1.0 if tb <= 0 else float(np.sum(a) / tb)


def _plan_numpy(problem: Problem, allow_duplicates: bool = True) -> np.ndarray:
    placement = heuristics.place(
        problem.weight,
        problem.num_replicas,
        problem.plan_groups,
        problem.plan_nodes,
        problem.num_gpus,
        allow_duplicates=allow_duplicates,
    )
    return placement.phy2log


def _verify(problem: Problem, phy2log: np.ndarray, allow_duplicates: bool = True, home: np.ndarray | None = None,
            **maps: Any) -> None:
    if home is not None:
        _verify_primaries(problem, phy2log, home)
    verify(
        phy2log,
        problem.num_experts,
        problem.num_replicas,
        problem.num_gpus,
        num_groups=problem.num_groups,
        num_nodes=problem.num_nodes,
        hierarchical=problem.hierarchical,
        num_layers=problem.num_layers,
        allow_duplicates=allow_duplicates,
        **maps,
    )


# Relative float64 error of a sum of n non-negative terms is below (n + 2) * EPS.
_EPS = float(np.finfo(np.float64).eps)


def _consistent_bound(lb: np.ndarray, top: np.ndarray, k: int, closed_form: np.ndarray | None,
                      events: list[str]) -> np.ndarray:
    """``lb`` where it is consistent with the plan (a bound can never exceed the plan's
    exact max load, which is within ``(k + 2)`` ulps of the float ``top``).  Where it is
    not -- a bug, never the user's input -- the layer falls back to the closed-form bound
    (``closed_form``), else to 0, and an event names it; the plan is kept."""
    top_hi = top * (1 + (k + 2) * _EPS)
    bad = lb > top_hi
    if not bad.any():  # the normal case
        return lb
    lb = lb.copy()  # pragma: no cover - a bound bug, reported rather than raised
    layers = np.flatnonzero(bad)
    for l in layers:
        worst = f"lower bound {lb[l]!r} exceeds the achieved max load {top[l]!r} at layer {l}"
        if closed_form is not None and closed_form[l] <= top_hi[l]:
            lb[l] = closed_form[l]
            events.append(f"inconsistent certificate: {worst}; fell back to the closed-form bound")
        else:
            lb[l] = 0.0
            events.append(f"inconsistent certificate: {worst}; no bound reported for the layer")
    warnings.warn(f"eplb-opt: {len(layers)} inconsistent certificate(s) replaced (see result.events)",
                  RuntimeWarning, stacklevel=3)
    return lb


def _statuses(lb: np.ndarray, top: np.ndarray, k: int, tol: float, attempted: np.ndarray) -> tuple[str, ...]:
    """Per layer ``"optimal"`` only when the plan's *exact* max load (at most ``top``
    plus its float summation error) is within ``tol`` of the certified bound, with the
    arithmetic of the test itself rounded against the claim; else ``"feasible"`` where a
    solver worked on the layer, ``"heuristic"`` where none did."""
    top_hi = top * (1 + (k + 2) * _EPS)
    ok = (top <= 0) | (lb >= top_hi * (1.0 - tol) * (1 + 4 * _EPS))
    return tuple("optimal" if o else ("feasible" if a else "heuristic") for o, a in zip(ok, attempted))


def _tolerance(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidTypeError(f"tolerance must be a number, got {type(value).__name__} {value!r}")
    tol = float(value)
    if not (0.0 <= tol < 1.0):
        raise InvalidProblemError(f"tolerance must be in [0, 1), got {value!r}")
    return tol


def _options(deterministic: Any, workers: Any, allow_duplicates: Any, problem: Problem) -> tuple[bool, int, bool]:
    for name, val in (("deterministic", deterministic), ("allow_duplicates", allow_duplicates)):
        if not isinstance(val, (bool, np.bool_)):
            raise InvalidTypeError(f"{name} must be True or False, got {type(val).__name__} {val!r}")
    if workers is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    else:
        if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer)):
            raise InvalidTypeError(f"workers must be a positive integer or None, got {type(workers).__name__} {workers!r}")
        n = int(workers)
        if n < 1:
            raise InvalidProblemError(f"workers must be a positive integer or None, got {workers!r}")
    if not allow_duplicates:
        # policy="spill" packs each node's home replicas first, so it needs the node bound
        # too (found by the long certificate campaign: a raw ValueError escaped).
        nodes = problem.num_nodes if problem.policy == "spill" else problem.plan_nodes
        per_node = problem.num_experts // nodes
        if problem.slots_per_gpu > per_node:
            raise InvalidProblemError(
                f"allow_duplicates=False needs at most {per_node} slots per GPU (the experts a GPU can "
                f"choose from), got num_replicas / num_gpus = {problem.slots_per_gpu}"
            )
    return bool(deterministic), n, bool(allow_duplicates)


def _executor(executor: Any, ray_address: Any) -> bool:
    if executor is not None and (not isinstance(executor, str) or executor not in ("local", "ray")):
        raise InvalidProblemError(f"executor must be None, 'local' or 'ray', got {executor!r}")
    if ray_address is not None:
        if executor != "ray":
            raise InvalidProblemError(f"ray_address={ray_address!r} needs executor='ray'")
        if not isinstance(ray_address, str) or not ray_address.strip():
            raise InvalidTypeError(
                f"ray_address must be a non-empty string or None, got {type(ray_address).__name__} {ray_address!r}"
            )
    return executor == "ray"


OBJECTIVES = ("sum", "worst", "mean")

# Improving steps per layer of the search over windows (heuristic mode; exact mode runs
# until its share of the budget is spent, deterministic mode this many times 4).
ROBUST_STEPS = 64


def _robust(problem: Problem, windows: np.ndarray, phy2log: np.ndarray, objective: str, allow_dup: bool,
            deterministic: bool, start: float, events: list[str]) -> np.ndarray:
    """The worst / mean window search (see :func:`solve`, ``objective``)."""
    from .heuristics.robust import robust_refine

    kw = dict(num_gpus=problem.num_gpus, num_nodes=problem.plan_nodes, objective=objective,
              allow_duplicates=allow_dup)
    deadline = None
    if problem.mode == "exact" and not deterministic:
        total = 10.0 if problem.time_limit is None else problem.time_limit
        deadline = start + total - _FINISH_RESERVE
    out, converged = robust_refine(windows, phy2log, max_steps=ROBUST_STEPS, deadline=deadline, **kw)
    if problem.mode == "exact":
        # Exact mode: the layers the step cap cut carry on (deterministic: 4x the steps;
        # otherwise until the deadline).
        more = np.flatnonzero(~converged)
        steps = 4 * ROBUST_STEPS if deterministic else 1_000_000
        out, again = robust_refine(windows, out, max_steps=steps, deadline=deadline, layers=more, **kw)
        converged[more] = again[more]
        events.append(f"objective={objective!r}: CP-SAT is not used for this objective; the search over "
                      "windows had the whole time_limit")
    if deadline is not None and time.perf_counter() >= deadline and not converged.all():
        events.append(f"objective={objective!r}: time ran out with {int((~converged).sum())} layer(s) "
                      "still improving")
    return out


def _robust_figures(problem: Problem, windows: np.ndarray, per_window: np.ndarray,
                    objective: str) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: the objective (worst or mean window's busiest GPU) and its certified
    bound (largest or mean of the windows' own bounds)."""
    from .heuristics.robust import robust_objective

    bounds = np.stack([lower_bounds(
        x, problem.num_replicas, problem.num_gpus, hierarchical=problem.hierarchical,
        num_groups=problem.num_groups, num_nodes=problem.num_nodes,
    ).lower_bound for x in windows])                                                  # [W, L]
    top = robust_objective(np.moveaxis(per_window, 0, 1), objective)                  # [L]
    # A mean of W floats can round up: lowered by its worst-case error.
    lb = bounds.max(axis=0) if objective == "worst" else bounds.mean(axis=0) * (1 - (len(windows) + 2) * _EPS)
    return top, lb


def _number(name: str, value: Any, low: float, *, open_low: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v) or v < low or (open_low and v == low):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise InvalidProblemError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def _migration_options(problem: Problem, previous: Any, max_balance_loss: Any, node_move_cost: Any,
                       bytes_per_expert: Any) -> tuple[np.ndarray | None, float, float, int | None]:
    from .migrate import as_previous

    if previous is None:
        for name, val in (("max_balance_loss", max_balance_loss), ("bytes_per_expert", bytes_per_expert)):
            if val is not None:
                raise InvalidProblemError(f"{name}={val!r} needs previous (the placement deployed now)")
        return None, 0.0, 4.0, None
    old = as_previous(previous, problem.num_layers, problem.num_experts, problem.num_replicas, problem.num_gpus)
    mbl = 0.0 if max_balance_loss is None else _number("max_balance_loss", max_balance_loss, 0.0)
    nmc = _number("node_move_cost", node_move_cost, 0.0, open_low=True)
    bpe = None
    if bytes_per_expert is not None:
        if isinstance(bytes_per_expert, (bool, np.bool_)) or not isinstance(bytes_per_expert, (int, np.integer)):
            raise InvalidTypeError(f"bytes_per_expert must be a positive integer, got {bytes_per_expert!r}")
        if bytes_per_expert <= 0:
            raise InvalidProblemError(f"bytes_per_expert must be a positive integer, got {bytes_per_expert!r}")
        bpe = int(bytes_per_expert)
    return old, mbl, nmc, bpe


def _migrate(problem: Problem, fresh: np.ndarray, old: np.ndarray, mbl: float, nmc: float, bpe: int | None,
             allow_dup: bool, events: list[str], exact_time: tuple[float, float] | None,
             deterministic: bool, workers: int, repair_deadline: float | None = None) -> tuple[np.ndarray, Migration]:
    """The plan within ``mbl`` of ``fresh`` that moves least from ``old``; with
    ``exact_time = (deadline, budget)`` the CP-SAT move model refines it; layers not
    repaired by ``repair_deadline`` keep the relabelled fresh plan."""
    from . import migrate

    G = problem.num_gpus
    nodes = problem.num_nodes if G % problem.num_nodes == 0 else 1   # physical nodes, for move costs
    mp = migrate.replan(
        problem.weight, old, fresh, num_gpus=G, num_nodes=nodes,
        hierarchical=problem.hierarchical, max_balance_loss=mbl, num_groups=problem.num_groups,
        node_move_cost=nmc, allow_duplicates=allow_dup, exact=exact_time is not None, deadline=repair_deadline,
        exact_deadline=None if exact_time is None else exact_time[0],
        exact_budget=0.0 if exact_time is None else exact_time[1],
        deterministic=deterministic, seed=problem.seed, workers=workers,
    )
    events.extend(mp.events)
    transfers = migrate.transfer_list(old, mp.phy2log, G, nodes)
    moved = int(mp.moves.sum())
    base_bal = balancedness(gpu_loads(problem.weight, fresh, problem.num_gpus))
    return mp.phy2log, Migration(
        moves=mp.moves, cost=mp.cost, transfers=transfers, bytes=None if bpe is None else moved * bpe,
        baseline_moves=mp.baseline_moves, baseline_cost=mp.baseline_cost, baseline_balancedness=base_bal,
        cap=mp.cap, source=tuple(mp.source), baseline_phy2log=mp.baseline,
    )


def _solve_masked(windows: np.ndarray, problem: Problem, mask: np.ndarray, *, start: float, tolerance: float,
                  deterministic: bool, workers: int | None, allow_dup: bool, executor: Any, ray_address: Any,
                  prev: np.ndarray | None, mbl: float, nmc: float, bpe: int | None, objective: str) -> SolveResult:
    """``solve`` with masked GPUs: one global-policy sub-problem per active-GPU count,
    embedded back into the full map (see :mod:`eplb_opt.masked`)."""
    from . import masked as mk
    from .migrate import move_counts, transfer_list

    w = problem.weight
    L, G, R, E = problem.num_layers, problem.num_gpus, problem.num_replicas, problem.num_experts
    k = problem.slots_per_gpu
    events: list[str] = []
    if problem.policy == "hierarchical":          # only from policy="auto": solve refuses an explicit one
        events.append("masked GPUs: nodes no longer have equal GPUs, so policy 'auto' planned the layers with "
                      "the global policy over the active GPUs (as SGLang's elasticity-aware algorithm does)")
    full = np.full((L, R), -1, dtype=np.int64)
    base_full = np.full((L, R), -1, dtype=np.int64) if prev is not None else None
    top, lb = np.zeros(L), np.zeros(L)
    status = [""] * L
    cap, source = np.zeros(L), [""] * L
    comps: dict[str, np.ndarray] = {}
    glob_b = np.zeros(L)
    budget = (10.0 if problem.time_limit is None else problem.time_limit) if problem.mode == "exact" else None
    groups = mk.groups_by_active(mask)
    left_layers = L
    for idx in groups:
        a = int(G - mask[idx[0]].sum())
        # Each sub-problem gets its layers' share of the time still left.
        share = None
        if budget is not None and deterministic:
            # A deterministic budget is split by layer count alone: never by the clock.
            share = budget * len(idx) / L
        elif budget is not None:
            share = max(0.0, (start + budget - time.perf_counter()) * len(idx) / left_layers)
        left_layers -= len(idx)
        sub_w = windows[:, idx] if windows.shape[0] > 1 else windows[0][idx]
        try:
            r = solve(
                sub_w, num_replicas=k * a, num_gpus=a, mode=problem.mode, time_limit=share, seed=problem.seed,
                policy="global", deterministic=deterministic, workers=workers, tolerance=tolerance,
                allow_duplicates=allow_dup, executor=executor, ray_address=ray_address,
                previous=None if prev is None else mk.compact_previous(prev[idx], mask[idx], w[idx]),
                max_balance_loss=None if prev is None else mbl, node_move_cost=nmc, objective=objective,
            )
        except KeyboardInterrupt:
            # A sub-problem's partial plan covers some layers on fewer GPUs: not a plan
            # for the caller's problem, so none is offered.
            raise SolveInterrupted(
                "interrupted while planning around the masked GPUs; no partial plan is offered with masked_gpus",
                stage="masked sub-problems", partial=None,
            ) from None
        full[idx] = mk.embed(r.plan.phy2log.numpy(), mask[idx], k)
        top[idx], lb[idx] = r.max_load, r.lower_bound
        for i, l in enumerate(idx):
            status[l] = r.status[i]
        for name, arr in r.bounds.components.items():
            comps.setdefault(name, np.zeros(L))[idx] = arr
        glob_b[idx] = r.bounds.global_bound
        events.extend(f"{len(idx)} layer(s) with {a} active GPUs: {e}" for e in r.events)
        if prev is not None:
            base_full[idx] = mk.embed(r.migration.baseline_phy2log, mask[idx], k)
            cap[idx] = r.migration.cap
            for i, l in enumerate(idx):
                source[l] = r.migration.source[i]
    verify(full, E, R, G, allow_duplicates=allow_dup, masked=mask)
    slots = slot_loads(w, full)
    gpus = slots.reshape(L, G, -1).sum(axis=2)
    gap = np.where(top > 0, 1.0 - np.minimum(lb, top) / np.where(top > 0, top, 1.0), 0.0)
    migration = None
    if prev is not None:
        nodes = problem.num_nodes if G % problem.num_nodes == 0 else 1
        old = prev.copy()
        old[np.repeat(mask, k, axis=1)] = -1                    # masked GPUs' copies are gone
        moves, cost = move_counts(old, full, G, nodes, nmc)
        bmoves, bcost = move_counts(old, base_full, G, nodes, nmc)
        migration = Migration(
            moves=moves, cost=cost, transfers=transfer_list(old, full, G, nodes),
            bytes=None if bpe is None else int(moves.sum()) * bpe, baseline_moves=bmoves, baseline_cost=bcost,
            baseline_balancedness=balancedness(gpu_loads(w, base_full, G)), cap=cap, source=tuple(source),
            baseline_phy2log=base_full,
        )
    window_bal = None
    if windows.shape[0] > 1:
        window_bal = tuple(balancedness(gpu_loads(x, full, G)) for x in windows)
    meta = _metadata(problem, tolerance, deterministic, allow_dup, top, lb, gap, tuple(status), events,
                     workers or 1, executor)
    meta["parameters"]["masked_gpus"] = mask.tolist()
    meta["parameters"]["policy"] = "global"
    return SolveResult(
        plan=Plan.from_numpy(full, E, metadata=meta), max_load=top, mean_load=gpus.mean(axis=1), lower_bound=lb,
        gap=gap, status=tuple(status), balancedness=balancedness(gpus), slot_balancedness=balancedness(slots),
        runtime=time.perf_counter() - start, events=tuple(events), policy="global",
        bounds=Bounds(lower_bound=lb, components=comps, node_exact=False, global_bound=glob_b),
        tolerance=tolerance, migration=migration, objective=objective, window_balancedness=window_bal,
    )


def _spill_cost(value: Any, spill: bool, robust: bool, previous: Any) -> float:
    if isinstance(value, (float, np.floating)) and value == float("inf"):
        lam = float("inf")
    else:
        lam = _number("cross_node_cost", value, 0.0)
    if spill and robust:
        raise InvalidProblemError("policy='spill' with a worst/mean objective is not supported")
    if spill and previous is not None:
        raise InvalidProblemError("policy='spill' with previous is not supported")
    return lam


def _spill(problem: Problem, lam: float, allow_dup: bool) -> tuple[np.ndarray, np.ndarray]:
    """The spill policy's plan and every expert's home node ``[L, E]``."""
    from .heuristics.spill import spill_refine

    w, R, G, N = problem.weight, problem.num_replicas, problem.num_gpus, problem.num_nodes
    hier = heuristics.place(w, R, problem.num_groups, N, G, allow_duplicates=allow_dup)
    home = np.repeat(hier.node_of_group, problem.num_experts // problem.num_groups, axis=1)
    glob = heuristics.place(w, R, 1, 1, G, allow_duplicates=allow_dup).phy2log if lam < float("inf") else None
    out = spill_refine(w, hier.phy2log, home, G, N, lam, allow_duplicates=allow_dup, global_plan=glob)
    return out, home


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


def _off_share(problem: Problem, phy2log: np.ndarray, home: np.ndarray | None) -> float | None:
    if home is None:
        return None
    from .heuristics.spill import off_node_load

    total = float(problem.weight.sum())
    return float(off_node_load(problem.weight, phy2log, problem.num_nodes, home).sum() / total) if total > 0 else 0.0


def _metadata(
    problem: Problem, tol: float, deterministic: bool, allow_dup: bool, top: np.ndarray, lb: np.ndarray,
    gap: np.ndarray, status: tuple[str, ...], events: list[str], workers: int, executor: str,
) -> dict[str, Any]:
    """What a plan file records about the call that made the plan."""
    import datetime

    from . import __version__
    from .planfile import input_sha256

    return {
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input_sha256": input_sha256(problem.weight),
        "parameters": {
            "num_layers": problem.num_layers, "num_experts": problem.num_experts,
            "num_replicas": problem.num_replicas, "num_groups": problem.num_groups,
            "num_nodes": problem.num_nodes, "num_gpus": problem.num_gpus, "policy": problem.policy,
            "mode": problem.mode, "time_limit": problem.time_limit, "seed": problem.seed,
            "tolerance": tol, "deterministic": deterministic, "allow_duplicates": allow_dup,
            "workers": workers, "executor": executor or "local",
        },
        "max_load": top.tolist(), "lower_bound": lb.tolist(), "gap": gap.tolist(), "status": list(status),
        "events": list(events),
    }


# Time kept back from the refinement budget for the final verification and figures.
_FINISH_RESERVE = 0.004


def solve(
    weight: Any,
    *,
    num_replicas: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    num_gpus: int,
    mode: str = "heuristic",
    time_limit: float | None = None,
    seed: int = 0,
    policy: str = "auto",
    deterministic: bool = False,
    workers: int | None = None,
    tolerance: float = 1e-4,
    allow_duplicates: bool = True,
    executor: str | None = None,
    ray_address: str | None = None,
    previous: Any = None,
    max_balance_loss: float | None = None,
    node_move_cost: float = 4.0,
    bytes_per_expert: int | None = None,
    objective: str = "sum",
    cross_node_cost: float = 1.0,
    masked_gpus: Any = None,
) -> SolveResult:
    """Plan expert placement for every layer and certify how good it is.

    Args:
        weight: ``[L, E]`` per-expert load of each layer (tokens routed to the expert in
            the recording window; any real dtype, torch tensor on any device or numpy
            array), or ``[W, L, E]`` for ``W`` windows (see ``objective``).
            Non-negative and finite.
        num_replicas: ``R``, physical expert slots per layer; ``>= E`` and a multiple of
            ``num_gpus``.
        num_groups: expert groups (hierarchical policy: whole groups go to nodes).
        num_nodes: server nodes.
        num_gpus: GPUs in total.
        mode: ``"heuristic"`` (batched numpy pipeline, no solver, no OR-Tools import) or
            ``"exact"`` (the heuristic plan refined by exact pair re-splits and CP-SAT
            under the time limit; see :mod:`eplb_opt.exact`).
        time_limit: seconds of wall clock for the whole call.  ``None``: 10 s in exact
            mode, no limit in heuristic mode; ``0``: no refinement time.  The call returns
            within ``max(time_limit, heuristic time)`` plus a few milliseconds.
        seed: fixes every random choice.  Heuristic mode is deterministic; exact mode is
            too with ``deterministic=True``.
        policy: ``"auto"`` (hierarchical when ``num_groups % num_nodes == 0``, else
            global), ``"hierarchical"``, ``"global"`` or ``"spill"``: every expert keeps
            one replica on its group's home node (the hierarchical grouping), the others
            may go to any node at ``cross_node_cost`` per unit of load served off-node
            (:mod:`heuristics.spill`; the same search in both modes, CP-SAT is not used;
            bounds and gaps are the global policy's, valid for it).  Not combined with
            ``previous`` or a worst/mean ``objective``.
        deterministic: exact mode budgets work in iterations and CP-SAT deterministic
            time instead of wall clock (``time_limit / L`` worth per layer), so the plan
            depends only on the input, ``seed``, ``time_limit`` and ``workers`` -- not on
            the machine, its load or the executor.  The wall-clock time then only
            approximates ``time_limit`` (on this project's 2-core machine, 24.5 s for a
            20 s budget on 58 x 256 loads; less where layers reach their bound early).
        workers: CP-SAT threads (per Ray task with ``executor="ray"``).  Default: the
            cores available to this process, or 1 with ``deterministic=True`` or
            ``executor="ray"`` (so a plan does not depend on the machine).  No process is
            forked.
        tolerance: a layer is ``"optimal"`` when its certified gap is at most this, and
            exact mode does not work on such layers.
        allow_duplicates: when False, no GPU holds two replicas of one expert (both
            modes; needs at most ``E / N`` slots per GPU).
        executor: ``None`` or ``"local"`` (this process), or ``"ray"``: exact mode fans
            the layers above tolerance out as Ray tasks (see :mod:`eplb_opt.distributed`);
            each task gets the whole remaining ``time_limit``.  Needs ``pip install 'eplb-opt[ray]'``.
        ray_address: with ``executor="ray"``: ``None`` starts a local Ray instance (or
            uses the one already initialised in this process); ``"auto"`` or
            ``"ray://HOST:PORT"`` joins a cluster.
        previous: ``[L, R]`` the placement deployed now (``phy2log``).  The plan returned
            then keeps every layer's max load within ``max_balance_loss`` of the best
            plan found without it and, among those, moves the fewest expert weights
            (see :mod:`eplb_opt.migrate`; ``result.migration``, ``result.moves``,
            ``result.transfers``).  Exact mode spends part of ``time_limit`` on a CP-SAT
            model of the moves.
        max_balance_loss: with ``previous``: the fraction of max load a layer may give up
            to move less (default 0: only moves that cost no balance are saved).
        node_move_cost: with ``previous``: cost of a weight copy across nodes, in units
            of a copy within a node.
        bytes_per_expert: with ``previous``: bytes of one expert's weights, to report the
            bytes copied.
        objective: with ``weight`` ``[W, L, E]`` (``W`` windows): ``"sum"`` plans for the
            windows' total (what summing a step axis means everywhere else);
            ``"worst"`` then lowers the worst window's busiest GPU of every layer and
            ``"mean"`` the mean over windows of the busiest GPU (local search from the
            plan for the total, :mod:`heuristics.robust`; exact mode lets it run until
            ``time_limit`` instead of a fixed number of steps, CP-SAT is not used for
            these objectives).  Not combined with ``previous``.
        masked_gpus: failed or drained GPUs that must hold nothing: GPU ids (every
            layer), a ``[G]`` or ``[L, G]`` bool mask, or one id list per layer.  The
            other GPUs keep ``k`` slots each (``k * active`` replicas per layer) under the
            global policy; masked slots are ``-1`` in the plan (see
            :mod:`eplb_opt.masked`).  With ``previous``, moves are counted against it
            with the masked GPUs emptied.  With ``policy="hierarchical"`` or ``"spill"``
            an error (an explicit choice is never switched); ``"auto"`` plans the masked
            layers with the global policy and says so in ``events``.
        cross_node_cost: with ``policy="spill"``: cost per unit of load served outside
            an expert's home node, against the busiest GPU's load (the objective is
            ``max GPU load + cross_node_cost * off-node load / num_gpus``); ``inf`` gives
            the hierarchical plan, ``0`` trades locality away freely.

    Returns:
        :class:`SolveResult` with the verified plan, per-layer max loads, certified
        lower bounds, gaps, statuses and events.

    Raises:
        InvalidProblemError / InvalidTypeError: bad input (the message names it).
    """
    start = time.perf_counter()
    tol = _tolerance(tolerance)
    objective = _choice("objective", objective, OBJECTIVES)
    windows = as_weight(weight, windows=True)
    if windows.ndim == 2:
        windows = windows[None]
    problem = make_problem(
        windows.sum(axis=0) if windows.shape[0] > 1 else windows[0], num_replicas, num_groups, num_nodes,
        num_gpus, mode=mode, time_limit=time_limit, seed=seed, policy=policy, weight_checked=True,
    )
    robust = objective != "sum" and windows.shape[0] > 1
    spill = problem.policy == "spill"
    lam = _spill_cost(cross_node_cost, spill, robust, previous)
    deterministic, n_workers, allow_dup = _options(deterministic, workers, allow_duplicates, problem)
    use_ray = _executor(executor, ray_address)
    if workers is None and (deterministic or use_ray):
        n_workers = 1
    w = problem.weight
    L, G = problem.num_layers, problem.num_gpus
    prev, mbl, nmc, bpe = _migration_options(problem, previous, max_balance_loss, node_move_cost, bytes_per_expert)
    if masked_gpus is not None:
        from .masked import as_mask

        mask = as_mask(masked_gpus, L, G, problem.slots_per_gpu, problem.num_experts)
        if mask.any():
            if spill:
                raise InvalidProblemError("policy='spill' with masked_gpus is not supported")
            if policy == "hierarchical":
                # An explicit choice is never switched; policy="auto" plans around the
                # masked GPUs with the global policy (the event in _solve_masked says so).
                raise InvalidProblemError(
                    "policy='hierarchical' with masked_gpus: masked GPUs leave the nodes with unequal GPU "
                    "counts, and the hierarchical policy needs equal nodes; pass policy='global' (or "
                    "policy='auto', which plans around masked GPUs with the global policy)")
            return _solve_masked(
                windows, problem, mask, start=start, tolerance=tol, deterministic=deterministic,
                workers=workers, allow_dup=allow_dup, executor=executor, ray_address=ray_address, prev=prev,
                mbl=mbl, nmc=nmc, bpe=bpe, objective=objective,
            )
    if prev is not None and robust:
        raise InvalidProblemError(
            f"previous with objective={objective!r} is not supported: migration plans for the summed "
            "load (objective='sum')"
        )
    events: list[str] = []
    home = None
    if spill:
        phy2log, home = _spill(problem, lam, allow_dup)
    else:
        phy2log = _plan_numpy(problem, allow_dup)
    _verify(problem, phy2log, allow_dup, home=home)
    bounds = lower_bounds(
        w, problem.num_replicas, G,
        hierarchical=problem.hierarchical, num_groups=problem.num_groups, num_nodes=problem.num_nodes,
    )
    lb = bounds.lower_bound.copy()
    attempted = np.zeros(L, dtype=bool)
    conditional = None

    def finish(phy2log: np.ndarray, lb: np.ndarray, migration: Migration | None) -> SolveResult:
        slots = slot_loads(w, phy2log)
        gpus = slots.reshape(L, G, -1).sum(axis=2)
        top = gpus.max(axis=1)
        window_bal = None
        if windows.shape[0] > 1:
            per_window = np.stack([gpu_loads(x, phy2log, G) for x in windows])          # [W, L, G]
            window_bal = tuple(balancedness(x) for x in per_window)
            if robust:
                top, lb = _robust_figures(problem, windows, per_window, objective)
        lb = _consistent_bound(lb, top, problem.slots_per_gpu, bounds.lower_bound if not robust else None,
                               events)
        gap = np.where(top > 0, 1.0 - np.minimum(lb, top) / np.where(top > 0, top, 1.0), 0.0)
        status = _statuses(lb, top, problem.slots_per_gpu, tol, attempted)
        meta = _metadata(problem, tol, deterministic, allow_dup, top, lb, gap, status, events, n_workers, executor)
        if migration is not None:
            meta["migration"] = {
                "max_balance_loss": mbl, "node_move_cost": nmc, "moves": migration.moves.tolist(),
                "cost": migration.cost.tolist(), "baseline_moves": migration.baseline_moves.tolist(),
                "bytes": migration.bytes, "source": list(migration.source),
            }
        plan = Plan.from_numpy(phy2log, problem.num_experts, metadata=meta)
        return SolveResult(
            plan=plan,
            max_load=top,
            mean_load=gpus.mean(axis=1),
            lower_bound=lb,
            gap=gap,
            status=status,
            balancedness=balancedness(gpus),
            slot_balancedness=balancedness(slots),
            runtime=time.perf_counter() - start,
            events=tuple(events),
            policy=problem.policy,
            bounds=bounds,
            tolerance=tol,
            conditional_bound=conditional,
            migration=migration,
            objective=objective,
            window_balancedness=window_bal,
            off_node_share=_off_share(problem, phy2log, home),
        )

    def accept(candidate: np.ndarray, warm: np.ndarray, what: str) -> np.ndarray:
        """``candidate`` where it verifies and is nowhere worse than ``warm`` (checked,
        not assumed), else ``warm``; events say which."""
        nonlocal attempted
        try:
            _verify(problem, candidate, allow_dup)
        except EplbOptError as exc:  # pragma: no cover - a refinement bug, reported
            msg = f"{what} returned an invalid plan ({exc}); fell back to the heuristic plan"
            events.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            attempted = np.zeros(L, dtype=bool)
            return warm
        old = gpu_loads(w, warm, G).max(axis=1)
        new = gpu_loads(w, candidate, G).max(axis=1)
        worse = np.flatnonzero(new > old * (1 + 1e-12))
        if worse.size:  # pragma: no cover - defensive
            candidate = candidate.copy()
            candidate[worse] = warm[worse]
            events.append(f"kept the heuristic plan on {worse.size} layer(s) the refinement made worse")
        return candidate

    if use_ray and problem.mode != "exact":
        events.append("executor='ray' fans out exact refinement only; heuristic mode ran in this process")
    if problem.mode == "exact" and spill:
        events.append("policy='spill': CP-SAT is not used for this policy; the spill search ran as in heuristic mode")
    stage = "exact refinement"
    try:
        if problem.mode == "exact" and not robust and not spill:
            total = 10.0 if problem.time_limit is None else problem.time_limit
            # With `previous`, half the budget refines the fresh plan, half the move model.
            budget = total * (0.5 if prev is not None else 1.0)
            deadline = start + budget - _FINISH_RESERVE
            warm = phy2log
            if budget <= 0 or (not deterministic and time.perf_counter() >= deadline):
                events.append("solver skipped: no time left after the heuristic plan (time_limit)")
            else:
                common = dict(
                    num_gpus=G, num_nodes=problem.plan_nodes, num_groups=problem.plan_groups,
                    tolerance=tol, workers=n_workers, deterministic=deterministic,
                    seed=problem.seed, allow_duplicates=allow_dup, budget=budget,
                )
                from . import exact  # imports OR-Tools when a model is built

                try:
                    if use_ray:
                        from . import distributed

                        outcome, _ = distributed.refine(
                            w, phy2log, lower_bound=lb, seconds=deadline - time.perf_counter(),
                            ray_address=ray_address, **common,
                        )
                    else:
                        outcome = exact.refine(w, phy2log, lower_bound=lb, deadline=deadline, **common)
                except exact.RefineInterrupted as stop:
                    # Keep what the refinement finished (verified) for the caller.
                    out = stop.outcome
                    events.extend(out.events)
                    attempted = out.attempted
                    phy2log = accept(out.phy2log, warm, "interrupted exact refinement")
                    better = np.isfinite(out.proven) & (out.proven > lb)
                    lb[better] = out.proven[better]
                    conditional = out.conditional
                    if prev is not None:
                        raise
                    improved = int((gpu_loads(w, phy2log, G).max(axis=1)
                                    < gpu_loads(w, warm, G).max(axis=1) * (1 - 1e-12)).sum())
                    events.append(f"interrupted (KeyboardInterrupt) during exact refinement; the plan is the "
                                  f"heuristic plan improved on {improved} of {L} layer(s) before the interrupt")
                    raise SolveInterrupted(
                        "interrupted during exact refinement", stage=stage, partial=finish(phy2log, lb.copy(), None)
                    ) from None
                events.extend(outcome.events)
                attempted = outcome.attempted
                phy2log = accept(outcome.phy2log, warm, "exact refinement")
                proven = outcome.proven
                better = np.isfinite(proven) & (proven > lb)
                lb[better] = proven[better]
                conditional = outcome.conditional

        if robust:
            stage = "robust refinement"
            phy2log = _robust(problem, windows, phy2log, objective, allow_dup, deterministic, start, events)
            _verify(problem, phy2log, allow_dup)

        migration = None
        if prev is not None:
            stage = "migration planning"
            exact_time = None
            repair_deadline = None
            if problem.mode == "exact":
                total = 10.0 if problem.time_limit is None else problem.time_limit
                exact_time = (start + total - _FINISH_RESERVE, total * 0.5) if total > 0 else None
            elif problem.time_limit is not None:
                total = problem.time_limit
            if problem.time_limit is not None or problem.mode == "exact":
                # The move search keeps the call's deadline (wall clock only): layers it
                # has not reached by then keep the relabelled fresh plan, and say so.
                repair_deadline = None if deterministic else start + total - _FINISH_RESERVE
            phy2log, migration = _migrate(problem, phy2log, prev, mbl, nmc, bpe, allow_dup, events,
                                          exact_time, deterministic, n_workers, repair_deadline)
            _verify(problem, phy2log, allow_dup)
    except SolveInterrupted:
        raise
    except KeyboardInterrupt:
        # With `previous` the caller asked for a plan near it: the fresh plan is not one.
        if prev is not None:
            raise SolveInterrupted(
                f"interrupted during {stage}; no plan near `previous` was finished", stage=stage, partial=None
            ) from None
        events.append(f"interrupted (KeyboardInterrupt) during {stage}; the plan is the last one finished")
        raise SolveInterrupted(
            f"interrupted during {stage}", stage=stage, partial=finish(phy2log, lb.copy(), None)
        ) from None

    return finish(phy2log, lb, migration)


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
    log2phy, logcnt = derive_maps(phy2log, problem.num_experts)
    _verify(problem, phy2log, logcnt=logcnt)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
