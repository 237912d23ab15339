"""Replica-count apportionment: the one replica-count rule of the package.

Given per-expert loads ``w[r, e]`` for a batch of independent rows (a row is a layer,
or a layer restricted to one node), choose integer replica counts ``c[r, e] >= 1`` with
``sum_e c[r, e] == num_replicas`` that minimise the largest per-replica load
``max_e w[r, e] / c[r, e]``.

The rule: hand out the spare replicas one at a time, each to the expert whose replicas
now carry the most load (``argmax_e w / c``, never above a cap) -- D'Hondt / Jefferson
apportionment with one free seat per expert.  It is optimal for the objective above:
the replicas it hands out are exactly the ``num_replicas - E`` largest values of the
multiset ``{w[e] / j : j >= 1}`` (the *seats*; seat ``j`` of expert ``e`` is worth
``w[e] / j``, the load of each of its ``j`` replicas before it gets one more).

* :func:`add_replicas` is the rule itself; :func:`remove_replicas` is its reverse (take
  back the replica whose loss raises the per-replica load least).  Both break ties
  toward the lowest expert index.  Both run as compiled kernels (``heuristics.compile``):
  per row, the ``num`` experts first by seat value (then index) are picked out, and
  the steps run on a heap of them.
* :func:`replica_counts` applies the rule from one replica per expert: a threshold on
  the seat value fixes the seats certainly handed out (``floor(w / t0)`` per expert,
  ``t0 = S / spares`` with a margin: at most ``spares`` seats reach it, so all of them
  are among the largest), and the rule itself hands out the rest (at most about ``E``
  per row), on the same heap.  The seats selected are the ones the rule hands out, as
  float64 quotients ``w / c``; only which of several *equal* seats is taken can differ
  from the step-by-step rule started from one replica each (any choice among equal
  seats gives the same per-replica maximum).

``eplb_opt.bounds`` derives the smallest per-replica maximum on its own (it never calls
this module), and ``tests/test_count_rule.py`` checks that the two agree; changing the
rule here cannot silently change a certificate.
"""

from __future__ import annotations

import math

import numpy as np

from .compile import kernel, warmer

__all__ = ["add_replicas", "max_replica_load", "remove_replicas", "replica_counts"]

# Relative safety margin of the threshold: it only needs to exceed the float64 rounding
# error of a row sum (about E * 2**-53) by a wide margin.
_MARGIN = 1e-9


# ------------------------------------------------------------------ the heap of one row


@kernel
def _before(key: np.ndarray, a: int, b: int) -> bool:
    """Expert ``a`` comes before ``b``: a larger key, or an equal key and a lower index."""
    return key[a] > key[b] or (key[a] == key[b] and a < b)


@kernel
def _sift_down(heap: np.ndarray, n: int, pos: int, key: np.ndarray, last_on_top: bool) -> None:
    """Restore the heap order of ``heap[:n]`` (expert ids) below position ``pos``: the
    first expert by :func:`_before` on top, or the last one with ``last_on_top``."""
    i = pos
    while True:
        child = 2 * i + 1
        if child >= n:
            return
        if child + 1 < n and _before(key, heap[child + 1], heap[child]) != last_on_top:
            child += 1
        if _before(key, heap[child], heap[i]) == last_on_top:
            return
        heap[i], heap[child] = heap[child], heap[i]
        i = child


@kernel
def _heapify(heap: np.ndarray, n: int, key: np.ndarray, last_on_top: bool) -> None:
    for pos in range(n // 2 - 1, -1, -1):
        _sift_down(heap, n, pos, key, last_on_top)


@kernel
def _top_experts(heap: np.ndarray, n_open: int, num: int, key: np.ndarray) -> int:
    """Of the ``n_open`` experts in ``heap``, keep the first ``num`` by :func:`_before`
    (all when ``num >= n_open``) in ``heap[:m]`` as a heap, first on top; returns ``m``.

    Only they can take a replica in ``num`` steps of the rule: each step takes the first
    expert, and an expert outside them comes after every one of them that has not
    taken a replica yet, of which at least one is left at every step."""
    m = max(min(num, n_open), 0)
    if m == 0:
        return 0
    _heapify(heap, m, key, True)                    # the candidates so far, last on top
    for j in range(m, n_open):
        if _before(key, heap[j], heap[0]):
            heap[0] = heap[j]
            _sift_down(heap, m, 0, key, True)
    _heapify(heap, m, key, False)
    return m


@kernel
def _hand_out(w: np.ndarray, c: np.ndarray, num: int, cap: int, closed: np.ndarray,
              heap: np.ndarray, key: np.ndarray) -> int:
    """The rule on one row, in place on ``c`` (``[E]`` int64): ``num`` steps, each one
    replica to the open expert (below ``cap``, not ``closed``) with the largest
    ``w / c``, the lowest index on ties.  Returns the replicas handed out (fewer when
    every expert is full).  ``heap`` (int64) and ``key`` (float64) are ``[E]`` scratch."""
    n = 0
    for e in range(w.size):
        if c[e] < cap and not closed[e]:
            key[e] = w[e] / c[e]
            heap[n] = e
            n += 1
    n = _top_experts(heap, n, num, key)
    given = 0
    while given < num and n > 0:
        e = heap[0]
        c[e] += 1
        given += 1
        if c[e] < cap:
            key[e] = w[e] / c[e]
        else:                                   # full: leaves the heap
            n -= 1
            heap[0] = heap[n]
        _sift_down(heap, n, 0, key, False)
    return given


@kernel
def _take_back(w: np.ndarray, c: np.ndarray, num: int, closed: np.ndarray,
               heap: np.ndarray, key: np.ndarray) -> int:
    """The reverse rule on one row, in place on ``c``: ``num`` steps, each one replica
    from the open expert (``c > 1``, not ``closed``) with the smallest ``w / (c - 1)``,
    the lowest index on ties (first by :func:`_before` on the negated quotient,
    negation being exact).  Returns the replicas taken back."""
    n = 0
    for e in range(w.size):
        if c[e] > 1 and not closed[e]:
            key[e] = -(w[e] / (c[e] - 1))
            heap[n] = e
            n += 1
    n = _top_experts(heap, n, num, key)
    taken = 0
    while taken < num and n > 0:
        e = heap[0]
        c[e] -= 1
        taken += 1
        if c[e] > 1:
            key[e] = -(w[e] / (c[e] - 1))
        else:                                   # down to one: leaves the heap
            n -= 1
            heap[0] = heap[n]
        _sift_down(heap, n, 0, key, False)
    return taken


# ------------------------------------------------------------------ the batched kernels


@kernel
def _add_rows(w: np.ndarray, counts: np.ndarray, num: np.ndarray, cap: int, frozen: np.ndarray) -> None:
    """:func:`_hand_out` on every row of ``[rows, E]`` (``num``: ``[rows]``), in place."""
    heap = np.empty(w.shape[1], dtype=np.int64)
    key = np.empty(w.shape[1])
    for r in range(w.shape[0]):
        _hand_out(w[r], counts[r], num[r], cap, frozen[r], heap, key)


@kernel
def _remove_rows(w: np.ndarray, counts: np.ndarray, num: np.ndarray, frozen: np.ndarray) -> None:
    """:func:`_take_back` on every row of ``[rows, E]`` (``num``: ``[rows]``), in place."""
    heap = np.empty(w.shape[1], dtype=np.int64)
    key = np.empty(w.shape[1])
    for r in range(w.shape[0]):
        _take_back(w[r], counts[r], num[r], frozen[r], heap, key)


@kernel
def _counts_row(row: np.ndarray, extra: int, cap: int, c: np.ndarray, heap: np.ndarray, key: np.ndarray,
                closed: np.ndarray) -> None:
    """Counts of one row ``row`` (``[E]``) from one replica each plus ``extra`` spares,
    written to ``c`` (``[E]`` int64); ``heap``, ``key`` are ``[E]`` scratch and
    ``closed`` ``[E]`` all False.

    The certain seats first: on the row scaled to max 1 (``wn``, so that no sum
    overflows; a scaling off by a rounding is covered by the margin), ``floor(wn / t0)``
    seats per expert, ``t0 = sum(wn) / extra`` raised by
    the margin, never above ``cap - 1``; their number is at most ``extra`` and each is
    worth more than any seat outside the ``extra`` largest.  The rule hands out the rest
    on the unscaled quotients.  An all-zero row gets the spares round-robin from expert
    0 (any counts are optimal; never above ``ceil(R / E)``, so within the cap)."""
    num_experts = row.shape[0]
    top = 0.0
    for e in range(num_experts):
        top = max(top, row[e])
    if top <= 0.0:
        base, rem = divmod(extra, num_experts)
        for e in range(num_experts):
            c[e] = 1 + base + (1 if e < rem else 0)
        return
    total = 0.0
    for e in range(num_experts):
        key[e] = row[e] / top                   # wn (key is scratch until _hand_out)
        total += key[e]
    t0 = total / extra * (1.0 + _MARGIN)
    inv_t0 = 1.0 / t0
    need = extra
    for e in range(num_experts):
        # wn / t0 < 1 everywhere when t0 > 1 (few spares): no certain seat.
        seats = 0 if t0 > 1.0 else min(int(math.floor(key[e] * inv_t0)), cap - 1)
        c[e] = 1 + seats
        need -= seats
    _hand_out(row, c, need, cap, closed, heap, key)


@kernel
def _counts_rows(w: np.ndarray, extra: int, cap: int, counts: np.ndarray) -> None:
    """:func:`_counts_row` on every row of ``w`` (``[rows, E]``) into ``counts``."""
    num_experts = w.shape[1]
    heap = np.empty(num_experts, dtype=np.int64)
    key = np.empty(num_experts)
    closed = np.zeros(num_experts, dtype=np.bool_)
    for r in range(w.shape[0]):
        _counts_row(w[r], extra, cap, counts[r], heap, key, closed)


# ------------------------------------------------------------------ the public functions


def _per_row(num: np.ndarray | int, rows: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.asarray(num, dtype=np.int64), (rows,)))


def _frozen(frozen: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if frozen is None:
        return np.zeros(shape, dtype=np.bool_)
    return np.ascontiguousarray(np.broadcast_to(np.asarray(frozen, dtype=np.bool_), shape))


def add_replicas(
    weight: np.ndarray,
    counts: np.ndarray,
    num: np.ndarray | int,
    cap: int,
    frozen: np.ndarray | None = None,
) -> np.ndarray:
    """Hand out ``num`` more replicas per row by the greedy rule.

    Each step gives one replica to the expert with the largest per-replica load
    ``w / c`` among those below ``cap`` and not ``frozen`` (the lowest index on ties).
    A row in which no expert can take one stops early (its sum then falls short).

    Args:
        weight: ``[rows, E]`` float64 loads.
        counts: ``[rows, E]`` int64 counts to start from (not modified).
        num: replicas to add, an int or ``[rows]`` ints.
        cap: most replicas per expert.
        frozen: optional ``[rows, E]`` bool, experts that get none.

    Returns:
        ``[rows, E]`` int64 counts.
    """
    w = np.ascontiguousarray(weight, dtype=np.float64)
    out = np.array(counts, dtype=np.int64, order="C")
    _add_rows(w, out, _per_row(num, w.shape[0]), int(cap), _frozen(frozen, w.shape))
    return out


def remove_replicas(
    weight: np.ndarray,
    counts: np.ndarray,
    num: np.ndarray | int,
    frozen: np.ndarray | None = None,
) -> np.ndarray:
    """Take back ``num`` replicas per row by the reverse of the greedy rule.

    Each step takes one replica from the expert whose per-replica load after losing it,
    ``w / (c - 1)``, is smallest among those with ``c > 1`` and not ``frozen`` (the
    lowest index on ties).  A row in which no expert can give one stops early (its
    sum then stays above the target).

    Args:
        weight: ``[rows, E]`` float64 loads.
        counts: ``[rows, E]`` int64 counts to start from (not modified).
        num: replicas to take back, an int or ``[rows]`` ints.
        frozen: optional ``[rows, E]`` bool, experts that give none.

    Returns:
        ``[rows, E]`` int64 counts.
    """
    w = np.ascontiguousarray(weight, dtype=np.float64)
    out = np.array(counts, dtype=np.int64, order="C")
    _remove_rows(w, out, _per_row(num, w.shape[0]), _frozen(frozen, w.shape))
    return out


def replica_counts(weight: np.ndarray, num_replicas: int, max_count: int | None = None) -> np.ndarray:
    """Optimal replica counts for every row: the rule (module docs) from one replica each.

    Args:
        weight: ``[rows, E]`` non-negative finite float loads (any unit).
        num_replicas: total replicas per row, ``>= E``.
        max_count: optional cap per expert, normally the number of GPUs the row spans:
            beyond it some GPU must hold two replicas of one expert, which never lowers
            that GPU's share of the expert (``w * ceil(c / P) / c >= w / P``) and wastes
            slots.  Raised to ``ceil(num_replicas / E)`` where smaller, so the caps can
            always absorb every replica.

    Returns:
        ``[rows, E]`` int64 counts, each ``>= 1``, each row summing to ``num_replicas``.
        Among count vectors with the smallest ``max w / c`` this is one the greedy
        rule can produce (experts with equal loads are interchangeable; the choice is
        deterministic).  Rows whose loads are
        all zero get the spare replicas round-robin from expert 0.
    """
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [rows, E], got shape {w.shape}")
    rows, num_experts = w.shape
    extra = int(num_replicas) - num_experts
    if extra < 0:
        raise ValueError(f"num_replicas={num_replicas} is below the expert count {num_experts}")
    counts = np.ones((rows, num_experts), dtype=np.int64)
    if extra == 0 or rows == 0 or num_experts == 0:
        return counts
    cap = num_replicas if max_count is None else max(int(max_count), -(-num_replicas // num_experts))
    _counts_rows(np.ascontiguousarray(w, dtype=np.float64), extra, int(cap), counts)
    return counts


@warmer
def _warm() -> None:
    """Compile the kernels with the argument types real calls use."""
    w = np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    c = replica_counts(w, 7, max_count=3)
    add_replicas(w, c, 1, 4, frozen=np.zeros(w.shape, dtype=bool))
    remove_replicas(w, c, np.array([1, 2]))

# ------------------------------------------------------------------------------ helpers


def max_replica_load(weight: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Largest per-replica load ``max_e w / c`` per row, ``[rows]`` float64."""
    w = np.asarray(weight, dtype=np.float64)
    return (w / counts).max(axis=1)


def unit_scale(values: np.ndarray) -> np.ndarray:
    """``values`` with each row (last axis but one and before: each leading index)
    multiplied by a power of two that puts its largest entry in ``[0.5, 1)``.

    Exact (a power-of-two scale changes no ratio and rounds nothing unless an entry
    falls below float64's normal range, i.e. under ~1e-308 of the row's largest), so a
    placement chosen on the result is the one chosen on ``values``; sums of squares and
    products used for tie-breaks then neither overflow nor underflow.
    """
    v = np.asarray(values, dtype=np.float64)
    top = v.reshape(v.shape[0], -1).max(axis=1) if v.ndim > 1 else v.max(keepdims=True)
    _, exp = np.frexp(np.where(top > 0, top, 1.0))
    shape = (-1,) + (1,) * (v.ndim - 1)
    return np.ldexp(v, (-exp).reshape(shape))

