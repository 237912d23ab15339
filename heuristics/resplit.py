"""Exact re-split of GPU pairs (meet in the middle), batched over many pairs.

Two packs with ``k`` items each hold ``2k`` items; the best re-split puts ``k`` of them
on each pack so that the heavier pack is as light as possible.  Items sharing a label
(replicas of one expert, equal loads) are kept apart: two of them go one to each pack,
so they are taken out of the search and their loads added to both sides.  The remaining
``2k'`` free items are split into halves ``A`` and ``B``; every subset of ``A`` is
matched with the subset of ``B`` of complementary size whose sum is closest to what
is needed, by one sort and one binary search over all pairs at once.  This is exact:
the returned split is optimal among splits that keep equal labels apart.

:func:`resplit_rounds` uses it as a local search over a layout: each round re-splits
the disjoint pairs (i-th heaviest pack, i-th lightest pack) of every active row, then
the heaviest pack with each of the lightest few, keeping every change that lowers the
pair's heavier load.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np

__all__ = ["MAX_FREE", "SECONDS_PER_PAIR_SUBSET", "split_pairs", "resplit_rounds"]

# Largest number of free items per side searched exactly (2**MAX_FREE subsets per half).
MAX_FREE = 12
# Seconds per pair and per subset of a half (2**k) a round takes on this project's
# machine (58 rows x 23 pairs at k = 9: 0.165 s); with a deadline, a round works only on
# as many rows as the time left pays for at this rate.
SECONDS_PER_PAIR_SUBSET = 3e-7
# With a deadline: estimated seconds of one round at most.
ROUND_SECONDS = 0.02


@lru_cache(maxsize=32)
def _subsets(k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bits [2**k, k] float, popcount [2**k])`` for all subsets of ``k`` items."""
    m = np.arange(2**k)
    bits = ((m[:, None] >> np.arange(k)) & 1).astype(np.float64)
    bits.setflags(write=False)
    pc = bits.sum(axis=1).astype(np.int64)
    pc.setflags(write=False)
    return bits, pc


def _subset_sums(x: np.ndarray) -> np.ndarray:
    """``[rows, 2**k]`` sums of every subset of each row's ``k`` items, subset ``m``
    holding item ``i`` when bit ``i`` of ``m`` is set (as :func:`_subsets` orders them).
    Built by doubling with elementwise additions, so a row's sums do not depend on the
    other rows (a matrix product's blocking could)."""
    rows, k = x.shape
    out = np.zeros((rows, 2**k))
    for i in range(k):
        h = 1 << i
        out[:, h : 2 * h] = out[:, :h] + x[:, i : i + 1]
    return out


def _mitm(free: np.ndarray, need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Choose exactly ``k`` of the ``2k`` free items of each pair with sum closest to
    ``need`` (``[pairs]``).  Returns ``(take [pairs, 2k] bool, achieved sum [pairs])``.

    Every step works row by row (per-row sorts, elementwise arithmetic), so a pair's
    answer is the same whatever else is in the batch."""
    pairs, n2 = free.shape
    k = n2 // 2
    bits, pc = _subsets(k)
    n_sub = 2**k
    scale = free.sum(axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    # Subset sums lie in [0, 1]: a target outside [-1, 2] picks what the clipped one
    # picks, and clipping keeps a tiny scale from overflowing it.
    with np.errstate(over="ignore"):
        target = np.clip(need / scale, -1.0, 2.0)
    sa = _subset_sums(free[:, :k] / scale[:, None])      # [pairs, 2**k]
    sb = _subset_sums(free[:, k:] / scale[:, None])
    # Per pair, B subsets sorted by (size, sum) -- sums lie in [0, 1], size classes 4
    # apart -- and each A subset's query (complementary size, the sum still needed)
    # located among them by one merged per-row sort (queries first on ties: the
    # position is the number of keys strictly below the query).
    kb = 4.0 * pc[None, :] + sb
    korder = np.argsort(kb, axis=1, kind="stable")
    q = 4.0 * (k - pc)[None, :] + (target[:, None] - sa)
    merged = np.concatenate([q, np.take_along_axis(kb, korder, axis=1)], axis=1)
    morder = np.argsort(merged, axis=1, kind="stable")
    is_key = morder >= n_sub
    keys_before = np.cumsum(is_key, axis=1) - is_key
    rr, jj = np.nonzero(~is_key)
    pos = np.empty((pairs, n_sub), dtype=np.int64)
    pos[rr, morder[rr, jj]] = keys_before[rr, jj]
    want = (k - pc)[None, :]
    best_err = np.full((pairs, n_sub), np.inf)
    best_b = np.zeros((pairs, n_sub), dtype=np.int64)
    for cand in (pos - 1, pos):
        ok = (cand >= 0) & (cand < n_sub)
        idx = np.take_along_axis(korder, np.clip(cand, 0, n_sub - 1), axis=1)
        ok &= pc[idx] == want
        err = np.where(ok, np.abs(sa + np.take_along_axis(sb, idx, axis=1) - target[:, None]), np.inf)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_b = np.where(better, idx, best_b)
    ma = best_err.argmin(axis=1)
    mb = best_b[np.arange(pairs), ma]
    take = np.concatenate([bits[ma], bits[mb]], axis=1).astype(bool)
    return take, (free * take).sum(axis=1)


def split_pairs(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best split of each pair's ``2k`` items into two packs of ``k``.

    Args:
        values: ``[pairs, 2k]`` item loads (items of one label carry equal loads).
        labels: ``[pairs, 2k]`` int labels; items sharing a label are kept on different
            packs (a label with three or more items in a pair must share a pack once).

    Returns:
        ``(side [pairs, 2k] bool, heavier [pairs])``: ``side`` marks the ``k`` items of
        the first pack; ``heavier`` is the larger pack load of the split.  Pairs with
        more than ``MAX_FREE`` free items per side are returned unchanged (first ``k``
        items on the first pack).
    """
    pairs, n2 = values.shape
    k = n2 // 2
    side = np.zeros((pairs, n2), dtype=bool)
    side[:, :k] = True
    if pairs == 0 or k == 0:
        return side, np.zeros(pairs)
    # Match items of one label two by two (sort labels, pair neighbours within a run).
    order = np.argsort(labels, axis=1, kind="stable")
    sl = np.take_along_axis(labels, order, axis=1)
    start = np.ones((pairs, n2), dtype=bool)
    start[:, 1:] = sl[:, 1:] != sl[:, :-1]
    run_start = np.maximum.accumulate(np.where(start, np.arange(n2), 0), axis=1)
    offset = np.arange(n2) - run_start
    nxt_same = np.zeros((pairs, n2), dtype=bool)
    nxt_same[:, :-1] = ~start[:, 1:]
    first = (offset % 2 == 0) & nxt_same                 # first item of a matched couple
    second = np.zeros_like(first)
    second[:, 1:] = first[:, :-1]
    matched_first = np.zeros((pairs, n2), dtype=bool)
    matched_second = np.zeros((pairs, n2), dtype=bool)
    np.put_along_axis(matched_first, order, first, axis=1)
    np.put_along_axis(matched_second, order, second, axis=1)
    free_mask = ~(matched_first | matched_second)
    couples = matched_first.sum(axis=1)
    fixed_a = (values * matched_first).sum(axis=1)
    fixed_b = (values * matched_second).sum(axis=1)
    total_free = (values * free_mask).sum(axis=1)
    kfree = k - couples
    heavier = np.full(pairs, np.nan)
    for kf in np.unique(kfree):
        rows = np.flatnonzero(kfree == kf)
        if kf > MAX_FREE:
            cur = (values[rows] * side[rows]).sum(axis=1)
            heavier[rows] = np.maximum(cur, values[rows].sum(axis=1) - cur)
            continue
        fm = free_mask[rows]
        free_idx = np.argsort(~fm, axis=1, kind="stable")[:, : 2 * kf]   # free items first
        s = np.zeros((rows.size, n2), dtype=bool)
        s[matched_first[rows]] = True
        if kf > 0:
            free_vals = np.take_along_axis(values[rows], free_idx, axis=1)
            # First pack gets fixed_a + S, second fixed_b + (F - S): aim S at the middle.
            need = (fixed_b[rows] + total_free[rows] - fixed_a[rows]) / 2.0
            take, got = _mitm(free_vals, need)
            np.put_along_axis(s, free_idx, take, axis=1)
        else:
            got = np.zeros(rows.size)
        side[rows] = s
        heavier[rows] = np.maximum(fixed_a[rows] + got, fixed_b[rows] + total_free[rows] - got)
    return side, heavier


def resplit_rounds(
    values: np.ndarray,
    labels: np.ndarray,
    layout: np.ndarray,
    target: np.ndarray | None = None,
    max_rounds: int = 1000,
    segment_size: int = 1,
    partners: int = 3,
    deadline: float | None = None,
) -> tuple[np.ndarray, int]:
    """Local search by exact pair re-splits (see module docs).

    Args:
        values: ``[rows, n]`` item loads; labels: ``[rows, n]`` int labels.
        layout: ``[rows, P, k]`` layout of item indices (not modified).
        target: optional ``[rows]`` lower bounds: a row at its bound is done.
        max_rounds: cap on rounds.
        segment_size: consecutive rows forming one objective (the nodes of a layer);
            only rows attaining their segment's maximum are worked on.
        partners: how many of the lightest packs the heaviest pack tries each round.
        deadline: ``time.perf_counter()`` value; no round starts that the previous
            round's duration says would end after it, and a round works only on the
            rows (largest load over target first) that the time left pays for at
            :data:`SECONDS_PER_PAIR_SUBSET`.

    Returns:
        ``(layout, rounds run)``; no row's heaviest pack is ever heavier than before.
    """
    rows, P, k = layout.shape
    layout = layout.copy()
    if P < 2 or k < 1 or rows == 0:
        return layout, 0
    ar_all = np.arange(rows)
    v = values[ar_all[:, None, None], layout]                    # [rows, P, k] item loads
    lab = labels[ar_all[:, None, None], layout]                  # [rows, P, k] item labels
    loads = v.sum(axis=2)                                        # [rows, P]
    stuck = np.zeros(rows, dtype=bool)
    thresh = None if target is None else target * (1 + 1e-12)
    done_rounds = 0
    last = 0.0
    measured = 0.0
    for _ in range(max_rounds):
        # Do not start a round that would likely end after the deadline.
        if deadline is not None and time.perf_counter() + last > deadline:
            break
        t_round = time.perf_counter()
        active = _open_rows(loads, stuck, thresh, segment_size)
        if deadline is not None and active.size:
            active = _rows_in_time(active, loads, target, deadline, measured, partners, k)
        if active.size == 0:
            break
        done_rounds += 1
        changed = _resplit_round(v, lab, layout, loads, active, partners)
        # A row where no pair could be improved is stuck (a local optimum for pair
        # re-splits); otherwise its heaviest pack may find a partner next round.
        stuck[active[~changed]] = True
        last = time.perf_counter() - t_round
        measured = last / active.size
    return layout, done_rounds


def _open_rows(loads: np.ndarray, stuck: np.ndarray, thresh: np.ndarray | None, segment_size: int) -> np.ndarray:
    """Rows worth a round (``[m]`` indices): not stuck, above their target (``thresh``,
    ``[rows]``) and attaining their segment's maximum pack load (``loads``: ``[rows, P]``)."""
    row_max = loads.max(axis=1)
    ok = ~stuck
    if thresh is not None:
        ok &= row_max > thresh
    if segment_size > 1:
        seg_max = np.repeat(row_max.reshape(-1, segment_size).max(axis=1), segment_size)
        ok &= row_max >= seg_max * (1 - 1e-12)
    return np.flatnonzero(ok)


def _rows_in_time(
    active: np.ndarray, loads: np.ndarray, target: np.ndarray | None, deadline: float, measured: float,
    partners: int, k: int,
) -> np.ndarray:
    """The ``active`` rows (sorted indices) the time left pays for, largest load over
    target first; empty when not even one does.

    A row costs the larger of the calibrated rate and the last round's measured one
    (``measured`` s per row), for half the time left: a round sized to end exactly at
    the deadline overran it by 10-20 ms whenever the rate was off (issue 12's deadline
    study).  At most ROUND_SECONDS of work per round, so that a rate that is off (a
    loaded machine runs the first round 2-3x slower than calibrated) costs at most a
    short round past the deadline (issue 12's busy-machine p99).
    """
    P = loads.shape[1]
    per_row = (P // 2 + max(min(partners, P - 1) - 1, 0)) * 2.0 ** min(k, MAX_FREE) * SECONDS_PER_PAIR_SUBSET
    per_row = max(per_row, measured)
    fit = int(min(0.5 * (deadline - time.perf_counter()), max(ROUND_SECONDS, per_row)) / per_row)
    if fit < 1:
        return active[:0]
    if active.size > fit:
        row_max = loads[active].max(axis=1)
        ref = row_max / (target[active] if target is not None else loads[active].mean(axis=1))
        active = np.sort(active[np.argsort(-ref, kind="stable")[:fit]])
    return active


def _resplit_round(
    v: np.ndarray, lab: np.ndarray, layout: np.ndarray, loads: np.ndarray, active: np.ndarray, partners: int
) -> np.ndarray:
    """One round on the ``active`` rows, in place on ``v``, ``lab``, ``layout``
    (``[rows, P, k]``) and ``loads`` (``[rows, P]``): re-split the pairs (i-th heaviest,
    i-th lightest) for all i, and the heaviest pack with the 2nd..``partners``-th
    lightest (the lightest is already its pair).  Returns ``[active.size]`` bool: the
    row changed."""
    P, k = v.shape[1:]
    half = P // 2
    a_n = active.size
    order = np.argsort(loads[active], axis=1)
    heavy_first = order[:, ::-1]
    extra = min(partners, P - 1) - 1
    ph = np.concatenate([heavy_first[:, :half], np.repeat(heavy_first[:, :1], max(extra, 0), axis=1)], axis=1)
    pl = np.concatenate([order[:, :half], order[:, 1 : 1 + max(extra, 0)]], axis=1)   # [a_n, m]
    m = ph.shape[1]
    r2 = active[:, None]
    items_v = np.concatenate([v[r2, ph], v[r2, pl]], axis=2).reshape(a_n * m, 2 * k)
    items_l = np.concatenate([lab[r2, ph], lab[r2, pl]], axis=2).reshape(a_n * m, 2 * k)
    side, heavier = split_pairs(items_v, items_l)
    side = side.reshape(a_n, m, 2 * k)
    heavier = heavier.reshape(a_n, m)
    old = np.maximum(loads[r2, ph], loads[r2, pl])
    gain = np.where(heavier < old * (1 - 1e-12), old - heavier, 0.0)
    apply, swap_in, h_best = _choose_pairs(gain, ph, pl, half, extra)
    changed = np.zeros(a_n, dtype=bool)
    sel_r, col = np.nonzero(apply)
    sel_x = np.flatnonzero(swap_in)
    for sel, c in ((sel_r, col), (sel_x, h_best[sel_x])):
        if sel.size == 0:
            continue
        _move_items(v, lab, layout, loads, active[sel], ph[sel, c], pl[sel, c], side[sel, c])
        changed[sel] = True
    return changed


def _choose_pairs(
    gain: np.ndarray, ph: np.ndarray, pl: np.ndarray, half: int, extra: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which re-splits of a round to apply, from their ``gain`` (``[a, m]``; pairs
    ``(ph, pl)``, the first ``half`` disjoint, then the heaviest pack's ``extra``).

    Returns ``(apply [a, half] bool, swap_in [a] bool, h_best [a])``: disjoint pairs are
    all applied; of the heaviest pack's extra pairs the best one (column ``h_best``)
    replaces its own pair when that one gains less (``swap_in``), and then neither its
    own pair (column 0) nor the pair of that partner is applied.
    """
    a_n = gain.shape[0]
    apply = gain[:, :half] > 0
    if extra <= 0:
        return apply, np.zeros(a_n, dtype=bool), np.zeros(a_n, dtype=np.int64)
    h_best = half + gain[:, half:].argmax(axis=1)
    swap_in = gain[np.arange(a_n), h_best] > gain[:, 0]
    partner = pl[np.arange(a_n), h_best]
    clash = (pl[:, :half] == partner[:, None]) | (ph[:, :half] == partner[:, None])
    apply = np.where(swap_in[:, None], apply & ~clash, apply)
    apply[:, 0] = np.where(swap_in, False, apply[:, 0])
    return apply, swap_in, h_best


def _move_items(
    v: np.ndarray, lab: np.ndarray, layout: np.ndarray, loads: np.ndarray,
    rr: np.ndarray, hp: np.ndarray, lp: np.ndarray, side: np.ndarray,
) -> None:
    """Rewrite packs ``hp`` and ``lp`` of rows ``rr`` (``[s]`` each) to a split: the
    ``k`` items marked in ``side`` (``[s, 2k]`` bool over the ``hp`` items then the
    ``lp`` items) go to ``hp``, the rest to ``lp``; in place."""
    k = v.shape[2]
    sv = np.concatenate([v[rr, hp], v[rr, lp]], axis=1)
    sl_ = np.concatenate([lab[rr, hp], lab[rr, lp]], axis=1)
    sl_idx = np.concatenate([layout[rr, hp], layout[rr, lp]], axis=1)
    o = np.argsort(~side, axis=1, kind="stable")            # first pack's items first
    sv, sl_, sl_idx = (np.take_along_axis(x, o, axis=1) for x in (sv, sl_, sl_idx))
    v[rr, hp], v[rr, lp] = sv[:, :k], sv[:, k:]
    lab[rr, hp], lab[rr, lp] = sl_[:, :k], sl_[:, k:]
    layout[rr, hp], layout[rr, lp] = sl_idx[:, :k], sl_idx[:, k:]
    loads[rr, hp] = v[rr, hp].sum(axis=1)
    loads[rr, lp] = v[rr, lp].sum(axis=1)
