"""Compiled kernels of the plan verifier and of :func:`eplb_opt.plan.derive_maps`.

These loops read a placement ``phy2log`` (``[L, R]`` int64, ``-1`` for an empty slot
of a masked GPU) slot by slot.  They are written apart from the heuristics' kernels and
share no helper with them (issue 15), so that one bug cannot hide both in a plan and in
the check of that plan; only the compile options (:func:`~eplb_opt.heuristics.compile.kernel`)
are common.  Callers (:mod:`eplb_opt.plan`) pass C-contiguous, writable int64 / bool
arrays of checked shapes; ids outside ``[0, E)`` are reported, never used as indices.

Every kernel scans layers, then slots, in increasing order, so "the first" violation is
the first in row-major order, as the messages of :func:`eplb_opt.plan.plan_violations` say.
"""

from __future__ import annotations

import numpy as np

from .heuristics.compile import kernel, warmer

__all__ = ["slot_maps", "checked_maps", "plan_ok", "expert_counts", "masked_mismatches", "duplicate_gpus", "group_nodes", "log2phy_fault"]

# log2phy_fault's answers, in the order plan_violations reports them (the first wins).
LOG2PHY_OK, LOG2PHY_LAYOUT, LOG2PHY_RANGE, LOG2PHY_EXPERT, LOG2PHY_ONCE = 0, 1, 2, 3, 4


@kernel
def slot_maps(p, num_experts, width):
    """``(log2phy [L, E, width], logcnt [L, E], bad)`` from ``p`` (``[L, R]``): the slots
    of each expert in increasing order, padded with -1 (slots past ``width`` are
    counted, not listed), and the replica counts; negative ids are empty slots.  ``bad``
    is the flat index ``l * R + s`` of the first id ``>= E`` (the maps are then
    incomplete and unspecified), else -1.  A negative ``width`` asks for the width
    :func:`eplb_opt.plan.derive_maps` gives: ``R - E + 1``, or ``R - E`` where ``p``
    holds an empty slot (never below 0).

    One layer at a time: its block of ``log2phy`` is padded, then its slots written
    while it is still in cache (the map is the largest array a plan returns)."""
    L, R = p.shape
    if width < 0:
        empty = False
        for l in range(L):
            for s in range(R):
                empty |= p[l, s] < 0
        width = max(R - num_experts + (0 if empty else 1), 0)
    log2phy = np.empty((L, num_experts, width), dtype=np.int64)
    logcnt = np.zeros((L, num_experts), dtype=np.int64)
    block = num_experts * width
    flat = log2phy.reshape(L * block)
    for l in range(L):
        flat[l * block:(l + 1) * block] = -1
        cnt = logcnt[l]
        for s in range(R):
            e = p[l, s]
            if e < 0:
                continue
            if e >= num_experts:
                return log2phy, logcnt, l * R + s
            r = cnt[e]
            if r < width:
                flat[l * block + e * width + r] = s
            cnt[e] = r + 1
    return log2phy, logcnt, -1


@kernel
def checked_maps(p, num_experts, num_gpus, group_size, num_nodes, groups_per_node, hierarchical):
    """``(log2phy, logcnt, ok)``: :func:`slot_maps` of ``p`` (``width=-1``) and, on the
    plan and those counts, :func:`plan_ok` (duplicates allowed), in one call (the
    DeepSeek-compatible entry point's two steps).  ``ok`` is False also where an id is
    not in ``[0, E)`` (the maps are then incomplete)."""
    log2phy, logcnt, bad = slot_maps(p, num_experts, -1)
    if bad >= 0:
        return log2phy, logcnt, False
    ok = plan_ok(p, num_experts, num_gpus, group_size, num_nodes, groups_per_node, hierarchical, True, logcnt, True)
    return log2phy, logcnt, ok


@kernel
def plan_ok(p, num_experts, num_gpus, group_size, num_nodes, groups_per_node, hierarchical, allow_dup,
            logcnt, has_logcnt):
    """Whether ``p`` (``[L, R]``, no empty slot) breaks none of the rules
    :func:`eplb_opt.plan.plan_violations` checks without a mask: ids in ``[0, E)``, a
    replica of every expert, with ``allow_dup`` False no GPU holding one expert twice,
    with ``hierarchical`` every group of ``group_size`` experts on one node and
    ``groups_per_node`` groups on every node, and with ``has_logcnt`` ``logcnt``
    (``[L, E]``) equal to the counts.  Sizes are checked by the caller (``num_gpus`` and
    ``num_nodes`` divide ``R``, ``group_size * groups`` is ``E``).  One pass per layer;
    a ``False`` sends the caller to the rule-by-rule checks for the messages."""
    L, R = p.shape
    k = R // num_gpus
    per_node = R // num_nodes
    num_groups = num_experts // group_size if hierarchical else 1
    cnt = np.zeros(num_experts, dtype=np.int64)
    last = np.full(num_experts, -1, dtype=np.int64)
    node_of = np.empty(num_groups, dtype=np.int64)
    held = np.empty(num_nodes, dtype=np.int64)
    group_of = np.empty(num_experts, dtype=np.int64)     # one division per expert, not per slot
    for e in range(num_experts):
        group_of[e] = e // group_size
    for l in range(L):
        cnt[:] = 0
        for s in range(R):
            e = p[l, s]
            if e < 0 or e >= num_experts:
                return False
            cnt[e] += 1
        for e in range(num_experts):
            if cnt[e] == 0 or (has_logcnt and logcnt[l, e] != cnt[e]):
                return False
        if not allow_dup:
            for g in range(num_gpus):
                stamp = l * num_gpus + g
                for s in range(g * k, g * k + k):
                    e = p[l, s]
                    if last[e] == stamp:
                        return False
                    last[e] = stamp
        if hierarchical:
            node_of[:] = -1
            held[:] = 0
            for n in range(num_nodes):
                for s in range(n * per_node, n * per_node + per_node):
                    gr = group_of[p[l, s]]
                    if node_of[gr] < 0:
                        node_of[gr] = n
                        held[n] += 1
                    elif node_of[gr] != n:
                        return False
            for n in range(num_nodes):
                if held[n] != groups_per_node:
                    return False
    return True


@kernel
def expert_counts(p, empty, num_experts):
    """``(cnt [L, E], bad)``: replicas of every expert over the slots of ``p`` (``[L, R]``)
    outside ``empty`` (``[L, R]`` bool), and the flat index ``l * R + s`` of the first such
    slot whose id is not in ``[0, E)`` (-1 when none; ``cnt`` is then incomplete)."""
    L, R = p.shape
    cnt = np.zeros((L, num_experts), dtype=np.int64)
    for l in range(L):
        for s in range(R):
            if empty[l, s]:
                continue
            e = p[l, s]
            if e < 0 or e >= num_experts:
                return cnt, l * R + s
            cnt[l, e] += 1
    return cnt, -1


@kernel
def masked_mismatches(p, mask, limit):
    """``(empty [L, R] bool, where [n, 2], total)`` for ``p`` (``[L, R]``) and ``mask``
    (``[L, G]`` bool, ``G`` dividing ``R``): the slots of masked GPUs, the first ``n =
    min(total, limit)`` ``(layer, slot)`` whose emptiness (``-1``) disagrees with the
    mask, and how many disagree."""
    L, R = p.shape
    k = R // mask.shape[1]
    empty = np.zeros((L, R), dtype=np.bool_)
    where = np.zeros((max(limit, 0), 2), dtype=np.int64)
    total = 0
    for l in range(L):
        for s in range(R):
            masked = mask[l, s // k]
            empty[l, s] = masked
            if masked != (p[l, s] == -1):
                if total < limit:
                    where[total, 0] = l
                    where[total, 1] = s
                total += 1
    return empty, where[: min(total, max(limit, 0))], total


@kernel
def duplicate_gpus(p, empty, num_gpus, num_experts, limit):
    """``(where [n, 2], total)``: the first ``n = min(total, limit)`` ``(layer, GPU)`` of
    ``p`` (``[L, R]``, ``num_gpus`` dividing ``R``, GPU ``g`` holding slots ``g * k ..
    g * k + k - 1``) that hold one expert twice, and how many do; GPUs whose first slot is
    ``empty`` (``[L, R]`` bool) are skipped, ids outside ``[0, E)`` ignored."""
    L, R = p.shape
    k = R // num_gpus
    last = np.full(num_experts, -1, dtype=np.int64)     # last GPU (l * G + g) seen holding e
    where = np.zeros((max(limit, 0), 2), dtype=np.int64)
    total = 0
    for l in range(L):
        for g in range(num_gpus):
            if empty[l, g * k]:
                continue
            stamp = l * num_gpus + g
            twice = False
            for s in range(g * k, g * k + k):
                e = p[l, s]
                if e < 0 or e >= num_experts:
                    continue
                if last[e] == stamp:
                    twice = True
                last[e] = stamp
            if twice:
                if total < limit:
                    where[total, 0] = l
                    where[total, 1] = g
                total += 1
    return where[: min(total, max(limit, 0))], total


@kernel
def group_nodes(p, group_size, num_groups, num_nodes):
    """``present [L, groups, nodes]`` bool: whether node ``n`` (slots ``n * R / N ..``)
    holds a replica of group ``gr`` (experts ``gr * group_size ..``), for ``p`` (``[L, R]``,
    ids in ``[0, groups * group_size)``, ``num_nodes`` dividing ``R``)."""
    L, R = p.shape
    per_node = R // num_nodes
    group_of = np.arange(num_groups * group_size) // group_size     # [E] group of each expert
    present = np.zeros((L, num_groups, num_nodes), dtype=np.bool_)
    for l in range(L):
        for n in range(num_nodes):
            for s in range(n * per_node, n * per_node + per_node):
                present[l, group_of[p[l, s]], n] = True
    return present


@kernel
def log2phy_fault(m, p, cnt, empty):
    """The first broken rule (``LOG2PHY_*``) of ``m`` (``[L, E, X]``) as the slot map of
    ``p`` (``[L, R]``) with counts ``cnt`` (``[L, E]``, ``cnt <= X``), rules in this order:
    the first ``cnt`` entries of each row are slot ids ``>= 0`` and the rest ``-1``;
    every listed slot is ``< R``; holds the row's expert; and every slot not ``empty``
    (``[L, R]`` bool) is listed exactly once.  ``LOG2PHY_OK`` (0) when none is broken."""
    L, E, X = m.shape
    R = p.shape[1]
    layout = False
    out_of_range = False
    other_expert = False
    not_once = False
    listed = np.zeros(R, dtype=np.int64)
    for l in range(L):
        listed[:] = 0
        for e in range(E):                  # layout: branch-free over the whole row
            c = cnt[l, e]
            bad = False
            for j in range(X):
                v = m[l, e, j]
                bad |= (j >= c) & (v != -1)
                bad |= (j < c) & (v < 0)
            layout |= bad
        for e in range(E):                  # the listed slots
            for j in range(min(cnt[l, e], X)):
                v = m[l, e, j]
                if v >= R:
                    out_of_range = True
                elif v >= 0:
                    if p[l, v] != e:
                        other_expert = True
                    listed[v] += 1
        for s in range(R):
            if listed[s] != (0 if empty[l, s] else 1):
                not_once = True
    if layout:
        return LOG2PHY_LAYOUT
    if out_of_range:
        return LOG2PHY_RANGE
    if other_expert:
        return LOG2PHY_EXPERT
    if not_once:
        return LOG2PHY_ONCE
    return LOG2PHY_OK


@warmer
def _warm() -> None:
    """Every kernel above on a 1-layer, 2-GPU plan, with the argument types of
    :mod:`eplb_opt.plan`'s calls (C-contiguous writable int64 / bool arrays, int64
    scalars)."""
    p = np.array([[0, 1, 2, 0]], dtype=np.int64)
    empty = np.zeros((1, 4), dtype=np.bool_)
    m, cnt, _ = slot_maps(p, 3, 2)
    expert_counts(p, empty, 3)
    masked_mismatches(p, np.zeros((1, 2), dtype=np.bool_), 10)
    duplicate_gpus(p, empty, 2, 3, 10)
    group_nodes(p, 1, 3, 1)
    log2phy_fault(m, p, cnt, empty)
    plan_ok(p, 3, 2, 1, 1, 3, True, False, cnt, True)
    checked_maps(p, 3, 2, 1, 1, 3, True)
    plan_ok(p, 3, 2, 1, 1, 3, False, True, cnt, False)
