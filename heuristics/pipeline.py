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

from .apportion import _FEW, _counts_row, _few_steps
from .compile import kernel, warmer, writable
from .grouping import _group_row, _pair_row, group_loads, groups_to_nodes
from .packing import (
    DEFAULT_REFINE_ROUNDS, _items_row, _pack_segments, _pack_work, _settle_order, gather_rows, item_order,
    pack_sorted, replica_items,
)

__all__ = ["Placement", "place", "pack_rows", "replica_counts_of"]


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
    w = writable(np.ascontiguousarray(weight, dtype=np.float64))
    node_of_group, exact, experts, neg, cnt, logcnt, order, settled = _counts_step(
        w, num_replicas, num_groups, num_nodes, num_gpus, node_of_group)
    # 3. The packing (:func:`_pack_layers`) of each node's experts in item order.
    phy2log = _pack_layers(
        experts, neg, cnt, order, settled, int(num_replicas), int(num_gpus // num_nodes),
        int(DEFAULT_REFINE_ROUNDS if refine_rounds is None else refine_rounds), bool(allow_duplicates),
    )
    return Placement(phy2log=phy2log, logcnt=logcnt, node_of_group=node_of_group, groups_exact=exact)


def replica_counts_of(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> np.ndarray:
    """``[L, E]`` int64: the replica counts :func:`place` gives (its ``logcnt``), without
    the packing: for a caller that needs only how many replicas each expert gets
    (arguments as :func:`place`'s)."""
    w = writable(np.ascontiguousarray(weight, dtype=np.float64))
    return _counts_step(w, num_replicas, num_groups, num_nodes, num_gpus, None)[5]


def _counts_step(w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                 node_of_group: np.ndarray | None):
    """Steps 1 and 2 of :func:`place` on ``w`` ``[L, E]`` float64: ``(node_of_group,
    exact, experts, neg, cnt, logcnt, order, settled)``, each node's experts with minus
    their per-replica loads, their replica counts and their order by ``neg`` ``[L, N, E /
    N]`` (what the packing takes; ``settled``: ties by index, with at most ``_FEW``
    spares per node, else as numpy's argsort leaves them, for the packing to settle) and
    the counts per expert ``[L, E]``."""
    _check_shapes(w, num_replicas, num_groups, num_nodes, num_gpus)
    num_experts = w.shape[1]
    gpus_per_node = num_gpus // num_nodes
    # 1. Groups to nodes, and each node's experts with minus their loads.
    if node_of_group is None and _closed_form(num_experts, num_groups, num_nodes):
        node_of_group, experts, neg = _front_layers(w, num_groups, num_nodes)
        exact = True
    else:
        node_of_group, exact = _groups_step(w, num_groups, num_nodes, node_of_group)
        experts, neg = _node_layers(w, np.ascontiguousarray(node_of_group, dtype=np.int64), num_nodes)
    # 2. Replica counts (:func:`_count_layers`).
    per_node = num_replicas // num_nodes
    extra = per_node - num_experts // num_nodes
    if extra < 0:
        raise ValueError(f"num_replicas={per_node} is below the expert count {num_experts // num_nodes}")
    cap = max(gpus_per_node, -(-per_node // (num_experts // num_nodes)))
    # The arrays of the steps are allocated in the kernels (a numpy call each would be
    # one more step on the call's path).
    # The item order: numpy's argsort, settled in the kernels.  With a few spares it is
    # taken first: they go to the first experts by load, and those given one are moved
    # in it (:func:`_spares_row`); with many, after the counts.
    settled = extra <= _FEW
    if settled:
        order = item_order(neg)
        cnt, logcnt = _count_layers(int(extra), int(cap), experts, neg, order)
    else:
        cnt, logcnt = _count_layers(int(extra), int(cap), experts, neg, _NO_ORDER)
        order = item_order(neg)
    return node_of_group, exact, experts, neg, cnt, logcnt, order, settled


@kernel
def _node_rows(w_l, node_of_group_l, experts, neg):
    """The experts of every node of one layer (``experts [N, E / N]``, node by node, its
    groups in index order) and minus their loads (``neg``), from ``w_l [E]`` and the
    layer's ``node_of_group [num_groups]``."""
    num_groups = node_of_group_l.shape[0]
    gs = w_l.shape[0] // num_groups
    for g in range(num_groups):                 # group g after its node's lower groups
        nd = node_of_group_l[g]
        r = 0
        for q in range(g):
            r += node_of_group_l[q] == nd
        for t in range(gs):
            experts[nd, r * gs + t] = g * gs + t
            neg[nd, r * gs + t] = -w_l[g * gs + t]


def _closed_form(num_experts: int, num_groups: int, num_nodes: int) -> bool:
    """Whether :func:`_front_layers` takes step 1 (one node, or one or two groups per
    node of at most 128 experts each: see :func:`~.grouping.groups_to_nodes`)."""
    m = num_groups // num_nodes
    return num_nodes == 1 or m == 1 or (m == 2 and num_experts // num_groups <= 128)


@kernel
def _front_layers(w, num_groups, num_nodes):
    """Step 1 of :func:`place` where :func:`~.grouping.groups_to_nodes` has a closed form
    (:func:`_closed_form`), with :func:`_node_layers`' rows, in one pass over the
    layers: ``(node_of_group [L, num_groups], experts, neg)``.  One node: every group
    on it; one group per node: group ``g`` on node ``g``; two: the pairing of
    :func:`~.grouping._pair_row` on the group loads numpy's ``reshape(...).sum(axis=2)``
    gives (:func:`~.grouping._group_row`, the same bits)."""
    L, E = w.shape
    node_of_group = np.zeros((L, num_groups), dtype=np.int64)
    experts = np.empty((L, num_nodes, E // num_nodes), dtype=np.int64)
    neg = np.empty((L, num_nodes, E // num_nodes))
    gl, scratch = np.empty(num_groups), np.empty(num_groups)
    m = num_groups // num_nodes
    for l in range(L):
        row = w[l]
        if num_nodes > 1 and m == 1:
            for g in range(num_groups):
                node_of_group[l, g] = g
        elif num_nodes > 1:
            _group_row(row, gl)
            _pair_row(gl, num_nodes, node_of_group[l], scratch)
        _node_rows(row, node_of_group[l], experts[l], neg[l])
    return node_of_group, experts, neg


# The order _count_layers is given where it reads none (many spares).
_NO_ORDER = np.zeros((1, 1, 1), dtype=np.int64)


@kernel
def _node_layers(w, node_of_group, num_nodes):
    """``(experts, neg)``, ``[L, N, E / N]``: :func:`_node_rows` of every layer of ``w``
    (``[L, E]``)."""
    L, E = w.shape
    experts = np.empty((L, num_nodes, E // num_nodes), dtype=np.int64)
    neg = np.empty((L, num_nodes, E // num_nodes))
    for l in range(L):
        _node_rows(w[l], node_of_group[l], experts[l], neg[l])
    return experts, neg


@kernel
def _count_layers(extra, cap, experts, neg, order):
    """Step 2 of :func:`place` on every node row of every layer (``[L, N, E / N]``:
    ``neg``, minus the loads, from :func:`_node_layers`): ``(cnt, logcnt)``, the replica
    counts (``extra`` spares per node, at most ``cap`` per expert) per row and per expert
    (``[L, E]``); ``neg`` becomes minus the per-replica loads (:func:`_spares_row`).
    With at most ``_FEW`` spares ``order`` is ``neg``'s argsort, settled here and kept
    the order of ``neg`` as it changes (ties by index); with more it is a placeholder,
    not read."""
    L, S, m = experts.shape
    cnt = np.ones((L, S, m), dtype=np.int64)
    logcnt = np.empty((L, S * m), dtype=np.int64)
    work = (np.empty(m), np.empty(m, np.int64), np.empty(m), np.zeros(m, np.bool_), np.empty(m, np.int64))
    for l in range(L):
        for nd in range(S):
            c = cnt[l, nd]
            if extra <= _FEW:
                _settle_order(neg[l, nd], order[l, nd])
            if extra > 0:
                _spares_row(extra, cap, neg[l, nd], order[l, nd] if extra <= _FEW else order[0, 0], c, work)
            for j in range(m):
                logcnt[l, experts[l, nd, j]] = c[j]
    return cnt, logcnt


@kernel
def _spares_row(extra, cap, neg, order, c, work):
    """One node row of :func:`_count_layers`: the counts ``c`` from one replica each plus
    ``extra`` spares (:func:`~.apportion._counts_row`'s rule, on the loads ``-neg``), then
    ``neg`` updated for the experts given spares, and with a few spares ``order`` too
    (:func:`_merge_spared`).

    With a few spares and a positive load, the experts that can take one are the first
    ``extra`` of ``order`` (the largest loads, ties by index, as the rule's list keeps
    them), so the rule's steps (:func:`~.apportion._few_steps`) start from them without a
    pass over the row, and only they can have been given spares; otherwise
    :func:`~.apportion._counts_row` runs on the row."""
    w, top, key, closed, picked = work
    m = neg.shape[0]
    for j in range(m):
        w[j] = -neg[j]
    few = extra <= _FEW and w[order[0]] > 0.0
    scan = m                                    # where the experts given spares are
    if few:
        scan = min(extra, m) if cap > 1 else 0  # every count is one: open below cap
        for i in range(scan):
            top[i] = order[i]
            key[order[i]] = w[order[i]]
        _few_steps(w, c, extra, cap, top, scan, key)
    else:
        _counts_row(w, extra, cap, c, top, key, closed)
    b = 0                                       # the experts given spares
    for i in range(scan):
        j = order[i] if few else i
        if c[j] > 1:
            neg[j] = -(w[j] / c[j])
            picked[b] = j
            b += 1
    if b > 0 and extra <= _FEW:
        _merge_spared(neg, order, c, picked, b, top)


@kernel
def _merge_spared(neg, order, c, picked, b, merged):
    """Move the ``b <= _FEW`` experts given spares (``picked``) to their places in
    ``order`` by their new ``neg``, ties by index: they are sorted (insertion, by
    :func:`_first`), then merged into the others' order up to where the last of them is
    placed (``merged``: scratch as long as ``order``)."""
    m = neg.shape[0]
    for i in range(b):
        x = picked[i]
        t = i
        while t > 0 and _first(neg, x, picked[t - 1]):
            picked[t] = picked[t - 1]
            t -= 1
        picked[t] = x
    # A spare only raises neg (w / c <= w for c >= 1, rounding being monotone), so each
    # of them is placed after its old position: once the last one is, every position
    # read is written and the rest of order is as it was.
    ib, k, i = 0, 0, 0
    while ib < b:
        j = order[i] if i < m else -1
        if j >= 0 and c[j] > 1:
            i += 1
            continue
        if j < 0 or _first(neg, picked[ib], j):
            merged[k] = picked[ib]
            ib += 1
        else:
            merged[k] = j
            i += 1
        k += 1
    for t in range(k):
        order[t] = merged[t]


@kernel
def _first(neg, a, b):
    """Expert ``a`` comes before ``b`` in item order: a smaller ``neg``, or an equal one
    and a lower index."""
    return neg[a] < neg[b] or (neg[a] == neg[b] and a < b)


# Replicas packed per call of :func:`~.packing._pack_segments` in :func:`_pack_layers`: the
# items, layouts and labels of that many stay in cache between the steps (one chunk
# held every layer of the 60 x 1024 scale case, 3 MB, and was slower than per layer).
_CHUNK_ITEMS = 8192


@kernel
def _pack_layers(experts, neg, cnt, order, settled, num_replicas, num_packs, rounds, allow_dup):
    """Step 3 of :func:`place` on every layer: the replicas of its nodes as sorted items
    (:func:`~.packing._items_row`, from :func:`_count_layers`' ``neg`` and ``cnt`` and
    ``order``, ``neg``'s argsort per node, settled here unless ``settled``:
    :func:`~.packing._settle_order`), every row's target the largest of its
    layer's bounds, and the packing of each layer's nodes as one segment
    (:func:`~.packing._pack_segments`, on chunks of layers of about
    :data:`_CHUNK_ITEMS` replicas, its work arrays unpacked once a chunk); returns
    ``phy2log [L, R]`` (``R = num_replicas``)."""
    L, S, m = experts.shape
    n = num_replicas // S
    phy2log = np.empty((L, num_replicas), dtype=np.int64)
    k = n // num_packs
    C = min(L, max(1, _CHUNK_ITEMS // (S * n)))         # layers per chunk
    values, labels = np.empty((C * S, n)), np.empty((C * S, n), np.int64)
    target, out = np.empty(C * S), np.empty((C * S, num_packs, k), np.int64)
    table = np.full(m, -1, np.int64)
    work = _pack_work(S, num_packs, k)
    for l0 in range(0, L, C):
        c = min(C, L - l0)
        for l in range(c):
            top = -np.inf
            for nd in range(S):
                r = l * S + nd
                if not settled:
                    _settle_order(neg[l0 + l, nd], order[l0 + l, nd])
                top = max(top, _items_row(neg[l0 + l, nd], cnt[l0 + l, nd], order[l0 + l, nd], num_packs,
                                          values[r], labels[r]))
            target[l * S:(l + 1) * S] = top
        if num_packs == 1 or k <= 1:        # every layout is equally balanced
            for r in range(c * S):
                for i in range(n):
                    out[r, i // k, i % k] = i
        else:
            _pack_segments(values[:c * S], labels[:c * S], target[:c * S], True, rounds, allow_dup, table, work,
                           out[:c * S])
        for l in range(c):
            for nd in range(S):
                r = l * S + nd
                for p in range(num_packs):
                    for t in range(k):
                        phy2log[l0 + l, nd * n + p * k + t] = experts[l0 + l, nd, labels[r, out[r, p, t]]]
    return phy2log


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
    group_load = group_loads(w, num_groups)
    if node_of_group is None:
        node_of_group, _, exact = groups_to_nodes(group_load, num_nodes)
        return node_of_group, exact
    node_of_group = np.asarray(node_of_group, dtype=np.int64)
    per_node = np.stack([(node_of_group == n).sum(axis=1) for n in range(num_nodes)], axis=1)
    if node_of_group.shape != group_load.shape or (per_node != num_groups // num_nodes).any():
        raise ValueError("node_of_group must give every node num_groups / num_nodes groups per layer")
    return node_of_group, False


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
    place(w, 8, 1, 1, 2)
    place(w, 4, 1, 1, 4)
    place(np.arange(1.0, 13.0).reshape(2, 6), 6, 6, 2, 2)      # three groups a node: _node_layers
