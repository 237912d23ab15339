"""Experiment for issue 2's speed target: how fast would compiled packing loops be?

Not part of the package, its tests or CI.  ``proto_fast`` is a numba prototype of a
simplified hierarchical pipeline fixed to the DeepSeek-V3 prefill topology (exhaustive
groups to nodes, greedy counts, Karmarkar-Karp seed, single-swap refinement, duplicate
separation by single swaps).  It is not a faithful port of ``heuristics``: it keeps some
duplicate replicas on a GPU that ours removes, and has no snake/LPT seeds or pair moves.

Run from the repository root, in an environment that also has numba::

    .venv/bin/pip install numba
    .venv/bin/python benchmarks/experiments/numba_packing/run.py

It times DeepSeek's reference (sglang 0.5.23), our ``rebalance_experts`` and the
prototype (alone, and followed by our independent verifier) on the same input, each
call right after a DeepSeek call, and prints medians.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
sys.path.insert(0, str(here.parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import eplb_opt  # noqa: E402
from eplb_opt.bench.peers import deepseek_rebalance  # noqa: E402
from eplb_opt.workloads import PRESETS, generate  # noqa: E402

import proto_fast  # noqa: E402


def main() -> int:
    p = PRESETS["deepseek-v3-prefill"]
    topo = (p.num_replicas, p.num_groups, p.num_nodes, p.num_gpus)
    w = generate(p, windows=1, seed=0)[0]
    wt = torch.from_numpy(w)
    ds = deepseek_rebalance()

    t = time.perf_counter()
    proto_fast.run(w)
    print(f"prototype first call (compile, or load from numba's cache): {(time.perf_counter() - t) * 1e3:.0f} ms")

    def numba_call():
        phy2log, _, logcnt = proto_fast.run(w)   # log2phy is trusted, as derive_maps is in ours
        eplb_opt.verify(phy2log, p.num_experts, p.num_replicas, p.num_gpus, num_groups=p.num_groups,
                        num_nodes=p.num_nodes, hierarchical=True, logcnt=logcnt)
        return phy2log

    fns = {
        "DeepSeek (sglang 0.5.23)": lambda: ds(wt, *topo),
        "rebalance_experts (numpy)": lambda: eplb_opt.rebalance_experts(wt, *topo),
        "numba prototype + verify": numba_call,
        "numba prototype alone": lambda: proto_fast.run(w),
    }
    for f in fns.values():
        f()
    # Every candidate is timed right after a DeepSeek call, as in benchmarks/run_core.py
    # (a call that follows DeepSeek's pure-Python loops runs slower than one that follows
    # itself, so each candidate gets the same predecessor).
    times: dict[str, list[float]] = {k: [] for k in fns}
    ds_call = fns["DeepSeek (sglang 0.5.23)"]
    for _ in range(30):
        for k, f in fns.items():
            if k != "DeepSeek (sglang 0.5.23)":
                ds_call()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["DeepSeek (sglang 0.5.23)"]

    def bal(phy2log: np.ndarray) -> float:
        return eplb_opt.balancedness(eplb_opt.gpu_loads(w, phy2log, p.num_gpus))

    def dups(phy2log: np.ndarray) -> int:
        k = p.num_replicas // p.num_gpus
        s = np.sort(phy2log.reshape(-1, k), axis=1)
        return int((s[:, 1:] == s[:, :-1]).sum())

    plans = {
        "DeepSeek (sglang 0.5.23)": ds(wt, *topo)[0].numpy(),
        "rebalance_experts (numpy)": eplb_opt.rebalance_experts(wt, *topo)[0].numpy(),
        "numba prototype + verify": numba_call(),
        "numba prototype alone": proto_fast.run(w)[0],
    }
    print("| call | median ms | speed-up vs DeepSeek | balancedness | duplicate replicas on a GPU |")
    print("|---|---|---|---|---|")
    for k in fns:
        print(f"| {k} | {med[k] * 1e3:.2f} | {base / med[k]:.1f}x | {bal(plans[k]):.5f} | {dups(plans[k])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
