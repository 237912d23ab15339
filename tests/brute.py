"""Brute-force optimum of tiny EPLB instances (for tests only)."""

import numpy as np

from heuristics import equal_partitions


def compositions(total, parts):
    """All tuples of `parts` ints >= 1 summing to `total`."""
    if parts == 1:
        if total >= 1:
            yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in compositions(total - first, parts - 1):
            yield (first,) + rest


def best_packing(w, counts, gpus, k):
    """Min over placements of the max GPU load, for fixed counts (exhaustive)."""
    per = [wi / ci for wi, ci in zip(w, counts)]
    E = len(w)

    best = np.inf
    loads = [0.0] * gpus
    space = [k] * gpus

    def place(e, left):
        nonlocal best
        if e == E:
            best = min(best, max(loads))
            return
        if left == 0:
            place(e + 1, counts[e + 1] if e + 1 < E else 0)
            return
        if max(loads) >= best:
            return
        # Put one replica of e on some GPU; untouched GPUs are interchangeable, so
        # only the first of them is tried.
        seen_empty = False
        for g in range(gpus):
            if space[g] == 0:
                continue
            if loads[g] == 0 and space[g] == k:
                if seen_empty:
                    continue
                seen_empty = True
            space[g] -= 1
            loads[g] += per[e]
            place(e, left - 1)
            loads[g] -= per[e]
            space[g] += 1

    place(0, counts[0])
    return best


def brute_force_optimum(weight, num_replicas, num_gpus, num_groups=1, num_nodes=1, hierarchical=False):
    """``[L]`` optimal max GPU load of each layer over all plans of the policy."""
    w = np.asarray(weight, dtype=np.float64)
    L, E = w.shape
    k = num_replicas // num_gpus
    out = np.empty(L)
    for l in range(L):
        if not hierarchical or num_nodes == 1:
            out[l] = min(best_packing(tuple(w[l]), c, num_gpus, k) for c in compositions(num_replicas, E))
            continue
        gs = E // num_groups
        rn, gpn = num_replicas // num_nodes, num_gpus // num_nodes
        best = np.inf
        for part in equal_partitions(num_groups, num_nodes):
            worst = 0.0
            for node in range(num_nodes):
                experts = [g * gs + i for g in np.flatnonzero(part == node) for i in range(gs)]
                sub = tuple(w[l, experts])
                worst = max(
                    worst, min(best_packing(sub, c, gpn, k) for c in compositions(rn, len(experts)))
                )
            best = min(best, worst)
        out[l] = best
    return out
