"""Exact-mode benchmark: certified gaps under a time limit, online budgets, determinism.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.run_exact [--seeds 0 1] [--time-limit 60]

Suite (fixed): DeepSeek-V3 prefill-shaped loads (``eplb_opt.workloads.generate``,
58 layers x 256 experts, 16384 tokens x top-8 per window) under

* global policy, 288 replicas on 32 GPUs (k = 9), target: every layer's gap <= 0.01 %;
* global policy, 320 replicas on 64 GPUs (k = 5), target: every layer's gap <= 0.05 %;
* hierarchical policy, 288 replicas / 8 groups / 4 nodes / 32 GPUs, target: <= 0.05 %;

each with ``mode="exact", time_limit=60`` on all cores, beside heuristic mode and
DeepSeek's reference on the same input.  Online use: the prefill preset with
``time_limit`` 0.1 s (repeated calls in one warm process), 1 s and 10 s, and the share
of the heuristic's excess over the bound each budget removes.  Determinism: the same
budget with ``deterministic=True``, twice, against the default.

Writes ``exact.json`` next to this file and regenerates ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import eplb_opt
from eplb_opt.workloads import PRESETS, generate

from eplb_opt.bench.peers import deepseek_rebalance

CONFIGS = [
    # name, replicas, groups, nodes, gpus, policy, target gap
    ("global k=9 (288 / 32 GPUs)", 288, 8, 4, 32, "global", 1e-4),
    ("global k=5 (320 / 64 GPUs)", 320, 8, 8, 64, "global", 5e-4),
    ("hierarchical (288 / 8 / 4 / 32)", 288, 8, 4, 32, "hierarchical", 5e-4),
]
PRESET = "deepseek-v3-prefill"


def _bal(w: np.ndarray, p, gpus: int) -> float:
    return eplb_opt.balancedness(eplb_opt.gpu_loads(w, np.asarray(p), gpus))


def _excess(result) -> float:
    return float(np.sum(result.max_load - result.lower_bound))


def quality(seeds: list[int], time_limit: float) -> list[dict]:
    rows = []
    for seed in seeds:
        w = generate(PRESET, windows=1, seed=seed)[0]
        for name, R, groups, nodes, G, policy, target in CONFIGS:
            kw = dict(num_replicas=R, num_groups=groups, num_nodes=nodes, num_gpus=G, policy=policy)
            t = time.perf_counter()
            h = eplb_opt.solve(w, **kw)
            th = time.perf_counter() - t
            t = time.perf_counter()
            e = eplb_opt.solve(w, **kw, mode="exact", time_limit=time_limit)
            te = time.perf_counter() - t
            t = time.perf_counter()
            theirs = deepseek_rebalance(policy=policy)(torch.from_numpy(w), R, groups, nodes, G)[0]
            td = time.perf_counter() - t
            d_load = eplb_opt.gpu_loads(w, theirs.numpy(), G).max(axis=1)
            d_gap = 1 - e.lower_bound / d_load
            row = {
                "seed": seed, "config": name, "target": target,
                "heuristic": {"balancedness": h.balancedness, "gap_max": float(h.gap.max()),
                              "gap_mean": float(h.gap.mean()), "time_s": th},
                "exact": {"balancedness": e.balancedness, "gap_max": float(e.gap.max()),
                          "gap_mean": float(e.gap.mean()), "time_s": te,
                          "layers_over_target": int((e.gap > target).sum()),
                          "status": {s: e.status.count(s) for s in ("optimal", "feasible", "heuristic")},
                          "events": len(e.events)},
                "deepseek": {"balancedness": _bal(w, theirs, G), "gap_max": float(d_gap.max()),
                             "gap_mean": float(d_gap.mean()), "time_s": td},
                "excess_closed": 1 - _excess(e) / max(_excess(h), 1e-300),
            }
            rows.append(row)
            print(f"  seed {seed} {name}: exact gap max {row['exact']['gap_max']:.4%} "
                  f"(target {target:.2%}), {te:.1f} s; heuristic {row['heuristic']['gap_max']:.4%}",
                  file=sys.stderr)
    return rows


def online(repeats: int) -> dict:
    p = PRESETS[PRESET]
    w = generate(PRESET, windows=1, seed=0)[0]
    h = eplb_opt.solve(w, **p.topology())
    out = {"budgets": []}
    eplb_opt.solve(w, **p.topology(), mode="exact", time_limit=1.0)   # first call loads OR-Tools
    for budget in (0.1, 1.0, 10.0):
        n = repeats if budget < 1 else (3 if budget < 10 else 1)
        walls, bals, closed = [], [], []
        for _ in range(n):
            t = time.perf_counter()
            r = eplb_opt.solve(w, **p.topology(), mode="exact", time_limit=budget)
            walls.append(time.perf_counter() - t)
            bals.append(r.balancedness)
            closed.append(1 - _excess(r) / max(_excess(h), 1e-300))
        out["budgets"].append({
            "time_limit": budget, "calls": n, "wall_median": statistics.median(walls), "wall_max": max(walls),
            "balancedness_min": min(bals), "heuristic_balancedness": h.balancedness,
            "never_less_balanced": bool(min(bals) >= h.balancedness - 1e-12),
            "excess_closed_median": statistics.median(closed),
        })
        print(f"  online {budget:g} s: wall median {statistics.median(walls):.3f} s max {max(walls):.3f} s, "
              f"closes {statistics.median(closed):.0%} of the heuristic's excess", file=sys.stderr)
    return out


def determinism(time_limit: float) -> dict:
    name, R, groups, nodes, G, policy, target = CONFIGS[1]
    w = generate(PRESET, windows=1, seed=0)[0]
    kw = dict(num_replicas=R, num_groups=groups, num_nodes=nodes, num_gpus=G, policy=policy,
              mode="exact", time_limit=time_limit)
    t = time.perf_counter()
    a = eplb_opt.solve(w, **kw, deterministic=True, seed=1)
    ta = time.perf_counter() - t
    b = eplb_opt.solve(w, **kw, deterministic=True, seed=1)
    c = eplb_opt.solve(w, **kw)
    return {
        "config": name, "time_limit": time_limit,
        "repeatable": bool(torch.equal(a.plan.phy2log, b.plan.phy2log)),
        "deterministic_gap_max": float(a.gap.max()), "deterministic_gap_mean": float(a.gap.mean()),
        "deterministic_wall_s": ta,
        "default_gap_max": float(c.gap.max()), "default_gap_mean": float(c.gap.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=9, help="calls at the 0.1 s budget")
    ap.add_argument("--determinism-limit", type=float, default=10.0)
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    print("exact-mode quality ...", file=sys.stderr)
    data = {
        "command": "python -m benchmarks.run_exact " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quality": quality(args.seeds, args.time_limit),
    }
    print("online budgets ...", file=sys.stderr)
    data["online"] = online(args.repeats)
    print("determinism ...", file=sys.stderr)
    data["determinism"] = determinism(args.determinism_limit)
    (here / "exact.json").write_text(json.dumps(data, indent=1))
    from .report import write

    write(here)
    print((here / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
