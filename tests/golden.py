"""Golden outputs: a fixed matrix of ``solve`` / ``rebalance_experts`` calls and a
fingerprint of everything each one returns except wall-clock time.

Restructurings (issue 14) must leave every fingerprint unchanged; a change that is
meant to alter plans (new tie-breaks, a better search) regenerates the file and says
why in its commit::

    .venv/bin/python -m tests.golden --write      # rewrite tests/golden.json
    .venv/bin/python -m tests.golden              # compare, print the cases that differ

Exact mode runs with ``deterministic=True`` only: a wall-clock budget has no fixed
output.  ``tests/test_golden.py`` runs the comparison in CI.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

GOLDEN = Path(__file__).with_name("golden.json")


def _weights() -> dict[str, tuple[np.ndarray, dict[str, int]]]:
    from eplb_opt.workloads import PRESETS, generate

    out: dict[str, tuple[np.ndarray, dict[str, int]]] = {}
    for name, layers in (("deepseek-v3-prefill", 6), ("qwen3-235b", 6), ("no-redundancy", 4),
                         ("deepseek-v2-lite", 6), ("deepseek-v3-decode", 3)):
        p = PRESETS[name]
        w = generate(name, windows=3, seed=7)[:, :layers]
        out[name] = (w, p.topology())
    rng = np.random.default_rng(11)
    small = rng.integers(0, 10_000, size=(3, 5, 16)).astype(np.float64)
    out["small"] = (small, dict(num_replicas=24, num_groups=4, num_nodes=2, num_gpus=4))
    # 16 groups on 4 nodes: too many partitions to enumerate (exact mode's CP-SAT group step).
    many = rng.gamma(0.7, 1000.0, size=(3, 4, 64)).round()
    out["groups16"] = (many, dict(num_replicas=80, num_groups=16, num_nodes=4, num_gpus=16))
    return out


def _cases() -> dict[str, Callable[[], Any]]:
    import eplb_opt

    W = _weights()
    cases: dict[str, Callable[[], Any]] = {}

    def add(name: str, wl: str, *, windows: bool = False, dtype: Any = None, **kw: Any) -> None:
        w, topo = W[wl]
        x = w if windows else w[0]
        if dtype is not None:
            x = np.rint(x).astype(dtype)
        cases[name] = lambda: eplb_opt.solve(x, **{**topo, **kw})

    for wl in W:
        for policy in ("auto", "global"):
            add(f"{wl}/heuristic/{policy}", wl, policy=policy)
        add(f"{wl}/exact/det", wl, mode="exact", deterministic=True, time_limit=0.3)
    for wl in ("deepseek-v3-prefill", "small", "deepseek-v2-lite", "groups16"):
        add(f"{wl}/heuristic/hierarchical", wl, policy="hierarchical")
        add(f"{wl}/heuristic/spill", wl, policy="spill")
        add(f"{wl}/heuristic/spill-0.25", wl, policy="spill", cross_node_cost=0.25)
        add(f"{wl}/exact/spill", wl, policy="spill", mode="exact", deterministic=True, time_limit=0.2)
        add(f"{wl}/heuristic/nodup", wl, allow_duplicates=False)
        add(f"{wl}/heuristic/nodup-global", wl, allow_duplicates=False, policy="global")
        add(f"{wl}/exact/nodup", wl, allow_duplicates=False, mode="exact", deterministic=True, time_limit=0.3)
        add(f"{wl}/exact/global", wl, policy="global", mode="exact", deterministic=True, time_limit=0.3)
        add(f"{wl}/heuristic/int64", wl, dtype=np.int64)
        add(f"{wl}/exact/int64", wl, dtype=np.int64, mode="exact", deterministic=True, time_limit=0.2)
        add(f"{wl}/heuristic/tol", wl, tolerance=0.01)
        for obj in ("sum", "worst", "mean"):
            add(f"{wl}/heuristic/windows-{obj}", wl, windows=True, objective=obj)
        add(f"{wl}/exact/windows-worst", wl, windows=True, objective="worst", mode="exact",
            deterministic=True, time_limit=0.2)
        add(f"{wl}/exact/windows-sum", wl, windows=True, objective="sum", mode="exact",
            deterministic=True, time_limit=0.2)
    _migration_cases(cases, W)
    _masked_cases(cases, W)
    _rebalance_cases(cases, W)
    return cases


def _migration_cases(cases: dict[str, Callable[[], Any]], W: dict) -> None:
    import eplb_opt

    for wl in ("deepseek-v3-prefill", "qwen3-235b", "small"):
        w, topo = W[wl]

        def prev_plan(w: np.ndarray = w, topo: dict = topo) -> np.ndarray:
            return eplb_opt.solve(w[0], **topo).plan.phy2log.numpy()

        for mode, extra in (("heuristic", {}), ("exact", dict(deterministic=True, time_limit=0.3))):
            for mbl in (None, 0.005, 0.05):
                def run(w: np.ndarray = w, topo: dict = topo, mode: str = mode, extra: dict = extra,
                        mbl: float | None = mbl, prev: Callable = prev_plan) -> Any:
                    return eplb_opt.solve(w[1], previous=prev(), max_balance_loss=mbl, mode=mode,
                                          bytes_per_expert=1000, **topo, **extra)
                cases[f"{wl}/{mode}/previous-{mbl}"] = run
        cases[f"{wl}/heuristic/previous-nodup"] = (
            lambda w=w, topo=topo, prev=prev_plan: eplb_opt.solve(
                w[1], previous=prev(), max_balance_loss=0.01, allow_duplicates=False, policy="global", **topo))


def _masked_cases(cases: dict[str, Callable[[], Any]], W: dict) -> None:
    import eplb_opt

    for wl in ("deepseek-v3-prefill", "qwen3-235b", "small"):
        w, topo = W[wl]
        G = topo["num_gpus"]
        L = w.shape[1]
        mask = np.zeros((L, G), dtype=bool)
        mask[:, 1] = True
        if G >= 8:
            mask[L // 2:, G - 1] = True
        for mode, extra in (("heuristic", {}), ("exact", dict(deterministic=True, time_limit=0.3))):
            cases[f"{wl}/{mode}/masked"] = (
                lambda w=w, topo=topo, mode=mode, extra=extra, mask=mask: eplb_opt.solve(
                    w[0], masked_gpus=mask, mode=mode, **topo, **extra))

            def run_prev(w: np.ndarray = w, topo: dict = topo, mode: str = mode, extra: dict = extra,
                         mask: np.ndarray = mask) -> Any:
                old = eplb_opt.solve(w[0], **topo).plan.phy2log.numpy()
                return eplb_opt.solve(w[1], masked_gpus=mask, previous=old, max_balance_loss=0.01,
                                      mode=mode, **{**topo, "num_groups": 1}, policy="global", **extra)
            cases[f"{wl}/{mode}/masked-previous"] = run_prev


def _rebalance_cases(cases: dict[str, Callable[[], Any]], W: dict) -> None:
    import eplb_opt

    for wl in W:
        w, topo = W[wl]
        cases[f"{wl}/rebalance_experts"] = (
            lambda w=w, topo=topo: eplb_opt.rebalance_experts(w[0], topo["num_replicas"], topo["num_groups"],
                                                              topo["num_nodes"], topo["num_gpus"]))
    w, topo = W["small"]
    cases["small/rebalance_experts/exact"] = lambda: eplb_opt.rebalance_experts(
        w[0], topo["num_replicas"], topo["num_groups"], topo["num_nodes"], topo["num_gpus"], mode="exact",
        time_limit=0.0)


def _h(*parts: Any) -> str:
    d = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            d.update(str(p.dtype).encode() + str(p.shape).encode())
            d.update(np.ascontiguousarray(p).tobytes())
        elif hasattr(p, "numpy"):
            _ = p.numpy()
            d.update(str(_.dtype).encode() + str(_.shape).encode() + _.tobytes())
        else:
            d.update(repr(p).encode())
        d.update(b"|")
    return d.hexdigest()[:16]


def fingerprint(out: Any) -> dict[str, str]:
    """Per field a short hash of one call's output (wall-clock time left out)."""
    if isinstance(out, tuple):                      # rebalance_experts
        return {"maps": _h(*out)}
    fp = {
        "plan": _h(out.plan.phy2log),
        "max_load": _h(out.max_load, out.mean_load),
        "lower_bound": _h(out.lower_bound, out.gap),
        "status": _h(out.status),
        "events": _h(out.events),
        "figures": _h(out.balancedness, out.slot_balancedness, out.window_balancedness, out.off_node_share,
                      out.policy, out.objective, out.tolerance),
        "bounds": _h(out.bounds.lower_bound, out.bounds.global_bound, out.bounds.node_exact,
                     *[(k, v) for k, v in sorted(out.bounds.components.items())]),
        "conditional": _h(out.conditional_bound),
    }
    meta = dict(out.plan.metadata or {})
    meta.pop("created", None)
    fp["metadata"] = _h(json.dumps(meta, sort_keys=True, default=str))
    if out.migration is not None:
        m = out.migration
        fp["migration"] = _h(m.moves, m.cost, m.transfers, m.bytes, m.baseline_moves, m.baseline_cost,
                             m.baseline_balancedness, m.cap, m.source, m.baseline_phy2log)
    return fp


def compute(only: str | None = None) -> dict[str, dict[str, str]]:
    return {name: fingerprint(fn()) for name, fn in sorted(_cases().items()) if only is None or only in name}


def main(argv: list[str]) -> int:
    got = compute(None if len(argv) < 2 or argv[1].startswith("-") else argv[1])
    if "--write" in argv:
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(got)} cases to {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())
    bad = [n for n in got if want.get(n) != got[n]]
    for n in bad:
        diff = [k for k in got[n] if want.get(n, {}).get(k) != got[n][k]]
        print(f"DIFFERS {n}: {', '.join(diff)}")
    print(f"{len(got) - len(bad)} of {len(got)} cases identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
