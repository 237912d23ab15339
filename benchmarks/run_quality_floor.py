"""The heuristic's quality on the full suite, per workload and configuration: the floor
issue 15's compiled kernels must not go below.

Each of the full suite's 18 workloads (every model preset, seeds 0-2, all layers) is
planned from window 0 in heuristic mode under several configurations and scored
in-window (window 0) and on the next window (window 1):

* ``rebalance_experts``: the DeepSeek-compatible call (policy ``auto``);
* ``global``: ``solve(policy="global")``;
* ``no-duplicates``: ``solve(allow_duplicates=False)`` where the topology allows it;
* ``spill``: ``solve(policy="spill")`` (default ``cross_node_cost``) where the
  hierarchical policy applies.

Record (before a change)::

    .venv/bin/python -m benchmarks.run_quality_floor --out benchmarks/quality_floor.json

Check (after it): every workload's in-window balancedness at least the recorded minus
``1e-6``, and per configuration the suite's next-window mean at least the recorded minus
``0.0005`` (issue 15)::

    .venv/bin/python -m benchmarks.run_quality_floor --check benchmarks/quality_floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

IN_WINDOW_SLACK = 1e-6
NEXT_MEAN_SLACK = 0.0005


def _configs(preset) -> dict:
    import eplb_opt

    topo = preset.topology()
    hier = preset.num_groups % preset.num_nodes == 0
    out = {
        "rebalance_experts": lambda w: eplb_opt.rebalance_experts(
            w, preset.num_replicas, preset.num_groups, preset.num_nodes, preset.num_gpus)[0].numpy(),
        "global": lambda w: eplb_opt.solve(w, policy="global", **topo).plan.phy2log.numpy(),
    }
    nodes = preset.num_nodes if hier else 1
    if preset.num_replicas // preset.num_gpus <= preset.num_experts // nodes:
        out["no-duplicates"] = lambda w: eplb_opt.solve(w, allow_duplicates=False, **topo).plan.phy2log.numpy()
    if hier:
        out["spill"] = lambda w: eplb_opt.solve(w, policy="spill", **topo).plan.phy2log.numpy()
    return out


def measure() -> dict:
    from eplb_opt.metrics import balancedness, gpu_loads
    from eplb_opt.suites import workloads

    rows = []
    for wl in workloads("full"):
        p = wl.preset
        for name, fn in _configs(p).items():
            t0 = time.perf_counter()
            phy2log = fn(np.ascontiguousarray(wl.windows[0]))
            secs = time.perf_counter() - t0
            rows.append({
                "workload": wl.name, "config": name,
                "balancedness": balancedness(gpu_loads(wl.windows[0], phy2log, p.num_gpus)),
                "next_balancedness": balancedness(gpu_loads(wl.windows[1], phy2log, p.num_gpus)),
                "time_s": secs,
            })
            print(f"{wl.name:28s} {name:18s} in-window {rows[-1]['balancedness']:.6f} "
                  f"next {rows[-1]['next_balancedness']:.6f} ({secs * 1e3:.0f} ms)", file=sys.stderr)
    means = {}
    for cfg in sorted({r["config"] for r in rows}):
        sel = [r for r in rows if r["config"] == cfg]
        means[cfg] = {"in_window_mean": float(np.mean([r["balancedness"] for r in sel])),
                      "next_window_mean": float(np.mean([r["next_balancedness"] for r in sel])),
                      "workloads": len(sel)}
    return {"suite": "full", "rows": rows, "means": means}


def check(recorded: dict, now: dict) -> list[str]:
    """What falls below the floor (empty: nothing)."""
    was = {(r["workload"], r["config"]): r for r in recorded["rows"]}
    bad = []
    for r in now["rows"]:
        old = was.get((r["workload"], r["config"]))
        if old is None:
            continue
        if r["balancedness"] < old["balancedness"] - IN_WINDOW_SLACK:
            bad.append(f"{r['workload']} {r['config']}: in-window {r['balancedness']:.6f} < recorded "
                       f"{old['balancedness']:.6f} - {IN_WINDOW_SLACK:g}")
    for cfg, m in now["means"].items():
        old = recorded["means"].get(cfg)
        if old and m["next_window_mean"] < old["next_window_mean"] - NEXT_MEAN_SLACK:
            bad.append(f"{cfg}: next-window mean {m['next_window_mean']:.6f} < recorded "
                       f"{old['next_window_mean']:.6f} - {NEXT_MEAN_SLACK:g}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the figures here")
    ap.add_argument("--check", type=Path, help="compare with figures recorded before")
    args = ap.parse_args(argv)
    import eplb_opt

    eplb_opt.warm_up()
    now = measure()
    for cfg, m in now["means"].items():
        print(f"{cfg:18s} in-window mean {m['in_window_mean']:.6f}  next-window mean "
              f"{m['next_window_mean']:.6f}  ({m['workloads']} workloads)")
    if args.out:
        args.out.write_text(json.dumps(now, indent=1) + "\n")
    if args.check:
        bad = check(json.loads(args.check.read_text()), now)
        for b in bad:
            print("BELOW FLOOR:", b)
        print("quality floor: " + ("met" if not bad else f"{len(bad)} violation(s)"))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
