"""Wall time of a deterministic budget (issue 13): what ``time_limit`` costs on this
machine when it is a deterministic budget, as in the vLLM and SGLang integrations.

Usage (from the repository root; a few minutes)::

    .venv/bin/python -m benchmarks.run_deterministic_wall [--budgets 0.5 1 2 10] [--repeats 3]

For every model preset except ``scale-1024`` (seed 0, window 0, all layers, its own
topology), ``solve(mode="exact", deterministic=True, time_limit=T, workers=1)`` after
``eplb_opt.warm_up()``: the median wall time over ``--repeats`` calls (every call gives
the same plan: checked), and the worst gap reached.  A deterministic budget is work, not
seconds: its wall time depends on the layer count and on the machine.  Writes
``deterministic_wall.json`` next to this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import eplb_opt
from eplb_opt.workloads import PRESETS, example_weight


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 2.0, 10.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=here / "deterministic_wall.json")
    args = ap.parse_args(argv)
    eplb_opt.warm_up()
    rows = []
    for name, preset in PRESETS.items():
        if name == "scale-1024":
            continue
        w = example_weight(name, 0)
        topo = preset.topology()
        for T in args.budgets:
            walls, hashes = [], set()
            for _ in range(args.repeats):
                t = time.perf_counter()
                r = eplb_opt.solve(w, **topo, mode="exact", time_limit=T, deterministic=True, workers=1)
                walls.append(time.perf_counter() - t)
                hashes.add(hashlib.sha256(r.plan.phy2log.numpy().tobytes()).hexdigest())
            row = {"preset": name, "layers": int(w.shape[0]), "experts": int(w.shape[1]), "time_limit": T,
                   "median_wall_s": float(np.median(walls)), "walls_s": walls,
                   "identical_plans": len(hashes) == 1, "worst_gap": float(r.gap.max())}
            rows.append(row)
            print(f"{name:>20} L={w.shape[0]:3d} T={T:5.1f}: wall {row['median_wall_s']:6.2f} s "
                  f"(x{row['median_wall_s'] / T:.1f}), worst gap {100 * row['worst_gap']:.4f}%, "
                  f"identical {row['identical_plans']}", file=sys.stderr, flush=True)
    out = {"command": "python -m benchmarks.run_deterministic_wall " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "python": platform.python_version(), "eplb_opt": eplb_opt.__version__},
           "rows": rows}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
