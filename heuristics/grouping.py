"""Expert groups to nodes, with exactly ``num_groups / num_nodes`` groups per node.

Under the hierarchical policy a node's total load is fixed once its groups are chosen,
so ``max_node_load / gpus_per_node`` caps the whole layer.  This step therefore solves
*min over assignments of the heaviest node* exactly wherever that is cheap:

* one node, or one group per node: trivial;
* two groups per node: pairing the i-th heaviest with the i-th lightest is optimal;
* otherwise, when the number of equal-size partitions is at most ``ENUMERATION_LIMIT``,
  all partitions are scored at once (one matrix product over the batch);
* beyond that, LPT by rounds plus swap refinement (a heuristic), with a certified
  relaxation bound reported beside it.
"""

from __future__ import annotations

from functools import lru_cache
from math import factorial

import numpy as np

from .apportion import unit_scale
from .packing import pack_items

__all__ = [
    "ENUMERATION_LIMIT",
    "num_partitions",
    "equal_partitions",
    "groups_to_nodes",
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
        order = np.argsort(-gl, axis=1, kind="stable")
        slot_node = np.concatenate([np.arange(num_nodes), np.arange(num_nodes)[::-1]])
        node = np.empty_like(order)
        np.put_along_axis(node, order, np.broadcast_to(slot_node, order.shape), axis=1)
        sorted_gl = np.take_along_axis(gl, order, axis=1)
        pair = sorted_gl[:, :num_nodes] + sorted_gl[:, num_nodes:][:, ::-1]
        return node, pair.max(axis=1), True
    if num_partitions(num_groups, num_nodes) <= ENUMERATION_LIMIT:
        parts = equal_partitions(num_groups, num_nodes)            # [C, Gr]
        # Node loads of every partition, summed group by group in a fixed order (not a
        # BLAS product, whose summation order depends on the thread count and the CPU:
        # every rank of a server must compute the same plan).
        C = parts.shape[0]
        node_loads = np.zeros((num_layers, C, num_nodes))
        for g in range(num_groups):
            node_loads[:, np.arange(C), parts[:, g]] += gl[:, g : g + 1]
        worst = node_loads.max(axis=2)                              # [L, C]
        best_val = worst.min(axis=1)
        # Among the optimal partitions prefer the most even one (smallest sum of squares).
        tie = worst <= best_val[:, None]
        even = unit_scale(node_loads)                                # no overflow in the squares
        spread = np.where(tie, (even**2).sum(axis=2), np.inf)
        best = spread.argmin(axis=1)
        return parts[best].copy(), best_val, True
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
