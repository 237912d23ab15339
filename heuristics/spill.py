"""Locality-aware spill: between the hierarchical and the global policy.

Every expert keeps one replica (its *primary*) on its group's home node; its other
replicas may go to any node.  Load served by a replica outside the home node costs
``cross_node_cost`` per unit (a proxy for inter-node traffic under group-limited
routing).  Per layer the search minimises

    max_g load[g]  +  cross_node_cost * (load served off-node) / G

(``G`` GPUs: both terms are per-GPU loads), in three stages:

1. **Node level**, with ``max_n load[n] / P`` (and at least the heaviest replica) in
   place of the GPU max (``P`` GPUs per node).  Candidates (:data:`NODE_STARTS`): the
   hierarchical plan's split (nothing off-node), a **home-first LPT** (the global
   policy's replica counts, replicas by decreasing load each to the lightest GPU, an
   off-node GPU counted ``cross_node_cost`` times the replica heavier; primaries home)
   and that LPT's split after a local search applying, while one lowers the
   objective, the best of

   * a **swap** of a replica on the heaviest node with one on another node;
   * a **retarget**: a slot on any node given from an expert with spare replicas to
     another expert (counts change, so every replica of both changes load).

   The candidate lowest at node level is kept.
2. Every node's replicas are packed onto its GPUs (:func:`heuristics.packing.pack_sorted`,
   all layers in one call); a layer whose best split is the hierarchical plan's keeps
   that plan's packing.
3. A GPU-level **polish** (swaps between the busiest GPUs and any other, retargets on
   them; the lowest objective, else an equal one with a lower sum of squared loads;
   the two busiest GPUs in turn).
   Where nothing can spill (one node, or no spare replica) the layer is a plain
   packing problem, and the start plan, the LPT and the global plan (primaries swapped
   home) are polished too; the lowest wins.

A primary never leaves home.  ``cross_node_cost = inf`` keeps the hierarchical plan;
``0`` trades locality away freely.

The searches, the LPT and the primaries repair are compiled kernels
(:mod:`heuristics.compile`).  Both searches price only the moves that can lower the
objective (bounds from the heaviest node or GPU, the heaviest replica and the
off-node change skip the rest before their full price); GPUs of equal load are ranked
by index.  ``tests/test_kernels_spill.py`` pins every move choice and the LPT against
plain references.
"""

from __future__ import annotations

import time

import numpy as np

from .apportion import replica_counts, unit_scale
from .compile import kernel, warmer
from .packing import gather_rows, pack_sorted

__all__ = ["nothing_can_spill", "off_node_load", "spill_refine"]


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
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = lo + 8
    end = lo + n - n % 8
    while i < end:
        r0, r1, r2, r3 = r0 + a[i], r1 + a[i + 1], r2 + a[i + 2], r3 + a[i + 3]
        r4, r5, r6, r7 = r4 + a[i + 4], r5 + a[i + 5], r6 + a[i + 6], r7 + a[i + 7]
        i += 8
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < lo + n:
        s += a[i]
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
def _node_work(E, N):
    """Work space of a node search, made once and reused by its steps: ``(fw [6, E + 1]``
    float rows ``per, ve2, de, dh, dn, cy``; ``lw [2, N]`` ``low, lowh``; ``oe [N, E]``;
    ``iw [6, E + 1]`` int rows ``offc, onh, spilled, on, cand, mb`` (``mb``: the nodes
    each expert is in ``mov`` of, as bits); ``mov [N, E]``; ``nm [N]``;
    ``t [3]``; ``hq [3, N, E]`` rows ``hq[k, q, :nq[k, q]]`` the experts on node ``q``:
    all, those on ``h`` too, those not on ``h``; ``key [4, E]`` rows ``w, c, offc, v``:
    what each expert's ``per, ve2, de, oe`` were last computed from, NaN: never; ``pr
    [N E, 12]`` the retarget pairs of a step, :func:`_pair_moves`)."""
    return (np.empty((6, E + 1)), np.empty((2, N)), np.empty((N, E)), np.empty((6, E + 1), np.int64),
            np.empty((N, E), np.int64), np.empty(N, np.int64), np.empty(3, np.int64),
            np.empty((3, N, E), np.int64), np.empty((3, N), np.int64), np.full((4, E), np.nan),
            np.empty((N * E, 12)))


@kernel
def _node_state(w, x, away, c, v, loads, ws):
    """Counts, per-replica loads and node loads of ``x``; returns the off-node load.
    In the same pass: the experts with a replica that may leave each node
    (``mov[n, :nm[n]]``, ascending: it has one there, not its last home one), every
    expert's replicas away from home (``offc``) and what a slot more would make of it
    (``ve2, de, oe``), and what of :func:`_retarget_prep`'s figures does not depend on
    the heaviest node: the experts on each node (``hq[0]``, ascending), every expert's
    nodes as bits (``on``) and per node the lowest off-node change ``low``.  ``ws``:
    :func:`_node_work`.

    An expert's per-replica figures depend only on its load, count and replicas away;
    they are computed again only where one of those changed since ``ws`` last saw it
    (``key``), by the same expressions, so they are the values a full pass gives."""
    E, N = x.shape
    per, ve2, de, offc, mov, nm, oe, key = ws[0][0], ws[0][1], ws[0][2], ws[3][0], ws[4], ws[5], ws[2], ws[9]
    on, hq, nq, low, mb = ws[3][3], ws[7], ws[8], ws[1][0], ws[3][5]
    loads[:] = 0.0
    nm[:] = 0
    low[:] = np.inf
    for n in range(N):
        nq[0, n] = 0
    for e in range(E):
        s = 0
        a = 0
        b = 0
        m = 0
        for n in range(N):
            s += x[e, n]
            a += x[e, n] * away[e, n]
            if x[e, n] >= 1:
                b |= 1 << n
                hq[0, n, nq[0, n]] = e
                nq[0, n] += 1
                if not (away[e, n] == 0 and x[e, n] == 1):      # may leave n
                    m |= 1 << n
                    mov[n, nm[n]] = e
                    nm[n] += 1
        c[e] = s
        offc[e] = a
        on[e] = b
        mb[e] = m
        if not (key[0, e] == w[e] and key[1, e] == s and key[2, e] == a):
            key[0, e], key[1, e], key[2, e] = w[e], s, a
            key[3, e] = w[e] / max(s, 1)
            per[e] = key[3, e] * a
            ve2[e] = w[e] / (s + 1)
            de[e] = ve2[e] - key[3, e]
            for n in range(N):
                oe[n, e] = ve2[e] * (a + away[e, n]) - key[3, e] * a
        v[e] = key[3, e]
        for n in range(N):
            loads[n] += v[e] * x[e, n]
            low[n] = min(low[n], oe[n, e])
    return _pairwise(per, 0, E)


@kernel
def _list_fix(lst, cnt, n, e, want):
    """Ascending list ``lst[n, :cnt[n]]``: ``e`` inserted (``want``) or removed (not);
    nothing where it is already so."""
    k = cnt[n]
    t = 0
    while t < k and lst[n, t] < e:
        t += 1
    has = t < k and lst[n, t] == e
    if want and not has:
        for u in range(k, t, -1):
            lst[n, u] = lst[n, u - 1]
        lst[n, t] = e
        cnt[n] = k + 1
    elif has and not want:
        for u in range(t, k - 1):
            lst[n, u] = lst[n, u + 1]
        cnt[n] = k - 1


@kernel
def _node_update(w, x, away, c, v, loads, ws, e1, e2):
    """:func:`_node_state` after a step changed ``x`` in the rows of experts ``e1`` and
    ``e2`` only, ``ws`` holding the figures of the ``x`` before: those two experts'
    figures and list entries are made again, the node loads and the off-node load
    summed again in :func:`_node_state`'s order, so every value is the one it computes:
    a node's load over the experts on it (``hq[0]``, ascending; the others add exact
    zeros there, loads being finite and at least 0).  ``low`` (a minimum, exact in any
    order) takes the two experts' new figures, and is found again over all experts
    only on a node where one of them held it and went up.  Returns the off-node
    load."""
    E, N = x.shape
    per, ve2, de, offc, mov, nm, oe, key = ws[0][0], ws[0][1], ws[0][2], ws[3][0], ws[4], ws[5], ws[2], ws[9]
    on, hq, nq, low, mb = ws[3][3], ws[7], ws[8], ws[1][0], ws[3][5]
    hq0, nq0 = hq[0], nq[0]
    redo = 0                                    # nodes whose low is found again, as bits
    for r in range(2):
        e = e1 if r == 0 else e2
        if r == 1 and e2 == e1:
            break
        s = 0
        a = 0
        b = 0
        m = 0
        for n in range(N):
            s += x[e, n]
            a += x[e, n] * away[e, n]
            if x[e, n] >= 1:
                b |= 1 << n
                if not (away[e, n] == 0 and x[e, n] == 1):
                    m |= 1 << n
        for n in range(N):
            if (b >> n) & 1 != (on[e] >> n) & 1:
                _list_fix(hq0, nq0, n, e, (b >> n) & 1 == 1)
            if (m >> n) & 1 != (mb[e] >> n) & 1:
                _list_fix(mov, nm, n, e, (m >> n) & 1 == 1)
        c[e] = s
        offc[e] = a
        on[e] = b
        mb[e] = m
        if not (key[0, e] == w[e] and key[1, e] == s and key[2, e] == a):     # as _node_state
            key[0, e], key[1, e], key[2, e] = w[e], s, a
            key[3, e] = w[e] / max(s, 1)
            per[e] = key[3, e] * a
            ve2[e] = w[e] / (s + 1)
            de[e] = ve2[e] - key[3, e]
            for n in range(N):
                y = ve2[e] * (a + away[e, n]) - key[3, e] * a
                if oe[n, e] == low[n] and y > low[n]:
                    redo |= 1 << n
                low[n] = min(low[n], y)
                oe[n, e] = y
        v[e] = key[3, e]
    for n in range(N):
        y = 0.0
        for i in range(nq0[n]):
            e = hq0[n, i]
            y += v[e] * x[e, n]
        loads[n] = y
        if (redo >> n) & 1:
            y = np.inf
            for e in range(E):
                y = min(y, oe[n, e])
            low[n] = y
    return _pairwise(per, 0, E)


@kernel
def _node_swaps(x, away, v, loads, off, vmax, h, mov, nm, P, G, lam, cap, best):
    """Swaps of a replica ``e`` on the heaviest node ``h`` with one ``f`` on ``m``, in
    the order (m, e, f); ``best`` ``[val, kind, e, h, f, m]`` keeps the first lowest
    below ``best[0]``."""
    N = x.shape[1]
    for m in range(N):
        if m == h:
            continue
        om = -np.inf                            # the nodes the swap leaves alone
        for n in range(N):
            if n != h and n != m and loads[n] > om:
                om = loads[n]
        for ie in range(nm[h]):
            e = mov[h, ie]
            if x[e, m] >= cap:
                continue
            for jf in range(nm[m]):
                f = mov[m, jf]
                if f == e or x[f, h] >= cap:
                    continue
                d = v[f] - v[e]
                top = max(max(loads[h] + d, loads[m] - d), om)
                d_off = v[e] * (away[e, m] - away[e, h]) + v[f] * (away[f, h] - away[f, m])
                val = max(top / P, vmax) + lam * (off + d_off) / G
                if val < best[0]:
                    best[0], best[1], best[2], best[3], best[4], best[5] = val, 0.0, e, h, f, m


@kernel
def _top3(v, t):
    """Indices of the three largest values of ``v`` into ``t`` (first index among
    equals; ``-1`` where ``v`` has fewer than three)."""
    t[:] = -1
    for e in range(v.size):
        for i in range(3):
            if t[i] < 0 or v[e] > v[t[i]]:
                for j in range(2, i, -1):
                    t[j] = t[j - 1]
                t[i] = e
                break


@kernel
def _retarget_prep(x, h, ws):
    """Per expert ``e`` gaining a slot (``ve2``, ``de`` and ``oe``: as :func:`_node_state`
    left them in ``ws`` for ``x``): the change of ``h`` (``dn``; ``dh`` with the slot on
    ``h``), the lowest off-node change ``oe[n, e]`` with the slot on ``n`` over the
    experts on ``h`` (``lowh[n]``; over all of them, ``low[n]``, :func:`_node_state`
    keeps), the experts on ``h`` (``onh``) and those with replicas away and none on ``h``
    (``spilled``); per node the experts on it that are on ``h`` too and those that are
    not (``hq[1]``, ``hq[2]``: :func:`_node_state`'s ``hq[0]`` split, in order).
    Returns ``(nh, ns, dhmin, dnmin)``."""
    E, N = x.shape
    fw, lw, oe, iw, hq, nq = ws[0], ws[1], ws[2], ws[3], ws[7], ws[8]
    ve2, de, dh, dn, lowh = fw[1], fw[2], fw[3], fw[4], lw[1]
    offc, onh, spilled = iw[0], iw[1], iw[2]
    lowh[:] = np.inf
    nh, ns, dhmin, dnmin = 0, 0, np.inf, np.inf
    for e in range(E):
        dn[e] = x[e, h] * de[e]                 # change of h when e gains a slot elsewhere
        dh[e] = dn[e] + ve2[e]                  # ... a slot on h
        if x[e, h] > 0:
            for n in range(N):
                lowh[n] = min(lowh[n], oe[n, e])
            onh[nh] = e
            nh += 1
            dnmin = min(dnmin, dn[e])
        elif offc[e] > 0:
            spilled[ns] = e
            ns += 1
        dhmin = min(dhmin, dh[e])
    for n in range(N):
        nq[1, n], nq[2, n] = 0, 0
        for i in range(nq[0, n]):
            e = hq[0, n, i]
            k = 1 if x[e, h] > 0 else 2
            hq[k, n, nq[k, n]] = e
            nq[k, n] += 1
    return nh, ns, dhmin, dnmin


@kernel
def _node_retargets(w, x, away, c, v, loads, off, h, P, G, lam, cap, best, ws):
    """Retargets: a slot of node ``n`` goes from ``f`` (``c >= 2``, may leave ``n``) to
    ``e``; ``best`` ``[val, kind, f, e, n, -]`` keeps the first lowest below ``best[0]``
    (the objective now, less its tolerance, when the step starts).

    Per (n, f) only the ``e`` that can get below it are priced.  A move gets there only
    by lowering the heaviest node ``h`` (``n = h``, or ``e`` on ``h``), the heaviest
    replica (``e`` its expert) or the off-node load (``of + oe < 0``); those changing ``h``
    are first bounded by ``h``'s new load, ``f``'s new replica load, the other replicas
    and the lowest off-node change any of them makes.

    Here each pair's figures from ``f`` alone, into ``pr`` (``ws[10]``) in order, then
    :func:`_pair_moves` takes the pairs one by one.  Two functions, not one per pair:
    numba updates two atomic reference counts for every array a call binds, and the
    pairs run to thousands per search."""
    N = x.shape[1]
    t, mov, nm, pr = ws[6], ws[4], ws[5], ws[10]
    _top3(v, t)
    nh, ns, dhmin, dnmin = _retarget_prep(x, h, ws)
    offc = ws[3][0]
    npr = 0
    for n in range(N):
        for jf in range(nm[n]):
            f = mov[n, jf]
            if c[f] < 2:
                continue
            vf2 = w[f] / (c[f] - 1)
            df = vf2 - v[f]
            o2, seen = -1, 0                    # the second heaviest replica but f's bounds
            for i in range(3):                  # the heaviest one the move leaves alone
                if t[i] >= 0 and t[i] != f:
                    seen += 1
                    if seen == 2:
                        o2 = t[i]
            y1, b1, y2, b2, q1 = -np.inf, 0, -np.inf, 0, 0      # the two heaviest other nodes
            for q in range(N):                  # but n after f's change (bits b1, b2; q1
                if q != h and q != n:           # b1's node): one e leaves alone bounds the top
                    yq = loads[q] + x[f, q] * df
                    if yq > y1:
                        y1, b1, y2, b2, q1 = yq, 1 << q, y1, b1, q
                    elif yq > y2:
                        y2, b2 = yq, 1 << q
            pr[npr, 0], pr[npr, 1], pr[npr, 2], pr[npr, 3] = f, n, vf2, df
            pr[npr, 4] = vf2 * (offc[f] - away[f, n]) - v[f] * offc[f]           # of
            pr[npr, 5] = loads[h] + x[f, h] * df - (vf2 if n == h else 0.0)      # hf
            pr[npr, 6] = max(vf2, v[o2] if o2 >= 0 else -np.inf)                 # floor
            pr[npr, 7], pr[npr, 8], pr[npr, 9], pr[npr, 10], pr[npr, 11] = y1, b1, y2, b2, q1
            npr += 1
    _pair_moves(x, v, loads, off, h, P, G, lam, cap, best, ws, npr, nh, ns, dhmin, dnmin)


@kernel
def _pair_moves(x, v, loads, off, h, P, G, lam, cap, best, ws, npr, nh, ns, dhmin, dnmin):
    """The candidates, then the pricing, of each pair ``ws[10][:npr]`` (rows ``f, n, vf2,
    df, of, hf, floor, y1, b1, y2, b2, q1``) in turn, for :func:`_node_retargets`."""
    E, N = x.shape
    t, fw, oe2, iw, hq, nq, pr = ws[6], ws[0], ws[2], ws[3], ws[7], ws[8], ws[10]
    ve2, de, cy = fw[1], fw[2], fw[5]
    offc, onh, spilled, on, cand = iw[0], iw[1], iw[2], iw[3], iw[4]
    low, lowh = ws[1][0], ws[1][1]
    for p in range(npr):
        f, n, b1, b2, q1 = int(pr[p, 0]), int(pr[p, 1]), int(pr[p, 8]), int(pr[p, 10]), int(pr[p, 11])
        vf2, df, of, hf, floor, y1, y2 = pr[p, 2], pr[p, 3], pr[p, 4], pr[p, 5], pr[p, 6], pr[p, 7], pr[p, 9]
        pen_all = lam * (off + (of + low[n])) / G
        # Candidates (cand[:nc], cy a lower bound on the heaviest node's new load): first
        # the e changing h (every e where n = h, else those on h: rows dh / dn of fw);
        # where y1 with the block's lowest off-node change fails, only the e on q1.
        kk, nc = (0, 0) if n == h else (1, 0)
        pen = pen_all if n == h else lam * (off + (of + lowh[n])) / G
        sel = b1 != 0 and max(y1 / P, floor) + pen >= best[0]
        if max((hf + (dhmin if n == h else dnmin)) / P, floor) + pen < best[0]:
            cut = _cut(best[0], pen, P, hf, 0.0)
            for i in range(nq[kk, q1] if sel else (E if n == h else nh)):
                e = hq[kk, q1, i] if sel else (i if n == h else onh[i])
                if fw[3 + kk, e] >= cut:
                    continue
                top = max(hf + fw[3 + kk, e], y1 if on[e] & b1 == 0 else (y2 if on[e] & b2 == 0 else -np.inf))
                if max(top / P, floor) + lam * (off + (of + oe2[n, e])) / G < best[0]:
                    cand[nc], cy[nc] = e, top
                    nc += 1
        if n != h and max(hf / P, floor) + pen_all < best[0]:      # else no other e gets below
            if of < 0.0:                        # the others: any may lower the off-node load
                sel = b1 != 0 and max(y1 / P, floor) + pen_all >= best[0]
                cut = _cut(best[0], max(hf / P, floor), G / lam, off, of) if lam > 0.0 else np.inf
                for i in range(nq[2, q1] if sel else E):
                    e = hq[2, q1, i] if sel else i
                    if oe2[n, e] < cut and x[e, h] == 0:
                        top = max(hf, y1 if on[e] & b1 == 0 else (y2 if on[e] & b2 == 0 else -np.inf))
                        if max(top / P, floor) + lam * (off + (of + oe2[n, e])) / G < best[0]:
                            cand[nc], cy[nc] = e, top
                            nc += 1
            else:                               # only those with replicas away, and the
                for i in range(ns):             # heaviest replica's expert
                    if oe2[n, spilled[i]] + of < 0.0:
                        cand[nc], cy[nc] = spilled[i], hf
                        nc += 1
                if t[0] >= 0 and x[t[0], h] == 0 and (offc[t[0]] == 0 or oe2[n, t[0]] + of >= 0.0):
                    cand[nc], cy[nc] = t[0], hf
                    nc += 1
        for j in range(nc):                     # pricing, in order: the first lowest kept
            e, yh = cand[j], cy[j]
            if e == f or x[e, n] >= cap:
                continue
            o = -1                              # heaviest untouched replica (none when
            for i in range(3):                  # f and e are all there is)
                if t[i] >= 0 and t[i] != f and t[i] != e:
                    o = t[i]
                    break
            vmax = max(v[o] if o >= 0 else -np.inf, max(vf2, ve2[e]))
            pen = lam * (off + (of + oe2[n, e])) / G
            if max(yh / P, vmax) + pen >= best[0]:
                continue
            top = yh
            for q in range(N):
                if q != h:
                    y = loads[q] + x[f, q] * df + x[e, q] * de[e]
                    if q == n:
                        y += ve2[e] - vf2
                    top = max(top, y)
            val = max(top / P, vmax) + pen
            if val < best[0]:
                best[0], best[1], best[2], best[3], best[4], best[5] = val, 1.0, f, e, n, 0


@kernel
def _cut(b, a, s, r1, r2):
    """``(b - a) * s - r1 - r2`` raised by far more than its rounding error and that of
    the test it stands for: a value at or above it cannot pass that test."""
    return (((b - a) * s - r1) - r2) + (1e-9 * ((abs(b) + abs(a)) * s + abs(r1) + abs(r2)) + 1e-200)


@kernel
def _node_choose(w, x, away, c, v, loads, off, P, G, lam, cap, best, ws):
    """One step's choice on ``x`` from its state ``c, v, loads, ws`` (:func:`_node_state`)
    and off-node load ``off``: fills ``best`` with the lowest objective below the
    current one less ``1e-12`` of it (``best[0]`` ``inf`` if no move gets there);
    returns the objective now."""
    h = int(np.argmax(loads))
    vmax = v.max()
    f0 = max(loads[h] / P, vmax) + lam * off / G
    best[0], best[1] = f0 - 1e-12 * max(f0, 1e-300), -1.0
    _node_swaps(x, away, v, loads, off, vmax, h, ws[4], ws[5], P, G, lam, cap, best)
    _node_retargets(w, x, away, c, v, loads, off, h, P, G, lam, cap, best, ws)
    if best[1] < 0:
        best[0] = np.inf
    return f0


@kernel
def _node_search(w, x, away, P, G, lam, cap, max_steps, c, v, loads, ws):
    """Apply the best improving swap or retarget (``x`` in place) until none is left or
    ``max_steps``; ``c``, ``v``, ``loads`` and ``ws`` end as :func:`_node_state` leaves
    them for the final ``x`` (after the first step only the two experts a step changed
    are made again, :func:`_node_update`).  Returns the off-node load."""
    best = np.empty(6)
    off = _node_state(w, x, away, c, v, loads, ws)
    for _ in range(max_steps):
        _node_choose(w, x, away, c, v, loads, off, P, G, lam, cap, best, ws)
        if best[0] == np.inf:
            break
        if best[1] == 0.0:
            e, h, f, m = int(best[2]), int(best[3]), int(best[4]), int(best[5])
            x[e, h] -= 1
            x[e, m] += 1
            x[f, m] -= 1
            x[f, h] += 1
            off = _node_update(w, x, away, c, v, loads, ws, e, f)
        else:
            f, e, n = int(best[2]), int(best[3]), int(best[4])
            x[f, n] -= 1
            x[e, n] += 1
            off = _node_update(w, x, away, c, v, loads, ws, f, e)
    return off


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
    """``(S, M, c, v, loads, away, hc, offc, holders, hn, rw, gw, gq)`` of placement
    ``row`` (``rw``: :func:`_gpu_retargets`' per-expert figures, none computed yet;
    ``gw`` float and ``gq`` int: the steps' work space and figures kept across steps,
    none computed yet).

    Kept across steps, each with a flag in ``gq`` (1: up to date), cleared by
    :func:`_gpu_apply` where a step changes what it is made of:

    * per GPU ``h``: its lightest and heaviest replica (``gw[0, h], gw[1, h]``, flag
      ``gq[2, h]``), the lowest change one of its replicas gaining a slot makes there
      (``gw[4, h]``, ``gq[3, h]``) and, per node ``n``, the lowest off-node change one
      of its replicas brings to a GPU of ``n`` (``gw[7 + n, h]``, ``gq[4 + n, h]``);
    * ``rw`` checked against the counts (``gq[4 + N, 0]``); the least ``vb2``
      (``gw[7 + N, 0]``, ``gq[4 + N, 1]``) and per node the least ``ob`` of a GPU there
      (``gw[7 + N, 1 + n]``, ``gq[4 + N, 2 + n]``).

    ``gq[0]``: work; ``gq[1, g]``: ``g``'s node."""
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
    N = node.max() + 1
    gq = np.zeros((5 + N, max(2 * G, 2 + N)), np.int64)
    gq[1, :G] = node
    return (S, M, c, v, loads, away, hc, offc, holders, hn, np.full((7, E), np.nan),
            np.empty((8 + N, max(2 * G, E))), gq)


@kernel
def _gpu_swaps(S, M, v, loads, away, hc, g, off0, sq0, f0, eps, lam, dup, bd, bf, gw, gq):
    """Swaps of a slot ``i`` of ``g`` with slot ``j`` of any ``h``, order (i, h, j)
    (``gw, gq``: :func:`_gpu_state`'s work space and kept figures)."""
    G, k = S.shape
    i1, v1, v2 = -1, -np.inf, -np.inf           # the two heaviest GPUs other than g
    for q in range(G):
        if q != g and loads[q] > v1:
            i1, v1 = q, loads[q]
    for q in range(G):
        if q != g and q != i1 and loads[q] > v2:
            v2 = loads[q]
    ng = gq[1, g]
    vlo, vhi, olo = gw[0], gw[1], gw[7 + ng]
    for h in range(G):                          # per GPU: its lightest and heaviest replica,
        if gq[2, h] == 0:                       # the lowest off-node change one brings to g
            vlo[h], vhi[h] = np.inf, -np.inf    # (kept across steps, _gpu_state)
            for j in range(k):
                b = S[h, j]
                vlo[h], vhi[h] = min(vlo[h], v[b]), max(vhi[h], v[b])
            gq[2, h] = 1
        if gq[4 + ng, h] == 0:
            olo[h] = np.inf
            for j in range(k):
                b = S[h, j]
                olo[h] = min(olo[h], v[b] * (away[g, b] - away[h, b]))
            gq[4 + ng, h] = 1
    for i in range(k):
        a = S[g, i]
        for h in range(G):
            if h == g or (away[g, a] == 0 and hc[a] == 1 and away[h, a] == 1):
                continue                         # a primary leaves home
            ex = v2 if h == i1 else v1
            pen = lam * (off0 + (v[a] * (away[h, a] - away[g, a]) + olo[h])) / G
            lb = max(max(loads[g] + (vlo[h] - v[a]), loads[h] - (vhi[h] - v[a])), ex) + pen
            if lb > f0 + eps or lb >= bd[0]:
                continue                         # no swap with h is a step down or an equal one
            for j in range(k):
                b = S[h, j]
                if a == b or (not dup and (M[h, a] != 0 or M[g, b] != 0)):
                    continue
                if away[h, b] == 0 and hc[b] == 1 and away[g, b] == 1:
                    continue
                d = v[b] - v[a]
                lg = loads[g] + d
                lh = loads[h] - d
                lb = max(max(lg, lh), ex) + pen  # the exact loads, the lowest off-node change
                if lb > f0 + eps or lb >= bd[0]:
                    continue
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
def _gpu_retargets(w, S, M, c, v, loads, away, hc, offc, holders, hn, rw, order, g, off0, sq0, f0, eps, lam,
                   dup, bd, bf, gw, gq):
    """Retargets of a slot ``i`` of ``g`` (expert ``a``, ``c >= 2``) to any expert
    ``b``, order (i, b).  Only the GPUs holding ``a`` or ``b`` change load, so the
    new loads of ``g`` and of the busiest GPU bound a pair before the rest; the sum of
    squares changes by those GPUs' terms.  ``rw`` ``[7, E]``: each ``b``'s figures with a slot
    more (rows 3-6: ``vb2, db``, ``ob`` home / away), kept across steps and computed again (same
    expressions) only where what rows 0-2 hold (``w, c, offc``; NaN: never) changed.
    ``gw, gq``: :func:`_gpu_state`'s work space and kept figures."""
    G, k, E, o0 = S.shape[0], S.shape[1], w.size, order[0]
    qs, ys, dq = gq[0], gw[3], gw[4]
    vb2, db, ob0, ob1 = rw[3], rw[4], rw[5], rw[6]
    mvb, mob = _retarget_figures(w, S, M, c, away, offc, rw, g, gw, gq)
    for i in range(k):
        a = S[g, i]
        ca = c[a]
        if ca < 2 or (away[g, a] == 0 and hc[a] == 1):
            continue
        va2 = w[a] / max(ca - 1, 1)
        da = va2 - v[a]
        oa = w[a] * (offc[a] - away[g, a]) / max(ca - 1, 1) - w[a] * offc[a] / ca
        lb = loads[g] + M[g, a] * da + dq[g] + (mvb - va2)     # bounds every b: g and the
        for t in range(hn[a]):                                 # other holders of a
            q = holders[a, t]
            if q != g:
                lb = max(lb, loads[q] + M[q, a] * da + dq[q])
        pen_lo = lam * (off0 + (oa + mob)) / G
        lb += pen_lo
        if lb > f0 + eps or lb >= bd[0]:
            continue
        for b in range(E):
            if b == a or (not dup and M[g, b] != 0):
                continue
            top = loads[g] + M[g, a] * da + M[g, b] * db[b] + vb2[b] - va2
            if o0 != g:
                top = max(top, loads[o0] + M[o0, a] * da + M[o0, b] * db[b])
            lb = top + pen_lo                    # b's off-node change at its lowest
            if lb > f0 + eps or lb >= bd[0]:
                continue
            pen = lam * (off0 + (oa + (ob1[b] if away[g, b] else ob0[b]))) / G
            lb = top + pen
            if lb > f0 + eps or lb >= bd[0]:
                continue                         # neither a step down nor an equal one
            na = 0
            for t in range(hn[a] + hn[b]):
                q = holders[a, t] if t < hn[a] else holders[b, t - hn[a]]
                if t >= hn[a] and M[q, a] != 0:
                    continue                     # already counted with a
                y = loads[q] + M[q, a] * da + M[q, b] * db[b]
                if q == g:
                    y += vb2[b] - va2
                top = max(top, y)
                qs[na], ys[na] = q, y
                na += 1
            for t in range(G):                  # the heaviest GPU that does not change
                q = order[t]
                if M[q, a] == 0 and M[q, b] == 0:
                    top = max(top, loads[q])
                    break
            val = top + pen
            if val < f0 - eps:
                if val < bd[0]:
                    bd[0], bd[1], bd[2], bd[3], bd[4], bd[5] = val, 1.0, i, b, 0, g
            elif val <= f0 + eps and bd[0] == np.inf:
                s2 = sq0
                for t in range(na):
                    s2 += ys[t] * ys[t] - loads[qs[t]] * loads[qs[t]]
                if s2 < sq0 * (1 - 1e-12) and s2 < bf[0]:
                    bf[0], bf[1], bf[2], bf[3], bf[4], bf[5] = s2, 1.0, i, b, 0, g


@kernel
def _retarget_figures(w, S, M, c, away, offc, rw, g, gw, gq):
    """What :func:`_gpu_retargets` starts from, made again only where flagged (see
    :func:`_gpu_state`): ``rw`` checked against the counts, each GPU's lowest change a
    ``b`` gaining a slot makes there (``gw[4]``); returns the least ``vb2`` and the least
    ``ob`` on ``g``'s node."""
    G, k, E = S.shape[0], S.shape[1], w.size
    N = gw.shape[0] - 8
    ng, fl, pm = gq[1, g], gq[4 + N], gw[7 + N]
    vb2, db, ob0, ob1 = rw[3], rw[4], rw[5], rw[6]
    if fl[0] == 0:                                      # rw checked since the last change
        for b in range(E):
            if not (rw[0, b] == w[b] and rw[1, b] == c[b] and rw[2, b] == offc[b]):
                rw[0, b], rw[1, b], rw[2, b] = w[b], c[b], offc[b]
                vb2[b] = w[b] / (c[b] + 1)
                db[b] = vb2[b] - w[b] / max(c[b], 1)
                ob0[b] = w[b] * (offc[b] + 0) / (c[b] + 1) - w[b] * offc[b] / max(c[b], 1)
                ob1[b] = w[b] * (offc[b] + 1) / (c[b] + 1) - w[b] * offc[b] / max(c[b], 1)
                fl[1:] = 0
        fl[0] = 1
    if fl[1] == 0:
        pm[0] = vb2.min()
        fl[1] = 1
    if fl[2 + ng] == 0:                                 # the least ob on g's node
        m = np.inf
        for b in range(E):
            m = min(m, ob1[b] if away[g, b] else ob0[b])
        pm[1 + ng] = m
        fl[2 + ng] = 1
    dq = gw[4]                                          # per GPU: the lowest change a b
    for q in range(G):                                  # gaining a slot makes there
        if gq[3, q] == 0:
            dq[q] = 0.0
            for j in range(k):
                dq[q] = min(dq[q], M[q, S[q, j]] * db[S[q, j]])
            gq[3, q] = 1
    return pm[0], pm[1 + ng]


@kernel
def _gpu_apply(S, M, c, loads, v, away, hc, offc, holders, hn, gq, best):
    """Apply the step in ``best`` (the replicas at home / away and the holders of the
    two experts follow, as :func:`_gpu_counts` makes them; the figures kept in ``gq``'s
    flags that it changes are marked for making again); returns whether counts changed
    (loads to recompute)."""
    g, i = int(best[5]), int(best[2])
    a = S[g, i]
    N = gq.shape[0] - 5
    if best[1] == 0.0:                          # a swap: g's and h's figures, and rw's check
        h, j = int(best[3]), int(best[4])
        for r in range(2, 4 + N):
            gq[r, g], gq[r, h] = 0, 0
        gq[4 + N, 0] = 0
        b = S[h, j]
        S[g, i], S[h, j] = b, a
        _gpu_slot(M, away, hc, offc, holders, hn, g, a, -1)
        _gpu_slot(M, away, hc, offc, holders, hn, g, b, 1)
        _gpu_slot(M, away, hc, offc, holders, hn, h, b, -1)
        _gpu_slot(M, away, hc, offc, holders, hn, h, a, 1)
        d = v[b] - v[a]
        loads[g] += d
        loads[h] -= d
        return False
    b = int(best[3])
    S[g, i] = b
    gq[2:, :] = 0                               # a retarget: per-replica loads change
    _gpu_slot(M, away, hc, offc, holders, hn, g, a, -1)
    _gpu_slot(M, away, hc, offc, holders, hn, g, b, 1)
    c[a] -= 1
    c[b] += 1
    return True


@kernel
def _gpu_slot(M, away, hc, offc, holders, hn, g, e, d):
    """``g`` gains (``d = 1``) or loses (``-1``) a replica of ``e``: ``M``, ``e``'s
    replicas at home / away and its holders (ascending)."""
    M[g, e] += d
    if away[g, e]:
        offc[e] += d
    else:
        hc[e] += d
    _list_fix(holders, hn, e, g, M[g, e] != 0)


@kernel
def _gpu_step(w, S, M, c, v, loads, away, hc, offc, holders, hn, rw, gw, gq, lam, dup, bd, bf):
    """One step's choice from the current state (``hc, offc, holders, hn`` as
    :func:`_gpu_counts` makes them): the busiest GPUs in turn (at most two, stopping
    at the first with an improving move); returns the objective now."""
    G, E = loads.size, w.size
    t1, t2 = gw[5], gw[6]
    for e in range(E):
        t1[e] = v[e] * offc[e]
    for h in range(G):
        t2[h] = loads[h] ** 2
    off0 = _pairwise(t1, 0, E)
    f0 = loads.max() + lam * off0 / G
    eps = 1e-12 * max(f0, 1e-300)
    sq0 = _pairwise(t2, 0, G)
    order = np.argsort(-loads, kind="mergesort")
    bd[0], bf[0] = np.inf, np.inf
    for t in range(min(2, G)):
        g = order[t]
        _gpu_swaps(S, M, v, loads, away, hc, g, off0, sq0, f0, eps, lam, dup, bd, bf, gw, gq)
        _gpu_retargets(w, S, M, c, v, loads, away, hc, offc, holders, hn, rw, order, g, off0, sq0, f0, eps,
                       lam, dup, bd, bf, gw, gq)
        if bd[0] < np.inf:
            break
    return f0


@kernel
def _polish_kernel(w, row, node, home, lam, dup, max_steps):
    """GPU-level search from ``row`` ``[R]``; returns ``(objective, placement [R])``.
    GPU loads follow a swap incrementally and are recomputed after a retarget."""
    S, M, c, v, loads, away, hc, offc, holders, hn, rw, gw, gq = _gpu_state(w, row, node, home)
    bd, bf = np.empty(6), np.empty(6)
    f0 = 0.0
    for _ in range(max_steps):
        f0 = _gpu_step(w, S, M, c, v, loads, away, hc, offc, holders, hn, rw, gw, gq, lam, dup, bd, bf)
        if bd[0] < np.inf:
            changed = _gpu_apply(S, M, c, loads, v, away, hc, offc, holders, hn, gq, bd)
        elif bf[0] < np.inf:
            changed = _gpu_apply(S, M, c, loads, v, away, hc, offc, holders, hn, gq, bf)
        else:
            return f0, S.ravel().copy()
        if changed:
            _gpu_loads(w, S, c, v, loads)
    _gpu_counts(S, away, hc, offc, holders, hn)
    off0 = _pairwise(v * offc, 0, w.size)
    return loads.max() + lam * off0 / node.size, S.ravel().copy()


# ---------------------------------------------------------------------------------------
# The layer's starts: node searches (at lam and lower costs) packed per node, and a
# home-first LPT from the global policy's replica counts.

# Node searches per layer run at cross_node_cost times these; the one with the lowest
# objective at the real cost is packed.  A search at a lower cost spills more and
# ends in another local optimum, often the better one.
# Node-level candidates per layer, in order (the first wins among equals): ``[start,
# factor]`` with start 0 the hierarchical plan, 1 the home-first LPT; searched at
# ``cross_node_cost * factor``, or not at all where the factor is negative.
NODE_STARTS = np.array([[0, -1.0], [1, 1.0], [1, -1.0]])


@kernel
def _node_start(w, rows, factors, away, rn, P, G, lam, cap, max_steps, ws):
    """Node-level candidates: the counts per node of each start ``rows[s]``, searched
    at cost ``lam * factors[s]`` (not searched where the factor is negative); returns
    ``(x [E, N], v [E], s)`` of the one lowest at ``lam`` (the first among equals).
    ``ws``: :func:`_node_work`, its per-expert figures (``key``) made for this layer's
    ``away`` or never (NaN)."""
    E, N = away.shape
    c, v, loads = np.empty(E, np.int64), np.empty(E), np.empty(N)
    best_x, best_f, best_s, best_v = np.zeros((E, N), dtype=np.int64), np.inf, 0, np.empty(E)
    for i in range(factors.size):
        x = np.zeros((E, N), dtype=np.int64)
        for n in range(N):                      # node n holds slots n rn .. (n + 1) rn - 1
            for s in range(n * rn, (n + 1) * rn):
                x[rows[i, s], n] += 1
        if factors[i] >= 0:
            off = _node_search(w, x, away, P, G, lam * factors[i], cap, max_steps, c, v, loads, ws)
        else:
            off = _node_state(w, x, away, c, v, loads, ws)
        f = max(loads.max() / P, v.max()) + lam * off / G
        if f < best_f:
            best_f, best_s = f, i
            best_x[:, :] = x
            best_v[:] = v
    return best_x, best_v, best_s


@kernel
def _node_layers(weight, counts, out, home, starts, N, P, G, dup, lam, cap, max_steps, lo, hi, values, labels,
                 keep, lpts):
    """Node level of layers ``lo .. hi - 1`` (see :func:`spill_refine`): the
    home-first LPT (into ``lpts``; the start plan where it gets stuck), the best of
    the ``starts`` (:data:`NODE_STARTS`; only the start plan's where the LPT got stuck)
    and whether it is the untouched start plan (``keep``), its replicas as sorted
    items per node (``values``, ``labels``)."""
    E = weight.shape[1]
    R = out.shape[1]
    rn = R // N
    away = np.empty((E, N), np.int64)
    ws = _node_work(E, N)
    for l in range(lo, hi):
        ws[9][:, :] = np.nan                    # figures made for another layer's away
        lpt, ok = _home_lpt(weight[l], counts[l], home[l], N, P, R // G, dup, lam)
        for e in range(E):
            for n in range(N):
                away[e, n] = 1 if n != home[l, e] else 0
        nu = 0
        for i in range(starts.shape[0]):
            nu += 1 if ok or starts[i, 0] == 0 else 0
        rows, factors = np.empty((nu, R), np.int64), np.empty(nu)
        j = 0
        for i in range(starts.shape[0]):
            if ok or starts[i, 0] == 0:
                rows[j, :] = out[l] if starts[i, 0] == 0 else lpt
                factors[j] = starts[i, 1]
                j += 1
        x, v, s = _node_start(weight[l], rows, factors, away, rn, P, G, lam, cap, max_steps, ws)
        keep[l] = starts[s, 0] == 0 and starts[s, 1] < 0
        lpts[l, :] = lpt if ok else out[l]
        _node_items(x, v, values[l * N:(l + 1) * N], labels[l * N:(l + 1) * N])


@kernel
def _node_items(x, v, values, labels):
    """Node ``n``'s replicas as row ``n`` of sorted items: by decreasing load, ties by
    expert, an expert's replicas adjacent (what the packing takes)."""
    E, N = x.shape
    order = np.argsort(-v, kind="mergesort")
    for n in range(N):
        i = 0
        for e in order:
            for _ in range(x[e, n]):
                values[n, i] = v[e]
                labels[n, i] = e
                i += 1


@kernel
def _home_lpt(w, c, home, N, P, k, dup, pen):
    """A start from replica counts ``c``: replicas by decreasing load (ties by expert),
    each to the lightest GPU with a free slot (ties by index) not yet holding its
    expert if any is left (without ``dup``, only those); an expert's first replica on its
    home node, the others anywhere that leaves every node room for the first replicas
    still to come.  Returns ``(row [G * k], ok)``; ``ok`` False where it gets stuck."""
    E = w.size
    G = N * P
    rn = P * k
    v = np.empty(E)
    for e in range(E):
        v[e] = w[e] / max(c[e], 1)
    loads, fill = np.zeros(G), np.zeros(G, np.int64)
    free, pend = np.full(N, rn, np.int64), np.zeros(N, np.int64)
    last = np.full(G, -1, np.int64)         # the expert each GPU got last: an expert's replicas
    for e in range(E):                      # are placed in one run, so g holds e iff last[g] == e
        pend[home[e]] += 1
    row = np.empty(G * k, np.int64)
    for e in np.argsort(-v, kind="mergesort"):
        for r in range(c[e]):
            bg, bn, bnew, bkey = -1, -1, False, 0.0
            for n in range(home[e] if r == 0 else 0, home[e] + 1 if r == 0 else N):    # first: home
                if r > 0 and free[n] <= pend[n]:
                    continue
                add = pen * v[e] if n != home[e] else 0.0
                for g in range(n * P, n * P + P):      # GPUs in index order, no division per GPU
                    if fill[g] == k:
                        continue
                    new = last[g] != e
                    if not new and not dup:
                        continue
                    key = loads[g] + add
                    if bg < 0 or (new and not bnew) or (new == bnew and key < bkey):
                        bg, bn, bnew, bkey = g, n, new, key
            if bg < 0:
                return row, False
            row[bg * k + fill[bg]] = e
            fill[bg] += 1
            loads[bg] += v[e]
            last[bg] = e
            free[bn] -= 1
            if r == 0:
                pend[bn] -= 1
    return row, True



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
    global_counts: np.ndarray | None = None,
) -> np.ndarray:
    """Spill replicas off their home node where it pays (see module docs).

    Args:
        weight: ``[L, E]`` loads.
        phy2log: ``[L, R]`` start, a hierarchical plan (every replica on its home node).
        home: ``[L, E]`` home node of every expert.
        num_gpus, num_nodes: the cluster.
        cross_node_cost: cost per unit of load served off-node (``inf``: nothing moves).
        max_steps: improving steps per layer and search at most.
        deadline: ``time.perf_counter()`` value after which layers are left as they are.
        global_plan: optional ``[L, R]`` global-policy plan: its replica counts seed the
            home-first LPT start (default: :func:`replica_counts`), and where nothing can
            spill (one node, or no spare replica) it is polished as a start too.
        global_counts: optional ``[L, E]`` replica counts to seed the LPT with instead
            of ``global_plan``'s (the same counts without the packing:
            :func:`heuristics.pipeline.replica_counts_of`).

    Returns:
        ``[L, R]`` placement (node ``n`` holds slots ``n*R/N ..``); every expert keeps a
        replica on its home node.
    """
    out = np.array(phy2log, dtype=np.int64, copy=True)
    if not np.isfinite(cross_node_cost) or out.shape[0] == 0:
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
    if global_counts is not None:
        counts = global_counts
    elif global_plan is not None:
        counts = np.stack([np.bincount(r, minlength=E) for r in global_plan])
    else:
        counts = replica_counts(weight, R, None if allow_duplicates else G)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    values, labels = np.empty((L * N, rn)), np.empty((L * N, rn), dtype=np.int64)
    keep = np.zeros(L, dtype=bool)         # layers whose start plan is the best node split
    lpts = np.empty_like(out)
    args = (weight, counts, out, home, NODE_STARTS, N, P, G, allow_duplicates, lam, cap, max_steps)
    done = 0
    if deadline is None:
        _node_layers(*args, 0, L, values, labels, keep, lpts)
        done = L
    while deadline is not None and done < L and time.perf_counter() < deadline:
        _node_layers(*args, done, done + 1, values, labels, keep, lpts)
        done += 1
    if done == 0:
        return out
    bound = np.maximum(values[:done * N].sum(axis=1) / P, values[:done * N, 0])
    layout = pack_sorted(values[:done * N], labels[:done * N], P, target=bound,
                         allow_duplicates=allow_duplicates)
    packed = gather_rows(labels[:done * N], layout).reshape(done, R)
    _polish_layers(out, packed, keep, lpts, weight, home, node, global_plan, N, lam, allow_duplicates, max_steps)
    return out


def nothing_can_spill(num_nodes: int, num_replicas: int, num_experts: int) -> bool:
    """Whether no replica can leave its home node: one node, or no spare replica (every
    expert's one replica is its primary).  Such a layer is a plain packing problem, and
    :func:`spill_refine` polishes the global plan (``global_plan``) as a start too."""
    return num_nodes == 1 or num_replicas == num_experts


def _polish_layers(out, packed, keep, lpts, weight, home, node, global_plan, N, lam, allow_duplicates, max_steps):
    """The GPU-level polish of the first ``len(packed)`` layers of ``out``, in place:
    per layer, the best polished start (see :func:`spill_refine`)."""
    R, E = out.shape[1], weight.shape[1]
    for l in range(len(packed)):
        starts = [out[l] if keep[l] else packed[l]]
        if nothing_can_spill(N, R, E):
            # Nothing can spill: the layer is a plain packing problem, and the start plan
            # and the global plan (its replicas swapped so every primary is home) are
            # other packings worth polishing too.
            starts += ([] if keep[l] else [out[l]]) + [lpts[l]]
            if global_plan is not None:
                starts.append(_primaries_home(np.ascontiguousarray(global_plan[l], dtype=np.int64), home[l], N))
        results = [_polish(weight[l], start, node, home[l], lam, allow_duplicates, max_steps) for start in starts]
        f, row = min(results, key=lambda r: r[0])
        if np.isfinite(f):                 # else no start kept the rules: the start plan stays
            out[l] = row


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
    spill_refine(w, np.array([[0, 1, 2, 3]]), np.array([[0, 0, 1, 1]]), 2, 2, 0.5,     # nothing can spill
                 global_plan=np.array([[0, 2, 1, 3]]))
