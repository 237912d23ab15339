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
  the seat value fixes the seats certainly handed out (those worth more than ``t``,
  counted on the float64 quotients ``w / j`` the rule compares, when there are at most
  ``spares`` of them: all of them are then among the largest), and the rule itself
  hands out the rest on the same heap.  The thresholds follow Jefferson's divisor
  method (``S / spares``, then corrected by the fractional seats it left), so the heap
  usually hands out a few seats.  The counts are exactly the step-by-step rule's from
  one replica each, ties included.

``eplb_opt.bounds`` derives the smallest per-replica maximum on its own (it never calls
this module), and ``tests/test_count_rule.py`` checks that the two agree; changing the
rule here cannot silently change a certificate.
"""

from __future__ import annotations

import numpy as np

from .compile import kernel, warmer

__all__ = ["add_replicas", "max_replica_load", "remove_replicas", "replica_counts"]

# Steps of the rule run on a short ordered list rather than a heap (:func:`_hand_out`);
# rows with no more spares skip the certain seats too.
_FEW = 16

# Rounds of the certain-seat threshold after the first (:func:`_certain_seats`).
_TRIES = 3

# Margins of :func:`_above`'s product test (``1 +- 2**-40``).
_HI = 1.0 + 2.0 ** -40
_LO = 1.0 - 2.0 ** -40


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
def _hand_out_few(w: np.ndarray, c: np.ndarray, num: int, cap: int, closed: np.ndarray,
                  top: np.ndarray, key: np.ndarray) -> int:
    """:func:`_hand_out` for a few steps (``num <= _FEW``): the first ``num`` open experts
    by :func:`_before` (only they can take a replica in ``num`` steps, as in
    :func:`_top_experts`) kept in order in ``top[:n]``, picked out in one pass over the
    row (experts arrive by increasing index, so a newcomer goes before a kept one only
    with a strictly larger key; once ``num`` are kept, the last one's key ``kth`` is held
    in a register and most experts are turned away by one comparison; ``w / 1`` is ``w``
    bit for bit, so an expert with one replica needs no division); each step takes the
    first and moves it back to its place, or drops it when full.  ``key`` is written for
    the kept experts only."""
    n = 0
    kth = np.inf                                # key of the last kept one, once num are kept
    for e in range(w.size):
        ce = c[e]
        if ce >= cap or closed[e]:
            continue
        x = w[e] if ce == 1 else w[e] / ce
        if n == num:
            if not x > kth:
                continue
            n -= 1                              # the last kept one leaves
        key[e] = x
        j = n
        while j > 0 and x > key[top[j - 1]]:
            top[j] = top[j - 1]
            j -= 1
        top[j] = e
        n += 1
        if n == num:
            kth = key[top[n - 1]]
    return _few_steps(w, c, num, cap, top, n, key)


@kernel
def _few_steps(w: np.ndarray, c: np.ndarray, num: int, cap: int, top: np.ndarray, n: int, key: np.ndarray) -> int:
    """The steps of :func:`_hand_out_few` once its list is kept: ``top[:n]``, the first
    ``n`` open experts by :func:`_before` in order, ``key`` their ``w / c``.  Each of
    ``num`` steps takes the first and moves it back to its place, or drops it when full.
    Returns the replicas handed out."""
    given = 0
    while given < num and n > 0:
        e = top[0]
        c[e] += 1
        given += 1
        j = 0
        if c[e] < cap:
            key[e] = w[e] / c[e]
            while j + 1 < n and _before(key, top[j + 1], e):
                top[j] = top[j + 1]
                j += 1
            top[j] = e
        else:                                   # full: leaves the list
            n -= 1
            for i in range(n):
                top[i] = top[i + 1]
    return given


@kernel
def _hand_out(w: np.ndarray, c: np.ndarray, num: int, cap: int, closed: np.ndarray,
              heap: np.ndarray, key: np.ndarray) -> int:
    """The rule on one row, in place on ``c`` (``[E]`` int64): ``num`` steps, each one
    replica to the open expert (below ``cap``, not ``closed``) with the largest
    ``w / c``, the lowest index on ties.  Returns the replicas handed out (fewer when
    every expert is full).  ``heap`` (int64) and ``key`` (float64) are ``[E]`` scratch.
    A few steps run on a short ordered list instead (:func:`_hand_out_few`)."""
    if num <= _FEW:
        return _hand_out_few(w, c, num, cap, closed, heap, key)
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
def _above(w: float, j: int, t: float) -> bool:
    """Whether the seat ``w / j`` (the float64 quotient) is worth more than ``t``.

    Decided on the product ``j * t`` where it is clear by a wide margin (``w`` more than
    ``2**-40`` of it above or below: the rounding of the product, of its scaling and of
    the quotient are each below ``2**-52``), by the quotient itself otherwise."""
    p = j * t
    if 1e-290 < p < 1e290:
        if w > p * _HI:
            return True
        if w < p * _LO:
            return False
    return w / j > t


@kernel
def _seats_above(row: np.ndarray, t: float, cap: int, c: np.ndarray) -> int:
    """``c[e] = 1 +`` the seats of expert ``e`` worth more than ``t``: the ``j`` in ``1 ..
    cap - 1`` with ``row[e] / j > t`` (:func:`_above`; the quotient never rises with
    ``j``, so they are the first ``j``; ``row[e] / t`` only guesses their number).
    Returns the number of such seats in all.

    When that number is at most the spares, every one of them is handed out by the
    rule: the rule hands out the spares largest seats (value first, then the lowest
    expert), so a seat left out would have the spares seats before it, each worth at
    least as much and so more than ``t`` too, one more than there are."""
    top = cap - 1
    inv = 1.0 / t
    total = 0
    for e in range(row.shape[0]):
        w = row[e]
        q = w * inv
        j = top if not q < top else int(q)
        while j > 0 and not _above(w, j, t):
            j -= 1
        while j < top and _above(w, j + 1, t):
            j += 1
        c[e] = 1 + j
        total += j
    return total


@kernel
def _certain_seats(row: np.ndarray, total: float, extra: int, cap: int, c: np.ndarray, scratch: np.ndarray) -> int:
    """Seats of one row (sum ``total``) certainly handed out among ``extra`` spares,
    written to ``c`` as counts (:func:`_seats_above`); returns how many.

    The thresholds follow Jefferson's divisor method: ``t = total / extra`` first (about
    ``extra`` seats lie above it, less the fractional parts ``F`` of the experts'
    ``w / t``), then ``total / (extra + F)`` with ``F`` measured there; once a threshold
    has too many seats above it, the next is interpolated between it and the last one
    kept.  A threshold is kept when no more than ``extra`` seats lie above it and more
    than at the last one kept (at most ``_TRIES`` more; ``scratch`` holds a trial's
    counts)."""
    num_experts = row.shape[0]
    xa = extra / total                           # 1 / threshold, the last one kept
    got = _seats_above(row, 1.0 / xa, cap, c)
    if got > extra:                              # rounding: nothing is certain
        for e in range(num_experts):
            c[e] = 1
        return 0
    xr, over = np.inf, 0                         # the last one with too many seats
    for _ in range(_TRIES):
        if got == extra:
            break
        if xr == np.inf:
            x = (extra + (total * xa - got)) / total
        else:
            x = xa + (xr - xa) * (extra - got) / (over - got)
        if not xa < x < xr:
            break
        more = _seats_above(row, 1.0 / x, cap, scratch)
        if more > extra:
            xr, over = x, more
            continue
        xa = x
        if more > got:
            got = more
            for e in range(num_experts):
                c[e] = scratch[e]
    return got


@kernel
def _counts_row(row: np.ndarray, extra: int, cap: int, c: np.ndarray, heap: np.ndarray, key: np.ndarray,
                closed: np.ndarray) -> None:
    """Counts of one row ``row`` (``[E]``) from one replica each plus ``extra`` spares,
    written to ``c`` (``[E]`` int64); ``heap``, ``key`` are ``[E]`` scratch and
    ``closed`` ``[E]`` all False.

    The seats certainly handed out first (:func:`_certain_seats`; none when the largest
    load is below ``sum / extra``, where no seat can reach the first threshold), then
    the rule hands out the rest (:func:`_hand_out`).  An all-zero row gets the spares
    round-robin from expert 0 (any counts are optimal; never above ``ceil(R / E)``, so
    within the cap)."""
    num_experts = row.shape[0]
    top = 0.0
    total = 0.0
    for e in range(num_experts):
        top = max(top, row[e])
        total += row[e]
    if top <= 0.0:
        base, rem = divmod(extra, num_experts)
        for e in range(num_experts):
            c[e] = 1 + base + (1 if e < rem else 0)
        return
    need = extra
    if extra > _FEW and top > total / extra and total < np.inf:
        need -= _certain_seats(row, total, extra, cap, c, heap)
    else:
        for e in range(num_experts):
            c[e] = 1
    if need <= _FEW:        # _hand_out's own choice, without its call (each array passed costs)
        _hand_out_few(row, c, need, cap, closed, heap, key)
    else:
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

