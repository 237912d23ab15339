"""Certified lower bounds on the busiest GPU of each layer.

A bound here holds for *every* plan obeying the policy, with replica counts and (under
the hierarchical policy) the group-to-node assignment free.  Bounds that hold only for
fixed counts or a fixed group placement are conditional and are never mixed in.

Components, each ``[L]`` float64 in the units of ``weight``:

* ``average``: ``sum_e w / G``; no ceiling, since a replica carries the fraction ``w / c``.
* ``replica``: the largest per-replica load under the counts that minimise it (some GPU
  holds that replica).
* ``cardinality``: without redundancy (``R == E``) every GPU holds exactly ``k`` whole
  experts; among the ``j G + 1`` heaviest, some GPU holds ``j + 1``, plus at least the
  ``k - j - 1`` lightest experts.
* ``node`` (hierarchical only): the heaviest node over the best group-to-node assignment
  (exact when enumerable, a relaxation otherwise) spread over the node's GPUs.
* ``node_replica`` (hierarchical only): a node holds exactly ``R / N`` replicas of its
  own experts, so a node's per-replica load cannot go below the best its ``R / N`` slots
  allow; where a node has no spare slot (``R / N`` equals its experts), the pigeonhole
  (cardinality) bound of the node's content over its GPUs instead (per-node cardinality).  Each possible node content (a set of ``num_groups / N`` groups) is scored by
  the larger of that and its load over its GPUs; the bound is the best assignment's
  worst node (exact min-max when the assignments can be enumerated; otherwise every
  group must share a node with some set of partners, and the best such set bounds it).

Every component is computed in float64 and then lowered by a few ulps of its summation
error, so rounding never works in the bound's favour.

Integer loads without redundancy (``R == E``, so every count is 1, and every load an
integer-valued float64): every GPU load is then an exact sum of integers, an integer,
so each component is raised to its ceiling (``ceil`` of a value at or below a bound is
at or below the integer optimum).  On the no-redundancy preset this alone certifies
what the complete CP-SAT models used to prove on almost every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from functools import lru_cache
from itertools import combinations
from math import comb

from .heuristics import ENUMERATION_LIMIT, equal_partitions, node_load_lower_bound, num_partitions
from .heuristics.compile import kernel, warmer, writable
from .heuristics.grouping import _group_row, _pair_row, group_loads, pairwise_sum, pairwise_total

__all__ = ["Bounds", "lower_bounds", "min_max_replica_load", "partition_cardinality_bound", "node_replica_bound"]

# Most node contents (sets of groups) scored for the node_replica bound.
SUBSET_LIMIT = 4096


@dataclass(frozen=True)
class Bounds:
    """Per-layer lower bounds.

    Attributes:
        lower_bound: ``[L]`` the certified bound (max of the components).
        components: name -> ``[L]`` component values.
        node_exact: the node component is the exact optimum of the group step.
        global_bound: ``[L]`` the same bound for the global policy (what the
            hierarchical policy gives up is visible as ``lower_bound / global_bound``).
    """

    lower_bound: np.ndarray
    components: dict[str, np.ndarray]
    node_exact: bool
    global_bound: np.ndarray


def partition_cardinality_bound(items: np.ndarray, num_bins: int) -> np.ndarray:
    """Lower bound on the heaviest bin when ``[L, n]`` items go ``n / num_bins`` per bin:
    the best of the pigeonhole bounds (see module docs).  ``n`` must be a multiple."""
    s = -np.sort(-np.asarray(items, dtype=np.float64), axis=1)          # descending
    L, n = s.shape
    m = n // num_bins
    best = np.zeros(L)
    for j in range(m):
        top = j * num_bins + 1
        if top > n:
            break
        heavy = s[:, top - (j + 1) : top].sum(axis=1)
        light = s[:, n - (m - j - 1) :].sum(axis=1) if m - j - 1 > 0 else 0.0
        best = np.maximum(best, heavy + light)
    return best


def min_max_replica_load(weight: np.ndarray, num_replicas: int) -> np.ndarray:
    """Smallest achievable largest per-replica load of each row: ``[rows]`` float64, the
    minimum over integer counts ``c >= 1`` summing to ``num_replicas`` of
    ``max_e w_e / c_e``, as the float64 quotient ``w_e / c_e`` of the optimal counts.

    Derived here on its own, not from the heuristics' replica-count rule (a test checks
    that the two agree), so that a change to the heuristic cannot move a certificate.
    The value is the ``k``-th largest, ``k = num_replicas - E + 1``, of the shares
    ``{w_e / j : j >= 1}``: giving ``c_e`` replicas to expert ``e`` covers its ``c_e - 1``
    largest shares, and the best counts cover the ``k - 1`` largest of all, leaving the
    ``k``-th as the largest per-replica load.  Float64 division rounds monotonically, so
    the ``k``-th largest of the float shares is the float of the exact optimum.

    Args:
        weight: ``[rows, E]`` non-negative finite loads.
        num_replicas: ``R >= E``.
    """
    return _replica_and_sums(weight, num_replicas, False)[0]


def _replica_and_sums(weight: np.ndarray, num_replicas: int, sums: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``(min_max_replica_load(weight, num_replicas), row sums or None)``: with ``sums``
    the rows' sums too, as numpy's ``sum(axis=1)`` gives them, taken in the same kernel
    pass where there is one (``None`` where there is not)."""
    w = np.asarray(weight, dtype=np.float64)
    rows, E = w.shape
    k = int(num_replicas) - E + 1
    if k <= 1 or E == 0 or rows == 0:
        return (w.max(axis=1) if E else np.zeros(rows)), None
    out = np.empty(rows)
    total = np.empty(rows if sums else 0)
    if _kth_shares(writable(np.ascontiguousarray(w)), k, out, total):     # rows without a positive load
        dead = np.isnan(out)
        out[dead] = w[dead].max(axis=1)
    return out, (total if sums else None)


@kernel
def _sink(val, who, n, i):
    """Restore the max-heap order of ``val[:n]`` (with ``who`` alongside) below ``i``,
    bottom-up (Floyd): the hole left by ``val[i]`` moves down along the larger children
    to the bottom of the heap (the larger child picked without a branch), then the
    value climbs back to its place.  Most values belong near the bottom, so this costs
    one climb or two rather than a mispredicted branch per level; the heap holds the
    same values either way."""
    x, wx = val[i], who[i]
    top = i
    c = 2 * i + 1
    while c + 1 < n:
        c += val[c + 1] > val[c]
        val[i] = val[c]
        who[i] = who[c]
        i = c
        c = 2 * i + 1
    if c < n:                                         # a last child without a sibling
        val[i] = val[c]
        who[i] = who[c]
        i = c
    while i > top:
        p = (i - 1) >> 1
        if val[p] >= x:
            break
        val[i] = val[p]
        who[i] = who[p]
        i = p
    val[i] = x
    who[i] = wx


@kernel
def _taken_above(w, v):
    """How many shares ``w / j`` (``j >= 1``, float64 quotients) of one load ``w`` are
    ``>= v`` (positive): ``floor(w / v)`` is at most one off (far below ``2**52``), so one
    exact comparison each way settles it."""
    j = np.floor(w / v)
    if w / (j + 1) >= v:
        j += 1
    if j >= 1 and w / max(j, 1.0) < v:
        j -= 1
    return int(j)


@kernel
def _kth_shares(w, k, out, sums):
    """``out[r]``: the ``k``-th largest share ``w_e / j`` (``j >= 1``, the float64
    quotient) of each row of ``w`` (``[rows, E]``, ``k >= 1``): :func:`_kth_by_list`
    where ``k >= E / 16``, else (a few heap steps, a list of about ``E / 2`` shares) and
    for a row whose list would not fit (none, by the count in :func:`_kth_by_list`),
    :func:`_kth_by_heap`.  Both give the same value.  A row without a positive load gets
    NaN (its answer is its largest load, which the caller takes); returns how many.
    Where ``sums`` is not empty, ``sums[r]`` is the row's sum with numpy's bits
    (:func:`~eplb_opt.heuristics.grouping.pairwise_total`)."""
    rows, E = w.shape
    val = np.empty(E)
    who = np.empty(E, dtype=np.int64)
    nxt = np.empty(E, dtype=np.int64)
    listing = 16 * k >= E
    listed = np.empty(k + E + 64 if listing else 0)
    spare = np.empty(listed.size)
    buckets = np.empty(_BUCKETS, dtype=np.int64)
    dead = 0
    stack = np.empty(4 * 64)
    for r in range(rows):
        x = w[r]
        if sums.size:
            sums[r] = 0.0 + pairwise_total(x, 0, E, stack)
        live = False
        for e in range(E):
            live |= x[e] > 0
        if not live:
            out[r] = np.nan
            dead += 1
            continue
        out[r] = _kth_row(x, k, listing, listed, spare, buckets, val, who, nxt)
    return dead


@kernel
def _kth_row(x, k, listing, listed, spare, buckets, val, who, nxt):
    """The ``k``-th largest share of one row ``x`` with a positive load
    (:func:`_kth_shares`' choice between the list and the heap; its work arrays)."""
    ok, v = _kth_by_list(x, k, listed, spare, buckets) if listing else (False, 0.0)
    return v if ok else _kth_by_heap(x, k, val, who, nxt)


@kernel
def _kth_by_list(x, k, listed, spare, buckets):
    """``(True, the k-th largest share of x)``, or ``(False, 0.0)`` where the shares
    listed do not fit ``listed``: every share at or above ``lo`` is listed
    (:func:`_shares_above`) and the ``k``-th largest of them selected
    (:func:`_select_by_bits`; ``spare``, as long as ``listed``, and ``buckets`` are its
    scratch).

    ``lo`` is the average ``S / (k + E - 1)`` lowered by a margin far above the
    rounding of the sum ``S``.  No count vector summing to ``k + E - 1`` brings every
    per-replica load below that average, so the answer is above ``lo`` and every share
    at or above the answer is listed.  The shares listed sum to at most ``S``, so there
    are at most about ``(k + E - 1) (1 + 1e-6)`` of them.  ``S`` is summed in four
    running sums (no chain of ``E`` dependent additions): any order errs by at most
    ``E`` ulps of ``S``, far inside the margin."""
    E = x.size
    s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
    e = 0
    while e + 4 <= E:
        s0 += x[e]
        s1 += x[e + 1]
        s2 += x[e + 2]
        s3 += x[e + 3]
        e += 4
    while e < E:
        s0 += x[e]
        e += 1
    total = (s0 + s1) + (s2 + s3)
    n = _shares_above(x, total / (k + E - 1) * (1 - 1e-6), listed)
    if n < k:
        return False, 0.0
    return True, _select_by_bits(listed, n, k, spare, buckets)


@kernel
def _kth_by_heap(x, k, val, who, nxt):
    """The ``k``-th largest share of ``x`` (``[E]``; ``val``, ``who``, ``nxt``: ``[E]``
    work): the shares are taken largest first from a max-heap holding each expert's
    next share (its next one, ``x_e / (j + 1)``, is never larger), so the ``k``-th
    taken is the ``k``-th largest of the multiset, whatever order equal shares come in.

    With many spares (``k > E / 2``) the heap starts past the shares at or above ``hi =
    S / k`` (raised by a margin far above float64 rounding): fewer than ``k`` of them
    exist (their sum would pass ``S``) and every one is larger than every other share,
    so they are the largest ones and are counted, not taken one by one."""
    E = x.size
    left = k - 1                                      # shares to take before the answer
    if k > E // 2:
        total = 0.0
        for e in range(E):
            total += x[e]
        hi = total / k * (1 + 1e-9)
        for e in range(E):
            nxt[e] = _taken_above(x[e], hi) + 1
            left -= nxt[e] - 1
    else:
        nxt[:] = 1
    for e in range(E):
        val[e] = x[e] / nxt[e]
        who[e] = e
        nxt[e] += 1
    for i in range(E // 2 - 1, -1, -1):
        _sink(val, who, E, i)
    for _ in range(left):
        e = who[0]
        val[0] = x[e] / nxt[e]
        nxt[e] += 1
        _sink(val, who, E, 0)
    return val[0]


@kernel
def _shares_above(x, lo, listed):
    """Write every share ``x_e / j`` (``j >= 1``) at or above ``lo > 0`` into ``listed``
    (in no particular order) and return how many, or -1 when they do not fit.

    The first shares (``x_e`` itself) are gathered in one pass without a branch (each
    written, and kept by counting it only when at or above ``lo``); then the experts
    with a second share (``x_e / 2 >= lo``, that is ``x_e >= 2 lo``: halving is exact
    above the subnormals) add the rest of theirs, a few experts and a branch that seldom
    turns.  Near the subnormals (``lo < 1e-300``), or where ``listed`` is too short to
    gather into, every expert's shares are listed in turn."""
    E = x.size
    if listed.size < E + 1 or lo < 1e-300:      # the gathering writes one past them
        n = 0
        for e in range(E):
            n = _shares_from(x[e], 1.0, lo, listed, n)
            if n < 0:
                return -1
        return n
    n = 0
    for e in range(E):
        v = x[e]
        listed[n] = v
        n += v >= lo
    twice = 2.0 * lo
    for e in range(E):
        if x[e] >= twice:
            n = _shares_from(x[e], 2.0, lo, listed, n)
            if n < 0:
                return -1
    return n


@kernel
def _shares_from(v, j, lo, listed, n):
    """Append the shares ``v / j``, ``v / (j + 1)``, ... at or above ``lo`` to ``listed``
    from position ``n``; returns the new count, or -1 when they do not fit.  A load's
    shares only fall as ``j`` grows (float64 division rounds monotonically), so its
    first one below ``lo`` ends the list (``v / 1`` is ``v`` bit for bit)."""
    s = v / j
    while s >= lo:
        if n == listed.size:
            return -1
        listed[n] = s
        n += 1
        j += 1.0
        s = v / j
    return n


# Buckets of :func:`_select_by_bits` (one pass of counts over the shares listed).
_BUCKETS = 128

# Candidates :func:`_select_by_bits` ranks against one another; more go to :func:`_select`.
_RANKED = 32


@kernel
def _select_by_bits(a, n, k, spare, buckets):
    """The ``k``-th largest of ``a[:n]`` (``1 <= k <= n``; positive finite values), its
    bits the same as :func:`_select`'s, with few data-dependent branches: the bits of a
    positive float64, read as an int64, rise with its value, so the values fall into
    ``_BUCKETS`` buckets of consecutive bit patterns (a higher bucket holds only larger
    values); the buckets are counted, the one holding the ``k``-th largest found from
    the top, its values gathered into ``spare`` and the one sought among them picked by
    counting, for each, the values above it and at or above it (:func:`_select` on the
    bucket where it holds more than ``_RANKED``)."""
    bits = a.view(np.int64)
    low, high = bits[0], bits[0]
    for i in range(1, n):
        low = min(low, bits[i])
        high = max(high, bits[i])
    shift = 0
    while (high - low) >> shift >= buckets.size:
        shift += 1
    buckets[:] = 0
    for i in range(n):
        buckets[(bits[i] - low) >> shift] += 1
    top = (high - low) >> shift                 # the bucket holding the k-th largest
    above = 0
    while above + buckets[top] < k:
        above += buckets[top]
        top -= 1
    c = 0
    for i in range(n):
        spare[c] = a[i]
        c += (bits[i] - low) >> shift == top
    need = k - above                            # its place among the bucket's values
    if c > _RANKED:
        return _select(spare, c, need)
    found = spare[0]
    for i in range(c):
        x = spare[i]
        over, least = 0, 0
        for j in range(c):
            over += spare[j] > x
            least += spare[j] >= x
        found = x if over < need <= least else found
    return found


@kernel
def _select(a, n, k):
    """The ``k``-th largest of ``a[:n]`` (``1 <= k <= n``; ``a`` is reordered): Hoare's
    FIND (Wirth's version), in decreasing order.  Each pass partitions ``a[lo..hi]``
    around the value at the sought position into a part at least as large and a part at
    most as large, and keeps the part holding the position."""
    t = k - 1
    lo, hi = 0, n - 1
    while lo < hi:
        x = a[t]
        i, j = lo, hi
        while i <= j:
            while a[i] > x:
                i += 1
            while x > a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if j < t:
            lo = i
        if t < i:
            hi = j
    return a[t]


@warmer
def _warm() -> None:
    """Compile :func:`_kth_shares`, :func:`_content_scores`, :func:`_best_assignment`
    and :func:`_node_parts` with the argument types real calls use."""
    min_max_replica_load(np.array([[3.0, 1.0, 0.0]]), 5)
    w = np.array([[3.0, 1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    node_replica_bound(w, 6, 4, 2, 2, floor=np.array([1.0, 1.0]))
    _node_fused(w, 8, 4, 2, 2)


def node_replica_bound(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    floor: np.ndarray | None = None,
    group_load: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """The ``node_replica`` component (see module docs): ``([L] bound, exact)``.

    ``exact`` means the min-max over assignments was taken exactly (the score of each
    node content is itself a relaxation of that node's packing).

    ``floor`` (``[L]``, optional) is a bound already known (the ``node`` component):
    the per-replica part of a node content is computed only where its spare slots cannot
    bring every expert's per-replica load down to ``floor`` (elsewhere it cannot lift
    the content's score above ``floor``); the result is then valid once combined with
    ``floor`` by ``max``.  ``group_load`` (``[L, num_groups]``, optional) is
    ``weight``'s group loads as ``weight.reshape(L, num_groups, -1).sum(axis=2)`` gives
    them, when the caller has them.
    """
    w = np.asarray(weight, dtype=np.float64)
    L, E = w.shape
    gs, m = E // num_groups, num_groups // num_nodes
    rn, gpn = num_replicas // num_nodes, num_gpus // num_nodes
    if group_load is None:
        group_load = w.reshape(L, num_groups, gs).sum(axis=2)
    if (floor is not None and rn != m * gs and m <= 128 and comb(num_groups, m) <= SUBSET_LIMIT
            and (floor > 0).all() and num_partitions(num_groups, num_nodes) <= ENUMERATION_LIMIT):
        return _node_replica_enumerated(w, rn, num_groups, num_nodes, gpn, floor, group_load), True
    # Spare replicas a group's experts need to get every per-replica load down to
    # `floor`; a node content whose groups need no more spares than the node has cannot
    # have a per-replica optimum above `floor`, so it is skipped.
    if floor is not None and (floor > 0).all():
        need = np.maximum(np.ceil(w / floor[:, None]) - 1, 0).reshape(L, num_groups, gs).sum(axis=2)
    else:
        need = np.full((L, num_groups), np.inf)
    if comb(num_groups, m) > SUBSET_LIMIT:
        # Each group alone, with every spare slot of its node.
        t = np.zeros((L, num_groups))
        li, gi = np.nonzero(need > rn - E // num_nodes)
        if li.size:
            t[li, gi] = min_max_replica_load(w.reshape(L, num_groups, gs)[li, gi], gs + rn - E // num_nodes)
        return np.maximum(t, group_load / gpn).max(axis=1), False
    subsets, experts = _contents(num_groups, m, gs)                                # [C, m], [C, m*gs]
    t = np.zeros((L, len(subsets)))
    if rn == m * gs:
        # No spare slot on a node: every expert of a content sits whole on one of its
        # GPUs, exactly k per GPU, so the pigeonhole bound holds per content (the
        # per-node cardinality bound; it includes the heaviest expert).
        contents = w[:, experts].reshape(L * len(subsets), m * gs)
        t = partition_cardinality_bound(contents, gpn).reshape(L, len(subsets))
    else:
        li, ci = np.nonzero(need[:, subsets].sum(axis=2) > rn - m * gs)
        if li.size:
            t[li, ci] = min_max_replica_load(w[li[:, None], experts[ci]], rn)
    score = np.maximum(t, group_load[:, subsets].sum(axis=2) / gpn)                  # [L, C]
    if num_partitions(num_groups, num_nodes) <= ENUMERATION_LIMIT:
        return score[:, _partition_blocks(num_groups, num_nodes)].max(axis=2).min(axis=1), True
    # Every group sits in some node content: the best content containing it bounds it.
    member = (subsets[:, :, None] == np.arange(num_groups)).any(axis=1)               # [C, Gr]
    per_group = np.where(member[None, :, :], score[:, :, None], np.inf).min(axis=1)   # [L, Gr]
    return per_group.max(axis=1), False


def _node_replica_enumerated(w: np.ndarray, rn: int, num_groups: int, num_nodes: int, gpn: int, floor: np.ndarray,
                             group_load: np.ndarray) -> np.ndarray:
    """:func:`node_replica_bound`'s common case (a ``floor`` above 0, spare slots on a
    node, contents and assignments few enough to enumerate) with its loops compiled
    (:func:`_content_scores`, :func:`_best_assignment`): the same arithmetic, so the same
    bits."""
    L, E = w.shape
    m = num_groups // num_nodes
    subsets, experts = _contents(num_groups, m, E // num_groups)
    over = np.empty((L, len(subsets)), dtype=np.bool_)
    score = np.empty((L, len(subsets)))
    f64 = lambda a: writable(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731 (the kernels' array type)
    _content_scores(f64(w), f64(floor), f64(group_load), subsets, rn - m * (E // num_groups), gpn, over, score)
    li, ci = np.nonzero(over)
    if li.size:
        t = np.zeros(score.shape)
        t[li, ci] = min_max_replica_load(w[li[:, None], experts[ci]], rn)
        score = np.maximum(t, score)
    out = np.empty(L)
    _best_assignment(score, _partition_blocks(num_groups, num_nodes), out)
    return out


@kernel
def _content_scores(w, floor, group_load, subsets, spare, gpn, over, score):
    """Per layer ``l`` and node content ``c`` (``subsets [C, m]``, its groups):
    ``over[l, c]``, whether its experts need more than ``spare`` spare replicas to bring
    every per-replica load down to ``floor[l]`` (``max(ceil(w / floor) - 1, 0)`` each;
    whole numbers, so any order of the sums gives the same test), and ``score[l, c]``,
    its groups' loads (``group_load [L, groups]``) summed as numpy sums a gathered row
    (:func:`~eplb_opt.heuristics.grouping.pairwise_sum`) over ``gpn`` GPUs.

    An expert at or below ``floor[l]`` needs no spare (``w / f <= f / f = 1``: division
    rounds monotonically), so only the heavier ones are divided: most experts of a layer
    sit below one GPU's share, and each division held a dependent chain."""
    L = w.shape[0]
    need = np.empty(group_load.shape[1])
    buf = np.empty(subsets.shape[1])
    for l in range(L):
        _content_row(w[l], floor[l], group_load[l], subsets, spare, gpn, need, buf, over[l], score[l])


@kernel
def _content_row(w_row, f, gl_row, subsets, spare, gpn, need, buf, over_row, score_row):
    """:func:`_content_scores` on one layer (loads ``w_row [E]``, floor ``f``, group
    loads ``gl_row``; ``need`` and ``buf`` are work arrays)."""
    num_groups = gl_row.shape[0]
    gs = w_row.shape[0] // num_groups
    C, m = subsets.shape
    for g in range(num_groups):
        s = 0.0
        for x in range(g * gs, g * gs + gs):
            if w_row[x] > f:
                s += max(np.ceil(w_row[x] / f) - 1.0, 0.0)
        need[g] = s
    for c in range(C):
        s = 0.0
        for j in range(m):
            s += need[subsets[c, j]]
            buf[j] = gl_row[subsets[c, j]]
        over_row[c] = s > spare
        score_row[c] = (0.0 + pairwise_sum(buf, 0, m)) / gpn


@kernel
def _best_assignment(score, blocks, out):
    """``out[l]``: the smallest over assignments (``blocks [P, N]``, each node's
    content) of the largest ``score[l]`` of its contents (scores are ``>= 0``, none
    ``-0.0``: maxima and minima pick equal bits whatever the order)."""
    for l in range(score.shape[0]):
        out[l] = _assignment_row(score[l], blocks)


@kernel
def _assignment_row(score_row, blocks):
    """:func:`_best_assignment` of one layer's content scores."""
    P, N = blocks.shape
    best = np.inf
    for p in range(P):
        top = -np.inf
        for n in range(N):
            top = max(top, score_row[blocks[p, n]])
        best = min(best, top)
    return best


def _node_fused(w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                num_gpus: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(node_per_gpu, node_replica)``, each ``[L]`` and unshaved, of the hierarchical
    policy with two groups per node (the pairing: :func:`node_load_lower_bound` is
    exact there) where :func:`node_replica_bound` enumerates
    (:func:`_node_replica_enumerated`), in one kernel pass (:func:`_node_parts`):
    ``node_load_lower_bound(group_loads(w)) / gpn`` and ``node_replica_bound(...,
    floor=that)`` with their arithmetic and their helpers, so the same bits.  ``None``
    outside that case, or where a layer's floor is not above 0 (they then run)."""
    L, E = w.shape
    gs, m = E // num_groups, num_groups // num_nodes
    rn, gpn = num_replicas // num_nodes, num_gpus // num_nodes
    if (m != 2 or gs > 128 or rn == m * gs or comb(num_groups, m) > SUBSET_LIMIT
            or num_partitions(num_groups, num_nodes) > ENUMERATION_LIMIT):
        return None
    subsets, experts = _contents(num_groups, m, gs)
    node, nr = np.empty(L), np.empty(L)
    if not _node_parts(writable(np.ascontiguousarray(w)), num_nodes, gpn, rn, subsets, experts,
                       _partition_blocks(num_groups, num_nodes), node, nr):
        return None
    return node, nr


@kernel
def _node_parts(w, num_nodes, gpn, rn, subsets, experts, blocks, node, nr):
    """:func:`_node_fused`'s loop, layer by layer: the group loads (numpy's bits), the
    pairing's heaviest node over ``gpn`` (``node``), the content scores
    (:func:`_content_row`), each content needing more spares than its node has raised to
    its own per-replica optimum (:func:`_kth_row` on its loads, ``rn`` replicas), and
    the best assignment (:func:`_assignment_row`, ``nr``).  Returns False (and stops)
    at a layer whose floor is not above 0."""
    L, E = w.shape
    C, m = subsets.shape
    num_groups = num_nodes * m
    gs = E // num_groups
    gl, pair, scratch = np.empty(num_groups), np.empty(num_groups, np.int64), np.empty(num_groups)
    need, buf, over, score = np.empty(num_groups), np.empty(m), np.empty(C, np.bool_), np.empty(C)
    n = m * gs
    k = rn - n + 1
    row = np.empty(n)
    listing = 16 * k >= n
    listed = np.empty(k + n + 64 if listing else 0)
    spare, buckets = np.empty(listed.size), np.empty(_BUCKETS, np.int64)
    val, who, nxt = np.empty(n), np.empty(n, np.int64), np.empty(n, np.int64)
    for l in range(L):
        x = w[l]
        _group_row(x, gl)
        f = _pair_row(gl, num_nodes, pair, scratch) / gpn
        if not f > 0:
            return False
        node[l] = f
        _content_row(x, f, gl, subsets, rn - n, gpn, need, buf, over, score)
        for c in range(C):
            if over[c]:
                for j in range(n):
                    row[j] = x[experts[c, j]]
                score[c] = max(_kth_row(row, k, listing, listed, spare, buckets, val, who, nxt), score[c])
        nr[l] = _assignment_row(score, blocks)
    return True


@lru_cache(maxsize=16)
def _contents(num_groups: int, m: int, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """``(subsets [C, m], experts [C, m * gs])``: every set of ``m`` groups (lexicographic
    order) and its experts (read-only arrays)."""
    subsets = np.array(list(combinations(range(num_groups), m)), dtype=np.int64)
    experts = (subsets[:, :, None] * gs + np.arange(gs)).reshape(len(subsets), -1)
    subsets.setflags(write=False)
    experts.setflags(write=False)
    return subsets, experts


@lru_cache(maxsize=16)
def _partition_blocks(num_groups: int, num_nodes: int) -> np.ndarray:
    """``[P, N]``: for every equal partition, the index (in lexicographic combination
    order) of each block's group set."""
    m = num_groups // num_nodes
    index = {c: i for i, c in enumerate(combinations(range(num_groups), m))}
    parts = equal_partitions(num_groups, num_nodes)
    blocks = np.array(
        [[index[tuple(np.flatnonzero(row == b).tolist())] for b in range(num_nodes)] for row in parts],
        dtype=np.int64,
    )
    blocks.setflags(write=False)
    return blocks


_EPS = float(np.finfo(np.float64).eps)


def _shave(x: np.ndarray, terms: int) -> np.ndarray:
    """Lower ``x`` by the worst-case relative error of summing ``terms`` float64 values."""
    return x * (1.0 - (terms + 4) * _EPS)


def _largest(parts: Any) -> np.ndarray:
    """The elementwise largest of the ``[L]`` arrays ``parts`` (what ``np.max(np.stack(parts),
    axis=0)`` gives: the components are finite and ``>= 0``, so any order picks the same
    bits)."""
    parts = list(parts)
    out = parts[0]
    for x in parts[1:]:
        out = np.maximum(out, x)
    return out


def lower_bounds(
    weight: np.ndarray,
    num_replicas: int,
    num_gpus: int,
    *,
    hierarchical: bool = False,
    num_groups: int = 1,
    num_nodes: int = 1,
) -> Bounds:
    """Certified per-layer lower bounds on the max GPU load.

    Args:
        weight: ``[L, E]`` non-negative float64 loads.
        num_replicas: ``R``.
        num_gpus: ``G``.
        hierarchical: apply the hierarchical policy's node bound.
        num_groups, num_nodes: topology (used when ``hierarchical``).

    Returns:
        :class:`Bounds`.
    """
    w = np.asarray(weight, dtype=np.float64)
    L, E = w.shape
    comps: dict[str, np.ndarray] = {}
    replica, sums = _replica_and_sums(w, num_replicas, True)
    comps["average"] = _shave((w.sum(axis=1) if sums is None else sums) / num_gpus, E)
    # One division (the optimal count's quotient): exact to 0.5 ulp.
    comps["replica"] = _shave(replica, 1)
    if num_replicas == E:
        comps["cardinality"] = _shave(partition_cardinality_bound(w, num_gpus), num_replicas // num_gpus)
    global_bound = _largest(comps.values())
    node_exact = True
    fused = _node_fused(w, num_replicas, num_groups, num_nodes, num_gpus) if hierarchical and num_nodes > 1 else None
    if fused is not None:                        # two groups per node, enumerable: one kernel pass
        node_per_gpu, nr = fused
        comps["node"] = _shave(node_per_gpu, E)
        comps["node_replica"] = _shave(np.maximum(nr, node_per_gpu), E)
    elif hierarchical and num_nodes > 1:
        group_load = group_loads(w, num_groups)
        node_bound, node_exact = node_load_lower_bound(group_load, num_nodes)
        node_per_gpu = node_bound / (num_gpus // num_nodes)
        comps["node"] = _shave(node_per_gpu, E)
        nr, nr_exact = node_replica_bound(
            w, num_replicas, num_groups, num_nodes, num_gpus, floor=node_per_gpu, group_load=group_load
        )
        comps["node_replica"] = _shave(np.maximum(nr, node_per_gpu), E)
        node_exact = node_exact and nr_exact
    if num_replicas == E and E and bool((w == np.floor(w)).all()):
        comps = {name: np.ceil(v) for name, v in comps.items()}
        global_bound = np.ceil(global_bound)
    bound = _largest(comps.values())
    return Bounds(lower_bound=bound, components=comps, node_exact=node_exact, global_bound=global_bound)
