"""Core benchmark: eplb-opt's heuristic mode against DeepSeek's reference EPLB.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.run_core [--quick] [--out benchmarks/results]

Suite (fixed): presets deepseek-v3-prefill, deepseek-v3-decode, qwen3-235b, kimi-k2,
no-redundancy x workload seeds 0-4 x two windows.  A plan is made from window 0 and
scored on window 0 (in-window) and window 1 (next window).  DeepSeek's reference is
loaded from the sglang==0.5.23 wheel (benchmarks/peers.py).  Timing is the whole public
call in a warm process, our call and DeepSeek's alternating, median over repeats.

Writes ``RESULTS.md`` and ``results.json`` into ``--out`` (default: benchmarks/).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import eplb_opt
from eplb_opt.workloads import PRESETS, generate

from .peers import deepseek_rebalance

SUITE = ["deepseek-v3-prefill", "deepseek-v3-decode", "qwen3-235b", "kimi-k2", "no-redundancy"]
SEEDS = [0, 1, 2, 3, 4]
SPEED_PRESET = "deepseek-v3-prefill"
SCALE = eplb_opt.workloads.Preset("scale-1024", 60, 1024, 2048, 16, 8, 256)


def _bal(weight: np.ndarray, phy2log, gpus: int) -> float:
    return eplb_opt.balancedness(eplb_opt.gpu_loads(weight, np.asarray(phy2log), gpus))


def _alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, interleaved (A B A B ...), after a warm-up."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__}"
    )


def quality(progress: bool = True) -> list[dict]:
    ds = deepseek_rebalance()
    rows = []
    for name in SUITE:
        p = PRESETS[name]
        for seed in SEEDS:
            w = generate(name, windows=2, seed=seed)
            topo = (p.num_replicas, p.num_groups, p.num_nodes, p.num_gpus)
            res = eplb_opt.solve(w[0], **p.topology())
            theirs = ds(torch.from_numpy(w[0]), *topo)[0].numpy()
            row = {
                "preset": name,
                "seed": seed,
                "policy": res.policy,
                "ours_in": res.balancedness,
                "ours_next": _bal(w[1], res.plan.phy2log.numpy(), p.num_gpus),
                "ds_in": _bal(w[0], theirs, p.num_gpus),
                "ds_next": _bal(w[1], theirs, p.num_gpus),
                "ceiling": res.balancedness_ceiling,
                "gap_max": float(res.gap.max()),
                "gap_mean": float(res.gap.mean()),
                "ds_valid": not eplb_opt.plan_violations(
                    theirs, p.num_experts, p.num_replicas, p.num_gpus, num_groups=p.num_groups,
                    num_nodes=p.num_nodes, hierarchical=res.policy == "hierarchical",
                ),
            }
            rows.append(row)
            if progress:
                print(
                    f"  {name:20s} seed {seed}: ours {row['ours_in']:.5f}/{row['ours_next']:.5f}  "
                    f"deepseek {row['ds_in']:.5f}/{row['ds_next']:.5f}  (in/next window)",
                    file=sys.stderr,
                )
    return rows


def speed(preset: eplb_opt.workloads.Preset, repeats: int) -> dict:
    ds = deepseek_rebalance()
    w = generate(preset, windows=1, seed=0)[0]
    wt = torch.from_numpy(w)
    topo = (preset.num_replicas, preset.num_groups, preset.num_nodes, preset.num_gpus)
    times = _alternate(
        {
            "deepseek": lambda: ds(wt, *topo),
            "rebalance_experts": lambda: eplb_opt.rebalance_experts(wt, *topo),
            "solve": lambda: eplb_opt.solve(wt, **preset.topology()),
        },
        repeats,
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = eplb_opt.rebalance_experts(wt, *topo)
    res = eplb_opt.solve(wt, **preset.topology())
    theirs = ds(wt, *topo)[0].numpy()
    eplb_opt.verify(ours[0], preset.num_experts, preset.num_replicas, preset.num_gpus,
                    num_groups=preset.num_groups, num_nodes=preset.num_nodes, hierarchical=True,
                    log2phy=ours[1], logcnt=ours[2])
    return {
        "preset": preset.as_dict(),
        "repeats": repeats,
        "median_s": med,
        "all_s": times,
        "speedup_rebalance": med["deepseek"] / med["rebalance_experts"],
        "speedup_solve": med["deepseek"] / med["solve"],
        "ours_balancedness": res.balancedness,
        "ds_balancedness": _bal(w, theirs, preset.num_gpus),
        "valid": True,
    }


def write_report(out: Path, data: dict) -> None:
    q = data["quality"]
    lines = [
        "# eplb-opt benchmark results",
        "",
        f"Generated {data['date']} by `{data['command']}`",
        f"on {data['machine']}.",
        "",
        "Workloads are synthetic (`eplb_opt.workloads.generate`, seeded): real expert-load traces",
        "are not reachable from this machine.  DeepSeek's reference is the verbatim copy in the",
        "`sglang==0.5.23` wheel, run in the same process on the same input.",
        "",
        "## Quality (heuristic mode)",
        "",
        "Plan from window 0, scored on window 0 (in-window) and window 1 (next window); mean over",
        "seeds 0-4.  `ceiling` is the certified upper bound on any plan's in-window balancedness",
        "under the policy; `gap` is per-layer `1 - lower_bound / max_load`.",
        "",
        "| preset | policy | ours in | DeepSeek in | ours next | DeepSeek next | ceiling | worst gap | mean gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SUITE:
        rs = [r for r in q if r["preset"] == name]
        m = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
        lines.append(
            f"| {name} | {rs[0]['policy']} | {m('ours_in'):.5f} | {m('ds_in'):.5f} | {m('ours_next'):.5f} | "
            f"{m('ds_next'):.5f} | {m('ceiling'):.5f} | {max(r['gap_max'] for r in rs):.4%} | {m('gap_mean'):.4%} |"
        )
    wins = sum(r["ours_in"] >= r["ds_in"] - 1e-12 for r in q)
    nxt = float(np.mean([r["ours_next"] - r["ds_next"] for r in q]))
    lines += [
        "",
        f"In-window, ours >= DeepSeek on {wins} of {len(q)} workloads "
        f"(worst difference {min(r['ours_in'] - r['ds_in'] for r in q):+.5f}).",
        f"Next window, mean difference ours - DeepSeek over the suite: {nxt:+.5f}.",
        f"DeepSeek plans valid under the declared policy: {sum(r['ds_valid'] for r in q)} of {len(q)}.",
        "",
        "## Speed",
        "",
        "Median wall-clock seconds of the whole public call in a warm process, calls alternating",
        "(DeepSeek, `rebalance_experts`, `solve`).  `rebalance_experts` returns the three DeepSeek",
        "tensors, `log2phy` padded to `R - E + 1` as DESIGN.md fixes it (DeepSeek's copy pads to",
        "the largest count); `solve` also computes the certified bounds and gaps, and derives",
        "`log2phy` only when asked.",
        "",
        "| preset | repeats | DeepSeek | rebalance_experts | solve | speed-up (rebalance) | speed-up (solve) | ours bal | DeepSeek bal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["speed"]:
        med = s["median_s"]
        lines.append(
            f"| {s['preset']['name']} ({s['preset']['num_layers']}x{s['preset']['num_experts']}, "
            f"{s['preset']['num_replicas']}/{s['preset']['num_groups']}/{s['preset']['num_nodes']}/{s['preset']['num_gpus']}) "
            f"| {s['repeats']} | {med['deepseek']:.4f} | {med['rebalance_experts']:.4f} | {med['solve']:.4f} "
            f"| {s['speedup_rebalance']:.1f}x | {s['speedup_solve']:.1f}x | {s['ours_balancedness']:.5f} | {s['ds_balancedness']:.5f} |"
        )
    lines.append("")
    (out / "RESULTS.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--repeats", type=int, default=15, help="timing repeats (>= 5)")
    ap.add_argument("--skip-scale", action="store_true", help="skip the 60 x 1024 scale case")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print("quality suite ...", file=sys.stderr)
    q = quality()
    print("speed ...", file=sys.stderr)
    sp = [speed(PRESETS[SPEED_PRESET], args.repeats)]
    if not args.skip_scale:
        sp.append(speed(SCALE, max(5, args.repeats // 3)))
    data = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.run_core " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(),
        "quality": q,
        "speed": sp,
    }
    (args.out / "results.json").write_text(json.dumps(data, indent=1))
    write_report(args.out, data)
    print((args.out / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
