"""The heuristic placement pipeline, batched over layers.

``place`` turns per-expert loads ``[L, E]`` into a physical-to-logical map ``[L, R]``:

1. groups to nodes (hierarchical policy only; the global policy is one node, one group);
2. replica counts per node (or per layer), minimising the largest per-replica load;
3. replicas to the node's GPUs with exactly ``k = R / G`` slots each: snake and LPT
   seeds, swap refinement, duplicate separation.

Slot ``s`` of GPU ``g`` is physical index ``g * k + s``; GPU ``g`` lives on node
``g // (G / N)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .apportion import replica_counts
from .compile import warmer
from .grouping import groups_to_nodes
from .packing import DEFAULT_REFINE_ROUNDS, gather_rows, pack_sorted, replica_items

__all__ = ["Placement", "place", "pack_rows"]


@dataclass(frozen=True)
class Placement:
    """Result of :func:`place` (numpy arrays).

    Attributes:
        phy2log: ``[L, R]`` int64 logical expert of every physical slot.
        logcnt: ``[L, E]`` int64 replica count of every expert.
        node_of_group: ``[L, num_groups]`` int64 node of every group (all zero for the
            global policy).
        groups_exact: the group-to-node step minimised the heaviest node exactly.
    """

    phy2log: np.ndarray
    logcnt: np.ndarray
    node_of_group: np.ndarray
    groups_exact: bool


def place(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    refine_rounds: int | None = DEFAULT_REFINE_ROUNDS,
    allow_duplicates: bool = True,
    node_of_group: np.ndarray | None = None,
) -> Placement:
    """Heuristic placement under the hierarchical policy (pass ``num_groups =
    num_nodes = 1`` for the global policy).

    Args:
        weight: ``[L, E]`` non-negative float loads (tokens per expert; any unit).
        num_replicas: ``R``, a multiple of ``num_gpus`` and ``>= E``; each node gets
            ``R / num_nodes`` replicas for its own experts.
        num_groups: expert groups (``E`` divisible by it, divisible by ``num_nodes``).
        num_nodes: nodes (``num_gpus`` divisible by it).
        num_gpus: GPUs.
        refine_rounds: cap on swap-refinement rounds (0: seeds only; ``None``: the
            default, ``heuristics.packing.DEFAULT_REFINE_ROUNDS``).
        allow_duplicates: when False no GPU holds two replicas of one expert (needs at
            most ``E / N`` slots per GPU; not checked here).
        node_of_group: optional ``[L, num_groups]`` group-to-node assignment to use
            (``num_groups / N`` groups per node) instead of computing one.

    Returns:
        :class:`Placement`.  Only the shapes the steps depend on are checked here
        (``ValueError``); callers validate user input (``eplb_opt`` does).
    """
    w = np.asarray(weight, dtype=np.float64)
    _check_shapes(w, num_replicas, num_groups, num_nodes, num_gpus)
    num_layers, num_experts = w.shape
    gpus_per_node = num_gpus // num_nodes
    # 1. Groups to nodes.
    node_of_group, exact = _groups_step(w, num_groups, num_nodes, node_of_group)
    node_experts, node_ids = _node_experts(node_of_group, num_experts, num_nodes)
    node_w = np.take(w, node_ids).reshape(node_experts.shape)                  # [L * N, E / N]
    # 2. Replica counts per node.
    counts = replica_counts(node_w, num_replicas // num_nodes, max_count=gpus_per_node)
    # 3. Replicas to GPUs.
    local = pack_rows(
        node_w, counts, gpus_per_node, refine_rounds=refine_rounds,
        segment_size=num_nodes, allow_duplicates=allow_duplicates,
    ).reshape(num_layers * num_nodes, -1)
    phy2log = gather_rows(node_experts, local).reshape(num_layers, num_replicas)
    logcnt = np.empty((num_layers, num_experts), dtype=np.int64)
    logcnt.reshape(-1)[node_ids.ravel()] = counts.ravel()
    return Placement(phy2log=phy2log, logcnt=logcnt, node_of_group=node_of_group, groups_exact=exact)


def _check_shapes(w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """The shape rules :func:`place`'s reshapes depend on (``ValueError``); the rest of
    the input (values, slots for distinct experts) is the caller's to validate."""
    if w.ndim != 2:
        raise ValueError(f"weight must be [L, E], got shape {w.shape}")
    for name, val, div in (
        ("num_experts", w.shape[1], num_groups),
        ("num_groups", num_groups, num_nodes),
        ("num_gpus", num_gpus, num_nodes),
        ("num_replicas", num_replicas, num_gpus),
    ):
        if div < 1 or val % div:
            raise ValueError(f"{name}={val} is not a multiple of {div}")


def _groups_step(
    w: np.ndarray, num_groups: int, num_nodes: int, node_of_group: np.ndarray | None
) -> tuple[np.ndarray, bool]:
    """``([L, num_groups] node of every group, exact)``: the given assignment (checked
    to give every node ``num_groups / N`` groups), else :func:`groups_to_nodes` on the
    group loads ``[L, num_groups]``."""
    num_layers, num_experts = w.shape
    group_load = w.reshape(num_layers, num_groups, num_experts // num_groups).sum(axis=2)
    if node_of_group is None:
        node_of_group, _, exact = groups_to_nodes(group_load, num_nodes)
        return node_of_group, exact
    node_of_group = np.asarray(node_of_group, dtype=np.int64)
    per_node = np.stack([(node_of_group == n).sum(axis=1) for n in range(num_nodes)], axis=1)
    if node_of_group.shape != group_load.shape or (per_node != num_groups // num_nodes).any():
        raise ValueError("node_of_group must give every node num_groups / num_nodes groups per layer")
    return node_of_group, False


def _node_experts(node_of_group: np.ndarray, num_experts: int, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """The experts of every (layer, node) row, node by node, groups in the order
    ``argsort(node_of_group)`` puts them.

    Returns ``(node_experts [L * N, E / N] global expert ids, node_ids [L, E] the same
    as flat indices into a ``[L, E]`` array)`` (flat takes throughout: far cheaper in
    numpy than row-and-column fancy indexing).
    """
    num_layers, num_groups = node_of_group.shape
    group_size = num_experts // num_groups
    group_order = np.argsort(node_of_group, axis=1, kind="stable")           # groups by node
    node_experts = (group_order[:, :, None] * group_size + np.arange(group_size)).reshape(
        num_layers * num_nodes, num_experts // num_nodes
    )
    node_ids = node_experts.reshape(num_layers, -1) + (np.arange(num_layers) * num_experts)[:, None]
    return node_experts, node_ids


def pack_rows(
    weight: np.ndarray,
    counts: np.ndarray,
    num_packs: int,
    refine_rounds: int | None = DEFAULT_REFINE_ROUNDS,
    segment_size: int = 1,
    allow_duplicates: bool = True,
    target: np.ndarray | None = None,
) -> np.ndarray:
    """Place given replica counts: the packing half of :func:`place`, for any rows.

    Args:
        weight: ``[rows, n]`` expert loads of each row (a layer, or a layer's node).
        counts: ``[rows, n]`` replica counts, ``>= 1``, each row summing to a multiple
            of ``num_packs``.
        num_packs: GPUs per row.
        refine_rounds: as in :func:`place`.
        segment_size: consecutive rows forming one objective (a layer's nodes).
        allow_duplicates: as in :func:`place`.
        target: optional ``[rows]`` lower bounds (default: the average and largest
            replica load, maximised over each segment).

    Returns:
        ``[rows, P, k]`` int64: the (row-local) expert held by each slot.
    """
    if refine_rounds is None:
        refine_rounds = DEFAULT_REFINE_ROUNDS
    values, labels, bound = replica_items(weight, counts, num_packs)
    if target is None:
        target = np.repeat(bound.reshape(-1, segment_size).max(axis=1), segment_size)
    layout = pack_sorted(
        values, labels, num_packs, target=target, refine_rounds=refine_rounds,
        segment_size=segment_size, allow_duplicates=allow_duplicates,
    )
    return gather_rows(labels, layout)


@warmer
def _warm() -> None:
    """The kernels :func:`place` and :func:`pack_rows` call, on tiny inputs."""
    w = np.arange(1.0, 9.0).reshape(2, 4)
    pack_rows(w, np.array([[2, 1, 2, 1], [1, 1, 1, 3]]), 3, segment_size=2)
    place(w, 6, 2, 2, 2, allow_duplicates=False)
