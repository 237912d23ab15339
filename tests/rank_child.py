"""One "rank" of the rank-consistency test (tests/test_rank_consistency.py).

Run as ``python tests/rank_child.py PATH`` with settings in the environment:
``RANK_TORCH_THREADS`` (``torch.set_num_threads``), ``RANK_DETERMINISTIC`` (``1``/``0``),
``RANK_TIME_LIMIT``, ``RANK_PATHS`` (comma list of ``solve``, ``vllm``, ``sglang``),
``RANK_REPEAT`` (calls of ``solve``), plus whatever thread / affinity settings the parent
gives it (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``taskset``).  Loads ``[L, E]`` from
``PATH`` (a .npy file) and prints one JSON line: a SHA-256 per path over the plan's bytes
(and, for ``solve``, its lower bounds and statuses).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import torch


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


def main() -> None:
    if os.environ.get("RANK_AFFINITY"):       # where taskset is missing
        os.sched_setaffinity(0, {int(c) for c in os.environ["RANK_AFFINITY"].split(",")})
    torch.set_num_threads(int(os.environ.get("RANK_TORCH_THREADS", "1")))
    import eplb_opt

    eplb_opt.warm_up()   # as a server does at start-up (OR-Tools loaded before the first plan)
    weight = np.load(sys.argv[1])
    topo = json.loads(os.environ["RANK_TOPOLOGY"])
    limit = float(os.environ.get("RANK_TIME_LIMIT", "1"))
    det = os.environ.get("RANK_DETERMINISTIC", "1") == "1"
    out: dict[str, object] = {"affinity": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
    for path in os.environ.get("RANK_PATHS", "solve").split(","):
        if path == "solve":
            hashes = []
            for _ in range(int(os.environ.get("RANK_REPEAT", "1"))):
                r = eplb_opt.solve(weight, **topo, mode="exact", time_limit=limit, deterministic=det)
                hashes.append(digest(*r.plan.to_numpy(), r.lower_bound, np.array(r.status)))
            out["solve"] = hashes
        elif path == "vllm":
            from eplb_opt.integrations.vllm import EplbOptPolicy

            EplbOptPolicy.configure(mode="exact", time_limit=limit)
            p2l = EplbOptPolicy.rebalance_experts(
                torch.from_numpy(weight), topo["num_replicas"], topo["num_groups"], topo["num_nodes"],
                topo["num_gpus"],
            )
            out["vllm"] = [digest(p2l.numpy())]
        elif path == "sglang":
            from eplb_opt.integrations.sglang import rebalance_experts

            # SGLang hands over the step axis: [steps, L, E] (summed inside).
            frac = np.random.default_rng(0).dirichlet(np.ones(16), size=weight.shape)   # [L, E, 16]
            steps = np.moveaxis(weight[..., None] * frac, -1, 0)
            maps = rebalance_experts(
                torch.from_numpy(steps), topo["num_replicas"], topo["num_replicas"] // topo["num_gpus"],
                topo["num_groups"], topo["num_nodes"], mode="exact", time_limit=limit,
            )
            out["sglang"] = [digest(*(m.numpy() for m in maps))]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
