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
* ``robust``: plans made from the last 3 windows (their total, the worst window, the
  mean window) and from the latest window alone, and SGLang's ``deepseek_vec`` given
  the 3 windows as steps, scored on the next window; two scenarios: random-walk drift
  (the default generator) and two traffic mixes taking turns window by window.
* ``spill``: ``policy="spill"`` on prefill-shaped loads as ``cross_node_cost`` falls from
  ``inf`` to 0, beside the hierarchical and global policies: balancedness against the
  share of load served off-node (``spill_curve.png``).
* ``masked``: GPU 5 of 32 fails: balancedness against the unmasked plan times 31/32
  (the capacity lost), and moves from the deployed plan of the previous window, beside
  SGLang's elasticity-aware algorithm (its plan relabelled to the deployed one).
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


SCENARIOS = {
    "drift": {},                                                        # random-walk drift only
    "alternating mixes": {"mix_shift": 0.5, "mix_period": 1, "drift": 0.05},
}
ROBUST_PRESETS = ["deepseek-v3-prefill", "deepseek-v3-decode", "qwen3-235b"]


def robust(seeds: list[int], history: int = 3) -> dict:
    """Next-window balancedness of plans made from the last ``history`` windows."""
    from eplb_opt.bench.peers import deepseek_vec_rebalance

    vec = deepseek_vec_rebalance()
    rows = []
    for scenario, kw in SCENARIOS.items():
        for preset in ROBUST_PRESETS:
            topo = PRESETS[preset].topology()
            G = topo["num_gpus"]
            for seed in seeds:
                w = generate(preset, windows=history + 2, seed=seed, **kw)
                hist, nxt = w[1:history + 1], w[history + 1]

                def score(p) -> float:
                    return eplb_opt.balancedness(eplb_opt.gpu_loads(nxt, np.asarray(p), G))

                row = {"scenario": scenario, "preset": preset, "seed": seed}
                row["latest window"] = score(eplb_opt.solve(hist[-1], **topo).plan.phy2log)
                for objective in ("sum", "worst", "mean"):
                    t0 = time.perf_counter()
                    r = eplb_opt.solve(hist, **topo, objective=objective)
                    row[f"objective={objective}"] = score(r.plan.phy2log)
                    row[f"time {objective}"] = time.perf_counter() - t0
                row["SGLang deepseek_vec"] = score(vec(torch.from_numpy(hist), **_vec_args(topo))[0])
                rows.append(row)
                print(f"  robust {scenario} {preset} seed {seed}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in row.items() if k not in ("scenario", "preset", "seed")
                    and not k.startswith("time")), file=sys.stderr)
    methods = ["latest window", "objective=sum", "objective=worst", "objective=mean", "SGLang deepseek_vec"]
    summary = {}
    for scenario in SCENARIOS:
        for preset in ROBUST_PRESETS:
            sel = [r for r in rows if r["scenario"] == scenario and r["preset"] == preset]
            summary[f"{scenario} / {preset}"] = {m: float(np.mean([r[m] for r in sel])) for m in methods} | {
                "time worst": float(np.median([r["time worst"] for r in sel])),
                "time mean": float(np.median([r["time mean"] for r in sel])),
            }
    return {"history": history, "scenarios": SCENARIOS, "methods": methods, "rows": rows, "summary": summary}


def _vec_args(topo: dict) -> dict:
    return dict(num_replicas=topo["num_replicas"], num_groups=topo["num_groups"], num_nodes=topo["num_nodes"],
                num_gpus=topo["num_gpus"])


SPILL_COSTS = [float("inf"), 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0]


def spill(seeds: list[int]) -> dict:
    """Balancedness against the share of load served off-node, as cross_node_cost falls."""
    from eplb_opt.heuristics import place
    from eplb_opt.heuristics.spill import off_node_load

    topo = PRESETS[PRESET].topology()
    G, N, R = topo["num_gpus"], topo["num_nodes"], topo["num_replicas"]
    rows = []
    for seed in seeds[:2]:
        w = generate(PRESET, windows=1, seed=seed)[0]
        home = np.repeat(place(w, R, topo["num_groups"], N, G).node_of_group,
                         w.shape[1] // topo["num_groups"], axis=1)

        def share(p) -> float:
            return float(off_node_load(w, np.asarray(p), N, home).sum() / w.sum())

        for policy in ("hierarchical", "global"):
            t0 = time.perf_counter()
            r = eplb_opt.solve(w, **topo, policy=policy)
            rows.append({"seed": seed, "policy": policy, "cross_node_cost": None, "balancedness": r.balancedness,
                         "off_node_share": share(r.plan.phy2log), "time_s": time.perf_counter() - t0})
        for lam in SPILL_COSTS:
            t0 = time.perf_counter()
            r = eplb_opt.solve(w, **topo, policy="spill", cross_node_cost=lam)
            rows.append({"seed": seed, "policy": "spill", "cross_node_cost": lam, "balancedness": r.balancedness,
                         "off_node_share": r.off_node_share, "time_s": time.perf_counter() - t0})
            print(f"  spill seed {seed} cost {lam:g}: bal {r.balancedness:.5f}, off-node {r.off_node_share:.2%}",
                  file=sys.stderr)
    _spill_plot(rows, Path(__file__).resolve().parent / "spill_curve.png")
    for r in rows:
        if r["cross_node_cost"] is not None and not np.isfinite(r["cross_node_cost"]):
            r["cross_node_cost"] = "inf"
    return {"preset": PRESET, "rows": rows, "plot": "spill_curve.png"}


def _spill_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for seed in sorted({r["seed"] for r in rows}):
        sel = [r for r in rows if r["seed"] == seed and r["policy"] == "spill"]
        ax.plot([r["off_node_share"] for r in sel], [r["balancedness"] for r in sel], "o-", label=f"spill, seed {seed}")
        for r in sel:
            lam = r["cross_node_cost"]
            ax.annotate("inf" if not np.isfinite(lam) else f"{lam:g}", (r["off_node_share"], r["balancedness"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
        for policy, marker in (("hierarchical", "s"), ("global", "^")):
            r = next(x for x in rows if x["seed"] == seed and x["policy"] == policy)
            ax.plot(r["off_node_share"], r["balancedness"], marker, color="k", ms=8,
                    label=policy if seed == min(x["seed"] for x in rows) else None)
    ax.set_xlabel("share of load served off the expert's home node")
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.set_title("policy='spill' as cross_node_cost falls (labels), DeepSeek-V3 prefill-shaped", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def masked(seeds: list[int], dead: int = 5) -> dict:
    """One of 32 GPUs fails: balancedness against the capacity lost, and moves from the
    deployed plan, beside SGLang's elasticity-aware algorithm."""
    from eplb_opt.align import count_moves

    from eplb_opt.bench.peers import elasticity_rebalance

    peer = elasticity_rebalance()
    topo = PRESETS[PRESET].topology()
    G, k = topo["num_gpus"], topo["num_replicas"] // topo["num_gpus"]
    rows = []
    for seed in seeds:
        w = generate(PRESET, windows=2, seed=seed)
        for policy in ("hierarchical", "global"):
            full = eplb_opt.solve(w[1], **topo, policy=policy)
            deployed = eplb_opt.solve(w[0], **topo, policy=policy).plan.phy2log.numpy()
            # With a GPU masked the nodes are unequal: the hierarchical row asks for "auto",
            # which plans the masked layers with the global policy (an explicit
            # "hierarchical" with masked GPUs is refused, never switched).
            masked_policy = "auto" if policy == "hierarchical" else policy
            t0 = time.perf_counter()
            ours = eplb_opt.solve(w[1], **topo, policy=masked_policy, masked_gpus=[dead])
            t_ours = time.perf_counter() - t0
            mig = eplb_opt.solve(w[1], **topo, policy=masked_policy, masked_gpus=[dead], previous=deployed,
                                 max_balance_loss=0.005)
            active = np.ones(G, dtype=bool)
            active[dead] = False
            t0 = time.perf_counter()
            pp = peer(torch.from_numpy(w[1]), topo["num_replicas"], topo["num_groups"], topo["num_nodes"], G,
                      active)[0].numpy().copy()
            t_peer = time.perf_counter() - t0
            pp[:, dead * k:(dead + 1) * k] = -1                  # its placeholder slots hold nothing
            old = deployed.copy()
            old[:, dead * k:(dead + 1) * k] = -1
            peer_aligned = eplb_opt.align_to_previous(np.where(pp < 0, w.shape[2], pp),
                                                      np.where(old < 0, w.shape[2] + 1, old), G, 1)
            peer_aligned[peer_aligned == w.shape[2]] = -1
            rows.append({
                "seed": seed, "policy": policy, "unmasked": full.balancedness,
                "capacity_bound": full.balancedness * (G - 1) / G, "ours": ours.balancedness,
                "sglang_elasticity": eplb_opt.balancedness(eplb_opt.gpu_loads(w[1], pp, G)),
                "ours_time_s": t_ours, "sglang_time_s": t_peer,
                "moves_ours": int(mig.moves.sum()), "moves_baseline": int(mig.migration.baseline_moves.sum()),
                "moves_sglang_relabelled": int(count_moves(old, peer_aligned, G, topo["num_nodes"]).sum()),
                "balancedness_with_previous": mig.balancedness,
            })
            r = rows[-1]
            print(f"  masked {policy} seed {seed}: ours {r['ours']:.5f} (unmasked x31/32 {r['capacity_bound']:.5f}), "
                  f"SGLang {r['sglang_elasticity']:.5f}; moves {r['moves_ours']} vs {r['moves_baseline']} "
                  f"(SGLang relabelled {r['moves_sglang_relabelled']})", file=sys.stderr)
    return {"preset": PRESET, "dead_gpu": dead, "rows": rows}


SECTIONS = {"migration": migration, "robust": robust, "spill": spill, "masked": masked}


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
