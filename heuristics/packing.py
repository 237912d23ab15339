"""Packing replicas onto GPUs with exactly ``k`` slots per GPU.

All functions work on a batch of independent rows (a row is one layer, or one layer
restricted to one node).  A row has ``n = P * k`` items (replicas) with loads ``v`` and
labels (the logical expert each replica belongs to), to be placed on ``P`` packs (GPUs)
of exactly ``k`` slots each, minimising the heaviest pack.

A placement is held as a *layout* ``idx[rows, P, k]``: ``idx[r, p, s]`` is the item in
slot ``s`` of pack ``p`` of row ``r``.  Every layout is a permutation of ``0..n-1`` per
row, so exact capacity holds by construction.

Pipeline: two seeds (snake order and LPT by rounds), keep the better per row, then swap
refinement between the heaviest pack and every other pack, then a repair pass that
separates two replicas of one expert sharing a pack wherever that costs no balance.
Loops run over slots per pack or refinement rounds, never over rows or items.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "kk_layout",
    "snake_layout",
    "lpt_rounds_layout",
    "pack_loads",
    "refine_swaps",
    "separate_duplicates",
    "pack_items",
]

# A swap must lower the heaviest pack by more than this fraction of it to count as an
# improvement; it stops the search cycling on float noise.
_REL_EPS = 1e-12


def _check(values: np.ndarray, num_packs: int) -> tuple[int, int, int]:
    if values.ndim != 2:
        raise ValueError(f"item loads must be 2-D [rows, n], got shape {values.shape}")
    rows, n = values.shape
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"{n} items per row cannot fill {num_packs} packs exactly")
    return rows, n, n // num_packs


def _descending(values: np.ndarray) -> np.ndarray:
    return np.argsort(-values, axis=1)


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
    # Sorted position i goes to round i // P; odd rounds run backwards.
    lay = order.reshape(rows, k, num_packs).copy()
    lay[:, 1::2, :] = lay[:, 1::2, ::-1]
    return np.ascontiguousarray(lay.transpose(0, 2, 1))


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
    order = _descending(values) if order is None else order
    sorted_v = np.take_along_axis(values, order, axis=1).reshape(rows, k, num_packs)
    blocks = order.reshape(rows, k, num_packs)
    return _lpt_rounds(sorted_v, blocks)[0]


def _lpt_rounds(sorted_v: np.ndarray, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LPT by rounds on pre-sorted blocks ``[rows, k, P]``; returns (layout, loads)."""
    rows, k, num_packs = sorted_v.shape
    lay = np.empty((rows, num_packs, k), dtype=np.int64)
    loads = np.zeros((rows, num_packs))
    ar = np.arange(rows)[:, None]
    for s in range(k):
        # Lightest pack first; the block is already heaviest first.
        target = np.argsort(loads, axis=1)
        lay[ar, target, s] = blocks[:, s, :]
        loads[ar, target] += sorted_v[:, s, :]
    return lay, loads


def _hot_bits(labels: np.ndarray) -> np.ndarray:
    """``[rows, n]`` uint64 masks: one bit per label that occurs more than once in its
    row (bit = rank of that label among such labels, modulo 64; sharing a bit only makes
    the duplicate checks below conservative), zero for single items."""
    rows, n = labels.shape
    num_labels = int(labels.max()) + 1 if labels.size else 1
    flat = (np.arange(rows)[:, None] * num_labels + labels).ravel()
    cnt = np.bincount(flat, minlength=rows * num_labels).reshape(rows, num_labels)
    hot = cnt > 1
    rank = (np.cumsum(hot, axis=1) - 1) % 64
    bits = np.where(hot, np.left_shift(np.uint64(1), rank.astype(np.uint64)), np.uint64(0))
    return np.take_along_axis(bits, labels, axis=1)


def _avoid_clashes(ma: np.ndarray, mb: np.ndarray, q: np.ndarray, max_fixes: int = 8) -> np.ndarray:
    """Re-pair positions so that joined subsets share no label bit where possible.

    ``ma[:, i]`` is joined with ``mb[:, q[:, i]]``.  While a row has a clash at some
    position ``i``, exchange partners with the nearest position ``j`` for which both new
    joins are clash-free (nearest keeps the loads closest to the plain pairing).
    """
    P = q.shape[1]
    pos = np.arange(P)
    for _ in range(max_fixes):
        mbq = np.take_along_axis(mb, q, axis=1)
        clash = (ma & mbq) != 0
        rows = np.flatnonzero(clash.any(axis=1))
        if rows.size == 0:
            break
        i = clash[rows].argmax(axis=1)                           # first clash per row
        ar = np.arange(rows.size)
        a_i = ma[rows, i][:, None]
        b_i = mbq[rows, i][:, None]
        ok = ((a_i & mbq[rows]) == 0) & ((ma[rows] & b_i) == 0) & ~clash[rows]
        ok[ar, i] = False
        dist = np.where(ok, np.abs(pos[None, :] - i[:, None]), P + 1)
        j = dist.argmin(axis=1)
        good = dist[ar, j] <= P
        if not good.any():
            break
        r, i, j = rows[good], i[good], j[good]
        qi = q[r, i].copy()
        q[r, i] = q[r, j]
        q[r, j] = qi
    return q


def kk_layout(
    values: np.ndarray,
    num_packs: int,
    order: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Largest differencing (Karmarkar-Karp) with exact cardinality, batched over rows.

    The items, heaviest first, are cut into ``k`` blocks of ``P``; each block is a
    partial partition of ``P`` one-item subsets.  Repeatedly, every row merges its two
    partial partitions with the largest spread (heaviest minus lightest subset), joining
    the lightest subset of one with the heaviest of the other, until one partition is
    left.  Every subset takes exactly one item of each block, so each pack ends with
    exactly ``k`` items.  Usually several times closer to the bound than LPT.

    With ``labels``, a join that would put two items of one label together is avoided
    where exchanging partners with a neighbouring position avoids it.

    Args:
        values: ``[rows, n]`` item loads.
        num_packs: ``P``; ``n`` must be a multiple of it.
        order: optional ``[rows, n]`` item order by decreasing load.
        labels: optional ``[rows, n]`` int labels (``>= 0``).

    Returns:
        ``[rows, P, k]`` int64 layout.
    """
    rows, n, k = _check(values, num_packs)
    order = _descending(values) if order is None else order
    P = num_packs
    ar = np.arange(rows)
    # Partial partitions, each with its subset loads sorted ascending: [rows, k, P].
    # Block b arrives heaviest first, so its item j sits at ascending position P-1-j.
    parts = np.take_along_axis(values, order, axis=1).reshape(rows, k, P)[:, :, ::-1].copy()
    masks = None
    if labels is not None:
        bits = np.take_along_axis(_hot_bits(labels), order, axis=1)
        masks = bits.reshape(rows, k, P)[:, :, ::-1].copy()
    spread = parts[:, :, -1] - parts[:, :, 0]
    reverse = np.broadcast_to(np.arange(P)[::-1], (rows, P))
    history = []
    for _ in range(k - 1):
        ia = spread.argmax(axis=1)
        spread[ar, ia] = -np.inf
        ib = spread.argmax(axis=1)
        a, b = parts[ar, ia], parts[ar, ib]
        q = reverse                                         # partner of a's position i in b
        if masks is not None:
            ma, mb = masks[ar, ia], masks[ar, ib]
            q = _avoid_clashes(ma, mb, reverse.copy())
        raw = a + np.take_along_axis(b, q, axis=1)
        perm = np.argsort(raw, axis=1)
        merged = np.take_along_axis(raw, perm, axis=1)
        parts[ar, ia] = merged
        if masks is not None:
            mraw = ma | np.take_along_axis(mb, q, axis=1)
            masks[ar, ia] = np.take_along_axis(mraw, perm, axis=1)
        spread[ar, ia] = merged[:, -1] - merged[:, 0]
        spread[ar, ib] = -np.inf
        history.append((ia, ib, perm, q))
    # Undo the merges to learn, for every block, the final pack of each of its positions.
    final = np.empty((rows, k, P), dtype=np.int64)
    final[ar, spread.argmax(axis=1)] = np.arange(P)
    for ia, ib, perm, q in reversed(history):
        after = final[ar, ia]                               # pack of merged position pos
        a_map = np.empty_like(after)
        b_map = np.empty_like(after)
        np.put_along_axis(a_map, perm, after, axis=1)       # a's position perm[pos]
        np.put_along_axis(b_map, np.take_along_axis(q, perm, axis=1), after, axis=1)
        final[ar, ia] = a_map
        final[ar, ib] = b_map
    pack_of = final[:, :, ::-1]                             # [rows, block, j] -> pack
    lay = np.empty((rows, P, k), dtype=np.int64)
    lay[ar[:, None, None], pack_of, np.arange(k)[None, :, None]] = order.reshape(rows, k, P)
    return lay


def pack_loads(values: np.ndarray, layout: np.ndarray) -> np.ndarray:
    """Pack loads ``[rows, P]`` of a layout ``[rows, P, k]`` over item loads ``[rows, n]``."""
    rows = values.shape[0]
    return np.take_along_axis(values, layout.reshape(rows, -1), axis=1).reshape(layout.shape).sum(-1)


class _Layout:
    """Mutable working copy of a layout with per-slot loads and labels, pack loads and
    per-pack label occupancy counts (for O(1) duplicate checks)."""

    def __init__(self, values: np.ndarray, labels: np.ndarray, layout: np.ndarray) -> None:
        rows, num_packs, k = layout.shape
        self.layout = layout.copy()
        flat = self.layout.reshape(rows, -1)
        self.v = np.take_along_axis(values, flat, axis=1).reshape(rows, num_packs, k)
        self.lab = np.take_along_axis(labels, flat, axis=1).reshape(rows, num_packs, k)
        self.loads = self.v.sum(-1)
        self.num_labels = int(labels.max()) + 1 if labels.size else 1
        key = np.arange(rows * num_packs)[:, None] * self.num_labels + self.lab.reshape(rows * num_packs, k)
        self.occ = np.bincount(key.ravel(), minlength=rows * num_packs * self.num_labels)
        self.occ_flat = self.occ
        self.occ = self.occ.reshape(rows, num_packs, self.num_labels)
        self.num_packs = num_packs
        # Surplus copies per row: sum over (pack, label) of max(occ - 1, 0).
        self.surplus = np.maximum(self.occ - 1, 0).sum(axis=(1, 2))

    def has_duplicates(self, rows: np.ndarray | None = None) -> np.ndarray:
        return (self.surplus if rows is None else self.surplus[rows]) > 0

    def occupancy(self, rows: np.ndarray, packs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``occ[rows, packs, labels]`` (broadcast), without copying whole rows."""
        return self.occ_flat[(rows * self.num_packs + packs) * self.num_labels + labels]

    def swap(self, r: np.ndarray, p: np.ndarray, s: np.ndarray, q: np.ndarray, t: np.ndarray) -> None:
        """Swap slot (p, s) with slot (q, t) of row r, elementwise over equal-length
        arrays.  A row may appear several times as long as no pack appears twice in it
        (and p != q), so that no two updates touch one cell."""
        va, vb = self.v[r, p, s], self.v[r, q, t]
        la, lb = self.lab[r, p, s], self.lab[r, q, t]
        ia, ib = self.layout[r, p, s], self.layout[r, q, t]
        self.v[r, p, s], self.v[r, q, t] = vb, va
        self.lab[r, p, s], self.lab[r, q, t] = lb, la
        self.layout[r, p, s], self.layout[r, q, t] = ib, ia
        self.loads[r, p] += vb - va
        self.loads[r, q] += va - vb
        # Surplus bookkeeping: a copy leaving a pack where it was doubled removes one
        # surplus; a copy arriving where the label already sits adds one.
        # (np.add.at: a row may appear several times.)
        np.add.at(self.surplus, r, -((self.occ[r, p, la] > 1).astype(np.int64) + (self.occ[r, q, lb] > 1)))
        self.occ[r, p, la] -= 1
        self.occ[r, q, lb] -= 1
        np.add.at(self.surplus, r, (self.occ[r, p, lb] > 0).astype(np.int64) + (self.occ[r, q, la] > 0))
        self.occ[r, p, lb] += 1
        self.occ[r, q, la] += 1


def _best_pair_swaps(
    st: _Layout, rows: np.ndarray, heavy: np.ndarray, light: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each row and each (heavy[:, j], light[:, j]) pack pair, the best 1-for-1 swap.

    Args:
        rows: ``[a]`` row ids; heavy, light: ``[a, m]`` pack ids (heavy != light).

    Returns:
        ``(new_max [a, m], ai [a, m], bi [a, m], dupfree)``: the best swap moves slot
        ``ai`` of the heavy pack against slot ``bi`` of the light pack and leaves the
        pair's larger load at ``new_max`` (``inf`` where no swap lowers the heavy pack).
    """
    a_n, m = heavy.shape
    k = st.v.shape[2]
    rr = rows[:, None]
    # Work on [a, m, k*k] arrays (slot of a major, slot of b minor): numpy's inner loops
    # then run over k*k elements instead of k, which is several times faster.
    ia = np.repeat(np.arange(k), k)
    ib = np.tile(np.arange(k), k)
    vh = st.v[rr, heavy][:, :, ia]                         # [a, m, k*k]
    vl = st.v[rr, light][:, :, ib]
    lh = st.loads[rr, heavy]                               # [a, m]
    ll = st.loads[rr, light]
    d = vh - vl
    new_max = np.maximum(lh[..., None] - d, ll[..., None] + d)
    # Duplicate checks: b's label already on the heavy pack, a's label on the light pack.
    occ = st.occ_flat
    base_h = (rr * st.num_packs + heavy) * st.num_labels     # [a, m]
    base_l = (rr * st.num_packs + light) * st.num_labels
    b_on_h = occ[base_h[..., None] + st.lab[rr, light]] > 0  # [a, m, k] (slot of b)
    a_on_l = occ[base_l[..., None] + st.lab[rr, heavy]] > 0  # [a, m, k] (slot of a)
    bad = (d <= 0) | b_on_h[:, :, ib] | a_on_l[:, :, ia]
    new_max[bad] = np.inf
    best = new_max.argmin(axis=2)
    val = np.take_along_axis(new_max, best[..., None], axis=2)[..., 0]
    val = np.where(val < lh * (1 - _REL_EPS), val, np.inf)
    return val, best // k, best % k


def refine_swaps(
    values: np.ndarray,
    labels: np.ndarray,
    layout: np.ndarray,
    target: np.ndarray | None = None,
    max_rounds: int = 64,
) -> np.ndarray:
    """1-for-1 swap refinement of each row's heaviest packs.

    Each round does two passes over the still-active rows:

    * *paired*: the i-th heaviest pack is paired with the i-th lightest, and every pair
      applies its best swap (the one minimising the pair's larger load, if that is below
      the heavy pack's load).  Pairs are disjoint, so one round balances many packs.
    * *heaviest against all*: the heaviest pack tries every other pack and applies the
      best swap found.  A row where this finds nothing is a local optimum for 1-for-1
      swaps of its heaviest pack and stops.

    Swaps that would put two replicas of one label on one pack are never made.  A row
    also stops once its heaviest pack is within ``_REL_EPS`` of ``target``.

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
    if num_packs < 2 or k < 1 or rows == 0 or max_rounds <= 0:
        return layout.copy()
    st = _Layout(values, labels, layout)
    _refine(st, target, max_rounds)
    return st.layout


def _refine(
    st: _Layout, target: np.ndarray | None, max_rounds: int, segment: np.ndarray | None = None
) -> None:
    """Refine ``st`` in place.  ``segment`` (``[rows]`` ints) groups rows whose
    objective is their joint maximum; only rows attaining it are worked on."""
    rows, num_packs, k = st.layout.shape
    if segment is None:
        seg = np.arange(rows)
        nseg = rows
    else:
        _, seg = np.unique(segment, return_inverse=True)
        nseg = int(seg.max()) + 1 if rows else 0
    frozen = np.zeros(nseg, dtype=bool)
    half = num_packs // 2
    others = np.arange(num_packs)

    def pick() -> np.ndarray:
        """Rows worth a round: unsolved, in a live segment, attaining its maximum."""
        row_max = st.loads.max(axis=1)
        ok = ~frozen[seg]
        if target is not None:
            ok &= row_max > target * (1 + _REL_EPS)
        if segment is not None:
            seg_max = np.full(nseg, -np.inf)
            np.maximum.at(seg_max, seg, row_max)
            ok &= row_max >= seg_max[seg] * (1 - _REL_EPS)
        return np.flatnonzero(ok)

    for _ in range(max_rounds):
        active = pick()
        if active.size == 0:
            break
        a_n = active.size
        ar = np.arange(a_n)
        # One evaluation per round: the heaviest pack against every pack (column j of
        # the first block is partner j), then the disjoint pairs i-th heaviest with i-th
        # lightest.
        order = np.argsort(st.loads[active], axis=1)
        h = order[:, -1]
        heavy = np.concatenate([np.repeat(h[:, None], num_packs, axis=1), order[:, ::-1][:, :half]], axis=1)
        light = np.concatenate([np.broadcast_to(others, (a_n, num_packs)), order[:, :half]], axis=1)
        val, ai, bi = _best_pair_swaps(st, active, heavy, light)
        val[ar, h] = np.inf                                  # h against itself
        g = val[:, :num_packs].argmin(axis=1)
        ok = np.isfinite(val[ar, g])
        # Apply the best swap of the heaviest pack, then every paired swap touching
        # neither of its two packs (they were evaluated on the loads before it).
        if ok.any():
            st.swap(active[ok], h[ok], ai[ar, g][ok], g[ok], bi[ar, g][ok])
        pv = val[:, num_packs:]
        ph = heavy[:, num_packs:]
        pl = light[:, num_packs:]
        touched = ok[:, None] & ((ph == h[:, None]) | (ph == g[:, None]) | (pl == h[:, None]) | (pl == g[:, None]))
        pok = np.isfinite(pv) & ~touched
        if pok.any():
            r = np.broadcast_to(active[:, None], pok.shape)[pok]
            st.swap(r, ph[pok], ai[:, num_packs:][pok], pl[pok], bi[:, num_packs:][pok])
        # A segment whose heaviest row is stuck cannot get better.
        frozen[seg[active[~ok]]] = True


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
    if k < 2 or num_packs < 2 or rows == 0:
        return layout.copy()
    st = _Layout(values, labels, layout)
    _separate(st, np.flatnonzero(st.has_duplicates()), max_rounds)
    return st.layout


def _separate(
    st: _Layout, active: np.ndarray, max_rounds: int, cap: np.ndarray | None = None
) -> None:
    """Separate duplicates in place; ``cap`` (``[rows]``) is the load no pack may
    exceed (default: the row's current maximum)."""
    num_packs, k = st.layout.shape[1:]
    for _ in range(max_rounds):
        if active.size == 0:
            break
        a_n = active.size
        ar = np.arange(a_n)
        lab = st.lab[active]                                        # [a, P, k]
        v = st.v[active]
        lo = st.loads[active]
        row_cap = lo.max(axis=1) if cap is None else np.maximum(cap[active], lo.max(axis=1))
        # First slot whose label occurs more than once on its pack.
        packs = np.arange(num_packs)[None, :, None]
        mult = st.occupancy(active[:, None, None], packs, lab) > 1  # [a, P, k]
        first = mult.reshape(a_n, -1).argmax(axis=1)
        p, s = first // k, first % k
        la = lab[ar, p, s]
        va = v[ar, p, s]
        # Partner b at (g, t): g != p, b's label not on p, a's label not on g.
        d = va[:, None, None] - v                                   # load leaving p
        new_p = lo[ar, p][:, None, None] - d
        new_g = lo[:, :, None] + d
        la_on_g = st.occupancy(active[:, None], np.arange(num_packs)[None, :], la[:, None]) > 0  # [a, P]
        lb_on_p = st.occupancy(active[:, None, None], p[:, None, None], lab) > 0             # [a, P, k]
        ok = (
            (np.arange(num_packs)[None, :, None] != p[:, None, None])
            & ~la_on_g[:, :, None]
            & ~lb_on_p
            & (new_p <= row_cap[:, None, None])
            & (new_g <= row_cap[:, None, None])
        )
        cost = np.where(ok, np.abs(d), np.inf).reshape(a_n, -1)
        best = cost.argmin(axis=1)
        feasible = np.isfinite(cost[ar, best])
        if not feasible.any():
            break
        sel = ar[feasible]
        st.swap(active[sel], p[sel], s[sel], best[sel] // k, best[sel] % k)
        active = active[sel][st.has_duplicates(active[sel])]


def _duplicate_rows(labels: np.ndarray, layout: np.ndarray) -> np.ndarray:
    """Rows of a layout where some pack holds two items of one label."""
    rows = layout.shape[0]
    lab = np.take_along_axis(labels, layout.reshape(rows, -1), axis=1).reshape(layout.shape)
    lab.sort(axis=-1)
    return np.flatnonzero((lab[..., 1:] == lab[..., :-1]).any(axis=(1, 2)))


def pack_items(
    values: np.ndarray,
    labels: np.ndarray,
    num_packs: int,
    target: np.ndarray | None = None,
    refine_rounds: int = 64,
    segment_size: int = 1,
) -> np.ndarray:
    """Full packing pipeline: snake seed, label-aware largest differencing where the
    snake misses the target, duplicate separation, swap refinement.

    Args:
        values: ``[rows, n]`` item loads (float).
        labels: ``[rows, n]`` int item labels, ``>= 0``; items sharing a label are
            replicas of one expert and are kept on different packs where that costs
            nothing.
        num_packs: ``P``; ``n`` must be a multiple of it.
        target: optional ``[rows]`` lower bounds; refinement of a row stops at its bound.
        refine_rounds: cap on refinement rounds (0 disables refinement).
        segment_size: consecutive rows form segments of this size whose objective is the
            heaviest pack over the whole segment (the nodes of one layer); only rows
            attaining their segment's maximum are refined.  ``rows`` must be a multiple.

    Returns:
        ``[rows, P, k]`` int64 layout of item indices.
    """
    rows, n, k = _check(values, num_packs)
    if segment_size < 1 or rows % segment_size:
        raise ValueError(f"rows={rows} is not a multiple of segment_size={segment_size}")
    if num_packs == 1 or k <= 1 or rows == 0:
        # One pack, or one item per pack: every layout is equally balanced.
        return np.broadcast_to(np.arange(n), (rows, n)).reshape(rows, num_packs, k).copy()
    # Seeds cascade: the snake layout for every row (it costs one sort), then largest
    # differencing, label-aware, for the rows still above their target.  Rows at or
    # below their target are done: no plan of their segment can do better.
    order = _descending(values)
    layout = snake_layout(values, num_packs, order)
    best_max = pack_loads(values, layout).max(axis=1)
    todo = np.arange(rows)
    if target is not None:
        todo = todo[best_max > target * (1 + _REL_EPS)]
    if todo.size:
        kk = kk_layout(values[todo], num_packs, order[todo], labels[todo])
        kk_max = pack_loads(values[todo], kk).max(axis=1)
        better = kk_max <= best_max[todo]
        layout[todo[better]] = kk[better]
        best_max[todo[better]] = kk_max[better]

    # Separate replicas of one expert sharing a GPU, letting any pack go up to the
    # segment's current maximum (the objective), then refine without creating new ones.
    dup = _duplicate_rows(labels, layout)
    if dup.size:
        seg_cap = np.repeat(best_max.reshape(-1, segment_size).max(axis=1), segment_size)
        sub = _Layout(values[dup], labels[dup], layout[dup])
        _separate(sub, np.arange(dup.size), 64, cap=seg_cap[dup])
        layout[dup] = sub.layout
        best_max[dup] = sub.loads.max(axis=1)
    if target is not None:
        todo = todo[best_max[todo] > target[todo] * (1 + _REL_EPS)]
    if refine_rounds > 0 and todo.size:
        st = _Layout(values[todo], labels[todo], layout[todo])
        seg = None if segment_size == 1 else todo // segment_size
        _refine(st, None if target is None else target[todo], refine_rounds, seg)
        layout[todo] = st.layout
    return layout
