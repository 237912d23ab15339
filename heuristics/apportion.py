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

* :func:`add_replicas` is the rule itself, one replica per step for every row at once;
  :func:`remove_replicas` is its reverse (take back the replica whose loss raises the
  per-replica load least).  Both break ties toward the lowest expert index.
* :func:`replica_counts` applies the rule from one replica per expert, in closed form:
  the largest seats are selected directly (a partial sort over the heaviest experts'
  first seats when few replicas are spare; otherwise a threshold fixes almost every
  count and one sort over a window of at most ``2 E`` seats per row places the rest).
  Rows whose caps bind inside that window finish with :func:`add_replicas`.  The seats
  selected are the ones the rule hands out; only which of several *equal* seats is
  taken can differ from the step-by-step rule (any choice among equal seats gives the
  same per-replica maximum).  No Python loop over rows, experts or replicas.

``eplb_opt.bounds`` derives the smallest per-replica maximum on its own (it never calls
this module), and ``tests/test_count_rule.py`` checks that the two agree; changing the
rule here cannot silently change a certificate.
"""

from __future__ import annotations

import numpy as np

__all__ = ["add_replicas", "max_replica_load", "remove_replicas", "replica_counts"]

# Relative safety margins for the two thresholds.  They only need to exceed the float64
# rounding error of a row sum (about E * 2**-53) by a wide margin.
_MARGIN = 1e-9
# Up to this many spare replicas per row, selecting among the heaviest experts' first
# seats is cheaper than the threshold method.
_GREEDY_STEPS = 16


# ------------------------------------------------------------------ the rule, step by step


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
    w = np.asarray(weight, dtype=np.float64)
    counts = np.array(counts, dtype=np.int64)
    rows = w.shape[0]
    open_ = counts < cap if frozen is None else (counts < cap) & ~frozen
    ratio = np.where(open_, w / counts, -np.inf)
    num = np.array(np.broadcast_to(np.asarray(num, dtype=np.int64), (rows,)))
    ar = np.arange(rows)
    for step in range(int(num.max(initial=0))):
        live = ar[num > step]
        e = ratio[live].argmax(axis=1)
        full = ratio[live, e] == -np.inf
        if full.any():                      # no expert of these rows can take one: stop them
            num[live[full]] = step
            live, e = live[~full], e[~full]
        counts[live, e] += 1
        ratio[live, e] = np.where(counts[live, e] < cap, w[live, e] / counts[live, e], -np.inf)
    return counts


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
    w = np.asarray(weight, dtype=np.float64)
    counts = np.array(counts, dtype=np.int64)
    rows = w.shape[0]
    open_ = counts > 1 if frozen is None else (counts > 1) & ~frozen
    ratio = np.where(open_, w / np.maximum(counts - 1, 1), np.inf)
    num = np.array(np.broadcast_to(np.asarray(num, dtype=np.int64), (rows,)))
    ar = np.arange(rows)
    for step in range(int(num.max(initial=0))):
        live = ar[num > step]
        e = ratio[live].argmin(axis=1)
        empty = ratio[live, e] == np.inf
        if empty.any():                     # no expert of these rows can give one: stop them
            num[live[empty]] = step
            live, e = live[~empty], e[~empty]
        counts[live, e] -= 1
        c = counts[live, e]
        ratio[live, e] = np.where(c > 1, w[live, e] / np.maximum(c - 1, 1), np.inf)
    return counts


# --------------------------------------------------------------- the rule in closed form


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
    w = np.asarray(weight, dtype=np.float64)
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
    row_max = w.max(axis=1)
    live = row_max > 0
    if not live.all():
        counts[~live] = _spread(num_experts, extra)
        if not live.any():
            return counts
        w = w[live]
        row_max = row_max[live]
    if extra <= _GREEDY_STEPS:
        counts[live] = _few_spares(w, extra, cap)
    else:
        counts[live] = _threshold_counts(w, row_max, extra, cap)
    return counts


def _spread(num_experts: int, extra: int) -> np.ndarray:
    """``[E]`` counts of an all-zero row (any counts are optimal): the spares evenly,
    round-robin from expert 0 (never above ``ceil(R / E)``, so within any cap)."""
    base, rem = divmod(extra, num_experts)
    flat = np.full(num_experts, 1 + base, dtype=np.int64)
    flat[:rem] += 1
    return flat


def _few_spares(w: np.ndarray, extra: int, cap: int) -> np.ndarray:
    """``[rows, E]`` counts when there are few spare replicas (``w``: ``[rows, E]``, every
    row with a positive load), by one partial sort.

    Only the ``extra`` heaviest experts of a row can receive a spare (a lighter one is
    picked only after ``extra`` heavier ones got one each, or reached the cap, which is
    at least 2).  Among them the rule hands out exactly the ``extra`` largest of the
    seats ``w_e / j`` (``j = 1 .. cap - 1``), so one partial sort over
    ``extra x extra`` candidates per row gives the same counts as ``extra`` steps.
    """
    rows, num_experts = w.shape
    counts = np.ones((rows, num_experts), dtype=np.int64)
    ar = np.arange(rows)[:, None]
    m = min(extra, num_experts)
    top = np.argpartition(-w, m - 1, axis=1)[:, :m] if m < num_experts else np.broadcast_to(
        np.arange(num_experts), (rows, num_experts)
    )
    j = np.arange(1, extra + 1)
    cand = w[ar, top][:, :, None] / j                              # [rows, m, extra]
    cand[:, :, j >= cap] = -np.inf
    flat = cand.reshape(rows, -1)
    pick = np.argpartition(-flat, extra - 1, axis=1)[:, :extra] // extra
    add = np.bincount((np.arange(rows)[:, None] * m + pick).ravel(), minlength=rows * m).reshape(rows, m)
    counts[ar, top] += add
    return counts


def _threshold_counts(w: np.ndarray, row_max: np.ndarray, extra: int, cap: int) -> np.ndarray:
    """``[rows, E]`` counts by thresholds on the seat value (``w``: ``[rows, E]``, every
    row with a positive load; ``row_max``: ``[rows]`` its largest load).

    Each row is scaled to max 1 (counts are scale invariant, and this keeps tiny or huge
    magnitudes away from underflow and overflow).  Seats at or above ``t0`` are
    certainly handed out; the ``need`` seats still missing lie in ``[t1, t0)``, at most
    about ``2 E`` candidates per row, and are picked by :func:`_window_seats`.
    """
    wn = w / row_max[:, None]
    base, need, ncand = _certain_seats(wn, extra, cap)
    short = ncand.sum(axis=1) < need
    if short.any():
        # Caps bind below t1: finish those rows by the rule from their certain seats.
        rows_s = np.flatnonzero(short)
        done = add_replicas(wn[rows_s], 1 + base[rows_s], need[rows_s], cap)
        base[rows_s] = done - 1
        need[rows_s] = 0
        ncand[rows_s] = 0
    if need.any():
        base += _window_seats(wn, base, ncand, need)
    return 1 + base


def _certain_seats(wn: np.ndarray, extra: int, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two thresholds on scaled loads ``wn`` (``[rows, E]``, max 1 per row).

    Returns ``(base [rows, E], need [rows], ncand [rows, E])``: the spare seats at or
    above ``t0 = S / extra`` (``floor(w / t0)`` summed is at most ``extra``, so each is
    certainly handed out), the seats still missing, and each expert's candidate seats
    in ``[t1, t0)`` with ``t1 = S / (extra + #positive)`` (at least ``extra`` seats
    are at or above it).  Counts never exceed ``cap``.
    """
    total = wn.sum(axis=1)
    positive = (wn > 0).sum(axis=1)
    t0 = total / extra * (1.0 + _MARGIN)
    base = np.minimum(np.floor(wn / t0[:, None]).astype(np.int64), cap - 1)
    need = extra - base.sum(axis=1)
    t1 = total / (extra + positive) * (1.0 - _MARGIN)
    high = np.minimum(np.floor(wn / t1[:, None]).astype(np.int64), cap - 1)
    return base, need, high - base


def _window_seats(wn: np.ndarray, base: np.ndarray, ncand: np.ndarray, need: np.ndarray) -> np.ndarray:
    """``[rows, E]`` seats taken in the window: each row's ``need`` largest candidates.

    Expert ``e`` has candidate seats ``j = base_e + 1 .. base_e + ncand_e`` worth
    ``wn_e / j``; they are laid out densely, row by row, and one sort per row picks the
    largest.  Values of one expert strictly decrease with ``j``, so the top ``need`` of a
    row is a prefix of each expert's seats; equal values of different experts are
    interchangeable for the objective.
    """
    nrows, num_experts = wn.shape
    flat_n = ncand.ravel()
    n_total = int(flat_n.sum())
    cell = np.repeat(np.arange(flat_n.size), flat_n)  # (row, expert) cell id
    cell_start = np.cumsum(flat_n) - flat_n
    within = np.arange(n_total) - cell_start[cell]     # 0-based seat offset
    value = wn.ravel()[cell] / (base.ravel()[cell] + 1 + within)
    row_of = cell // num_experts
    per_row = ncand.sum(axis=1)
    row_start = np.cumsum(per_row) - per_row
    pos = np.arange(n_total) - row_start[row_of]
    width = int(per_row.max())
    dense = np.full((nrows, width), -1.0)
    dense[row_of, pos] = value
    dense_cell = np.zeros((nrows, width), dtype=np.int64)
    dense_cell[row_of, pos] = cell
    order = np.argsort(-dense, axis=1)
    take = np.arange(width)[None, :] < need[:, None]
    picked = np.take_along_axis(dense_cell, order, axis=1)[take]
    add = np.bincount(picked, minlength=flat_n.size).reshape(base.shape)
    got = add.sum(axis=1)
    if not np.array_equal(got, need):  # pragma: no cover - guarded by the margins
        raise RuntimeError(
            "replica apportionment lost seats (internal error); "
            f"needed {need.tolist()}, found {got.tolist()}"
        )
    return add


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

