"""Replay (issue 16, part 1): every policy's rebalance loop over a drifting per-step trace.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.run_replay [--presets deepseek-v3-prefill qwen3-235b]
        [--steps 3000 2500] [--intervals 100 500 2000] [--exact-time-limit 0.2]
        [--exact-presets deepseek-v3-prefill]

For each preset: a seeded per-step trace (``eplb_opt.replay.step_trace``: the preset's
popularity, a random walk of 0.15 per 500 steps, a mix switch at the middle step,
Poisson counts of the preset's tokens per step), written to a temporary ``.npy`` and
streamed; then ``eplb_opt.replay`` with every policy (``ours``, ``exact`` at a small
deterministic budget, ``migrate``, ``windows``, ``forecast``, ``deepseek``, ``vllm``,
``sglang_vec``; ``forecast`` since issue 16 part 2, so replay.json predates it)
at each interval, the time model at its defaults.  ``exact`` runs on
``--exact-presets`` only: on the Qwen3-shaped preset (94 x 128, global policy) one
deterministic exact plan took about 16 s on 2 cores at any budget from 0.02 to 0.2, which
would put the sweep far past 10 minutes.  Writes ``replay.json`` next to this file (after
each preset) and the plots into ``replay/<preset>/``; prints a table per preset.  Peers
whose wheels cannot be had are left out and named.  It does not touch ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import eplb_opt
from eplb_opt.bench.runner import machine
from eplb_opt.replay import POLICY_NAMES, step_trace, step_trace_parameters
from eplb_opt.replay._output import write_plots
from eplb_opt.workloads import PRESETS

HERE = Path(__file__).resolve().parent


def run_preset(name: str, steps: int, intervals: list[int], exact_limit: float | None, seed: int) -> dict:
    """One preset's replay, as ``ReplayResult.to_dict()`` plus the trace's parameters
    (``exact_limit`` None: without the ``exact`` policy)."""
    topo = PRESETS[name].topology()
    policies = [p for p in POLICY_NAMES if p != "exact" or exact_limit is not None]
    with tempfile.TemporaryDirectory(prefix="eplb-replay-bench-") as tmp:
        t0 = time.perf_counter()
        path = step_trace(name, steps, seed=seed, out=Path(tmp) / "trace.npy")
        gen_s = time.perf_counter() - t0
        result = eplb_opt.replay(path, **topo, policies=policies, interval=intervals,
                                 exact_time_limit=exact_limit or 0.0, progress=True)
    data = compact(result.to_dict(points=500))
    data.update(preset=name, trace_parameters=step_trace_parameters(name, steps, seed=seed), generate_s=gen_s,
                trace=f"generated {name} trace (seed {seed}, {steps} steps)", exact_time_limit=exact_limit)
    out = HERE / "replay" / name
    out.mkdir(parents=True, exist_ok=True)
    data["plots"] = [f"replay/{name}/{p}" for p in write_plots(data, out)]
    print(table(data, result))
    return data


def compact(data: dict) -> dict:
    """Per-bin series rounded for the record (balancedness to 5 decimals, bytes to whole
    bytes): the plots and totals are unchanged, the file a third of the size."""
    for r in data["runs"]:
        r["series_balancedness"] = [round(x, 5) for x in r["series_balancedness"]]
        r["series_bytes_moved"] = [int(x) for x in r["series_bytes_moved"]]
    return data


def dump(data: dict) -> str:
    """JSON with one line per list of numbers (the per-bin series would take a line per value)."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[\s+([-0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def table(data: dict, result: eplb_opt.replay.ReplayResult) -> str:
    """Total time per policy and interval, the best interval, and the gap closed there."""
    iv = data["intervals"]
    head = f"{'policy':<12}" + "".join(f"{'time@' + str(i):>12}" for i in iv) + \
        f"{'best':>7}{'gap closed':>12}{'moves':>9}{'plan s':>8}"
    lines = [f"== {data['preset']}: {data['steps']} steps, {data['elapsed_s']:.0f} s replay", head, "-" * len(head)]
    for p in result.policies:
        tot = {i: result.totals(p, i) for i in iv if any(r.policy == p and r.interval == i for r in result.runs)}
        best = result.best_interval(p)
        t = tot.get(best, {})
        cells = "".join(f"{tot[i]['time_s']:>12.2f}" if i in tot else f"{'-':>12}" for i in iv)
        gc = "-" if t.get("gap_closed") is None else f"{t['gap_closed']:.1%}"
        lines.append(f"{p:<12}{cells}{best!s:>7}{gc:>12}{t.get('moves', 0):>9}{t.get('plan_s_mean', 0):>8.2f}")
    lb = "".join(f"{data['lower_bound_total'][str(i)] / data['time_model']['gpu_tokens_per_s']:>12.2f}" for i in iv)
    lines.append(f"{'bound':<12}{lb}   (certified, compute only)")
    for p, why in data["skipped"].items():
        lines.append(f"skipped {p}: {why}")
    for p, why in data["failed"].items():
        lines.append(f"failed {p}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["deepseek-v3-prefill", "qwen3-235b"], choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, nargs="+", default=[3000, 2500], help="one per preset (or one for all)")
    ap.add_argument("--intervals", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--exact-time-limit", type=float, default=0.2)
    ap.add_argument("--exact-presets", nargs="*", default=["deepseek-v3-prefill"], choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    steps = args.steps * len(args.presets) if len(args.steps) == 1 else args.steps
    if len(steps) != len(args.presets):
        ap.error(f"--steps: one value, or one per preset ({len(args.presets)}), got {args.steps}")
    t0 = time.perf_counter()
    out = {"command": " ".join([".venv/bin/python -m benchmarks.run_replay", *(sys.argv[1:] if argv is None else argv)]),
           "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "presets": []}
    for name, n in zip(args.presets, steps):
        limit = args.exact_time_limit if name in args.exact_presets else None
        out["presets"].append(run_preset(name, n, args.intervals, limit, args.seed))
        out["elapsed_s"] = time.perf_counter() - t0
        (HERE / "replay.json").write_text(dump(out))
    print(f"wrote {HERE / 'replay.json'} and benchmarks/replay/<preset>/*.png in {out['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
