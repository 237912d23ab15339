"""What one prefill call costs after a gap, against back to back (issue 15's prefill ratios).

Usage (from the repository root; about a minute)::

    .venv/bin/python -m benchmarks.run_call_gap [--repeats 31] [--out benchmarks/call_gap.json]

DeepSeek-V3 prefill preset (58 x 256, 288 / 8 / 4 / 32), the public ``rebalance_experts``
and ``solve`` calls, median of ``--repeats``, each call right after one of:

* ``back_to_back``: nothing (the same input every call, as ``run_kernels`` uses);
* ``inputs_cycling``: nothing, the input cycling over 20 seeds (no branch history
  learned on one input can help);
* ``peer``: DeepSeek's call on the same input (SGLang 0.5.23's copy; ``run_kernels``'s
  protocol);
* ``sleep_25ms``: ``time.sleep(0.025)``;
* ``busy_25ms``: a Python loop reading the clock for 25 ms;
* ``sweep_64mib``: a rewrite of a 64 MiB array (every cache level emptied of our data).

Then, after the peer, where the call's time goes: each top-level kernel call timed (the
module globals of the package's kernels wrapped for that run only) and the rest, Python
and numpy.  And the two largest kernels alone (``heuristics.pipeline``'s count and
packing steps, on the inputs ``place`` gives them), called back to back on one input, on
20 copies of it (other memory, the same branches) and on 20 inputs (other branches): a
kernel timed in a loop on one input runs with its branch history learned.
Single-threaded (torch.set_num_threads(1)); after ``warm_up()``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import eplb_opt
from eplb_opt.bench.peers import deepseek_rebalance
from eplb_opt.bench.runner import machine
from eplb_opt.workloads import PRESETS, generate

BEFORE = ("back_to_back", "inputs_cycling", "peer", "sleep_25ms", "busy_25ms", "sweep_64mib")


def _busy(seconds: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


def _median_after(call: Callable[[Any], object], inputs: list, before: Callable[[Any], object] | None,
                  repeats: int) -> float:
    """Median seconds of ``call(x)``, ``x`` cycling over ``inputs``, each after ``before(x)``."""
    times = []
    for i in range(repeats + 3):                       # the first 3 left out (warm-up)
        x = inputs[i % len(inputs)]
        if before is not None:
            before(x)
        t = time.perf_counter()
        call(x)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _kernel_split(call: Callable[[], object], before: Callable[[], object], repeats: int) -> dict:
    """After ``before``: the call's median, and the mean seconds per call inside each
    top-level kernel (the package modules' kernel globals wrapped for this run)."""
    spent: dict[str, float] = {}
    patched = []

    def timed(name: str, k: Any) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return k(*args)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return run

    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("eplb_opt"):
            continue
        for name, value in list(vars(mod).items()):
            if type(value).__name__ in ("LazyKernel", "CPUDispatcher"):
                patched.append((mod, name, value))
                setattr(mod, name, timed(name, value))
    try:
        times = []
        for i in range(repeats + 3):
            before()
            if i == 3:
                spent.clear()
            t = time.perf_counter()
            call()
            if i >= 3:
                times.append(time.perf_counter() - t)
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)
    kernels = {k: v / repeats for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
    total = statistics.median(times)
    return {"median_s": total, "kernels_s": kernels, "outside_s": total - sum(kernels.values())}


def _kernels_alone(p: Any, inputs: list, repeats: int) -> dict:
    """Median seconds of ``_count_layers`` and ``_pack_layers`` (preset ``p``, as
    ``place`` calls them) on one input, on 20 copies of it and on the 20 inputs, in turn.
    The count step works in place (the loads become per-replica loads, the order moves
    the experts given spares), so its arrays are restored before each call, untimed."""
    from eplb_opt.heuristics import pipeline as pp
    from eplb_opt.heuristics.packing import DEFAULT_REFINE_ROUNDS, item_order

    R, N, G = p.num_replicas, p.num_nodes, p.num_gpus
    per_node, m = R // N, inputs[0].shape[1] // N
    extra, cap = per_node - m, max(G // N, -(-per_node // m))      # as pipeline._counts_step sets them

    def state(w: np.ndarray) -> dict:
        w = np.array(w, dtype=np.float64)
        nog, _, experts, neg, cnt, logcnt, order, _ = pp._counts_step(w, R, p.num_groups, N, G, None)
        neg0 = pp._node_layers(w, np.ascontiguousarray(nog, dtype=np.int64), N)[1]
        return {"experts": experts, "neg": neg, "cnt": cnt, "logcnt": logcnt, "order": order, "neg0": neg0,
                "order0": item_order(neg0), "work": (np.empty_like(neg0), np.empty_like(order))}

    def restore(s: dict) -> None:
        np.copyto(s["work"][0], s["neg0"])
        np.copyto(s["work"][1], s["order0"])

    states = [state(x.numpy()) for x in inputs]
    copies = [{k: (tuple(np.array(a, copy=True) for a in v) if k == "work" else np.array(v, copy=True))
               for k, v in states[0].items()} for _ in states]
    steps = {
        "_count_layers": (lambda s: pp._count_layers(extra, cap, s["experts"], s["work"][0], s["work"][1]), restore),
        "_pack_layers": (lambda s: pp._pack_layers(s["experts"], s["neg"], s["cnt"], s["order"], True, R, G // N,
                                                   DEFAULT_REFINE_ROUNDS, True), None),
    }
    return {name: {label: _median_after(step, group, before, repeats)
                   for label, group in (("one_input", states[:1]), ("copies_of_one", copies), ("inputs_20", states))}
            for name, (step, before) in steps.items()}


def measure(repeats: int) -> dict:
    torch.set_num_threads(1)
    eplb_opt.warm_up()
    p = PRESETS["deepseek-v3-prefill"]
    topo = (p.num_replicas, p.num_groups, p.num_nodes, p.num_gpus)
    inputs = [torch.from_numpy(np.ascontiguousarray(generate(p.name, windows=1, seed=s)[0])) for s in range(20)]
    ds = deepseek_rebalance()
    big = np.zeros((64 << 20) // 8)

    def sweep(_x: Any) -> None:
        big[:] += 1.0

    before: dict[str, Callable[[Any], object] | None] = {
        "back_to_back": None, "inputs_cycling": None, "peer": lambda x: ds(x, *topo),
        "sleep_25ms": lambda _x: time.sleep(0.025), "busy_25ms": lambda _x: _busy(0.025), "sweep_64mib": sweep,
    }
    calls = {"rebalance_experts": lambda x: eplb_opt.rebalance_experts(x, *topo),
             "solve": lambda x: eplb_opt.solve(x, **p.topology())}
    rows = {name: {b: _median_after(call, inputs if b == "inputs_cycling" else inputs[:1], before[b], repeats)
                   for b in BEFORE} for name, call in calls.items()}
    peer = _median_after(lambda x: ds(x, *topo), inputs[:1], None, repeats)
    x0 = inputs[0]
    split = {name: _kernel_split(lambda c=call: c(x0), lambda: ds(x0, *topo), repeats) for name, call in calls.items()}
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": repeats,
            "preset": p.name, "deepseek_median_s": peer, "median_s": rows, "after_peer_split": split,
            "kernels_alone_s": _kernels_alone(p, inputs, max(repeats, 60))}


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--out", type=Path, default=here / "call_gap.json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    data = measure(args.repeats)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"| call | {' | '.join(BEFORE)} |")
    for name, row in data["median_s"].items():
        print(f"| {name} | " + " | ".join(f"{row[b] * 1e3:.2f} ms" for b in BEFORE) + " |")
    for name, s in data["after_peer_split"].items():
        top = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in list(s["kernels_s"].items())[:4])
        print(f"after the peer, {name}: {s['median_s'] * 1e3:.2f} ms = kernels {sum(s['kernels_s'].values()) * 1e3:.2f} "
              f"({top}) + Python and numpy {s['outside_s'] * 1e3:.2f} ms")
    for name, row in data["kernels_alone_s"].items():
        print(f"{name} alone: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in row.items()))
    print(f"DeepSeek's call: {data['deepseek_median_s'] * 1e3:.2f} ms; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
