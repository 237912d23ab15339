"""Relabelling a new plan to the placement deployed now (:func:`eplb_opt.align.align_to_previous`),
compiled: an exact maximum-weight assignment and the per-layer matching built on it.

:func:`max_assignment` is the Hungarian method in its shortest-augmenting-path form
(rows added one at a time, dual potentials kept feasible, ``O(n^3)`` on a dense
``n x n`` integer score matrix).  Integer arithmetic throughout, every loop in index
order: the optimum is exact and the tie-break (which of several optimal matchings) is
the same on every machine.  :func:`align_rows` computes the score matrices from replica
lists (``O(G^2 k)`` per layer, not ``O(G^2 E)``) and keeps every replica that stays on
its GPU in its old slot.
"""

from __future__ import annotations

import numpy as np

from .compile import kernel, warmer
from .local import keep_slots_into

__all__ = ["align_rows", "max_assignment"]


@kernel
def max_assignment(score):
    """A maximum-weight perfect matching of the square integer matrix ``score [n, n]``:
    ``perm [n]`` int64, row ``i`` matched to column ``perm[i]``.  Minimises ``-score``
    by successive shortest augmenting paths over reduced costs (potentials ``u`` for
    rows, ``v`` for columns); a column index 0 is the virtual start of every path."""
    n = score.shape[0]
    big = np.int64(1) << np.int64(62)
    u = np.zeros(n + 1, dtype=np.int64)
    v = np.zeros(n + 1, dtype=np.int64)
    row_of = np.zeros(n + 1, dtype=np.int64)       # column j (1-based) -> row (1-based), 0: free
    prev = np.zeros(n + 1, dtype=np.int64)         # previous column on the shortest path
    dist = np.empty(n + 1, dtype=np.int64)
    done = np.empty(n + 1, dtype=np.bool_)
    for r in range(1, n + 1):
        row_of[0] = r
        col = 0
        dist[:] = big
        done[:] = False
        while True:
            done[col] = True
            i = row_of[col]
            step, nxt = big, -1
            for j in range(1, n + 1):
                if done[j]:
                    continue
                red = -score[i - 1, j - 1] - u[i] - v[j]
                if red < dist[j]:
                    dist[j] = red
                    prev[j] = col
                if dist[j] < step:
                    step, nxt = dist[j], j
            for j in range(n + 1):
                if done[j]:
                    u[row_of[j]] += step
                    v[j] -= step
                else:
                    dist[j] -= step
            col = nxt
            if row_of[col] == 0:
                break
        while col != 0:                             # flip the path
            back = prev[col]
            row_of[col] = row_of[back]
            col = back
    perm = np.empty(n, dtype=np.int64)
    for j in range(1, n + 1):
        perm[row_of[j] - 1] = j - 1
    return perm


@kernel
def _overlap(new_l, old_cnt, new_cnt, seen, rows_lo, rows_hi, cols_lo, cols_hi, k, N_cols_step):
    """``[rows, cols]`` shared replicas: entry ``(i, j)`` sums ``min(new_cnt[r, e],
    old_cnt[c, e])`` over the distinct experts ``e`` of row unit ``r = rows_lo + i``
    (units of ``N_cols_step`` GPUs of ``k`` slots in ``new_l``) and column unit ``c``."""
    nr, nc = rows_hi - rows_lo, cols_hi - cols_lo
    out = np.zeros((nr, nc), dtype=np.int64)
    span = N_cols_step * k
    for i in range(nr):
        r = rows_lo + i
        for t in range(r * span, (r + 1) * span):
            e = new_l[t]
            if seen[e] == r:
                continue
            seen[e] = r
            for j in range(nc):
                a, b = new_cnt[r, e], old_cnt[cols_lo + j, e]
                out[i, j] += a if a < b else b
    for i in range(nr):                               # leave ``seen`` clear for the next call
        r = rows_lo + i
        for t in range(r * span, (r + 1) * span):
            seen[new_l[t]] = -1
    return out


@kernel
def _prefer_diagonal(score):
    """``(n + 1) score + I``: the same optimal matchings (the diagonal adds at most ``n``),
    and among them one that keeps the most units in place (``i -> i``), so an unchanged
    layout is never relabelled."""
    out = score * (score.shape[0] + 1)
    for i in range(score.shape[0]):
        out[i, i] += 1
    return out


@kernel
def _unit_counts(row, units, span, cnt):
    """``cnt[u, e]`` += replicas of ``e`` in unit ``u`` (``span`` slots each) of ``row``."""
    for u in range(units):
        for t in range(u * span, (u + 1) * span):
            cnt[u, row[t]] += 1


@kernel
def _clear_counts(row, units, span, cnt):
    """Undo :func:`_unit_counts` (only the entries it touched)."""
    for u in range(units):
        for t in range(u * span, (u + 1) * span):
            cnt[u, row[t]] = 0


@kernel
def _unique_best(score):
    """The permutation ``perm`` maximising the total of ``score[i, perm[i]]`` when exactly
    one does, else ``perm[0] = -1``: every permutation of the ``n x n`` matrix, in the
    order of Heap's method (for small ``n`` only)."""
    n = score.shape[0]
    p = np.arange(n)
    c = np.zeros(n, dtype=np.int64)
    best = np.empty(n, dtype=np.int64)
    top, ties = np.int64(0), 0
    for i in range(n):
        top += score[i, p[i]]
    best[:] = p
    ties = 1
    i = 0
    while i < n:
        if c[i] < i:
            j = 0 if i % 2 == 0 else c[i]
            p[j], p[i] = p[i], p[j]
            c[i] += 1
            i = 0
            t = np.int64(0)
            for r in range(n):
                t += score[r, p[r]]
            if t > top:
                top, ties = t, 1
                best[:] = p
            elif t == top:
                ties += 1
        else:
            c[i] = 0
            i += 1
    if ties > 1:
        best[0] = -1
    return best


@kernel
def _match_nodes(new_l, co, cn, nn, no, seen, perms, old_l, N, P, k):
    """Layer ``new_l``'s node matching (``node_of [N]``, new node -> old node) and, in
    ``perms[a, node_of[a]]``, the GPU matching within each matched pair (see
    :func:`align_rows`).  A node pair scores ``node overlap * (R + 1) + best GPU
    overlap``: the GPU overlaps of all pairs (at most ``R`` in any matching) and the
    diagonal preference (at most ``N``) only break ties of the node overlap's total, so
    where one node matching has the largest node overlap alone (``N <= 6``, every
    permutation tried) it is the answer and only its ``N`` pairs are matched GPU by GPU;
    otherwise all ``N^2`` pairs are."""
    R = new_l.size
    node_of = np.zeros(1, dtype=np.int64)
    score = np.zeros((N, N), dtype=np.int64)
    if N > 1:
        _unit_counts(new_l, N, P * k, nn)
        _unit_counts(old_l, N, P * k, no)
        score = _overlap(new_l, no, nn, seen, 0, N, 0, N, k, P)
        _clear_counts(new_l, N, P * k, nn)
        _clear_counts(old_l, N, P * k, no)
        if N <= 6:
            node_of = _unique_best(score)
            if node_of[0] >= 0:
                for a in range(N):
                    b = node_of[a]
                    sub = _overlap(new_l, co, cn, seen, a * P, (a + 1) * P, b * P, (b + 1) * P, k, 1)
                    perms[a, b] = max_assignment(_prefer_diagonal(sub))
                return node_of
        score *= R + 1
    for a in range(N):
        for b in range(N):
            sub = _overlap(new_l, co, cn, seen, a * P, (a + 1) * P, b * P, (b + 1) * P, k, 1)
            perms[a, b] = max_assignment(_prefer_diagonal(sub))
            if N > 1:
                for i in range(P):
                    score[a, b] += sub[i, perms[a, b, i]]
    if N > 1:
        node_of = max_assignment(_prefer_diagonal(score))
    return node_of


@kernel
def align_rows(new, old, G, N, E):
    """``new [L, R]`` relabelled to keep as many replicas of ``old [L, R]`` in place as
    possible (experts in ``0 .. E - 1``): per layer, nodes matched by their shared
    replicas first (when ``N > 1``), and among the node matchings that share the most,
    one whose GPUs, matched within matched nodes, share the most (each node pair scores
    ``node overlap * (R + 1) + best GPU overlap``); each new GPU's experts then take the
    old slots of those it keeps (:func:`keep_gpu_slots`, written in place)."""
    L, R = new.shape
    k, P = R // G, G // N
    out = np.empty_like(new)
    cn = np.zeros((G, E), dtype=np.int64)
    co = np.zeros((G, E), dtype=np.int64)
    nn = np.zeros((N, E), dtype=np.int64)
    no = np.zeros((N, E), dtype=np.int64)
    seen = np.full(E, -1, dtype=np.int64)
    gpu_of = np.empty(G, dtype=np.int64)
    perms = np.empty((N, N, P), dtype=np.int64)
    filled = np.empty(k, dtype=np.bool_)
    used = np.empty(k, dtype=np.bool_)
    nxt, head = np.empty(k, dtype=np.int64), np.full(E + 1, -1, dtype=np.int64)
    for l in range(L):
        _unit_counts(new[l], G, k, cn)
        _unit_counts(old[l], G, k, co)
        node_of = _match_nodes(new[l], co, cn, nn, no, seen, perms, old[l], N, P, k)
        for a in range(N):
            b = node_of[a]
            for i in range(P):
                gpu_of[a * P + i] = b * P + perms[a, b, i]
        for g in range(G):
            h = gpu_of[g]
            keep_slots_into(new[l, g * k:(g + 1) * k], old[l, h * k:(h + 1) * k], out[l, h * k:(h + 1) * k], filled,
                            used, nxt, head)
        _clear_counts(new[l], G, k, cn)
        _clear_counts(old[l], G, k, co)
    return out


@warmer
def _warm_matching() -> None:
    p = np.array([[0, 1, 2, 3, 1, 0, 3, 2]], dtype=np.int64)
    align_rows(p, p[:, ::-1].copy(), 4, 2, 4)
    align_rows(p, p, 2, 1, 4)
