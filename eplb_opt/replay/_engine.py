"""The replay loop: plans at every rebalance, their moves, and their loads on every step.

A step's MoE time proxy is ``sum_l max_g`` of its GPU loads under the placement deployed
at that step (:class:`Scorer`, scored a chunk of steps at a time).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ._policies import PlanRequest, PolicyError, ReplayPolicy, Topology, plan_array
from ._source import History, TraceSource

__all__ = ["INITIAL_DESCRIPTIONS", "Context", "Scorer", "copy_split", "obeys_policy", "replay_interval",
           "round_robin_placement"]


def round_robin_placement(topo: Topology) -> np.ndarray:
    """``[L, R]``: slot ``j`` of node ``n`` holds expert ``n * E / N + (j mod E / N)`` (``N``
    nodes under the hierarchical rule, else 1), i.e. each node its own groups' experts in
    order, the spare slots going round again.  On one node (or the global policy) that is
    ``r mod E``: SGLang's ``trivial`` start-up placement and vLLM's initial one."""
    n = topo.num_nodes if topo.hierarchical else 1
    per_node, experts = topo.num_replicas // n, topo.num_experts // n
    r = np.arange(topo.num_replicas)
    row = (r // per_node) * experts + (r % per_node) % experts
    out = np.broadcast_to(row, (topo.num_layers, topo.num_replicas)).copy()
    out.setflags(write=False)
    return out


INITIAL_DESCRIPTIONS = {
    "plan": ("plan: each policy starts from its own plan of the first {n} steps (summed; it sees the first steps it "
             "serves, the same for every policy, and is deployed before serving starts, so it copies nothing); the "
             "clairvoyant plan from its plan of the first served window; the static baseline is eplb-opt's "
             "heuristic plan of the first {n} steps"),
    "round_robin": ("round robin, for every run: slot j of node n holds expert n*E/N + (j mod E/N) (N: nodes under "
                    "the hierarchical rule, else 1, giving r mod E: SGLang's trivial start-up placement)"),
}


def gpu_counts(plan: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """``[L, G, E]`` int64: replicas of each expert on each GPU."""
    L, R = plan.shape
    gpu = np.arange(R) // (R // num_gpus)
    keys = (np.arange(L)[:, None] * num_gpus + gpu[None, :]) * num_experts + plan
    return np.bincount(keys.ravel(), minlength=L * num_gpus * num_experts).reshape(L, num_gpus, num_experts)


class Scorer:
    """GPU loads of one placement, computed as :func:`eplb_opt.gpu_loads` computes them
    (each slot carries ``w / c`` of its expert, a GPU sums its ``k`` slots in order), so
    the figures match it bit for bit; no BLAS product (its summation order would depend
    on the thread count)."""

    def __init__(self, plan: np.ndarray, num_experts: int, num_gpus: int) -> None:
        L, R = plan.shape
        E = num_experts
        counts = np.zeros((L, E), dtype=np.float64)
        np.add.at(counts, (np.arange(L)[:, None], plan), 1.0)
        self.index = (np.arange(L)[:, None] * E + plan).ravel()
        self.divisor = counts[np.arange(L)[:, None], plan]            # [L, R] replicas of each slot's expert
        self.shape = (L, num_gpus, R // num_gpus)

    def gpu_loads(self, w: np.ndarray) -> np.ndarray:
        """``[..., L, G]`` GPU loads of loads ``w [..., L, E]``."""
        lead = w.shape[:-2]
        s = np.take(w.reshape(*lead, -1), self.index, axis=-1).reshape(*lead, *self.divisor.shape)
        s /= self.divisor
        return s.reshape(*lead, *self.shape).sum(axis=-1)

    def step_max_load(self, w: np.ndarray) -> np.ndarray:
        """``[steps]``: ``sum_l max_g`` GPU load of each step of ``w [steps, L, E]``."""
        return self.gpu_loads(w).max(axis=-1).sum(axis=-1)

    def window_max_load(self, wsum: np.ndarray) -> float:
        """``sum_l max_g`` GPU load of summed loads ``wsum [L, E]``."""
        return float(self.gpu_loads(wsum).max(axis=-1).sum())


def copy_split(old: np.ndarray, new: np.ndarray, topo: Topology) -> tuple[np.ndarray, np.ndarray]:
    """``([G], [G])``: replicas each GPU receives (summed over layers) from within its own
    node and from another node.  A moved replica (expert ``e`` on a GPU that held no ``e``
    before) is same-node when some replica of ``e`` lived on that GPU's node in ``old``,
    else cross-node."""
    E, G, N = topo.num_experts, topo.num_gpus, topo.num_nodes
    co, cn = gpu_counts(old, E, G), gpu_counts(new, E, G)
    moved = np.where(co == 0, cn, 0)
    on_node = co.reshape(co.shape[0], N, G // N, E).sum(axis=2) > 0
    same_mask = np.repeat(on_node, G // N, axis=1)
    return (moved * same_mask).sum(axis=(0, 2)), (moved * ~same_mask).sum(axis=(0, 2))


def obeys_policy(plan: np.ndarray, topo: Topology) -> bool:
    """Under the hierarchical rule: every group's replicas on one node, ``num_groups / N``
    groups per node (what the certified bound assumes).  Always True for the global rule."""
    if not topo.hierarchical or topo.num_nodes == 1:
        return True
    L, R = plan.shape
    N, Gr = topo.num_nodes, topo.num_groups
    node = np.broadcast_to(np.arange(R) // (R // N), plan.shape)
    group = plan // (topo.num_experts // Gr)
    present = np.zeros((L, Gr, N), dtype=bool)
    present[np.arange(L)[:, None], group, node] = True
    return bool((present.sum(axis=2) == 1).all() and (present.sum(axis=1) == Gr // N).all())


@dataclass
class Context:
    """What every interval of one replay shares."""

    source: TraceSource
    topo: Topology
    chunk: int
    link_bytes_per_s: tuple[float, float] | None      # (same node, cross node); None: no time model
    bytes_per_expert: int
    progress: "Progress"
    initial: str                                       # "plan" or "round_robin"
    initial_steps: int                                 # "plan": the first plans see steps 0 .. initial_steps - 1
    plan_cache: dict[tuple[str, int, int], tuple[np.ndarray, float]] = field(default_factory=dict)
    first_plans: dict[str, np.ndarray] = field(default_factory=dict)   # run -> its first plan (any interval)

    def copy_seconds(self, same: np.ndarray, cross: np.ndarray) -> float:
        """The slowest GPU's receive time: its same-node bytes over NVLink plus its
        cross-node bytes over InfiniBand."""
        if self.link_bytes_per_s is None:
            return 0.0
        nv, ib = self.link_bytes_per_s
        per_gpu = (same * self.bytes_per_expert) / nv + (cross * self.bytes_per_expert) / ib
        return float(per_gpu.max(initial=0.0))


class Run:
    """One placement sequence (a policy, or a baseline) over one interval's windows."""

    def __init__(self, name: str, placement: np.ndarray, steps: int, windows: int, ctx: Context) -> None:
        self.name = name
        self.deployed = placement
        self.scorer = Scorer(placement, ctx.topo.num_experts, ctx.topo.num_gpus)
        self.max_load = np.zeros(steps)
        self.window_max_load = np.zeros(windows)
        self.events: list[tuple[int, int, int, int, float, float]] = []
        self.obeys = obeys_policy(placement, ctx.topo)
        self.failed: str | None = None

    def start_with(self, plan: np.ndarray, ctx: Context) -> None:
        """Serve ``plan`` from step 0 (deployed before serving starts: no copies counted)."""
        plan.setflags(write=False)
        self.deployed = plan
        self.scorer = Scorer(plan, ctx.topo.num_experts, ctx.topo.num_gpus)
        self.obeys = obeys_policy(plan, ctx.topo)

    def deploy(self, step: int, plan: np.ndarray, plan_s: float, ctx: Context) -> None:
        """Align ``plan`` to the deployed placement, count and classify its moves, deploy it."""
        from ..align import align_to_previous, count_moves

        topo = ctx.topo
        aligned = align_to_previous(plan, self.deployed, topo.num_gpus, topo.num_nodes if topo.hierarchical else 1)
        aligned.setflags(write=False)
        moves = int(count_moves(self.deployed, aligned, topo.num_gpus).sum())
        same, cross = copy_split(self.deployed, aligned, topo)
        self.events.append((step, moves, int(same.sum()), int(cross.sum()), ctx.copy_seconds(same, cross), plan_s))
        self.obeys = self.obeys and obeys_policy(aligned, topo)
        self.deployed = aligned
        self.scorer = Scorer(aligned, topo.num_experts, topo.num_gpus)


def _plan(policy: ReplayPolicy, run: Run, step: int, history: History, ctx: Context) -> tuple[np.ndarray, float]:
    """The policy's plan (reused from an earlier interval when it ignores the deployed
    placement and saw the same history) and the seconds it took."""
    key = (policy.name, history.start, history.stop)
    if not policy.uses_deployed and key in ctx.plan_cache:
        return ctx.plan_cache[key]
    req = PlanRequest(step=step, history=history, deployed=run.deployed, topology=ctx.topo)
    t0 = time.perf_counter()
    out = policy.plan(req)
    plan_s = time.perf_counter() - t0
    result = (plan_array(out, ctx.topo, policy.name), plan_s)
    if not policy.uses_deployed:
        ctx.plan_cache[key] = result
    return result


def _rebalance(policies: list[ReplayPolicy], runs: dict[str, Run], step: int, history: History, ctx: Context) -> None:
    for policy in policies:
        run = runs[policy.name]
        if run.failed is not None:
            continue
        try:
            plan, plan_s = _plan(policy, run, step, history, ctx)
        except Exception as exc:  # noqa: BLE001 - a crashing policy is reported, the others go on
            kind = "bad output" if isinstance(exc, PolicyError) else f"crashed: {type(exc).__name__}"
            run.failed = f"step {step}: {kind}: {exc}"
            continue
        run.deploy(step, plan, plan_s, ctx)


def _heuristic(wsum: np.ndarray, ctx: Context) -> np.ndarray:
    from .. import solve

    return plan_array(solve(wsum, **ctx.topo.solve_kwargs(), mode="heuristic").plan.phy2log, ctx.topo, "clairvoyant")


def _clairvoyant(run: Run, step: int, wsum: np.ndarray, ctx: Context) -> None:
    t0 = time.perf_counter()
    plan = _heuristic(wsum, ctx)
    run.deploy(step, plan, time.perf_counter() - t0, ctx)


def _start(policies: list[ReplayPolicy], runs: dict[str, Run], first: np.ndarray, ctx: Context) -> None:
    """``initial="plan"``: every run's own first placement (``first``: the first served
    window's sum, for the clairvoyant plan)."""
    history = History(ctx.source, 0, ctx.initial_steps, ctx.chunk)
    if "static" not in ctx.first_plans:
        ctx.first_plans["static"] = _heuristic(history.summed(), ctx)
    runs["static"].start_with(ctx.first_plans["static"].copy(), ctx)
    if "clairvoyant" in runs:
        runs["clairvoyant"].start_with(_heuristic(first, ctx), ctx)
    for policy in policies:
        run = runs[policy.name]
        try:                                   # the same request at every interval: planned once
            if policy.name not in ctx.first_plans:
                ctx.first_plans[policy.name] = _plan(policy, run, 0, history, ctx)[0]
        except Exception as exc:  # noqa: BLE001 - a crashing policy is reported, the others go on
            kind = "bad output" if isinstance(exc, PolicyError) else f"crashed: {type(exc).__name__}"
            run.failed = f"step 0 (its first plan): {kind}: {exc}"
            continue
        run.start_with(ctx.first_plans[policy.name].copy(), ctx)


def replay_interval(ctx: Context, policies: list[ReplayPolicy], interval: int, window: int,
                    clairvoyant: bool) -> tuple[dict[str, Run], np.ndarray, np.ndarray, np.ndarray]:
    """Replay the whole trace at one interval: ``(runs by name, window edges [n + 1],
    certified bound [n] and global-policy bound [n] of each served window)``."""
    from .. import lower_bounds

    T = ctx.source.shape[0]
    topo = ctx.topo
    edges = np.array(list(range(0, T, interval)) + [T], dtype=np.int64)
    n = len(edges) - 1
    names = ["static"] + (["clairvoyant"] if clairvoyant else []) + [p.name for p in policies]
    runs = {name: Run(name, round_robin_placement(topo), T, n, ctx) for name in names}
    bound, global_bound = np.zeros(n), np.zeros(n)
    for i in range(n):
        a, b = int(edges[i]), int(edges[i + 1])
        ctx.progress.update(interval, a, T)
        wsum = ctx.source.sum(a, b, ctx.chunk)
        if i == 0 and ctx.initial == "plan":
            _start(policies, runs, wsum, ctx)
        if i > 0:
            _rebalance(policies, runs, a, History(ctx.source, max(0, a - window), a, ctx.chunk), ctx)
            if clairvoyant:
                _clairvoyant(runs["clairvoyant"], a, wsum, ctx)
        lb = lower_bounds(wsum, topo.num_replicas, topo.num_gpus, hierarchical=topo.hierarchical,
                          num_groups=topo.num_groups, num_nodes=topo.num_nodes)
        bound[i], global_bound[i] = float(lb.lower_bound.sum()), float(lb.global_bound.sum())
        live = [r for r in runs.values() if r.failed is None]
        for r in live:
            r.window_max_load[i] = r.scorer.window_max_load(wsum)
        for c0, w in ctx.source.chunks(a, b, ctx.chunk):
            for r in live:
                r.max_load[c0:c0 + len(w)] = r.scorer.step_max_load(w)
    return runs, edges, bound, global_bound


class Progress:
    """Progress on stderr: a line rewritten in place on a terminal, else a line every
    few seconds; nothing when disabled."""

    def __init__(self, enabled: bool, intervals: list[int]) -> None:
        self.enabled, self.intervals = enabled, intervals
        self.tty = enabled and sys.stderr.isatty()
        self._last = 0.0
        self._t0 = time.perf_counter()

    def update(self, interval: int, step: int, steps: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < (0.5 if self.tty else 5.0):
            return
        self._last = now
        k = self.intervals.index(interval) + 1
        msg = (f"replay: interval {interval} ({k}/{len(self.intervals)}): step {step}/{steps} "
               f"({step / steps:.0%}), {now - self._t0:.0f} s")
        sys.stderr.write(("\r" + msg.ljust(79)) if self.tty else msg + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            msg = f"replay: done in {time.perf_counter() - self._t0:.1f} s"
            sys.stderr.write(("\r" + msg.ljust(79) + "\n") if self.tty else msg + "\n")
            sys.stderr.flush()
