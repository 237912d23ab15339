"""Robust placement over several load windows: local search on the worst window's or the
mean window's busiest GPU.

A plan made for the windows' total can leave one window badly balanced.  Starting from
any valid placement (usually the plan for the total), :func:`robust_refine` applies, per
layer, the swap of two replicas or retarget of a slot that lowers the objective most,
taken on the GPUs that set it, until none does (compiled kernels: :mod:`heuristics.compile`):

* ``"worst"``: ``max_w max_g load[w, g]``;
* ``"mean"``: ``mean_w max_g load[w, g]``.

Swaps stay within a node (``num_nodes`` blocks of GPUs; pass 1 for the global policy)
and retargets only to experts the node already holds, so a hierarchical plan stays
hierarchical.  Never worse than the start (only improving steps are taken).
"""

from __future__ import annotations

import time

import numpy as np

from .compile import kernel, warmer

__all__ = ["OBJECTIVES", "robust_objective", "robust_refine"]

OBJECTIVES = ("worst", "mean")

# Steps per kernel call when a deadline is set: the clock is read between calls.
_CHUNK = 16


def robust_objective(loads: np.ndarray, objective: str) -> np.ndarray:
    """Objective of GPU loads ``[..., W, G]`` (last two axes: windows, GPUs)."""
    per_window = loads.max(axis=-1)
    return per_window.max(axis=-1) if objective == "worst" else per_window.mean(axis=-1)


# ---------------------------------------------------------------------------------------
# One layer's state: S [G, k] experts of the slots, M [G, E] replicas per GPU, c [E]
# counts, v [W, E] per-replica loads, loads [W, G]; allowed [G, E] experts a GPU may take
# (those its node holds).  Every sum runs in a fixed sequential order.


@kernel
def _refresh(w, S, c, v, loads):
    """Per-replica and GPU loads of every window from the counts ``c``."""
    W, E = w.shape
    G, k = S.shape
    for x in range(W):
        for e in range(E):
            v[x, e] = w[x, e] / max(c[e], 1)
        for g in range(G):
            s = 0.0
            for i in range(k):
                s += v[x, S[g, i]]
            loads[x, g] = s


@kernel
def _holders(S, E, holders, hn):
    """``holders[e, :hn[e]]``: the GPUs holding ``e``, ascending."""
    G, k = S.shape
    hn[:] = 0
    for g in range(G):
        for i in range(k):
            e = S[g, i]
            if hn[e] == 0 or holders[e, hn[e] - 1] != g:
                holders[e, hn[e]] = g
                hn[e] += 1


@kernel
def _critical(loads, worst, crit):
    """GPUs that set the objective: the argmax of each window, worst window first (one
    for "worst", up to four for "mean"); returns how many are in ``crit``."""
    W = loads.shape[0]
    top = np.empty(W)
    for x in range(W):
        top[x] = loads[x].max()
    n = 0
    for x in np.argsort(-top, kind="mergesort"):
        g = int(np.argmax(loads[x]))
        new = True
        for t in range(n):
            new = new and crit[t] != g
        if new:
            crit[n] = g
            n += 1
        if worst or n >= 4:
            break
    return n


@kernel
def _threshold(best, W, worst):
    """What a candidate's accumulated objective must stay below to be worth finishing:
    ``best`` (mean: times ``W``) with a 1e-9 relative margin, so a candidate cut by a
    lower bound is one that rounding could not have brought below ``best``."""
    return best * (1.0 + 1e-9) * (1.0 if worst else W)


@kernel
def _suffix(lb, worst, suf):
    """``suf[x]``: the windows ``x..``'s lower bounds combined (max or sum); ``suf[W]``
    the empty one."""
    W = lb.shape[0]
    suf[W] = -np.inf if worst else 0.0
    for x in range(W - 1, -1, -1):
        suf[x] = max(suf[x + 1], lb[x]) if worst else suf[x + 1] + lb[x]
    return suf[0]


@kernel
def _total(pw, worst):
    """The objective of per-window busiest loads ``pw``, summed in window order."""
    acc = -np.inf if worst else 0.0
    for x in range(pw.shape[0]):
        acc = max(acc, pw[x]) if worst else acc + pw[x]
    return acc if worst else acc / pw.shape[0]


@kernel
def _swaps(S, M, v, loads, allowed, wo, g, node_size, worst, dup, best):
    """Swaps of a slot ``i`` of ``g`` with slot ``j`` of ``h`` in its node, order (i, h,
    j); ``best`` ``[value, kind, g, i, h, j]`` keeps the first lowest.  A window's new
    busiest GPU is at least the heaviest GPU but ``g`` and ``h``, ``g`` less expert
    ``a``'s whole replica load, and the pair's mean: candidates whose bound (per slot,
    per ``(i, h)``, then window by window) cannot beat ``best`` are cut."""
    W = loads.shape[0]
    G, k = S.shape
    i1 = np.full(W, -1, dtype=np.int64)             # per window: the two heaviest GPUs but g
    v1 = np.full(W, -np.inf)
    v2 = np.full(W, -np.inf)
    for x in range(W):
        for q in range(G):
            if q != g and loads[x, q] > v1[x]:
                i1[x], v1[x] = q, loads[x, q]
        for q in range(G):
            if q != g and q != i1[x] and loads[x, q] > v2[x]:
                v2[x] = loads[x, q]
    lb, suf, sufi, pw = np.empty(W), np.empty(W + 1), np.empty(W + 1), np.empty(W)
    thr = _threshold(best[0], W, worst)
    n0 = (g // node_size) * node_size
    for i in range(k):
        a = S[g, i]
        for t in range(W):
            x = wo[t]
            lb[t] = max(v2[x], loads[x, g] - v[x, a])
        if _suffix(lb, worst, sufi) >= thr:
            continue
        for h in range(n0, n0 + node_size):
            if h == g or not allowed[h, a]:
                continue
            # The pair's bound in the heaviest window with the slot's in the others first.
            x0 = wo[0]
            lbt = max(max(v2[x0] if h == i1[x0] else v1[x0], loads[x0, g] - v[x0, a]),
                      0.5 * (loads[x0, g] + loads[x0, h]))
            if (max(lbt, sufi[1]) if worst else lbt + sufi[1]) >= thr:
                continue
            s = -np.inf if worst else 0.0               # _suffix, inline: called per pair
            suf[W] = s
            for t in range(W - 1, -1, -1):
                x = wo[t]
                r = v2[x] if h == i1[x] else v1[x]
                lbt = max(max(r, loads[x, g] - v[x, a]), 0.5 * (loads[x, g] + loads[x, h]))
                s = max(s, lbt) if worst else s + lbt
                suf[t] = s
            if s >= thr:
                continue
            for j in range(k):
                b = S[h, j]
                if a == b or not allowed[g, b] or (not dup and (M[h, a] != 0 or M[g, b] != 0)):
                    continue
                acc = -np.inf if worst else 0.0
                cut = False
                for t in range(W):
                    x = wo[t]
                    d = v[x, b] - v[x, a]
                    pw[x] = max(max(loads[x, g] + d, loads[x, h] - d), v2[x] if h == i1[x] else v1[x])
                    acc = max(acc, pw[x]) if worst else acc + pw[x]
                    if (max(acc, suf[t + 1]) if worst else acc + suf[t + 1]) >= thr:
                        cut = True
                        break
                if not cut:
                    val = _total(pw, worst)
                    if val < best[0]:
                        best[0], best[1], best[2], best[3], best[4], best[5] = val, 0.0, g, i, h, j
                        thr = _threshold(val, W, worst)


@kernel
def _top_others(loads, M, a, da, g, tq, tu):
    """Per window ``x``: the ``K`` heaviest GPUs but ``g`` (``tq[x]``, loads ``tu[x]``
    descending) once expert ``a``'s replicas weigh ``da[x]`` more each; returns how many
    were found (``min(K, G - 1)``)."""
    W, G = loads.shape
    K = tq.shape[1]
    n = 0
    for x in range(W):
        n = 0
        for q in range(G):
            if q == g:
                continue
            u = loads[x, q] + M[q, a] * da[x]
            t = n if n < K else K
            while t > 0 and tu[x, t - 1] < u:
                t -= 1
            if t < K:
                for s in range(min(n, K - 1), t, -1):
                    tq[x, s], tu[x, s] = tq[x, s - 1], tu[x, s - 1]
                tq[x, t], tu[x, t] = q, u
                n = min(n + 1, K)
    return n


@kernel
def _retarget_slot(w, M, c, v, loads, allowed, holders, hn, wo, tq, tu, nt, va2, da, gb, sufs, few, pw,
                   g, i, a, worst, dup, best):
    """Retargets of slot ``i`` of ``g`` (expert ``a``) to every allowed ``b``, in order.
    A window's busiest GPU after one: ``g``'s new load, ``b``'s holders priced in full,
    and the others (``a``'s holders heavier by ``da`` per replica, the rest as they are)
    from the top list ``tq``/``tu``, or a scan when every GPU in it holds ``b``.
    ``sufs[0]``/``sufs[1]``: suffix bounds for any ``b`` / ``b`` on fewer than ``K``
    GPUs (``few``: whether those can still win)."""
    W, E = w.shape
    G = loads.shape[1]
    K = tq.shape[1]
    thr = _threshold(best[0], W, worst)
    for b in range(E):
        if b == a or not allowed[g, b] or (not dup and M[g, b] != 0):
            continue
        s = 1 if hn[b] < K else 0
        if s == 1 and not few:
            continue
        acc = -np.inf if worst else 0.0
        cut = False
        for t in range(W):
            x = wo[t]
            vb2 = w[x, b] / (c[b] + 1)
            db = vb2 - v[x, b]
            top = gb[x] + M[g, b] * db + (vb2 - va2[x])            # g's new load
            if (max(max(acc, top), sufs[s, t + 1]) if worst else acc + top + sufs[s, t + 1]) >= thr:
                cut = True
                break
            for u in range(hn[b]):
                q = holders[b, u]
                if q != g:
                    top = max(top, loads[x, q] + M[q, a] * da[x] + M[q, b] * db)
            found = False
            for u in range(nt):
                if M[tq[x, u], b] == 0:
                    top = max(top, tu[x, u])
                    found = True
                    break
            if not found and nt < G - 1:             # every GPU listed holds b: scan them all
                for q in range(G):
                    if q != g and M[q, b] == 0:
                        top = max(top, loads[x, q] + M[q, a] * da[x])
            pw[x] = top
            acc = max(acc, top) if worst else acc + top
            if (max(acc, sufs[s, t + 1]) if worst else acc + sufs[s, t + 1]) >= thr:
                cut = True
                break
        if not cut:
            val = _total(pw, worst)
            if val < best[0]:
                best[0], best[1], best[2], best[3], best[4], best[5] = val, 1.0, g, i, b, 0
                thr = _threshold(val, W, worst)


@kernel
def _retargets(w, S, M, c, v, loads, allowed, holders, hn, wo, g, worst, dup, best):
    """Retargets of a slot ``i`` of ``g`` (expert ``a``, ``c >= 2``) to an expert ``b``
    allowed on ``g``, order (i, b).  Only the GPUs holding ``a`` or ``b`` change load.
    Bounds cut candidates that cannot beat ``best``: ``g``'s new load is at least its
    load less ``a``'s replica (``b``'s share only adds), and with ``b`` on fewer than
    ``K`` GPUs the busiest other is at least the ``K``-th heaviest other."""
    W, E = w.shape
    K = 4
    tq, tu = np.empty((W, K), dtype=np.int64), np.empty((W, K))
    va2, da, gb = np.empty(W), np.empty(W), np.empty(W)
    lb, sufs, pw = np.empty(W), np.empty((2, W + 1)), np.empty(W)
    for i in range(S.shape[1]):
        a = S[g, i]
        ca = c[a]
        if ca < 2:
            continue
        for x in range(W):
            va2[x] = w[x, a] / max(ca - 1, 1)
            da[x] = va2[x] - v[x, a]
            gb[x] = loads[x, g] + M[g, a] * da[x]
        for t in range(W):
            lb[t] = gb[wo[t]] - va2[wo[t]]
        if _suffix(lb, worst, sufs[0]) >= _threshold(best[0], W, worst):
            continue
        nt = _top_others(loads, M, a, da, g, tq, tu)
        for t in range(W):
            lb[t] = max(lb[t], tu[wo[t], K - 1]) if nt == K else lb[t]
        few = _suffix(lb, worst, sufs[1]) < _threshold(best[0], W, worst)
        _retarget_slot(w, M, c, v, loads, allowed, holders, hn, wo, tq, tu, nt, va2, da, gb, sufs, few, pw,
                       g, i, a, worst, dup, best)


@kernel
def _apply(S, M, c, v, loads, best):
    """Apply the step in ``best``; returns whether counts changed (loads to recompute)."""
    g, i = int(best[2]), int(best[3])
    a = S[g, i]
    if best[1] == 0.0:
        h, j = int(best[4]), int(best[5])
        b = S[h, j]
        S[g, i], S[h, j] = b, a
        M[g, a] -= 1
        M[g, b] += 1
        M[h, b] -= 1
        M[h, a] += 1
        for x in range(loads.shape[0]):
            d = v[x, b] - v[x, a]
            loads[x, g] += d
            loads[x, h] -= d
        return False
    b = int(best[4])
    S[g, i] = b
    M[g, a] -= 1
    M[g, b] += 1
    c[a] -= 1
    c[b] += 1
    return True


@kernel
def _allowed(S, E, node_size):
    """``[G, E]``: whether some GPU of ``g``'s node holds ``e``."""
    G, k = S.shape
    allowed = np.zeros((G, E), dtype=np.bool_)
    for g in range(G):
        n0 = (g // node_size) * node_size
        for q in range(n0, n0 + node_size):
            for i in range(k):
                allowed[g, S[q, i]] = True
    return allowed


@kernel
def _state(w, S):
    """``(M, c, v, loads)`` of placement ``S``."""
    W, E = w.shape
    G, k = S.shape
    M = np.zeros((G, E), dtype=np.int64)
    c = np.zeros(E, dtype=np.int64)
    for g in range(G):
        for i in range(k):
            M[g, S[g, i]] += 1
            c[S[g, i]] += 1
    v, loads = np.empty((W, E)), np.empty((W, G))
    _refresh(w, S, c, v, loads)
    return M, c, v, loads


@kernel
def _step(w, S, M, c, v, loads, allowed, node_size, worst, dup, best):
    """One step's choice: the best swap or retarget on the critical GPUs in ``best``
    (``best[0]`` its objective, ``inf`` if none); returns the objective now."""
    W, E = w.shape
    G = S.shape[0]
    f0 = -np.inf if worst else 0.0
    top = np.empty(W)
    for x in range(W):
        top[x] = loads[x].max()
        f0 = max(f0, top[x]) if worst else f0 + top[x]
    f0 = f0 if worst else f0 / W
    wo = np.argsort(-top, kind="mergesort")          # windows heaviest first, for the bounds
    holders, hn = np.empty((E, G), dtype=np.int64), np.empty(E, dtype=np.int64)
    _holders(S, E, holders, hn)
    crit = np.empty(4, dtype=np.int64)
    best[0] = np.inf
    for t in range(_critical(loads, worst, crit)):
        if node_size > 1:
            _swaps(S, M, v, loads, allowed, wo, crit[t], node_size, worst, dup, best)
        _retargets(w, S, M, c, v, loads, allowed, holders, hn, wo, crit[t], worst, dup, best)
    return f0


@kernel
def _refine_kernel(w, S, allowed, node_size, worst, dup, max_steps):
    """Improving steps on ``S`` (in place) until none is left (returns ``(True, steps)``)
    or ``max_steps`` (``(False, steps)``).  GPU loads follow a swap incrementally and are
    recomputed after a retarget."""
    M, c, v, loads = _state(w, S)
    best = np.empty(6)
    for step in range(max_steps):
        f0 = _step(w, S, M, c, v, loads, allowed, node_size, worst, dup, best)
        if not best[0] < f0 - 1e-12 * max(f0, 1e-300):
            return True, step
        if _apply(S, M, c, v, loads, best):
            _refresh(w, S, c, v, loads)
    return False, max_steps


def _refine_layer(w: np.ndarray, S: np.ndarray, allowed: np.ndarray, node_size: int, worst: bool, dup: bool,
                  max_steps: int, deadline: float | None) -> bool:
    """Improving steps on ``S`` until none is left (returns True) or the step cap or
    deadline; with a deadline the kernel runs ``_CHUNK`` steps at a time and the clock
    is read between its calls."""
    left = max_steps
    while left > 0:
        if deadline is not None and time.perf_counter() >= deadline:
            return False
        steps = left if deadline is None else min(left, _CHUNK)
        done, _ = _refine_kernel(w, S, allowed, node_size, worst, dup, steps)
        if done:
            return True
        left -= steps
    return False

def robust_refine(
    windows: np.ndarray,
    phy2log: np.ndarray,
    num_gpus: int,
    num_nodes: int = 1,
    objective: str = "worst",
    max_steps: int = 64,
    allow_duplicates: bool = True,
    deadline: float | None = None,
    layers: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lower the worst or mean window's busiest GPU of every layer (see module docs).

    Args:
        windows: ``[W, L, E]`` non-negative loads per window.
        phy2log: ``[L, R]`` start placement (hierarchical: node ``n`` holds slots
            ``n * R / N ..``).
        num_gpus: ``G``; num_nodes: blocks of GPUs swaps stay within.
        objective: ``"worst"`` or ``"mean"``.
        max_steps: improving steps per layer at most.
        deadline: ``time.perf_counter()`` value after which no step starts.
        layers: the layers to work on (default all).

    Returns:
        ``(phy2log [L, R], converged [L] bool)``: ``converged`` marks layers where no
        improving step was left (not cut by ``max_steps`` or the deadline).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    W, L, E = windows.shape
    out = np.array(phy2log, dtype=np.int64, copy=True)
    P = num_gpus // num_nodes
    converged = np.zeros(L, dtype=bool)
    worst = objective == "worst"
    for l in (range(L) if layers is None else layers):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        w = np.ascontiguousarray(windows[:, l, :], dtype=np.float64)
        S = out[l].reshape(num_gpus, -1).copy()
        # Experts stay in the node that holds them (as the layer started).
        allowed = _allowed(S, E, P)
        converged[l] = _refine_layer(w, S, allowed, P, worst, allow_duplicates, max_steps, deadline)
        out[l] = S.ravel()
    return out, converged


@warmer
def _warm() -> None:
    windows = np.array([[[4.0, 4.0, 1.0, 1.0]], [[1.0, 1.0, 4.0, 4.0]]])
    for objective in OBJECTIVES:
        robust_refine(windows, np.array([[0, 1, 2, 3]]), 2, 1, objective)
