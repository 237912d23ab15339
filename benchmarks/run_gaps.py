"""Gap study: where exact mode's remaining gaps come from, on the full suite (issue 12).

Usage (from the repository root; about 20 minutes, plus the independent checks)::

    .venv/bin/python -m benchmarks.run_gaps [--time-limit 60] [--workers 2] [--check 3] [--check-time 120] [--presets NAME ...]

1. Every full-suite workload (every model preset, seeds 0-2, all layers, window 0) is
   solved with ``mode="exact", time_limit=60, workers=2`` under the preset's own
   topology and ``policy="auto"``.  Per layer: max load, certified bound, gap, the bound
   component that binds, and the conditional bound CP-SAT proved for the plan's counts
   and group placement where it ran.  Target: every layer's gap <= 0.05 %.
2. The worst layers above the target (``--check`` of them per preset) get an **independent** model,
   written here and sharing no code with ``eplb_opt.cpsat``: for a layer without
   redundancy (``R == E``, counts fixed at 1) the whole problem, every group-to-node
   assignment (hierarchical) and every node's exact ``k``-per-GPU partition, each node
   model solved by CP-SAT for ``--check-time`` seconds split over the models, warm-started
   from eplb-opt's plan where the assignment is the plan's.  Its best plan is an upper
   bound and its proven bound (the best assignment's worst node bound) a lower bound on
   the true optimum, so it says whether our bound or our search leaves the gap.
   For a layer with one group per node (decode: counts free) every group sits alone on
   a node, so each group's own node problem is solved with counts free, in exact units
   (``check_layer_one_group_per_node``).  Other layers with redundancy (global policy)
   get a witness: eplb-opt alone on the layer for ``--check-time`` seconds, its plan's
   max load recomputed here in exact arithmetic, against the average bound
   (``witness_layer``).

Writes ``gaps.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

import eplb_opt
from eplb_opt.suites import workloads
from eplb_opt.workloads import PRESETS

TARGET = 5e-4


def _binding(r, l: int) -> str:
    comps = r.bounds.components
    best = max(comps, key=lambda name: comps[name][l])
    return best if r.lower_bound[l] <= comps[best][l] * (1 + 1e-12) else "cp-sat (proven)"


def study(time_limit: float, workers: int, presets: list[str] | None = None) -> list[dict]:
    rows = []
    for wl in workloads("full"):
        if presets and wl.preset.name not in presets:
            continue
        topo = wl.preset.topology()
        w = wl.windows[0]
        t = time.perf_counter()
        r = eplb_opt.solve(w, **topo, mode="exact", time_limit=time_limit, workers=workers)
        wall = time.perf_counter() - t
        h = eplb_opt.solve(w, **topo)
        layers = []
        for l in range(w.shape[0]):
            cond = None if r.conditional_bound is None or not np.isfinite(r.conditional_bound[l]) \
                else float(r.conditional_bound[l])
            layers.append({"layer": l, "max_load": float(r.max_load[l]), "lower_bound": float(r.lower_bound[l]),
                           "gap": float(r.gap[l]), "heuristic_gap": float(h.gap[l]), "status": r.status[l],
                           "binding": _binding(r, l), "conditional_bound": cond})
        worst = max(layers, key=lambda x: x["gap"])
        rows.append({"workload": wl.name, "policy": r.policy, "topology": topo, "wall_s": wall,
                     "worst_gap": worst["gap"], "worst_layer": worst["layer"],
                     "layers_over_target": sum(x["gap"] > TARGET for x in layers),
                     "heuristic_worst_gap": max(x["heuristic_gap"] for x in layers),
                     "layers": layers, "events": list(r.events)[:8]})
        print(f"{wl.name:>26} {r.policy:>12}: worst gap {100 * worst['gap']:.4f}% (layer {worst['layer']}, "
              f"bound {worst['binding']}), {rows[-1]['layers_over_target']} layer(s) over {100 * TARGET:.2f}%, "
              f"heuristic worst {100 * rows[-1]['heuristic_worst_gap']:.4f}%, {wall:.1f} s", file=sys.stderr, flush=True)
    return rows


# -- the independent model ------------------------------------------------------------------

def _node_partition(items: np.ndarray, gpus: int, hint: np.ndarray | None, seconds: float,
                    workers: int) -> tuple[float, float, bool]:
    """Exactly ``len(items) / gpus`` items per GPU, minimise the heaviest: ``(best found,
    proven bound, optimal)`` in the items' units (integer token counts, exact)."""
    from ortools.sat.python import cp_model

    v = [int(x) for x in items]
    n, k = len(v), len(v) // gpus
    m = cp_model.CpModel()
    x = [[m.NewBoolVar("") for _ in range(gpus)] for _ in range(n)]
    t = m.NewIntVar(0, sum(v), "t")
    for i in range(n):
        m.AddExactlyOne(x[i])
    for g in range(gpus):
        m.Add(sum(x[i][g] for i in range(n)) == k)
        m.Add(sum(v[i] * x[i][g] for i in range(n)) <= t)
    # The heaviest item on GPU 0 (a symmetry fix of a single variable).
    m.Add(x[int(np.argmax(v))][0] == 1)
    if hint is not None:
        # hint: [gpus, k] item indices; relabel so the heaviest item's GPU is GPU 0.
        g0 = int(np.flatnonzero((hint == int(np.argmax(v))).any(axis=1))[0])
        order = [g0] + [g for g in range(gpus) if g != g0]
        for new, old in enumerate(order):
            on = set(hint[old].tolist())
            for i in range(n):
                m.AddHint(x[i][new], int(i in on))
    m.Minimize(t)
    s = cp_model.CpSolver()
    s.parameters.max_time_in_seconds = seconds
    s.parameters.num_workers = workers
    st = s.Solve(m)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return float("inf"), float(s.BestObjectiveBound()), False
    return float(s.ObjectiveValue()), float(s.BestObjectiveBound()), st == cp_model.OPTIMAL


def check_layer(w: np.ndarray, plan_row: np.ndarray, topo: dict, seconds: float, workers: int) -> dict:
    """Independent bracket of one no-redundancy layer's optimum (see module docs)."""
    E = w.size
    G, N, Gr = topo["num_gpus"], topo["num_nodes"], topo["num_groups"]
    hier = Gr % N == 0 and N > 1
    if not hier:
        N, Gr = 1, 1
    gs, gpn = E // Gr, G // N
    m = Gr // N
    # Every partition of the groups into N equal blocks (canonical).
    def parts(left):
        if not left:
            yield ()
            return
        for others in combinations(left[1:], m - 1):
            block = (left[0],) + others
            for tail in parts(tuple(g for g in left[1:] if g not in others)):
                yield (block,) + tail
    partitions = list(parts(tuple(range(Gr))))
    plan_nodes = plan_row.reshape(N, -1)
    plan_blocks = tuple(sorted(tuple(sorted(set((plan_nodes[n] // gs).tolist()))) for n in range(N)))
    cache: dict[tuple[int, ...], tuple[float, float, bool]] = {}
    blocks = sorted({b for p in partitions for b in p})
    per = seconds / len(blocks)
    for b in blocks:
        experts = np.concatenate([np.arange(g * gs, (g + 1) * gs) for g in b])
        hint = None
        for n in range(N):
            if tuple(sorted(set((plan_nodes[n] // gs).tolist()))) == b:
                local = {int(e): i for i, e in enumerate(experts)}
                hint = np.array([[local[int(e)] for e in gpu] for gpu in plan_nodes[n].reshape(gpn, -1)])
        cache[b] = _node_partition(w[experts], gpn, hint, per, workers)
    best_ub = min(max(cache[b][0] for b in p) for p in partitions)
    lb = min(max(cache[b][1] for b in p) for p in partitions)
    return {"partitions": len(partitions), "node_models": len(blocks), "seconds_per_model": per,
            "upper": best_ub, "lower": lb, "all_optimal": all(c[2] for c in cache.values()),
            "plan_partition_is_best": min(partitions, key=lambda p: max(cache[b][0] for b in p)) == plan_blocks}


def _node_counts_free(items: np.ndarray, replicas: int, gpus: int, hint: np.ndarray | None, seconds: float,
                      workers: int) -> tuple[float, float, bool]:
    """One node with replica counts free: ``len(items)`` integer loads, ``replicas`` slots
    on ``gpus`` GPUs (``replicas / gpus`` each), expert ``e`` with ``c_e >= 1`` replicas
    of load ``items[e] / c_e`` (two of one expert may share a GPU).  Exact units
    ``1 / lcm(1..replicas - E + 1)``.  Variables ``z[e, c, g]``: replicas on GPU ``g`` of
    expert ``e`` when it has ``c``; ``u[e, c]`` chooses ``c``.  ``hint``: ``[gpus, k]``
    expert indices (a plan of this node).  Returns ``(best found, proven bound,
    optimal)`` in the items' units."""
    from math import lcm

    from ortools.sat.python import cp_model

    v = [int(x) for x in items]
    E, k = len(v), replicas // gpus
    cmax = replicas - E + 1
    M = lcm(*range(1, cmax + 1))
    m = cp_model.CpModel()
    u = {(e, c): m.NewBoolVar("") for e in range(E) for c in range(1, cmax + 1)}
    z = {(e, c, g): m.NewIntVar(0, min(c, k), "") for e in range(E) for c in range(1, cmax + 1) for g in range(gpus)}
    for e in range(E):
        m.AddExactlyOne([u[e, c] for c in range(1, cmax + 1)])
        for c in range(1, cmax + 1):
            m.Add(sum(z[e, c, g] for g in range(gpus)) == c * u[e, c])
    m.Add(sum(c * u[e, c] for e in range(E) for c in range(1, cmax + 1)) == replicas)
    t = m.NewIntVar(0, sum(v) * M, "t")
    for g in range(gpus):
        m.Add(sum(z[e, c, g] for e in range(E) for c in range(1, cmax + 1)) == k)
        m.Add(sum(v[e] * (M // c) * z[e, c, g] for e in range(E) for c in range(1, cmax + 1)) <= t)
    if hint is not None:
        cnt = np.bincount(hint.ravel(), minlength=E)
        for e in range(E):
            for c in range(1, cmax + 1):
                m.AddHint(u[e, c], int(cnt[e] == c))
                for g in range(gpus):
                    m.AddHint(z[e, c, g], int((hint[g] == e).sum()) if cnt[e] == c else 0)
    m.Minimize(t)
    s = cp_model.CpSolver()
    s.parameters.max_time_in_seconds = seconds
    s.parameters.num_workers = workers
    st = s.Solve(m)
    best = s.ObjectiveValue() / M if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) else float("inf")
    return best, s.BestObjectiveBound() / M, st == cp_model.OPTIMAL


def check_layer_one_group_per_node(w: np.ndarray, plan_row: np.ndarray, topo: dict, seconds: float,
                                   workers: int) -> dict:
    """Independent bracket of a layer with one group per node (decode): every group sits
    alone on some node, so the layer's optimum is the largest of the groups' own node
    optima (counts free, :func:`_node_counts_free`).  Half of ``seconds`` goes to the
    node with the largest load, the rest is split over the others, each warm-started
    from eplb-opt's placement of that group."""
    E, G, N, Gr = w.size, topo["num_gpus"], topo["num_nodes"], topo["num_groups"]
    gs, gpn, rn = E // Gr, G // N, topo["num_replicas"] // N
    nodes = plan_row.reshape(N, rn)
    order = np.argsort(-w.reshape(Gr, gs).sum(axis=1), kind="stable")
    out = []
    for i, g in enumerate(order):
        n = int(np.flatnonzero((nodes // gs == g).all(axis=1))[0])
        hint = (nodes[n] - g * gs).reshape(gpn, -1)
        t = seconds / 2 if i == 0 else seconds / 2 / (N - 1)
        out.append(_node_counts_free(w[g * gs : (g + 1) * gs], rn, gpn, hint, t, workers))
    return {"node_models": N, "seconds_heaviest": seconds / 2, "upper": max(o[0] for o in out),
            "lower": max(o[1] for o in out), "all_optimal": all(o[2] for o in out),
            "heaviest_node": {"upper": out[0][0], "lower": out[0][1], "optimal": out[0][2]}}


def witness_layer(w: np.ndarray, topo: dict, seconds: float, workers: int) -> dict:
    """A layer with redundancy that no complete model covers (global policy): eplb-opt
    alone on the layer with ``seconds``, its plan checked here in exact arithmetic (every
    expert has a replica, ``R / G`` slots per GPU, loads ``w_e / c_e`` as fractions).
    ``upper`` is that plan's max load, so the optimum is at most it; ``lower`` is the
    average ``sum w / G`` (no plan beats it), computed here too.  Neither side uses
    eplb-opt's bounds."""
    from fractions import Fraction

    G, R = topo["num_gpus"], topo["num_replicas"]
    r = eplb_opt.solve(w[None], **topo, mode="exact", time_limit=seconds, workers=workers, policy="global")
    row = r.plan.phy2log.numpy()[0]
    cnt = np.bincount(row, minlength=w.size)
    assert row.size == R and (cnt >= 1).all(), "witness plan is not a valid plan"
    exact = [Fraction(float(x)) for x in w]
    loads = [sum((exact[e] / int(cnt[e]) for e in row[g * (R // G):(g + 1) * (R // G)]), Fraction(0))
             for g in range(G)]
    upper, lower = max(loads), sum(exact, Fraction(0)) / G
    return {"kind": "witness plan (eplb-opt, this layer alone) checked in exact arithmetic; average bound",
            "seconds": seconds, "upper": float(upper), "lower": float(lower),
            "gap_upper_vs_lower": float(1 - lower / upper) if upper else 0.0}


def run_checks(rows: list[dict], args: argparse.Namespace) -> tuple[list[tuple], list[dict]]:
    """The independent checks of the worst layers over the target (module docs, 2)."""
    over = sorted(((x["gap"], row["workload"], x["layer"]) for row in rows for x in row["layers"]
                   if x["gap"] > TARGET), reverse=True)
    checks = []
    by_name = {wl.name: wl for wl in workloads("full")}
    per_preset: dict[str, int] = {}
    for gap, name, l in over:
        wl = by_name[name]
        per_preset[wl.preset.name] = per_preset.get(wl.preset.name, 0) + 1
        if per_preset[wl.preset.name] > args.check:
            continue
        topo = wl.preset.topology()
        w = wl.windows[0][l]
        one_per_node = topo["num_groups"] == topo["num_nodes"] > 1
        hierarchical = topo["num_groups"] % topo["num_nodes"] == 0 and topo["num_nodes"] > 1
        if topo["num_replicas"] != wl.windows.shape[2] and hierarchical and not one_per_node:
            checks.append({"workload": name, "layer": l, "skipped": "hierarchical layer with redundancy (counts "
                           "free, several groups per node): no independent model at this size"})
            continue
        if topo["num_replicas"] != wl.windows.shape[2] and not one_per_node:
            c = witness_layer(w, topo, args.check_time, args.workers)
            study_layer = next(x for row in rows if row["workload"] == name for x in row["layers"] if x["layer"] == l)
            c.update({"workload": name, "layer": l, "study_gap": gap, "all_optimal": "n/a (witness plan)",
                      "ours_lower_bound": study_layer["lower_bound"], "ours_max_load": study_layer["max_load"]})
            checks.append(c)
            print(f"witness check {name} layer {l}: exact [{c['lower']:.6g}, {c['upper']:.6g}] "
                  f"({100 * c['gap_upper_vs_lower']:.4f}%) with {args.check_time:g} s", file=sys.stderr, flush=True)
            continue
        r = eplb_opt.solve(wl.windows[0][l : l + 1], **topo, mode="exact", time_limit=args.time_limit,
                           workers=args.workers)
        check = check_layer if topo["num_replicas"] == wl.windows.shape[2] else check_layer_one_group_per_node
        c = check(w, r.plan.phy2log.numpy()[0], topo, args.check_time, args.workers)
        c.update({"workload": name, "layer": l, "ours_max_load": float(r.max_load[0]),
                  "ours_lower_bound": float(r.lower_bound[0]), "ours_gap": float(r.gap[0]), "study_gap": gap})
        checks.append(c)
        print(f"independent check {name} layer {l}: ours [{c['ours_lower_bound']:.6g}, {c['ours_max_load']:.6g}], "
              f"independent [{c['lower']:.6g}, {c['upper']:.6g}]", file=sys.stderr, flush=True)
    return over, checks


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--check", type=int, default=3, help="worst layers of each preset given the independent model")
    ap.add_argument("--check-time", type=float, default=120.0, help="seconds per checked layer")
    ap.add_argument("--out", type=Path, default=here / "gaps.json")
    ap.add_argument("--presets", nargs="*", default=None,
                    help="only these presets (while iterating; the recorded study runs them all)")
    ap.add_argument("--checks-only", action="store_true",
                    help="rerun only the independent checks on the study already in --out")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.checks_only:
        out = json.loads(args.out.read_text())
        _, out["independent_checks"] = run_checks(out["workloads"], args)
        out["checks_command"] = "python -m benchmarks.run_gaps " + " ".join(argv or sys.argv[1:])
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        return 0
    rows = study(args.time_limit, args.workers, args.presets)
    over, checks = run_checks(rows, args)
    worst = max((x["gap"] for row in rows for x in row["layers"]), default=0.0)
    out = {"command": "python -m benchmarks.run_gaps " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0), "target": TARGET,
           "worst_gap": worst, "layers_over_target": len(over), "layers": sum(len(r_["layers"]) for r_ in rows),
           "workloads": rows, "independent_checks": checks}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"worst gap {100 * worst:.4f}%; {len(over)} layer(s) over {100 * TARGET:.2f}%; wrote {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
