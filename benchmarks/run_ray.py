"""Ray scale-out benchmark: same plan as local for ``deterministic=True``, wall time, and
Ray's overhead per sub-problem.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.run_ray [--time-limit 20] [--cpus 2]

On DeepSeek-V3 prefill-shaped loads (58 x 256, seed 0), global policy, 320 replicas on
64 GPUs (the configuration where exact mode uses its whole budget):

* ``deterministic=True`` locally and with ``executor="ray"`` on a local Ray instance of
  ``--cpus`` CPUs: wall time each, and whether the plans are identical;
* the wall-clock default (``deterministic=False``) locally and on Ray: wall and gaps;
* overhead per sub-problem: one Ray task per layer (``layers_per_task=1``), each with a
  0.3 s deterministic budget, and with a zero budget (tasks that return almost at once):
  ``(wall x CPUs - time inside the tasks) / tasks``, the CPU time the pool spends on
  anything but the sub-problems (shipping, scheduling, waking workers) per sub-problem.

Writes ``ray.json`` next to this file and regenerates ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import eplb_opt
from eplb_opt.workloads import generate

PRESET = "deepseek-v3-prefill"
TOPO = dict(num_replicas=320, num_gpus=64, policy="global")


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = ap.parse_args(argv)
    import ray

    from eplb_opt import distributed

    here = Path(__file__).resolve().parent
    w = generate(PRESET, windows=1, seed=0)[0]
    L = w.shape[0]
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t
    kw = dict(TOPO, mode="exact", time_limit=args.time_limit, seed=1)
    print("warm-up ...", file=sys.stderr)
    eplb_opt.solve(w[:2], **dict(kw, time_limit=1.0), executor="ray")     # workers import OR-Tools

    print("deterministic, local and Ray ...", file=sys.stderr)
    loc, t_loc = _timed(lambda: eplb_opt.solve(w, **kw, deterministic=True))
    rem, t_rem = _timed(lambda: eplb_opt.solve(w, **kw, deterministic=True, executor="ray"))
    same = bool(np.array_equal(loc.plan.phy2log.numpy(), rem.plan.phy2log.numpy()))
    print("wall-clock default, local and Ray ...", file=sys.stderr)
    dloc, t_dloc = _timed(lambda: eplb_opt.solve(w, **kw))
    drem, t_drem = _timed(lambda: eplb_opt.solve(w, **kw, executor="ray"))

    print("overhead per sub-problem ...", file=sys.stderr)
    h = eplb_opt.solve(w, **TOPO)
    p = h.plan.phy2log.numpy()
    common = dict(num_gpus=64, num_nodes=1, num_groups=1, seed=1, allow_duplicates=True)
    overhead = {}
    for name, tol, budget in (("layer with 0.3 s of work", 0.0, 0.3 * L), ("layer with a zero budget", 0.0, 0.0)):
        # tolerance 0 ships every layer; budget 0 leaves each task almost nothing to do.
        (_, stats), wall = _timed(lambda: distributed.refine(
            w, p, lower_bound=h.lower_bound, tolerance=tol, deterministic=True,
            seconds=1e9, workers=1, layers_per_task=1, budget=budget, **common))
        n = len(stats.tasks)
        busy = sum(x.compute for x in stats.tasks)
        overhead[name] = {
            "tasks": n,
            "wall_s": wall,
            "compute_median_ms": 1e3 * statistics.median(x.compute for x in stats.tasks),
            # CPU time the pool spent on anything but the sub-problems, per sub-problem.
            "overhead_ms": 1e3 * (wall * min(args.cpus, n) - busy) / n,
        }
    ray.shutdown()

    def gaps(r) -> dict:
        return {"gap_max": float(r.gap.max()), "gap_mean": float(r.gap.mean()), "balancedness": r.balancedness}

    data = {
        "command": "python -m benchmarks.run_ray " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "preset": PRESET, "layers": L, "topology": TOPO, "time_limit": args.time_limit, "ray_cpus": args.cpus,
        "ray_startup_s": startup,
        "deterministic": {"identical": same, "local_s": t_loc, "ray_s": t_rem, "local": gaps(loc), "ray": gaps(rem)},
        "default": {"local_s": t_dloc, "ray_s": t_drem, "local": gaps(dloc), "ray": gaps(drem)},
        "overhead": overhead,
    }
    (here / "ray.json").write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1))
    from .report import write

    write(here)
    return 0


if __name__ == "__main__":
    sys.exit(main())
