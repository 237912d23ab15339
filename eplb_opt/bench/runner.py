"""``eplb-opt bench``: every policy on every preset of a suite, against the real peers.

Usage (installed or from a source checkout)::

    eplb-opt bench --suite quick --out bench-out
    eplb-opt bench --suite full --out benchmarks/bench-full   # recorded in RESULTS.md
    eplb-opt bench --trace loads.json --preset deepseek-v3-prefill --window 100

Policies: eplb-opt heuristic, eplb-opt exact (the suite's time per workload), DeepSeek's
EPLB and SGLang's ``deepseek_vec`` (``sglang==0.5.23``), vLLM 0.33's default policy
(``vllm==0.33.0``) and the seed heuristic (when present), all loaded by
:mod:`eplb_opt.bench.peers`.  A peer that cannot be loaded (its wheel neither cached nor
downloadable) is left out, with a line on stderr and in the report.  For each workload (plan from window 0): in-window,
next-window and slot-level balancedness, every layer's gap to eplb-opt's certified bound,
and time (median of the suite's repeats, policies alternating in one process); crashes
and invalid plans are recorded.  The full suite adds a scaling study.

Writes ``OUT/results.json``, ``OUT/REPORT.md`` and plots ``OUT/*.png``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import api as _api
from .. import workloads as _workloads
from ..bounds import lower_bounds
from ..errors import InvalidProblemError
from ..evaluate import candidate_maps, candidate_phy2log, score_plan
from ..metrics import gpu_loads
from ..suites import SUITES, Suite, Workload, workloads
from ..workloads import PRESETS, Preset
from .peers import available_peers

__all__ = ["OURS_E", "OURS_H", "SCALING", "cpu_name", "machine", "main", "run_workload"]

OURS_H = "eplb-opt heuristic"
OURS_E = "eplb-opt exact"

# Scaling study: from a DeepSeek-V3-prefill-like base (16 layers x 256 experts, 288
# replicas, 8 groups, 4 nodes, 32 GPUs) one axis grows at a time, up to 1024 experts and
# 256 GPUs; the last row is the 1024-expert, 2048-replica, 256-GPU shape of the core
# issue.  (layers, experts, replicas, groups, nodes, gpus) per axis:
SCALING: dict[str, list[tuple[int, int, int, int, int, int]]] = {
    "layers": [(L, 256, 288, 8, 4, 32) for L in (8, 16, 32, 64)],
    "experts": [(16, E, E + 32, 8, 4, 32) for E in (128, 256, 512, 1024)],
    "replicas": [(16, 256, R, 8, 4, 32) for R in (288, 576, 1152)],
    "gpus (9 slots each)": [(16, 256, 9 * G, 8, 4, G) for G in (32, 64, 128, 256)],
    "large": [(16, 1024, 2048, 16, 8, 256)],
}
_AXIS_INDEX = {"layers": 0, "experts": 1, "replicas": 2, "gpus (9 slots each)": 5}


def _ours(mode: str, time_limit: float | None) -> Callable[..., object]:
    """eplb-opt through :func:`eplb_opt.solve`, its main call: the verified plan with its
    certified bounds; ``log2phy`` is derived only when asked.  (``rebalance_experts``
    also materialises ``log2phy`` at the ``R - E + 1`` width DESIGN.md fixes: 67 MB
    for 16 layers x 256 experts on 2304 slots.)"""

    def run(weight, num_replicas, num_groups, num_nodes, num_gpus):
        kw = {"time_limit": time_limit} if mode == "exact" else {}
        return _api.solve(
            weight, num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes,
            num_gpus=num_gpus, mode=mode, **kw,
        ).plan.phy2log

    return run


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine() -> str:
    """One line naming the CPU, core count and the numpy / torch versions."""
    return (
        f"{cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__}"
    )


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _time(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, object], dict[str, float], dict[str, str]]:
    """Run each callable ``repeats`` times, alternating; outputs, median seconds, crashes."""
    outs: dict[str, object] = {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    crashed: dict[str, str] = {}
    for _ in range(repeats):
        for k, f in fns.items():
            if k in crashed:
                continue
            t = time.perf_counter()
            try:
                outs[k] = f()
            except Exception as exc:  # noqa: BLE001 - a crashing peer is recorded
                crashed[k] = f"crashed: {type(exc).__name__}: {exc}"
            times[k].append(time.perf_counter() - t)
    return outs, {k: statistics.median(v) for k, v in times.items() if v}, crashed


def run_workload(wl: Workload, policies: dict[str, Callable[..., object]], repeats: int) -> list[dict]:
    p = wl.preset
    hier = p.num_groups % p.num_nodes == 0
    bound = lower_bounds(
        wl.windows[0], p.num_replicas, p.num_gpus, hierarchical=hier,
        num_groups=p.num_groups, num_nodes=p.num_nodes,
    ).lower_bound
    weight = torch.from_numpy(np.ascontiguousarray(wl.windows[0]))
    args = (weight, p.num_replicas, p.num_groups, p.num_nodes, p.num_gpus)
    # Exact mode runs once (its time is its budget); the rest alternate.
    fast = {k: (lambda f=f: f(*args)) for k, f in policies.items() if k != OURS_E}
    outs, secs, crashed = _time(fast, repeats)
    if OURS_E in policies:
        o, s, c = _time({OURS_E: lambda: policies[OURS_E](*args)}, 1)
        outs.update(o), secs.update(s), crashed.update(c)
    rows = []
    for k in policies:
        if k in crashed:
            rows.append({"workload": wl.name, "policy": k, "valid": False, "problem": crashed[k],
                         "time_s": secs.get(k), "preset": p.name, "size": int(wl.windows.shape[1] * p.num_replicas)})
            continue
        try:
            sc = score_plan(candidate_phy2log(outs[k]), wl, hierarchical=hier, bound=bound, contender=k,
                            time_s=secs[k], maps=candidate_maps(outs[k]))
            row = asdict(sc)
            row["policy"] = row.pop("contender")
        except (TypeError, ValueError) as exc:
            row = {"workload": wl.name, "policy": k, "valid": False, "problem": f"bad output: {exc}",
                   "time_s": secs.get(k)}
        row["preset"] = p.name
        row["size"] = int(wl.windows.shape[1] * p.num_replicas)
        rows.append(row)
    return rows


def scaling(repeats: int = 3) -> list[dict]:
    """Time and quality of eplb-opt heuristic mode (and DeepSeek) as sizes grow."""
    ds = available_peers().get("DeepSeek EPLB (sglang 0.5.23)")
    out = []
    for axis, configs in SCALING.items():
        for L, E, R, Gr, N, G in configs:
            pre = Preset(f"scale-{L}x{E}-{R}-{G}", L, E, R, Gr, N, G)
            wl = Workload(pre, 0, _workloads.generate(pre, windows=2, seed=0))
            pol: dict[str, Callable[..., object]] = {OURS_H: _ours("heuristic", None)}
            if callable(ds):
                pol["DeepSeek EPLB (sglang 0.5.23)"] = ds
            rows = run_workload(wl, pol, repeats)
            for r in rows:
                r.update(axis=axis, layers=L, experts=E, replicas=R, gpus=G)
            out.extend(rows)
            _say(f"  scaling {pre.name}: " + ", ".join(
                f"{r['policy']} {r['time_s'] * 1e3:.1f} ms" for r in rows if r.get("time_s")))
    return out


def growth(rows: list[dict], policy: str) -> dict[str, float]:
    """Exponent ``b`` of ``time ~ size^b`` along each scaling axis (least squares on logs)."""
    out = {}
    for axis, idx in _AXIS_INDEX.items():
        pts = [(SCALING[axis][i][idx], r["time_s"]) for i, cfg in enumerate(SCALING[axis])
               for r in rows if r["policy"] == policy and r.get("axis") == axis and r.get("time_s")
               and (r["layers"], r["experts"], r["replicas"], r["gpus"]) == (cfg[0], cfg[1], cfg[2], cfg[5])]
        if len({x for x, _ in pts}) >= 2:
            x, y = np.log([q[0] for q in pts]), np.log([q[1] for q in pts])
            out[axis] = float(np.polyfit(x, y, 1)[0])
    return out


def plots(out: Path, data: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    files = []
    rows = [r for r in data["rows"] if r["valid"]]
    presets = list(dict.fromkeys(r["preset"] for r in data["rows"]))
    policies = list(dict.fromkeys(r["policy"] for r in data["rows"]))
    # 1. Balancedness per policy and preset.
    fig, ax = plt.subplots(figsize=(11, 4.6))
    width = 0.8 / len(policies)
    for i, pol in enumerate(policies):
        vals = [np.mean([r["balancedness"] for r in rows if r["policy"] == pol and r["preset"] == pr] or [np.nan])
                for pr in presets]
        ax.bar(np.arange(len(presets)) + (i - (len(policies) - 1) / 2) * width, vals, width, label=pol)
    ax.set_xticks(np.arange(len(presets)), presets, fontsize=8)
    ax.set_ylim(0.4, 1.01)
    ax.set_ylabel("in-window balancedness")
    ax.set_title(f"Balancedness per policy and preset ({data['suite']} suite; missing bar = crash or invalid)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(out / "balancedness.png", dpi=110)
    plt.close(fig)
    files.append("balancedness.png")
    # 2. Runtime against problem size (layers x replicas), log-log.
    fig, ax = plt.subplots(figsize=(7, 4.6))
    pts = rows + [r for r in data.get("scaling", []) if r["valid"]]
    for pol in dict.fromkeys(r["policy"] for r in pts):
        xs = [r["size"] for r in pts if r["policy"] == pol]
        ys = [r["time_s"] for r in pts if r["policy"] == pol]
        ax.scatter(xs, ys, label=pol, s=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("problem size: layers x replicas")
    ax.set_ylabel("seconds per call")
    ax.set_title("Runtime against problem size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "runtime.png", dpi=110)
    plt.close(fig)
    files.append("runtime.png")
    # 3. Per-GPU load of one layer, before (static placement) and after each policy.
    hm = data.get("heatmap")
    if hm:
        fig, ax = plt.subplots(figsize=(11, 0.55 * len(hm["rows"]) + 1.6))
        mat = np.array(hm["loads"]) / hm["mean"]
        labels = [f"{name}  (max/mean {row.max():.3f})" for name, row in zip(hm["rows"], mat)]
        top = max(1.05, float(mat[1:].max()) if len(mat) > 1 else float(mat.max()))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("GPU")
        ax.set_title(f"Per-GPU load / mean GPU load, {hm['workload']} layer {hm['layer']} "
                     "(before: static placement; after: each policy)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.02, label="load / mean")
        fig.tight_layout()
        fig.savefig(out / "heatmap.png", dpi=110)
        plt.close(fig)
        files.append("heatmap.png")
    return files


def heatmap(wl: Workload, plans: dict[str, np.ndarray]) -> dict:
    """Per-GPU loads of the layer with the largest spread under the static placement."""
    p = wl.preset
    w = wl.windows[0]
    L, E = w.shape
    # Static placement: expert e on GPU e * G / E, spare slots given to experts in order.
    static = np.concatenate([np.arange(E), np.arange(p.num_replicas - E) % E])
    static = np.broadcast_to(np.sort(static), (L, p.num_replicas))
    before = gpu_loads(w, static, p.num_gpus)
    layer = int((before.max(axis=1) / before.mean(axis=1)).argmax())
    rows, loads = ["static (no rebalancing)"], [before[layer].tolist()]
    for k, plan in plans.items():
        rows.append(k)
        loads.append(gpu_loads(w[layer : layer + 1], plan[layer : layer + 1], p.num_gpus)[0].tolist())
    return {"workload": wl.name, "layer": layer, "rows": rows, "loads": loads, "mean": float(before[layer].mean())}


def report(out: Path, data: dict) -> str:
    """Write ``out/REPORT.md`` from the results ``data`` (as in results.json) and return its text."""
    rows = data["rows"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    lines = [
        f"# eplb-opt bench: {data['suite']} suite",
        "",
        f"`{data['command']}` on {data['machine']}, {data['date']}; {data['elapsed_s']:.0f} s.",
        "",
        f"Suite: presets {', '.join(presets)}; seeds {data['seeds']}; layers per preset "
        f"{data['max_layers'] or 'all'}; timing repeats {data['repeats']}; exact mode {data['exact_time']:g} s "
        "per workload.  Workloads are synthetic (seeded `eplb_opt.workloads.generate`): real traces are not "
        "reachable from here (pass one with `--trace`).",
        "",
        "Mean in-window balancedness (next window in parentheses); `x` = crashed or invalid on some workload:",
        "",
        "| preset | " + " | ".join(policies) + " |",
        "|---|" + "---|" * len(policies),
    ]
    for pr in presets:
        cells = []
        for pol in policies:
            mine = [r for r in rows if r["policy"] == pol and r["preset"] == pr]
            ok = [r for r in mine if r["valid"]]
            bad = len(mine) - len(ok)
            cell = (f"{np.mean([r['balancedness'] for r in ok]):.5f} ({np.mean([r['next_balancedness'] for r in ok]):.4f})"
                    if ok else "-")
            cells.append(cell + (f" x{bad}" if bad else ""))
        lines.append(f"| {pr} | " + " | ".join(cells) + " |")
    lines += ["", "Worst per-layer gap to eplb-opt's certified bound and median time per call:", "",
              "| preset | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for pr in presets:
        cells = []
        for pol in policies:
            ok = [r for r in rows if r["policy"] == pol and r["preset"] == pr and r["valid"]]
            cells.append(f"{max(r['gap_max'] for r in ok):.3%} / {statistics.median(r['time_s'] for r in ok) * 1e3:.1f} ms"
                         if ok else "-")
        lines.append(f"| {pr} | " + " | ".join(cells) + " |")
    missing = data.get("missing_peers") or []
    if missing:
        lines += ["", f"Peers left out (could not be loaded here): {len(missing)}."]
        lines += [f"* {m}" for m in missing]
    bad = [r for r in rows if not r["valid"]]
    lines += ["", f"Crashes and invalid plans: {len(bad)}."]
    for r in bad:
        lines.append(f"* {r['policy']} on {r['workload']}: {r['problem']}")
    # Standing of heuristic mode.
    wins = []
    for pr in presets:
        for r in rows:
            if r["preset"] != pr or r["policy"] in (OURS_H, OURS_E) or not r["valid"]:
                continue
            ours = [o for o in rows if o["policy"] == OURS_H and o["workload"] == r["workload"]][0]
            wins.append(ours["valid"] and ours["balancedness"] >= r["balancedness"] - 1e-12)
    lines += ["", f"eplb-opt heuristic at least as balanced (in-window) as the peer on {sum(wins)} of "
              f"{len(wins)} valid peer plans."]
    if data.get("scaling"):
        lines += _scaling_lines(data)
    lines += [""] + [f"![{f}]({f})" for f in data.get("plots", [])] + [""]
    text = "\n".join(lines)
    (out / "REPORT.md").write_text(text)
    return text


def _scaling_lines(data: dict) -> list[str]:
    """REPORT.md's scaling section: a row per configuration of ``data["scaling"]`` (eplb-opt
    heuristic mode and DeepSeek, time and balancedness) and the measured growth exponents."""
    lines = ["", "## Scaling (heuristic mode; DeepSeek beside it)", "",
             "| layers | experts | replicas | GPUs | eplb-opt time | eplb-opt balancedness | DeepSeek time | DeepSeek balancedness |",
             "|---|---|---|---|---|---|---|---|"]
    sc = data["scaling"]
    for cfg in dict.fromkeys((r["layers"], r["experts"], r["replicas"], r["gpus"]) for r in sc):
        o = [r for r in sc if (r["layers"], r["experts"], r["replicas"], r["gpus"]) == cfg]
        o = [r for r in o if r["axis"] == o[0]["axis"]]
        mine = [r for r in o if r["policy"] == OURS_H][0]
        ds = [r for r in o if r["policy"] != OURS_H]
        dcell = (f"{ds[0]['time_s'] * 1e3:.1f} ms | {ds[0]['balancedness']:.5f}" if ds and ds[0]["valid"] else "- | -")
        lines.append(f"| {cfg[0]} | {cfg[1]} | {cfg[2]} | {cfg[3]} | {mine['time_s'] * 1e3:.1f} ms | "
                     f"{mine['balancedness']:.5f} | {dcell} |")
    g = data.get("growth", {})
    lines += ["", "Measured growth of eplb-opt's time, as the exponent b in time ~ size^b along each axis "
              "(others at 16 layers x 256 experts, 288 replicas, 32 GPUs; the GPU axis keeps 9 slots "
              "per GPU, so replicas grow with it): "
              + ", ".join(f"{k} {v:.2f}" for k, v in g.get(OURS_H, {}).items())
              + "; DeepSeek: " + ", ".join(f"{k} {v:.2f}" for k, v in g.get("DeepSeek EPLB (sglang 0.5.23)", {}).items())
              + "."]
    return lines


def main(suite: str = "quick", out: str | Path = "bench-out", trace: str | None = None, preset: str | None = None,
         window: int | None = None, command: str = "") -> int:
    """Run the suite (or a trace) and write ``OUT/results.json``, ``OUT/REPORT.md`` and
    plots; print the report.  Returns 0.

    Raises:
        InvalidProblemError: bad ``suite``, ``--trace`` without ``--preset``, an unknown
            preset, or a trace with fewer than two windows.
    """
    t0 = time.perf_counter()
    if suite not in SUITES:
        raise InvalidProblemError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    s: Suite = SUITES[suite]
    w = None
    if trace is not None:
        if preset is None:
            raise InvalidProblemError("--trace needs --preset for the topology (replicas, groups, nodes, GPUs)")
        if preset not in PRESETS:
            raise InvalidProblemError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
        from ..traces import read_trace

        w = read_trace(trace, window=window)
        if w.shape[0] < 2:
            raise InvalidProblemError(f"{trace}: needs at least two windows (got {w.shape[0]}); "
                                      "pass a smaller --window")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peers = available_peers()
    missing = peers.pop("_missing")
    for m in missing:
        _say(f"peer unavailable, left out: {m}")
    policies: dict[str, Callable[..., object]] = {OURS_H: _ours("heuristic", None), OURS_E: _ours("exact", s.exact_time)}
    policies.update(peers)
    if w is not None:
        base = PRESETS[preset]
        pre = replace(base, name=f"trace:{Path(trace).name}", num_layers=w.shape[1], num_experts=w.shape[2])
        wls = [Workload(pre, 0, w[:2])]
    else:
        wls = list(workloads(s))
    rows = []
    plans_for_heatmap = None
    for i, wl in enumerate(wls):
        _say(f"[{i + 1}/{len(wls)}] {wl.name} ...")
        r = run_workload(wl, policies, s.repeats)
        rows.extend(r)
        _say("    " + "; ".join(f"{x['policy']}: " + (f"{x['balancedness']:.5f}" if x["valid"] else "INVALID") for x in r))
        if plans_for_heatmap is None and wl.preset.name == "deepseek-v3-prefill":
            plans_for_heatmap = wl
    data = {
        "suite": s.name if trace is None else f"trace {trace}",
        "seeds": list(s.seeds), "max_layers": s.max_layers, "repeats": s.repeats, "exact_time": s.exact_time,
        "command": command or f"eplb-opt bench --suite {suite} --out {out}",
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows,
        "missing_peers": missing,
    }
    if plans_for_heatmap is not None:
        wl = plans_for_heatmap
        args = (torch.from_numpy(wl.windows[0]), wl.preset.num_replicas, wl.preset.num_groups,
                wl.preset.num_nodes, wl.preset.num_gpus)
        plans = {}
        for k in (OURS_H, OURS_E, "DeepSeek EPLB (sglang 0.5.23)", "vLLM 0.33 default"):
            if k in policies:
                try:
                    plans[k] = candidate_phy2log(policies[k](*args))
                except Exception:  # noqa: BLE001 - a crashing peer is simply not drawn
                    pass
        data["heatmap"] = heatmap(wl, plans)
    if s.name == "full" and trace is None:
        _say("scaling study ...")
        data["scaling"] = scaling()
        data["growth"] = {pol: growth(data["scaling"], pol) for pol in dict.fromkeys(r["policy"] for r in data["scaling"])}
    data["elapsed_s"] = time.perf_counter() - t0
    data["plots"] = plots(out, data)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=float))
    print(report(out, data))
    return 0
