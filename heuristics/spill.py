"""Locality-aware spill: between the hierarchical and the global policy.

Every expert keeps one replica (its *primary*) on its group's home node; its other
replicas may go to any node.  Load served by a replica outside the home node costs
``cross_node_cost`` per unit (a proxy for inter-node traffic under group-limited
routing).  Per layer the search minimises, at node level,

    max_n load[n] / P  +  cross_node_cost * (load served off-node) / G

(``P`` GPUs per node, ``G`` in all: both terms are per-GPU loads), then packs every
node's replicas onto its GPUs (:func:`heuristics.pipeline.pack_rows`).

The node-level search starts from the hierarchical plan's replica counts and node
contents (nothing off-node) and applies, while one lowers the objective, the best of

* a **swap** of a replica on the heaviest node with one on another node;
* a **retarget**: a slot on any node given from an expert with spare replicas to
  another expert (counts change, so every replica of both changes load).

then polishes at GPU level (swaps between any two GPUs and retargets on the busiest
GPUs, same objective with the GPU max in place of the node term).  A primary never
leaves home.  ``cross_node_cost = inf`` keeps the hierarchical plan; ``0`` trades
locality away freely.

Both searches and the primaries repair are compiled kernels (:mod:`heuristics.compile`);
their sums run in numpy's pairwise order, and GPUs of equal load are ranked by index.
``tests/test_kernels_spill.py`` pins every move choice against a plain reference.
"""

from __future__ import annotations

import time

import numpy as np

from .apportion import unit_scale
from .compile import kernel, warmer
from .pipeline import pack_rows

__all__ = ["off_node_load", "spill_refine"]


def off_node_load(weight: np.ndarray, phy2log: np.ndarray, num_nodes: int, home: np.ndarray) -> np.ndarray:
    """``[L]`` load served by replicas outside their expert's home node.

    Args:
        weight: ``[L, E]``; phy2log: ``[L, R]`` (node ``n`` holds slots ``n*R/N ..``);
        home: ``[L, E]`` home node of every expert.
    """
    L, E = weight.shape
    R = phy2log.shape[1]
    node_of_slot = np.arange(R) // (R // num_nodes)
    cnt = np.bincount((phy2log + (np.arange(L) * E)[:, None]).ravel(), minlength=L * E).reshape(L, E)
    per = np.take_along_axis(weight / np.maximum(cnt, 1), phy2log, axis=1)
    away = node_of_slot[None, :] != np.take_along_axis(home, phy2log, axis=1)
    return (per * away).sum(axis=1)


# ---------------------------------------------------------------------------------------
# Node level: x [E, N] replicas of each expert per node; away [E, N] 1 where n != home.
# Objective  max(max_n loads[n] / P, max_e v[e]) + lam * off / G  (a GPU carries at least
# the heaviest replica: without that term the search balances nodes with replicas no GPU
# can split).  Every sum runs in a fixed sequential order.


@kernel
def _block_sum(a, lo, n):
    """numpy's pairwise sum of ``a[lo:lo + n]`` for ``n <= 128``: sequential below 8,
    else eight partial sums combined as a tree."""
    if n < 8:
        s = 0.0
        for i in range(lo, lo + n):
            s += a[i]
        return s
    r = a[lo:lo + 8].copy()
    i = 8
    while i < n - n % 8:
        for j in range(8):
            r[j] += a[lo + i + j]
        i += 8
    s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        s += a[lo + i]
        i += 1
    return s


@kernel
def _pairwise(a, lo, n):
    """Sum of ``a[lo:lo + n]`` in numpy's pairwise order (above 128: the halves, the
    first a multiple of 8, summed apart), so a sum numpy took here rounds as it did.
    No recursion (a cached kernel calling a recursive one may not load): a stack of
    halves, the left one's sum kept until the right one's is done."""
    if n <= 128:
        return _block_sum(a, lo, n)
    los, ns, stage, left = np.empty(64, np.int64), np.empty(64, np.int64), np.zeros(64, np.int64), np.empty(64)
    los[0], ns[0], stage[0] = lo, n, 0
    sp, val, done = 1, 0.0, False
    while sp > 0:
        t = sp - 1
        if done and stage[t] == 1:             # left half summed: now the right half
            left[t] = val
            done = False
            h = ns[t] // 2 - (ns[t] // 2) % 8
            stage[t] = 2
            los[sp], ns[sp], stage[sp] = los[t] + h, ns[t] - h, 0
            sp += 1
        elif done:                             # both halves summed
            val = left[t] + val
            sp -= 1
        elif ns[t] <= 128:
            val = _block_sum(a, los[t], ns[t])
            done = True
            sp -= 1
        else:                                  # split: the left half first
            stage[t] = 1
            los[sp], ns[sp], stage[sp] = los[t], ns[t] // 2 - (ns[t] // 2) % 8, 0
            sp += 1
    return val


@kernel
def _node_refresh(w, x, away, c, v, loads):
    """Counts, per-replica loads and node loads of ``x``; returns the off-node load."""
    E, N = x.shape
    loads[:] = 0.0
    per = np.empty(E)
    for e in range(E):
        s = 0
        a = 0
        for n in range(N):
            s += x[e, n]
            a += x[e, n] * away[e, n]
        c[e] = s
        v[e] = w[e] / max(s, 1)
        for n in range(N):
            loads[n] += v[e] * x[e, n]
        per[e] = v[e] * a
    return _pairwise(per, 0, E)


@kernel
def _movable(x, away, e, n):
    """Whether a replica of ``e`` may leave node ``n`` (it has one; not its last home one)."""
    return x[e, n] >= 1 and not (away[e, n] == 0 and x[e, n] == 1)


@kernel
def _node_swaps(x, away, v, loads, off, vmax, h, P, G, lam, cap, best):
    """Swaps of a replica ``e`` on the heaviest node ``h`` with one ``f`` on ``m``, in
    the order (m, e, f); ``best`` ``[val, kind, e, h, f, m]`` keeps the first lowest."""
    E, N = x.shape
    for m in range(N):
        if m == h:
            continue
        for e in range(E):
            if not _movable(x, away, e, h) or x[e, m] >= cap:
                continue
            for f in range(E):
                if f == e or not _movable(x, away, f, m) or x[f, h] >= cap:
                    continue
                d = v[f] - v[e]
                lh = loads[h] + d
                lm = loads[m] - d
                top = max(lh, lm)
                for n in range(N):
                    if n != h and n != m and loads[n] > top:
                        top = loads[n]
                d_off = v[e] * (away[e, m] - away[e, h]) + v[f] * (away[f, h] - away[f, m])
                val = max(top / P, vmax) + lam * (off + d_off) / G
                if val < best[0]:
                    best[0], best[1], best[2], best[3], best[4], best[5] = val, 0.0, e, h, f, m


@kernel
def _top3(v):
    """Indices of the three largest values of ``v`` (first index among equals; ``-1``
    where ``v`` has fewer than three)."""
    t = np.full(3, -1, dtype=np.int64)
    for e in range(v.size):
        for i in range(3):
            if t[i] < 0 or v[e] > v[t[i]]:
                for j in range(2, i, -1):
                    t[j] = t[j - 1]
                t[i] = e
                break
    return t


@kernel
def _node_retargets(w, x, away, c, v, loads, off, P, G, lam, cap, best):
    """Retargets: a slot of node ``n`` goes from ``f`` (``c >= 2``, may leave ``n``) to
    ``e``, in the order (n, f, e); ``best`` ``[val, kind, f, e, n, -]``."""
    E, N = x.shape
    t = _top3(v)
    new = np.empty(N)
    offc = np.zeros(E, dtype=np.int64)
    for e in range(E):
        for q in range(N):
            offc[e] += x[e, q] * away[e, q]
    for n in range(N):
        for f in range(E):
            if c[f] < 2 or not _movable(x, away, f, n):
                continue
            vf2 = w[f] / (c[f] - 1)
            df = vf2 - v[f]
            of = vf2 * (offc[f] - away[f, n]) - v[f] * offc[f]
            for e in range(E):
                if e == f or x[e, n] >= cap:
                    continue
                ve2 = w[e] / (c[e] + 1)
                de = ve2 - v[e]
                top = -np.inf
                for q in range(N):
                    y = loads[q] + x[f, q] * df + x[e, q] * de
                    if q == n:
                        y += ve2 - vf2
                    top = max(top, y)
                # heaviest replica after the retarget: the top of the others, vf2 and ve2
                other = -np.inf                 # (none when f and e are all there is)
                for i in range(3):
                    if t[i] >= 0 and t[i] != f and t[i] != e:
                        other = v[t[i]]
                        break
                vmax = max(other, max(vf2, ve2))
                d_off = of + (ve2 * (offc[e] + away[e, n]) - v[e] * offc[e])
                val = max(top / P, vmax) + lam * (off + d_off) / G
                if val < best[0]:
                    best[0], best[1], best[2], best[3], best[4], best[5] = val, 1.0, f, e, n, 0


@kernel
def _node_step(w, x, away, c, v, loads, P, G, lam, cap, best):
    """One step's choice on ``x``: refreshes ``c``, ``v``, ``loads`` and fills ``best``
    (``best[0]`` the objective after the best move, ``inf`` if none); returns the
    objective now."""
    off = _node_refresh(w, x, away, c, v, loads)
    h = int(np.argmax(loads))
    vmax = v.max()
    best[0] = np.inf
    _node_swaps(x, away, v, loads, off, vmax, h, P, G, lam, cap, best)
    _node_retargets(w, x, away, c, v, loads, off, P, G, lam, cap, best)
    return max(loads[h] / P, vmax) + lam * off / G


@kernel
def _node_search(w, x, away, P, G, lam, cap, max_steps):
    """Apply the best improving swap or retarget (``x`` in place) until none is left or
    ``max_steps``; returns the per-replica loads ``v [E]`` of the final ``x``."""
    E, N = x.shape
    c = np.empty(E, dtype=np.int64)
    v = np.empty(E)
    loads = np.empty(N)
    best = np.empty(6)
    for _ in range(max_steps):
        f0 = _node_step(w, x, away, c, v, loads, P, G, lam, cap, best)
        if not best[0] < f0 - 1e-12 * max(f0, 1e-300):
            break
        if best[1] == 0.0:
            e, h, f, m = int(best[2]), int(best[3]), int(best[4]), int(best[5])
            x[e, h] -= 1
            x[e, m] += 1
            x[f, m] -= 1
            x[f, h] += 1
        else:
            f, e, n = int(best[2]), int(best[3]), int(best[4])
            x[f, n] -= 1
            x[e, n] += 1
    _node_refresh(w, x, away, c, v, loads)
    return v


@kernel
def _primaries_home(row, home, N):
    """Swap replicas so that every expert has one on its home node: an expert with
    none there trades places with a replica on its home node that is away from its own
    home or a spare home replica (one always exists: a node has more slots than home
    experts).  Loads per replica do not change."""
    row = row.copy()
    R = row.size
    rn = R // N
    counts = np.zeros(home.size, dtype=np.int64)
    for e in np.argsort(home, kind="mergesort"):
        h = home[e]
        lo = h * rn
        there = False
        for s in range(lo, lo + rn):
            there = there or row[s] == e
        if there:
            continue
        counts[:] = 0
        for s in range(lo, lo + rn):
            counts[row[s]] += 1
        s = -1
        for t in range(lo, lo + rn):             # a replica away from its own home
            if home[row[t]] != h:
                s = t
                break
        if s < 0:
            for t in range(lo, lo + rn):         # else a spare home replica
                if counts[row[t]] >= 2:
                    s = t
                    break
        for src in range(R):
            if row[src] == e and src // rn != h:
                row[s], row[src] = row[src], row[s]
                break
    return row


# ---------------------------------------------------------------------------------------
# GPU level: S [G, k] experts of the slots, M [G, E] replicas per GPU, c [E] counts,
# away [G, E] 1 where GPU g's node is not e's home, hc/offc [E] replicas at home / away.
# Objective  max_g loads[g] + lam * off / G.  A step takes the lowest objective below
# f0 - eps (``bd``); failing that, an equal objective with the lowest sum of squared
# loads (``bf``), so the next step may find a way down.  bd/bf: [key, kind, x1, x2, x3].


@kernel
def _gpu_loads(w, S, c, v, loads):
    """Per-replica loads ``v`` and GPU loads from the counts ``c``."""
    G, k = S.shape
    for e in range(w.size):
        v[e] = w[e] / max(c[e], 1)
    row = np.empty(k)
    for g in range(G):
        for i in range(k):
            row[i] = v[S[g, i]]
        loads[g] = _pairwise(row, 0, k)


@kernel
def _gpu_counts(S, away, hc, offc, holders, hn):
    """Replicas at home / away per expert and every expert's holders
    (``holders[e, :hn[e]]``, ascending)."""
    G, k = S.shape
    hc[:] = 0
    offc[:] = 0
    hn[:] = 0
    for g in range(G):
        for i in range(k):
            e = S[g, i]
            if away[g, e]:
                offc[e] += 1
            else:
                hc[e] += 1
            if hn[e] == 0 or holders[e, hn[e] - 1] != g:
                holders[e, hn[e]] = g
                hn[e] += 1


@kernel
def _gpu_state(w, row, node, home):
    """``(S, M, c, v, loads, away, hc, offc, holders, hn)`` of placement ``row``."""
    G = node.size
    E = w.size
    k = row.size // G
    S = row.reshape(G, k).copy()
    away = np.empty((G, E), dtype=np.int64)
    M = np.zeros((G, E), dtype=np.int64)
    c = np.zeros(E, dtype=np.int64)
    for g in range(G):
        for e in range(E):
            away[g, e] = 1 if node[g] != home[e] else 0
        for i in range(k):
            M[g, S[g, i]] += 1
            c[S[g, i]] += 1
    v, loads = np.empty(E), np.empty(G)
    _gpu_loads(w, S, c, v, loads)
    hc, offc, hn = np.empty(E, np.int64), np.empty(E, np.int64), np.empty(E, np.int64)
    holders = np.empty((E, G), dtype=np.int64)
    _gpu_counts(S, away, hc, offc, holders, hn)
    return S, M, c, v, loads, away, hc, offc, holders, hn


@kernel
def _gpu_swaps(S, M, v, loads, away, hc, g, off0, sq0, f0, eps, lam, dup, bd, bf):
    """Swaps of a slot ``i`` of ``g`` with slot ``j`` of any ``h``, order (i, h, j)."""
    G, k = S.shape
    i1, v1, v2 = -1, -np.inf, -np.inf           # the two heaviest GPUs other than g
    for q in range(G):
        if q != g and loads[q] > v1:
            i1, v1 = q, loads[q]
    for q in range(G):
        if q != g and q != i1 and loads[q] > v2:
            v2 = loads[q]
    for i in range(k):
        a = S[g, i]
        for h in range(G):
            if h == g:
                continue
            ex = v2 if h == i1 else v1
            for j in range(k):
                b = S[h, j]
                if a == b or (not dup and (M[h, a] != 0 or M[g, b] != 0)):
                    continue
                if away[g, a] == 0 and hc[a] == 1 and away[h, a] == 1:
                    continue                     # a primary leaves home
                if away[h, b] == 0 and hc[b] == 1 and away[g, b] == 1:
                    continue
                d = v[b] - v[a]
                lg = loads[g] + d
                lh = loads[h] - d
                d_off = v[a] * (away[h, a] - away[g, a]) + v[b] * (away[g, b] - away[h, b])
                val = max(max(lg, lh), ex) + lam * (off0 + d_off) / G
                if val < f0 - eps:
                    if val < bd[0]:
                        bd[0], bd[1], bd[2], bd[3], bd[4], bd[5] = val, 0.0, i, h, j, g
                elif val <= f0 + eps and bd[0] == np.inf:
                    sq = sq0 - loads[g] ** 2 - loads[h] ** 2 + lg ** 2 + lh ** 2
                    if sq < sq0 * (1 - 1e-12) and sq < bf[0]:
                        bf[0], bf[1], bf[2], bf[3], bf[4], bf[5] = sq, 0.0, i, h, j, g


@kernel
def _gpu_retargets(w, S, M, c, v, loads, away, hc, offc, holders, hn, order, g, off0, sq0, f0, eps, lam,
                   dup, bd, bf):
    """Retargets of a slot ``i`` of ``g`` (expert ``a``, ``c >= 2``) to any expert
    ``b``, order (i, b).  Only the GPUs holding ``a`` or ``b`` change load."""
    G, k = S.shape
    E = w.size
    qs, ys, sq = np.empty(2 * G, dtype=np.int64), np.empty(2 * G), np.empty(G)
    for i in range(k):
        a = S[g, i]
        ca = c[a]
        if ca < 2 or (away[g, a] == 0 and hc[a] == 1):
            continue
        va2 = w[a] / max(ca - 1, 1)
        da = va2 - v[a]
        oa = w[a] * (offc[a] - away[g, a]) / max(ca - 1, 1) - w[a] * offc[a] / ca
        for b in range(E):
            if b == a or (not dup and M[g, b] != 0):
                continue
            cb = c[b]
            vb2 = w[b] / (cb + 1)
            db = vb2 - v[b]
            top = -np.inf
            na = 0
            for t in range(hn[a] + hn[b]):
                q = holders[a, t] if t < hn[a] else holders[b, t - hn[a]]
                if t >= hn[a] and M[q, a] != 0:
                    continue                     # already counted with a
                y = loads[q] + M[q, a] * da + M[q, b] * db
                if q == g:
                    y += vb2 - va2
                top = max(top, y)
                qs[na], ys[na] = q, y
                na += 1
            for t in range(G):                  # the heaviest GPU that does not change
                q = order[t]
                if M[q, a] == 0 and M[q, b] == 0:
                    top = max(top, loads[q])
                    break
            d_off = oa + (w[b] * (offc[b] + away[g, b]) / (cb + 1) - w[b] * offc[b] / max(cb, 1))
            val = top + lam * (off0 + d_off) / G
            if val < f0 - eps:
                if val < bd[0]:
                    bd[0], bd[1], bd[2], bd[3], bd[4], bd[5] = val, 1.0, i, b, 0, g
            elif val <= f0 + eps and bd[0] == np.inf:
                for q in range(G):
                    sq[q] = loads[q] ** 2
                for t in range(na):
                    sq[qs[t]] = ys[t] ** 2
                s2 = _pairwise(sq, 0, G)
                if s2 < sq0 * (1 - 1e-12) and s2 < bf[0]:
                    bf[0], bf[1], bf[2], bf[3], bf[4], bf[5] = s2, 1.0, i, b, 0, g


@kernel
def _gpu_apply(S, M, c, loads, v, best):
    """Apply the step in ``best``; returns whether counts changed (loads to recompute)."""
    g, i = int(best[5]), int(best[2])
    a = S[g, i]
    if best[1] == 0.0:
        h, j = int(best[3]), int(best[4])
        b = S[h, j]
        S[g, i], S[h, j] = b, a
        M[g, a] -= 1
        M[g, b] += 1
        M[h, b] -= 1
        M[h, a] += 1
        d = v[b] - v[a]
        loads[g] += d
        loads[h] -= d
        return False
    b = int(best[3])
    S[g, i] = b
    M[g, a] -= 1
    M[g, b] += 1
    c[a] -= 1
    c[b] += 1
    return True


@kernel
def _gpu_step(w, S, M, c, v, loads, away, hc, offc, holders, hn, lam, dup, bd, bf):
    """One step's choice from the current state: the busiest GPUs in turn (at most
    four, stopping at the first with an improving move); returns the objective now."""
    G = loads.size
    _gpu_counts(S, away, hc, offc, holders, hn)
    off0 = _pairwise(v * offc, 0, w.size)
    f0 = loads.max() + lam * off0 / G
    eps = 1e-12 * max(f0, 1e-300)
    sq0 = _pairwise(loads ** 2, 0, G)
    order = np.argsort(-loads, kind="mergesort")
    bd[0], bf[0] = np.inf, np.inf
    for t in range(min(4, G)):
        g = order[t]
        _gpu_swaps(S, M, v, loads, away, hc, g, off0, sq0, f0, eps, lam, dup, bd, bf)
        _gpu_retargets(w, S, M, c, v, loads, away, hc, offc, holders, hn, order, g, off0, sq0, f0, eps,
                       lam, dup, bd, bf)
        if bd[0] < np.inf:
            break
    return f0


@kernel
def _polish_kernel(w, row, node, home, lam, dup, max_steps):
    """GPU-level search from ``row`` ``[R]``; returns ``(objective, placement [R])``.
    GPU loads follow a swap incrementally and are recomputed after a retarget."""
    S, M, c, v, loads, away, hc, offc, holders, hn = _gpu_state(w, row, node, home)
    bd, bf = np.empty(6), np.empty(6)
    f0 = 0.0
    for _ in range(max_steps):
        f0 = _gpu_step(w, S, M, c, v, loads, away, hc, offc, holders, hn, lam, dup, bd, bf)
        if bd[0] < np.inf:
            changed = _gpu_apply(S, M, c, loads, v, bd)
        elif bf[0] < np.inf:
            changed = _gpu_apply(S, M, c, loads, v, bf)
        else:
            return f0, S.ravel().copy()
        if changed:
            _gpu_loads(w, S, c, v, loads)
    _gpu_counts(S, away, hc, offc, holders, hn)
    off0 = _pairwise(v * offc, 0, w.size)
    return loads.max() + lam * off0 / node.size, S.ravel().copy()


def spill_refine(
    weight: np.ndarray,
    phy2log: np.ndarray,
    home: np.ndarray,
    num_gpus: int,
    num_nodes: int,
    cross_node_cost: float,
    max_steps: int = 2000,
    allow_duplicates: bool = True,
    deadline: float | None = None,
    global_plan: np.ndarray | None = None,
) -> np.ndarray:
    """Spill replicas off their home node where it pays (see module docs).

    Args:
        weight: ``[L, E]`` loads.
        phy2log: ``[L, R]`` start, a hierarchical plan (every replica on its home node).
        home: ``[L, E]`` home node of every expert.
        num_gpus, num_nodes: the cluster.
        cross_node_cost: cost per unit of load served off-node (``inf``: nothing moves).
        max_steps: improving node-level steps per layer at most.
        deadline: ``time.perf_counter()`` value after which layers are left as they are.
        global_plan: optional ``[L, R]`` global-policy plan: a second start per layer
            (its replicas swapped so every primary is home), kept where it ends with
            the lower objective; it helps where ``cross_node_cost`` is small.

    Returns:
        ``[L, R]`` placement (node ``n`` holds slots ``n*R/N ..``); every expert keeps a
        replica on its home node.  Layers where nothing spills keep their start plan.
    """
    out = np.array(phy2log, dtype=np.int64, copy=True)
    if not np.isfinite(cross_node_cost):
        return out
    # Per-layer power-of-two scaling: the objective is linear in the loads, so the
    # search is unchanged, and its sums of squares cannot overflow.
    weight = unit_scale(weight)
    home = np.ascontiguousarray(home, dtype=np.int64)
    L, E = weight.shape
    R = out.shape[1]
    N, G = num_nodes, num_gpus
    P, rn = G // N, R // N
    lam = float(cross_node_cost)
    cap = np.inf if allow_duplicates else float(P)
    node = np.arange(G, dtype=np.int64) // P
    away = (np.arange(N)[None, None, :] != home[:, :, None]).astype(np.int64)     # [L, E, N]
    for l in range(L):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        x0 = np.zeros((E, N), dtype=np.int64)
        np.add.at(x0, (out[l], np.arange(R) // rn), 1)
        x = x0.copy()
        v = _node_search(weight[l], x, away[l], P, G, lam, cap, max_steps)
        if np.array_equal(x, x0) and global_plan is None:
            continue
        row = np.empty(R, dtype=np.int64)
        for n in range(N):
            items = np.flatnonzero(x[:, n])
            cnt = x[items, n]
            local = pack_rows((v[items] * cnt)[None, :], cnt[None, :], P,
                              allow_duplicates=allow_duplicates)[0]             # [P, k] indices
            row[n * rn:(n + 1) * rn] = items[local].ravel()
        # GPU-level polish: node balance does not make the replicas pack well.
        starts = [row] + ([] if global_plan is None else [_primaries_home(
            np.ascontiguousarray(global_plan[l], dtype=np.int64), home[l], N)])
        results = [_polish(weight[l], start, node, home[l], lam, allow_duplicates, max_steps) for start in starts]
        best = min(results, key=lambda r: r[0])
        if np.isfinite(best[0]):           # else no start kept the rules: the start plan stays
            out[l] = best[1]
    return out


def _polish(w, row, node, home, lam, allow_duplicates, max_steps):
    """GPU-level search from ``row``; ``(objective, placement)``."""
    G = node.size
    if not allow_duplicates and (np.bincount((np.arange(row.size) // (row.size // G)) * w.size + row) > 1).any():
        return np.inf, row             # a start that breaks the rule is not used
    return _polish_kernel(w, row, node, home, lam, allow_duplicates, max_steps)


@warmer
def _warm() -> None:
    w = np.array([[4.0, 3.0, 2.0, 1.0]])
    spill_refine(w, np.array([[0, 1, 0, 2, 3, 3]]), np.array([[0, 0, 1, 1]]), 2, 2, 0.5,
                 global_plan=np.array([[0, 3, 1, 0, 2, 1]]))
