"""Files of a replay: ``results.json``, ``REPORT.md`` and plots (what ``eplb-opt replay
--out DIR`` writes; :func:`write_outputs` in Python)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._result import ReplayResult, legend

__all__ = ["PLOTS", "report_markdown", "write_outputs", "write_plots"]

PLOTS = ("balancedness.png", "moved_bytes.png", "interval_sweep.png")

_BASE_STYLE = {"static": dict(color="0.55", ls="--"), "clairvoyant": dict(color="k", ls=":")}


def _series(data: dict, interval: int) -> list[dict]:
    return [r for r in data["runs"] if r["interval"] == interval]


def _plot_over_time(data: dict, key: str, ylabel: str, title: str, path: Path, cumulative: bool) -> None:
    import matplotlib.pyplot as plt

    intervals = data["intervals"]
    edges = np.asarray(data["series_steps"], dtype=float)
    mid = (edges[:-1] + edges[1:]) / 2
    fig, axes = plt.subplots(len(intervals), 1, figsize=(10, 2.6 * len(intervals) + 0.8), sharex=True, squeeze=False)
    for ax, iv in zip(axes[:, 0], intervals):
        for r in _series(data, iv):
            y = np.asarray(r[key], dtype=float)
            y = np.cumsum(y) / 1e9 if cumulative else y
            ax.plot(mid, y, lw=1.1, label=r["policy"], **_BASE_STYLE.get(r["policy"], {}))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"interval {iv} steps", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].legend(fontsize=7, ncol=4, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    timed = data["time_model"] is not None
    key = "time_s" if timed else "load_total"
    intervals = data["intervals"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for pol in dict.fromkeys(r["policy"] for r in data["runs"]):
        pts = [(r["interval"], r[key]) for r in data["runs"] if r["policy"] == pol]
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", lw=1.2, label=pol, **_BASE_STYLE.get(pol, {}))
    bound = [data["lower_bound_total"][str(i)] for i in intervals]
    if timed:
        bound = [b / data["time_model"]["gpu_tokens_per_s"] for b in bound]
    ax.plot(intervals, bound, color="tab:red", ls="-.", lw=1, label="certified bound (no copies)")
    ax.set_xscale("log")
    ax.set_xticks(intervals, [str(i) for i in intervals])
    ax.xaxis.set_minor_formatter(NullFormatter())          # only the intervals replayed are labelled
    ax.set_xlabel("rebalance interval (steps)")
    ax.set_ylabel("total MoE time (s): compute + copies" if timed else "total busiest-GPU load (tokens)")
    ax.set_title("Interval sweep: which interval pays (lower is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(data: dict, out: Path) -> list[str]:
    """The three plots (:data:`PLOTS`) from ``ReplayResult.to_dict()`` data; their names."""
    import matplotlib

    matplotlib.use("Agg")
    _plot_over_time(data, "series_balancedness", "balancedness", "Balancedness over time (per bin of steps)",
                    out / PLOTS[0], cumulative=False)
    _plot_over_time(data, "series_bytes_moved", "GB moved (cumulative)", "Cumulative bytes copied by rebalances",
                    out / PLOTS[1], cumulative=True)
    _plot_sweep(data, out / PLOTS[2])
    return list(PLOTS)


def _md_table(result: ReplayResult) -> list[str]:
    timed = result.time_model is not None
    head = ["interval", "policy", "balance", "load total", "vs bound", "moves (same / cross node)", "GB moved"]
    head += ["copy s", "time s"] if timed else []
    head += ["vs static", "gap closed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for iv in result.intervals:
        for p in result.policies:
            try:
                t = result.totals(p, iv)
            except KeyError:
                continue
            vb = t["window_load_total"] / t["lower_bound_total"] if t["lower_bound_total"] > 0 else 1.0
            cells = [str(iv), p, f"{t['balancedness']:.4f}", f"{t['load_total']:.4g}", f"{vb:.4f}",
                     f"{t['moves']} ({t['same_node_moves']} / {t['cross_node_moves']})",
                     f"{t['bytes_moved'] / 1e9:.1f}"]
            cells += [f"{t['copy_s']:.2f}", f"{t['time_s']:.2f}"] if timed else []
            cells += ["-" if t["vs_static"] is None else f"{t['vs_static']:.4f}",
                      "-" if t["gap_closed"] is None else f"{t['gap_closed']:.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(result: ReplayResult, command: str, machine: str, plots: list[str],
                    trace_parameters: dict | None = None) -> str:
    """``REPORT.md``: what ran, the totals table, the best interval per policy, and the rules."""
    tm = result.time_model
    lines = [f"# eplb-opt replay: {result.trace}", "",
             f"`{command}` on {machine}, {time.strftime('%Y-%m-%d %H:%M')}; {result.elapsed_s:.0f} s.", "",
             f"Trace: {result.steps} steps x {result.num_layers} layers x {result.num_experts} experts "
             f"({'streamed in chunks' if result.streamed else 'loaded whole'}).  Topology: {result.num_replicas} "
             f"replicas, {result.num_groups} groups, {result.num_nodes} nodes, {result.num_gpus} GPUs; every policy "
             f"plans under the {'hierarchical' if result.hierarchical and result.num_nodes > 1 else 'global'} rule.  Intervals "
             f"{', '.join(map(str, result.intervals))}; bytes per expert {result.bytes_per_expert}."]
    if trace_parameters:
        lines += ["", "Generated trace (`eplb_opt.replay.step_trace`): "
                  + ", ".join(f"{k} {v}" for k, v in trace_parameters.items()) + "."]
    lines += ["", ("Time model: " + (f"{tm.gpu_tokens_per_s:g} tokens/s per GPU per MoE layer, links "
                                     f"{tm.same_node_gbps:g} GB/s within a node and {tm.cross_node_gbps:g} GB/s "
                                     "across nodes." if tm else "off (no seconds; copies are free)."))]
    lines += ["", "Policies:", ""] + [f"* `{k}`: {v}" for k, v in result.policy_descriptions.items()]
    lines += ["", "## Totals", ""] + _md_table(result) + ["", legend(tm is not None).replace("\n", "  \n"), ""]
    unit = "time" if tm else "load total"
    for p in result.policies:
        best = result.best_interval(p)
        if best is not None and p != "static":
            lines.append(f"* `{p}`: least {unit} at interval {best}")
    for p, why in result.skipped.items():
        lines.append(f"* `{p}` skipped: {why}")
    for p, why in result.failed.items():
        lines.append(f"* `{p}` failed: {why}")
    lines += ["", "## Rules", "", f"* Initial placement: {result.initial_placement}.",
              "* Each rebalance's plan is aligned to the deployed placement (`align_to_previous`) before its moves "
              "are counted (`count_moves`); a moved replica is same-node when some replica of its expert lived on "
              "the receiving GPU's node before, else cross-node.",
              "* The certified bound is per served window, on the window's summed loads: no plan fixed over the "
              "window (and obeying the policy rule) beats it; every run's plans are fixed over each served window.",
              "* Copy time (slowest receiving GPU: same-node bytes / same-node rate + cross-node bytes / cross-node "
              "rate) is charged to the steps it overlaps from the rebalance on; a run's time grows by it.", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def write_outputs(result: ReplayResult, out: str | Path, *, command: str = "", machine: str = "",
                  trace_parameters: dict | None = None, plots: bool = True) -> dict[str, Any]:
    """Write ``results.json``, ``REPORT.md`` and (with ``plots``) the plots into ``out``
    (created if needed); returns the ``results.json`` data."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data.update(command=command, machine=machine, date=time.strftime("%Y-%m-%d %H:%M"),
                trace_parameters=trace_parameters)
    names = write_plots(data, folder) if plots else []
    data["plots"] = names
    (folder / "results.json").write_text(json.dumps(data, indent=1))
    (folder / "REPORT.md").write_text(report_markdown(result, command, machine, names, trace_parameters))
    return data
