"""What :func:`eplb_opt.replay` returns: per-step and per-rebalance figures of every run,
and their totals against the static placement, the clairvoyant plan and the bound."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

__all__ = ["LEGEND", "ReplayResult", "ReplayRun", "TimeModel", "legend"]


def _frozen(a: Any, dtype: Any = np.float64) -> np.ndarray:
    out = np.array(a, dtype=dtype)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class TimeModel:
    """Turns loads into seconds and copies into transfer time.

    Attributes:
        gpu_tokens_per_s: tokens (token-expert assignments) one GPU pushes through one
            MoE layer's experts per second; a layer's step time is its busiest GPU's load
            divided by this.
        same_node_gbps: GB/s (1e9 bytes) a GPU receives over its node's links (NVLink).
        cross_node_gbps: GB/s a GPU receives from other nodes (InfiniBand).
    """

    gpu_tokens_per_s: float
    same_node_gbps: float
    cross_node_gbps: float


@dataclass(frozen=True, eq=False)
class ReplayRun:
    """One policy (or baseline) replayed at one interval.  Arrays are read-only.

    Attributes:
        policy: the policy's name (``"static"`` and ``"clairvoyant"`` are the baselines).
        interval: steps between rebalances; window: steps each plan was made from.
        max_load: ``[T]`` per step, the sum over layers of the busiest GPU's load (tokens):
            the MoE-layer time proxy.
        window_max_load: ``[n]`` per served window (``ReplayResult.window_edges``), the sum
            over layers of the busiest GPU's load on the window's summed loads.
        rebalance_steps: ``[r]`` steps a new plan took over at.
        moves, same_node_moves, cross_node_moves: ``[r]`` replicas copied at each
            rebalance, after alignment to the deployed placement (moves = same + cross).
        copy_s: ``[r]`` transfer seconds of each rebalance (zeros without a time model).
        plan_s: ``[r]`` wall seconds the policy took to plan.
        obeys_policy: every placement kept the hierarchical rule where it applies (the
            certified bound holds for such plans).
    """

    policy: str
    interval: int
    window: int
    max_load: np.ndarray
    window_max_load: np.ndarray
    rebalance_steps: np.ndarray
    moves: np.ndarray
    same_node_moves: np.ndarray
    cross_node_moves: np.ndarray
    copy_s: np.ndarray
    plan_s: np.ndarray
    obeys_policy: bool


@dataclass(frozen=True, eq=False)
class ReplayResult:
    """A replay's figures (see :func:`eplb_opt.replay`).  Arrays are read-only.

    Attributes:
        steps, num_layers, num_experts: the trace's shape ``[T, L, E]``.
        num_replicas, num_groups, num_nodes, num_gpus: the topology; hierarchical: the
            ``"auto"`` rule's choice every policy planned under.
        intervals: the intervals replayed (ascending).
        mean_load: ``[T]`` per step, the sum over layers of the mean GPU load (the same for
            every placement).
        window_edges: interval -> ``[n + 1]`` step boundaries of the served windows.
        lower_bound: interval -> ``[n]`` per served window, the sum over layers of the
            certified lower bound on the busiest GPU's load of the window's summed loads
            (the policy rule's bound; holds for every plan kept fixed over the window).
        global_lower_bound: the same under the global rule (holds for any plan at all).
        runs: every :class:`ReplayRun`.
        skipped: policy -> why it did not run (a peer that could not be loaded).
        failed: ``"policy@interval"`` -> what went wrong (its runs are left out).
        bytes_per_expert: bytes copied per moved replica.
        time_model: the :class:`TimeModel`, or None (no time figures, copies free).
        trace: what was replayed; streamed: read chunk by chunk.
        initial_placement: the placement every run starts from, in words.
        policy_descriptions: policy -> one line on what it runs.
        elapsed_s: wall seconds of the replay.
    """

    steps: int
    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    hierarchical: bool
    intervals: tuple[int, ...]
    mean_load: np.ndarray
    window_edges: Mapping[int, np.ndarray]
    lower_bound: Mapping[int, np.ndarray]
    global_lower_bound: Mapping[int, np.ndarray]
    runs: tuple[ReplayRun, ...]
    skipped: Mapping[str, str]
    failed: Mapping[str, str]
    bytes_per_expert: int
    time_model: TimeModel | None
    trace: str
    streamed: bool
    initial_placement: str
    policy_descriptions: Mapping[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def policies(self) -> tuple[str, ...]:
        """Every run's policy name, baselines first, in the order they ran."""
        return tuple(dict.fromkeys(r.policy for r in self.runs))

    def run(self, policy: str, interval: int) -> ReplayRun:
        """The run of ``policy`` at ``interval`` (KeyError if there is none)."""
        for r in self.runs:
            if r.policy == policy and r.interval == interval:
                return r
        raise KeyError(f"no run of {policy!r} at interval {interval}")

    def step_time_s(self, policy: str, interval: int) -> np.ndarray:
        """``[T]`` seconds per step: compute (``max_load / gpu_tokens_per_s``) plus the
        copy time charged to it.  A rebalance's copy time is charged to the steps it
        overlaps from the rebalance step on, each absorbing up to its own compute time
        (the copy and the step share the GPU's links); what the trace's end leaves is
        charged to the last step.  Raises ValueError without a time model."""
        if self.time_model is None:
            raise ValueError("this replay ran without a time model (gpu_tokens_per_s=None)")
        r = self.run(policy, interval)
        compute = r.max_load / self.time_model.gpu_tokens_per_s
        out = compute.copy()
        for s, c in zip(r.rebalance_steps.tolist(), r.copy_s.tolist()):
            if c <= 0:
                continue
            cum = np.cumsum(compute[s:])
            full = int(np.searchsorted(cum, c, side="left"))
            out[s:s + full] += compute[s:s + full]
            rest = c - (cum[full - 1] if full else 0.0)
            out[min(s + full, len(out) - 1)] += rest
        return out

    def totals(self, policy: str, interval: int) -> dict[str, Any]:
        """Totals of one run (see :meth:`table` for what each means)."""
        r = self.run(policy, interval)
        load = float(r.max_load.sum())
        mean = float(self.mean_load.sum())
        out: dict[str, Any] = {
            "policy": policy, "interval": interval, "window": r.window,
            "load_total": load, "balancedness": mean / load if load > 0 else 1.0,
            "window_load_total": float(r.window_max_load.sum()),
            "lower_bound_total": float(self.lower_bound[interval].sum()),
            "rebalances": int(len(r.rebalance_steps)), "moves": int(r.moves.sum()),
            "same_node_moves": int(r.same_node_moves.sum()), "cross_node_moves": int(r.cross_node_moves.sum()),
            "bytes_moved": int(r.moves.sum()) * self.bytes_per_expert,
            "plan_s_mean": float(r.plan_s.mean()) if len(r.plan_s) else 0.0,
            "obeys_policy": r.obeys_policy,
        }
        if self.time_model is not None:
            out["compute_s"] = load / self.time_model.gpu_tokens_per_s
            out["copy_s"] = float(r.copy_s.sum())
            out["time_s"] = out["compute_s"] + out["copy_s"]
        key = "time_s" if self.time_model is not None else "load_total"
        static = self._figure("static", interval, key)
        clair = self._figure("clairvoyant", interval, key)
        out["vs_static"] = static / out[key] if static is not None and out[key] > 0 else None
        out["gap_closed"] = ((static - out[key]) / (static - clair)
                             if static is not None and clair is not None and static != clair else None)
        return out

    def _figure(self, policy: str, interval: int, key: str) -> float | None:
        try:
            r = self.run(policy, interval)
        except KeyError:
            return None
        load = float(r.max_load.sum())
        if key == "load_total" or self.time_model is None:
            return load
        return load / self.time_model.gpu_tokens_per_s + float(r.copy_s.sum())

    def best_interval(self, policy: str) -> int | None:
        """The interval with the least total time (load proxy without a time model)."""
        key = "time_s" if self.time_model is not None else "load_total"
        found = [(self.totals(policy, i)[key], i) for i in self.intervals if self._has(policy, i)]
        return min(found)[1] if found else None

    def _has(self, policy: str, interval: int) -> bool:
        return any(r.policy == policy and r.interval == interval for r in self.runs)

    def table(self) -> str:
        """The totals of every run, one line each, with a legend."""
        timed = self.time_model is not None
        head = (f"{'interval':>8} {'policy':<12} {'balance':>8} {'load total':>13} {'vs bound':>8} "
                f"{'moves':>8} {'GB moved':>9}" + (f" {'copy s':>8} {'time s':>9}" if timed else "")
                + f" {'vs static':>9} {'gap closed':>10}")
        lines = [head, "-" * len(head)]
        for i in self.intervals:
            for p in self.policies:
                if not self._has(p, i):
                    continue
                t = self.totals(p, i)
                vb = t["window_load_total"] / t["lower_bound_total"] if t["lower_bound_total"] > 0 else 1.0
                row = (f"{i:>8} {p:<12} {t['balancedness']:>8.4f} {t['load_total']:>13.4g} {vb:>8.4f} "
                       f"{t['moves']:>8} {t['bytes_moved'] / 1e9:>9.1f}")
                if timed:
                    row += f" {t['copy_s']:>8.2f} {t['time_s']:>9.2f}"
                vs = f"{t['vs_static']:.4f}" if t["vs_static"] is not None else "-"
                gc = f"{t['gap_closed']:.1%}" if t["gap_closed"] is not None else "-"
                lines.append(row + f" {vs:>9} {gc:>10}")
        return "\n".join(lines)

    def summary(self) -> str:
        """The table, a legend, the best interval per policy, and what was skipped or failed."""
        unit = "time" if self.time_model is not None else "load total"
        lines = [f"replay of {self.trace}: {self.steps} steps x {self.num_layers} layers x {self.num_experts} "
                 f"experts; {self.num_replicas} replicas, {self.num_groups} groups, {self.num_nodes} nodes, "
                 f"{self.num_gpus} GPUs ({'hierarchical' if self.hierarchical and self.num_nodes > 1 else 'global'} policy)",
                 self.table(), legend(self.time_model is not None), ""]
        for p in self.policies:
            best = self.best_interval(p)
            if best is not None and p != "static":
                lines.append(f"{p}: least {unit} at interval {best}")
        for p, why in self.skipped.items():
            lines.append(f"{p}: skipped: {why}")
        for p, why in self.failed.items():
            lines.append(f"{p}: failed: {why}")
        return "\n".join(lines)

    def to_dict(self, points: int = 1000) -> dict[str, Any]:
        """JSON-able: parameters, every run's totals and rebalances, and per-step series
        binned into at most ``points`` bins (balancedness and moved bytes per bin)."""
        edges = np.unique(np.linspace(0, self.steps, min(points, self.steps) + 1).astype(np.int64))
        mean = np.add.reduceat(self.mean_load, edges[:-1])
        runs = []
        for r in self.runs:
            top = np.add.reduceat(r.max_load, edges[:-1])
            moved = np.zeros(len(edges) - 1)
            idx = np.searchsorted(edges, r.rebalance_steps, side="right") - 1
            np.add.at(moved, idx, r.moves * float(self.bytes_per_expert))
            runs.append({**self.totals(r.policy, r.interval),
                         "rebalance_steps": r.rebalance_steps.tolist(), "moves_per_rebalance": r.moves.tolist(),
                         "same_node_moves_per_rebalance": r.same_node_moves.tolist(),
                         "cross_node_moves_per_rebalance": r.cross_node_moves.tolist(),
                         "copy_s_per_rebalance": r.copy_s.tolist(), "plan_s_per_rebalance": r.plan_s.tolist(),
                         "series_balancedness": np.where(top > 0, mean / np.where(top > 0, top, 1), 1.0).tolist(),
                         "series_bytes_moved": moved.tolist()})
        tm = self.time_model
        return {
            "trace": self.trace, "streamed": self.streamed, "steps": self.steps, "num_layers": self.num_layers,
            "num_experts": self.num_experts, "num_replicas": self.num_replicas, "num_groups": self.num_groups,
            "num_nodes": self.num_nodes, "num_gpus": self.num_gpus, "hierarchical": self.hierarchical,
            "intervals": list(self.intervals), "bytes_per_expert": self.bytes_per_expert,
            "time_model": None if tm is None else {"gpu_tokens_per_s": tm.gpu_tokens_per_s,
                                                   "same_node_gbps": tm.same_node_gbps,
                                                   "cross_node_gbps": tm.cross_node_gbps},
            "initial_placement": self.initial_placement, "policies": dict(self.policy_descriptions),
            "skipped": dict(self.skipped), "failed": dict(self.failed), "elapsed_s": self.elapsed_s,
            "lower_bound_total": {str(i): float(self.lower_bound[i].sum()) for i in self.intervals},
            "global_lower_bound_total": {str(i): float(self.global_lower_bound[i].sum()) for i in self.intervals},
            "series_steps": edges.tolist(), "runs": runs,
        }


def legend(timed: bool) -> str:
    """What the table's columns mean (the time columns only with a time model)."""
    return "\n".join(line for line in LEGEND.split("\n") if timed or not line.startswith("copy s"))


LEGEND = (
    "balance: sum over steps of the mean GPU load / sum over steps of the busiest GPU's load (per layer, summed "
    "over layers; 1.0 is perfect);\nload total: sum over steps and layers of the busiest GPU's load (tokens), the "
    "MoE-layer time proxy;\nvs bound: per served window, the busiest GPU's load on the window's summed loads, "
    "summed, over the certified lower bound of those windows (>= 1 for any plan fixed over each window);\n"
    "moves / GB moved: replicas copied at rebalances after alignment to the deployed placement, and their bytes;\n"
    "copy s / time s: transfer seconds, and compute (load / token rate) plus transfer seconds;\n"
    "vs static: the static placement's total over this one's (> 1: faster); gap closed: the share of the "
    "static-to-clairvoyant difference this run closes (clairvoyant: eplb-opt's heuristic planned on the very "
    "steps it serves; not a bound, a run may beat it)")


def make_run(policy: str, interval: int, window: int, max_load: np.ndarray, window_max: np.ndarray,
             events: list[tuple[int, int, int, int, float, float]], obeys: bool) -> ReplayRun:
    ev = np.array(events, dtype=np.float64).reshape(-1, 6)
    return ReplayRun(
        policy=policy, interval=interval, window=window, max_load=_frozen(max_load),
        window_max_load=_frozen(window_max), rebalance_steps=_frozen(ev[:, 0], np.int64),
        moves=_frozen(ev[:, 1], np.int64), same_node_moves=_frozen(ev[:, 2], np.int64),
        cross_node_moves=_frozen(ev[:, 3], np.int64), copy_s=_frozen(ev[:, 4]), plan_s=_frozen(ev[:, 5]),
        obeys_policy=obeys,
    )


def frozen_map(d: dict) -> Mapping:
    return MappingProxyType(dict(d))
