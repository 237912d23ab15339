"""Replica-count apportionment.

Given per-expert loads ``w[r, e]`` for a batch of independent rows (a row is a layer,
or a layer restricted to one node), choose integer replica counts ``c[r, e] >= 1`` with
``sum_e c[r, e] == num_replicas`` that minimise the largest per-replica load
``max_e w[r, e] / c[r, e]``.

The greedy rule "give the next replica to ``argmax_e w / c``" (D'Hondt / Jefferson
apportionment with one free seat per expert) is optimal for that objective, and the
replicas it hands out are exactly the ``num_replicas - E`` largest values of the multiset
``{w[e] / j : j >= 1}``.  We compute that selection in closed form for all rows at once:
a threshold ``t0`` fixes almost every count, and the few remaining seats are chosen among
a ragged window of at most ``2 E`` candidates per row by one sort.  No Python loop over
rows, experts or replicas.
"""

from __future__ import annotations

import numpy as np

__all__ = ["replica_counts", "max_replica_load"]

# Relative safety margins for the two thresholds.  They only need to exceed the float64
# rounding error of a row sum (about E * 2**-53) by a wide margin.
_MARGIN = 1e-9
# Up to this many spare replicas per row, the plain greedy loop (one vectorised step per
# spare replica) is cheaper than the threshold method.
_GREEDY_STEPS = 16


def _greedy_counts(
    w: np.ndarray, extra: np.ndarray | int, cap: int, counts: np.ndarray | None = None
) -> np.ndarray:
    """Greedy apportionment, one spare replica per step for every row at once, never
    above ``cap`` replicas per expert.  ``extra`` may differ per row."""
    rows = w.shape[0]
    counts = np.ones(w.shape, dtype=np.int64) if counts is None else counts.copy()
    ratio = np.where(counts < cap, w / counts, -np.inf)
    ar = np.arange(rows)
    if np.ndim(extra) == 0:
        for _ in range(int(extra)):
            e = ratio.argmax(axis=1)
            c = counts[ar, e] + 1
            counts[ar, e] = c
            ratio[ar, e] = np.where(c < cap, w[ar, e] / c, -np.inf)
        return counts
    extra = np.asarray(extra, dtype=np.int64)
    for step in range(int(extra.max(initial=0))):
        live = ar[extra > step]
        e = ratio[live].argmax(axis=1)
        counts[live, e] += 1
        ratio[live, e] = np.where(counts[live, e] < cap, w[live, e] / counts[live, e], -np.inf)
    return counts


def _few_spares(w: np.ndarray, extra: int, cap: int) -> np.ndarray:
    """Greedy counts when there are few spare replicas, in closed form.

    Only the ``extra`` heaviest experts of a row can receive a spare (a lighter one is
    picked only after ``extra`` heavier ones got one each, or reached the cap, which is
    at least 2).  Among them the greedy hands out exactly the ``extra`` largest of the
    values ``w_e / j`` (``j = 1 .. cap - 1``), so one partial sort over
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


def replica_counts(weight: np.ndarray, num_replicas: int, max_count: int | None = None) -> np.ndarray:
    """Optimal replica counts for every row.

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
        # All-zero rows: any counts are optimal; spread the spares evenly.
        base, rem = divmod(extra, num_experts)
        flat = np.full(num_experts, 1 + base, dtype=np.int64)
        flat[:rem] += 1                       # never above ceil(R / E) <= cap
        counts[~live] = flat
        if not live.any():
            return counts
        w = w[live]
        row_max = row_max[live]

    if extra <= _GREEDY_STEPS:
        counts[live] = _few_spares(w, extra, cap)
        return counts

    # Scale each row to max 1: counts are scale invariant, and this keeps tiny or huge
    # magnitudes away from underflow and overflow.
    wn = w / row_max[:, None]
    total = wn.sum(axis=1)
    positive = (wn > 0).sum(axis=1)

    # Threshold t0 = S / extra: floor(w / t0) summed is at most `extra`, so every seat
    # with value w/j >= t0 is certainly handed out.
    t0 = total / extra * (1.0 + _MARGIN)
    base = np.minimum(np.floor(wn / t0[:, None]).astype(np.int64), cap - 1)
    need = extra - base.sum(axis=1)
    # Threshold t1 = S / (extra + #positive): at least `extra` seats have value >= t1,
    # so the remaining `need` seats are among values in [t1, t0).
    t1 = total / (extra + positive) * (1.0 - _MARGIN)
    high = np.minimum(np.floor(wn / t1[:, None]).astype(np.int64), cap - 1)
    ncand = high - base
    short = ncand.sum(axis=1) < need
    if short.any():
        # Caps bind below t1: finish those rows greedily from their thresholded counts.
        rows_s = np.flatnonzero(short)
        done = _greedy_counts(wn[rows_s], need[rows_s], cap, counts=1 + base[rows_s])
        base[rows_s] = done - 1
        need[rows_s] = 0
        ncand[rows_s] = 0

    if need.any():
        # Lay each row's candidates (expert e, seat j in base_e+1..high_e, value w_e/j)
        # out densely, row by row, and take the `need` largest of each row.
        nrows = w.shape[0]
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
        # Values of one expert strictly decrease with j, so the top `need` of a row is a
        # prefix of each expert's seats; equal values of different experts are
        # interchangeable for the objective.
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
        base += add
    counts[live] = 1 + base
    return counts


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

