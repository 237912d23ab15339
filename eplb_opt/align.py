"""Keep expert weights where they are when a new plan replaces an old one.

Relabelling GPUs (and, under the hierarchical policy, whole nodes) or reordering the
slots of one GPU never changes any GPU's load, so a new plan can be matched to the
placement currently deployed before it is applied: each new GPU is given the identity of
the old GPU it shares the most replicas with (maximum-weight matching, nodes first), and
a replica that stays on its GPU keeps its old slot.  Weights then only move for replicas
that really change GPU.

A *move* is a replica on a GPU that did not hold that expert before (per layer; a further
replica of an expert the GPU already held is a copy within the GPU, not a move).
:func:`count_moves` is the package's one move counter (also the node-weighted cost that
:mod:`eplb_opt.migrate` minimises).
"""

from __future__ import annotations

import numpy as np

from .heuristics.local import keep_gpu_slots, move_counts
from .heuristics.matching import align_rows

from .errors import InvalidProblemError
from .problem import as_placement, positive_int

__all__ = ["align_to_previous", "arrival_cost", "count_moves", "keep_slots"]


def arrival_cost(old_counts: np.ndarray, num_nodes: int, node_move_cost: float) -> np.ndarray:
    """``[G, E]`` cost of one replica of expert ``e`` arriving on GPU ``g``: 1 when the old
    placement (``old_counts [G, E]``, replicas per GPU and expert) has ``e`` on ``g``'s
    node, else ``node_move_cost``."""
    G, E = old_counts.shape
    on_node = old_counts.reshape(num_nodes, G // num_nodes, E).sum(axis=1) > 0    # [N, E]
    return np.where(np.repeat(on_node, G // num_nodes, axis=0), 1.0, float(node_move_cost))


def count_moves(old: np.ndarray, new: np.ndarray, num_gpus: int, num_nodes: int = 1, *,
                node_move_cost: float | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Replicas of ``new`` placed on a GPU that did not hold that expert in ``old`` (see
    module docs), per layer.

    Args:
        old, new: ``[L, R]`` integer placements of the same shape; ``-1`` marks an empty
            slot (a masked GPU's), which holds nothing and receives nothing.
        num_gpus: ``G``, dividing ``R``.
        num_nodes: ``N``, dividing ``G``; only used for the cost.
        node_move_cost: with it, also return the moves weighted by their copy cost: 1
            when ``old`` holds the expert on the destination's node, else
            ``node_move_cost`` (:func:`arrival_cost`).

    Returns:
        ``moves [L]`` int64; with ``node_move_cost``, ``(moves [L] int64, cost [L]
        float64)``.
    """
    o, n = as_placement(old, "old", empty_ok=True), as_placement(new, "new", empty_ok=True)
    if n.shape != o.shape:
        raise InvalidProblemError(f"new plan {n.shape} and old plan {o.shape} differ in shape")
    if n.shape[1] % positive_int("num_gpus", num_gpus):
        raise InvalidProblemError(f"num_gpus={num_gpus} must divide the {n.shape[1]} slots per layer")
    if num_gpus % positive_int("num_nodes", num_nodes):
        raise InvalidProblemError(f"num_nodes={num_nodes} must divide num_gpus={num_gpus}")
    moves, cost = move_counts(np.ascontiguousarray(o, dtype=np.int64), np.ascontiguousarray(n, dtype=np.int64),
                              int(num_gpus), int(num_nodes), 1.0 if node_move_cost is None else float(node_move_cost))
    return moves if node_move_cost is None else (moves, cost)


def keep_slots(new_gpu: np.ndarray, old_gpu: np.ndarray) -> np.ndarray:
    """One GPU's new experts (``new_gpu [k]``) reordered so that each one that the GPU held
    before (``old_gpu [k]``) keeps one of its old slots; the others fill the remaining
    slots in their order.  Returns ``[k]`` int64 (the compiled
    :func:`heuristics.local.keep_gpu_slots`, which the migration repair uses too)."""
    return keep_gpu_slots(np.ascontiguousarray(new_gpu, dtype=np.int64), np.ascontiguousarray(old_gpu, dtype=np.int64))


def align_to_previous(new: np.ndarray, old: np.ndarray, num_gpus: int, num_nodes: int = 1) -> np.ndarray:
    """Relabel ``new`` (``[L, R]``) to keep as many replicas of ``old`` in place as
    possible (see module docs).

    Args:
        new: the plan to deploy.
        old: the placement deployed now (same shape).
        num_gpus: GPUs.
        num_nodes: nodes; with several, whole nodes are matched first and GPUs only within
            matched nodes, so a hierarchical plan stays hierarchical.  Pass 1 for a
            global plan (any GPU may take any GPU's place).

    Returns:
        ``[L, R]`` the relabelled plan: same per-GPU loads as ``new``, fewest moves the
        relabelling allows.
    """
    n, o = as_placement(new, "new"), as_placement(old, "old")
    if n.shape != o.shape:
        raise InvalidProblemError(f"new plan {n.shape} and old plan {o.shape} differ in shape")
    R = n.shape[1]
    G, N = positive_int("num_gpus", num_gpus), positive_int("num_nodes", num_nodes)
    if R % G or G % N:
        raise InvalidProblemError(
            f"num_gpus={num_gpus} must divide the {R} slots per layer and num_nodes={num_nodes} must divide num_gpus"
        )
    E = int(max(n.max(initial=0), o.max(initial=0))) + 1
    return align_rows(np.ascontiguousarray(n, dtype=np.int64), np.ascontiguousarray(o, dtype=np.int64), G, N, E)
