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

Loops run over slots per pack, merge steps or refinement rounds, never over rows or
items.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "gather_rows",
    "kk_layout",
    "lpt_rounds_layout",
    "pack_items",
    "pack_loads",
    "pack_sorted",
    "refine_swaps",
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
# nearly all of the gain (benchmarks/RESULTS.md).
DEFAULT_REFINE_ROUNDS = 2


def _check(values: np.ndarray, num_packs: int) -> tuple[int, int, int]:
    if values.ndim != 2:
        raise ValueError(f"item loads must be 2-D [rows, n], got shape {values.shape}")
    rows, n = values.shape
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"{n} items per row cannot fill {num_packs} packs exactly")
    return rows, n, n // num_packs


def _descending(values: np.ndarray) -> np.ndarray:
    return np.argsort(-values, axis=1)


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


# ----------------------------------------------------------------------------- seeds


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
    lay = order.reshape(rows, k, num_packs).copy()
    lay[:, 1::2, :] = lay[:, 1::2, ::-1]
    return np.ascontiguousarray(lay.transpose(0, 2, 1))


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
    rows, n = sorted_labels.shape
    P = num_packs
    k = n // P
    perm = np.broadcast_to(np.arange(n), (rows, n)).copy()
    if k < 2 or rows == 0:
        return perm, np.zeros(rows, dtype=bool)
    lab = sorted_labels.copy()
    single = np.ones((rows, n), dtype=bool)
    same = lab[:, 1:] == lab[:, :-1]
    single[:, 1:] &= ~same
    single[:, :-1] &= ~same
    for b in range(1, k):
        B = b * P
        cross = np.flatnonzero(lab[:, B - 1] == lab[:, B])
        if cross.size:
            # A window [B - P, B + 4P) usually holds the run (at most P items) and the
            # single items that move in front of it; rows where it does not retry with
            # the rest of the row.
            short = _unsplit_at(lab, single, perm, cross, B, P, min(B + 4 * P, n))
            if short.size and B + 4 * P < n:
                _unsplit_at(lab, single, perm, short, B, P, n)
    split = (lab[:, P::P] == lab[:, P - 1 : n - 1 : P]).any(axis=1)
    return perm, split


def _unsplit_at(
    lab: np.ndarray, single: np.ndarray, perm: np.ndarray, cross: np.ndarray, B: int, P: int, hi: int
) -> np.ndarray:
    """Fix the run crossing boundary ``B`` in rows ``cross`` (in place), looking for
    single items in ``[B, hi)``; returns the rows that had too few of them."""
    lo = B - P
    lc = lab[cross, lo:hi]
    run = lc[:, P - 1][:, None]
    head = lc[:, P - 1 - np.arange(P)] == run                      # B-1, B-2, ... back
    a = np.where(head.all(axis=1), P, (~head).argmax(axis=1))
    tail = lc[:, P:] == run
    t = np.where(tail.all(axis=1), hi - B, (~tail).argmax(axis=1))
    pos = np.arange(lo, hi)[None, :]
    after = single[cross, lo:hi] & (pos >= (B + t)[:, None])
    rank = np.cumsum(after, axis=1)
    taken = after & (rank <= a[:, None])
    fits = a + t <= P
    enough = taken.sum(axis=1) == a
    ok = fits & enough
    if ok.any():
        r = cross[ok]
        a_ok = a[ok][:, None]
        key = np.where(taken[ok], (B - a_ok - 1) + rank[ok] / (a_ok + 1.0), pos.astype(np.float64))
        order = np.argsort(key, axis=1) + lo
        rr = r[:, None]
        perm[r, lo:hi] = perm[rr, order]
        lab[r, lo:hi] = lab[rr, order]
        single[r, lo:hi] = single[rr, order]
    return cross[fits & ~enough]


def _rotated_snake(sorted_labels: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Snake over sorted items (each label's items adjacent) as a layout of positions.

    Where a run of one label crosses into block ``b``, block ``b`` is dealt rotated so
    its share of the run comes last: the plain snake would deal both parts of the run
    onto the same packs.  Returns ``(layout, rotated)``; ``rotated [rows]`` marks rows
    with a crossing run (only those can still hold a duplicate, where a run follows
    another split run).
    """
    rows, n = sorted_labels.shape
    P = num_packs
    k = n // P
    lay = np.broadcast_to(np.arange(n).reshape(1, k, P), (rows, k, P)).copy()
    rotated = np.zeros(rows, dtype=bool)
    if k > 1:
        lab = sorted_labels.reshape(rows, k, P)
        cont = lab[:, 1:, :] == lab[:, :-1, -1:]                      # [rows, k-1, P]
        rotated = cont[:, :, 0].any(axis=1)
        rr = np.flatnonzero(rotated)
        if rr.size:
            c = cont[rr]
            lead = np.where(c.all(axis=2), 0, (~c).argmax(axis=2))    # continuation length
            shift = np.zeros((rr.size, k, 1), dtype=np.int64)
            shift[:, 1:, 0] = lead
            lay[rr] = np.arange(0, n, P)[:, None] + (np.arange(P) + shift) % P
    lay[:, 1::2, :] = lay[:, 1::2, ::-1]
    return np.ascontiguousarray(lay.transpose(0, 2, 1)), rotated


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
    sorted_v = gather_rows(values, order).reshape(rows, k, num_packs)
    blocks = order.reshape(rows, k, num_packs)
    lay = np.empty((rows, num_packs, k), dtype=np.int64)
    loads = np.zeros((rows, num_packs))
    ar = np.arange(rows)[:, None]
    for s in range(k):
        target = np.argsort(loads, axis=1)                 # lightest pack first
        lay[ar, target, s] = blocks[:, s, :]
        loads[ar, target] += sorted_v[:, s, :]
    return lay


def _lpt_items(sorted_values: np.ndarray, num_packs: int) -> np.ndarray:
    """LPT with exact cardinality, one item at a time (every row at once): each item,
    heaviest first, goes to the lightest pack that still has a free slot.  Returns a
    layout of sorted positions.

    Costs one step per item, so it is kept for rows where the block-structured seeds
    are far off: they give every pack one item of each block of ``P``, which is poor
    when an item dominates (its pack should get only the smallest items), while this
    rule fills the other packs first and gives the dominant pack the smallest items.
    """
    rows, n = sorted_values.shape
    P = num_packs
    k = n // P
    loads = np.zeros((rows, P))
    filled = np.zeros((rows, P), dtype=np.int64)
    lay = np.empty((rows, P, k), dtype=np.int64)
    ar = np.arange(rows)
    for i in range(n):
        pick = np.where(filled < k, loads, np.inf).argmin(axis=1)
        lay[ar, pick, filled[ar, pick]] = i
        filled[ar, pick] += 1
        loads[ar, pick] += sorted_values[:, i]
    return lay


def _kk_sorted(sorted_values: np.ndarray, num_packs: int) -> np.ndarray:
    """Largest differencing over items sorted by decreasing load (blocks of ``P``
    consecutive items); returns a layout of sorted positions."""
    rows, n = sorted_values.shape
    P = num_packs
    k = n // P
    ar = np.arange(rows)
    # Partial partitions, each with its subset loads sorted ascending: [rows, k, P].
    # Block b arrives heaviest first, so its item j sits at ascending position P-1-j.
    parts = sorted_values.reshape(rows, k, P)[:, :, ::-1].copy()
    spread = parts[:, :, -1] - parts[:, :, 0]
    history = []
    for _ in range(k - 1):
        ia = spread.argmax(axis=1)
        spread[ar, ia] = -np.inf
        ib = spread.argmax(axis=1)
        raw = parts[ar, ia] + parts[ar, ib][:, ::-1]         # lightest of a + heaviest of b
        perm = np.argsort(raw, axis=1)
        merged = gather_rows(raw, perm)
        parts[ar, ia] = merged
        spread[ar, ia] = merged[:, -1] - merged[:, 0]
        spread[ar, ib] = -np.inf
        history.append((ia, ib, perm))
    # Undo the merges to learn, for every block, the final pack of each of its positions.
    final = np.empty((rows, k, P), dtype=np.int64)
    final[ar, spread.argmax(axis=1)] = np.arange(P)
    r2 = ar[:, None]
    for ia, ib, perm in reversed(history):
        after = final[ar, ia]                                # pack of merged position pos
        a_map = np.empty_like(after)
        b_map = np.empty_like(after)
        a_map[r2, perm] = after                              # a's position perm[pos]
        b_map[r2, P - 1 - perm] = after                      # b's position P-1-perm[pos]
        final[ar, ia] = a_map
        final[ar, ib] = b_map
    pack_of = final[:, :, ::-1]                              # [rows, block, j] -> pack
    # Scatter through flat slot ids (row, pack, block): cheaper than three index arrays.
    lay = np.empty(rows * P * k, dtype=np.int64)
    slot = (pack_of + (ar * P)[:, None, None]) * k + np.arange(k)[None, :, None]
    lay[slot.ravel()] = np.broadcast_to(np.arange(n).reshape(1, k, P), (rows, k, P)).ravel()
    return lay.reshape(rows, P, k)


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
        perm, _ = unsplit_runs(gather_rows(labels, order), num_packs)
        order = gather_rows(order, perm)
    else:
        order = _descending(values) if order is None else order
    pos = _kk_sorted(gather_rows(values, order), num_packs)
    return gather_rows(order, pos)


# ------------------------------------------------------------------ working state


class _Layout:
    """Mutable working copy of a layout with per-slot loads, pack loads and per-pack
    occupancy counts of the labels that have several items (for O(1) duplicate checks).

    ``lab`` holds compact ids: labels with several items in their row are numbered
    ``0..H-1``; every single-item label shares id ``H``, whose occupancy is kept at zero
    (a single item can never be a duplicate).  The table is ``rows x P x (H + 1)``.
    """

    def __init__(self, values: np.ndarray, labels: np.ndarray, layout: np.ndarray) -> None:
        rows, num_packs, k = layout.shape
        self.layout = np.array(layout, dtype=np.int64, order="C")
        self.v = np.ascontiguousarray(gather_rows(values, self.layout))
        self.loads = np.ascontiguousarray(self.v.sum(-1))
        self.num_packs = num_packs
        raw = int(labels.max()) + 1 if labels.size else 1
        cnt = np.bincount((np.arange(rows)[:, None] * raw + labels).ravel(), minlength=rows * raw)
        hot = cnt.reshape(rows, raw) > 1
        rank = np.cumsum(hot, axis=1) - 1
        cold = int(rank[:, -1].max(initial=-1)) + 1 if raw else 0
        table = np.where(hot, rank, cold)
        self.cold = cold
        self.num_labels = cold + 1
        self.lab = np.ascontiguousarray(gather_rows(table, gather_rows(labels, self.layout)))
        # Flat views of the C-contiguous slot arrays, for cheap 1-D fancy indexing.
        self._flat = tuple(a.reshape(-1) for a in (self.v, self.lab, self.layout, self.loads))
        key = (np.arange(rows * num_packs) * self.num_labels).reshape(rows, num_packs, 1) + self.lab
        self.occ_flat = np.bincount(key.ravel(), minlength=rows * num_packs * self.num_labels)
        self.occ = self.occ_flat.reshape(rows, num_packs, self.num_labels)
        self.occ[:, :, cold] = 0
        # Surplus copies per row: sum over (pack, label) of max(occ - 1, 0).
        self.surplus = np.maximum(self.occ - 1, 0).sum(axis=(1, 2))

    def has_duplicates(self, rows: np.ndarray | None = None) -> np.ndarray:
        return (self.surplus if rows is None else self.surplus[rows]) > 0

    def occupancy(self, rows: np.ndarray, packs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``occ[rows, packs, labels]`` (broadcast), without copying whole rows."""
        return self.occ_flat[(rows * self.num_packs + packs) * self.num_labels + labels]

    def swap(
        self, r: np.ndarray, p: np.ndarray, s: np.ndarray, q: np.ndarray, t: np.ndarray, distinct: bool = True
    ) -> None:
        """Swap slot (p, s) with slot (q, t) of row r, elementwise over equal-length
        arrays.  No slot may appear twice (and p != q).  With ``distinct`` no (row, pack)
        appears twice either, so plain fancy-index updates are used; otherwise (several
        swaps of one pack) load and occupancy updates accumulate with ``np.add.at``."""
        k = self.v.shape[2]
        cell_p = r * self.num_packs + p
        cell_q = r * self.num_packs + q
        fa = cell_p * k + s
        fb = cell_q * k + t
        # Through the flat views: 1-D fancy indexing is much cheaper than three index arrays.
        v, lab, lay, loads = self._flat
        va, vb = v[fa], v[fb]
        la, lb = lab[fa], lab[fb]
        v[fa], v[fb] = vb, va
        lab[fa], lab[fb] = lb, la
        lay[fa], lay[fb] = lay[fb], lay[fa]
        cp, cq = cell_p * self.num_labels, cell_q * self.num_labels
        occ = self.occ_flat
        # Surplus bookkeeping: a copy leaving a pack where it was doubled removes one
        # surplus; a copy arriving where the label already sits adds one.
        delta = (occ[cp + lb] > 0).astype(np.int64) + (occ[cq + la] > 0) - (occ[cp + la] > 1) - (occ[cq + lb] > 1)
        if distinct:
            loads[cell_p] += vb - va
            loads[cell_q] += va - vb
            occ[cp + la] -= 1
            occ[cq + lb] -= 1
            occ[cp + lb] += 1
            occ[cq + la] += 1
        else:
            np.add.at(loads, cell_p, vb - va)
            np.add.at(loads, cell_q, va - vb)
            np.add.at(occ, cp + la, -1)
            np.add.at(occ, cq + lb, -1)
            np.add.at(occ, cp + lb, 1)
            np.add.at(occ, cq + la, 1)
        occ[cp + self.cold] = 0
        occ[cq + self.cold] = 0
        if delta.any():
            np.add.at(self.surplus, r, delta)


def _best_pair_swaps(
    st: _Layout, rows: np.ndarray, heavy: np.ndarray, light: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each row and each (heavy[:, j], light[:, j]) pack pair, the best 1-for-1 swap.

    Args:
        rows: ``[a]`` row ids; heavy, light: ``[a, m]`` pack ids (heavy != light).

    Returns:
        ``(new_max [a, m], ai [a, m], bi [a, m], dev [k, k, a * m], mid [a, m])``: the best
        swap moves slot ``ai`` of the heavy pack against slot ``bi`` of the light pack and
        leaves the pair's larger load at ``new_max`` (``inf`` where no duplicate-free swap
        lowers the heavy pack).  ``dev[i, j, c]`` is ``new_max - mid`` of swapping slot
        ``i`` of pair ``c``'s heavy pack against its slot ``j`` (``inf`` where it would
        make a duplicate), for :func:`_heavy_multi_swaps`.
    """
    k = st.v.shape[2]
    a_n, m = heavy.shape
    r2 = rows[:, None]
    vh = st.v[r2, heavy]                                   # [a, m, k]
    vl = st.v[r2, light]
    lh = st.loads[r2, heavy]                               # [a, m]
    ll = st.loads[r2, light]
    half = 0.5 * (lh - ll)
    mid = lh - half
    # Swapping a (heavy) with b (light) moves d = va - vb; the pair's larger load is then
    # max(lh - d, ll + d) = mid + |d - half|.  A swap that would put a label twice on a
    # pack gets an infinite deviation through its item value (-inf for a, +inf for b).
    base_h = ((r2 * st.num_packs + heavy) * st.num_labels)[..., None]
    base_l = ((r2 * st.num_packs + light) * st.num_labels)[..., None]
    b_on_h = st.occ_flat[base_h + st.lab[r2, light]] > 0  # [a, m, k] (slot of b)
    a_on_l = st.occ_flat[base_l + st.lab[r2, heavy]] > 0  # [a, m, k] (slot of a)
    xa = np.where(a_on_l, -np.inf, vh - half[..., None])
    xb = np.where(b_on_h, np.inf, vl)
    # [k, k, a * m] with the long axis innermost: broadcasting over short inner axes is
    # several times slower in numpy.
    xa = np.ascontiguousarray(xa.reshape(-1, k).T)
    xb = np.ascontiguousarray(xb.reshape(-1, k).T)
    dev = xa[:, None, :] - xb[None, :, :]
    np.abs(dev, out=dev)
    flat = dev.reshape(k * k, -1)
    best = flat.argmin(axis=0)
    low = flat[best, np.arange(flat.shape[1])].reshape(a_n, m)
    # The swap must lower the heavy pack by more than float noise.
    new_max = np.where(low < lh * (1 - _REL_EPS) - mid, mid + low, np.inf)
    best = best.reshape(a_n, m)
    return new_max, best // k, best % k, dev, mid


# ------------------------------------------------------------------- refinement


def _heavy_multi_swaps(
    st: _Layout,
    rows: np.ndarray,
    h: np.ndarray,
    order: np.ndarray,
    best: tuple[np.ndarray, ...],
    dev: np.ndarray,
    mid: np.ndarray,
    num_pairs: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Several swaps of each row's heaviest pack ``h`` in one round.

    Candidate 0 is the best single swap (``best = (val, a slot, partner, b slot)``, each
    ``[a]``); then the i-th heaviest item of ``h`` is offered to the i-th lightest pack
    (its best partner item there, from ``dev`` / ``mid`` of :func:`_best_pair_swaps`, whose
    pair ``j`` of each row, of ``num_pairs``, is ``h`` against the j-th lightest pack).
    Candidates that reuse an item or partner of candidate 0, or bring a label with several
    items onto ``h`` twice, are dropped; the rest are accepted as a prefix while ``h``
    stays heavier than every new partner load, so the heaviest load only falls.  A pack
    far above the rest (one dominant expert) thus sheds many items per round instead of
    one.

    Returns ``(accepted, a slot, partner, b slot)``, each ``[a, 1 + q]``.
    """
    k = st.v.shape[2]
    a_n = rows.size
    q = min(k, num_pairs)
    val0, a0, p0, b0 = best
    items = np.argsort(-st.v[rows, h], axis=1)[:, :q]                 # heaviest first
    part = order[:, :q]                                               # lightest first
    jj = np.arange(q)[None, :]
    col = np.arange(a_n)[:, None] * mid.shape[1] + jj                 # pair index in dev
    cand = dev[items, :, col]                                         # [a, q, k] over b slots
    b = cand.argmin(axis=2)
    low = cand.min(axis=2)
    lh = st.loads[rows, h]
    val = np.where(low < (lh * (1 - _REL_EPS))[:, None] - mid[:, :q], low, np.inf)
    d = st.v[rows[:, None], h[:, None], items] - st.v[rows[:, None], part, b]
    # Candidate 0 first.
    d0 = st.v[rows, h, a0] - st.v[rows, p0, b0]
    A = np.concatenate([a0[:, None], items], axis=1)
    Pt = np.concatenate([p0[:, None], part], axis=1)
    B = np.concatenate([b0[:, None], b], axis=1)
    D = np.concatenate([d0[:, None], d], axis=1)
    V = np.concatenate([val0[:, None], val], axis=1)
    ok = np.isfinite(V)
    ok[:, 1:] &= (items != a0[:, None]) & (part != p0[:, None])
    lab_b = st.lab[rows[:, None], Pt, B]
    # A candidate bringing a label that an earlier kept candidate also brings is dropped
    # (only labels with several items count; the others get distinct stand-ins).
    hot = np.where((lab_b != st.cold) & ok, lab_b, -1 - np.arange(q + 1))
    ok &= ~((hot[:, :, None] == hot[:, None, :]) & np.tri(q + 1, q + 1, -1, dtype=bool)).any(axis=2)
    new_part = np.where(ok, st.loads[rows[:, None], Pt] + D, -np.inf)
    shed = np.cumsum(np.where(ok, D, 0.0), axis=1)
    load_before = st.loads[rows, h][:, None] - (shed - np.where(ok, D, 0.0))
    top = np.maximum.accumulate(new_part, axis=1)
    good = (load_before > top) | ~ok
    accepted = ok & np.logical_and.accumulate(good, axis=1)
    accepted[:, 0] = ok[:, 0]
    return accepted, A, Pt, B


def _refine(
    st: _Layout, target: np.ndarray | None, max_rounds: int, segment: np.ndarray | None = None
) -> None:
    """1-for-1 swap refinement of ``st`` in place.

    Each round, for every active row, evaluates the heaviest pack against the lightest
    packs (up to ``_PARTNERS``) and the disjoint pairs (i-th heaviest, i-th lightest, up
    to ``_PARTNERS`` of them), applies the best swap of
    the heaviest pack and every paired swap touching neither of its two packs.  A row is
    active while it is above its target and (with ``segment``, ``[rows]`` ints grouping
    rows whose objective is their joint maximum) attains its segment's maximum; a
    segment whose maximal row finds no improving swap stops.
    """
    rows, num_packs, k = st.layout.shape
    seg, nseg, starts = _row_segments(segment, rows)
    frozen = np.zeros(nseg, dtype=bool)
    # The heaviest pack tries the `near` lightest packs; the `pairs` heaviest packs
    # are paired with the `pairs` lightest.  Bounded so a round stays cheap on many GPUs.
    near = min(num_packs - 1, _PARTNERS)
    pairs = min(num_packs // 2, _PARTNERS)
    thresh = None if target is None else target * (1 + _REL_EPS)
    for _ in range(max_rounds):
        row_max = st.loads.max(axis=1)
        ok = ~frozen[seg]
        if thresh is not None:
            ok &= row_max > thresh
        if segment is not None:
            ok &= row_max >= _segment_max(row_max, seg, nseg, starts) * (1 - _REL_EPS)
        active = np.flatnonzero(ok)
        if active.size == 0:
            break
        improved = _refine_round(st, active, near, pairs)
        # A segment whose heaviest row is stuck cannot get better.
        frozen[seg[active[~improved]]] = True


def _row_segments(segment: np.ndarray | None, rows: int) -> tuple[np.ndarray, int, np.ndarray | None]:
    """``(seg [rows] segment index of every row, number of segments, starts)``; without
    ``segment`` every row is its own segment.  ``starts`` (first row of each segment)
    is given when the segment ids are sorted (the pipeline's case), else None."""
    if segment is None:
        return np.arange(rows), rows, None
    segment = np.asarray(segment)
    starts = None
    if rows and bool((segment[1:] >= segment[:-1]).all()):
        # Sorted segments: ids and starts by one pass.
        change = segment[1:] != segment[:-1]
        seg = np.concatenate(([0], np.cumsum(change)))
        starts = np.flatnonzero(np.concatenate(([True], change)))
    else:
        _, seg = np.unique(segment, return_inverse=True)
    nseg = int(seg[-1] if starts is not None else seg.max()) + 1 if rows else 0
    return seg, nseg, starts


def _segment_max(row_max: np.ndarray, seg: np.ndarray, nseg: int, starts: np.ndarray | None) -> np.ndarray:
    """``[rows]``: the largest ``row_max`` of each row's segment (see :func:`_row_segments`)."""
    if starts is not None:
        return np.maximum.reduceat(row_max, starts)[seg]
    seg_max = np.full(nseg, -np.inf)
    np.maximum.at(seg_max, seg, row_max)
    return seg_max[seg]


def _refine_round(st: _Layout, active: np.ndarray, near: int, pairs: int) -> np.ndarray:
    """One refinement round on the ``active`` rows (in place): the best swaps of each
    row's heaviest pack with its ``near`` lightest packs, then the paired swaps (i-th
    heaviest, i-th lightest, ``pairs`` of them) touching neither pack changed first.
    Returns ``[active.size]`` bool: the heaviest pack got a swap."""
    num_packs = st.layout.shape[1]
    ar = np.arange(active.size)
    order = np.argsort(st.loads[active], axis=1)
    h = order[:, -1]
    heavy = np.empty((active.size, near + pairs), dtype=np.int64)
    heavy[:, :near] = h[:, None]
    heavy[:, near:] = order[:, : num_packs - pairs - 1 : -1]
    light = np.empty_like(heavy)
    light[:, :near] = order[:, :near]
    light[:, near:] = order[:, :pairs]
    val, ai, bi, dev, mid = _best_pair_swaps(st, active, heavy, light)
    g_col = val[:, :near].argmin(axis=1)
    best = (val[ar, g_col], ai[ar, g_col], light[ar, g_col], bi[ar, g_col])
    acc, hai, hpart, hbi = _heavy_multi_swaps(st, active, h, order, best, dev, mid, near)
    ok = acc[:, 0]
    if ok.any():
        rr = np.broadcast_to(active[:, None], acc.shape)[acc]
        hh = np.broadcast_to(h[:, None], acc.shape)[acc]
        st.swap(rr, hh, hai[acc], hpart[acc], hbi[acc], distinct=False)
    if pairs:
        # Paired swaps touching no pack changed above (they were evaluated on the
        # loads before it).
        touched = np.zeros((active.size, num_packs), dtype=bool)
        touched[ar, h] = ok
        touched[np.broadcast_to(ar[:, None], acc.shape)[acc], hpart[acc]] = True
        ph, pl = heavy[:, near:], light[:, near:]
        hit = touched[ar[:, None], ph] | touched[ar[:, None], pl]
        pok = np.isfinite(val[:, near:]) & ~hit
        if pok.any():
            r = np.broadcast_to(active[:, None], pok.shape)[pok]
            st.swap(r, ph[pok], ai[:, near:][pok], pl[pok], bi[:, near:][pok])
    return ok


def refine_swaps(
    values: np.ndarray,
    labels: np.ndarray,
    layout: np.ndarray,
    target: np.ndarray | None = None,
    max_rounds: int = 64,
) -> np.ndarray:
    """1-for-1 swap refinement of each row's heaviest packs (see :func:`_refine`).

    Swaps that would put two replicas of one label on one pack are never made, so the
    heaviest pack never gets worse and no duplicate is created.

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


# ---------------------------------------------------------------- duplicates


def _separate(
    st: _Layout, active: np.ndarray, max_rounds: int, cap: np.ndarray | None = None
) -> None:
    """Separate duplicates in place; ``cap`` (``[rows]``) is the load no pack may
    exceed (default: the row's current maximum)."""
    num_packs, k = st.layout.shape[1:]
    packs = np.arange(num_packs)
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
        mult = st.occupancy(active[:, None, None], packs[None, :, None], lab) > 1
        first = mult.reshape(a_n, -1).argmax(axis=1)
        p, s = first // k, first % k
        la = lab[ar, p, s]
        va = v[ar, p, s]
        # Partner b at (g, t): g != p, b's label not on p, a's label not on g.
        d = va[:, None, None] - v                                   # load leaving p
        new_p = lo[ar, p][:, None, None] - d
        new_g = lo[:, :, None] + d
        la_on_g = st.occupancy(active[:, None], packs[None, :], la[:, None]) > 0    # [a, P]
        lb_on_p = st.occupancy(active[:, None, None], p[:, None, None], lab) > 0    # [a, P, k]
        ok = (
            (packs[None, :, None] != p[:, None, None])
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


def _has_duplicates(labels: np.ndarray, layout: np.ndarray) -> np.ndarray:
    """``[rows]`` bool: some pack of the row holds two items of one label."""
    lab = gather_rows(labels, layout)
    lab.sort(axis=-1)
    return (lab[..., 1:] == lab[..., :-1]).any(axis=(1, 2))


# ------------------------------------------------------------------- pipeline


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
            where the steps above leave one falls back to dealing positions round-robin
            (distinct packs for any run of at most ``P`` items) before refinement.
            Needs every label to have at most ``P`` items.

    Returns:
        ``[rows, P, k]`` int64 layout of positions ``0..n-1``.
    """
    rows, n, k = _check(values, num_packs)
    if segment_size < 1 or rows % segment_size:
        raise ValueError(f"rows={rows} is not a multiple of segment_size={segment_size}")
    if num_packs == 1 or k <= 1 or rows == 0:
        # One pack, or one item per pack: every layout is equally balanced.
        return np.broadcast_to(np.arange(n), (rows, n)).reshape(rows, num_packs, k).copy()

    # Seeds cascade.  Every row starts from the snake (rotated where a run crosses a
    # block, to keep an expert's replicas apart); rows at or below their target are done,
    # since no plan of their segment can do better.
    layout, best_max, check = _snake_seed(values, labels, num_packs)
    todo = np.arange(rows)
    if target is not None:
        todo = todo[best_max > target * (1 + _REL_EPS)]
    if todo.size:
        # The rest get largest differencing on an order that keeps every expert's
        # replicas inside one block of P (so they land on different packs).
        kk, kk_max, split = _kk_seed(values[todo], labels[todo], num_packs)
        better = kk_max <= best_max[todo]
        layout[todo[better]] = kk[better]
        best_max[todo[better]] = kk_max[better]
        check[todo[better]] = split[better]
    if target is not None:
        _lpt_where_far(values, labels, num_packs, target, layout, best_max, check)
    # Separate replicas of one expert sharing a GPU (possible only in the rows flagged
    # above), letting any pack go up to the segment's current maximum (the objective);
    # refinement below never creates one.
    left = _separate_seeds(values, labels, layout, best_max, check, segment_size, allow_duplicates)
    if left.size:
        todo = np.union1d(todo, left)
    if target is not None:
        todo = todo[best_max[todo] > target[todo] * (1 + _REL_EPS)]
    if refine_rounds > 0 and todo.size:
        st = _Layout(values[todo], labels[todo], layout[todo])
        seg = None if segment_size == 1 else todo // segment_size
        _refine(st, None if target is None else target[todo], refine_rounds, seg)
        layout[todo] = st.layout
    return layout


def _snake_seed(values: np.ndarray, labels: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first seed of every row of sorted items ``[rows, n]``: ``(layout [rows, P, k],
    heaviest pack [rows], check [rows] bool)``; ``check`` marks rows whose snake was
    rotated (see :func:`_rotated_snake`), the only ones that may hold a duplicate."""
    rows, n = values.shape
    layout, check = _rotated_snake(labels, num_packs)
    snake_v = values.reshape(rows, n // num_packs, num_packs).copy()
    snake_v[:, 1::2, :] = snake_v[:, 1::2, ::-1]
    best_max = snake_v.sum(axis=1).max(axis=1)
    if check.any():
        best_max[check] = pack_loads(values[check], layout[check]).max(axis=1)
    return layout, best_max, check


def _kk_seed(values: np.ndarray, labels: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Largest differencing on sorted items ``[rows, n]`` reordered so that no expert's
    run crosses a block of ``P``: ``(layout [rows, P, k], heaviest pack [rows], split
    [rows] bool: some run had to be split, so a duplicate is possible)``."""
    perm, split = unsplit_runs(labels, num_packs)
    kk = gather_rows(perm, _kk_sorted(gather_rows(values, perm), num_packs))
    return kk, pack_loads(values, kk).max(axis=1), split


def _lpt_where_far(
    values: np.ndarray, labels: np.ndarray, num_packs: int, target: np.ndarray,
    layout: np.ndarray, best_max: np.ndarray, check: np.ndarray,
) -> None:
    """Rows still far above ``target`` (``[rows]``) where one item dominates (more than
    half a pack's average load, typically without redundancy) also try item-by-item
    LPT; a strictly lighter heaviest pack replaces the row's seed (in place)."""
    dominant = values[:, 0] > values.sum(axis=1) / (2 * num_packs)
    far = np.flatnonzero(dominant & (best_max > target * (1 + _FAR)))
    if far.size:
        perm, _ = unsplit_runs(labels[far], num_packs)
        lpt = gather_rows(perm, _lpt_items(gather_rows(values[far], perm), num_packs))
        lpt_max = pack_loads(values[far], lpt).max(axis=1)
        better = lpt_max < best_max[far]
        layout[far[better]] = lpt[better]
        best_max[far[better]] = lpt_max[better]
        check[far[better]] = True


def _separate_seeds(
    values: np.ndarray, labels: np.ndarray, layout: np.ndarray, best_max: np.ndarray, check: np.ndarray,
    segment_size: int, allow_duplicates: bool,
) -> np.ndarray:
    """Separate duplicates in the ``check`` rows of the seeds (in place), any pack allowed
    up to its segment's current maximum.  Without ``allow_duplicates``, rows still
    holding one fall back to dealing positions round-robin; returns those rows
    (``[m]``, to be refined)."""
    dup = np.flatnonzero(check)
    if dup.size:
        dup = dup[_has_duplicates(labels[dup], layout[dup])]
    if dup.size == 0:
        return dup
    _, num_packs, k = layout.shape
    seg_cap = np.repeat(best_max.reshape(-1, segment_size).max(axis=1), segment_size)
    sub = _Layout(values[dup], labels[dup], layout[dup])
    _separate(sub, np.arange(dup.size), 64, cap=seg_cap[dup])
    layout[dup] = sub.layout
    best_max[dup] = sub.loads.max(axis=1)
    if allow_duplicates:
        return dup[:0]
    left = dup[sub.has_duplicates()]
    if left.size:
        layout[left] = np.arange(num_packs * k).reshape(1, k, num_packs).transpose(0, 2, 1)
        best_max[left] = pack_loads(values[left], layout[left]).max(axis=1)
    return left


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
