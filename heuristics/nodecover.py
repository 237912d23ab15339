"""Whole-node re-partition at a target: an exact-cover search over one node's GPUs.

One node holds ``m`` experts with replica counts ``c`` (summing to ``P * k``) on ``P``
GPUs of ``k`` slots; a replica of expert ``e`` carries ``w[e] / c[e]``.  For a target
``hi``, :meth:`NodeCover.cover` looks for a placement with every GPU at most ``hi``: since the
node's total ``S`` is fixed, every GPU then lies in ``[S - (P - 1) hi, hi]``, a narrow
window when ``hi`` is near the node average ``S / P``.  The ``k``-sets of distinct
experts with a sum in that window are listed (:func:`_candidates`), and a depth-first
search picks ``P`` of them covering each expert exactly ``c[e]`` times
(:func:`_dfs`: the expert with the fewest valid sets per missing replica first; the
window tightens as GPUs are filled).  Near-perfect partitions, which pair re-splits
and small CP-SAT neighbourhoods find slowly, come out in milliseconds.

The counts can be left to the search too: each expert gets a range of counts, its
items are its replicas at each count (``w[e] / c``), and the first set that uses one
of them fixes that expert's count (the slots left must still fit the counts left).
:func:`search_node` tries the plan's counts, then ranges around the fewest replicas
each expert needs at the target, then fixed count vectors (built for the target, and
one replica moved at a time), each at a ladder of targets from the aim upwards, and
keeps the best placement found.  Every search is limited by a node count (so a
deterministic budget gives the same answer every run) and, on a wall clock, by a
deadline read between searches.

Replicas of one expert always go to different GPUs, so the placements found are valid
with or without ``allow_duplicates``.
"""

from __future__ import annotations

import heapq
import time
from typing import Any, Callable

import numpy as np

from .compile import kernel, warmer

__all__ = ["NodeCover", "count_bound", "search_node"]

# Most k-sets listed for one target (a wider window is not searched).
MAX_CANDIDATES = 100_000
# Enumeration steps of one listing at most (about 10 ms; wide nodes, e.g. 64 experts
# on GPUs of 9 slots, can take minutes to list in full).
MAX_STEPS = 2_000_000
# Search nodes per target tried.
NODE_LIMIT = 20_000
# Targets tried per count vector, relative above the best conceivable value (the last
# is just below the best placement found so far).
RUNGS = (0.0, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)


@kernel
def _candidates(v: np.ndarray, owner: np.ndarray, k: int, lo: float, hi: float, out: np.ndarray,
                sums: np.ndarray) -> int:
    """The ``k``-sets of items of ``v`` (sorted descending) with distinct ``owner``
    (expert) and a sum in ``[lo, hi]``, as ascending index rows of ``out`` with their
    ``sums``; returns how many (``len(out) + 1``: more than fit, or more than
    ``MAX_STEPS`` enumeration steps; listing stopped).
    Enumerated in lexicographic order, pruned by the smallest and the largest
    completions (owners ignored there, so the pruning stays safe)."""
    m, cap = v.size, out.shape[0]
    n = steps = 0
    idx = np.zeros(k, np.int64)
    partial = np.zeros(k + 1)
    tail = np.zeros(k + 1)                      # tail[j]: sum of the j smallest items
    for j in range(1, k + 1):
        tail[j] = tail[j - 1] + v[m - j]
    depth = 0
    while depth >= 0:
        steps += 1
        if steps > MAX_STEPS:
            return cap + 1                      # too long to list: give up
        if idx[depth] > m - (k - depth):
            depth -= 1
            if depth >= 0:
                idx[depth] += 1
            continue
        clash = False
        for t in range(depth):
            if owner[idx[t]] == owner[idx[depth]]:
                clash = True
        if clash:
            idx[depth] += 1
            continue
        s = partial[depth] + v[idx[depth]]
        rest = k - depth - 1
        if s + tail[rest] > hi:                 # a later item is lighter: go on
            idx[depth] += 1
            continue
        most = s
        for t in range(rest):
            most += v[idx[depth] + 1 + t]
        if most < lo:                           # every later item is lighter: back up
            depth -= 1
            if depth >= 0:
                idx[depth] += 1
            continue
        if rest == 0:
            if s >= lo:
                if n == cap:
                    return cap + 1
                out[n, :] = idx
                sums[n] = s
                n += 1
            idx[depth] += 1
            continue
        partial[depth + 1] = s
        idx[depth + 1] = idx[depth] + 1
        depth += 1
    return n


@kernel
def _filter(cand: np.ndarray, sums: np.ndarray, lists: np.ndarray, lens: np.ndarray, level: int,
            owner: np.ndarray, mult: np.ndarray, chosen: np.ndarray, dem: np.ndarray, gpus_left: int,
            lo: float, counts: np.ndarray) -> int:
    """Keep, in ``lists[level]``, the sets with a sum at least ``lo`` whose items all
    fit: an item of expert ``e`` with count ``c`` fits where ``e``'s count is still
    open (and ``c`` GPUs are left) or chosen as ``c`` with a replica missing.
    ``counts[e]``: the kept sets holding ``e``.  Returns the pivot: the expert not yet
    complete with the fewest kept sets per missing replica (-1: all complete, -2: one
    cannot be completed)."""
    k = cand.shape[1]
    n = 0
    counts[:] = 0
    for t in range(lens[level]):
        c = lists[level, t]
        if sums[c] < lo:
            continue
        ok = True
        for j in range(k):
            i = cand[c, j]
            e = owner[i]
            if chosen[e] == 0:
                if mult[i] > gpus_left:
                    ok = False
                    break
            elif chosen[e] != mult[i] or dem[e] <= 0:
                ok = False
                break
        if ok:
            lists[level, n] = c
            n += 1
            for j in range(k):
                counts[owner[cand[c, j]]] += 1
    lens[level] = n
    best, ratio = -1, np.inf
    for e in range(dem.size):
        need = dem[e] if chosen[e] > 0 else 1
        if need > 0:
            if counts[e] < need:
                return -2
            r = counts[e] / need
            if r < ratio:
                ratio, best = r, e
    return best


@kernel
def _slots_fit(chosen: np.ndarray, dem: np.ndarray, least: np.ndarray, most: np.ndarray, slots: int) -> bool:
    """Whether the replicas still to place can fill exactly ``slots`` slots: those
    missing for the experts whose count is chosen, plus between ``least`` and ``most``
    for each expert still open."""
    lo = hi = 0
    for e in range(dem.size):
        if chosen[e] > 0:
            lo += dem[e]
            hi += dem[e]
        else:
            lo += least[e]
            hi += most[e]
    return lo <= slots <= hi


@kernel
def _dfs(cand: np.ndarray, sums: np.ndarray, n: int, owner: np.ndarray, mult: np.ndarray, least: np.ndarray,
         most: np.ndarray, P: int, total: float, hi: float, node_limit: int, choice: np.ndarray) -> tuple[bool, int]:
    """Choose ``P`` rows of ``cand[:n]`` (items ``i`` of expert ``owner[i]`` carrying
    ``w / mult[i]``; each sum at most ``hi``) so that every expert ``e`` gets one count
    ``c`` in ``[least[e], most[e]]`` and exactly ``c`` items of that count;
    ``choice[:P]`` gets them.  Returns ``(found, nodes)``; not found when the search
    is exhausted or passes ``node_limit`` nodes."""
    k = cand.shape[1]
    m = least.size
    chosen = np.zeros(m, np.int64)
    dem = np.zeros(m, np.int64)
    opened = np.zeros((P + 1, k), np.bool_)     # the choice at a level chose e's count
    lists = np.empty((P + 1, max(n, 1)), np.int64)
    lens = np.zeros(P + 1, np.int64)
    lists[0, :n] = np.arange(n)
    lens[0] = n
    pos = np.zeros(P + 1, np.int64)
    pivot = np.zeros(P + 1, np.int64)
    rem = np.zeros(P + 1)
    rem[0] = total
    counts = np.zeros(m, np.int64)
    nodes, level, fresh = 0, 0, True
    while True:
        if fresh:
            nodes += 1
            if level == P:
                return True, nodes
            if nodes > node_limit:
                return False, nodes
            pivot[level] = -2
            if _slots_fit(chosen, dem, least, most, (P - level) * k):
                lo = rem[level] - (P - level - 1) * hi - 1e-9 * abs(hi)
                pivot[level] = _filter(cand, sums, lists, lens, level, owner, mult, chosen, dem, P - level, lo,
                                       counts)
            pos[level] = 0
            fresh = False
        found = -1
        if pivot[level] >= 0:
            while pos[level] < lens[level]:
                c = lists[level, pos[level]]
                pos[level] += 1
                for j in range(k):
                    if owner[cand[c, j]] == pivot[level]:
                        found = c
                        break
                if found >= 0:
                    break
        if found >= 0:
            choice[level] = found
            for j in range(k):
                i = cand[found, j]
                e = owner[i]
                opened[level, j] = chosen[e] == 0
                if chosen[e] == 0:
                    chosen[e] = mult[i]
                    dem[e] = mult[i]
                dem[e] -= 1
            rem[level + 1] = rem[level] - sums[found]
            lens[level + 1] = lens[level]
            lists[level + 1, : lens[level]] = lists[level, : lens[level]]
            level += 1
            fresh = True
            continue
        level -= 1                                  # backtrack
        if level < 0:
            return False, nodes
        for j in range(k):
            e = owner[cand[choice[level], j]]
            dem[e] += 1
            if opened[level, j]:
                chosen[e] = 0
                dem[e] = 0


class NodeCover:
    """:meth:`cover` with its scratch, for one node shape; ``nodes`` counts the search
    nodes spent so far, ``spent()`` says when a search using it must stop."""

    def __init__(self, P: int, k: int) -> None:
        self.P, self.k, self.nodes = P, k, 0
        self.spent: Callable[[], bool] = lambda: False     # a search's stop test
        self.out = np.empty((MAX_CANDIDATES, k), np.int64)
        self.sums = np.empty(MAX_CANDIDATES)
        self.choice = np.zeros(P, np.int64)

    def cover(self, w: np.ndarray, cnt: np.ndarray, hi: float, node_limit: int = NODE_LIMIT,
              most: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None, float]:
        """A placement ``[P, k]`` (indices into ``w``) with every GPU at most ``hi`` (up
        to float rounding): with counts ``cnt``, or, given ``most``, with any counts
        ``cnt <= c <= most``.  Returns ``(placement, its counts, its heaviest GPU)``,
        or ``(None, None, inf)`` when none was found within the limits."""
        P, k = self.P, self.k
        most = cnt if most is None else np.minimum(most, P)
        if cnt.min() < 1 or (most < cnt).any() or not cnt.sum() <= P * k <= most.sum() or w.size < k:
            return None, None, np.inf
        owner = np.repeat(np.arange(w.size), most - cnt + 1)
        mult = np.concatenate([np.arange(a, b + 1) for a, b in zip(cnt, most)])
        v = w[owner] / mult
        order = np.argsort(-v, kind="stable")
        owner, mult = owner[order], mult[order]
        total = float(w.sum())
        slack = 1e-9 * abs(hi)
        n = _candidates(v[order], owner, k, total - (P - 1) * hi - slack, hi + slack, self.out, self.sums)
        if n > MAX_CANDIDATES or n == 0:
            return None, None, np.inf
        found, nodes = _dfs(self.out, self.sums, n, owner, mult, cnt, most, P, total, hi, node_limit,
                            self.choice)
        self.nodes += nodes
        if not found:
            return None, None, np.inf
        items = self.out[self.choice]
        place = owner[items]
        got = np.bincount(place.ravel(), minlength=w.size)
        return place, got, float((w[place] / got[place]).sum(axis=1).max())


def count_bound(w: np.ndarray, cnt: np.ndarray, P: int, k: int) -> float:
    """A lower bound on the heaviest GPU of any placement with counts ``cnt`` and
    distinct experts per GPU: the average, and the heaviest replica with the ``k - 1``
    lightest others (inf when an expert has more replicas than GPUs)."""
    if cnt.max() > P:
        return np.inf
    v = w / cnt
    return max(float(w.sum()) / P, float(v.max() + np.sort(v)[: k - 1].sum()))


def _seeds(w: np.ndarray, P: int, k: int, aim: float) -> list[np.ndarray]:
    """Count vectors built for the target ``aim``: each expert gets the fewest replicas
    that let one of them share a GPU with the ``k - 1`` lightest experts under ``aim``,
    and the replicas left over go one each to the heaviest experts left with a single
    replica (then, in a second vector, by the heuristic's rule: to the heaviest
    replica, one at a time).  Moving one replica at a time from the plan's counts
    reaches these slowly where several heavy experts need other counts."""
    m, total = w.size, P * k
    room = aim - np.sort(w)[: k - 1].sum()
    if room <= 0 or m > total:
        return []
    cmin = np.clip(np.ceil(w / room - 1e-12), 1, P).astype(np.int64)
    extra = total - int(cmin.sum())
    if extra < 0:
        return []
    singles = cmin.copy()
    order = np.lexsort((np.arange(m), -w))             # heaviest first, ties by index
    pool = [e for e in order if cmin[e] == 1] + [e for e in order if cmin[e] > 1]
    for i in range(extra):
        e = pool[i % len(pool)]
        if singles[e] >= P:
            return []
        singles[e] += 1
    dhondt = cmin.copy()
    for _ in range(extra):
        v = np.where(dhondt < P, w / dhondt, -1.0)
        dhondt[int(np.argmax(v))] += 1
    return [singles, dhondt]


def _neighbours(cnt: np.ndarray, P: int) -> list[np.ndarray]:
    """Count vectors with one replica moved from an expert with several to another."""
    out = []
    for d in np.flatnonzero(cnt >= 2):
        for r in range(cnt.size):
            if r != d and cnt[r] < P:
                nc = cnt.copy()
                nc[d] -= 1
                nc[r] += 1
                out.append(nc)
    return out


def _ladder(nc: NodeCover, w: np.ndarray, cnt: np.ndarray, aim: float, base: float, best: float,
            deadline: float | None, most: np.ndarray | None = None, node_limit: int = NODE_LIMIT
            ) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """:meth:`NodeCover.cover` (counts ``cnt``, or from ``cnt`` to ``most``) at rising
    targets (``aim``, then ``base`` times ``1 + RUNGS``, then just below ``best``); the
    first placement found, as ``(placement, counts, heaviest GPU)``."""
    below = best * (1 - 1e-9)
    for r in RUNGS + (np.inf,):
        if (deadline is not None and time.perf_counter() >= deadline) or nc.spent():
            break
        hi = min(below, best if not np.isfinite(r) else max(aim, base * (1 + r)))
        if hi < base * (1 - 1e-12):
            break
        place, got, top = nc.cover(w, cnt, hi, node_limit, most)
        if place is not None:
            return place, got, top
        if hi >= below:
            break
    return None, None, np.inf


def _count_ranges(w: np.ndarray, P: int, k: int, aim: float, wide: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Counts left free for :meth:`NodeCover.cover`: from the fewest that fit ``aim``
    (as in :func:`_seeds`) up to two more for the experts that need several and the
    heaviest few, one more for the next ``wide`` heaviest, none for the rest."""
    room = aim - np.sort(w)[: k - 1].sum()
    if room <= 0:
        return None
    least = np.clip(np.ceil(w / room - 1e-12), 1, P).astype(np.int64)
    rank = np.empty(w.size, np.int64)
    rank[np.lexsort((np.arange(w.size), -w))] = np.arange(w.size)
    span = np.where((least >= 2) | (rank < 4), 2, np.where(rank < 4 + wide, 1, 0))
    most = np.minimum(least + span, P)
    if not least.sum() <= P * k <= most.sum():
        return None
    return least, most


def search_node(w: np.ndarray, cnt: np.ndarray, P: int, k: int, *, aim: float, upper: float,
                deadline: float | None = None, node_budget: int | None = None, stop: Any = None
                ) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """Search one node (loads ``w``, counts ``cnt`` summing to ``P * k``) for a
    placement whose heaviest GPU is below ``upper``, stopping at ``aim`` or below.

    First the plan's counts (:func:`_ladder`), then covers that choose the counts
    themselves within :func:`_count_ranges` (narrow, then wide), then a best-first
    search over fixed count vectors: those :func:`_seeds` builds for ``aim``, then
    neighbours (one replica moved), in order of the best placement their parent
    reached and of :func:`count_bound`.  Stops at ``deadline`` (``time.perf_counter()``),
    after ``node_budget`` search nodes, or once ``stop`` (a ``threading.Event``) is set;
    the clock and ``stop`` are read between covers.

    Returns ``(counts, [P, k] placement as indices into w, heaviest GPU)`` of the best
    placement found below ``upper``, or ``(None, None, upper)``.
    """
    nc = NodeCover(P, k)
    best: list = [upper, None, None]

    def keep(place: np.ndarray | None, got: np.ndarray | None, top: float) -> bool:
        if place is not None and top < best[0] * (1 - 1e-12):
            best[:] = [top, got, place]
        return best[0] <= aim

    def spent() -> bool:
        return (deadline is not None and time.perf_counter() >= deadline) or (
            node_budget is not None and nc.nodes >= node_budget) or (stop is not None and stop.is_set())

    nc.spent = spent

    lb0 = count_bound(w, cnt, P, k)
    first = _ladder(nc, w, cnt, aim, lb0, best[0], deadline) if lb0 < best[0] else (None, None, np.inf)
    if keep(*first):
        return best[1], best[2], best[0]
    for wide in (8, 16):
        ranges = None if spent() else _count_ranges(w, P, k, aim, wide)
        if ranges is not None and keep(*_ladder(nc, w, ranges[0], aim, w.sum() / P, best[0], deadline,
                                                most=ranges[1], node_limit=4 * NODE_LIMIT)):
            return best[1], best[2], best[0]
    _count_search(nc, w, cnt, P, k, aim, first[2], best, keep, spent, deadline)
    return best[1], best[2], best[0]


def _count_search(nc: NodeCover, w: np.ndarray, cnt: np.ndarray, P: int, k: int, aim: float, top0: float,
                  best: list, keep, spent, deadline: float | None) -> None:
    """:func:`search_node`'s best-first search over fixed count vectors (``best[0]``:
    the best heaviest GPU so far; ``keep`` records a placement, ``spent`` says when to
    stop)."""
    seen = {cnt.tobytes()}
    heap = [(-1.0, count_bound(w, c, P, k), i, c) for i, c in enumerate(_seeds(w, P, k, aim))]
    heap += [(top0, count_bound(w, c, P, k), len(heap) + i, c) for i, c in enumerate(_neighbours(cnt, P))]
    heapq.heapify(heap)
    tick = len(heap)
    while heap and not spent():
        _, lb, _, c = heapq.heappop(heap)
        key = c.tobytes()
        if key in seen:
            continue
        seen.add(key)
        place, got, top = (None, None, np.inf)
        if lb < best[0] * (1 - 1e-12):
            place, got, top = _ladder(nc, w, c, aim, lb, best[0], deadline)
        if keep(place, got, top):
            return
        for n2 in _neighbours(c, P):
            if n2.tobytes() not in seen:
                heapq.heappush(heap, (top, count_bound(w, n2, P, k), tick, n2))
                tick += 1


@warmer
def _warm() -> None:
    """Compile the kernels with the argument types real calls use."""
    w = np.array([9.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    search_node(w, np.array([2, 1, 1, 1, 1, 2]), 4, 2, aim=w.sum() / 4, upper=np.inf, node_budget=1000)
