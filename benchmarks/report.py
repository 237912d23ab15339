"""Builds ``benchmarks/RESULTS.md`` from the recorded JSON files (``core.json``, ``exact.json``,
``beyond.json``, ``ray.json``, ``deadlines.json``, ``deadlines_p99.json``, ``gaps.json``,
``experiments/cpsat_magnitude/results.json``, ``soak.json``, ``fuzz.json``; each section only where its file
exists)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .run_core import SUITE

__all__ = ["write"]


def plot(out: Path, data: dict) -> str | None:
    """Bar chart of mean balancedness per preset (ours vs DeepSeek, in-window and next
    window, with the certified ceiling); returns the file name, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    q = data["quality"]
    names = SUITE
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.6))
    series = [
        ("ours_in", "eplb-opt, in-window", "#1f77b4", 0.0),
        ("ds_in", "DeepSeek, in-window", "#ff7f0e", 0.0),
        ("ours_next", "eplb-opt, next window", "#aec7e8", 0.0),
        ("ds_next", "DeepSeek, next window", "#ffbb78", 0.0),
    ]
    width = 0.2
    for i, (key, label, color, _) in enumerate(series):
        vals = [np.mean([r[key] for r in q if r["preset"] == n]) for n in names]
        ax.bar(x + (i - 1.5) * width, vals, width, label=label, color=color)
    ceil = [np.mean([r["ceiling"] for r in q if r["preset"] == n]) for n in names]
    ax.scatter(x - 1.5 * width, ceil, marker="_", s=400, color="k", label="certified ceiling (in-window)", zorder=3)
    ax.set_xticks(x, names, rotation=0, fontsize=8)
    ax.set_ylabel("balancedness (mean over seeds)")
    ax.set_ylim(0.4, 1.01)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title("Balancedness per preset: eplb-opt heuristic mode vs DeepSeek EPLB")
    fig.tight_layout()
    name = "balancedness.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _core_section(out: Path, data: dict) -> list[str]:
    data["plot"] = plot(out, data)
    q = data["quality"]
    lines = [
        "## Heuristic mode against DeepSeek's reference",
        "",
        f"Generated {data['date']} by `{data['command']}`",
        f"on {data['machine']}.",
        "",
        "Workloads are synthetic (`eplb_opt.workloads.generate`, seeded): real expert-load traces",
        "are not reachable from this machine.  DeepSeek's reference is the verbatim copy in the",
        "`sglang==0.5.23` wheel, run in the same process on the same input.",
        "",
        "### Quality",
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
        "### Speed",
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
    prefill = data["speed"][0]
    lines += [
        "",
        f"Prefill-preset target (>= 10x DeepSeek for the whole public call): "
        f"`rebalance_experts` {prefill['speedup_rebalance']:.1f}x, `solve` {prefill['speedup_solve']:.1f}x "
        "(see the note below).",
    ]
    orig = prefill.get("original_rotation_s")
    if orig:
        ratio = orig["original"] / orig["deepseek"]
        lines.append(
            f"Context: DeepSeek's original form of the same algorithm (deepseek-ai/EPLB's loops over "
            f"torch tensor elements, as shipped in `sglang==0.4.10`; same plans) took "
            f"{orig['original'] * 1e3:.0f} ms against {orig['deepseek'] * 1e3:.1f} ms for the 0.5.23 copy "
            f"(which runs its loops over Python lists) in a rotation of their own: {ratio:.0f}x slower, "
            f"so `rebalance_experts` is about {ratio * prefill['speedup_rebalance']:.0f}x faster than "
            "the original form."
        )
    if len(data["speed"]) > 1:
        sc = data["speed"][1]
        lines.append(
            f"Scale target (60 x 1024, valid and >= 10x): plan verified; `solve` {sc['speedup_solve']:.1f}x, "
            f"`rebalance_experts` {sc['speedup_rebalance']:.1f}x (its `log2phy` alone is "
            f"{sc['preset']['num_layers'] * sc['preset']['num_experts'] * (sc['preset']['num_replicas'] - sc['preset']['num_experts'] + 1) * 8 / 2**20:.0f} MiB of -1 padding)."
        )
    if data.get("stages"):
        st = data["stages"]
        ds_s = prefill["median_s"]["deepseek"]
        rows = [
            ("input validation (`make_problem`)", st["validate"]),
            ("placement without refinement (groups, counts, sort, snake / KK seeds, duplicates)", st["place_seeds"]),
            ("swap refinement (placement with minus without)", st["place"] - st["place_seeds"]),
            ("`log2phy` / `logcnt` (`derive_maps`)", st["maps"]),
            ("independent verifier", st["verify"]),
        ]
        lines += [
            "",
            f"Where the prefill `rebalance_experts` call ({st['call'] * 1e3:.2f} ms in this run) spends "
            f"its time, each stage timed alone on the same input; the 10x budget is "
            f"{ds_s / 10 * 1e3:.2f} ms (DeepSeek {ds_s * 1e3:.1f} ms / 10):",
            "",
            "| stage | ms | share of the call |",
            "|---|---|---|",
        ]
        for name, t in rows:
            lines.append(f"| {name} | {t * 1e3:.2f} | {t / st['call']:.0%} |")
        mandatory = st["validate"] + st["place_seeds"] + st["maps"] + st["verify"]
        lines += [
            "",
            f"Everything but refinement takes {mandatory * 1e3:.2f} ms here "
            f"({ds_s / mandatory:.1f}x DeepSeek).  Our calls measure slower in the rotation with "
            f"DeepSeek than among themselves (the whole call {prefill['median_s']['rebalance_experts'] * 1e3:.2f} ms "
            f"there against {st['call'] * 1e3:.2f} ms here), and there the call without refinement "
            "stays under 10x (round-cap table, 0 rounds).  The same call on "
            f"one layer (1/58 of the data) takes {st['call_one_layer'] * 1e3:.2f} ms "
            f"({st['call_one_layer'] / st['call']:.0%} of the full call): a numpy pipeline pays a "
            "fixed cost per operation, whatever the array size.",
        ]
    if data.get("frontier"):
        lines += [
            "",
            "Refinement-round cap (heuristic mode) against quality and prefill speed, same suite and process:",
            "",
            "| rounds | workloads >= DeepSeek in-window | worst difference | prefill `rebalance_experts` | speed-up |",
            "|---|---|---|---|---|",
        ]
        for f in data["frontier"]:
            lines.append(
                f"| {f['rounds']} | {f['wins']} of {f['workloads']} | {f['worst_diff']:+.5f} | "
                f"{f['median_rebalance_s'] * 1e3:.2f} ms | {f['speedup_rebalance']:.1f}x |"
            )
    if data.get("plot"):
        lines += ["", f"![balancedness per preset]({data['plot']})"]
    lines += ["", "Notes:", ""] + [f"* {n}" for n in data.get("notes", [])]
    lines.append("")
    return lines




def _exact_section(data: dict) -> list[str]:
    lines = [
        "## Exact mode",
        "",
        f"Generated {data['date']} by `{data['command']}` (machine as above).",
        "",
        "DeepSeek-V3 prefill-shaped loads (58 layers x 256 experts, 16384 tokens x top-8), "
        "`mode=\"exact\", time_limit=60` on all cores, against heuristic mode and DeepSeek's "
        "reference on the same input.  Gaps are per layer, `1 - certified lower bound / max "
        "load`; `excess closed` is the share of the heuristic's summed excess over the bound "
        "that exact mode removes.",
        "",
        "| seed | configuration | target | DeepSeek bal / worst gap | heuristic bal / worst / mean gap | "
        "exact bal / worst / mean gap | exact time | layers over target | excess closed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["quality"]:
        d, h, e = r["deepseek"], r["heuristic"], r["exact"]
        lines.append(
            f"| {r['seed']} | {r['config']} | {r['target']:.2%} | {d['balancedness']:.5f} / {d['gap_max']:.3%} | "
            f"{h['balancedness']:.5f} / {h['gap_max']:.4%} / {h['gap_mean']:.4%} | "
            f"{e['balancedness']:.6f} / {e['gap_max']:.4%} / {e['gap_mean']:.4%} | {e['time_s']:.1f} s | "
            f"{e['layers_over_target']} | {r['excess_closed']:.0%} |"
        )
    on = data["online"]
    lines += [
        "",
        "Online budgets on the prefill preset (hierarchical), calls after OR-Tools is loaded:",
        "",
        "| time_limit | calls | wall median | wall max | never less balanced than heuristic | excess closed (median) |",
        "|---|---|---|---|---|---|",
    ]
    for b in on["budgets"]:
        lines.append(
            f"| {b['time_limit']:g} s | {b['calls']} | {b['wall_median']:.3f} s | {b['wall_max']:.3f} s | "
            f"{'yes' if b['never_less_balanced'] else 'NO'} | {b['excess_closed_median']:.0%} |"
        )
    dt = data["determinism"]
    lines += [
        "",
        f"Determinism ({dt['config']}, time_limit {dt['time_limit']:g}): `deterministic=True` twice gives "
        f"{'the same plan' if dt['repeatable'] else 'DIFFERENT plans'}; worst / mean gap "
        f"{dt['deterministic_gap_max']:.4%} / {dt['deterministic_gap_mean']:.4%} in {dt['deterministic_wall_s']:.1f} s "
        f"wall, against {dt['default_gap_max']:.4%} / {dt['default_gap_mean']:.4%} by default (wall-clock budgets).",
        "",
    ]
    return lines


def _ray_section(data: dict) -> list[str]:
    d, f = data["deterministic"], data["default"]
    t = data["topology"]
    lines = [
        "## Ray scale-out",
        "",
        f"Generated {data['date']} by `{data['command']}` (machine as above; a local Ray instance "
        f"with {data['ray_cpus']} CPUs, started in {data['ray_startup_s']:.1f} s).",
        "",
        f"DeepSeek-V3 prefill-shaped loads ({data['layers']} layers, seed 0), {t['policy']} policy, "
        f"{t['num_replicas']} replicas on {t['num_gpus']} GPUs, `mode=\"exact\", time_limit={data['time_limit']:g}`:",
        "",
        "| run | local wall | Ray wall | local worst / mean gap | Ray worst / mean gap | same plan |",
        "|---|---|---|---|---|---|",
        f"| `deterministic=True` | {d['local_s']:.1f} s | {d['ray_s']:.1f} s | "
        f"{d['local']['gap_max']:.4%} / {d['local']['gap_mean']:.4%} | {d['ray']['gap_max']:.4%} / "
        f"{d['ray']['gap_mean']:.4%} | {'yes' if d['identical'] else 'NO'} |",
        f"| default (wall clock) | {f['local_s']:.1f} s | {f['ray_s']:.1f} s | "
        f"{f['local']['gap_max']:.4%} / {f['local']['gap_mean']:.4%} | {f['ray']['gap_max']:.4%} / "
        f"{f['ray']['gap_mean']:.4%} | (not expected) |",
        "",
        "Overhead per sub-problem (one Ray task per layer, all queued at once; `(wall x CPUs - time "
        "inside the tasks) / tasks`: what the pool spends per sub-problem on anything but the work):",
        "",
        "| task | tasks | wall | inside a task (median) | overhead per sub-problem |",
        "|---|---|---|---|---|",
    ]
    for name, o in data["overhead"].items():
        lines.append(f"| {name} | {o['tasks']} | {o['wall_s']:.2f} s | {o['compute_median_ms']:.0f} ms | "
                     f"{o['overhead_ms']:.1f} ms |")
    lines.append("")
    return lines


def _beyond_section(data: dict) -> list[str]:
    lines = ["## Beyond balance", ""]
    mig = data.get("migration")
    if mig:
        lines += [
            "### Migration-aware replanning",
            "",
            f"Generated {mig['date']} by `{mig['command']}` (machine as above).",
            "",
            f"{mig['preset']}-shaped loads, {mig['windows']} consecutive windows per seed: the plan of "
            "window 0 is deployed, each later window is planned with `previous=` the deployed plan and "
            f"`max_balance_loss={mig['max_balance_loss']}`, then deployed.  Baseline: a full replan of the "
            "same window with nodes and GPUs relabelled to match the deployed plan (an assignment problem).  "
            "A move is a replica on a GPU that did not hold that expert; cost weighs cross-node copies "
            f"{mig['node_move_cost']:g}x.  Exact mode: `time_limit={mig['exact_time_limit']:g}` (its cap "
            "comes from the exact fresh plan, so it is tighter).",
            "",
            "| policy / mode | steps | moves / baseline moves (median, worst) | worst cost ratio | "
            "balancedness lost vs baseline (median, worst) | time per call (median) |",
            "|---|---|---|---|---|---|",
        ]
        for key, s in mig["summary"].items():
            lines.append(
                f"| {key} | {s['steps']} | {s['moves_ratio_median']:.1%}, {s['moves_ratio_max']:.1%} | "
                f"{s['cost_ratio_max']:.1%} | {s['balance_loss_median']:.3%}, {s['balance_loss_max']:.3%} | "
                f"{s['time_median_s']:.2f} s |"
            )
        lines.append("")
    rob = data.get("robust")
    if rob:
        methods = rob["methods"]
        lines += [
            "### Robust plans over windows",
            "",
            f"Generated {rob['date']} by `{rob['command']}` (machine as above).",
            "",
            f"Plans made from the last {rob['history']} windows (heuristic mode: their total, the worst window, the "
            "mean window), from the latest window alone, and by SGLang's `deepseek_vec` (sglang 0.5.23) given "
            "the same windows as steps; every plan scored on the **next** window (balancedness, mean over seeds).  "
            "Scenarios: `drift` is the default generator (random-walk drift 0.15 per window); `alternating "
            "mixes` switches between two traffic mixes every window (`mix_shift=0.5, mix_period=1, drift=0.05`).",
            "",
            "| scenario / preset | " + " | ".join(methods) + " | best | time worst / mean |",
            "|---|" + "---|" * (len(methods) + 2),
        ]
        for key, s in rob["summary"].items():
            best = max(methods, key=lambda m: s[m])
            lines.append(f"| {key} | " + " | ".join(f"{s[m]:.4f}" for m in methods)
                         + f" | {best} | {s['time worst']:.2f} / {s['time mean']:.2f} s |")
        lines.append("")
    sp = data.get("spill")
    if sp:
        lines += [
            "### Locality-aware spill",
            "",
            f"Generated {sp['date']} by `{sp['command']}` (machine as above).",
            "",
            f"`policy=\"spill\"` on {sp['preset']}-shaped loads: every expert keeps a replica on its group's "
            "home node; the others go anywhere at `cross_node_cost` per unit of load served off-node.  The "
            "off-node share of the hierarchical and global policies is measured against the same home nodes.",
            "",
            "| seed | policy | cross_node_cost | balancedness | off-node share | time |",
            "|---|---|---|---|---|---|",
        ]
        for x in sp["rows"]:
            lam = "" if x["cross_node_cost"] is None else (x["cross_node_cost"] if isinstance(x["cross_node_cost"], str)
                                                          else f"{x['cross_node_cost']:g}")
            lines.append(f"| {x['seed']} | {x['policy']} | {lam} | {x['balancedness']:.5f} | "
                         f"{x['off_node_share']:.2%} | {x['time_s']:.1f} s |")
        lines += ["", f"![spill curve]({sp['plot']})", ""]
    mk = data.get("masked")
    if mk:
        lines += [
            "### Failed GPUs (`masked_gpus`)",
            "",
            f"Generated {mk['date']} by `{mk['command']}` (machine as above).",
            "",
            f"{mk['preset']}-shaped loads, GPU {mk['dead_gpu']} of 32 masked (both policies plan globally over "
            "the 31 active GPUs, 279 replicas; balancedness counts all 32 GPUs, the masked one at zero).  "
            "`capacity bound` is the unmasked plan's balancedness x 31/32.  Moves: from the previous window's "
            "deployed plan (the masked GPU's copies lost), `max_balance_loss=0.005`, against our relabelled "
            "full replan and SGLang's elasticity-aware plan relabelled the same way.",
            "",
            "| seed | policy | unmasked | capacity bound | ours masked | SGLang elasticity-aware | "
            "ours - bound | moves ours / replan / SGLang |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in mk["rows"]:
            lines.append(
                f"| {x['seed']} | {x['policy']} | {x['unmasked']:.5f} | {x['capacity_bound']:.5f} | {x['ours']:.5f} | "
                f"{x['sglang_elasticity']:.5f} | {x['ours'] - x['capacity_bound']:+.4f} | "
                f"{x['moves_ours']} / {x['moves_baseline']} / {x['moves_sglang_relabelled']} |"
            )
        lines.append("")
    return lines


def _deadlines_section(data: dict) -> list[str]:
    ld, ov = data["load"], data["overall"]
    busy = ", ".join("?" if x is None else f"{x:.0%}" for x in ld["busy_cpu_fraction"]) or "-"
    m = data["machine"]
    target = data["target_ms"]
    prev = data.get("previous", False)
    lines = [
        "## Deadlines under load" + (", replanning from a deployed plan (`previous=`)" if prev else ""),
        "",
        *(["Every exact call passes `previous=` (the heuristic plan of the window before) and "
           "`max_balance_loss=0.005`; the heuristic time below is the fresh heuristic plan's.", ""] if prev else []),
        f"Generated {data['date']} by `{data['command']}` on {m['cpu']}, {m['cpu_count']} cores "
        f"({m['platform']}).",
        "",
        f"{data['preset']['name']} loads ({data['preset']['num_layers']} layers x {data['preset']['num_experts']} "
        f"experts, {data['preset']['num_replicas']} / {data['preset']['num_groups']} / "
        f"{data['preset']['num_nodes']} / {data['preset']['num_gpus']}), `mode=\"exact\"` in a warm process "
        "(OR-Tools loaded) while every core runs a busy loop: "
        f"{ld['busy_processes']} spinning subprocesses, CPU share of each {busy} over the "
        f"{ld['measure_s']:.0f} s measured (load average {ld['loadavg_before'][0] if ld['loadavg_before'] else '?'} "
        f"before, {ld['loadavg_after'][0] if ld['loadavg_after'] else '?'} after).  Each call's input is a "
        "different window; right before it the heuristic-mode call on the same input is timed.  "
        "Overhead = exact wall - max(time_limit, heuristic wall); negative: returned early (every layer "
        "within tolerance of its bound).",
        "",
        "| time_limit | calls | heuristic (median) | overhead median | p90 | p99 | max | within "
        f"{target:.0f} ms | calls with timeout events | all layers optimal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(data["per_budget"].items()) + [("**all**", ov)]
    for name, s in rows:
        label = name if name.startswith("*") else f"{name} s"
        lines.append(
            f"| {label} | {s['calls']} | {1e3 * s['heuristic_median_s']:.1f} ms | {s['overhead_median_ms']:+.1f} ms | "
            f"{s['overhead_p90_ms']:+.1f} ms | {s['overhead_p99_ms']:+.1f} ms | {s['overhead_max_ms']:+.1f} ms | "
            f"{s['within_target']:.0%} | {s['calls_with_timeout_events']} | {s['all_optimal']} |"
        )
    lines += [
        "",
        f"Target (overhead p99 <= {target:.0f} ms with every core busy): "
        f"**{'met' if ov['meets_target'] else 'NOT met'}**, p99 over all {ov['calls']} calls "
        f"{ov['overhead_p99_ms']:+.1f} ms (over the calls not finished early: "
        f"{ov['overhead_p99_ms_not_all_optimal']:+.1f} ms); worst {ov['overhead_max_ms']:+.1f} ms.",
    ]
    return lines + _events_and_plot(data, "deadline overhead per budget")


def _events_and_plot(data: dict, alt: str) -> list[str]:
    """The closing part of the deadline and soak sections: event kinds, then the plot."""
    lines: list[str] = []
    if data.get("event_kinds"):
        lines += ["", "Events seen (calls with each kind):", ""]
        lines += [f"* {k}: {v}" for k, v in data["event_kinds"].items()]
    if data.get("plot"):
        lines += ["", f"![{alt}]({data['plot']})"]
    lines.append("")
    return lines


def _soak_section(data: dict) -> list[str]:
    s = data["summary"]
    m = data["machine"]
    how = ("`eplb_opt.should_rebalance` (deploying its candidate when worth it)" if data["trigger"]
           else f"`eplb_opt.solve(..., previous=deployed, max_balance_loss={data['max_balance_loss']:g})`")
    lines = [
        "## Soak: online replanning",
        "",
        f"Generated {data['date']} by `{data['command']}` on {m['cpu']}, {m['cpu_count']} cores "
        f"({m['platform']}); {data['elapsed_s'] / 60:.1f} min.",
        "",
        f"{data['preset']['name']} loads, drifting: "
        + (f"one random walk (drift {data['drift']:g} per window, seed {data['seed']})"
           if not data.get("block") else
           f"blocks of {data['block']} windows from consecutive seeds (from {data['seed']}), a random-walk step of "
           f"{data['drift']:g} per window within a block and a new traffic mix at each block boundary (stationary "
           "over the run, so time trends are the library's)")
        + ".  One warm process: window 0 planned and deployed, then each of the next "
        f"{data['windows']} windows replanned from the deployed placement with {how}, "
        f"`mode=\"{data['mode']}\", time_limit={data['time_limit']:g}`, and deployed."
        + (" Interrupted before the end." if data["interrupted"] else ""),
        "",
        "| measure | value |",
        "|---|---|",
        f"| windows replanned (deployed) | {s['calls']} ({s['deployed']}) |",
        f"| per-call wall inside blocks, median of first / last {min(s.get('head', 100), s['within_block_calls'])} "
        f"| {s['time_first_median_ms']:.1f} / {s['time_last_median_ms']:.1f} ms (ratio "
        f"{s['time_ratio_last_first']:.3f}) |",
        f"| per-call wall inside blocks, least-squares slope | {s['time_slope_ms_per_1000']:+.2f} ms per 1000 "
        "windows |",
        f"| per-call wall inside blocks, median | {s['time_median_ms']:.1f} ms ({s['within_block_calls']} calls) |",
        f"| per-call wall at a new traffic mix (first window of a block), median / max | "
        f"{s['boundary_median_ms']:.1f} / {s['boundary_max_ms']:.1f} ms ({s['boundary_calls']} calls) |",
        f"| per-call wall, all calls, p99 / max | {s['time_p99_ms']:.1f} / {s['time_max_ms']:.1f} ms |",
        f"| calls over time_limit | {s['calls_over_budget']} of {s['calls']} |",
        f"| RSS at window {s['rss_ref_window']} / end (growth) | {s['rss_ref_mib']:.1f} / {s['rss_end_mib']:.1f} MiB "
        f"({s['rss_growth_mib']:+.2f} MiB) |",
        f"| RSS slope after window {s['rss_ref_window']} | {s['rss_slope_mib_per_1000_after_ref']:+.2f} MiB per "
        "1000 windows |",
        f"| RSS max over the run / process peak | {s['rss_max_mib']:.1f} / {data['peak_rss_mib']:.1f} MiB |",
        f"| Python threads first / max; OS threads first / max | {s['threads_first']} / {s['threads_max']}; "
        f"{s['os_threads_first']} / {s['os_threads_max']} |",
        f"| open file descriptors first / last / max | {s['fds_first']} / {s['fds_last']} / {s['fds_max']} |",
    ]
    if "deadline_checks" in s:
        lines.append(f"| same replan in heuristic mode (median, {s['deadline_checks']} windows); overhead past "
                     f"max(time_limit, it) median / max | {s['heuristic_median_ms']:.1f} ms; "
                     f"{s['overhead_median_ms']:+.1f} / {s['overhead_max_ms']:+.1f} ms |")
    if "gc_objects_first" in s:
        lines.append(f"| gc-tracked objects first / last sample | {s['gc_objects_first']} / {s['gc_objects_last']} |")
    if "traced_first_mib" in s:
        lines.append(f"| traced Python heap first / last sample | {s['traced_first_mib']:.2f} / "
                     f"{s['traced_last_mib']:.2f} MiB |")
    lines += [
        f"| replica moves per call (median) | {s['moves_median']:.0f} |",
        f"| balancedness median, in-window (next window) | {s['balancedness_median']:.5f} "
        f"({s['next_balancedness_median']:.5f}) |",
    ]
    return lines + _events_and_plot(data, "soak: per-call time and RSS")


def _fuzz_section(data: dict) -> list[str]:
    lines = [
        "## Long fuzz campaign (hypothesis, every entry point)",
        "",
        f"Command: `{data['command']}` ({data['date']}, {data['machine']}; {data['seconds']} s).  "
        f"Runs `{data['pytest']}`.",
        "",
        f"**{data['examples']} examples, {data['failing']} failing** (pytest: {data['pytest_summary']}).",
        "",
        "| test | passing | failing | invalid (filtered) |",
        "|---|---:|---:|---:|",
    ]
    for name, c in sorted(data["tests"].items()):
        lines.append(f"| `{name.split('::', 1)[1]}` ({name.split('::')[0].split('/')[-1]}) | "
                     f"{c['passing']} | {c['failing']} | {c['invalid']} |")
    lines.append("")
    return lines


def _magnitude_section(data: dict) -> list[str]:
    """``experiments/cpsat_magnitude/results.json``: CP-SAT's wrong OPTIMALs by magnitude."""
    lines = [
        "## Certificates: CP-SAT's reliable magnitude (issue 12)",
        "",
        f"Command: `python benchmarks/experiments/cpsat_magnitude/repro.py --per-level {data['per_level']}` "
        f"(OR-Tools {data['ortools']}, {data['seconds']} s).  A standalone model (no eplb-opt code) of the "
        "complete EPLB model; each answer is checked against an exhaustive optimum of the same integer model.  "
        "Wrong answers (all were OPTIMAL with a worse objective) per setting; see the folder's README for the "
        "cause and what eplb-opt does about it (models round loads down at <= 2**24, no load ordering).",
        "",
    ]
    settings = []
    for r in data["rows"]:
        key = (str(r["order"]), r["setting"])
        if key not in settings:
            settings.append(key)
    names = {"True": "ordering", "vars": "ordering on load vars", "False": "no ordering"}
    lines.append("| largest coefficient | " + " | ".join(f"{names[o]}, {s}" for o, s in settings) + " |")
    lines.append("|---|" + "---:|" * len(settings))
    by = {(r["bits"], str(r["order"]), r["setting"]): r for r in data["rows"]}
    for bits in sorted({r["bits"] for r in data["rows"]}):
        cells = [f"{by[(bits, o, s)]['wrong']} / {by[(bits, o, s)]['checked']}" if (bits, o, s) in by else ""
                 for o, s in settings]
        lines.append(f"| 2**{bits:g} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _deadline_p99_section(data: dict) -> list[str]:
    m = data["machine"]
    lines = [
        "## Deadlines: p99 overshoot, warm and fresh processes (issue 12)",
        "",
        f"Command: `{data['command']}` ({data['date']}, {m['cpu']}, {m['cpu_count']} cores; {data['seconds']} s).  "
        "Overshoot = wall time - max(time_limit, heuristic wall time of the same input), prefill preset "
        "(58 x 256, 288 / 8 / 4 / 32).  *warm*: `warm_up()` first; *fresh*: OR-Tools not loaded, no "
        "`warm_up()` (budgets below the import cost never load it, so all their calls are fresh-process "
        "calls); *fresh-first-call*: the first call of separate new processes, for budgets that can pay for "
        "the import.  *busy*: one pure-Python spinner per core beside the process.  "
        f"Targets: p99 <= {data['targets_ms']['idle']:g} ms idle, <= {data['targets_ms']['busy']:g} ms busy; "
        f"met: {data['met']}.",
        "",
        "| policy | load | process | time_limit (s) | calls | median (ms) | p90 (ms) | p99 (ms) | max (ms) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        s = r["summary"]
        lines.append(f"| {r['policy']} | {r['load']} | {r['state']} | {r['time_limit']:g} | {s['calls']} | "
                     f"{s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} |")
    lines.append("")
    return lines


def _gaps_section(data: dict) -> list[str]:
    lines = [
        "## Gap study: exact mode on the full suite (issue 12)",
        "",
        f"Command: `{data['command']}` ({data['date']}; {data['seconds']} s).  Every full-suite workload "
        f"(window 0), `mode=\"exact\", time_limit=60, workers=2`, preset topology, `policy=\"auto\"`.  Target: "
        f"every layer's gap <= {100 * data['target']:.2f}%.  **Worst gap {100 * data['worst_gap']:.4f}%; "
        f"{data['layers_over_target']} of {data['layers']} layers over the target.**",
        "",
        "| workload | policy | worst gap | layer | bound that binds there | layers over target | heuristic worst gap |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    if data.get("note"):
        lines[3:3] = [f"Note: {data['note']}", ""]
    for row in data["workloads"]:
        worst = row["layers"][row["worst_layer"]]
        lines.append(f"| {row['workload']} | {row['policy']} | {100 * row['worst_gap']:.4f}% | {row['worst_layer']} | "
                     f"{worst['binding']} | {row['layers_over_target']} | {100 * row['heuristic_worst_gap']:.4f}% |")
    if data.get("independent_checks"):
        lines += ["", "Independent model on the worst layers (see `benchmarks/run_gaps.py`):", "",
                  "| workload | layer | ours: bound | ours: plan | independent: bound | independent: best plan | "
                  "node models proved optimal |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for c in data["independent_checks"]:
            if "skipped" in c:
                lines.append(f"| {c['workload']} | {c['layer']} | | | | | skipped: {c['skipped']} |")
                continue
            lines.append(f"| {c['workload']} | {c['layer']} | {c['ours_lower_bound']:.8g} | {c['ours_max_load']:.8g} | "
                         f"{c['lower']:.8g} | {c['upper']:.8g} | {c['all_optimal']} |")
    lines.append("")
    return lines


def _deterministic_wall_section(data: dict) -> list[str]:
    m = data["machine"]
    lines = [
        "## Deterministic budgets: wall time (issue 13)",
        "",
        f"Command: `{data['command']}` ({data['date']}, {m['cpu_count']} cores).  "
        "`solve(mode=\"exact\", deterministic=True, time_limit=T, workers=1)` after `warm_up()`, each "
        "preset's seed-0 window and topology: a deterministic budget is work (iterations and CP-SAT "
        "deterministic time), so its wall time depends on the layer count and the machine.  This is what "
        "`time_limit` costs through the vLLM / SGLang integrations, where it is deterministic by default.",
        "",
        "| preset | layers x experts | time_limit T | median wall (s) | wall / T | worst gap | same plan every call |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['preset']} | {r['layers']} x {r['experts']} | {r['time_limit']:g} | "
                     f"{r['median_wall_s']:.2f} | {r['median_wall_s'] / r['time_limit']:.1f} | "
                     f"{100 * r['worst_gap']:.4f}% | {r['identical_plans']} |")
    lines.append("")
    return lines


def _when_measured(ran: dict) -> str:
    """When the sections of ``kernels.json`` were measured (``--sections`` reruns some)."""
    if len(set(ran.values())) == 1:
        return f"Measured {next(iter(ran.values()))}."
    return f"Sections measured: {', '.join(f'{k} {v}' for k, v in ran.items())}."


def _kernels_section(data: dict) -> list[str]:
    """``kernels.json``: issue 15's speed targets."""
    pre, sc, mig, sp = data["prefill"], data["scale"], data["migration"], data["spill"]
    lines = [
        "## Compiled kernels: speed targets (issue 15)",
        "",
        f"Command: `.venv/bin/python -m benchmarks.run_kernels` ({data['machine']}, numba {data['numba']}).  "
        "Single-threaded (torch.set_num_threads(1) for the peer; the kernels are sequential), after "
        "`warm_up()`; our calls and DeepSeek's (the copy SGLang 0.5.23 ships) alternate, each of ours right after "
        "a peer call (prefill and scale: peer, `solve`, peer, `rebalance_experts`), medians of "
        f"{pre['repeats']} (scale: {sc['repeats']}).  The targets in milliseconds have no peer; DeepSeek's prefill "
        "call alternates with them all the same and its median, in brackets, shows how fast the shared machine ran "
        "in that stretch (a process here at times runs 1.5x slower throughout).",
        *([_when_measured(data["ran"])] if "ran" in data else []),
        "",
        "| measure | median | DeepSeek | ratio | target |",
        "|---|---:|---:|---:|---|",
    ]
    for name, target in (("rebalance_experts", ">= 20x (stretch 50x)"), ("solve", ">= 15x")):
        lines.append(f"| prefill 58 x 256 `{name}` | {pre['median_s'][name] * 1e3:.2f} ms | "
                     f"{pre['median_s']['deepseek'] * 1e3:.2f} ms | {pre['speedup'][name]:.1f}x | {target} |")
    for name, target in (("solve", ">= 30x"), ("rebalance_experts", "reported (480 MiB log2phy)")):
        lines.append(f"| scale 60 x 1024 `{name}` | {sc['median_s'][name] * 1e3:.1f} ms | "
                     f"{sc['median_s']['deepseek'] * 1e3:.1f} ms | {sc['speedup'][name]:.1f}x | {target} |")
    def ref(m: dict, key: str = "deepseek_median_s") -> str:     # the peer beside a target in ms (older records: none)
        return f"({m[key] * 1e3:.1f} ms)" if key in m else ""

    for policy, m in mig.items():
        lines.append(f"| migration replan, prefill, {policy} | {m['median_s'] * 1e3:.1f} ms | {ref(m)} | moves "
                     f"{m['moves']} vs {m['baseline_moves']} (replan), balance loss {m['balance_loss']:.3%} | <= 20 ms |")
    lines.append(f"| spill, prefill, worst over the cost sweep | {sp['worst_median_s'] * 1e3:.1f} ms | "
                 f"{ref(sp, 'worst_deepseek_median_s')} | | <= 50 ms |")
    for objective, m in data.get("windows", {}).items():
        lines.append(f"| window search, prefill, {m['windows']} windows, `objective=\"{objective}\"` | "
                     f"{m['median_s'] * 1e3:.1f} ms | {ref(m)} | | <= 100 ms |")
    cold = data.get("cold_start")
    if cold:
        for what, sec in cold["warm_cache_s"].items():
            lines.append(f"| fresh process, warm cache: `import eplb_opt` + first prefill `{what}` "
                         f"(median of {cold['processes']} processes) | {sec * 1e3:.0f} ms | | | <= 500 ms |")
        if "numba_import_s" in cold:
            lines.append(f"| numba alone, fresh process: `import numba` | {cold['numba_import_s'] * 1e3:.0f} ms | | | "
                         "floor under the rows above |")
        if "numba_floor_s" in cold:
            note = "reported (numba's own cache loader)" if "numba_import_s" in cold else "floor under the row above"
            lines.append(f"| numba alone, fresh process: `import numba` + first call of a one-line cached kernel | "
                         f"{cold['numba_floor_s'] * 1e3:.0f} ms | | | {note} |")
        for what, sec in cold["fresh_install_s"].items():
            lines.append(f"| fresh install (empty numba cache): `import eplb_opt` + `{what}` | {sec:.1f} s | | | "
                         "recorded (compile, once) |")
    lines += ["", "| spill cross_node_cost | median | (DeepSeek beside it) | balancedness | off-node share |",
              "|---|---:|---:|---:|---:|"]
    for r in sp["rows"]:
        lines.append(f"| {r['cross_node_cost']} | {r['median_s'] * 1e3:.1f} ms | {ref(r)} | {r['balancedness']:.5f} | "
                     f"{r['off_node_share']:.2%} |")
    return lines + [""]


def _quality_floor_section(before: dict, after: dict | None) -> list[str]:
    """``quality_floor.json`` (before the kernels) and ``quality_floor_after.json``."""
    lines = [
        "## Quality floor of the compiled kernels (issue 15)",
        "",
        "Command: `.venv/bin/python -m benchmarks.run_quality_floor` on the full suite (18 workloads), "
        "heuristic mode, recorded before the port (`quality_floor.json`) and after it "
        "(`quality_floor_after.json`, `--check`): every workload's in-window balancedness must stay at "
        "least the recorded minus 1e-6, each configuration's next-window mean at least the recorded minus "
        "0.0005.",
        "",
        "| configuration | in-window mean before | after | next-window mean before | after | workloads below floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    was = {(r["workload"], r["config"]): r for r in before["rows"]}
    for cfg, m in before["means"].items():
        a = (after or {}).get("means", {}).get(cfg)
        below = "" if a is None else str(sum(
            1 for r in after["rows"] if r["config"] == cfg
            and r["balancedness"] < was[(r["workload"], cfg)]["balancedness"] - 1e-6))
        lines.append(f"| {cfg} | {m['in_window_mean']:.6f} | {'' if a is None else format(a['in_window_mean'], '.6f')} "
                     f"| {m['next_window_mean']:.6f} | {'' if a is None else format(a['next_window_mean'], '.6f')} "
                     f"| {below} |")
    return lines + [""]


def _numba_versions_section(data: dict) -> list[str]:
    """``numba_versions.json``: the kernel tests on the lowest and newest numba."""
    lines = ["## Kernel tests on the lowest and newest numba (issue 15)", "",
             f"Command: `{data.get('command', 'bash scripts/check_numba_versions.sh')}`"
             + (f" ({data['date']})" if data.get("date") else "") + ": "
             + (", ".join(f"`{t}`" for t in data.get("tests", [])) or "the kernel tests")
             + ", cold numba cache, one process; seconds are the whole pytest run.", "",
             "| numba | llvmlite | numpy | passed | failed | seconds |", "|---|---|---|---:|---:|---:|"]
    for r in data.get("runs", []):
        lines.append(f"| {r.get('numba')} | {r.get('llvmlite', '')} | {r.get('numpy')} | {r.get('passed')} | "
                     f"{r.get('failed')} | {r.get('seconds', 0):.0f} |")
    return lines + [""]


def _replay_section(data: dict) -> list[str]:
    """``replay.json``: total MoE time per policy and interval (issue 16)."""
    lines = ["## Replay: policies over time (issue 16, part 1)", "",
             f"Command: `{data['command']}` ({data['date']}, {data['machine']}).  Total MoE time (compute and "
             "copies, default time model) over the trace, per policy and rebalance interval; `gap closed`: the "
             "share of the static-to-clairvoyant difference closed at the policy's best interval.", ""]
    for p in data["presets"]:
        ivs = p["intervals"]
        runs = {(r["policy"], r["interval"]): r for r in p["runs"]}
        pols = list(dict.fromkeys(r["policy"] for r in p["runs"]))
        static = min(runs[("static", i)]["time_s"] for i in ivs)
        clair = min(runs[("clairvoyant", i)]["time_s"] for i in ivs)
        lines += [f"**{p['trace']}**", "", "| policy | " + " | ".join(f"@{i}" for i in ivs) + " | gap closed |",
                  "|---|" + "---:|" * (len(ivs) + 1)]
        for pol in pols:
            t = [runs[(pol, i)]["time_s"] for i in ivs if (pol, i) in runs]
            closed = (static - min(t)) / (static - clair) if static > clair else float("nan")
            lines.append(f"| {pol} | " + " | ".join(f"{x:.2f}" for x in t) + f" | {closed:.1%} |")
        lines += ["", f"![interval sweep]({p['plots'][2]})" if len(p.get("plots", [])) > 2 else "", ""]
    return lines


def _beaten_by(su: dict) -> str:
    """`` (where not: <preset> <figure>: <configuration>, ...)`` for the chosen configuration."""
    ours, out = su["chosen"]["policy"], []
    for preset, row in su["presets"].items():
        for fig in ("load", "time_s"):
            tab = row[fig]["table"]
            out += [f"{preset} {'time' if fig == 'time_s' else 'load'}: {p}"
                    for p in ("ours", "migrate", "windows", "forecast") if p in tab and p != ours
                    and tab[p]["best"] < tab[ours]["best"]]
    return f" (where not: {'; '.join(out)})" if out else ""


def _replay_suite_section(data: dict) -> list[str]:
    """``replay_suite.json``: issue 16's replay target over presets x drift kinds x seeds."""
    su, st = data["summary"], data["setup"]
    cases = list(data["cases"].values())
    seeds = sorted({c["seed"] for c in cases})
    held = su.get("report_seeds", [x for x in seeds if x not in (0, 1)])
    kinds = {c["kind"]: c["trace_parameters"] for c in cases}
    drop = ("preset", "steps", "seed", "tokens_per_step", "top_k", "drift_kind", "kind_window", "skew", "group_sigma",
            "dead_fraction", "df")
    kp = "; ".join(f"{k}: " + (", ".join(f"{a}={b}" for a, b in v.items() if a not in drop) or "no change")
                   for k, v in kinds.items())
    ch = su.get("chosen") or {}
    lines = ["## Replay over presets x drift kinds (issue 16, replay target)", "",
             f"Command: `{data['command']}` ({data['date']}, {data['machine']}"
             + (f"; {data['elapsed_s'] / 60:.0f} min" if data.get("elapsed_s") else "") + f").  {len(cases)} replays: "
             f"{len({c['preset'] for c in cases})} presets x {len(kinds)} drift kinds x seeds "
             f"{', '.join(map(str, seeds))}; {st['steps']} steps per trace, {data['layer_subset']}, one window of a "
             f"kind = {st['kind_window']} steps (`eplb_opt.replay.step_trace(drift_kind=...)`); intervals "
             f"{', '.join(map(str, st['intervals']))}; time model on (defaults).  Exact mode is {data['exact']}.  "
             f"Drift kinds' parameters: {kp}.", "",
             f"eplb-opt's configuration, chosen on seeds {', '.join(map(str, su.get('choose_seeds', [0, 1])))} "
             "(least mean over presets of its best figure / the best peer's): "
             f"**{ch.get('policy')}** (" + ", ".join(f"{k} {v:.4f}" for k, v in ch.get("score", {}).items()) + ").  "
             f"Figures below: seeds {', '.join(map(str, held))} only; each policy at the interval it does best at "
             "(mean over drift kinds and seeds), the interval after `@`; `gap`: the share of the static-to-clairvoyant "
             "difference it closes.", ""]
    for fig, what in (("load", "time-averaged max-load sum (tokens per step, summed over layers; lower is better)"),
                      ("time_s", "total MoE time with the time model (compute + copies, s)")):
        if not su.get("presets"):
            break
        cols = [c for c in ("ours", "migrate", "windows", "forecast", "deepseek", "vllm", "sglang_vec", "static",
                            "clairvoyant")]
        lines += [f"**{what}**", "", "| preset | " + " | ".join(cols) + " | lowest |", "|---|" + "---:|" * (len(cols) + 1)]
        for preset, row in su["presets"].items():
            tab = row[fig]["table"]
            cells = [f"{tab[c]['best']:.5g} @{tab[c]['best_interval']}" + (
                f" ({tab[c]['gap_closed']:.0%})" if tab[c].get("gap_closed") is not None and c not in ("static",)
                else "") if c in tab else "-" for c in cols]
            ok = "yes" if row[fig]["lowest_vs_peers"] else "**no**"
            lines.append(f"| {preset} | " + " | ".join(cells) + f" | {ok} ({row[fig]['margin_vs_best_peer']:+.2%}) |")
        lines.append("")
    if su.get("met"):
        lines += [f"Target (eplb-opt's chosen configuration lowest of all policies on every preset, at each one's best "
                  f"interval): max-load sum **{'met' if su['met']['load'] else 'not met'}**, with the time model **"
                  f"{'met' if su['met']['time_s'] else 'not met'}** against the peers; against every other policy "
                  f"including eplb-opt's other configurations: {su['met_of_all']['load']} / "
                  f"{su['met_of_all']['time_s']}" + _beaten_by(su) + ".  `lowest`: margin to the best peer; a "
                  "negative gap share: worse than the static placement.", ""]
    return lines


def _issue15_and_16(here: Path) -> list[str]:
    """The sections of the compiled kernels and of replay, where their files exist."""
    lines: list[str] = []
    if (here / "kernels.json").exists():
        lines += _kernels_section(json.loads((here / "kernels.json").read_text()))
    if (here / "call_gap.json").exists():
        lines += _call_gap_section(json.loads((here / "call_gap.json").read_text()))
    if (here / "quality_floor.json").exists():
        after = here / "quality_floor_after.json"
        lines += _quality_floor_section(json.loads((here / "quality_floor.json").read_text()),
                                        json.loads(after.read_text()) if after.exists() else None)
    if (here / "numba_versions.json").exists():
        lines += _numba_versions_section(json.loads((here / "numba_versions.json").read_text()))
    if (here / "replay.json").exists():
        lines += _replay_section(json.loads((here / "replay.json").read_text()))
    if (here / "replay_suite.json").exists():
        lines += _replay_suite_section(json.loads((here / "replay_suite.json").read_text()))
    if (here / "replay_time.json").exists():
        lines += _replay_time_section(json.loads((here / "replay_time.json").read_text()))
    if (here / "forecast.json").exists():
        lines += _forecast_section(json.loads((here / "forecast.json").read_text()))
    return lines


def _call_gap_section(data: dict) -> list[str]:
    """``call_gap.json``: one prefill call after a gap against back to back (issue 15)."""
    before = ("back_to_back", "inputs_cycling", "peer", "sleep_25ms", "busy_25ms", "sweep_64mib")
    heads = ("back to back", "inputs cycling (20 seeds)", "after the peer", "after a 25 ms sleep",
             "after a 25 ms busy loop", "after a 64 MiB sweep")
    lines = [
        "## Compiled kernels: one call after a gap (issue 15)",
        "",
        f"Command: `.venv/bin/python -m benchmarks.run_call_gap` ({data['machine']}; {data['date']}).  "
        f"{data['preset']}, medians of {data['repeats']} calls, each right after what its column names; "
        f"DeepSeek's call (the peer) took {data['deepseek_median_s'] * 1e3:.1f} ms.  `run_kernels` times our calls "
        "right after the peer's: any gap of that length costs about as much.",
        "",
        "| call | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    for name, row in data["median_s"].items():
        lines.append(f"| `{name}` | " + " | ".join(f"{row[b] * 1e3:.2f} ms" for b in before) + " |")
    lines.append("")
    for name, split in data["after_peer_split"].items():
        kern = split["kernels_s"]
        top = ", ".join(f"`{k}` {v * 1e3:.2f}" for k, v in list(kern.items())[:4])
        lines.append(f"- after the peer, `{name}` {split['median_s'] * 1e3:.2f} ms: kernels "
                     f"{sum(kern.values()) * 1e3:.2f} ms ({top}, ...), Python and numpy {split['outside_s'] * 1e3:.2f} ms.")
    for name, row in data.get("kernels_alone_s", {}).items():
        lines.append(f"- `{name}` alone, back to back: {row['one_input'] * 1e3:.3f} ms on one input, "
                     f"{row['copies_of_one'] * 1e3:.3f} ms on 20 copies of it (other memory), "
                     f"{row['inputs_20'] * 1e3:.3f} ms on 20 inputs (other branches).")
    return lines + [""]


def _forecast_section(data: dict) -> list[str]:
    """``forecast.json``: next-window balancedness of the forecasts and the peers (issue 16)."""
    rep = data["report"]
    nw = rep["next_window"]
    presets = list(nw["ours"])
    peers = [c for c in nw if not c.startswith("ours")]
    mean = {c: sum(v.values()) / len(v) for c, v in nw.items()}
    best_peer = max(peers, key=lambda c: mean[c])
    lines = [
        "## Forecasts: plans for the next window (issue 16, part 2)",
        "",
        f"Command: `{data['command']}` ({data['date']}, {data['machine']}; {data['elapsed_s'] / 60:.0f} min).  "
        f"Every preset x drift kind ({', '.join(data['drift_kinds'])}), {data['layers']} layers, {data['windows']} "
        f"windows: each plan is made at window t from the {data['history']} windows before it (the forecast's "
        "history; the peers get it in their engines' form: the latest window, the summed windows, or SGLang's "
        "step axis) and scored on window t + 1.  The default forecast (`"
        f"{data['default_forecast']}`) and its parameters were chosen on seeds 0-1; the figures below are seeds "
        f"{', '.join(map(str, rep['seeds']))}.  Mean next-window balancedness:",
        "",
        "| contender | " + " | ".join(presets) + " | suite |",
        "|---|" + "---:|" * (len(presets) + 1),
    ]
    for c in sorted(nw, key=lambda c: -mean[c]):
        lines.append(f"| {c} | " + " | ".join(f"{nw[c][q]:.4f}" for q in presets) + f" | {mean[c]:.4f} |")
    margins = {q: nw["ours"][q] - max(nw[c][q] for c in peers) for q in presets}
    lines += ["", f"Targets: the default at least the best peer on every preset: **"
              f"{'met' if min(margins.values()) >= 0 else 'not met'}** (smallest margin {min(margins.values()):+.4f}, "
              f"{min(margins, key=margins.get)}); ahead by at least 0.005 on the suite mean: **"
              f"{'met' if mean['ours'] - mean[best_peer] >= 0.005 else 'not met'}** ({mean['ours'] - mean[best_peer]:+.4f} "
              f"against {best_peer}).", ""]
    return lines


def _replay_time_section(data: dict) -> list[str]:
    """``replay_time.json``: issue 16's replay time target."""
    plans = ", ".join(f"{k} {v:.1f} s" for k, v in data["planning_s_by_policy"].items())
    return [
        "## Replay time (issue 16)",
        "",
        f"Command: `{data['command']}` ({data['date']}, {data['machine']}).  A generated {data['preset']} trace of "
        f"{data['steps']} steps x {data['layers']} layers (int32 counts), policies {', '.join(data['policies'])}, "
        f"intervals {', '.join(map(str, data['intervals']))}, default time model, after `warm_up()`: "
        f"**{data['wall_s']:.1f} s** (target <= {data['target_s']:.0f} s: {'met' if data['met'] else 'not met'}).  "
        f"Planning time inside it, summed over intervals: {plans}; the rest is reading the trace in chunks, "
        "alignment and scoring every step.",
        "",
    ]


def write(here: Path) -> None:
    """Regenerate ``here / RESULTS.md`` from the JSON files present."""
    lines = ["# eplb-opt benchmark results", ""]
    core = here / "core.json"
    if core.exists():
        data = json.loads(core.read_text())
        lines += _core_section(here, data)
    exact = here / "exact.json"
    if exact.exists():
        lines += _exact_section(json.loads(exact.read_text()))
    beyond = here / "beyond.json"
    if beyond.exists():
        lines += _beyond_section(json.loads(beyond.read_text()))
    ray_json = here / "ray.json"
    if ray_json.exists():
        lines += _ray_section(json.loads(ray_json.read_text()))
    for name in ("deadlines.json", "deadlines-previous.json"):
        if (here / name).exists():
            lines += _deadlines_section(json.loads((here / name).read_text()))
    for name, title in (("deadlines_p99.json", "full run, before the load fixes of 79a1288"),
                        ("deadlines_p99_after.json", "full rerun after those and the re-split round cap"),
                        ("deadlines_p99_gc.json", "idle rerun after the GC pause and the neighbourhood reserve "
                                                  "(compiled kernels)"),
                        ("deadlines_p99_nodecover.json", "check after the whole-node search (exact phase 3b) with its "
                                                         "1 s minimum budget and 0.1 s reserve (hierarchical, idle, "
                                                         "warm, 100 calls)")):
        if (here / name).exists():
            section = _deadline_p99_section(json.loads((here / name).read_text()))
            section[0] += f": {title}"
            lines += section
    gaps = here / "gaps.json"
    if gaps.exists():
        lines += _gaps_section(json.loads(gaps.read_text()))
    for name, title in (("gaps_quiet.json", "rerun of the presets over the target on a quiet machine"),
                        ("gaps_nodecover.json", "deepseek-v3-decode after the whole-node search (exact phase 3b), "
                                                "quiet machine"),
                        ("gaps_nodecover_others.json", "prefill and no-redundancy after the whole-node search, "
                                                       "quiet machine")):
        if (here / name).exists():
            section = _gaps_section(json.loads((here / name).read_text()))
            section[0] += f": {title}"
            lines += section
    det_wall = here / "deterministic_wall.json"
    if det_wall.exists():
        lines += _deterministic_wall_section(json.loads(det_wall.read_text()))
    lines += _issue15_and_16(here)
    magnitude = here / "experiments" / "cpsat_magnitude" / "results.json"
    if magnitude.exists():
        lines += _magnitude_section(json.loads(magnitude.read_text()))
    soak = here / "soak.json"
    if soak.exists():
        lines += _soak_section(json.loads(soak.read_text()))
    fuzz = here / "fuzz.json"
    if fuzz.exists():
        lines += _fuzz_section(json.loads(fuzz.read_text()))
    fuzz_cert = here / "fuzz-certificates.json"
    if fuzz_cert.exists():
        section = _fuzz_section(json.loads(fuzz_cert.read_text()))
        section[0] = "## Long fuzz campaign: certificates against the exact oracle (issue 12)"
        lines += section
    bench = here / "bench-full" / "REPORT.md"
    if bench.exists():
        text = bench.read_text().replace("# eplb-opt bench: full suite", "## Every policy and peer (full suite)")
        text = re.sub(r"!\[([^\]]*)\]\(([^)/]+)\)", r"![\1](bench-full/\2)", text)
        text = text.replace("\n## Scaling", "\n### Scaling")
        lines += [text]
    (here / "RESULTS.md").write_text("\n".join(lines))
