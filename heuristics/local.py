"""Local search on one layer's placement for the migration-aware replan
(:func:`eplb_opt.migrate.replan`), compiled: the two moves it uses and the rules that
choose them.

* **swap**: slot ``i`` of GPU ``g`` trades experts with slot ``j`` of GPU ``h``;
* **retarget**: slot ``i`` of GPU ``g`` (expert ``a``, ``>= 2`` replicas) is given to
  expert ``b``: ``a`` loses a replica, ``b`` gains one, so the per-replica loads of both
  change on every GPU that holds them.

Shapes: ``E`` experts, ``G`` GPUs with ``k`` slots; a replica of ``e`` carries
``w[e] / c[e]``.  :func:`repair_attempt` is the entry point; the others are its steps,
pinned one by one against a plain reference in ``tests/test_kernels_migrate.py``.
"""

from __future__ import annotations

import numpy as np

from .compile import kernel, warmer

__all__ = ["gpu_counts", "group_nodes", "keep_gpu_slots", "move_counts", "nearby_partitions", "repair_attempt",
           "transfer_rows"]


def gpu_counts(p: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """``[G, E]`` replica counts of one layer's placement ``p`` ``[R]`` (``-1``: empty)."""
    k = p.size // num_gpus
    key = (np.arange(num_gpus)[:, None] * num_experts + p.reshape(num_gpus, k)).ravel()
    if (p < 0).any():                                   # empty slots (-1) count for nothing
        key = key[p.ravel() >= 0]
    return np.bincount(key, minlength=num_gpus * num_experts).reshape(num_gpus, num_experts)


# ---------------------------------------------------------------------------------------
# Migration repair (:func:`eplb_opt.migrate.replan`), one window, compiled.
#
# The layer's state is kept in plain arrays: ``S [G, k]`` experts of the slots, ``M [G, E]``
# replicas per GPU, ``c [E]`` replica counts, ``v [E]`` per-replica loads ``w / c``,
# ``load [G]``; the old placement enters as ``newm [G, E]`` (True where a replica of ``e``
# on ``g`` is a move: ``g`` held no ``e`` before) and ``q [G, E]`` (the price of a replica
# of ``e`` on ``g``: 0 where ``g`` held ``e``, else the cost of the arrival).  Partners of
# GPU ``g`` are the other GPUs of its block of ``B`` (a node under the hierarchical policy,
# all GPUs otherwise), in index order.  Every loop is sequential in a fixed order, so the
# answer is the same on every rank.
# ---------------------------------------------------------------------------------------

@kernel
def slot_values(S, v):
    """``[G, k]`` the per-replica load of every slot's expert (``v[S]``)."""
    G, k = S.shape
    vS = np.empty((G, k))
    for h in range(G):
        for s in range(k):
            vS[h, s] = v[S[h, s]]
    return vS


@kernel
def _partner_bounds(S, vS, q, load, T, eps, g, lo, B, wk):
    """Per partner ``h = lo + x`` of ``g``, into ``wk [3, B]``: the least ``q[g, b] - q[h, b]``
    over its slots' experts ``b``, the least ``q[h, a] - q[g, a]`` over ``g``'s experts
    ``a``, and its least slot value (bounds for :func:`swap_scan`); ``inf`` for ``g``
    itself and for a partner no swap can remove excess with (the first test of the
    scan).  Returns the least sum of the first two."""
    k = S.shape[1]
    mh, ma, vmin = wk[0], wk[1], wk[2]
    exg = max(load[g] - T, 0.0)
    cheapest = np.inf
    for x in range(B):
        h = lo + x
        mh[x], ma[x], vmin[x] = np.inf, np.inf, np.inf
        near = load[g] < 64.0 * T and load[h] < 64.0 * T
        if h == g or not exg + max(load[h] - T, 0.0) > eps or (near and not load[h] < T):
            continue
        m, m2, vm = np.inf, np.inf, np.inf
        for j in range(k):
            b = S[h, j]
            a = S[g, j]
            m = min(m, q[g, b] - q[h, b])
            m2 = min(m2, q[h, a] - q[g, a])
            vm = min(vm, vS[h, j])
        mh[x], ma[x], vmin[x] = m, m2, vm
        cheapest = min(cheapest, m + m2)
    return cheapest


@kernel
def _key(dphi, cost, thr):
    """The pick key as a pair ``(kind, value)``, larger first: kind 2 when free (value
    ``dphi - 1e-9 cost``), else kind 1 where the excess removed ``dphi`` reaches ``thr``
    (the searched GPU's whole excess) and kind 0 where it does not (value
    ``dphi / cost``).  Monotone: more excess removed or a lower cost never lowers it."""
    if cost <= 0.0:
        return 2, dphi - 1e-9 * cost
    return (1 if dphi >= thr else 0), dphi / max(cost, 1e-9)


@kernel
def _beats(kind, val, at, bk, bv, bat):
    """Whether key ``(kind, val)`` at scan position ``at`` is preferred to the best so far
    ``(bk, bv)`` at ``bat`` (kind -1: none): a larger key, or the same key earlier."""
    return bk < 0 or kind > bk or (kind == bk and (val > bv or (val == bv and at < bat)))


@kernel
def swap_scan(S, vS, load, M, q, allowed, dup, T, eps, g, B, exact, wk):
    """The repair's pick (:func:`_key`, first in the order ``(i, h, j)`` on ties) among
    swaps of slot ``i`` of ``g`` (above ``T``) with slot ``j`` of a partner ``h``: the
    experts trade places, ``d = v[b] - v[a]`` moves from ``h`` to ``g``; the excess over
    ``T`` removed is ``dphi``, the cost the arrivals of ``a`` on ``h`` and ``b`` on ``g``
    less the departures of ``a`` from ``g`` and ``b`` from ``h`` (``q``: each priced only
    where it is a move).  Returns ``(kind, score, cost, i, h, j)``; kind -1: none;
    score: the excess removed when free, else the ratio.  A swap with ``d >= 0`` removes
    no excess from ``g`` and is skipped.  ``wk``: ``[3, B]`` work.

    Partners whose cheapest swap can be the cheapest overall are searched first, so the
    best so far is good early; with ``exact`` costs, partners and slots whose bounds
    (:func:`_partner_bounds`) cannot beat it are then skipped (the key is monotone and
    the position decides ties, so the answer is the one the plain scan gives)."""
    G, k = S.shape
    lo = (g // B) * B
    exg = max(load[g] - T, 0.0)
    thr = exg - eps
    cheapest = _partner_bounds(S, vS, q, load, T, eps, g, lo, B, wk)
    mh, ma, vmin = wk[0], wk[1], wk[2]
    bk, bv, bscore, bcost, bi, bh, bj, bat = -1, 0.0, 0.0, 0.0, -1, -1, -1, 0
    for p in range(2 if exact else 1):
        for x in range(B):
            h = lo + x
            if not vmin[x] < np.inf or (exact and (ma[x] + mh[x] <= cheapest) != (p == 0)):
                continue
            phi0 = exg + max(load[h] - T, 0.0)
            room = (T - load[h]) + 4e-13 * T if load[g] < 64.0 * T and load[h] < 64.0 * T else np.inf
            if exact:
                ck, cv = _key(min(phi0, room), ma[x] + mh[x], thr)
                if not _beats(ck, cv, h * k, bk, bv, bat):
                    continue
            for i in range(k):
                a = S[g, i]
                va, qga, qha = vS[g, i], q[g, a], q[h, a]
                if not allowed[h, a] or (not dup and M[h, a] != 0) or not vmin[x] - va < 0.0:
                    continue
                if exact:
                    ub = min(phi0 - max(load[g] + (vmin[x] - va) - T, 0.0), room)
                    ck, cv = _key(ub, (qha - qga) + mh[x], thr)
                    if not _beats(ck, cv, (i * G + h) * k, bk, bv, bat):
                        continue
                for j in range(k):
                    d = vS[h, j] - va
                    if d >= 0.0:
                        continue
                    b = S[h, j]
                    if not allowed[g, b] or (not dup and M[g, b] != 0):
                        continue
                    dphi = phi0 - max(load[g] + d - T, 0.0) - max(load[h] - d - T, 0.0)
                    if not dphi > eps:
                        continue
                    cost = ((qha + q[g, b]) - qga) - q[h, b]
                    kk, kv = _key(dphi, cost, thr)
                    at = (i * G + h) * k + j
                    if _beats(kk, kv, at, bk, bv, bat):
                        bk, bv, bscore, bcost = kk, kv, dphi if kk == 2 else kv, cost
                        bi, bh, bj, bat = i, h, j, at
    return bk, bscore, bcost, bi, bh, bj


@kernel
def retarget_work(G, k, E):
    """Work arrays of :func:`retarget_scan`: ``la [G]``, ``acc [E]``, ``seen [E]`` (-1),
    ``mark [E]`` (0), ``hot [G k]`` and ``hl [G]``; every call leaves them so."""
    return (np.zeros(G), np.zeros(E), np.full(E, -1, dtype=np.int64), np.zeros(E, dtype=np.int8),
            np.zeros(G * k, dtype=np.int64), np.zeros(G, dtype=np.int64))


@kernel
def _take(rb, dphi, cost, i, b, thr):
    """Offer retarget ``(i, b)`` to the best so far ``rb`` (``kind, val, score, cost, i,
    b``): taken on a larger key (:func:`_key`, whole excess ``thr``), or the same key in
    the same slot with a lower ``b`` (the candidates of one slot are not offered in index
    order)."""
    kind, x = _key(dphi, cost, thr)
    if kind > rb[0] or (kind == rb[0] and (x > rb[1] or (x == rb[1] and rb[4] == i and b < rb[5]))):
        rb[0], rb[1], rb[2], rb[3], rb[4], rb[5] = kind, x, dphi if kind == 2 else x, cost, i, b


@kernel
def _hot_sums(S, v, vp, M, la, T, g, va2, d_a, work):
    """Every expert ``b`` on a GPU whose excess can change (``g`` and the GPUs above ``T``
    once ``a`` lost its replica, ``la``), listed in ``hot``: ``acc[b]`` the excess
    removed by retargeting to ``b``, summed from ``d_a`` over those GPUs in index order;
    ``mark[b]`` 2 where ``g`` holds ``b``, else 1.  Returns how many."""
    G, k = S.shape
    acc, seen, mark, hot = work[1], work[2], work[3], work[4]
    nh = 0
    for h in range(G):
        if h != g and not la[h] > T:
            continue
        for s in range(k):
            b = S[h, s]
            if seen[b] == h:
                continue
            seen[b] = h
            if mark[b] == 0:
                mark[b] = 1
                hot[nh] = b
                nh += 1
                acc[b] = d_a
            if h == g:
                mark[b] = 2
            acc[b] += _holder_gain(la[h], M[h, b], vp[b], v[b], h == g, va2, T)
    return nh


@kernel
def _holder_gain(lah, mhb, vpb, vb, on_g, va2, T):
    """The excess a GPU holding ``mhb`` replicas of ``b`` (load ``lah`` once ``a`` lost
    its replica) sheds when a slot of ``g`` (expert ``a``, its replicas ``va2`` then)
    goes to ``b``: ``b``'s replicas get lighter (``vb`` -> ``vpb``), and on ``g``
    (``on_g``) the slot's replica is ``b``'s.  Scalars only: no reference counts."""
    nl = lah + mhb * (vpb - vb)
    if on_g:
        nl += vpb - va2
    return max(lah - T, 0.0) - max(nl - T, 0.0)


@kernel
def _arrival_gain(lag, exlag, vpb, va2, T):
    """The excess ``g`` (load ``lag``, excess ``exlag`` once ``a`` lost its replica) sheds
    when its slot of ``a`` goes to an expert it does not hold (replicas ``vpb`` then)."""
    return exlag - max(lag + (vpb - va2) - T, 0.0)


@kernel
def _all_retargets(S, v, vp, M, q, allowed, dup, T, eps, g, i, va2, d_a, work, rb, priced, thr):
    """Offer every retarget of slot ``i`` of ``g`` to ``rb`` (those that cost a move only
    where ``priced``; ``thr``: the whole excess, :func:`_key`), ``la`` holding the loads
    once ``a`` lost its replica (``va2`` its replicas' load then, ``d_a`` the excess that
    removes)."""
    la, acc, mark, hot = work[0], work[1], work[3], work[4]
    a = S[g, i]
    nh = _hot_sums(S, v, vp, M, la, T, g, va2, d_a, work)
    exlag, qga, lag = max(la[g] - T, 0.0), q[g, a], la[g]
    for t in range(nh):
        b = hot[t]
        if b == a or not allowed[g, b] or (not dup and M[g, b] != 0) or (not priced and q[g, b] > qga):
            continue
        dphi = acc[b]
        if mark[b] == 1:
            dphi += _arrival_gain(lag, exlag, vp[b], va2, T)
        if dphi > eps:
            _take(rb, dphi, q[g, b] - qga, i, b, thr)
    if d_a + exlag > eps:                  # else no other expert removes any excess
        for b in range(vp.size):
            if mark[b] != 0 or not allowed[g, b] or (not priced and q[g, b] > qga):
                continue
            dphi = d_a + _arrival_gain(lag, exlag, vp[b], va2, T)
            if dphi > eps:
                _take(rb, dphi, q[g, b] - qga, i, b, thr)
    for t in range(nh):
        work[2][hot[t]], mark[hot[t]] = -1, 0


@kernel
def _departure(M, load, la, T, a, da):
    """Set ``la`` to every GPU's load once expert ``a`` lost a replica (each of the
    others ``da`` heavier) and return the excess that removes, summed over ``a``'s
    holders in index order."""
    d_a = 0.0
    for h in range(load.size):
        if M[h, a] != 0:
            la[h] = load[h] + M[h, a] * da
            d_a += max(load[h] - T, 0.0) - max(la[h] - T, 0.0)
    return d_a


@kernel
def _free_retargets(S, v, vp, M, la, T, eps, g, i, va2, d_a, oldE, nold, allowed, dup, hl, nl, rb, thr):
    """Offer the free retargets of slot ``i`` of ``g`` (whose expert ``g`` held before):
    to each expert ``b`` ``g`` held before, summed as :func:`_hot_sums` sums them (over
    the GPUs ``hl[:nl]``, ``g`` and those above ``T`` in ``la``, in index order)."""
    a = S[g, i]
    exlag, lag = max(la[g] - T, 0.0), la[g]
    for t in range(nold[g]):
        b = oldE[g, t]
        if b == a or not allowed[g, b] or (not dup and M[g, b] != 0):
            continue
        acc = d_a
        for r in range(nl):
            h = hl[r]
            if M[h, b] != 0:
                acc += _holder_gain(la[h], M[h, b], vp[b], v[b], h == g, va2, T)
        if M[g, b] == 0:
            acc += _arrival_gain(lag, exlag, vp[b], va2, T)
        if acc > eps:
            _take(rb, acc, 0.0, i, b, thr)


@kernel
def _slot_retargets(S, w, v, vp, c, load, M, q, allowed, dup, T, eps, g, i, work, rb, oldE, nold, pmin, priced):
    """Offer the retargets of slot ``i`` of ``g`` to ``rb`` (:func:`retarget_scan`):
    none where no retarget can remove more than ``d_a + exlag + xb`` (``a``'s departure,
    and every other GPU above ``T`` emptied of its excess); where ``g`` held ``a`` before,
    the free ones directly (:func:`_free_retargets`) and the others, at ``pmin`` or
    more, only where that bound lets them beat the best so far."""
    G = S.shape[0]
    la, hl = work[0], work[5]
    a = S[g, i]
    va2 = w[a] / max(c[a] - 1, 1)
    d_a = _departure(M, load, la, T, a, va2 - v[a])
    exlag, qga = max(la[g] - T, 0.0), q[g, a]
    thr = max(load[g] - T, 0.0) - eps
    nl, xb = 0, 0.0
    for h in range(G):
        if h == g or la[h] > T:
            hl[nl] = h
            nl += 1
            if h != g:
                xb += la[h] - T
    ub = (d_a + exlag) + xb
    ub += 1e-9 * (abs(d_a) + exlag + xb) + eps              # above any sum of the terms
    bk, bv = _key(ub, -qga, thr)
    if bk > rb[0] or (bk == rb[0] and bv >= rb[1]):
        if qga == 0.0 and pmin > 0.0:
            _free_retargets(S, v, vp, M, la, T, eps, g, i, va2, d_a, oldE, nold, allowed, dup, hl, nl, rb, thr)
            bk, bv = _key(ub, pmin, thr)
            if priced and (bk > rb[0] or (bk == rb[0] and bv >= rb[1])):
                _all_retargets(S, v, vp, M, q, allowed, dup, T, eps, g, i, va2, d_a, work, rb, True, thr)
        else:
            _all_retargets(S, v, vp, M, q, allowed, dup, T, eps, g, i, va2, d_a, work, rb, priced, thr)
    for h in range(G):
        la[h] = load[h]


@kernel
def retarget_scan(S, w, v, vp, c, load, M, q, allowed, dup, T, eps, g, tk, tv, work, oldE, nold, pmin):
    """The repair's pick among retargets of a slot of ``g`` (slots in order, then the
    experts allowed on ``g`` in order, on ties) whose key (:func:`_key`) beats ``(tk, tv)``
    (the best swap's, kind -1: none; a retarget whose key is not larger is not preferred
    to it): slot ``i`` (expert ``a``, ``>= 2`` replicas) goes to expert ``b``
    (``vp[b] = w[b] / (c[b] + 1)``), so every GPU holding ``a`` or ``b`` changes load.
    Where the swap removes the whole excess (``tk >= 1``) only free retargets are
    searched: a retarget that costs a move is taken only where no swap and no free move
    removes it all.  Returns ``(kind, score, cost, i, b)`` as :func:`swap_scan`;
    ``i = -1`` (kind -1): none.  ``work``: :func:`retarget_work`; ``oldE [G, k]``,
    ``nold [G]``: the experts each GPU held before, ascending; ``pmin``: the least
    positive price (0: some move is free).

    The excess removed is summed over the GPUs whose load changes, in index order.  A
    GPU other than ``g`` holding ``b`` contributes exactly 0 unless it is above ``T``
    once ``a`` lost its replica (``b``'s replicas only get lighter), so only the experts
    on those GPUs and on ``g`` are summed (:func:`_hot_sums`).  Any other expert removes
    ``d_a + exlag - max(la[g] + vp[b] - va2 - T, 0)``, at most ``d_a + exlag`` (the
    excess ``a``'s departure removes): where that is not above ``eps`` none is priced."""
    la = work[0]
    for h in range(load.size):
        la[h] = load[h]
    rb = np.array([float(tk), tv, 0.0, 0.0, -1.0, -1.0])
    for i in range(S.shape[1]):
        if c[S[g, i]] >= 2:
            _slot_retargets(S, w, v, vp, c, load, M, q, allowed, dup, T, eps, g, i, work, rb, oldE, nold, pmin,
                            tk < 1)
    if rb[4] < 0:
        return -1, 0.0, 0.0, -1, -1
    return int(rb[0]), rb[2], rb[3], int(rb[4]), int(rb[5])


@kernel
def next_values(w, c):
    """``[E]`` the per-replica load each expert would have with one more replica."""
    vp = np.empty(w.size)
    for e in range(w.size):
        vp[e] = w[e] / (c[e] + 1)
    return vp


@kernel
def moved_slots(S, newm):
    """``mv [G, k]`` whether each slot holds a moved-in replica, ``nmv [G]`` how many."""
    G, k = S.shape
    mv = np.empty((G, k), dtype=np.bool_)
    nmv = np.zeros(G, dtype=np.int64)
    for h in range(G):
        for s in range(k):
            mv[h, s] = newm[h, S[h, s]]
            nmv[h] += mv[h, s]
    return mv, nmv


@kernel
def _moved_row(S, newm, q, exact, h, mv, nmv, maxq):
    """Recompute GPU ``h``'s row of :func:`moved_slots` and :func:`departure_bounds` after a
    step changed its slots (the other rows read nothing of ``h``)."""
    nmv[h] = 0
    m = 0.0
    for s in range(S.shape[1]):
        mv[h, s] = newm[h, S[h, s]]
        nmv[h] += mv[h, s]
        m = max(m, q[h, S[h, s]])
    maxq[h] = m if exact else np.inf


@kernel
def _retarget_reread(S, newm, c, M, rnone, x, y, e1, e2):
    """After a swap of GPUs ``x`` and ``y`` (``e1`` went to ``y``, ``e2`` to ``x``), clear
    ``rnone[g]`` (no undo retarget at ``g``) where the search may now find one: ``g`` is
    ``x`` or ``y``, or one of ``g``'s moved-in experts ``a`` (``>= 2`` replicas) is ``e1``
    or ``e2`` or is held by ``x`` or ``y`` (:func:`undo_retarget_scan` reads loads and
    counts only of ``g`` and the holders of ``a``; ``c``, ``v`` and ``vp`` did not change,
    and no GPU is above the cap)."""
    G, k = S.shape
    rnone[x] = False
    rnone[y] = False
    for g in range(G):
        if not rnone[g]:
            continue
        for s in range(k):
            a = S[g, s]
            if newm[g, a] and c[a] >= 2 and (a == e1 or a == e2 or M[x, a] != 0 or M[y, a] != 0):
                rnone[g] = False
                break


@kernel
def departure_bounds(S, q, exact):
    """``[G]`` per GPU the largest price of a replica leaving it (``q`` of its slots), or
    ``inf`` (no bound) where the prices are not ``exact``: a swap of ``g`` with ``h``
    costs at least ``q[h, a] - q[g, a] - maxq[h]`` (:func:`undo_swap_scan`)."""
    G, k = S.shape
    maxq = np.full(G, np.inf)
    if exact:
        for h in range(G):
            m = 0.0
            for s in range(k):
                m = max(m, q[h, S[h, s]])
            maxq[h] = m
    return maxq


@kernel
def undo_swap_scan(S, vS, load, M, q, mv, nmv, maxq, allowed, dup, T, eps, g, B, part):
    """The cheapest swap of ``g`` with a partner ``h`` (``part[h]`` set; as
    :func:`swap_scan`) that lowers the move cost and keeps both GPUs within ``T + eps``
    (the first in the order ``(i, h, j)`` on ties): ``(i, h, j)``, ``i = -1`` when none.

    Prices are never negative, so a swap lowers the cost only where a departure is
    priced: the slots ``i`` of ``g`` whose departure is priced are tried against every
    slot of the partners (skipping a partner where ``q[h, a] - q[g, a] - maxq[h]``,
    :func:`departure_bounds` with exact sums, is not below ``min(0, best)``), and the
    other slots of ``g`` only against the partners' moved-in slots ``(h, j)`` (``mv``)
    where ``q[g, b] < q[h, b]``; ties between the two passes go by position."""
    G, k = S.shape
    best, bat, bi, bh, bj = np.inf, 0, -1, -1, -1
    lo = (g // B) * B
    for i in range(k):                      # priced departures from g, in scan order
        a = S[g, i]
        out_a = q[g, a]
        if out_a == 0.0:
            continue
        for h in range(lo, lo + B):
            if h == g or not part[h] or not allowed[h, a] or (not dup and M[h, a] != 0):
                continue
            in_a = q[h, a]
            lb = (in_a - out_a) - maxq[h]
            if not (lb < 0.0 and lb < best):
                continue
            for j in range(k):
                b = S[h, j]
                if a == b or not allowed[g, b] or (not dup and M[g, b] != 0):
                    continue
                cost = ((in_a + q[g, b]) - out_a) - q[h, b]
                if not (cost < 0.0 and cost < best):
                    continue
                d = vS[h, j] - vS[g, i]
                if load[g] + d <= T + eps and load[h] - d <= T + eps:
                    best, bat, bi, bh, bj = cost, (i * G + h) * k + j, i, h, j
    for h in range(lo, lo + B):             # free departures from g, priced ones from h
        if h == g or not part[h] or nmv[h] == 0:
            continue
        for j in range(k):
            if not mv[h, j]:
                continue
            b = S[h, j]
            out_b, in_b = q[h, b], q[g, b]
            if not (in_b < out_b and in_b - out_b <= best) or not allowed[g, b] or (not dup and M[g, b] != 0):
                continue
            for i in range(k):
                a = S[g, i]
                if q[g, a] != 0.0 or a == b or not allowed[h, a] or (not dup and M[h, a] != 0):
                    continue
                cost = ((q[h, a] + in_b) - 0.0) - out_b
                at = (i * G + h) * k + j
                if not (cost < 0.0 and (cost < best or (cost == best and at < bat))):
                    continue
                d = vS[h, j] - vS[g, i]
                if load[g] + d <= T + eps and load[h] - d <= T + eps:
                    best, bat, bi, bh, bj = cost, at, i, h, j
    return bi, bh, bj


@kernel
def undo_retarget_scan(S, w, v, vp, c, load, M, q, newm, oldE, nold, allowed, dup, T, eps, g):
    """The cheapest retarget of a moved-in replica of ``g`` back to an expert ``g`` held
    before (``oldE[g]``, ascending) that keeps every GPU under ``T`` (slots, then experts,
    in order): ``(i, b)``, ``i = -1`` when none.  Its cost ``-q[g, a]`` does not depend on
    ``b``, so the first ``b`` that fits is the slot's best."""
    G, k = S.shape
    best, bi, bb = np.inf, -1, -1
    risky = np.empty(G, dtype=np.int64)
    for i in range(k):
        a = S[g, i]
        if not newm[g, a] or c[a] < 2:
            continue
        cost = 0.0 - q[g, a]
        if not (cost < 0.0 and cost < best):
            continue
        va2 = w[a] / max(c[a] - 1, 1)
        # Any other GPU within T + eps that holds no a fits: b's replicas only get lighter.
        nr = 0
        for h in range(G):
            if h == g or M[h, a] != 0 or not load[h] <= T + eps:
                risky[nr] = h
                nr += 1
        for t in range(nold[g]):
            b = oldE[g, t]
            if not allowed[g, b] or b == a or (not dup and M[g, b] != 0):
                continue
            vb2 = vp[b]
            fits = True
            for r in range(nr):
                h = risky[r]
                nh = load[h] + M[h, a] * (va2 - v[a]) + M[h, b] * (vb2 - v[b])
                if h == g:
                    nh += vb2 - va2
                if not nh <= T + eps:
                    fits = False
                    break
            if fits:
                best, bi, bb = cost, i, b
                break
    return bi, bb


@kernel
def do_swap(S, vS, load, M, g, i, h, j):
    """Apply a swap (loads updated incrementally)."""
    a = S[g, i]
    b = S[h, j]
    S[g, i] = b
    S[h, j] = a
    M[g, a] -= 1
    M[g, b] += 1
    M[h, b] -= 1
    M[h, a] += 1
    d = vS[h, j] - vS[g, i]
    vS[g, i], vS[h, j] = vS[h, j], vS[g, i]
    load[g] += d
    load[h] -= d


@kernel
def do_retarget(S, w, v, vp, c, load, vS, M, g, i, b):
    """Apply a retarget (per-replica loads of both experts and every GPU's load recomputed)."""
    a = S[g, i]
    S[g, i] = b
    M[g, a] -= 1
    M[g, b] += 1
    c[a] -= 1
    c[b] += 1
    v[a] = w[a] / max(c[a], 1)
    v[b] = w[b] / max(c[b], 1)
    vp[a] = w[a] / (c[a] + 1)
    vp[b] = w[b] / (c[b] + 1)
    G, k = S.shape
    for h in range(G):
        x = 0.0
        for s in range(k):
            vS[h, s] = v[S[h, s]]
            x += vS[h, s]
        load[h] = x


@kernel
def _heaviest_over(load, T, eps, chosen):
    """The heaviest GPU above ``T + eps`` not yet ``chosen`` (the first on ties); -1: none."""
    g = -1
    for h in range(load.size):
        if load[h] > T + eps and not chosen[h] and (g < 0 or load[h] > load[g]):
            g = h
    return g


@kernel
def repair_over(S, w, v, vp, c, load, vS, M, q, exact, allowed, dup, T, B, max_steps, oldE, nold, pmin):
    """Drive every GPU under ``T``: each step takes, on the first of the (at most 4)
    heaviest GPUs above ``T`` that has one, the better of its best swap and best retarget
    by :func:`_key` (free first, then those that remove the GPU's whole excess, the
    cheapest of them; the swap on ties).  Returns whether it got there.

    The retarget search looks only for retargets that beat the best swap (:func:`retarget_scan`;
    ``oldE``, ``nold``, ``pmin`` as there)."""
    G, k = S.shape
    eps = 1e-12 * max(T, 1e-300)
    chosen = np.zeros(G, dtype=np.bool_)
    work = retarget_work(G, k, w.size)
    wk = np.empty((3, B))
    for _ in range(max_steps):
        n_over = 0
        for h in range(G):
            if load[h] > T + eps:
                n_over += 1
        if n_over == 0:
            return True
        chosen[:] = False
        found = False
        for _r in range(min(4, n_over)):
            g = _heaviest_over(load, T, eps, chosen)
            chosen[g] = True
            sk, ss, sc, si, sh, sj = -1, 0.0, 0.0, -1, -1, -1
            if B > 1:
                sk, ss, sc, si, sh, sj = swap_scan(S, vS, load, M, q, allowed, dup, T, eps, g, B, exact, wk)
            sv = ss - 1e-9 * sc if sk == 2 else ss                     # the swap's key value
            rk, rs, rc, ri, rb = retarget_scan(S, w, v, vp, c, load, M, q, allowed, dup, T, eps, g, sk, sv, work, oldE,
                                               nold, pmin)
            if ri >= 0:
                do_retarget(S, w, v, vp, c, load, vS, M, g, ri, rb)
                found = True
            elif sk >= 0:
                do_swap(S, vS, load, M, g, si, sh, sj)
                found = True
            if found:
                break
        if not found:
            return False
    for h in range(G):
        if not load[h] <= T + eps:
            return False
    return True


@kernel
def _swap_searched(known, part, g, B, exact):
    """After :func:`undo_swap_scan` found no swap of ``g`` with the partners in ``part``:
    ``known[g, h]`` for each of them, and, where prices are ``exact``, ``known[h, g]``
    too (:func:`undo_moves`)."""
    lo = (g // B) * B
    for h in range(lo, lo + B):
        if part[h] and h != g:
            known[g, h] = True
            if exact:
                known[h, g] = True


@kernel
def _swap_forget(known, x, y, B):
    """After a swap of GPUs ``x`` and ``y``: no pair with either of them is known to hold
    no swap any more (:func:`undo_moves`)."""
    lo = (x // B) * B
    for h in range(lo, lo + B):
        known[x, h] = False
        known[h, x] = False
        known[y, h] = False
        known[h, y] = False


@kernel
def undo_moves(S, w, v, vp, c, load, vS, M, q, exact, newm, oldE, nold, allowed, dup, T, B, max_steps):
    """Swaps and retargets that lower the move cost and keep every GPU under ``T``: per
    step, the first GPU (in index order) holding a moved-in replica that has one takes
    its cheapest swap, else its cheapest retarget; stops when none is left.

    ``known[g, h]``: ``g`` has no such swap with ``h``, and neither changed since a search
    found that, so ``g``'s search skips ``h`` (``part``; the answer is the full search's,
    the skipped pairs holding no candidate), and a GPU with no partner left is not
    searched at all.  A search of ``g`` that finds nothing sets
    ``known[g, h]`` for the partners it searched and, where prices are ``exact``,
    ``known[h, g]`` as well: a swap seen from ``h`` is the same swap, with the same
    loads (``d`` negated exactly), the same rules and the same cost (its four prices
    summed in another order, exactly), so ``h``'s search would find nothing with ``g``
    either.  A swap of ``x`` and ``y`` clears every pair with ``x`` or ``y`` (nothing the
    other pairs read changed); a retarget changes loads everywhere and clears all.
    Likewise a GPU whose retarget search found nothing is searched again only where a
    swap touched what it reads (:func:`_retarget_reread`), or after a retarget."""
    G = S.shape[0]
    eps = 1e-12 * max(T, 1e-300)
    known = np.zeros((G, G), dtype=np.bool_)
    part = np.zeros(G, dtype=np.bool_)
    mv, nmv = moved_slots(S, newm)
    maxq = departure_bounds(S, q, exact)
    rnone = np.zeros(G, dtype=np.bool_)   # no undo retarget at g, and nothing it reads changed
    for _ in range(max_steps):
        done = False
        for g in range(G):
            if nmv[g] == 0:
                continue
            n_part = 0                            # partners not known to hold no swap
            if B > 1:
                for h in range((g // B) * B, (g // B + 1) * B):
                    part[h] = not known[g, h] and h != g
                    n_part += part[h]
            if n_part > 0:
                i, h, j = undo_swap_scan(S, vS, load, M, q, mv, nmv, maxq, allowed, dup, T, eps, g, B, part)
                if i >= 0:
                    if not (load[g] <= T + eps and load[h] <= T + eps):
                        rnone[:] = False          # a GPU above the cap bars retargets everywhere
                    do_swap(S, vS, load, M, g, i, h, j)
                    _moved_row(S, newm, q, exact, g, mv, nmv, maxq)
                    _moved_row(S, newm, q, exact, h, mv, nmv, maxq)
                    _retarget_reread(S, newm, c, M, rnone, g, h, S[h, j], S[g, i])
                    _swap_forget(known, g, h, B)
                    done = True
                    break
                _swap_searched(known, part, g, B, exact)
            if rnone[g]:
                continue
            i, b = undo_retarget_scan(S, w, v, vp, c, load, M, q, newm, oldE, nold, allowed, dup, T, eps, g)
            rnone[g] = i < 0
            if i >= 0:
                do_retarget(S, w, v, vp, c, load, vS, M, g, i, b)
                _moved_row(S, newm, q, exact, g, mv, nmv, maxq)
                rnone[:] = False
                known[:, :] = False
                done = True
                break
        if not done:
            return


@kernel
def keep_gpu_slots(new_gpu, old_gpu):
    """One GPU's new experts (``new_gpu [k]``) reordered so that each one that the GPU held
    before (``old_gpu [k]``) keeps one of its old slots; the others fill the remaining
    slots in their order.  Returns ``[k]`` int64."""
    k = new_gpu.size
    top = 0
    for t in range(k):
        top = max(top, new_gpu[t], old_gpu[t])
    out = np.empty(k, dtype=np.int64)
    keep_slots_into(new_gpu, old_gpu, out, np.empty(k, dtype=np.bool_), np.empty(k, dtype=np.bool_),
                    np.empty(k, dtype=np.int64), np.full(top + 2, -1, dtype=np.int64))
    return out


@kernel
def keep_slots_into(new_gpu, old_gpu, out, filled, used, nxt, head):
    """:func:`keep_gpu_slots` written into ``out [k]``: each old slot ``s`` in order keeps
    its expert where ``new_gpu`` has a copy not yet kept (the first such), then the other
    slots take the rest in order.  The copies of each expert in ``new_gpu`` are found
    through a list per expert (``head [e + 1]`` its first position, ``nxt`` the next;
    ``-1`` ends it; ``e = -1`` is an empty slot), not by a search of every slot per slot.
    Work: ``filled, used [k]`` bool, ``nxt [k]``, ``head [> max expert + 1]`` int64, all
    ``-1`` on entry and left so."""
    k = new_gpu.size
    for t in range(k - 1, -1, -1):                      # lists in ascending position
        e = new_gpu[t] + 1
        nxt[t] = head[e]
        head[e] = t
        used[t] = False
    for s in range(k):
        e = old_gpu[s]
        t = head[e + 1]
        filled[s] = t >= 0
        if t >= 0:
            head[e + 1] = nxt[t]
            used[t] = True
            out[s] = e
    t = 0
    for s in range(k):
        if filled[s]:
            continue
        while used[t]:
            t += 1
        out[s] = new_gpu[t]
        used[t] = True
    for t in range(k):
        head[new_gpu[t] + 1] = -1


@kernel
def exact_price(x):
    """Whether price ``x`` is a multiple of ``2^-20`` below ``2^30`` in magnitude: then
    every sum of four such prices is exact in float64 (the swap search's bounds rely on
    it)."""
    y = x * 1048576.0
    return y == np.floor(y) and abs(x) < 1073741824.0


@kernel
def _layer_arrays(w, old, start, G, N, hierarchical, node_move_cost):
    """The repair's arrays for one layer (see the section notes): ``S, v, c, load, M,
    newm, q, exact, allowed, oldE, nold``: ``q [G, E]`` the price of a replica of ``e``
    on ``g`` (0 where ``g`` held ``e``, 1 where its node did, else ``node_move_cost``),
    ``exact`` whether every sum of four prices is exact (:func:`exact_price`), and
    ``oldE [G, k]`` the experts each GPU held before, ascending (``nold [G]`` of them)."""
    R = start.size
    E = w.size
    k, P = R // G, G // N
    newm = np.ones((G, E), dtype=np.bool_)
    M = np.zeros((G, E), dtype=np.int64)
    S = np.empty((G, k), dtype=np.int64)
    oldE = np.empty((G, k), dtype=np.int64)
    nold = np.zeros(G, dtype=np.int64)
    c = np.zeros(E, dtype=np.int64)
    old_on = np.zeros((N, E), dtype=np.bool_)           # the node held e in old / holds it now
    now_on = np.zeros((N, E), dtype=np.bool_)
    for g in range(G):
        for s in range(k):
            e = old[g * k + s]
            if e >= 0:
                if newm[g, e]:                          # insert e into oldE[g], ascending
                    t = nold[g]
                    while t > 0 and oldE[g, t - 1] > e:
                        oldE[g, t] = oldE[g, t - 1]
                        t -= 1
                    oldE[g, t] = e
                    nold[g] += 1
                newm[g, e] = False
                old_on[g // P, e] = True
            e = start[g * k + s]
            S[g, s] = e
            M[g, e] += 1
            c[e] += 1
            now_on[g // P, e] = True
    q = np.empty((G, E))
    far = float(node_move_cost)
    n_far = 0
    allowed = np.ones((G, E), dtype=np.bool_)
    for g in range(G):                  # branch-free (the compiler vectorises it)
        n = g // P
        for e in range(E):
            x = 1.0 if old_on[n, e] else far
            q[g, e] = x if newm[g, e] else 0.0
            n_far += newm[g, e] & (not old_on[n, e])
        if hierarchical:
            for e in range(E):
                allowed[g, e] = now_on[n, e]
    v = np.empty(E)
    for e in range(E):
        v[e] = w[e] / max(c[e], 1)
    load = np.zeros(G)
    for g in range(G):
        for s in range(k):
            load[g] += v[S[g, s]]
    return S, v, c, load, M, newm, q, n_far == 0 or exact_price(far), allowed, oldE, nold


@kernel
def repair_attempt(w, old, start, G, N, hierarchical, node_move_cost, dup, T, max_repair, max_undo):
    """Repair one layer's placement ``start`` ``[R]`` under the cap ``T``, moving as little
    as it can from ``old`` ``[R]`` (:func:`eplb_opt.migrate.replan`): :func:`repair_over`
    (unless every GPU is within ``T (1 + 1e-12)`` already), then :func:`undo_moves`.
    Under the hierarchical policy experts stay in the nodes that hold them in ``start``
    and swaps stay within a node.

    Returns ``(ok, row [R], moves, cost)``: whether it got under ``T`` (False also where
    ``start`` holds a duplicate and ``dup`` is False), the plan with each GPU's kept
    experts in their old slots, and its moves and move cost against ``old``."""
    R = start.size
    k = R // G
    S, v, c, load, M, newm, q, exact, allowed, oldE, nold = _layer_arrays(w, old, start, G, N, hierarchical,
                                                                          node_move_cost)
    row = np.empty(R, dtype=np.int64)
    if not dup and M.max() > 1:
        return False, row, 0, 0.0
    B = G // N if hierarchical else G
    fits = True
    for g in range(G):
        fits = fits and load[g] <= T * (1 + 1e-12)
    vS, vp = slot_values(S, v), next_values(w, c)
    if not fits and not repair_over(S, w, v, vp, c, load, vS, M, q, exact, allowed, dup, T, B, max_repair, oldE, nold,
                                       min(1.0, node_move_cost)):
        return False, row, 0, 0.0
    undo_moves(S, w, v, vp, c, load, vS, M, q, exact, newm, oldE, nold, allowed, dup, T, B, max_undo)
    moves = 0
    off = 0                                             # moves from another node
    filled = np.empty(k, dtype=np.bool_)
    used = np.empty(k, dtype=np.bool_)
    nxt, head = np.empty(k, dtype=np.int64), np.full(w.size + 1, -1, dtype=np.int64)
    for g in range(G):
        for s in range(k):
            e = S[g, s]
            if newm[g, e]:
                moves += 1
                if q[g, e] != 1.0:
                    off += 1
        keep_slots_into(S[g], old[g * k:(g + 1) * k], row[g * k:(g + 1) * k], filled, used, nxt, head)
    return True, row, moves, (moves - off) + off * node_move_cost


@kernel
def _old_index(old_l, E, G, N, stamp, held, node_first, node_at, any_first, any_at):
    """Index one layer of ``old`` (``[R]``; -1: empty) for :func:`transfer_rows` and
    :func:`move_counts`, stamped with ``stamp`` (work arrays are reused across layers
    without clearing): ``held[g * E + e] == stamp`` where GPU ``g`` holds ``e``;
    ``node_first[n * E + e]`` (where ``node_at`` is stamped) and ``any_first[e]`` (where
    ``any_at`` is) the lowest GPU of node ``n``, and of all, holding ``e``."""
    k, P = old_l.size // G, G // N
    for t in range(old_l.size):
        e = old_l[t]
        if e < 0 or e >= E:
            continue
        g = t // k
        held[g * E + e] = stamp
        x = (g // P) * E + e
        if node_at[x] != stamp:
            node_at[x], node_first[x] = stamp, g
        if any_at[e] != stamp:
            any_at[e], any_first[e] = stamp, g


@kernel
def _index_arrays(old, new, G, N):
    """Work arrays of :func:`_old_index` for placements ``old`` and ``new`` ``[L, R]``:
    ``(E, held, node_first, node_at, any_first, any_at)``, stamps starting unset."""
    E = 1
    for x in old.ravel():
        E = max(E, x + 1)
    for x in new.ravel():
        E = max(E, x + 1)
    z = np.zeros
    return E, z(G * E, np.int64), z(N * E, np.int64), z(N * E, np.int64), z(E, np.int64), z(E, np.int64)


@kernel
def transfer_rows(old, new, G, N):
    """Every weight copy ``new`` ``[L, R]`` needs from ``old`` (see
    :func:`eplb_opt.migrate.transfer_list`), layer by layer, slots in order: ``(layer,
    expert, src_gpu, dst_gpu, dst_slot)``, five ``[T]`` int64 arrays.  The source is the
    destination itself where it held the expert, else the lowest GPU of its node holding
    it, else the lowest GPU holding it, else -1."""
    L, R = new.shape
    k, P = R // G, G // N
    n = 0
    for l in range(L):
        for t in range(R):
            if new[l, t] != old[l, t] and new[l, t] >= 0:
                n += 1
    out = np.empty((5, n), dtype=np.int64)
    E, held, node_first, node_at, any_first, any_at = _index_arrays(old, new, G, N)
    i = 0
    for l in range(L):
        _old_index(old[l], E, G, N, l + 1, held, node_first, node_at, any_first, any_at)
        for t in range(R):
            e = new[l, t]
            if e == old[l, t] or e < 0:
                continue
            g = t // k
            x = (g // P) * E + e
            if held[g * E + e] == l + 1:
                src = g
            elif node_at[x] == l + 1:
                src = node_first[x]
            elif any_at[e] == l + 1:
                src = any_first[e]
            else:
                src = -1
            out[0, i], out[1, i], out[2, i], out[3, i], out[4, i] = l, e, src, g, t
            i += 1
    return out


@kernel
def move_counts(old, new, G, N, node_move_cost):
    """Per layer of ``new`` ``[L, R]``, the replicas placed on a GPU that held no replica of
    that expert in ``old`` (moves) and their cost: 1 where ``old`` holds the expert on the
    destination's node, else ``node_move_cost`` (:func:`eplb_opt.align.count_moves`).
    Empty slots (-1) hold and receive nothing.  Returns ``(moves [L], cost [L])``."""
    L, R = new.shape
    k, P = R // G, G // N
    moves = np.zeros(L, dtype=np.int64)
    cost = np.zeros(L)
    E, held, node_first, node_at, any_first, any_at = _index_arrays(old, new, G, N)
    for l in range(L):
        _old_index(old[l], E, G, N, l + 1, held, node_first, node_at, any_first, any_at)
        off = 0
        for t in range(R):
            e = new[l, t]
            if e < 0:
                continue
            g = t // k
            if held[g * E + e] == l + 1:
                continue
            moves[l] += 1
            if node_at[(g // P) * E + e] != l + 1:
                off += 1
        cost[l] = (moves[l] - off) + off * node_move_cost
    return moves, cost


# ---------------------------------------------------------------------------------------
# The hierarchical repair's starts (:func:`eplb_opt.migrate._starts`): where each layer's
# groups live, and partitions a group swap or two away whose heaviest node fits the cap.
# ---------------------------------------------------------------------------------------

@kernel
def group_nodes(p, N, num_groups, gs):
    """Per layer of placements ``p [L, R]`` (``-1``: empty): ``node [L, groups]`` the
    first node holding the most of each group's slots, and ``whole [L]`` whether every
    group sits on exactly one node and every node holds as many groups (an empty slot
    counts as the last group)."""
    L, R = p.shape
    rn = R // N
    node = np.zeros((L, num_groups), dtype=np.int64)
    whole = np.zeros(L, dtype=np.bool_)
    present = np.zeros((N, num_groups + 1), dtype=np.bool_)   # column 0: an empty slot
    per_node = np.zeros(N, dtype=np.int64)
    for l in range(L):
        present[:, :] = False
        per_node[:] = 0
        for t in range(R):
            present[t // rn, p[l, t] // gs + 1] = True
        ok = True
        for x in range(num_groups):
            best, top, total = 0, -1, 0
            for n in range(N):
                s = np.int64(present[n, x + 1]) + (np.int64(present[n, 0]) if x == num_groups - 1 else 0)
                total += s
                if s > top:
                    best, top = n, s
            node[l, x] = best
            per_node[best] += 1
            ok = ok and total == 1
        for n in range(N):
            ok = ok and per_node[n] == per_node[0]
        whole[l] = ok
    return node, whole


@kernel
def _heaviest_node(gl, node, N, nl):
    """The heaviest node's load under group-to-node assignment ``node`` (group loads
    ``gl``, summed group by group in index order into ``nl [N]``)."""
    nl[:] = 0.0
    for x in range(gl.size):
        nl[node[x]] += gl[x]
    return nl.max()


@kernel
def _offer(best_h, best_i, nbest, h, i):
    """Keep candidate ``i`` (heaviest node ``h``) among the ``best_h.size`` lightest, the
    first on ties (a stable sort's first ones); returns how many are kept."""
    limit = best_h.size
    if nbest == limit and not h < best_h[limit - 1]:
        return nbest
    t = min(nbest, limit - 1)
    while t > 0 and best_h[t - 1] > h:
        best_h[t], best_i[t] = best_h[t - 1], best_i[t - 1]
        t -= 1
    best_h[t], best_i[t] = h, i
    return min(nbest + 1, limit)


@kernel
def nearby_partitions(gl, node, whole, N, P, cap, limit):
    """Per layer ``l`` that keeps whole groups per node (``whole``, ``node [L, groups]``:
    :func:`group_nodes`) and whose heaviest node averages above ``cap[l] / (1 + 2e-4)``
    per GPU (``gl [L, groups]`` group loads): the ``limit`` group-to-node assignments one
    group swap away (pairs of groups on different nodes, in index order) whose heaviest
    node averages within that room, lightest first (the first on ties); where none is,
    those two disjoint swaps away (skipped beyond 20000 pairs of swaps).  Returns
    ``(layer [A], node [A, groups])``, layers in order."""
    L, ng = gl.shape
    out_l = np.empty(L * limit, dtype=np.int64)
    out_n = np.empty((L * limit, ng), dtype=np.int64)
    pa, pb = np.empty(ng * ng, dtype=np.int64), np.empty(ng * ng, dtype=np.int64)
    nl, cand = np.empty(N), np.empty(ng, dtype=np.int64)
    best_h, best_i = np.empty(limit), np.empty(limit, dtype=np.int64)
    na = 0
    for l in range(L):
        room = cap[l] / (1 + 2e-4)
        if not whole[l] or not _heaviest_node(gl[l], node[l], N, nl) / P > room:
            continue
        npr = 0
        for a in range(ng):
            for b in range(a + 1, ng):
                if node[l, a] != node[l, b]:
                    pa[npr], pb[npr] = a, b
                    npr += 1
        for depth in (1, 2):
            if depth == 2 and npr * npr > 20000:
                break
            nbest = 0
            n1 = npr if depth == 1 else npr * npr
            for c in range(n1):
                i, j = (c, -1) if depth == 1 else (c // npr, c % npr)
                if depth == 2 and (j <= i or pa[j] == pa[i] or pa[j] == pb[i] or pb[j] == pa[i] or pb[j] == pb[i]):
                    continue
                _swapped(node[l], pa, pb, i, j, cand)
                h = _heaviest_node(gl[l], cand, N, nl) / P
                if h <= room:
                    nbest = _offer(best_h, best_i, nbest, h, c)
            for t in range(nbest):
                c = best_i[t]
                i, j = (c, -1) if depth == 1 else (c // npr, c % npr)
                _swapped(node[l], pa, pb, i, j, out_n[na])
                out_l[na] = l
                na += 1
            if nbest > 0:
                break
    return out_l[:na].copy(), out_n[:na].copy()


@kernel
def _swapped(node, pa, pb, i, j, out):
    """``node`` with groups ``pa[i], pb[i]`` swapped, and ``pa[j], pb[j]`` too unless
    ``j < 0``, written to ``out``."""
    out[:] = node
    out[pa[i]], out[pb[i]] = node[pb[i]], node[pa[i]]
    if j >= 0:
        out[pa[j]], out[pb[j]] = node[pb[j]], node[pa[j]]


@warmer
def _warm_repair() -> None:
    w = np.array([3.0, 1.0, 1.0, 1.0])
    old = np.array([0, 1, 2, 3], dtype=np.int64)
    start = np.array([0, 0, 2, 3], dtype=np.int64)
    repair_attempt(w, old, start, 2, 1, False, 4.0, True, 3.0, 16, 4)
    repair_attempt(w, old, old, 2, 2, True, 4.0, False, 3.0, 16, 4)
    keep_gpu_slots(start[:2], old[:2])
    transfer_rows(old[None, :], start[None, :], 2, 1)
    move_counts(old[None, :], start[None, :], 2, 1, 4.0)
    node, whole = group_nodes(np.array([[0, 1, 2, 3], [0, 2, 1, 3]], dtype=np.int64), 2, 2, 2)
    nearby_partitions(np.array([[3.0, 1.0], [2.0, 2.0]]), node, whole, 2, 1, np.array([2.5, 2.5]), 3)
