"""Packing replicas onto GPUs with exactly ``k`` slots per GPU.

All functions work on a batch of independent rows (a row is one layer, or one layer
restricted to one node).  A row has ``n = P * k`` items (replicas) with loads and
labels (the logical expert each replica belongs to), to be placed on ``P`` packs (GPUs)
of exactly ``k`` slots each, minimising the heaviest pack.

A placement is held as a *layout* ``idx[rows, P, k]``: ``idx[r, p, s]`` is the item in
slot ``s`` of pack ``p`` of row ``r``.  Every layout is a permutation of ``0..n-1`` per
row, so exact capacity holds by construction.

Pipeline (:func:`pack_items`, or :func:`pack_sorted` for pre-sorted items):

1. items by decreasing load with the replicas of one expert adjacent;
2. a snake seed for every row, dealt so that an expert's replicas land on different
   packs (the block after a split run is rotated);
3. for rows above their target (a lower bound), label-aware largest differencing
   (Karmarkar-Karp with exact cardinality);
4. duplicate separation for any row still holding two replicas of one expert on a pack;
5. swap refinement of the rows that set their layer's maximum.

The loops are compiled kernels (:mod:`.compile`): a kernel loops over rows, and the
public functions here convert their inputs at the boundary (contiguous float64 loads,
int64 labels) and call one kernel each.  Every sum runs sequentially in slot order and
every choice takes the first best candidate, so a plan is the same on every machine.
"""

from __future__ import annotations

import numpy as np

from .compile import kernel, warmer

__all__ = [
    "gather_rows",
    "kk_layout",
    "lpt_rounds_layout",
    "pack_items",
    "pack_loads",
    "pack_sorted",
    "refine_swaps",
    "replica_items",
    "runs_order",
    "separate_duplicates",
    "snake_layout",
    "unsplit_runs",
]

# A swap must lower the heaviest pack by more than this fraction of it to count as an
# improvement; it stops the search cycling on float noise.
_REL_EPS = 1e-12

# Rows with a dominant item whose seeds stay more than this fraction above their
# target also get the item-by-item LPT seed.
_FAR = 0.01

# Partners tried per round: the heaviest pack against this many lightest packs, and
# this many (heaviest, lightest) pairs.
_PARTNERS = 8

# Default cap on refinement rounds in the pipeline.  Each round improves every active
# row's heaviest pack; measured on the model-shaped presets, the first rounds take
# nearly all of the gain (benchmarks/RESULTS.md).  3 since the compiled kernels (was 2):
# a round costs little now, and with ties broken by index instead of numpy's order,
# 2 rounds fell below the recorded quality floor on some workloads (3: none).
DEFAULT_REFINE_ROUNDS = 3

# Rounds of duplicate separation after the seeds (each fixes one duplicate per row).
_SEPARATE_ROUNDS = 64

# Labels above this are renumbered at the boundary (kernels index a table by label).
_LABEL_TABLE_MAX = 1 << 20

# Packs up to which :func:`_kk_row` sorts each merge by counting (:func:`_rank_merge`,
# ``P * P`` comparisons without a branch); wider rows insert (about ``P * P / 4`` moves).
_RANK_SORT = 32


def _check(values: np.ndarray, num_packs: int) -> tuple[int, int, int]:
    if values.ndim != 2:
        raise ValueError(f"item loads must be 2-D [rows, n], got shape {values.shape}")
    rows, n = values.shape
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"{n} items per row cannot fill {num_packs} packs exactly")
    return rows, n, n // num_packs


def _f64(a: np.ndarray) -> np.ndarray:
    """A writeable C-contiguous float64 array (the one array type kernels are compiled for)."""
    out = np.ascontiguousarray(a, dtype=np.float64)
    return out if out.flags.writeable else out.copy()


def _i64(a: np.ndarray) -> np.ndarray:
    """A writeable C-contiguous int64 array."""
    out = np.ascontiguousarray(a, dtype=np.int64)
    return out if out.flags.writeable else out.copy()


def _labels(labels: np.ndarray) -> np.ndarray:
    """Labels as the kernels take them: int64 in ``0..`` a table size they can index
    (renumbered, order kept, when the largest is huge)."""
    lab = _i64(labels)
    if lab.size and int(lab.max()) > _LABEL_TABLE_MAX:
        lab = np.unique(lab, return_inverse=True)[1].reshape(lab.shape).astype(np.int64)
    return lab


def _target(target: np.ndarray | None, rows: int) -> tuple[np.ndarray, bool]:
    """``([rows] float64 targets, given)``; a dummy array when there is none."""
    if target is None:
        return np.zeros(rows), False
    return _f64(np.broadcast_to(np.asarray(target, dtype=np.float64), (rows,))), True


def _descending(values: np.ndarray) -> np.ndarray:
    return np.argsort(-values, axis=1, kind="stable")


def runs_order(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[rows, n]`` item order by decreasing load, ties by label, so the replicas of one
    label (which carry equal loads) are adjacent."""
    return np.lexsort((labels, -values), axis=1)


def gather_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[r, idx[r, ...]]`` for 2-D ``a`` (one flat ``take``: several times cheaper in
    numpy than fancy indexing with a row index and a column index)."""
    rows, n = a.shape
    off = np.arange(0, rows * n, n).reshape((-1,) + (1,) * (idx.ndim - 1))
    return np.take(a, idx + off)


def pack_loads(values: np.ndarray, layout: np.ndarray) -> np.ndarray:
    """Pack loads ``[rows, P]`` of a layout ``[rows, P, k]`` over item loads ``[rows, n]``."""
    return gather_rows(values, layout).sum(-1)


# ------------------------------------------------------------------ small kernels
#
# Maxima are taken by plain loops (:func:`_top`, :func:`_first_top`), not numpy's
# ``max`` / ``argmax``: a cached kernel that calls those loads with numba's
# ``numba.np.arraymath`` module, which a fresh process then imports (about 25 ms of the
# first prefill call) for the environments of its implementations.


@kernel
def _top(a):
    """The largest value of the 1-D ``a`` (``-inf`` when empty; the inputs hold no NaN)."""
    m = -np.inf
    for x in a:
        if x > m:
            m = x
    return m


@kernel
def _first_top(a):
    """The index of the first largest value of the 1-D ``a`` (``a`` not empty, no NaN)."""
    j = 0
    top = a[0]
    for i in range(1, a.size):              # selects, not branches: the values come in any order
        x = a[i]
        up = x > top
        j = i if up else j
        top = x if up else top
    return j


@kernel
def _order(x, out, buf, sign):
    """``out`` = the order of the first ``len(out)`` values of ``x`` by increasing ``sign
    * x`` (``sign`` is 1.0 or -1.0), ties by index.  Up to 16 values, insertion sort; up
    to 64, each value's rank is counted (no data-dependent branches: the values arrive
    in random order); longer arrays are merge-sorted through ``buf`` (as long as
    ``out``)."""
    m = out.shape[0]
    if m <= 16:
        for i in range(m):
            xi = sign * x[i]
            j = i
            while j > 0 and sign * x[out[j - 1]] > xi:
                out[j] = out[j - 1]
                j -= 1
            out[j] = i
        return
    if m <= 64:
        for i in range(m):
            xi = sign * x[i]
            rank = 0
            for j in range(m):
                xj = sign * x[j]
                rank += (xj < xi) | ((xj == xi) & (j < i))
            out[rank] = i
        return
    for i in range(m):
        out[i] = i
    width = 1
    in_out = True
    while width < m:
        src, dst = (out, buf) if in_out else (buf, out)
        for lo in range(0, m, 2 * width):
            mid, hi = min(lo + width, m), min(lo + 2 * width, m)
            i, j = lo, mid
            for o in range(lo, hi):
                if j >= hi or (i < mid and sign * x[src[i]] <= sign * x[src[j]]):
                    dst[o] = src[i]
                    i += 1
                else:
                    dst[o] = src[j]
                    j += 1
        in_out = not in_out
        width *= 2
    if not in_out:
        out[:] = buf[:m]


@kernel
def _pack_max(vals, lay):
    """Heaviest pack of layout ``lay [P, k]`` over item loads ``vals [n]`` (each pack
    summed in slot order)."""
    P, k = lay.shape
    top = -np.inf
    for p in range(P):
        s = 0.0
        for t in range(k):
            s += vals[lay[p, t]]
        if s > top:
            top = s
    return top


# ----------------------------------------------------------------------------- seeds


@kernel
def _snake_row(lab, rotate, lay):
    """Snake ("zigzag") over sorted positions into ``lay [P, k]``: block ``b`` (positions
    ``b*P .. b*P+P-1``) goes to packs ``0..P-1``, the next block back ``P-1..0``.

    With ``rotate``, where a run of one label (``lab [n]``) crosses into block ``b``,
    block ``b`` is dealt rotated so its share of the run comes last: the plain snake
    would deal both parts of the run onto the same packs.  Returns whether a block was
    rotated (only such rows can still hold a duplicate, where a run follows another
    split run)."""
    P, k = lay.shape
    rotated = False
    for b in range(k):
        shift = 0
        if rotate and b > 0:
            prev = lab[b * P - 1]
            while shift < P and lab[b * P + shift] == prev:
                shift += 1
            if shift > 0:
                rotated = True
            if shift == P:
                shift = 0
        for j in range(P):
            pack = j if b % 2 == 0 else P - 1 - j
            pos = j + shift                      # (j + shift) mod P, without a division
            lay[pack, b] = b * P + (pos - P if pos >= P else pos)
    return rotated


@kernel
def _snake_rows(labels, rotate, out):
    """:func:`_snake_row` for every row; returns ``[rows]`` bool (rotated)."""
    rows = out.shape[0]
    rotated = np.zeros(rows, np.bool_)
    for r in range(rows):
        rotated[r] = _snake_row(labels[r], rotate, out[r])
    return rotated


@kernel
def _unsplit_work(n):
    """Work arrays of :func:`_unsplit_row` for rows of ``n`` items."""
    return (np.empty(n, np.int64), np.empty(n, np.bool_), np.empty(n, np.int64),
            np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.bool_))


@kernel
def _unsplit_row(lab_in, P, perm, work):
    """:func:`unsplit_runs` on one row: writes ``perm [n]``; returns ``split``."""
    lab, single, buf, _, _, _ = work
    n = lab_in.shape[0]
    for i in range(n):
        perm[i] = i
        lab[i] = lab_in[i]
    for i in range(n):
        single[i] = (i == 0 or lab[i] != lab[i - 1]) and (i == n - 1 or lab[i] != lab[i + 1])
    for B in range(P, n, P):
        run = lab[B - 1]
        if lab[B] != run:
            continue
        a = 0                                   # the run's items before the boundary
        while a < P and lab[B - 1 - a] == run:
            a += 1
        t = 0                                   # and after it
        while B + t < n and lab[B + t] == run:
            t += 1
        if a + t > P:
            continue
        # The first `a` single items after the run move, in order, in front of it.
        m = 0
        q = B + t
        while q < n and m < a:
            if single[q]:
                buf[m] = q
                m += 1
            q += 1
        if m < a:
            continue
        j = 0
        for pos in range(B - a, buf[a - 1] + 1):
            if j < a and pos == buf[j]:
                j += 1
            else:
                buf[m] = pos
                m += 1
        _move(perm, work, B - a, m)
    for B in range(P, n, P):
        if lab[B] == lab[B - 1]:
            return True
    return False


@kernel
def _move(perm, work, start, m):
    """Rewrite positions ``start .. start+m-1`` of ``perm`` and of the labels and single
    flags in ``work`` from positions ``buf[:m]`` (a permutation of that range)."""
    lab, single, src, tp, tl, ts = work
    for j in range(m):
        tp[j] = perm[src[j]]
        tl[j] = lab[src[j]]
        ts[j] = single[src[j]]
    for j in range(m):
        perm[start + j] = tp[j]
        lab[start + j] = tl[j]
        single[start + j] = ts[j]


@kernel
def _unsplit_rows(sorted_labels, P, perm):
    """:func:`_unsplit_row` for every row; returns ``[rows]`` bool (split)."""
    rows, n = sorted_labels.shape
    split = np.zeros(rows, np.bool_)
    work = _unsplit_work(n)
    for r in range(rows):
        split[r] = _unsplit_row(sorted_labels[r], P, perm[r], work)
    return split


@kernel
def _kk_work(P, k):
    """Work arrays of :func:`_kk_row` for ``P`` packs of ``k`` slots."""
    return (np.empty((k, P)), np.empty(k), np.empty(P), np.empty((k, P + 2), np.int64),
            np.empty((k, P), np.int64), np.empty(P, np.int64), np.empty(P))


@kernel
def _kk_row(sv, lay, work):
    """Largest differencing over items sorted by decreasing load ``sv [n]`` into ``lay
    [P, k]`` (positions; slot ``b`` of every pack holds an item of block ``b``)."""
    P, k = lay.shape
    parts, spread, raw, hist, final, after, sums = work  # parts: subset loads ascending
    for b in range(k):
        for i in range(P):
            parts[b, i] = sv[b * P + P - 1 - i]   # block b arrives heaviest first
        spread[b] = parts[b, P - 1] - parts[b, 0]
    for step in range(k - 1):
        ia = _first_top(spread)
        spread[ia] = -np.inf
        ib = _first_top(spread)
        # Lightest of ia with heaviest of ib, sorted, ties in the order they come: raw[j]
        # is the j-th lightest merged subset, hist[step, 2 + j] its position i.
        if P <= _RANK_SORT:
            _rank_merge(parts, ia, ib, sums, raw, hist[step])
        else:
            for i in range(P):                 # insertion, stable
                x = parts[ia, i] + parts[ib, P - 1 - i]
                j = i
                while j > 0 and raw[j - 1] > x:
                    raw[j] = raw[j - 1]
                    hist[step, 2 + j] = hist[step, 1 + j]
                    j -= 1
                raw[j] = x
                hist[step, 2 + j] = i
        parts[ia] = raw
        spread[ia] = parts[ia, P - 1] - parts[ia, 0]
        spread[ib] = -np.inf
        hist[step, 0] = ia
        hist[step, 1] = ib
    # Undo the merges: final[b, i] is the pack of block b's ascending position i.
    last = _first_top(spread)
    for i in range(P):
        final[last, i] = i
    for step in range(k - 2, -1, -1):
        ia, ib = hist[step, 0], hist[step, 1]
        after[:] = final[ia]
        for pos in range(P):
            final[ia, hist[step, 2 + pos]] = after[pos]
            final[ib, P - 1 - hist[step, 2 + pos]] = after[pos]
    for b in range(k):
        for j in range(P):
            lay[final[b, P - 1 - j], b] = b * P + j


@kernel
def _rank_merge(parts, ia, ib, sums, raw, hist):
    """One merge of :func:`_kk_row` by counting instead of insertion: sum ``i`` (the
    ``i``-th lightest subset of ``ia`` with the ``i``-th heaviest of ``ib``) goes to
    place ``#{j: sums[j] < sums[i]} + #{j < i: sums[j] == sums[i]}`` of ``raw``, its
    position ``i`` to ``hist[2 + place]``: the order a stable insertion gives, with no
    branch that depends on the values."""
    P = sums.shape[0]
    for i in range(P):
        sums[i] = parts[ia, i] + parts[ib, P - 1 - i]
    for i in range(P):
        x = sums[i]
        place = 0
        for j in range(P):
            y = sums[j]
            place += (y < x) | ((y == x) & (j < i))
        raw[place] = x
        hist[2 + place] = i


@kernel
def _kk_rows(sorted_values, out):
    """:func:`_kk_row` for every row."""
    rows, P, k = out.shape
    work = _kk_work(P, k)
    for r in range(rows):
        _kk_row(sorted_values[r], out[r], work)


@kernel
def _lpt_items_row(sv, lay):
    """LPT with exact cardinality, one item at a time: each item of ``sv [n]`` (sorted,
    heaviest first) goes to the lightest pack with a free slot; positions into ``lay``."""
    P, k = lay.shape
    loads = np.zeros(P)
    filled = np.zeros(P, np.int64)
    for i in range(sv.shape[0]):
        pick = -1
        for p in range(P):
            if filled[p] < k and (pick < 0 or loads[p] < loads[pick]):
                pick = p
        lay[pick, filled[pick]] = i
        filled[pick] += 1
        loads[pick] += sv[i]


@kernel
def _lpt_rounds_rows(sorted_values, out):
    """LPT by rounds for every row of sorted loads: each block of ``P`` items, heaviest
    first, goes to the packs lightest first; positions into ``out [rows, P, k]``."""
    rows, P, k = out.shape
    loads = np.empty(P)
    target = np.empty(P, np.int64)
    buf = np.empty(P, np.int64)
    for r in range(rows):
        loads[:] = 0.0
        for s in range(k):
            _order(loads, target, buf, 1.0)
            for j in range(P):
                out[r, target[j], s] = s * P + j
                loads[target[j]] += sorted_values[r, s * P + j]


# ------------------------------------------------------------------ working state
#
# A row being improved is held as five arrays: ``lay [P, k]`` (item of each slot), ``v
# [P, k]`` (its load), ``lab [P, k]`` (its label id, ``0..U-1``), ``loads [P]`` (pack
# loads, updated by each swap) and ``occ [P, >= U]`` (copies of each label id on each
# pack), plus ``multi [>= U]`` (the label has several items in the row).


@kernel
def _label_ids(labels, table, ids, multi):
    """Number the distinct labels of one row ``0..U-1`` by first appearance: ``ids [n]``
    per item and ``multi [U]`` (several items); returns ``U``.  ``table`` (``-1`` for
    every label value) is the lookup, restored before returning."""
    n = labels.shape[0]
    u = 0
    for i in range(n):
        lab = labels[i]
        if table[lab] < 0:
            table[lab] = u
            multi[u] = False
            u += 1
        else:
            multi[table[lab]] = True
        ids[i] = table[lab]
    for i in range(n):
        table[labels[i]] = -1
    return u


@kernel
def _load_state(vals, ids, layout, num_ids, lay, v, lab, loads, occ):
    """Fill a row's working state from item loads ``vals [n]``, label ids ``ids [n]`` and
    a layout ``[P, k]`` (pack loads summed in slot order)."""
    P, k = layout.shape
    for p in range(P):
        for u in range(num_ids):
            occ[p, u] = 0
    for p in range(P):
        s = 0.0
        for t in range(k):
            i = layout[p, t]
            lay[p, t] = i
            v[p, t] = vals[i]
            lab[p, t] = ids[i]
            occ[p, ids[i]] += 1
            s += vals[i]
        loads[p] = s


@kernel
def _swap(lay, v, lab, loads, occ, p, s, q, t):
    """Swap slot ``s`` of pack ``p`` with slot ``t`` of pack ``q != p``."""
    va, vb = v[p, s], v[q, t]
    la, lb = lab[p, s], lab[q, t]
    v[p, s], v[q, t] = vb, va
    lab[p, s], lab[q, t] = lb, la
    lay[p, s], lay[q, t] = lay[q, t], lay[p, s]
    loads[p] += vb - va
    loads[q] += va - vb
    occ[p, la] -= 1
    occ[q, lb] -= 1
    occ[p, lb] += 1
    occ[q, la] += 1


@kernel
def _first_duplicate(lab, occ):
    """``(p, s)`` of the first slot (pack by pack) whose label is on its pack twice, or
    ``(-1, -1)``."""
    P, k = lab.shape
    for p in range(P):
        for s in range(k):
            if occ[p, lab[p, s]] > 1:
                return p, s
    return -1, -1


# ---------------------------------------------------------------- duplicates


@kernel
def _separate_row(lay, v, lab, loads, occ, cap, max_rounds):
    """Separate duplicates of one row in place: up to ``max_rounds`` times, the first
    slot whose label is on its pack twice swaps with the item of another pack that
    changes loads least, such that neither pack gets a duplicate and neither exceeds
    ``max(cap, heaviest pack)``.  Stops when no duplicate is left or none can move;
    returns whether one is left."""
    P, k = v.shape
    for _ in range(max_rounds):
        p, s = _first_duplicate(lab, occ)
        if p < 0:
            return False
        row_cap = max(cap, _top(loads))
        la, va = lab[p, s], v[p, s]
        best, bg, bt = np.inf, -1, -1
        for g in range(P):
            if g == p or occ[g, la] > 0:
                continue
            for t in range(k):
                if occ[p, lab[g, t]] > 0:
                    continue
                d = va - v[g, t]
                if loads[p] - d > row_cap or loads[g] + d > row_cap:
                    continue
                if abs(d) < best:
                    best, bg, bt = abs(d), g, t
        if bg < 0:
            return True
        _swap(lay, v, lab, loads, occ, p, s, bg, bt)
    return _first_duplicate(lab, occ)[0] >= 0


# ------------------------------------------------------------------- refinement


@kernel
def _best_pair(v, lab, loads, occ, h, l, vb):
    """The best 1-for-1 swap between pack ``h`` and a lighter pack ``l``: moving slot
    ``a`` of ``h`` against slot ``b`` of ``l`` shifts ``d = v[h, a] - v[l, b]``, leaving
    the pair's larger load at ``max(lh - d, ll + d) = mid + |d - half|``.  Swaps that
    would put a label twice on a pack are skipped; ties go to the first ``(a, b)``.
    ``vb [k]`` is scratch.

    Returns ``(new_max, a, b, mid, half)``; ``new_max`` is ``inf`` unless the swap
    lowers ``h`` by more than float noise."""
    k = v.shape[1]
    lh = loads[h]
    half = 0.5 * (lh - loads[l])
    mid = lh - half
    # Items of l that may come to h, the others at +inf (never closer than a real one).
    for b in range(k):
        vb[b] = v[l, b] if occ[h, lab[l, b]] == 0 else np.inf
    low, ai, bi = np.inf, 0, 0
    for a in range(k):
        if occ[l, lab[h, a]] > 0:
            continue
        xa = v[h, a] - half
        m, mb = np.inf, 0
        for b in range(k):                             # selects, not branches: the first
            d = abs(xa - vb[b])                        # smallest (the values come in any
            up = d < m                                 # order, and a branch on them missed
            m = d if up else m                         # about as often as it turned)
            mb = b if up else mb
        up = m < low
        low = m if up else low
        ai = a if up else ai
        bi = mb if up else bi
    if low < lh * (1 - _REL_EPS) - mid:
        return mid + low, ai, bi, mid, half
    return np.inf, ai, bi, mid, half


@kernel
def _best_partner(v, lab, loads, occ, h, a, l, half, mid):
    """The best item ``b`` of pack ``l`` for slot ``a`` of pack ``h`` (as in
    :func:`_best_pair`, ``a`` fixed): ``(deviation or inf, b)``."""
    k = v.shape[1]
    low, bi = np.inf, 0
    if occ[l, lab[h, a]] == 0:
        xa = v[h, a] - half
        for b in range(k):
            if occ[h, lab[l, b]] > 0:
                continue
            dev = abs(xa - v[l, b])
            up = dev < low                             # selects (see _best_pair)
            low = dev if up else low
            bi = b if up else bi
    if low < loads[h] * (1 - _REL_EPS) - mid:
        return low, bi
    return np.inf, bi


@kernel
def _round_work(P, k):
    """Work arrays of :func:`_refine_round` for ``P`` packs of ``k`` slots: ``(order,
    items, buf, mids, halves, first, pval, pslot, cand, acc, ok, d, touched, vb)``."""
    near = min(P - 1, _PARTNERS)
    pairs = min(P // 2, _PARTNERS)
    q = min(k, near)
    return (np.empty(P, np.int64), np.empty(k, np.int64), np.empty(max(P, k), np.int64),
            np.empty(near), np.empty(near), np.zeros(3, np.int64),
            np.empty(pairs), np.empty((pairs, 2), np.int64),
            np.empty((q + 1, 3), np.int64), np.empty(q + 1, np.bool_), np.empty(q + 1, np.bool_),
            np.empty(q + 1), np.empty(P, np.bool_), np.empty(k))


@kernel
def _heavy_swaps(v, lab, loads, occ, multi, order, items, buf, mids, halves, first, cand, acc, ok, d):
    """Several swaps of the heaviest pack ``h = order[-1]`` in one round.

    Candidate 0 is the best single swap (``first = (a slot, partner, b slot)``, or
    ``acc[0]`` False when none lowers ``h``); then the i-th heaviest item of ``h`` is
    offered to the i-th lightest pack ``order[i]`` (its best partner item there; the
    pair's ``mids[i]`` / ``halves[i]``).  Candidates that reuse an item or partner of
    candidate 0, or bring a label with several items onto ``h`` that an earlier
    candidate brings, are dropped; the rest are accepted as a prefix while ``h`` stays
    heavier than every new partner load, so the heaviest load only falls.  A pack far
    above the rest (one dominant expert) thus sheds many items per round instead of one.

    Writes ``cand [q + 1, 3]`` (a slot, partner, b slot) and ``acc [q + 1]``."""
    P, k = v.shape
    q = acc.shape[0] - 1
    h = order[P - 1]
    _order(v[h], items, buf, -1.0)                    # heaviest first
    cand[0, 0], cand[0, 1], cand[0, 2] = first[0], first[1], first[2]
    ok[0] = acc[0]
    for i in range(q):
        low, b = _best_partner(v, lab, loads, occ, h, items[i], order[i], halves[i], mids[i])
        cand[i + 1, 0], cand[i + 1, 1], cand[i + 1, 2] = items[i], order[i], b
        ok[i + 1] = low < np.inf and items[i] != first[0] and order[i] != first[1]
    for c in range(q + 1):
        d[c] = v[h, cand[c, 0]] - v[cand[c, 1], cand[c, 2]]
    # Drop a candidate bringing a label (with several items) an earlier one brings.
    for c in range(q, 0, -1):
        lc = lab[cand[c, 1], cand[c, 2]]
        if ok[c] and multi[lc]:
            for j in range(c):
                if ok[j] and lab[cand[j, 1], cand[j, 2]] == lc:
                    ok[c] = False
                    break
    shed, top, prefix = 0.0, -np.inf, True
    for c in range(q + 1):
        dc = d[c] if ok[c] else 0.0
        shed += dc
        before = loads[h] - (shed - dc)               # h's load before candidate c
        if ok[c]:
            top = max(top, loads[cand[c, 1]] + d[c])
        prefix = prefix and (before > top or not ok[c])
        acc[c] = ok[c] and prefix
    acc[0] = ok[0]


@kernel
def _refine_round(lay, v, lab, loads, occ, multi, order, items, buf, mids, halves, first, pval, pslot, cand, acc,
                  ok, d, touched, vb):
    """One refinement round on one row (in place; the work arrays are
    :func:`_round_work`'s, passed one by one: a tuple passed to a kernel costs a
    reference count per array and call): the best swaps of the heaviest pack
    with its ``near`` lightest packs (:func:`_heavy_swaps`), then the paired swaps
    (i-th heaviest, i-th lightest, ``pairs`` of them) touching neither pack changed
    first (all as evaluated on the state before the round).  Returns whether the
    heaviest pack got a swap.

    Two shortcuts leave every choice as it is: a partner whose ``mid`` is no lower than
    the best swap found so far is not searched (a swap leaves the pair at ``mid + |d -
    half| >= mid``), and a pair is searched only once it is known to touch no pack
    changed first (its packs, and so its best swap, are then as before the round)."""
    P, k = v.shape
    near, pairs = mids.shape[0], pval.shape[0]
    _order(loads, order, buf, 1.0)                     # lightest first
    h = order[P - 1]
    lh = loads[h]
    best = np.inf
    for j in range(near):
        half = 0.5 * (lh - loads[order[j]])            # as _best_pair computes them
        mid = lh - half
        mids[j], halves[j] = mid, half
        if j > 0 and mid >= best:
            continue
        val, a, b, _, _ = _best_pair(v, lab, loads, occ, h, order[j], vb)
        if val < best or j == 0:
            best = val
            first[0], first[1], first[2] = a, order[j], b
    acc[0] = best < np.inf
    _heavy_swaps(v, lab, loads, occ, multi, order, items, buf, mids, halves, first, cand, acc, ok, d)
    touched[:] = False
    touched[h] = acc[0]
    for c in range(acc.shape[0]):
        if acc[c]:
            _swap(lay, v, lab, loads, occ, h, cand[c, 0], cand[c, 1], cand[c, 2])
            touched[cand[c, 1]] = True
    # Pair 0 is (h, lightest): h is touched whenever that pair has a swap.
    for i in range(1, pairs):
        ph, pl = order[P - 1 - i], order[i]
        if touched[ph] or touched[pl]:
            continue
        val, a, b, _, _ = _best_pair(v, lab, loads, occ, ph, pl, vb)
        if val < np.inf:
            _swap(lay, v, lab, loads, occ, ph, a, pl, b)
    return acc[0]


@kernel
def _refine_segment(lay, v, lab, loads, occ, multi, m, thresh, max_rounds, work):
    """Swap refinement of the first ``m`` rows of the working state (``lay [>= m, P,
    k]`` and so on), which form one segment: its objective is their joint heaviest
    pack.  Each round refines every row above its ``thresh`` that attains the
    segment's maximum; the segment stops when such a row finds no improving swap."""
    order, items, buf, mids, halves, first, pval, pslot, cand, acc, ok, d, touched, vb = work
    row_max = np.empty(m)
    for _ in range(max_rounds):
        seg_max = -np.inf
        for i in range(m):
            row_max[i] = _top(loads[i])
            seg_max = max(seg_max, row_max[i])
        active = False
        stuck = False
        for i in range(m):
            if row_max[i] > thresh[i] and row_max[i] >= seg_max * (1 - _REL_EPS):
                active = True
                if not _refine_round(lay[i], v[i], lab[i], loads[i], occ[i], multi[i], order, items, buf, mids,
                                     halves, first, pval, pslot, cand, acc, ok, d, touched, vb):
                    stuck = True
        if stuck or not active:
            return


@kernel
def _refine_rows(values, labels, layout, thresh, max_rounds, table):
    """:func:`refine_swaps` in place on ``layout [rows, P, k]``, each row its own
    segment (``thresh [rows]``, ``-inf`` for no target)."""
    rows, P, k = layout.shape
    n = P * k
    ids = np.empty(n, np.int64)
    multi = np.empty((1, n), np.bool_)
    lay = np.empty((1, P, k), np.int64)
    v = np.empty((1, P, k))
    lab = np.empty((1, P, k), np.int64)
    loads = np.empty((1, P))
    occ = np.empty((1, P, n), np.int64)
    work = _round_work(P, k)
    for r in range(rows):
        u = _label_ids(labels[r], table, ids, multi[0])
        _load_state(values[r], ids, layout[r], u, lay[0], v[0], lab[0], loads[0], occ[0])
        _refine_segment(lay, v, lab, loads, occ, multi, 1, thresh[r:r + 1], max_rounds, work)
        layout[r] = lay[0]


@kernel
def _separate_rows(values, labels, layout, max_rounds, table):
    """:func:`separate_duplicates` in place on ``layout [rows, P, k]``."""
    rows, P, k = layout.shape
    n = P * k
    ids = np.empty(n, np.int64)
    multi = np.empty(n, np.bool_)
    lay = np.empty((P, k), np.int64)
    v = np.empty((P, k))
    lab = np.empty((P, k), np.int64)
    loads = np.empty(P)
    occ = np.empty((P, n), np.int64)
    for r in range(rows):
        u = _label_ids(labels[r], table, ids, multi)
        _load_state(values[r], ids, layout[r], u, lay, v, lab, loads, occ)
        if _first_duplicate(lab, occ)[0] >= 0:
            _separate_row(lay, v, lab, loads, occ, -np.inf, max_rounds)
            layout[r] = lay


# ------------------------------------------------------------------- pipeline


@kernel
def _seed_row(vals, labs, tgt, has_target, lay, best, check, work):
    """The rest of the seed cascade of one row of sorted items, for a row whose snake
    seed (in ``lay [P, k]``: ``best``, its heaviest pack, and ``check``, whether a
    duplicate is possible; :func:`_pack_segments`) is above its target (``work``: the
    seeds' part of :func:`_pack_work`).

    Every row starts from the snake (rotated where a run crosses a block, to keep an
    expert's replicas apart); a row above its target then tries largest differencing on
    an order that keeps every expert's replicas inside one block of ``P`` (kept when no
    heavier), and, when one item dominates (more than half a pack's average load) and
    the row is still far above its target, item-by-item LPT (kept when lighter).

    Returns ``(heaviest pack, check)``."""
    alt, perm, sv, uw, kw = work
    P, k = lay.shape
    n = P * k
    split = _unsplit_row(labs, P, perm, uw)
    for i in range(n):
        sv[i] = vals[perm[i]]
    _kk_row(sv, alt, kw)
    for p in range(P):
        for t in range(k):
            alt[p, t] = perm[alt[p, t]]
    kk_max = _pack_max(vals, alt)
    if kk_max <= best:
        lay[:] = alt
        best, check = kk_max, split
    if has_target:
        total = 0.0
        for i in range(n):
            total += vals[i]
        if vals[0] > total / (2 * P) and best > tgt * (1 + _FAR):
            _lpt_items_row(sv, alt)
            for p in range(P):
                for t in range(k):
                    alt[p, t] = perm[alt[p, t]]
            lpt_max = _pack_max(vals, alt)
            if lpt_max < best:
                lay[:] = alt
                best, check = lpt_max, True
    return best, check


@kernel
def _pack_work(S, P, k):
    """Work arrays of :func:`_pack_segments` for segments of ``S`` rows: ``(state, seeds,
    rounds, segment)``: the working state of ``S`` rows (``lay, v, lab, loads, occ,
    multi, ids``), the seeds' (``alt, perm, sv``, :func:`_unsplit_work`,
    :func:`_kk_work`), :func:`_round_work` and per-row flags (``best, check, todo,
    rows, thresh``)."""
    n = P * k
    state = (np.empty((S, P, k), np.int64), np.empty((S, P, k)), np.empty((S, P, k), np.int64),
             np.empty((S, P)), np.empty((S, P, n), np.int64), np.empty((S, n), np.bool_),
             np.empty(n, np.int64))
    seeds = (np.empty((P, k), np.int64), np.empty(n, np.int64), np.empty(n), _unsplit_work(n), _kk_work(P, k))
    flags = (np.empty(S), np.empty(S, np.bool_), np.empty(S, np.bool_), np.empty(S, np.int64), np.empty(S))
    return state, seeds, _round_work(P, k), flags


@kernel
def _doubled(labels, lay, table):
    """Whether a pack of ``lay [P, k]`` holds two items of one label (``labels [n]``);
    ``table`` (``-1`` for every label value) marks the pack a label was last seen on,
    and is restored before returning."""
    P, k = lay.shape
    found = False
    for p in range(P):
        for t in range(k):
            lab = labels[lay[p, t]]
            found |= table[lab] == p
            table[lab] = p
    for i in range(labels.shape[0]):
        table[labels[i]] = -1
    return found


@kernel
def _separate_seeds(values, labels, r0, allow_dup, table, state, best, check, todo, out):
    """Separate replicas of one expert sharing a pack in the rows ``r0 ..`` of a segment
    flagged ``check`` (the only ones where a seed may hold one), any pack allowed up to
    the segment's heaviest; without ``allow_dup`` a row still holding one falls back to
    dealing positions round-robin (distinct packs for any run of at most ``P`` items)
    and is marked ``todo`` (``state``: the working state of :func:`_pack_work`)."""
    lay, v, lab, loads, occ, multi, ids = state
    S, P, k = lay.shape
    cap = _top(best)
    for i in range(S):
        r = r0 + i
        if not check[i] or not _doubled(labels[r], out[r], table):
            continue
        u = _label_ids(labels[r], table, ids, multi[0])
        _load_state(values[r], ids, out[r], u, lay[0], v[0], lab[0], loads[0], occ[0])
        if _first_duplicate(lab[0], occ[0])[0] < 0:
            continue
        left = _separate_row(lay[0], v[0], lab[0], loads[0], occ[0], cap, _SEPARATE_ROUNDS)
        out[r] = lay[0]
        best[i] = _top(loads[0])
        if left and not allow_dup:
            for p in range(P):
                for t in range(k):
                    out[r, p, t] = t * P + p
            best[i] = _pack_max(values[r], out[r])
            todo[i] = True


@kernel
def _pack_segments(values, labels, target, has_target, rounds, allow_dup, table, work, out):
    """:func:`pack_sorted` on every segment of ``S`` rows (``work``: see
    :func:`_pack_work`, one state row per segment row); writes ``out``.

    Per segment: every row's snake seed, the rest of the seeds on the rows above their
    target (:func:`_seed_row`), duplicate separation where a seed may hold one
    (:func:`_separate_seeds`), then the refinement of the rows still above their target,
    on fresh state.  The work arrays are unpacked once for all segments (each array
    handed to a kernel costs reference counting)."""
    state, seeds, round_work, (best, check, todo, rows, thresh) = work
    lay, v, lab, loads, occ, multi, ids = state
    S = lay.shape[0]
    for r0 in range(0, values.shape[0], S):
        again = False
        for i in range(S):
            r = r0 + i
            row = out[r]
            check[i] = _snake_row(labels[r], True, row)
            best[i] = _pack_max(values[r], row)
            todo[i] = not has_target or best[i] > target[r] * (1 + _REL_EPS)
            if todo[i]:
                best[i], check[i] = _seed_row(values[r], labels[r], target[r], has_target, row, best[i], check[i],
                                              seeds)
            again |= check[i]
        if again:
            _separate_seeds(values, labels, r0, allow_dup, table, state, best, check, todo, out)
        if rounds <= 0:
            continue
        # Refine the rows still above their target, on fresh state.
        m = 0
        for i in range(S):
            r = r0 + i
            if todo[i] and (not has_target or best[i] > target[r] * (1 + _REL_EPS)):
                u = _label_ids(labels[r], table, ids, multi[m])
                _load_state(values[r], ids, out[r], u, lay[m], v[m], lab[m], loads[m], occ[m])
                rows[m] = r
                thresh[m] = target[r] * (1 + _REL_EPS) if has_target else -np.inf
                m += 1
        if m:
            _refine_segment(lay, v, lab, loads, occ, multi, m, thresh, rounds, round_work)
        for i in range(m):
            out[rows[i]] = lay[i]


@kernel
def _pack_sorted_rows(values, labels, num_packs, target, has_target, rounds, segment, allow_dup, table, out):
    """:func:`pack_sorted` on every segment of ``segment`` rows; writes ``out [rows, P, k]``."""
    rows, n = values.shape
    work = _pack_work(segment, num_packs, n // num_packs)
    _pack_segments(values, labels, target, has_target, rounds, allow_dup, table, work, out)


@kernel
def _settle_order(neg, order):
    """Finish ``order`` (``[m]``, a permutation of ``0..m-1``) as the order by increasing
    ``neg`` (``[m]``), ties by index: an insertion sort, which costs one pass on an order
    already sorted by ``neg`` (numpy's ``argsort``, whose order among equal keys depends
    on the platform) and moves only tied or misplaced entries, so the result is the same
    on every machine whatever order it starts from."""
    for i in range(1, order.shape[0]):
        j = order[i]
        x = neg[j]
        t = i
        while t > 0:
            q = order[t - 1]
            if neg[q] < x or (neg[q] == x and q < j):
                break
            order[t] = q
            t -= 1
        order[t] = j


@kernel
def _items_row(neg, c, order, num_packs, values, labels):
    """:func:`replica_items` on one row: from ``neg`` (``[e]``, minus each expert's
    per-replica load ``w / c``), the counts ``c`` and ``order`` (``neg``'s order, ties by
    index: :func:`_settle_order`), writes the items' ``values`` and ``labels`` (``[n]``);
    returns the row's bound.

    An expert's second replica is written, and added to the total, with selects rather
    than a loop whose exit turns on the count (one or two replicas an expert, in no
    order the branch predictor learns); a third and more go through the loop."""
    n = values.shape[0]
    i = 0
    total = 0.0
    for j in order:
        x = -neg[j]
        cj = c[j]
        values[i] = x
        labels[i] = j
        total += x
        if i + 1 < n:                   # a second copy, overwritten by the next expert if cj is 1
            values[i + 1] = x
            labels[i + 1] = j
        twice = total + x
        total = twice if cj > 1 else total
        for t in range(2, cj):
            values[i + t] = x
            labels[i + t] = j
            total += x
        i += cj
    return max(total / num_packs, values[0]) if i else 0.0


@kernel
def _items_rows(neg, c, order, num_packs, values, labels, bound):
    """:func:`_items_row` on every row into ``values``, ``labels`` and ``bound``, each
    row's ``order`` (``neg``'s argsort) settled first."""
    for r in range(neg.shape[0]):
        _settle_order(neg[r], order[r])
        bound[r] = _items_row(neg[r], c[r], order[r], num_packs, values[r], labels[r])


def _table(labels: np.ndarray) -> np.ndarray:
    """The label lookup :func:`_label_ids` needs (``-1`` for every label value)."""
    return np.full(int(labels.max()) + 1 if labels.size else 1, -1, dtype=np.int64)


# ------------------------------------------------------------------ public API


def snake_layout(values: np.ndarray, num_packs: int, order: np.ndarray | None = None) -> np.ndarray:
    """Snake ("zigzag") layout: items by decreasing load dealt 0..P-1, P-1..0, ...

    Args:
        values: ``[rows, n]`` item loads.
        num_packs: ``P``; ``n`` must be a multiple of it.
        order: optional ``[rows, n]`` item order by decreasing load (computed if absent).

    Returns:
        ``[rows, P, k]`` int64 layout.
    """
    rows, n, k = _check(values, num_packs)
    order = _descending(values) if order is None else order
    pos = np.empty((rows, num_packs, k), dtype=np.int64)
    _snake_rows(np.zeros((rows, n), dtype=np.int64), False, pos)
    return gather_rows(_i64(order), pos)


def unsplit_runs(sorted_labels: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Reorder sorted items so that no run of one label crosses a block boundary.

    Items sorted by decreasing load with each label's items adjacent are cut into blocks
    of ``P``; snake, LPT-by-rounds and largest differencing all give each pack exactly
    one item of every block, so a label whose items all sit in one block can never
    land twice on a pack.  Where a run (``c <= P`` items) crosses the boundary into
    block ``b``, the first single items (labels with one item) after it move in front
    of it, as many as the run has before the boundary, so the whole run starts block
    ``b``.  Runs are never broken, and the moved items are the nearest lighter ones, so
    the order stays nearly sorted.  Boundaries are fixed in order, so a run pushed
    across the next boundary is handled there.

    Args:
        sorted_labels: ``[rows, n]`` labels in sorted order, each label's items adjacent.
        num_packs: ``P``.

    Returns:
        ``(perm, split)``: ``perm [rows, n]`` positions into the sorted order, and
        ``split [rows]`` bool for rows where a run still crosses a boundary (a run
        longer than ``P``, or too few single items after it).
    """
    lab = _i64(sorted_labels)
    rows, n = lab.shape
    perm = np.empty((rows, n), dtype=np.int64)
    if n // num_packs < 2 or rows == 0:
        perm[:] = np.arange(n)
        return perm, np.zeros(rows, dtype=bool)
    return perm, _unsplit_rows(lab, num_packs, perm)


def lpt_rounds_layout(values: np.ndarray, num_packs: int, order: np.ndarray | None = None) -> np.ndarray:
    """LPT by rounds: each round deals the next ``P`` heaviest items, the heaviest of
    them to the currently lightest pack, and so on.

    Args:
        values: ``[rows, n]`` item loads.
        num_packs: ``P``; ``n`` must be a multiple of it.
        order: optional ``[rows, n]`` item order by decreasing load (computed if absent).

    Returns:
        ``[rows, P, k]`` int64 layout.
    """
    rows, n, k = _check(values, num_packs)
    order = _i64(_descending(values) if order is None else order)
    pos = np.empty((rows, num_packs, k), dtype=np.int64)
    _lpt_rounds_rows(_f64(gather_rows(values, order)), pos)
    return gather_rows(order, pos)


def kk_layout(
    values: np.ndarray,
    num_packs: int,
    order: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Largest differencing (Karmarkar-Karp) with exact cardinality, row by row.

    The items, heaviest first, are cut into ``k`` blocks of ``P``; each block is a
    partial partition of ``P`` one-item subsets.  Repeatedly, a row merges its two
    partial partitions with the largest spread (heaviest minus lightest subset), joining
    the lightest subset of one with the heaviest of the other, until one partition is
    left.  Every subset takes exactly one item of each block, so each pack ends with
    exactly ``k`` items.  Usually several times closer to the bound than LPT.

    With ``labels``, items are ordered so that each label's items are adjacent and
    inside one block (:func:`unsplit_runs`), which keeps them on different packs.

    Args:
        values: ``[rows, n]`` item loads.
        num_packs: ``P``; ``n`` must be a multiple of it.
        order: optional ``[rows, n]`` item order by decreasing load (ignored when
            ``labels`` is given: the order then keeps labels adjacent).
        labels: optional ``[rows, n]`` int labels.

    Returns:
        ``[rows, P, k]`` int64 layout.
    """
    rows, n, k = _check(values, num_packs)
    if labels is not None:
        order = runs_order(values, labels)
        perm, _ = unsplit_runs(gather_rows(np.asarray(labels), order), num_packs)
        order = gather_rows(order, perm)
    else:
        order = _descending(values) if order is None else order
    order = _i64(order)
    pos = np.empty((rows, num_packs, k), dtype=np.int64)
    _kk_rows(_f64(gather_rows(values, order)), pos)
    return gather_rows(order, pos)


def refine_swaps(
    values: np.ndarray,
    labels: np.ndarray,
    layout: np.ndarray,
    target: np.ndarray | None = None,
    max_rounds: int = 64,
) -> np.ndarray:
    """1-for-1 swap refinement of each row's heaviest packs.

    Each round evaluates the heaviest pack against the lightest packs (up to
    ``_PARTNERS``) and the disjoint pairs (i-th heaviest, i-th lightest, up to
    ``_PARTNERS`` of them), applies the best swaps of the heaviest pack and every paired
    swap touching neither of its packs; a row stops at its target, or when its heaviest
    pack finds no improving swap.  Swaps that would put two replicas of one label on one
    pack are never made, so the heaviest pack never gets worse and no duplicate is
    created.

    Args:
        values: ``[rows, n]`` item loads.
        labels: ``[rows, n]`` int item labels (expert ids), ``>= 0``.
        layout: ``[rows, P, k]`` layout; not modified.
        target: optional ``[rows]`` loads at which a row counts as solved (a bound).
        max_rounds: cap on rounds.

    Returns:
        The refined ``[rows, P, k]`` layout.
    """
    rows, num_packs, k = layout.shape
    out = _i64(np.array(layout, dtype=np.int64))
    if num_packs < 2 or k < 1 or rows == 0 or max_rounds <= 0:
        return out
    lab = _labels(labels)
    tg, given = _target(target, rows)
    thresh = tg * (1 + _REL_EPS) if given else np.full(rows, -np.inf)
    _refine_rows(_f64(values), lab, out, thresh, int(max_rounds), _table(lab))
    return out


def separate_duplicates(
    values: np.ndarray, labels: np.ndarray, layout: np.ndarray, max_rounds: int = 64
) -> np.ndarray:
    """Move replicas of one label apart where they share a pack, without raising the
    row's heaviest pack.

    For a pack holding two items of one label, swap one of them with an item of another
    pack such that neither pack gets a duplicate and both new loads stay at or below the
    row's current maximum; among such swaps take the one changing loads least.  Where
    no such swap exists the duplicate stays (nothing better exists for this move set).

    Args:
        values: ``[rows, n]`` item loads.
        labels: ``[rows, n]`` int labels, ``>= 0``.
        layout: ``[rows, P, k]``; not modified.
        max_rounds: cap on repair rounds (each fixes one duplicate per row).

    Returns:
        ``[rows, P, k]`` layout.
    """
    rows, num_packs, k = layout.shape
    out = _i64(np.array(layout, dtype=np.int64))
    if k < 2 or num_packs < 2 or rows == 0:
        return out
    lab = _labels(labels)
    _separate_rows(_f64(values), lab, out, int(max_rounds), _table(lab))
    return out


def pack_sorted(
    values: np.ndarray,
    labels: np.ndarray,
    num_packs: int,
    target: np.ndarray | None = None,
    refine_rounds: int = DEFAULT_REFINE_ROUNDS,
    segment_size: int = 1,
    allow_duplicates: bool = True,
) -> np.ndarray:
    """The packing pipeline on items sorted by decreasing load with each label's items
    adjacent (see :func:`runs_order`); returns a layout of sorted positions.

    Args:
        values: ``[rows, n]`` sorted item loads.
        labels: ``[rows, n]`` int labels, ``>= 0``, each label's items adjacent.
        num_packs: ``P``; ``n`` must be a multiple of it.
        target: optional ``[rows]`` lower bounds; work on a row stops at its bound.
        refine_rounds: cap on refinement rounds (0 disables refinement).
        segment_size: consecutive rows form segments of this size whose objective is the
            heaviest pack over the whole segment (the nodes of one layer); only rows
            attaining their segment's maximum are refined.  ``rows`` must be a multiple.
        allow_duplicates: when False, no pack may hold two items of one label: a row
            where the seeds leave one (after duplicate separation) falls back to dealing
            positions round-robin (distinct packs for any run of at most ``P`` items)
            before refinement.  Needs every label to have at most ``P`` items.

    Returns:
        ``[rows, P, k]`` int64 layout of positions ``0..n-1``.
    """
    rows, n, k = _check(values, num_packs)
    if segment_size < 1 or rows % segment_size:
        raise ValueError(f"rows={rows} is not a multiple of segment_size={segment_size}")
    if num_packs == 1 or k <= 1 or rows == 0:
        # One pack, or one item per pack: every layout is equally balanced.
        return np.broadcast_to(np.arange(n), (rows, n)).reshape(rows, num_packs, k).copy()
    lab = _labels(labels)
    tg, given = _target(target, rows)
    out = np.empty((rows, num_packs, k), dtype=np.int64)
    _pack_sorted_rows(
        _f64(values), lab, int(num_packs), tg, given, int(refine_rounds), int(segment_size),
        bool(allow_duplicates), _table(lab), out,
    )
    return out


def replica_items(
    weight: np.ndarray, counts: np.ndarray, num_packs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The replicas of given counts as sorted items for :func:`pack_sorted`.

    Args:
        weight: ``[rows, e]`` expert loads.
        counts: ``[rows, e]`` replica counts, ``>= 1``, every row summing to the same ``n``.
        num_packs: ``P`` (for the bound).

    Returns:
        ``(values [rows, n], labels [rows, n], bound [rows])``: each row's replicas by
        decreasing load (each carries its expert's load over its count; experts ordered
        by that load, ties by index, each expert's replicas adjacent), their experts, and
        the row's lower bound: its average pack load or its largest replica, whichever
        is more.
    """
    c = _i64(counts)
    neg = _f64(-(_f64(weight) / c))
    rows = neg.shape[0]
    n = int(c[0].sum()) if rows else 0
    values = np.empty((rows, n))
    labels = np.empty((rows, n), dtype=np.int64)
    bound = np.empty(rows)
    _items_rows(neg, c, item_order(neg), int(num_packs), values, labels, bound)
    return values, labels, bound


def item_order(neg: np.ndarray) -> np.ndarray:
    """``[rows, e]`` int64 argsort of each row of ``neg`` (numpy's vectorised sort), to be
    settled by :func:`_settle_order` inside the kernels (ties by index)."""
    return _i64(np.argsort(neg, axis=-1))


def pack_items(
    values: np.ndarray,
    labels: np.ndarray,
    num_packs: int,
    target: np.ndarray | None = None,
    refine_rounds: int = DEFAULT_REFINE_ROUNDS,
    segment_size: int = 1,
    allow_duplicates: bool = True,
) -> np.ndarray:
    """Full packing pipeline (module docs) on items in any order.

    Args:
        values: ``[rows, n]`` item loads (float).
        labels: ``[rows, n]`` int item labels, ``>= 0``; items sharing a label are
            replicas of one expert and are kept on different packs where that costs
            nothing.
        num_packs: ``P``; ``n`` must be a multiple of it.
        target, refine_rounds, segment_size, allow_duplicates: as in :func:`pack_sorted`.

    Returns:
        ``[rows, P, k]`` int64 layout of item indices.
    """
    _check(values, num_packs)
    labels = np.asarray(labels)
    order = runs_order(values, labels)
    pos = pack_sorted(
        gather_rows(values, order), gather_rows(labels, order), num_packs,
        target=target, refine_rounds=refine_rounds, segment_size=segment_size,
        allow_duplicates=allow_duplicates,
    )
    return gather_rows(order, pos)


@warmer
def _warm() -> None:
    """Every kernel of this module on tiny inputs of the types real calls use."""
    v = np.random.default_rng(0).random((4, 6)) + 0.1
    lab = np.array([[0, 0, 1, 2, 3, 4]] * 4)
    pack_sorted(v, lab, 3, refine_rounds=1, segment_size=2, allow_duplicates=False)
    pack_sorted(v, lab, 3, target=np.zeros(4), refine_rounds=1)
    refine_swaps(v, lab, snake_layout(v, 3), target=np.zeros(4), max_rounds=1)
    separate_duplicates(v, lab, lpt_rounds_layout(v, 3))
    kk_layout(v, 3, labels=lab)
    replica_items(v, np.ones((4, 6), dtype=np.int64), 3)
