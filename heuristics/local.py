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

__all__ = ["gpu_counts", "keep_gpu_slots", "move_counts", "repair_attempt", "transfer_rows"]


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
# on ``g`` is a move: ``g`` held no ``e`` before) and ``cin [G, E]`` (the cost of such an
# arrival).  Partners of GPU ``g`` are the other GPUs of its block of ``B`` (a node under
# the hierarchical policy, all GPUs otherwise), in index order.  Every loop is sequential
# in a fixed order, so the answer is the same on every rank.
# ---------------------------------------------------------------------------------------

@kernel
def pick_update(kind, val, dphi, cost, eps):
    """The pick rule, one candidate (allowed) at a time, in index order: the largest
    excess removed at no cost (``dphi - 1e-9 * cost``), else the most excess removed per
    unit of cost; ties keep the earlier one.  ``kind``: -1 nothing yet, 0 the best costs
    something, 1 it is free; ``val`` its value.  Returns ``(taken, kind, val)``."""
    if not dphi > eps:
        return False, kind, val
    if cost <= 0.0:
        x = dphi - 1e-9 * cost
        if kind < 1 or x > val:
            return True, 1, x
        return False, kind, val
    if kind == 1:
        return False, kind, val
    x = dphi / max(cost, 1e-9)
    if kind < 0 or x > val:
        return True, 0, x
    return False, kind, val


@kernel
def best_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, B):
    """The repair's pick (:func:`pick_update`) among swaps of slot ``i`` of ``g`` (above
    ``T``) with slot ``j`` of a partner ``h``, in the order ``(i, h, j)``: the experts
    trade places, ``d = v[b] - v[a]`` moves from ``h`` to ``g``; the excess over ``T``
    removed is ``dphi``, the cost the arrivals of ``a`` on ``h`` and ``b`` on ``g`` less
    the departures of ``a`` from ``g`` and ``b`` from ``h`` (each priced only where it is
    a move).  Returns ``(kind, score, cost, i, h, j)``; kind -1: none; score: the excess
    removed when free, else the ratio.  A swap with ``d >= 0`` removes no excess from
    ``g`` and is skipped."""
    k = S.shape[1]
    kind, val, score, bc, bi, bh, bj = -1, 0.0, 0.0, 0.0, -1, -1, -1
    lo = (g // B) * B
    exg = max(0.0, load[g] - T)
    for i in range(k):
        a = S[g, i]
        for h in range(lo, lo + B):
            if h == g or not allowed[h, a] or (not dup and M[h, a] != 0):
                continue
            phi0 = exg + max(load[h] - T, 0.0)
            for j in range(k):
                b = S[h, j]
                d = v[b] - v[a]
                if d >= 0.0 or a == b or not allowed[g, b] or (not dup and M[g, b] != 0):
                    continue
                dphi = phi0 - max(load[g] + d - T, 0.0) - max(load[h] - d - T, 0.0)
                if not dphi > eps:
                    continue
                cost = ((cin[h, a] if newm[h, a] else 0.0) + (cin[g, b] if newm[g, b] else 0.0)
                        - (cin[g, a] if newm[g, a] else 0.0) - (cin[h, b] if newm[h, b] else 0.0))
                taken, kind, val = pick_update(kind, val, dphi, cost, eps)
                if taken:
                    score = dphi if kind == 1 else val
                    bc, bi, bh, bj = cost, i, h, j
    return kind, score, bc, bi, bh, bj


@kernel
def holders(S, E):
    """GPUs holding each expert, each once, ascending: ``(start [E + 1], gpu [..])``,
    expert ``e``'s GPUs are ``gpu[start[e]:start[e + 1]]``."""
    G, k = S.shape
    start = np.zeros(E + 1, dtype=np.int64)
    last = np.full(E, -1, dtype=np.int64)
    for h in range(G):
        for s in range(k):
            e = S[h, s]
            if e >= 0 and last[e] != h:
                last[e] = h
                start[e + 1] += 1
    for e in range(E):
        start[e + 1] += start[e]
    gpu = np.empty(start[E], dtype=np.int64)
    fill = start[:E].copy()
    last[:] = -1
    for h in range(G):
        for s in range(k):
            e = S[h, s]
            if e >= 0 and last[e] != h:
                last[e] = h
                gpu[fill[e]] = h
                fill[e] += 1
    return start, gpu


@kernel
def best_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g):
    """The repair's pick among retargets of a slot of ``g`` (slots in order, then the
    experts allowed on ``g`` in order): slot ``i`` (expert ``a``, ``>= 2`` replicas) goes
    to expert ``b``, so every GPU holding ``a`` or ``b`` changes load.  Returns ``(kind,
    score, cost, i, b)`` as :func:`best_swap`.

    The excess removed is summed over the GPUs whose load changes (those holding ``a``,
    then those holding ``b`` and ``g``), not over all ``G``."""
    G, k = S.shape
    E = w.size
    start, gpu = holders(S, E)
    ex0 = np.empty(G)
    for h in range(G):
        ex0[h] = max(load[h] - T, 0.0)
    la = load.copy()                      # loads once ``a`` lost a replica
    kind, val, score, bc, bi, bb = -1, 0.0, 0.0, 0.0, -1, -1
    for i in range(k):
        a = S[g, i]
        if c[a] < 2:
            continue
        va2 = w[a] / max(c[a] - 1, 1)
        da = va2 - v[a]
        d_a = 0.0
        for t in range(start[a], start[a + 1]):
            h = gpu[t]
            la[h] = load[h] + M[h, a] * da
            d_a += ex0[h] - max(la[h] - T, 0.0)
        for b in range(E):
            if b == a or not allowed[g, b] or (not dup and M[g, b] != 0):
                continue
            vb2 = w[b] / (c[b] + 1)
            db = vb2 - v[b]
            dphi = d_a
            on_g = False
            for t in range(start[b], start[b + 1]):
                h = gpu[t]
                nh = la[h] + M[h, b] * db
                if h == g:
                    nh += vb2 - va2
                    on_g = True
                dphi += max(la[h] - T, 0.0) - max(nh - T, 0.0)
            if not on_g:
                dphi += max(la[g] - T, 0.0) - max(la[g] + (vb2 - va2) - T, 0.0)
            if not dphi > eps:
                continue
            cost = (cin[g, b] if newm[g, b] else 0.0) - (cin[g, a] if newm[g, a] else 0.0)
            taken, kind, val = pick_update(kind, val, dphi, cost, eps)
            if taken:
                score = dphi if kind == 1 else val
                bc, bi, bb = cost, i, b
        for t in range(start[a], start[a + 1]):
            la[gpu[t]] = load[gpu[t]]
    return kind, score, bc, bi, bb


@kernel
def undo_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, B):
    """The cheapest swap of ``g`` with a partner (as :func:`best_swap`) that lowers the
    move cost and keeps both GPUs within ``T + eps`` (the first in order on ties):
    ``(i, h, j)``, ``i = -1`` when none."""
    k = S.shape[1]
    best, bi, bh, bj = np.inf, -1, -1, -1
    lo = (g // B) * B
    for i in range(k):
        a = S[g, i]
        out_a = cin[g, a] if newm[g, a] else 0.0
        for h in range(lo, lo + B):
            if h == g or not allowed[h, a] or (not dup and M[h, a] != 0):
                continue
            in_a = cin[h, a] if newm[h, a] else 0.0
            for j in range(k):
                b = S[h, j]
                if a == b or not allowed[g, b] or (not dup and M[g, b] != 0):
                    continue
                cost = in_a + (cin[g, b] if newm[g, b] else 0.0) - out_a - (cin[h, b] if newm[h, b] else 0.0)
                if not (cost < 0.0 and cost < best):
                    continue
                d = v[b] - v[a]
                if load[g] + d <= T + eps and load[h] - d <= T + eps:
                    best, bi, bh, bj = cost, i, h, j
    return bi, bh, bj


@kernel
def undo_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g):
    """The cheapest retarget of a moved-in replica of ``g`` back to an expert ``g`` held
    before that keeps every GPU under ``T`` (slots, then experts, in order): ``(i, b)``,
    ``i = -1`` when none."""
    G, k = S.shape
    E = w.size
    best, bi, bb = np.inf, -1, -1
    for i in range(k):
        a = S[g, i]
        if not newm[g, a] or c[a] < 2:
            continue
        va2 = w[a] / max(c[a] - 1, 1)
        for b in range(E):
            if newm[g, b] or not allowed[g, b] or b == a or (not dup and M[g, b] != 0):
                continue
            cost = (cin[g, b] if newm[g, b] else 0.0) - (cin[g, a] if newm[g, a] else 0.0)
            if not (cost < 0.0 and cost < best):
                continue
            vb2 = w[b] / (c[b] + 1)
            fits = True
            for h in range(G):
                nh = load[h] + M[h, a] * (va2 - v[a]) + M[h, b] * (vb2 - v[b])
                if h == g:
                    nh += vb2 - va2
                if not nh <= T + eps:
                    fits = False
                    break
            if fits:
                best, bi, bb = cost, i, b
    return bi, bb


@kernel
def do_swap(S, v, load, M, g, i, h, j):
    """Apply a swap (loads updated incrementally)."""
    a = S[g, i]
    b = S[h, j]
    S[g, i] = b
    S[h, j] = a
    M[g, a] -= 1
    M[g, b] += 1
    M[h, b] -= 1
    M[h, a] += 1
    d = v[b] - v[a]
    load[g] += d
    load[h] -= d


@kernel
def do_retarget(S, w, v, c, load, M, g, i, b):
    """Apply a retarget (per-replica loads of both experts and every GPU's load recomputed)."""
    a = S[g, i]
    S[g, i] = b
    M[g, a] -= 1
    M[g, b] += 1
    c[a] -= 1
    c[b] += 1
    v[a] = w[a] / max(c[a], 1)
    v[b] = w[b] / max(c[b], 1)
    G, k = S.shape
    for h in range(G):
        x = 0.0
        for s in range(k):
            x += v[S[h, s]]
        load[h] = x


@kernel
def repair_over(S, w, v, c, load, M, newm, cin, allowed, dup, T, B, max_steps):
    """Drive every GPU under ``T``: each step takes, on the first of the (at most 4)
    heaviest GPUs above ``T`` that has one, the better of its best swap and best retarget
    (free first, then the larger score; the swap on ties).  Returns whether it got there."""
    G = S.shape[0]
    eps = 1e-12 * max(T, 1e-300)
    chosen = np.zeros(G, dtype=np.bool_)
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
            g = -1
            for h in range(G):
                if load[h] > T + eps and not chosen[h] and (g < 0 or load[h] > load[g]):
                    g = h
            chosen[g] = True
            sk, ss, sc, si, sh, sj = -1, 0.0, 0.0, -1, -1, -1
            if B > 1:
                sk, ss, sc, si, sh, sj = best_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, B)
            rk, rs, rc, ri, rb = best_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g)
            if rk >= 0 and (sk < 0 or (rc > 0) < (sc > 0) or ((rc > 0) == (sc > 0) and rs > ss)):
                do_retarget(S, w, v, c, load, M, g, ri, rb)
                found = True
            elif sk >= 0:
                do_swap(S, v, load, M, g, si, sh, sj)
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
def undo_moves(S, w, v, c, load, M, newm, cin, allowed, dup, T, B, max_steps):
    """Swaps and retargets that lower the move cost and keep every GPU under ``T``: per
    step, the first GPU (in index order) holding a moved-in replica that has one takes
    its cheapest swap, else its cheapest retarget; stops when none is left."""
    G, k = S.shape
    eps = 1e-12 * max(T, 1e-300)
    for _ in range(max_steps):
        done = False
        for g in range(G):
            moved = False
            for s in range(k):
                if newm[g, S[g, s]]:
                    moved = True
            if not moved:
                continue
            if B > 1:
                i, h, j = undo_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, B)
                if i >= 0:
                    do_swap(S, v, load, M, g, i, h, j)
                    done = True
                    break
            i, b = undo_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g)
            if i >= 0:
                do_retarget(S, w, v, c, load, M, g, i, b)
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
    out = np.empty(k, dtype=np.int64)
    filled = np.zeros(k, dtype=np.bool_)
    used = np.zeros(k, dtype=np.bool_)
    for s in range(k):
        for t in range(k):
            if not used[t] and new_gpu[t] == old_gpu[s]:
                used[t] = True
                filled[s] = True
                out[s] = old_gpu[s]
                break
    t = 0
    for s in range(k):
        if filled[s]:
            continue
        while used[t]:
            t += 1
        out[s] = new_gpu[t]
        used[t] = True
    return out


@kernel
def _layer_arrays(w, old, start, G, N, hierarchical, node_move_cost):
    """The repair's arrays for one layer (see the section notes): ``S, v, c, load, M,
    newm, cin, allowed``."""
    R = start.size
    E = w.size
    k, P = R // G, G // N
    newm = np.ones((G, E), dtype=np.bool_)
    M = np.zeros((G, E), dtype=np.int64)
    S = np.empty((G, k), dtype=np.int64)
    c = np.zeros(E, dtype=np.int64)
    old_on = np.zeros((N, E), dtype=np.bool_)           # the node held e in old / holds it now
    now_on = np.zeros((N, E), dtype=np.bool_)
    for g in range(G):
        for s in range(k):
            e = old[g * k + s]
            if e >= 0:
                newm[g, e] = False
                old_on[g // P, e] = True
            e = start[g * k + s]
            S[g, s] = e
            M[g, e] += 1
            c[e] += 1
            now_on[g // P, e] = True
    cin = np.empty((G, E))
    allowed = np.ones((G, E), dtype=np.bool_)
    for g in range(G):
        for e in range(E):
            cin[g, e] = 1.0 if old_on[g // P, e] else float(node_move_cost)
            if hierarchical:
                allowed[g, e] = now_on[g // P, e]
    v = np.empty(E)
    for e in range(E):
        v[e] = w[e] / max(c[e], 1)
    load = np.zeros(G)
    for g in range(G):
        for s in range(k):
            load[g] += v[S[g, s]]
    return S, v, c, load, M, newm, cin, allowed


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
    S, v, c, load, M, newm, cin, allowed = _layer_arrays(w, old, start, G, N, hierarchical, node_move_cost)
    row = np.empty(R, dtype=np.int64)
    if not dup and M.max() > 1:
        return False, row, 0, 0.0
    B = G // N if hierarchical else G
    fits = True
    for g in range(G):
        fits = fits and load[g] <= T * (1 + 1e-12)
    if not fits and not repair_over(S, w, v, c, load, M, newm, cin, allowed, dup, T, B, max_repair):
        return False, row, 0, 0.0
    undo_moves(S, w, v, c, load, M, newm, cin, allowed, dup, T, B, max_undo)
    moves = 0
    off = 0                                             # moves from another node
    for g in range(G):
        for e in range(w.size):
            if newm[g, e]:
                moves += M[g, e]
                if cin[g, e] != 1.0:
                    off += M[g, e]
        row[g * k:(g + 1) * k] = keep_gpu_slots(S[g], old[g * k:(g + 1) * k])
    return True, row, moves, (moves - off) + off * node_move_cost


@kernel
def _first_holder(o, e, lo, hi, k):
    """The lowest GPU in ``lo .. hi - 1`` whose slots in ``o`` ``[R]`` hold ``e``; -1: none."""
    for t in range(lo * k, hi * k):
        if o[t] == e:
            return t // k
    return -1


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
    i = 0
    for l in range(L):
        for t in range(R):
            e = new[l, t]
            if e == old[l, t] or e < 0:
                continue
            g = t // k
            src = _first_holder(old[l], e, g, g + 1, k)
            if src < 0:
                src = _first_holder(old[l], e, (g // P) * P, (g // P + 1) * P, k)
            if src < 0:
                src = _first_holder(old[l], e, 0, G, k)
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
    for l in range(L):
        off = 0
        for t in range(R):
            e = new[l, t]
            if e < 0:
                continue
            g = t // k
            if _first_holder(old[l], e, g, g + 1, k) >= 0:
                continue
            moves[l] += 1
            if _first_holder(old[l], e, (g // P) * P, (g // P + 1) * P, k) < 0:
                off += 1
        cost[l] = (moves[l] - off) + off * node_move_cost
    return moves, cost


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
