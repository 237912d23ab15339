"""Beyond balance: migration-aware replanning, robust plans over windows, the spill
policy and masked GPUs, on drifting model-shaped workloads.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.run_beyond [--seeds 0 1 2 3 4] [--sections migration robust spill masked]

Writes ``beyond.json`` next to this file and regenerates ``RESULTS.md``.

* ``migration``: DeepSeek-V3 prefill-shaped loads (58 x 256), 4 consecutive windows per
  seed (drift 0.15 per window).  A serving loop: the plan of window 0 is deployed, then
  each later window is planned with ``previous`` = the deployed plan and
  ``max_balance_loss=0.005``, and deployed.  Against the fair baseline, a full replan of
  the same window with its nodes and GPUs relabelled to match the deployed plan: replica
  moves, weighted cost (``node_move_cost=4``) and balancedness, per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


import eplb_opt
from eplb_opt.workloads import PRESETS, generate

PRESET = "deepseek-v3-prefill"


def migration(seeds: list[int], windows: int = 4, exact_seeds: int = 1, exact_limit: float = 20.0) -> dict:
    topo = PRESETS[PRESET].topology()
    rows = []
    for policy in ("hierarchical", "global"):
        for seed in seeds:
            w = generate(PRESET, windows=windows, seed=seed)
            modes = [("heuristic", None)] + ([("exact", exact_limit)] if seed in seeds[:exact_seeds] else [])
            for mode, limit in modes:
                deployed = eplb_opt.solve(w[0], **topo, policy=policy, mode=mode, time_limit=limit).plan.phy2log
                for t in range(1, windows):
                    t0 = time.perf_counter()
                    r = eplb_opt.solve(w[t], **topo, policy=policy, mode=mode, time_limit=limit,
                                       previous=deployed, max_balance_loss=0.005)
                    wall = time.perf_counter() - t0
                    m = r.migration
                    rows.append({
                        "policy": policy, "seed": seed, "mode": mode, "step": t, "time_s": wall,
                        "moves": int(m.moves.sum()), "baseline_moves": int(m.baseline_moves.sum()),
                        "cost": float(m.cost.sum()), "baseline_cost": float(m.baseline_cost.sum()),
                        "balancedness": r.balancedness, "baseline_balancedness": m.baseline_balancedness,
                        "layers_by_source": {s: m.source.count(s) for s in sorted(set(m.source))},
                    })
                    deployed = r.plan.phy2log
                    last = rows[-1]
                    print(f"  migration {policy} seed {seed} {mode} step {t}: moves {last['moves']} vs "
                          f"{last['baseline_moves']} ({last['moves'] / max(last['baseline_moves'], 1):.1%}), "
                          f"bal {last['balancedness']:.5f} vs {last['baseline_balancedness']:.5f}", file=sys.stderr)
    summary = {}
    for policy in ("hierarchical", "global"):
        for mode in ("heuristic", "exact"):
            sel = [r for r in rows if r["policy"] == policy and r["mode"] == mode]
            if not sel:
                continue
            ratios = [r["moves"] / max(r["baseline_moves"], 1) for r in sel]
            losses = [1 - r["balancedness"] / r["baseline_balancedness"] for r in sel]
            summary[f"{policy}/{mode}"] = {
                "steps": len(sel), "moves_ratio_median": statistics.median(ratios), "moves_ratio_max": max(ratios),
                "cost_ratio_max": max(r["cost"] / max(r["baseline_cost"], 1e-9) for r in sel),
                "balance_loss_median": statistics.median(losses), "balance_loss_max": max(losses),
                "time_median_s": statistics.median(r["time_s"] for r in sel),
            }
    return {"preset": PRESET, "windows": windows, "max_balance_loss": 0.005, "node_move_cost": 4.0,
            "exact_time_limit": exact_limit, "rows": rows, "summary": summary}


SECTIONS = {"migration": migration}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    path = here / "beyond.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for name in args.sections:
        print(f"{name} ...", file=sys.stderr)
        data[name] = SECTIONS[name](args.seeds)
        data[name]["command"] = "python -m benchmarks.run_beyond " + " ".join(
            argv if argv is not None else sys.argv[1:])
        data[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
    path.write_text(json.dumps(data, indent=1))
    from .report import write

    write(here)
    return 0


if __name__ == "__main__":
    sys.exit(main())
