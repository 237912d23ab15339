"""Grade any EPLB heuristic against eplb-opt's certified bounds (``eplb-opt score``).

The candidate is a callable with DeepSeek's signature
``fn(weight, num_replicas, num_groups, num_nodes, num_gpus)`` returning ``phy2log``
``[L, R]`` or the triple ``(phy2log, log2phy, logcnt)``.  On every workload of a suite
it is called on window 0 (a ``torch.float64`` CPU tensor); its plan is checked against
the declared policy's rules (a crash, an exception or a broken rule is recorded, never
hidden) and scored: balancedness in-window and on the next window, slot-level
balancedness, every layer's gap to eplb-opt's certified lower bound, and time (median of
repeats).  eplb-opt's own modes are scored on the same input beside it.

Policies: ``"auto"`` calls the candidate with the preset's topology and checks the
hierarchical rules where ``num_groups % num_nodes == 0`` (as DeepSeek and vLLM decide);
``"hierarchical"`` checks them everywhere; ``"global"`` calls the candidate with
``num_groups = num_nodes = 1``, DeepSeek's way of asking for the global policy.
"""

from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import sys

import numpy as np

from .bounds import lower_bounds
from .errors import InvalidProblemError, InvalidTypeError
from .metrics import balancedness, gpu_loads, slot_loads
from .suites import SUITES, Suite, Workload, workloads

__all__ = ["Score", "Evaluation", "candidate_maps", "candidate_phy2log", "evaluate", "score_plan"]


@dataclass
class Score:
    """One contender on one workload."""

    workload: str
    contender: str
    valid: bool
    problem: str | None = None            # crash or broken rule
    balancedness: float | None = None
    next_balancedness: float | None = None
    slot_balancedness: float | None = None
    gap_max: float | None = None
    gap_mean: float | None = None
    time_s: float | None = None


@dataclass
class Evaluation:
    """All scores of an evaluation; ``invalid`` counts crashed or invalid candidate plans."""

    suite: str
    policy: str
    candidate: str
    scores: list[Score] = field(default_factory=list)

    @property
    def invalid(self) -> int:
        return sum(not s.valid for s in self.scores if s.contender == self.candidate)

    def table(self) -> str:
        head = (
            f"{'workload':28} {'contender':26} {'valid':>5} {'bal':>8} {'next':>8} {'slot':>8} "
            f"{'gap max':>8} {'gap mean':>8} {'time':>9}"
        )
        rows = [head, "-" * len(head)]
        for s in self.scores:
            if not s.valid:
                rows.append(f"{s.workload:28} {s.contender:26} {'NO':>5}  {s.problem}")
                continue
            rows.append(
                f"{s.workload:28} {s.contender:26} {'yes':>5} {s.balancedness:8.5f} {s.next_balancedness:8.5f} "
                f"{s.slot_balancedness:8.5f} {s.gap_max:8.3%} {s.gap_mean:8.4%} {s.time_s * 1e3:7.1f}ms"
            )
        return "\n".join(rows)

    def summary(self) -> str:
        lines = []
        for who in dict.fromkeys(s.contender for s in self.scores):
            mine = [s for s in self.scores if s.contender == who]
            ok = [s for s in mine if s.valid]
            bad = len(mine) - len(ok)
            if ok:
                lines.append(
                    f"{who}: {len(ok)}/{len(mine)} valid, mean balancedness {np.mean([s.balancedness for s in ok]):.5f} "
                    f"(next window {np.mean([s.next_balancedness for s in ok]):.5f}), worst gap "
                    f"{max(s.gap_max for s in ok):.3%}, median time {statistics.median(s.time_s for s in ok) * 1e3:.1f} ms"
                    + (f"; {bad} crashed or invalid" if bad else "")
                )
            else:
                lines.append(f"{who}: all {len(mine)} plans crashed or invalid")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "policy": self.policy, "candidate": self.candidate,
                "invalid": self.invalid, "scores": [asdict(s) for s in self.scores]}


def candidate_phy2log(out: Any) -> np.ndarray:
    """The ``[L, R]`` int64 ``phy2log`` of a candidate's return value: ``phy2log`` itself
    or the first of ``(phy2log, log2phy, logcnt)``, numpy or torch.

    Raises:
        TypeError: an empty tuple, or ``phy2log`` not of an integer dtype.
    """
    if isinstance(out, (tuple, list)):
        if not out:
            raise TypeError("returned an empty tuple")
        out = out[0]
    torch = sys.modules.get("torch")     # a tensor implies torch is loaded
    if torch is not None and isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    arr = np.asarray(out)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"phy2log must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def candidate_maps(out: Any) -> dict[str, Any]:
    """``{"log2phy": ..., "logcnt": ...}`` from a candidate's ``(phy2log, log2phy, logcnt)``
    return value, for :func:`score_plan`'s ``maps``; ``{}`` when it returned ``phy2log``
    alone."""
    if isinstance(out, (tuple, list)) and len(out) == 3:
        return {"log2phy": out[1], "logcnt": out[2]}
    return {}


def score_plan(
    phy2log: np.ndarray,
    wl: Workload,
    *,
    hierarchical: bool,
    bound: np.ndarray,
    contender: str,
    time_s: float,
    maps: dict[str, Any] | None = None,
) -> Score:
    """Check and score one plan of ``wl`` (window 0 in-window, window 1 next)."""
    p = wl.preset
    from .plan import plan_violations  # (torch: imported only when plans are checked)

    problems = plan_violations(
        phy2log, p.num_experts, p.num_replicas, p.num_gpus, num_groups=p.num_groups,
        num_nodes=p.num_nodes, hierarchical=hierarchical, num_layers=wl.windows.shape[1], **(maps or {}),
    )
    if problems:
        return Score(wl.name, contender, False, problem="; ".join(problems[:3]), time_s=time_s)
    w0, w1 = wl.windows[0], wl.windows[1]
    g0 = gpu_loads(w0, phy2log, p.num_gpus)
    top = g0.max(axis=1)
    gap = np.where(top > 0, 1 - np.minimum(bound, top) / np.where(top > 0, top, 1), 0.0)
    return Score(
        wl.name, contender, True,
        balancedness=balancedness(g0),
        next_balancedness=balancedness(gpu_loads(w1, phy2log, p.num_gpus)),
        slot_balancedness=balancedness(slot_loads(w0, phy2log)),
        gap_max=float(gap.max()), gap_mean=float(gap.mean()), time_s=time_s,
    )


def _run(fn: Callable[..., Any], args: tuple, repeats: int) -> tuple[Any, float, str | None]:
    """Call ``fn(*args)`` ``repeats`` times; ``(last output, median seconds, crash)``."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - a crashing candidate is recorded
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
            return None, time.perf_counter() - t, f"crashed: {type(exc).__name__}: {exc}{where}"
        times.append(time.perf_counter() - t)
    return out, statistics.median(times), None


def evaluate(
    fn: Callable[..., Any],
    suite: str | Suite = "quick",
    *,
    policy: str = "auto",
    name: str | None = None,
    repeats: int | None = None,
    modes: Iterable[str] = ("heuristic", "exact"),
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Score ``fn`` on every workload of ``suite`` beside eplb-opt's modes.

    Args:
        fn: ``fn(weight, num_replicas, num_groups, num_nodes, num_gpus)`` returning
            ``phy2log`` or ``(phy2log, log2phy, logcnt)``.
        suite: ``"quick"``, ``"full"`` or a :class:`~eplb_opt.suites.Suite`.
        policy: ``"auto"``, ``"hierarchical"`` or ``"global"`` (see module docs).
        name: the candidate's name in the report (default: its ``__name__``).
        repeats: timing repeats (default: the suite's).
        modes: eplb-opt modes scored beside it (exact mode with the suite's time).
        progress: called with a line per workload.

    Returns:
        :class:`Evaluation`; ``evaluation.invalid`` counts crashes and invalid plans.
    """
    from .api import solve

    if policy not in ("auto", "hierarchical", "global"):
        raise InvalidProblemError(f"policy must be 'auto', 'hierarchical' or 'global', got {policy!r}")
    if not callable(fn):
        raise InvalidTypeError(f"fn must be callable, got {type(fn).__name__}")
    modes = tuple(modes)
    s = SUITES[suite] if isinstance(suite, str) else suite
    label = name or getattr(fn, "__qualname__", getattr(fn, "__name__", "candidate"))
    ev = Evaluation(s.name, policy, label)
    reps = s.repeats if repeats is None else repeats
    for wl in workloads(s):
        p = wl.preset
        hier = (p.num_groups % p.num_nodes == 0) if policy == "auto" else policy == "hierarchical"
        groups, nodes = (p.num_groups, p.num_nodes) if policy != "global" else (1, 1)
        bound = lower_bounds(
            wl.windows[0], p.num_replicas, p.num_gpus, hierarchical=hier,
            num_groups=p.num_groups, num_nodes=p.num_nodes,
        ).lower_bound
        import torch

        weight = torch.from_numpy(np.ascontiguousarray(wl.windows[0]))
        out, secs, crash = _run(fn, (weight, p.num_replicas, groups, nodes, p.num_gpus), reps)
        if crash is not None:
            ev.scores.append(Score(wl.name, label, False, problem=crash, time_s=secs))
        else:
            try:
                p2l = candidate_phy2log(out)
                ev.scores.append(score_plan(p2l, wl, hierarchical=hier, bound=bound, contender=label,
                                            time_s=secs, maps=candidate_maps(out)))
            except (TypeError, ValueError) as exc:
                ev.scores.append(Score(wl.name, label, False, problem=f"bad output: {exc}", time_s=secs))
        for mode in modes:
            kw = {"time_limit": s.exact_time} if mode == "exact" else {}
            pol = "hierarchical" if hier else "global"
            t = time.perf_counter()
            r = solve(wl.windows[0], **p.topology(), mode=mode, policy=pol, **kw)
            secs_m = time.perf_counter() - t
            ev.scores.append(score_plan(r.plan.phy2log.numpy(), wl, hierarchical=hier, bound=bound,
                                        contender=f"eplb-opt {mode}", time_s=secs_m))
        if progress:
            mine = ev.scores[-1 - len(modes)]
            progress(f"{wl.name}: {'valid' if mine.valid else 'INVALID'}"
                     + (f", balancedness {mine.balancedness:.5f}" if mine.valid else f" ({mine.problem})"))
    return ev
