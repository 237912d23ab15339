"""Expert groups to nodes, with exactly ``num_groups / num_nodes`` groups per node.

Under the hierarchical policy a node's total load is fixed once its groups are chosen,
so ``max_node_load / gpus_per_node`` caps the whole layer.  This step therefore solves
*min over assignments of the heaviest node* exactly wherever that is cheap:

* one node, or one group per node: trivial;
* two groups per node: pairing the i-th heaviest with the i-th lightest is optimal;
* otherwise, when the number of equal-size partitions is at most ``ENUMERATION_LIMIT``,
  every partition is scored (node loads summed group by group, in a fixed order) and
  the most even of the optimal ones is kept;
* beyond that, LPT by rounds plus swap refinement (a heuristic), with a certified
  relaxation bound reported beside it.
"""

from __future__ import annotations

from functools import lru_cache
from math import factorial

import math

import numpy as np

from .compile import kernel, warmer, writable
from .packing import pack_items

__all__ = [
    "ENUMERATION_LIMIT",
    "num_partitions",
    "equal_partitions",
    "groups_to_nodes",
    "group_loads",
    "node_load_lower_bound",
]

ENUMERATION_LIMIT = 20_000


def num_partitions(num_groups: int, num_nodes: int) -> int:
    """Number of ways to split ``num_groups`` labelled groups into ``num_nodes``
    unlabelled blocks of equal size."""
    m = num_groups // num_nodes
    return factorial(num_groups) // (factorial(m) ** num_nodes * factorial(num_nodes))


@lru_cache(maxsize=16)
def equal_partitions(num_groups: int, num_nodes: int) -> np.ndarray:
    """All partitions into equal blocks as ``[count, num_groups]`` block ids (block of the
    lowest unassigned group is numbered first).  Read-only array."""
    m = num_groups // num_nodes
    out: list[list[int]] = []
    assign = [-1] * num_groups

    def rec(block: int) -> None:
        if block == num_nodes:
            out.append(assign.copy())
            return
        free = [g for g in range(num_groups) if assign[g] < 0]
        first, rest = free[0], free[1:]
        assign[first] = block
        from itertools import combinations

        for others in combinations(rest, m - 1):
            for g in others:
                assign[g] = block
            rec(block + 1)
            for g in others:
                assign[g] = -1
        assign[first] = -1

    rec(0)
    arr = np.array(out, dtype=np.int64)
    arr.setflags(write=False)
    return arr


def group_loads(weight: np.ndarray, num_groups: int) -> np.ndarray:
    """``[L, num_groups]`` float64: the load of each group of ``E / num_groups``
    consecutive experts of ``weight`` (``[L, E]`` float64), with the bits of numpy's
    ``weight.reshape(L, num_groups, -1).sum(axis=2)`` (:func:`_group_rows`; numpy itself
    for groups of more than 128 experts, where it halves the runs first)."""
    w = np.asarray(weight, dtype=np.float64)
    L, E = w.shape
    if num_groups <= 0 or E % num_groups or E // num_groups > 128 or not w.flags.c_contiguous:
        return w.reshape(L, num_groups, -1).sum(axis=2)
    out = np.empty((L, num_groups))
    _group_rows(writable(w), num_groups, out)
    return out


@kernel
def _group_rows(w: np.ndarray, num_groups: int, out: np.ndarray) -> None:
    """``out [L, num_groups]``: :func:`group_loads` (groups of at most 128 experts)."""
    for l in range(w.shape[0]):
        _group_row(w[l], out[l])


@kernel
def _group_row(row: np.ndarray, out: np.ndarray) -> None:
    """``out [num_groups]``: the loads of the groups of one layer ``row [E]`` (numpy's
    bits: :func:`pairwise_sum` added to ``0.0``); :func:`group_loads`, the bounds and
    the pipeline share it."""
    num_groups = out.shape[0]
    gs = row.shape[0] // num_groups
    for g in range(num_groups):
        out[g] = 0.0 + pairwise_sum(row, g * gs, gs)


def groups_to_nodes(group_load: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Assign groups to nodes, ``num_groups / num_nodes`` per node.

    Args:
        group_load: ``[L, num_groups]`` total load of each group.
        num_nodes: number of nodes; must divide ``num_groups``.

    Returns:
        ``(node_of_group [L, num_groups] int64, max_node_load [L] float64, exact)`` where
        ``exact`` says the assignment minimises the heaviest node for every layer.
    """
    gl = np.asarray(group_load, dtype=np.float64)
    num_layers, num_groups = gl.shape
    if num_nodes < 1 or num_groups % num_nodes:
        raise ValueError(f"{num_groups} groups cannot be split evenly over {num_nodes} nodes")
    m = num_groups // num_nodes
    if num_nodes == 1:
        node = np.zeros((num_layers, num_groups), dtype=np.int64)
        return node, gl.sum(axis=1), True
    if m == 1:
        node = np.broadcast_to(np.arange(num_groups), (num_layers, num_groups)).copy()
        return node, gl.max(axis=1), True
    if m == 2:
        node = np.empty((num_layers, num_groups), dtype=np.int64)
        worst = np.empty(num_layers)
        _pair_groups(np.ascontiguousarray(gl), num_nodes, node, worst)
        return node, worst, True
    if num_partitions(num_groups, num_nodes) <= ENUMERATION_LIMIT:
        parts = equal_partitions(num_groups, num_nodes)            # [C, Gr]
        best = np.empty(num_layers, dtype=np.int64)
        worst = np.empty(num_layers)
        _best_partitions(np.ascontiguousarray(gl), parts, num_nodes, best, worst)
        return parts[best].copy(), worst, True
    layout = pack_items(gl, np.broadcast_to(np.arange(num_groups), gl.shape), num_nodes)
    node = np.empty((num_layers, num_groups), dtype=np.int64)
    ids = np.broadcast_to(np.arange(num_nodes)[None, :, None], layout.shape)
    np.put_along_axis(node, layout.reshape(num_layers, -1), ids.reshape(num_layers, -1), axis=1)
    loads = np.take_along_axis(gl, layout.reshape(num_layers, -1), axis=1)
    return node, loads.reshape(layout.shape).sum(-1).max(axis=1), False


def node_load_lower_bound(group_load: np.ndarray, num_nodes: int) -> tuple[np.ndarray, bool]:
    """Certified lower bound on the heaviest node over all equal assignments.

    Exact (the optimum) wherever :func:`groups_to_nodes` is exact; otherwise the best of
    the average ``sum / N`` and pigeonhole bounds: among the ``j N + 1`` heaviest groups
    some node holds ``j + 1``, plus at least the ``m - j - 1`` lightest of the rest.

    Returns:
        ``(bound [L] float64, exact)``.
    """
    gl = np.asarray(group_load, dtype=np.float64)
    num_layers, num_groups = gl.shape
    m = num_groups // num_nodes
    if num_nodes == 1 or m <= 2 or num_partitions(num_groups, num_nodes) <= ENUMERATION_LIMIT:
        _, val, exact = groups_to_nodes(gl, num_nodes)
        return val, exact
    s = np.sort(gl, axis=1)[:, ::-1]                                # descending
    bound = gl.sum(axis=1) / num_nodes
    for j in range(m):
        top = j * num_nodes + 1
        heavy = s[:, top - (j + 1) : top].sum(axis=1)               # j+1 smallest of top set
        rest = s[:, top:]                                           # remaining groups
        light = rest[:, rest.shape[1] - (m - j - 1) :].sum(axis=1) if m - j - 1 > 0 else 0.0
        bound = np.maximum(bound, heavy + light)
    return bound, False


# ------------------------------------------------------------------------------ kernels


@kernel
def pairwise_sum(a, lo, n):
    """``a[lo:lo + n].sum()`` as numpy adds the terms of a contiguous axis (its
    ``pairwise_sum``), for ``n <= 128``: fewer than 8 terms one by one from ``-0.0``,
    else eight running sums combined as a tree, then the rest one by one (numpy splits
    longer runs in halves first: :func:`pairwise_total`).  A reduction then
    adds this to its initial ``0.0`` (:func:`_pack_sums`), so the result has numpy's
    bits, not just its value.  Not recursive: a cached kernel of another module calling
    a recursive one crashed.  (:mod:`eplb_opt.metrics` and the bounds use it too.)"""
    if n < 8:
        res = -0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        j = lo + i
        r0 += a[j]
        r1 += a[j + 1]
        r2 += a[j + 2]
        r3 += a[j + 3]
        r4 += a[j + 4]
        r5 += a[j + 5]
        r6 += a[j + 6]
        r7 += a[j + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@kernel
def pairwise_total(a, lo, n, stack):
    """``a[lo:lo + n].sum()`` as numpy sums a contiguous run of any length: runs above 128
    terms halved as numpy halves them (the first part ``n // 2`` rounded down to a
    multiple of 8), recursively, down to :func:`pairwise_sum`'s blocks, the parts added
    in that tree's order.  Without recursion (see :func:`pairwise_sum`): ``stack``
    (``[>= 4 * 64]`` float64 work) holds each pending node as (start, length, whether
    its first part is summed, that sum).  A reduction adds the result to its initial
    ``0.0``."""
    if n <= 128:
        return pairwise_sum(a, lo, n)
    top = 0
    stack[0], stack[1], stack[2] = lo, n, 0.0
    while True:
        start, m = int(stack[4 * top]), int(stack[4 * top + 1])
        if m > 128:                                  # split: descend into the first part
            h = m // 2
            h -= h % 8
            top += 1
            stack[4 * top], stack[4 * top + 1], stack[4 * top + 2] = start, h, 0.0
            continue
        v = pairwise_sum(a, start, m)
        while True:                                  # hand the value up the tree
            if top == 0:
                return v
            top -= 1
            if stack[4 * top + 2] == 0.0:            # the first part is done: the second next
                pstart, pm = int(stack[4 * top]), int(stack[4 * top + 1])
                h = pm // 2
                h -= h % 8
                stack[4 * top + 2], stack[4 * top + 3] = 1.0, v
                top += 1
                stack[4 * top], stack[4 * top + 1], stack[4 * top + 2] = pstart + h, pm - h, 0.0
                break
            v = stack[4 * top + 3] + v


@kernel
def _pair_groups(gl: np.ndarray, num_nodes: int, node: np.ndarray, worst: np.ndarray) -> None:
    """Two groups per node (``gl``: ``[L, 2N]``): :func:`_pair_row` on every layer.
    Writes ``node`` (``[L, 2N]``) and ``worst`` (``[L]``, the heaviest node's load)."""
    num_layers, num_groups = gl.shape
    neg = np.empty(num_groups)
    for l in range(num_layers):
        worst[l] = _pair_row(gl[l], num_nodes, node[l], neg)


@kernel
def _pair_row(gl_row: np.ndarray, num_nodes: int, node_row: np.ndarray, neg: np.ndarray) -> float:
    """Two groups per node, one layer (``gl_row``: ``[2N]`` group loads): node ``i`` gets
    the ``i``-th heaviest and the ``i``-th lightest group (stable order: the lower index
    first among equal loads), which minimises the heaviest node.  Writes ``node_row``
    (``[2N]``; ``neg``: ``[2N]`` scratch) and returns the heaviest node's load."""
    num_groups = gl_row.shape[0]
    for g in range(num_groups):         # (a loop: an array expression loads numba.np.npyimpl)
        neg[g] = -gl_row[g]
    order = np.argsort(neg, kind="mergesort")
    top = -np.inf
    for i in range(num_nodes):
        a, b = order[i], order[num_groups - 1 - i]
        node_row[a] = i
        node_row[b] = i
        top = max(top, gl_row[a] + gl_row[b])
    return top


@kernel
def _partition_loads(gl_row: np.ndarray, part: np.ndarray, loads: np.ndarray) -> float:
    """Node loads of one partition (``part``: block of every group), summed group by
    group in index order, into ``loads`` (``[N]``); returns the heaviest."""
    loads[:] = 0.0
    for g in range(part.size):
        loads[part[g]] += gl_row[g]
    top = loads[0]
    for n in range(1, loads.size):
        top = max(top, loads[n])
    return top


@kernel
def _best_partitions(gl: np.ndarray, parts: np.ndarray, num_nodes: int, best: np.ndarray,
                     worst: np.ndarray) -> None:
    """Every partition of ``parts`` (``[C, Gr]`` block ids) scored on every layer of
    ``gl`` (``[L, Gr]``): ``best[l]`` is the partition with the lightest heaviest node
    (``worst[l]``) and, among those, the smallest sum of squared node loads -- the most
    even -- the first on ties.  The squares are taken of loads scaled by the power of
    two that puts the layer's largest node load in ``[0.5, 1)`` (exact: no overflow,
    and the choice is the one made on the loads themselves)."""
    num_layers = gl.shape[0]
    count = parts.shape[0]
    top_of = np.empty(count)
    loads = np.empty(num_nodes)
    for l in range(num_layers):
        lightest = np.inf
        largest = 0.0
        for c in range(count):
            top_of[c] = _partition_loads(gl[l], parts[c], loads)
            lightest = min(lightest, top_of[c])
            largest = max(largest, top_of[c])
        _, exp = math.frexp(largest if largest > 0 else 1.0)
        pick = -1
        spread = np.inf
        for c in range(count):
            if top_of[c] > lightest:
                continue
            _partition_loads(gl[l], parts[c], loads)
            squares = 0.0
            for n in range(num_nodes):
                x = math.ldexp(loads[n], -exp)
                squares += x * x
            if pick < 0 or squares < spread:
                pick, spread = c, squares
        best[l] = pick
        worst[l] = lightest


@warmer
def _warm() -> None:
    """Compile the kernels with the argument types real calls use."""
    gl = np.array([[3.0, 1.0, 2.0, 0.0, 5.0, 4.0]])
    group_loads(gl, 3)
    groups_to_nodes(gl[:, :4], 2)
    groups_to_nodes(gl, 2)
