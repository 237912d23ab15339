"""The migration repair's compiled kernels (:mod:`heuristics.local`) pinned against a
plain reference on many small random layers: the candidate loads and costs of swaps and
retargets, the pick rule, the undo rules, slot keeping, and whole repairs.

The reference (``Ref`` below) is the repair as it ran in Python before the port
(``eplb_opt.migrate._Layer``, ``_pick``, ``_repair_layer``, ``_undo_moves``), written
with plain loops over every candidate; it lives here only as a test oracle.
"""

import numba
import numpy as np
import pytest

from eplb_opt.heuristics import local as K


# The plain-state entry points the tests pin: each builds what the repair loop keeps
# incrementally (slot values, move prices, moved slots) and calls the runtime scan.


@numba.njit
def move_prices(newm, cin):
    """``q [G, E]`` (``cin`` where a replica of ``e`` on ``g`` is a move, else 0) and
    whether every price passes :func:`exact_price`, element by element (the repair
    builds both in :func:`_layer_arrays` from the few distinct prices)."""
    G, E = newm.shape
    q = np.zeros((G, E))
    exact = True
    for g in range(G):
        for e in range(E):
            if newm[g, e]:
                q[g, e] = cin[g, e]
            exact = exact and K.exact_price(q[g, e])
    return q, exact


@numba.njit
def old_experts(newm):
    """``(oldE [G, E], nold [G])``: per GPU the experts it held before (``newm`` False),
    ascending."""
    G, E = newm.shape
    oldE = np.zeros((G, E), dtype=np.int64)
    nold = np.zeros(G, dtype=np.int64)
    for g in range(G):
        for e in range(E):
            if not newm[g, e]:
                oldE[g, nold[g]] = e
                nold[g] += 1
    return oldE, nold


@numba.njit
def best_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, B):
    """:func:`swap_scan` from the plain state (``newm [G, E]`` moves, ``cin [G, E]``
    their costs): the entry point the tests pin."""
    q, exact = move_prices(newm, cin)
    return K.swap_scan(S, K.slot_values(S, v), load, M, q, allowed, dup, T, eps, g, B, exact, np.empty((3, B)))


@numba.njit
def best_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g):
    """:func:`retarget_scan` from the plain state: the entry point the tests pin."""
    return retarget_beating(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g, -1, 0.0)


@numba.njit
def retarget_beating(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g, tk, tv):
    """:func:`retarget_scan` from the plain state, for retargets that beat key ``(tk, tv)``."""
    q, _ = move_prices(newm, cin)
    oldE, nold = old_experts(newm)
    pmin = np.inf
    for x in cin.ravel():
        if x > 0.0:
            pmin = min(pmin, x)
    return K.retarget_scan(S, w, v, K.next_values(w, c), c, load, M, q, allowed, dup, T, eps, g, tk, tv,
                           K.retarget_work(S.shape[0], S.shape[1], w.size), oldE, nold,
                           pmin if (cin > 0.0).all() else 0.0)


@numba.njit
def undo_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, B):
    """:func:`undo_swap_scan` from the plain state: the entry point the tests pin."""
    q, exact = move_prices(newm, cin)
    mv, nmv = K.moved_slots(S, newm)
    part = np.ones(S.shape[0], dtype=np.bool_)
    return K.undo_swap_scan(S, K.slot_values(S, v), load, M, q, mv, nmv, K.departure_bounds(S, q, exact), allowed, dup, T,
                          eps, g, B, part)


@numba.njit
def undo_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g):
    """:func:`undo_retarget_scan` from the plain state: the entry point the tests pin."""
    q, _ = move_prices(newm, cin)
    oldE, nold = old_experts(newm)
    return K.undo_retarget_scan(S, w, v, K.next_values(w, c), c, load, M, q, newm, oldE, nold, allowed, dup, T, eps, g)

# ------------------------------------------------------------------------- reference


def ref_pick(dphi, cost, ok, eps, thr):
    """The pick rule: the largest excess removed at no cost (kind 2), else, among those
    that remove at least ``thr`` (the GPU's whole excess), the most excess removed per
    unit of cost (kind 1: the cheapest), else the most excess removed per unit of cost
    (kind 0); the first in index order on ties.  ``(index, score, kind)``."""
    good = ok & (dphi > eps)
    if not good.any():
        return None
    free = good & (cost <= 0)
    if free.any():
        idx = np.unravel_index(int(np.argmax(np.where(free, dphi - 1e-9 * cost, -np.inf))), dphi.shape)
        return idx, float(dphi[idx]), 2
    whole = good & (dphi >= thr)
    kind = 1 if whole.any() else 0
    ratio = np.where(whole if kind else good, dphi / np.maximum(cost, 1e-9), -np.inf)
    idx = np.unravel_index(int(np.argmax(ratio)), dphi.shape)
    return idx, float(ratio[idx]), kind


def ref_key(kind, score, cost):
    """The key value the repair compares a swap and a retarget by (:func:`ref_pick`)."""
    return (kind, score - 1e-9 * cost if kind == 2 else score)


class Ref:
    """One layer under repair, plain loops (see module docs)."""

    def __init__(self, w, old, start, G, N, hierarchical, node_move_cost, dup):
        self.w, self.G, self.dup = np.asarray(w, float), G, dup
        self.E = self.w.size
        self.k = start.size // G
        P = G // N
        O = np.zeros((G, self.E), dtype=np.int64)
        self.M = np.zeros((G, self.E), dtype=np.int64)
        for g in range(G):
            for s in range(self.k):
                O[g, old[g * self.k + s]] += 1
                self.M[g, start[g * self.k + s]] += 1
        self.S = start.reshape(G, self.k).copy()
        self.newm = O == 0
        self.cin = np.ones((G, self.E))
        self.allowed = np.ones((G, self.E), dtype=bool)
        for g in range(G):
            node = slice((g // P) * P, (g // P + 1) * P)
            for e in range(self.E):
                self.cin[g, e] = 1.0 if O[node, e].sum() > 0 else node_move_cost
                if hierarchical:
                    self.allowed[g, e] = self.M[node, e].sum() > 0
        self.B = P if hierarchical else G
        self.c = self.M.sum(axis=0)
        self.refresh()

    def refresh(self):
        self.v = self.w / np.maximum(self.c, 1)
        self.load = np.array([sum(self.v[e] for e in self.S[g]) for g in range(self.G)])

    def arrive(self, g, e):
        return self.cin[g, e] if self.newm[g, e] else 0.0

    def partners(self, g):
        lo = (g // self.B) * self.B
        return [h for h in range(lo, lo + self.B) if h != g]

    def swaps(self, g, T):
        """``dphi, cost, ok, lg, lh`` ``[k, H, k]`` for every swap of ``g``."""
        H = self.partners(g)
        shape = (self.k, len(H), self.k)
        dphi, cost, lg, lh = np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape)
        ok = np.zeros(shape, dtype=bool)
        for i in range(self.k):
            for x, h in enumerate(H):
                for j in range(self.k):
                    a, b = self.S[g, i], self.S[h, j]
                    ok[i, x, j] = a != b and self.allowed[h, a] and self.allowed[g, b] and (
                        self.dup or (self.M[h, a] == 0 and self.M[g, b] == 0))
                    d = self.v[b] - self.v[a]
                    lg[i, x, j], lh[i, x, j] = self.load[g] + d, self.load[h] - d
                    phi0 = max(0.0, self.load[g] - T) + max(self.load[h] - T, 0.0)
                    dphi[i, x, j] = phi0 - max(lg[i, x, j] - T, 0.0) - max(lh[i, x, j] - T, 0.0)
                    cost[i, x, j] = (self.arrive(h, a) + self.arrive(g, b) - self.arrive(g, a) - self.arrive(h, b))
        return dphi, cost, ok, lg, lh, H

    def retarget_new(self, g, i, b):
        """``[G]`` every GPU's load once slot ``i`` of ``g`` goes to expert ``b``."""
        a = self.S[g, i]
        va2 = self.w[a] / max(self.c[a] - 1, 1)
        vb2 = self.w[b] / (self.c[b] + 1)
        new = self.load + self.M[:, a] * (va2 - self.v[a]) + self.M[:, b] * (vb2 - self.v[b])
        new[g] += vb2 - va2
        return new

    def retargets(self, g, T, slots, experts):
        """``dphi, cost, ok, fits`` ``[s, x]`` (fits: every new load within ``T + eps``)."""
        eps = 1e-12 * max(T, 1e-300)
        shape = (len(slots), len(experts))
        dphi, cost = np.zeros(shape), np.zeros(shape)
        ok, fits = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
        ex0 = sum(max(x - T, 0.0) for x in self.load)
        for si, i in enumerate(slots):
            a = self.S[g, i]
            for x, b in enumerate(experts):
                new = self.retarget_new(g, i, b)
                dphi[si, x] = ex0 - sum(max(y - T, 0.0) for y in new)
                cost[si, x] = self.arrive(g, b) - self.arrive(g, a)
                ok[si, x] = self.c[a] >= 2 and a != b and self.allowed[g, b] and (self.dup or self.M[g, b] == 0)
                fits[si, x] = (new <= T + eps).all()
        return dphi, cost, ok, fits

    def do_swap(self, g, i, h, j):
        a, b = self.S[g, i], self.S[h, j]
        self.S[g, i], self.S[h, j] = b, a
        self.M[g, a] -= 1
        self.M[g, b] += 1
        self.M[h, b] -= 1
        self.M[h, a] += 1
        d = self.v[b] - self.v[a]
        self.load[g] += d
        self.load[h] -= d

    def do_retarget(self, g, i, b):
        a = self.S[g, i]
        self.S[g, i] = b
        self.M[g, a] -= 1
        self.M[g, b] += 1
        self.c[a] -= 1
        self.c[b] += 1
        self.refresh()

    def best_swap(self, g, T, eps):
        dphi, cost, ok, _, _, H = self.swaps(g, T)
        r = ref_pick(dphi, cost, ok, eps, max(self.load[g] - T, 0.0) - eps)
        return None if r is None else ((r[0][0], H[r[0][1]], r[0][2]), r[1], cost[r[0]], r[2])

    def best_retarget(self, g, T, eps, free_only=False):
        """The best retarget (only those that cost nothing with ``free_only``)."""
        experts = list(np.flatnonzero(self.allowed[g]))
        dphi, cost, ok, _ = self.retargets(g, T, list(range(self.k)), experts)
        if free_only:
            ok = ok & (cost <= 0)
        r = ref_pick(dphi, cost, ok, eps, max(self.load[g] - T, 0.0) - eps)
        return None if r is None else ((r[0][0], experts[r[0][1]]), r[1], cost[r[0]], dphi, ok, r[2])

    def repair(self, T, max_steps):
        eps = 1e-12 * max(T, 1e-300)
        for _ in range(max_steps):
            over = [g for g in range(self.G) if self.load[g] > T + eps]
            if not over:
                return True
            best = None
            for g in sorted(over, key=lambda g: (-self.load[g], g))[:4]:
                sw = self.best_swap(g, T, eps) if self.B > 1 else None
                rt = self.best_retarget(g, T, eps, free_only=sw is not None and sw[-1] >= 1)
                for kind, r in (("swap", sw), ("retarget", rt)):        # the swap on ties
                    if r is not None and (best is None or ref_key(r[-1], r[1], r[2]) > best[0]):
                        best = (ref_key(r[-1], r[1], r[2]), kind, g, r[0])
                if best is not None:
                    break
            if best is None:
                return False
            _, kind, g, idx = best
            if kind == "swap":
                self.do_swap(g, *idx)
            else:
                self.do_retarget(g, *idx)
        return all(x <= T + eps for x in self.load)

    def undo_swap(self, g, T, eps):
        _, cost, ok, lg, lh, H = self.swaps(g, T)
        good = ok & (cost < 0) & (lg <= T + eps) & (lh <= T + eps)
        if not good.any():
            return None
        i, x, j = np.unravel_index(int(np.argmin(np.where(good, cost, np.inf))), cost.shape)
        return i, H[x], j

    def undo_retarget(self, g, T, eps):
        slots = [i for i in range(self.k) if self.newm[g, self.S[g, i]]]
        experts = [b for b in range(self.E) if not self.newm[g, b] and self.allowed[g, b]]
        if not slots or not experts:
            return None
        _, cost, ok, fits = self.retargets(g, T, slots, experts)
        good = ok & (cost < 0) & fits
        if not good.any():
            return None
        si, x = np.unravel_index(int(np.argmin(np.where(good, cost, np.inf))), cost.shape)
        return slots[si], experts[x]

    def undo(self, T, max_steps):
        eps = 1e-12 * max(T, 1e-300)
        for _ in range(max_steps):
            for g in range(self.G):
                if not (self.M[g] * self.newm[g]).any():
                    continue
                r = self.undo_swap(g, T, eps) if self.B > 1 else None
                if r is not None:
                    self.do_swap(g, *r)
                    break
                r = self.undo_retarget(g, T, eps)
                if r is not None:
                    self.do_retarget(g, *r)
                    break
            else:
                return

    def kernel_args(self):
        return self.S, self.w, self.v, self.c, self.load, self.M, self.newm, self.cin, self.allowed, self.dup


def ref_keep_slots(new_gpu, old_gpu):
    out = [None] * len(old_gpu)
    pending = list(new_gpu)
    for s, e in enumerate(old_gpu):
        if e in pending:
            out[s] = e
            pending.remove(e)
    return [pending.pop(0) if x is None else x for x in out]


def ref_attempt(w, old, start, G, N, hierarchical, node_move_cost, dup, T):
    """The whole repair: ``(cost, row, moves)`` or None."""
    R = start.size
    st = Ref(w, old, start, G, N, hierarchical, node_move_cost, dup)
    if not dup and (st.M > 1).any():
        return None
    if not (st.load <= T * (1 + 1e-12)).all() and not st.repair(T, 4 * R):
        return None
    st.undo(T, R)
    k = st.k
    row = np.concatenate([ref_keep_slots(list(st.S[g]), list(old[g * k:(g + 1) * k])) for g in range(G)])
    return float((st.M * st.newm * st.cin).sum()), row, int((st.M * st.newm).sum())


# ------------------------------------------------------------------ random layers

def random_layer(rng, hierarchical=None, replicas=False):
    """A small layer: loads, an old placement, a start near it, the topology and a cap
    a little under the heaviest GPU (``replicas``: more slots, most experts with several
    replicas, and more moves already)."""
    N = int(rng.choice([1, 2]))
    P = int(rng.choice([2, 3]))
    G, k = N * P, int(rng.choice([4, 5] if replicas else [2, 3]))
    R = G * k
    hier = bool(rng.random() < 0.5) if hierarchical is None else hierarchical
    E = int(rng.integers(max(2, G), R // 2 + 1)) if replicas else int(rng.integers(max(2, G), R + 1))
    dup = bool(rng.random() < 0.7)
    w = rng.gamma(1.0, 10.0, E) * (rng.random(E) < 0.9) + 0.01
    for _ in range(100):
        old = np.concatenate([np.arange(E), rng.integers(0, E, R - E)])
        rng.shuffle(old)
        start = old.copy()
        for _ in range(int(rng.integers(0, R if replicas else 3))):    # some moves already
            i, j = rng.integers(0, R, 2)
            if hier:
                j = (i // (R // N)) * (R // N) + j % (R // N)               # within i's node
            start[i], start[j] = start[j], start[i]
        if hier:                                          # experts stay in the start's nodes
            node_of = {}
            rn = R // N
            if any(node_of.setdefault(e, s // rn) != s // rn for s, e in enumerate(start)):
                continue
        if dup or all(len(set(start[g * k:(g + 1) * k])) == k for g in range(G)):
            break
    else:
        dup = True
    loads = np.array([sum(w[e] / np.bincount(start, minlength=E)[e] for e in start[g * k:(g + 1) * k])
                      for g in range(G)])
    T = float(loads.max()) * float(rng.uniform(0.75, 1.0))
    return w, old, start, G, N, hier, float(rng.choice([1.0, 4.0])), dup, T


def near_tie(scores, ok, eps, pick):
    """Whether the reference's best and second best differ by less than 1e-9 (relative):
    a sum in another order may then pick the other one."""
    good = ok & (scores > eps)
    vals = np.sort(scores[good].ravel())[::-1]
    return vals.size > 1 and vals[0] - vals[1] <= 1e-9 * max(abs(vals[0]), 1e-300)


SEEDS = range(400)


# ------------------------------------------------------------------------- tests

def _over_gpu(st, T):
    eps = 1e-12 * max(T, 1e-300)
    over = [g for g in range(st.G) if st.load[g] > T + eps]
    return over[int(np.argmax([st.load[g] for g in over]))] if over else None, eps


def _overloaded_layers():
    """``(seed, reference state, T, heaviest GPU above T, eps)`` for every seeded random
    layer that has a GPU above its cap."""
    for seed in SEEDS:
        args = random_layer(np.random.default_rng(seed))
        st, T = Ref(*args[:-1]), args[-1]
        g, eps = _over_gpu(st, T)
        if g is not None:
            yield seed, st, T, g, eps


def test_best_swap_picks_what_the_reference_picks():
    """Candidate loads, costs, allowed swaps and the pick rule of every swap of an
    overloaded GPU, bit for bit (same arithmetic, same order)."""
    checked = 0
    for seed, st, T, g, eps in _overloaded_layers():
        if st.B < 2:
            continue
        want = st.best_swap(g, T, eps)
        S, w, v, c, load, M, newm, cin, allowed, dup = st.kernel_args()
        kind, score, cost, i, h, j = best_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, st.B)
        if want is None:
            assert kind == -1, seed
        else:
            assert (i, h, j) == tuple(int(x) for x in want[0]), seed
            assert score == want[1] and cost == want[2] and kind == want[3], seed
        checked += 1
    assert checked > 150


def _retarget_picks(st, T, g, eps):
    """``(want, got)``: the reference's best retarget of ``g`` and the kernel's."""
    S, w, v, c, load, M, newm, cin, allowed, dup = st.kernel_args()
    return st.best_retarget(g, T, eps), best_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g)


def test_best_retarget_picks_what_the_reference_picks():
    """Every retarget of a slot of an overloaded GPU: the excess removed (summed over the
    GPUs whose load changes, against the reference's sum over all GPUs), the cost and
    the pick rule."""
    checked = 0
    for seed, st, T, g, eps in _overloaded_layers():
        want, (kind, score, cost, i, b) = _retarget_picks(st, T, g, eps)
        if want is None:
            assert kind == -1, seed
            continue
        if near_tie(want[3], want[4], eps, None):
            continue
        assert (i, b) == tuple(int(x) for x in want[0]), seed
        assert score == pytest.approx(want[1], rel=1e-9, abs=1e-12 * T) and cost == want[2], seed
        assert kind == want[5], seed
        checked += 1
    assert checked > 100


def test_best_retarget_with_many_replicas_picks_what_the_reference_picks():
    """As above on layers where most experts have several replicas and the cap is a
    little under the heaviest GPU, so that several slots hold retargets of every kind
    and the bounds that skip a slot's candidates (after an earlier slot's best) are
    tested against the full search.  Many candidates tie there (sums in another order
    may round apart), so the pick must be one of the reference's best: the same kind,
    allowed, and its key within 1e-9 of the best."""
    checked, kinds, moved = 0, set(), 0
    for seed in range(600):
        rng = np.random.default_rng(seed)
        args = random_layer(rng, replicas=True)
        st = Ref(*args[:-1])
        T = float(st.load.max()) * float(rng.uniform(0.9, 0.999))
        g, eps = _over_gpu(st, T)
        if g is None:
            continue
        want, (kind, score, cost, i, b) = _retarget_picks(st, T, g, eps)
        if want is None:
            assert kind == -1, seed
            continue
        dphi, costs, ok, _ = st.retargets(g, T, [i], [b])            # the kernel's pick, as the reference sees it
        assert kind == want[5] and ok[0, 0] and dphi[0, 0] > eps and costs[0, 0] == cost, seed
        got = ref_key(kind, dphi[0, 0] if kind == 2 else dphi[0, 0] / max(cost, 1e-9), cost)
        assert got[1] == pytest.approx(ref_key(want[5], want[1], want[2])[1], rel=1e-9, abs=1e-12 * T), seed
        kinds.add(kind)
        moved += bool(st.newm[g, st.S[g, i]])
        checked += 1
    assert kinds == {0, 1, 2} and moved > 0 and checked > 300, (kinds, moved, checked)


def test_retarget_scan_looks_only_for_retargets_that_beat_the_swap():
    """With the best swap's key as a bar, the retarget search returns the unbarred answer
    where its key is larger than the bar, else nothing: a tie with the bar, a costly
    retarget against a free swap, or one that leaves excess against a costly swap that
    removes it all, loses (the repair then takes the swap); against a costly swap that
    removes the whole excess only free retargets are searched."""
    checked, kinds = 0, set()
    for seed, st, T, g, eps in _overloaded_layers():
        S, w, v, c, load, M, newm, cin, allowed, dup = st.kernel_args()
        free = best_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g)
        kind, score, cost = free[:3]
        if kind < 0:
            continue
        val = score - 1e-9 * cost if kind == 2 else score

        def barred(tk, tv):
            return retarget_beating(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g, tk, tv)

        assert barred(kind, val)[0] == -1, seed                                   # a tie loses
        below = barred(kind, float(np.nextafter(val, -np.inf)))                 # just below: the same,
        assert below == free if kind != 1 else below[0] == -1, seed              # unless costly vs whole
        assert barred(kind, val * 2 + 1.0)[0] == -1, seed
        if kind == 2:
            assert barred(1, 1e300) == free, seed                                 # free beats any cost
        else:
            assert barred(2, 0.0)[0] == -1, seed                                  # costly never beats free
        if kind == 1:
            assert barred(0, 1e300) == free, seed                                 # the whole excess beats part
        if kind == 0:
            assert barred(1, 0.0)[0] == -1, seed
        kinds.add(kind)
        checked += 1
    assert kinds == {0, 1, 2}
    assert checked > 100


def test_undo_rules_pick_what_the_reference_picks():
    """The cheapest cost-lowering swap and retarget that keep every GPU within the cap."""
    checked = 0
    for seed in SEEDS:
        args = random_layer(np.random.default_rng(seed))
        st = Ref(*args[:-1])
        T = float(st.load.max()) * 1.02                 # room to undo
        eps = 1e-12 * T
        S, w, v, c, load, M, newm, cin, allowed, dup = st.kernel_args()
        for g in range(st.G):
            if st.B > 1:
                want = st.undo_swap(g, T, eps)
                got = undo_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, st.B)
                assert got == ((-1, -1, -1) if want is None else tuple(int(x) for x in want)), seed
                checked += want is not None
            want = st.undo_retarget(g, T, eps)
            got = undo_retarget(S, w, v, c, load, M, newm, cin, allowed, dup, T, eps, g)
            assert got == ((-1, -1) if want is None else tuple(int(x) for x in want)), seed
            checked += want is not None
    assert checked > 100


def test_keep_gpu_slots_matches_reference():
    """Repeated experts and empty slots (-1, a masked GPU's in the old plan) included; the
    per-expert lists' work array is shared across calls, as the kernels share it, and
    must come back cleared."""
    rng = np.random.default_rng(0)
    head = np.full(6, -1, dtype=np.int64)
    for _ in range(1000):
        k = int(rng.integers(1, 7))
        old, new = rng.integers(-1, 4, k), rng.integers(-1 if rng.random() < 0.3 else 0, 4, k)
        want = ref_keep_slots(list(new), list(old))
        assert K.keep_gpu_slots(new, old).tolist() == want
        out = np.empty(k, dtype=np.int64)
        K.keep_slots_into(new, old, out, np.empty(k, dtype=np.bool_), np.empty(k, dtype=np.bool_),
                          np.empty(k, dtype=np.int64), head)
        assert out.tolist() == want and (head == -1).all()


def test_repair_attempt_matches_reference():
    """Whole repairs (repair then undo, slots kept), global and hierarchical, with and
    without duplicates: the same plan, moves and cost as the reference."""
    same = feasible = 0
    for seed in SEEDS:
        args = random_layer(np.random.default_rng(seed))
        w, old, start, G, N, hier, nmc, dup, T = args
        want = ref_attempt(*args)
        ok, row, moves, cost = K.repair_attempt(w, old, start, G, N, hier, nmc, dup, T, 4 * start.size, start.size)
        assert ok == (want is not None), seed
        if want is None:
            continue
        feasible += 1
        same += row.tolist() == [int(x) for x in want[1]] and moves == want[2] and cost == want[0]
    # Retarget gains are summed in another order: a near tie may go the other way.
    assert feasible > 100 and same >= 0.98 * feasible, (same, feasible)


def ref_transfers(old, new, G, N):
    """Every weight copy, plain loops: ``(layer, expert, src, dst, slot)`` rows."""
    L, R = new.shape
    k, P = R // G, G // N
    rows = []
    for l in range(L):
        def first(e, gpus):
            return next((h for h in gpus if e in old[l, h * k:(h + 1) * k]), -1)
        for t in range(R):
            e, g = new[l, t], t // k
            if e == old[l, t] or e < 0:
                continue
            src = first(e, [g])
            src = first(e, range((g // P) * P, (g // P + 1) * P)) if src < 0 else src
            src = first(e, range(G)) if src < 0 else src
            rows.append((l, e, src, g, t))
    return rows


def test_transfer_rows_match_reference():
    """Sources: the destination itself, else the lowest GPU of its node, else the lowest
    GPU, else -1; empty slots (-1) neither send nor receive."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        N, P, k = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
        G = N * P
        L, E = int(rng.integers(1, 4)), int(rng.integers(1, 2 * G * k))
        old = rng.integers(-1, E, (L, G * k))
        new = np.where(rng.random((L, G * k)) < 0.5, old, rng.integers(-1, E, (L, G * k)))
        got = K.transfer_rows(old, new, G, N)
        assert [tuple(int(x) for x in r) for r in got.T] == ref_transfers(old, new, G, N)


def test_exact_price_is_a_multiple_of_2_to_the_minus_20_below_2_to_the_30():
    """The swap search prunes with cost bounds only where every sum of prices is exact."""
    for x, exact in ((4.0, True), (2.5, True), (1.0, True), (0.0, True), (2.0 ** -20, True), (2.0 ** 29, True),
                     (2.0 ** 30, False), (0.1, False), (2.7, False), (2.0 ** -21, False)):
        assert K.exact_price(x) == exact, x


@pytest.mark.parametrize("nmc", [4.0, 2.5, 1.0, 0.1, 2.7])
def test_layer_arrays_price_moves_as_the_reference(nmc):
    """``_layer_arrays``' prices, exactness flag and old experts per GPU against the plain
    state: ``q`` is ``cin`` where a replica is a move, else 0; ``exact`` holds where every
    price is exact (an inexact ``node_move_cost`` that no arrival pays leaves it exact);
    ``oldE[g, :nold[g]]`` lists what ``g`` held before, ascending, once each."""
    seen = {True: 0, False: 0}
    for seed in SEEDS:
        w, old, start, G, N, hier, _, dup, T = random_layer(np.random.default_rng(seed))
        st = Ref(w, old, start, G, N, hier, nmc, dup)
        S, v, c, load, M, newm, q, exact, allowed, oldE, nold = K._layer_arrays(w, old, start, G, N, hier, nmc)
        assert np.array_equal(q, np.where(st.newm, st.cin, 0.0)), seed
        want_exact = bool(np.all([K.exact_price(x) for x in q.ravel()]))
        assert exact == want_exact, seed
        seen[want_exact] += 1
        assert np.array_equal(newm, st.newm) and np.array_equal(allowed, st.allowed) and np.array_equal(M, st.M), seed
        k = start.size // G
        for g in range(G):
            assert oldE[g, :nold[g]].tolist() == sorted(set(old[g * k:(g + 1) * k].tolist())), seed
    assert seen[True] > 50 and (seen[False] > 50 or K.exact_price(nmc)), seen


@pytest.mark.parametrize("nmc", [2.7, 0.3])
def test_best_swap_with_inexact_prices_picks_what_the_reference_picks(nmc):
    """With prices whose sums round (no pruning), the same picks as the reference."""
    checked = 0
    for seed in SEEDS:
        w, old, start, G, N, hier, _, dup, T = random_layer(np.random.default_rng(seed))
        st = Ref(w, old, start, G, N, hier, nmc, dup)
        g, eps = _over_gpu(st, T)
        if g is None or st.B < 2:
            continue
        want = st.best_swap(g, T, eps)
        S, w, v, c, load, M, newm, cin, allowed, dup = st.kernel_args()
        kind, score, cost, i, h, j = best_swap(S, v, load, M, newm, cin, allowed, dup, T, eps, g, st.B)
        if want is None:
            assert kind == -1, seed
        else:
            assert (i, h, j) == tuple(int(x) for x in want[0]), seed
            assert score == want[1] and cost == want[2], seed
        checked += 1
    assert checked > 150


@pytest.mark.parametrize("prices", ["exact", "inexact"])
def test_undo_moves_matches_reference_on_longer_undos(prices):
    """The whole undo phase (:func:`heuristics.local.undo_moves`, whose searches skip the
    GPU pairs known to hold no swap: searched already, by either GPU where prices are
    exact, and unchanged since) on layers of 4-16 GPUs started many swaps away from the
    old placement: the same slots as the reference, which searches every GPU in full at
    every step.  Inexact prices (``node_move_cost`` 2.7 or 0.2) take only the pairs a
    GPU searched itself (with 0.2, ``((1 + 0.2) - 1) - 0.2 < 0`` but ``((0.2 + 1) - 0.2) - 1 == 0``:
    the same swap lowers the cost seen from one GPU only)."""
    same = runs = steps = 0
    for seed in range(300):
        rng = np.random.default_rng(1000 + seed)
        N, P, k = int(rng.choice([1, 2])), int(rng.choice([4, 8])), int(rng.choice([2, 3]))
        G = N * P
        R = G * k
        E = int(rng.integers(G, R // 2 + 2))               # many replicas: undo retargets too
        w = rng.uniform(1.0, 1.5, E)                  # near-even loads: caps bind often
        old = np.concatenate([np.arange(E), rng.integers(0, E, R - E)])
        rng.shuffle(old)
        start = old.copy()
        for _ in range(int(rng.integers(4, 3 * G))):
            i, j = rng.integers(0, R, 2)
            start[i], start[j] = start[j], start[i]
        hier, nmc = bool(rng.random() < 0.5), float(rng.choice([1.0, 4.0] if prices == "exact" else [2.7, 0.2]))
        st = Ref(w, old, start, G, N, hier, nmc, True)
        T = float(st.load.max()) * float(rng.uniform(1.0, 1.03))
        S, v, c, load, M, newm, q, exact, allowed, oldE, nold = K._layer_arrays(w, old, start, G, N, hier, nmc)
        before = S.copy()
        K.undo_moves(S, w, v, K.next_values(w, c), c, load, K.slot_values(S, v), M, q, exact, newm, oldE, nold, allowed,
                     True, T, st.B, R)
        st.undo(T, R)
        runs += 1
        steps += int((S != before).sum())
        same += np.array_equal(S, st.S)
    assert steps > 1000 and same == runs, (same, runs, steps)


# ------------------------------------------- the hierarchical repair's starts, pinned
# The starts' group bookkeeping as it ran in Python before it was compiled
# (``eplb_opt.migrate._nodes_of_groups``, ``_node_loads``, ``_nearby_partitions``).

def ref_nodes_of_groups(p: np.ndarray, N: int, num_groups: int, gs: int) -> list[np.ndarray | None]:
    """Per layer of hierarchical placements ``p`` ``[L, R]``, the node of every group, or
    None when some group is split across nodes, a node holds a group's experts without
    all of them, or the nodes hold different numbers of groups (all layers at once)."""
    L, R = p.shape
    rn = R // N
    present = np.zeros((L, N, num_groups + 1), dtype=bool)      # column 0: an empty slot (-1)
    present[np.arange(L)[:, None], np.repeat(np.arange(N), rn)[None, :], p // gs + 1] = True
    seen = present[:, :, 1:].astype(np.int64)
    seen[:, :, -1] += present[:, :, 0]             # (an empty slot is counted as the last group)
    node = seen.argmax(axis=1).astype(np.int64)                 # [L, groups]
    per_node = (node[:, :, None] == np.arange(N)).sum(axis=1)  # [L, N]
    ok = (seen.sum(axis=1) == 1).all(axis=1) & (per_node == per_node[:, :1]).all(axis=1)
    return [node[l] if ok[l] else None for l in range(L)]


def ref_node_loads(gl: np.ndarray, nodes: np.ndarray, N: int, rows_gl: bool = False) -> np.ndarray:
    """``[C, N]`` each node's load under each of ``C`` group-to-node assignments ``nodes``
    ``[C, groups]`` (group loads ``gl [groups]``, or ``[C, groups]`` with ``rows_gl``),
    summed group by group in index order, as ``np.bincount`` sums them."""
    out = np.zeros((nodes.shape[0], N))
    rows = np.arange(nodes.shape[0])
    for g in range(nodes.shape[1]):
        out[rows, nodes[:, g]] += gl[:, g] if rows_gl else gl[g]
    return out


def ref_nearby_partitions(gl: np.ndarray, old_node: np.ndarray, N: int, P: int, T: float,
                       limit: int = 3) -> list[np.ndarray]:
    """Group-to-node assignments one or two group swaps from ``old_node`` whose
    heaviest node averages under ``T`` per GPU (with a little room for packing), fewest
    swaps first, then lightest; empty when the old one already fits."""
    room = T / (1 + 2e-4)
    if float(np.bincount(old_node, weights=gl, minlength=N).max()) / P <= room:
        return []
    ng = gl.size
    pairs = [(a, b) for a in range(ng) for b in range(a + 1, ng) if old_node[a] != old_node[b]]
    for depth in (1, 2):
        if depth == 1:
            swaps = [[p] for p in pairs]
        elif len(pairs) ** 2 > 20000:
            break
        else:
            swaps = [[p, r] for i, p in enumerate(pairs) for r in pairs[i + 1:] if len({*p, *r}) == 4]
        if not swaps:
            continue
        cands = np.repeat(old_node[None, :], len(swaps), axis=0)
        for c, seq in enumerate(swaps):
            for a, b in seq:
                cands[c, a], cands[c, b] = cands[c, b], cands[c, a]
        h = ref_node_loads(gl, cands, N).max(axis=1) / P
        ok = np.flatnonzero(h <= room)
        if ok.size:
            ok = ok[np.argsort(h[ok], kind="stable")]
            return [cands[c] for c in ok[:limit]]
    return []


def _random_partition_layers(rng):
    """Hierarchical-looking layers: most keep whole groups per node, some split a group,
    some leave a slot empty or give a node an extra group; group loads with ties."""
    N = int(rng.choice([2, 3, 4]))
    per = int(rng.choice([1, 2, 3]))
    ng, gs = N * per, int(rng.choice([1, 2, 3]))
    E, L = ng * gs, 12
    rn = per * gs + int(rng.integers(0, 2))            # slots per node (a spare slot or not)
    p = np.empty((L, N * rn), dtype=np.int64)
    for l in range(L):
        groups = rng.permutation(ng)
        for n in range(N):
            experts = np.concatenate([np.arange(g * gs, (g + 1) * gs) for g in groups[n * per:(n + 1) * per]])
            extra = rn - experts.size
            fill = rng.choice(experts, extra) if extra else experts[:0]
            p[l, n * rn:(n + 1) * rn] = np.concatenate([experts, fill])
        r = rng.random()
        if r < 0.15:                                   # a group split across nodes
            i, j = rng.integers(0, N * rn, 2)
            p[l, i], p[l, j] = p[l, j], p[l, i]
        elif r < 0.25:
            p[l, rng.integers(0, N * rn)] = -1
    gl = np.round(rng.gamma(1.0, 4.0, (L, ng)) * 4) / 4 + 0.25   # quarter steps: ties
    return p, N, ng, gs, gl


def test_group_nodes_and_nearby_partitions_match_the_python_reference():
    """:func:`group_nodes` and :func:`nearby_partitions` against the Python helpers they
    replaced, on layers with split groups, empty slots, tied loads and caps on both sides
    of the old partition's heaviest node (one swap, two swaps, none)."""
    depth = {0: 0, 1: 0, 2: 0}
    for seed in range(300):
        rng = np.random.default_rng(seed)
        p, N, ng, gs, gl = _random_partition_layers(rng)
        L = p.shape[0]
        P = int(rng.integers(1, 4))
        want_nodes = ref_nodes_of_groups(p, N, ng, gs)
        node, whole = K.group_nodes(p, N, ng, gs)
        for l in range(L):
            assert whole[l] == (want_nodes[l] is not None), (seed, l)
            if whole[l]:
                assert node[l].tolist() == want_nodes[l].tolist(), (seed, l)
        heavy = np.array([np.bincount(node[l], weights=gl[l], minlength=N).max() / P for l in range(L)])
        cap = heavy * rng.uniform(0.85, 1.05, L)
        ls, got = K.nearby_partitions(gl, node, whole, N, P, cap, 3)
        want = [(l, c) for l in range(L) if whole[l] for c in ref_nearby_partitions(gl[l], node[l], N, P, cap[l])]
        assert ls.tolist() == [l for l, _ in want], seed
        assert [c.tolist() for c in got] == [c.tolist() for _, c in want], seed
        for l, c in want:
            depth[int((c != node[l]).sum()) // 2] += 1
        depth[0] += sum(1 for l in range(L) if whole[l] and not ref_nearby_partitions(gl[l], node[l], N, P, cap[l]))
    assert min(depth.values()) > 20, depth
