"""The outcome of :func:`eplb_opt.solve`: :class:`SolveResult`, and
:func:`build_result`, the one function every path of ``solve`` ends in.

It measures the final plan (loads, balancedness, window figures), checks the certified
bound against it, sets each layer's status, records the call in the plan's metadata and
returns the frozen result.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bounds import Bounds, lower_bounds
from .metrics import balancedness, gap as certified_gap, gpu_loads, layer_marks, slot_gpu_loads
from .plan import LazyMetadata, Plan
from .problem import Problem, SolveOptions

__all__ = ["SolveResult", "build_result"]


@dataclass(frozen=True)
class Migration:
    """How a plan made with ``previous`` moves expert weights (see :mod:`eplb_opt.migrate`, which computes it).

    Attributes:
        moves: ``[L]`` replicas placed on a GPU that did not hold them before.
        cost: ``[L]`` moves weighted by ``node_move_cost`` where the copy crosses nodes.
        transfers: structured array of :data:`~eplb_opt.migrate.TRANSFER_DTYPE` rows
            ``(layer, expert, src_gpu, dst_gpu, dst_slot)``, one per weight copy.
        bytes: total bytes copied (``moves.sum() * bytes_per_expert``), or None when
            ``bytes_per_expert`` was not given.
        baseline_moves, baseline_cost: the same for the fair baseline, the full replan
            with its nodes and GPUs relabelled to match ``previous``.
        baseline_balancedness: that baseline's balancedness (the best plan found
            without ``previous``).
        cap: ``[L]`` the max-load cap every layer was held to.
        baseline_phy2log: ``[L, R]`` the relabelled full replan itself.
        source: per layer ``"old"`` (nothing moved), ``"repair"`` (old placement
            repaired), ``"exact"`` (CP-SAT) or ``"replan"`` (the relabelled replan).
    """

    moves: np.ndarray
    cost: np.ndarray
    transfers: np.ndarray
    bytes: int | None
    baseline_moves: np.ndarray
    baseline_cost: np.ndarray
    baseline_balancedness: float
    cap: np.ndarray
    baseline_phy2log: np.ndarray
    source: tuple[str, ...]

    def summary(self) -> str:
        """One line: moves against the relabelled replan."""
        m, b = int(self.moves.sum()), int(self.baseline_moves.sum())
        ratio = f" ({m / b:.1%} of it)" if b else ""
        extra = f", {self.bytes / 2**30:.2f} GiB" if self.bytes is not None else ""
        return (f"migration: {m} replica moves (cost {self.cost.sum():g}{extra}) against {b} for the "
                f"relabelled full replan{ratio}")


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


def _balancedness(mean: np.ndarray, top: np.ndarray) -> float:
    """:func:`~eplb_opt.metrics.balancedness` of loads whose row means and maxima are
    ``mean`` and ``top`` (the same arithmetic, without taking the means again)."""
    t = top.sum()
    return 1.0 if t <= 0 else float(mean.sum() / t)


def _ratio(a: np.ndarray, b: np.ndarray) -> float:
    tb = float(np.sum(b))
    return 1.0 if tb <= 0 else float(np.sum(a) / tb)


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
    return tuple("optimal" if o else ("feasible" if a else "heuristic")
                 for o, a in zip(ok.tolist(), np.asarray(attempted).tolist()))


_STATUS = ("heuristic", "feasible", "optimal")


def _marked(gpus: np.ndarray, slots: np.ndarray, lower_bound: np.ndarray, attempted: np.ndarray, problem: Problem,
            options: SolveOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], float, float] | None:
    """``(top, mean, gap, status, balancedness, slot_balancedness)`` of a plan's GPU and
    slot loads against a bound consistent with it, computed as :func:`_consistent_bound`,
    :func:`_statuses`, :func:`~eplb_opt.metrics.gap` and
    :func:`~eplb_opt.metrics.balancedness` compute them, in one kernel pass
    (:func:`~eplb_opt.metrics.layer_marks`, given their constants); ``None`` where a
    bound is inconsistent or the rows are too long (those functions then run)."""
    k = problem.slots_per_gpu
    marks = layer_marks(gpus, slots, lower_bound, attempted, 1 + (k + 2) * _EPS, 1.0 - options.tolerance,
                        1 + 4 * _EPS)
    if marks is None:
        return None
    top, mean, gap, code, bal, slot_bal = marks
    return top, mean, gap, tuple(_STATUS[c] for c in code.tolist()), bal, slot_bal


def _created(stamp: float) -> str:
    """``stamp`` (``time.time()``) as the plan file's ``created`` field: UTC, ISO 8601,
    to the second."""
    import datetime

    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(timespec="seconds")


def _metadata(problem: Problem, options: SolveOptions, top: np.ndarray, lb: np.ndarray, gap: np.ndarray,
              status: tuple[str, ...], events: list[str]) -> dict[str, Any]:
    """What a plan file records about the call that made the plan."""
    from . import __version__

    return {
        "library_version": __version__,
        "created": None,            # the call's time, formatted on first read (build_result)
        "input_sha256": None,       # computed on first read (build_result: LazyMetadata)
        "parameters": {
            "num_layers": problem.num_layers, "num_experts": problem.num_experts,
            "num_replicas": problem.num_replicas, "num_groups": problem.num_groups,
            "num_nodes": problem.num_nodes, "num_gpus": problem.num_gpus, "policy": problem.policy,
            "mode": problem.mode, "time_limit": problem.time_limit, "seed": problem.seed,
            "tolerance": options.tolerance, "deterministic": options.deterministic,
            "allow_duplicates": options.allow_duplicates, "workers": options.workers,
            "executor": options.executor or "local",
        },
        "max_load": top.tolist(), "lower_bound": lb.tolist(), "gap": gap.tolist(), "status": list(status),
        "events": list(events),
    }


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


def _off_share(problem: Problem, phy2log: np.ndarray, home: np.ndarray | None) -> float | None:
    if home is None:
        return None
    from .heuristics.spill import off_node_load

    total = float(problem.weight.sum())
    return float(off_node_load(problem.weight, phy2log, problem.num_nodes, home).sum() / total) if total > 0 else 0.0


@dataclass(frozen=True)
class LayerFigures:
    """Per-layer figures already settled by sub-problems (masked GPUs): ``max_load``,
    ``lower_bound`` and ``status``, each ``[L]``."""

    max_load: np.ndarray
    lower_bound: np.ndarray
    status: tuple[str, ...]


def _layer_figures(problem: Problem, options: SolveOptions, phy2log: np.ndarray, gpus: np.ndarray,
                   per_window: np.ndarray | None, lower_bound: np.ndarray, bounds: Bounds,
                   attempted: np.ndarray, events: list[str]) -> LayerFigures:
    """Busiest GPU, certified bound (checked against the plan) and status per layer."""
    top = gpus.max(axis=1)
    lb = lower_bound
    if options.robust:
        top, lb = _robust_figures(problem, options.windows, per_window, options.objective)
    lb = _consistent_bound(lb, top, problem.slots_per_gpu, bounds.lower_bound if not options.robust else None,
                           events)
    status = _statuses(lb, top, problem.slots_per_gpu, options.tolerance, attempted)
    return LayerFigures(top, lb, status)


def build_result(
    problem: Problem, options: SolveOptions, start: float, phy2log: np.ndarray, *, bounds: Bounds,
    lower_bound: np.ndarray, events: list[str], attempted: np.ndarray | None = None,
    conditional: np.ndarray | None = None, migration: Migration | None = None, home: np.ndarray | None = None,
    settled: LayerFigures | None = None, policy: str | None = None, parameters: dict[str, Any] | None = None,
) -> SolveResult:
    """The :class:`SolveResult` of a verified plan ``phy2log`` ``[L, R]``.

    Args:
        problem, options: the validated call (:func:`eplb_opt.problem.validate_solve`).
        start: ``time.perf_counter()`` at the start of the call (for ``runtime``).
        bounds, lower_bound: the closed-form bounds and the ``[L]`` certified bound so
            far (solver proofs merged in).
        events: the call's notes (appended to when a bound is inconsistent).
        attempted: ``[L]`` layers a solver worked on (``"feasible"`` rather than
            ``"heuristic"`` when not optimal).
        conditional, migration, home: exact mode's conditional bounds, the migration
            figures with ``previous``, the spill policy's home nodes.
        settled: per-layer figures settled by sub-problems (then not recomputed).
        policy, parameters: override the policy reported and add plan-file parameters.
    """
    L, G = problem.num_layers, problem.num_gpus
    slots, gpus = slot_gpu_loads(problem.weight, phy2log, G)
    windows = options.windows
    per_window = window_bal = None
    if windows.shape[0] > 1:
        per_window = np.stack([gpu_loads(x, phy2log, G) for x in windows])          # [W, L, G]
        window_bal = tuple(balancedness(x) for x in per_window)
    att = np.zeros(L, dtype=bool) if attempted is None else attempted
    marks = None if settled is not None or options.robust else _marked(gpus, slots, lower_bound, att, problem, options)
    if marks is not None:                    # the common case: every figure in one kernel pass
        busiest, mean, gap, status, bal, slot_bal = marks
        settled = LayerFigures(busiest, lower_bound, status)
    else:
        busiest, mean = gpus.max(axis=1), gpus.mean(axis=1)
        bal, slot_bal = _balancedness(mean, busiest), balancedness(slots)
        if settled is None:
            settled = _layer_figures(problem, options, phy2log, gpus, per_window, lower_bound, bounds, att, events)
        gap = certified_gap(settled.lower_bound, settled.max_load)
    top, lb, status = settled.max_load, settled.lower_bound, settled.status
    meta = _metadata(problem, options, top, lb, gap, status, events)
    meta["parameters"].update(parameters or {})
    if migration is not None:
        meta["migration"] = {
            "max_balance_loss": options.max_balance_loss, "node_move_cost": options.node_move_cost,
            "moves": migration.moves.tolist(), "cost": migration.cost.tolist(),
            "baseline_moves": migration.baseline_moves.tolist(), "bytes": migration.bytes,
            "source": list(migration.source),
        }
    from .planfile import input_sha256

    meta = LazyMetadata(meta, {"input_sha256": (input_sha256, (problem.weight,)), "created": (_created, (time.time(),))})
    return SolveResult(
        plan=Plan.from_numpy(phy2log, problem.num_experts, metadata=meta), max_load=top,
        mean_load=mean, lower_bound=lb, gap=gap, status=status, balancedness=bal,
        slot_balancedness=slot_bal, runtime=time.perf_counter() - start, events=tuple(events),
        policy=policy or problem.policy, bounds=bounds, tolerance=options.tolerance, conditional_bound=conditional,
        migration=migration, objective=options.objective, window_balancedness=window_bal,
        off_node_share=_off_share(problem, phy2log, home),
    )
