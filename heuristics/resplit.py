"""Exact re-split of GPU pairs (meet in the middle), and a local search built on it.

Two packs with ``k`` items each hold ``2k`` items; the best re-split puts ``k`` of them
on each pack so that the heavier pack is as light as possible.  Items sharing a label
(replicas of one expert, equal loads) are kept apart: two of them go one to each pack,
so they are taken out of the search and their loads added to both sides.  The remaining
``2k'`` free items are split into halves ``A`` and ``B``; every subset of ``A`` is
matched with the subset of ``B`` of complementary size whose sum is closest to what
is needed (both halves' subsets listed by size and sum, merged item by item; one
sweep per size class matches them).  This is exact: the returned split is optimal among splits that keep equal
labels apart.

:func:`resplit_rounds` uses it as a local search over a layout: each round re-splits
the disjoint pairs (i-th heaviest pack, i-th lightest pack) of every active row, then
the heaviest pack with each of the lightest few, keeping every change that lowers the
pair's heavier load.

Both run as compiled kernels (``heuristics.compile``), pair by pair and row by row in a
fixed order, so a pair's split never depends on the rest of the batch.  The round loop
stays in Python: it reads the clock between rounds (one kernel call per round).
"""

from __future__ import annotations

import time

import numpy as np

from .compile import kernel, warmer

__all__ = ["MAX_FREE", "SECONDS_PER_PAIR_SUBSET", "split_pairs", "resplit_rounds"]

# Largest number of free items per side searched exactly (2**MAX_FREE subsets per half).
MAX_FREE = 12
# Seconds per pair and per subset of a half (2**k) a round takes on this project's
# 2-core machine while it is shared (load average 5-9: 232 rows x 10 pairs at k = 9 in
# 0.22 s, 1.9e-7; the numpy version took 3e-7 unloaded); with a deadline, a round
# works only on as many rows as the time left pays for at this rate, or at the last
# round's measured rate where that is slower.
SECONDS_PER_PAIR_SUBSET = 2e-7
# With a deadline: estimated seconds of one round at most.
ROUND_SECONDS = 0.02


# ------------------------------------------------------------------- one pair's split


@kernel
def _match_labels(lab: np.ndarray, role: np.ndarray) -> int:
    """Couple the items of one label two by two (in index order within the label):
    ``role`` (``[2k]`` int8) becomes 1 for the first item of a couple (first pack), 2 for
    the second (other pack), 0 for a free item.  Returns the number of couples."""
    order = np.argsort(lab, kind="mergesort")
    n = lab.size
    role[:] = 0
    couples = 0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and lab[order[j + 1]] == lab[order[i]]:
            j += 1
        for t in range(i, j, 2):                 # items i..j share a label
            role[order[t]] = 1
            role[order[t + 1]] = 2
            couples += 1
        i = j + 1
    return couples


@kernel
def _sorted_subsets(x: np.ndarray, sums: np.ndarray, masks: np.ndarray, tmp_s: np.ndarray,
                    tmp_m: np.ndarray, start: np.ndarray, nstart: np.ndarray) -> None:
    """Every subset of ``x`` (``[h]``) sorted by size, then by sum: ``sums`` and ``masks``
    (``[2**h]``; bit ``i`` of a mask: item ``i`` is in), size class ``c`` at
    ``start[c]:start[c + 1]`` (``start``: ``[h + 2]``).  Built item by item: class ``c``
    with item ``i`` is the merge of class ``c`` without it and class ``c - 1`` plus
    ``x[i]`` (the subset without it first on equal sums), so a subset's sum is that of
    its items below its highest plus the highest.  ``tmp_s``, ``tmp_m``, ``nstart``:
    scratch of the same sizes."""
    sums[0] = 0.0
    masks[0] = 0
    start[0], start[1] = 0, 1
    for i in range(x.size):
        full = 1 << i                               # subsets of items 0..i-1
        for c in range(i + 2):
            p = start[c]
            p_end = start[c + 1] if c <= i else p
            q, q_end = (start[c - 1], start[c]) if c >= 1 else (0, 0)
            out = p + q
            nstart[c] = out
            for o in range(out, out + (p_end - p) + (q_end - q)):
                with_p = sums[p] if p < p_end else np.inf
                with_q = sums[q] + x[i] if q < q_end else np.inf
                take_p = with_p <= with_q
                tmp_s[o] = with_p if take_p else with_q
                tmp_m[o] = masks[p] if take_p else masks[q] | full
                p += take_p
                q += not take_p
        nstart[i + 2] = 2 * full
        start[: i + 3] = nstart[: i + 3]
        sums[: 2 * full] = tmp_s[: 2 * full]
        masks[: 2 * full] = tmp_m[: 2 * full]


@kernel
def _closest_subsets(sa: np.ndarray, ma: np.ndarray, sta: np.ndarray, sb: np.ndarray, mb: np.ndarray,
                     stb: np.ndarray, h: int, target: float) -> tuple[int, int]:
    """The subsets ``(a, b)`` of the two halves (as :func:`_sorted_subsets` lists them)
    with ``h`` items together and ``sa + sb`` closest to ``target``.  For each size class
    of ``A``, its subsets in increasing sum meet the complementary class of ``B`` with
    one pointer moving down: the two neighbours of ``target - sa`` are the candidates.
    Ties: the smaller mask of ``A``, then of ``B``."""
    best_err = np.inf
    best_a = best_b = 0
    for ca in range(h + 1):
        lo, hi = stb[h - ca], stb[h - ca + 1]
        p = hi                                      # first of B's class with sum >= want
        for t in range(sta[ca], sta[ca + 1]):
            want = target - sa[t]
            while p > lo and sb[p - 1] >= want:
                p -= 1
            for q in range(max(p - 1, lo), min(p + 1, hi)):
                err = abs(sa[t] + sb[q] - target)
                a, b = ma[t], mb[q]
                if err < best_err or (err == best_err and (a < best_a or (a == best_a and b < best_b))):
                    best_err, best_a, best_b = err, a, b
    return best_a, best_b


@kernel
def _workspace(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scratch for :func:`_split_one` on pairs of ``2k`` items: ``(float [3, n],
    int [4, n], int [3, MAX_FREE + 2], int8 [2k])``, ``n`` covering both ``2k`` items and
    the subsets of a half."""
    n = max(1 << min(k, MAX_FREE), 2 * k)
    return (np.empty((3, n)), np.empty((4, n), dtype=np.int64),
            np.empty((3, MAX_FREE + 2), dtype=np.int64), np.empty(2 * k, dtype=np.int8))


@kernel
def _split_one(x: np.ndarray, lab: np.ndarray, side: np.ndarray, wsf: np.ndarray, wsi: np.ndarray,
               wss: np.ndarray, role: np.ndarray) -> float:
    """Best split of one pair's ``2k`` items (loads ``x``, labels ``lab``): ``side``
    (``[2k]`` bool) marks the ``k`` items of the first pack; returns the heavier pack's
    load.  More than ``MAX_FREE`` free items per side: the split as it is.  ``wsf``,
    ``wsi``, ``wss``, ``role``: scratch from :func:`_workspace`."""
    n2 = x.size
    k = n2 // 2
    kf = k - _match_labels(lab, role)
    fixed_a = fixed_b = total_free = 0.0
    for i in range(n2):
        if role[i] == 1:
            fixed_a += x[i]
        elif role[i] == 2:
            fixed_b += x[i]
        else:
            total_free += x[i]
    if kf > MAX_FREE:
        cur = total = 0.0
        for i in range(n2):
            side[i] = i < k
            cur += x[i] if i < k else 0.0
            total += x[i]
        return max(cur, total - cur)
    free = wsi[3]
    f = 0
    for i in range(n2):
        side[i] = role[i] == 1
        if role[i] == 0:
            free[f] = i
            f += 1
    if kf == 0:
        return max(fixed_a, fixed_b + total_free)
    # First pack gets fixed_a + S, second fixed_b + (F - S): aim S at the middle.  Sums
    # are scaled to [0, 1]; a target outside [-1, 2] picks what the clipped one picks.
    scale = total_free if total_free > 0 else 1.0
    target = min(max((fixed_b + total_free - fixed_a) / 2.0 / scale, -1.0), 2.0)
    _sorted_subsets(x[free[:kf]] / scale, wsf[0], wsi[0], wsf[2], wsi[2], wss[0], wss[2])
    _sorted_subsets(x[free[kf : 2 * kf]] / scale, wsf[1], wsi[1], wsf[2], wsi[2], wss[1], wss[2])
    a, b = _closest_subsets(wsf[0], wsi[0], wss[0], wsf[1], wsi[1], wss[1], kf, target)
    got = 0.0
    for half, bits in ((0, a), (kf, b)):
        for i in range(kf):
            if (bits >> i) & 1:
                side[free[half + i]] = True
                got += x[free[half + i]]
    return max(fixed_a + got, fixed_b + total_free - got)


@kernel
def _split_batch(values: np.ndarray, labels: np.ndarray, side: np.ndarray, heavier: np.ndarray) -> None:
    """:func:`_split_one` on every row of ``[pairs, 2k]``."""
    wsf, wsi, wss, role = _workspace(values.shape[1] // 2)
    for r in range(values.shape[0]):
        heavier[r] = _split_one(values[r], labels[r], side[r], wsf, wsi, wss, role)


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
    values = np.ascontiguousarray(values, dtype=np.float64)
    pairs, n2 = values.shape
    side = np.zeros((pairs, n2), dtype=np.bool_)
    heavier = np.zeros(pairs)
    if pairs and n2 >= 2:
        _split_batch(values, np.ascontiguousarray(labels, dtype=np.int64), side, heavier)
    return side, heavier


# ------------------------------------------------------------------- rounds on a layout


@kernel
def _gather_packs(values: np.ndarray, labels: np.ndarray, layout: np.ndarray, v: np.ndarray,
                  lab: np.ndarray, loads: np.ndarray) -> None:
    """Item loads ``v`` and labels ``lab`` (``[rows, P, k]``) of a layout, and the pack
    loads ``loads`` (``[rows, P]``, summed in slot order)."""
    rows, num_packs, k = layout.shape
    for r in range(rows):
        for p in range(num_packs):
            total = 0.0
            for j in range(k):
                i = layout[r, p, j]
                v[r, p, j] = values[r, i]
                lab[r, p, j] = labels[r, i]
                total += v[r, p, j]
            loads[r, p] = total


@kernel
def _move_pair(v: np.ndarray, lab: np.ndarray, lay: np.ndarray, loads: np.ndarray, hp: int, lp: int,
               side: np.ndarray) -> None:
    """Rewrite packs ``hp`` and ``lp`` of one row (``v``, ``lab``, ``lay``: ``[P, k]``;
    ``loads``: ``[P]``) to a split: the items marked in ``side`` (``[2k]`` over the
    ``hp`` items then the ``lp`` items) go to ``hp`` in that order, the rest to ``lp``."""
    k = v.shape[1]
    tv = np.concatenate((v[hp], v[lp]))
    tl = np.concatenate((lab[hp], lab[lp]))
    ti = np.concatenate((lay[hp], lay[lp]))
    a = 0
    for i in range(2 * k):                       # the first pack's items, in order
        if side[i]:
            v[hp, a], lab[hp, a], lay[hp, a] = tv[i], tl[i], ti[i]
            a += 1
    b = 0
    for i in range(2 * k):                       # the rest
        if not side[i]:
            v[lp, b], lab[lp, b], lay[lp, b] = tv[i], tl[i], ti[i]
            b += 1
    for p in (hp, lp):
        total = 0.0
        for j in range(k):
            total += v[p, j]
        loads[p] = total


@kernel
def _row_pairs(loads: np.ndarray, extra: int, ph: np.ndarray, pl: np.ndarray) -> None:
    """A row's pairs of a round from its pack loads (``[P]``): (i-th heaviest, i-th
    lightest) for ``i < P // 2``, then the heaviest with the 2nd..``extra + 1``-th
    lightest.  Loads sorted stably (the lower pack first among equal loads)."""
    num_packs = loads.size
    half = num_packs // 2
    order = np.argsort(loads, kind="mergesort")
    for j in range(half):
        ph[j], pl[j] = order[num_packs - 1 - j], order[j]
    for j in range(extra):
        ph[half + j], pl[half + j] = order[num_packs - 1], order[1 + j]


@kernel
def _round(v: np.ndarray, lab: np.ndarray, layout: np.ndarray, loads: np.ndarray, active: np.ndarray,
           partners: int, changed: np.ndarray) -> None:
    """One round on the ``active`` rows, in place on ``v``, ``lab``, ``layout``
    (``[rows, P, k]``) and ``loads`` (``[rows, P]``); ``changed[i]``: row ``active[i]``
    changed.

    Every pair of :func:`_row_pairs` is split exactly; a split gains when its heavier
    pack is lighter than the pair's heavier one by more than a 1e-12 fraction.  The
    disjoint pairs that gain are all applied, except that the best of the heaviest
    pack's extra pairs replaces its own pair when it gains more; then neither its own
    pair nor the pair holding that partner is applied."""
    num_packs, k = v.shape[1], v.shape[2]
    half = num_packs // 2
    extra = max(min(partners, num_packs - 1) - 1, 0)
    m = half + extra
    ph = np.empty(m, dtype=np.int64)
    pl = np.empty(m, dtype=np.int64)
    gain = np.empty(m)
    sides = np.empty((m, 2 * k), dtype=np.bool_)
    x = np.empty(2 * k)
    xl = np.empty(2 * k, dtype=np.int64)
    wsf, wsi, wss, role = _workspace(k)
    for i in range(active.size):
        r = active[i]
        _row_pairs(loads[r], extra, ph, pl)
        for j in range(m):
            x[:k], x[k:] = v[r, ph[j]], v[r, pl[j]]
            xl[:k], xl[k:] = lab[r, ph[j]], lab[r, pl[j]]
            heavier = _split_one(x, xl, sides[j], wsf, wsi, wss, role)
            old = max(loads[r, ph[j]], loads[r, pl[j]])
            gain[j] = old - heavier if heavier < old * (1 - 1e-12) else 0.0
        best = half
        for j in range(half + 1, m):
            if gain[j] > gain[best]:
                best = j
        swap_in = extra > 0 and gain[best] > gain[0]
        partner = pl[best] if swap_in else -1
        moved = False
        for j in range(half):
            if gain[j] > 0 and not (swap_in and (j == 0 or pl[j] == partner or ph[j] == partner)):
                _move_pair(v[r], lab[r], layout[r], loads[r], ph[j], pl[j], sides[j])
                moved = True
        if swap_in:
            _move_pair(v[r], lab[r], layout[r], loads[r], ph[best], pl[best], sides[best])
            moved = True
        changed[i] = moved


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
    layout = np.array(layout, dtype=np.int64, order="C")
    if P < 2 or k < 1 or rows == 0:
        return layout, 0
    v = np.empty((rows, P, k))                                   # [rows, P, k] item loads
    lab = np.empty((rows, P, k), dtype=np.int64)                 # [rows, P, k] item labels
    loads = np.empty((rows, P))                                  # [rows, P]
    _gather_packs(np.ascontiguousarray(values, dtype=np.float64), np.ascontiguousarray(labels, dtype=np.int64),
                  layout, v, lab, loads)
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
        changed = np.zeros(active.size, dtype=np.bool_)
        _round(v, lab, layout, loads, active.astype(np.int64), int(partners), changed)
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


@warmer
def _warm() -> None:
    """Compile the kernels with the argument types real calls use."""
    values = np.array([[4.0, 1.0, 2.0, 2.0, 3.0, 0.5, 1.5, 2.5]])
    labels = np.array([[0, 1, 2, 2, 3, 4, 5, 6]])
    split_pairs(values[:, :4], labels[:, :4])
    layout = np.arange(8).reshape(1, 4, 2)
    resplit_rounds(values, labels, layout, target=np.ones(1), partners=3)
    resplit_rounds(values, labels, layout, deadline=time.perf_counter() + 1.0)

