"""Soak: online replanning of many consecutive windows of a drifting workload, with flat
memory and no growth in per-call time.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.run_soak [--windows 1000] [--time-limit 0.05]

Requirement: online mode replanning 1,000 consecutive windows of a drifting workload with
flat memory and no growth in per-call time.

Method: DeepSeek-V3 prefill-shaped loads (``eplb_opt.workloads.generate``, 58 layers x 256
experts, 288 replicas, 8 groups, 4 nodes, 32 GPUs), drifting: blocks of ``--block`` (20)
consecutive windows from seeds ``--seed``, ``--seed + 1``, ..., generated as the loop
reaches them; within a block log-popularity takes a random-walk step of 0.15 per window
(the generator's default), at each block boundary a new traffic mix starts.  Blocks keep
the workload stationary over the run, so a change in per-call time is the library's, not
the workload's: one random walk of 1,000 windows (``--block 0``) ends with the busiest
expert taking about 57 % of its layer's tokens and 65 % of the experts idle (heuristic
balancedness 0.86 at window 0, 0.35 at window 999).
A serving loop in one warm process: window 0 is planned (exact mode, 1 s) and deployed;
then for every later window the engine replans from the deployed placement,
``eplb_opt.solve(window, mode="exact", time_limit=--time-limit, previous=deployed,
max_balance_loss=0.005)``, and deploys the result (``--trigger``: asks
``eplb_opt.should_rebalance`` with the same budget instead, and deploys its candidate only
when it is worth it).

Per call: wall time, RSS (``/proc/self/statm``), threads (``threading.active_count()`` and
the process's OS threads), open file descriptors, balancedness on the window planned for
and on the next window, replica moves, events.  Every ``--sample-every`` windows: the
number of objects the garbage collector tracks and (``--tracemalloc``) the traced Python
heap.  Every ``--heuristic-every`` windows the same replan is first timed in heuristic
mode (outside the timed call), to check the call against ``max(time_limit, heuristic
time)``.

Writes ``soak.json`` (``--out``) and a plot of per-call time and RSS over the windows next
to it (same name, ``.png``); then regenerates ``RESULTS.md`` when the JSON is written into
``benchmarks/``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

import eplb_opt
from eplb_opt.workloads import PRESETS, generate

from .run_deadlines import _kind, _machine, _timeout

PRESET = "deepseek-v3-prefill"
DRIFT = 0.15        # the generator's default random-walk step per window
MAX_BALANCE_LOSS = 0.005
HEAD = 100          # windows compared at the start and at the end
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        return -1


def _fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return -1


def _slope_per_1000(y: np.ndarray, x: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0] * 1000)


def _windows(p, seed: int, block: int, total: int) -> Iterator[np.ndarray]:
    """``total`` consecutive ``[L, E]`` float64 windows: blocks of ``block`` windows from
    seeds ``seed, seed + 1, ...`` (drift within a block, a new traffic mix at each block
    boundary); ``block=0``: one random walk of ``total`` windows (precomputed, float32)."""
    if block <= 0:
        loads = generate(p, windows=total, seed=seed, drift=DRIFT).astype(np.float32)
        for x in loads:
            yield x.astype(np.float64)
        return
    k = 0
    while total > 0:
        n = min(block, total)
        yield from generate(p, windows=n, seed=seed + k, drift=DRIFT)
        total -= n
        k += 1


def soak(windows: int, time_limit: float, mode: str, seed: int, trigger: bool, sample_every: int,
         use_tracemalloc: bool, heuristic_every: int = 0, block: int = 20, progress: bool = True) -> dict:
    p = PRESETS[PRESET]
    topo = p.topology()
    G = topo["num_gpus"]
    # Window 0 is the initial deploy, 1..windows are replanned, and the last plan is also
    # scored on the window after it.
    stream = _windows(p, seed, block, windows + 2)
    w = next(stream)
    nxt = next(stream)
    first = eplb_opt.solve(w, **topo, mode="exact", time_limit=1.0)
    deployed = first.plan.phy2log
    if use_tracemalloc:
        import tracemalloc

        tracemalloc.start()
    cols: dict[str, list] = {k: [] for k in (
        "window", "wall_ms", "rss_mib", "threads", "os_threads", "fds", "balancedness", "next_balancedness",
        "moves", "deployed", "timeout_events")}
    samples: list[dict] = []
    checks: list[dict] = []
    kinds: dict[str, int] = {}
    start = time.perf_counter()
    interrupted = False
    try:
        for t in range(1, windows + 1):
            w, nxt = nxt, next(stream)
            th = None
            if heuristic_every and t % heuristic_every == 0 and mode == "exact" and not trigger:
                # The same replan in heuristic mode, right before: the deadline is
                # max(time_limit, heuristic time).
                c0 = time.perf_counter()
                eplb_opt.solve(w, **topo, previous=deployed, max_balance_loss=MAX_BALANCE_LOSS)
                th = time.perf_counter() - c0
            c0 = time.perf_counter()
            if trigger:
                d = eplb_opt.should_rebalance(
                    deployed, w, num_gpus=G, num_groups=topo["num_groups"], num_nodes=topo["num_nodes"],
                    mode=mode, time_limit=time_limit, max_balance_loss=MAX_BALANCE_LOSS,
                )
                r, go = d.candidate, d.worth
                bal = r.balancedness if go else d.current_balancedness
            else:
                r = eplb_opt.solve(w, **topo, mode=mode, time_limit=time_limit, previous=deployed,
                                   max_balance_loss=MAX_BALANCE_LOSS)
                go = True
                bal = r.balancedness
            wall = time.perf_counter() - c0
            if go:
                deployed = r.plan.phy2log
            nxt_bal = eplb_opt.balancedness(eplb_opt.gpu_loads(nxt, deployed.numpy(), G))
            cols["window"].append(t)
            cols["wall_ms"].append(round(wall * 1e3, 2))
            cols["rss_mib"].append(round(_rss_mib(), 2))
            cols["threads"].append(threading.active_count())
            cols["os_threads"].append(_os_threads())
            cols["fds"].append(_fds())
            cols["balancedness"].append(round(bal, 6))
            cols["next_balancedness"].append(round(nxt_bal, 6))
            cols["moves"].append(int(r.moves.sum()) if go else 0)
            cols["deployed"].append(bool(go))
            cols["timeout_events"].append(sum(_timeout(e) for e in r.events))
            for k in set(_kind(e) for e in r.events):
                kinds[k] = kinds.get(k, 0) + 1
            if th is not None:
                checks.append({"window": t, "new_mix": bool(block > 0 and t % block == 0),
                               "heuristic_ms": th * 1e3, "wall_ms": wall * 1e3,
                               "overhead_ms": (wall - max(time_limit, th)) * 1e3})
            del r
            if sample_every and (t % sample_every == 0 or t == windows):
                s = {"window": t, "gc_objects": len(gc.get_objects())}
                if use_tracemalloc:
                    s["traced_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
                samples.append(s)
            if progress and t % 100 == 0:
                last = cols["wall_ms"][-100:]
                print(f"  window {t}/{windows}: per-call median {statistics.median(last):.0f} ms (last 100), "
                      f"RSS {cols['rss_mib'][-1]:.1f} MiB, threads {cols['threads'][-1]} "
                      f"({cols['os_threads'][-1]} OS), fds {cols['fds'][-1]}, "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        n = min(len(v) for v in cols.values())
        for v in cols.values():
            del v[n:]
        print(f"  interrupted after {len(cols['window'])} windows; writing what was measured", file=sys.stderr)
    finally:
        if use_tracemalloc:
            tracemalloc.stop()
    return {
        "preset": p.as_dict(), "windows": windows, "seed": seed, "block": block, "drift": DRIFT, "mode": mode,
        "time_limit": time_limit, "max_balance_loss": MAX_BALANCE_LOSS, "trigger": trigger,
        "tracemalloc": use_tracemalloc,
        "elapsed_s": time.perf_counter() - start, "interrupted": interrupted,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "series": cols, "samples": samples, "deadline_checks": checks,
        "event_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
    }


def _boundaries(data: dict) -> np.ndarray:
    """Per call: the window starts a new block (a new traffic mix)."""
    blk = data.get("block") or 0
    return np.array([blk > 0 and t % blk == 0 for t in data["series"]["window"]], dtype=bool)


def summarize(data: dict) -> dict:
    c = data["series"]
    n = len(c["window"])
    x = np.asarray(c["window"], dtype=float)
    wall = np.asarray(c["wall_ms"])
    rss = np.asarray(c["rss_mib"])
    ref = min(HEAD, n) - 1                      # RSS reference: window 100 (after warm-up)
    # Time trends over the calls inside a block; the first window of each block (a new
    # traffic mix) is summarised apart.
    bnd = _boundaries(data)
    wm, xm = wall[~bnd], x[~bnd]
    m = len(wm)
    head = min(HEAD, m)
    nan = float("nan")
    out = {
        "calls": n,
        "head": HEAD,
        "within_block_calls": m,
        "time_first_median_ms": float(np.median(wm[:head])) if m else nan,
        "time_last_median_ms": float(np.median(wm[-head:])) if m else nan,
        "time_median_ms": float(np.median(wm)) if m else nan,
        "time_slope_ms_per_1000": _slope_per_1000(wm, xm),
        "time_p99_ms": float(np.percentile(wall, 99)) if n else nan,
        "time_max_ms": float(wall.max()) if n else nan,
        "boundary_calls": int(bnd.sum()),
        "boundary_median_ms": float(np.median(wall[bnd])) if bnd.any() else nan,
        "boundary_max_ms": float(wall[bnd].max()) if bnd.any() else nan,
        "rss_start_mib": float(rss[0]) if n else float("nan"),
        "rss_ref_window": int(c["window"][ref]) if n else None,
        "rss_ref_mib": float(rss[ref]) if n else float("nan"),
        "rss_end_mib": float(rss[-1]) if n else float("nan"),
        "rss_max_mib": float(rss.max()) if n else float("nan"),
        "rss_slope_mib_per_1000_after_ref": _slope_per_1000(rss[ref:], x[ref:]),
        "threads_first": c["threads"][0] if n else None, "threads_max": max(c["threads"], default=None),
        "os_threads_first": c["os_threads"][0] if n else None, "os_threads_max": max(c["os_threads"], default=None),
        "os_threads_last": c["os_threads"][-1] if n else None,
        "fds_first": c["fds"][0] if n else None, "fds_last": c["fds"][-1] if n else None,
        "fds_max": max(c["fds"], default=None),
        "deployed": int(sum(c["deployed"])),
        "moves_median": float(np.median(c["moves"])) if n else float("nan"),
        "balancedness_median": float(np.median(c["balancedness"])) if n else float("nan"),
        "balancedness_min": float(min(c["balancedness"], default=float("nan"))),
        "next_balancedness_median": float(np.median(c["next_balancedness"])) if n else float("nan"),
        "calls_with_timeout_events": int(sum(v > 0 for v in c["timeout_events"])),
        "calls_over_budget": int(sum(v > 1e3 * data["time_limit"] for v in c["wall_ms"])),
    }
    out["time_ratio_last_first"] = out["time_last_median_ms"] / out["time_first_median_ms"] if m else nan
    out["rss_growth_mib"] = out["rss_end_mib"] - out["rss_ref_mib"]
    ch = data.get("deadline_checks") or []
    if ch:
        ov = [x["overhead_ms"] for x in ch]
        out["deadline_checks"] = len(ch)
        out["heuristic_median_ms"] = float(np.median([x["heuristic_ms"] for x in ch]))
        out["overhead_median_ms"] = float(np.median(ov))
        out["overhead_max_ms"] = float(max(ov))
    s = data["samples"]
    if len(s) >= 2:
        out["gc_objects_first"], out["gc_objects_last"] = s[0]["gc_objects"], s[-1]["gc_objects"]
        if "traced_mib" in s[0]:
            out["traced_first_mib"], out["traced_last_mib"] = s[0]["traced_mib"], s[-1]["traced_mib"]
    return out


def plot(data: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    c = data["series"]
    x = np.asarray(c["window"])
    wall = np.asarray(c["wall_ms"])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 5.2), sharex=True)
    bnd = _boundaries(data)
    a1.plot(x[~bnd], wall[~bnd], ".", ms=2, alpha=0.5, color="#1f77b4", label="per call")
    if bnd.any():
        a1.plot(x[bnd], wall[bnd], "x", ms=3, color="#ff7f0e", label="first window of a block (new mix)")
    if (~bnd).sum() >= 25:
        k = 25
        roll = np.convolve(wall[~bnd], np.ones(k) / k, mode="valid")
        a1.plot(x[~bnd][k - 1:], roll, color="k", lw=1, label=f"mean of {k} (inside blocks)")
    a1.set_yscale("log")
    a1.axhline(1e3 * data["time_limit"], color="r", ls="--", lw=1, label=f"time_limit {data['time_limit']:g} s")
    a1.set_ylabel("wall per call (ms)")
    a1.legend(fontsize=7, loc="upper right")
    a1.set_title(f"online replanning, {data['preset']['name']}, mode={data['mode']!r}, "
                 f"{'should_rebalance' if data['trigger'] else 'previous='} each window", fontsize=9)
    a2.plot(x, c["rss_mib"], color="#2ca02c", lw=1)
    a2.set_ylabel("RSS (MiB)")
    a2.set_xlabel("window")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def table(data: dict) -> str:
    s = data["summary"]
    rows = [
        ("windows replanned", f"{s['calls']} ({s['deployed']} deployed){' (interrupted)' if data['interrupted'] else ''}"),
        ("per-call median, first / last 100 *", f"{s['time_first_median_ms']:.1f} / {s['time_last_median_ms']:.1f} ms "
                                                f"(ratio {s['time_ratio_last_first']:.3f})"),
        ("per-call slope *", f"{s['time_slope_ms_per_1000']:+.2f} ms per 1000 windows"),
        ("per-call median *", f"{s['time_median_ms']:.1f} ms over {s['within_block_calls']} calls"),
        ("new-mix calls median / max", f"{s['boundary_median_ms']:.1f} / {s['boundary_max_ms']:.1f} ms over "
                                       f"{s['boundary_calls']} calls"),
        ("all calls p99 / max", f"{s['time_p99_ms']:.1f} / {s['time_max_ms']:.1f} ms"),
        ("calls over time_limit", f"{s['calls_over_budget']} of {s['calls']}"),
        (f"RSS at window {s['rss_ref_window']} / end", f"{s['rss_ref_mib']:.1f} / {s['rss_end_mib']:.1f} MiB "
                                                      f"(growth {s['rss_growth_mib']:+.2f} MiB)"),
        ("RSS slope after the reference", f"{s['rss_slope_mib_per_1000_after_ref']:+.2f} MiB per 1000 windows"),
        ("RSS max / peak (getrusage)", f"{s['rss_max_mib']:.1f} / {data['peak_rss_mib']:.1f} MiB"),
        ("threads first / max (OS threads)", f"{s['threads_first']} / {s['threads_max']} "
                                             f"({s['os_threads_first']} / {s['os_threads_max']})"),
        ("open fds first / last / max", f"{s['fds_first']} / {s['fds_last']} / {s['fds_max']}"),
        ("moves per call (median)", f"{s['moves_median']:.0f}"),
        ("balancedness median (next window)", f"{s['balancedness_median']:.5f} ({s['next_balancedness_median']:.5f})"),
    ]
    if "deadline_checks" in s:
        rows.append(("heuristic-mode replan (median of checks)", f"{s['heuristic_median_ms']:.1f} ms over "
                     f"{s['deadline_checks']} windows; overhead past max(time_limit, it): median "
                     f"{s['overhead_median_ms']:+.1f} ms, max {s['overhead_max_ms']:+.1f} ms"))
    if "gc_objects_first" in s:
        rows.append(("gc-tracked objects first / last", f"{s['gc_objects_first']} / {s['gc_objects_last']}"))
    if "traced_first_mib" in s:
        rows.append(("traced Python heap first / last", f"{s['traced_first_mib']:.2f} / {s['traced_last_mib']:.2f} MiB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + ["* calls inside a block (not a new traffic mix)"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=1000, help="windows replanned (after the initial deploy)")
    ap.add_argument("--time-limit", type=float, default=0.05, help="budget per replan, seconds")
    ap.add_argument("--mode", choices=["exact", "heuristic"], default="exact")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first block")
    ap.add_argument("--block", type=int, default=20,
                    help="windows per seed: drift within a block, a new traffic mix at each boundary "
                         "(0: one random walk over the whole run, which grows ever more skewed)")
    ap.add_argument("--trigger", action="store_true", help="replan through should_rebalance")
    ap.add_argument("--sample-every", type=int, default=50, help="windows between gc / tracemalloc samples")
    ap.add_argument("--tracemalloc", action="store_true", help="trace the Python heap (slower)")
    ap.add_argument("--heuristic-every", type=int, default=50,
                    help="windows between timings of the same replan in heuristic mode (0: never)")
    here = Path(__file__).resolve().parent
    ap.add_argument("--out", type=Path, default=here / "soak.json", help="JSON to write")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.windows < 1:
        ap.error("--windows must be at least 1")
    data = {
        "command": "python -m benchmarks.run_soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(),
    }
    print(f"soak: {args.windows} windows, {args.mode} mode, time_limit {args.time_limit:g} s ...", file=sys.stderr)
    # SIGTERM stops the loop like Ctrl-C: what was measured is still written.
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        data |= soak(args.windows, args.time_limit, args.mode, args.seed, args.trigger, args.sample_every,
                     args.tracemalloc, args.heuristic_every, args.block)
    finally:
        signal.signal(signal.SIGTERM, old)
    data["summary"] = summarize(data)
    print(table(data))
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plot and data["series"]["window"]:
        data["plot"] = plot(data, out.with_suffix(".png"))
    out.write_text(json.dumps(data, separators=(",", ":")))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)
    if out == here / "soak.json":
        from .report import write

        write(here)
    return 0


if __name__ == "__main__":
    sys.exit(main())
