"""The packing kernels (heuristics/packing.py) against plain references.

Each reference below is written from the rule the kernel documents, with Python lists
and loops only (brute force where the kernel claims an optimum: the best pair swap,
the separating swap, the lightest pack of LPT), and runs on many small random inputs,
duplicate labels and tied loads included.
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb_opt.heuristics as H
from eplb_opt.heuristics import packing as K

EPS = K._REL_EPS


def random_row(rng, P, k, ties=False):
    """One row of sorted items ``(values [n], labels [n])``: a few labels with several
    items (equal loads, adjacent), the rest single."""
    n = P * k
    counts = []
    while sum(counts) < n:
        counts.append(int(min(rng.integers(1, P + 1) if rng.random() < 0.3 else 1, n - sum(counts))))
    w = rng.integers(1, 6, len(counts)).astype(float) if ties else rng.pareto(1.2, len(counts)) + 0.01
    per = w / np.array(counts)
    order = sorted(range(len(counts)), key=lambda e: (-per[e], e))
    labels = np.repeat(order, [counts[e] for e in order])
    return per[labels].astype(np.float64), labels.astype(np.int64)


def state(values, labels, layout):
    """The kernels' working state of one row, built with plain loops: ``(lay, v, lab,
    loads, occ, multi)``."""
    P, k = layout.shape
    ids = {}
    for lab in labels:
        ids.setdefault(int(lab), len(ids))
    n_of = {}
    for lab in labels:
        n_of[int(lab)] = n_of.get(int(lab), 0) + 1
    lay = np.array(layout, dtype=np.int64)
    v = np.array([[values[i] for i in row] for row in lay], dtype=np.float64)
    lab = np.array([[ids[int(labels[i])] for i in row] for row in lay], dtype=np.int64)
    loads = np.zeros(P)
    for p in range(P):
        for t in range(k):
            loads[p] += v[p, t]
    occ = np.zeros((P, len(labels)), dtype=np.int64)
    for p in range(P):
        for t in range(k):
            occ[p, lab[p, t]] += 1
    multi = np.zeros(len(labels), dtype=np.bool_)
    for lab_id, i in ids.items():
        multi[i] = n_of[lab_id] > 1
    return lay, v, lab, loads, occ, multi


def random_state(rng, P, k, ties=False):
    values, labels = random_row(rng, P, k, ties)
    perm = rng.permutation(P * k).reshape(P, k)
    return values, labels, state(values, labels, perm)


# ------------------------------------------------------------------ orders


@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 40, 64, 65, 130])
def test_order_is_the_stable_sort(m):
    rng = np.random.default_rng(m)
    for trial in range(30):
        x = rng.integers(0, 4, m).astype(float) if trial % 2 else rng.random(m)
        out = np.empty(m, dtype=np.int64)
        buf = np.empty(m, dtype=np.int64)
        for sign in (1.0, -1.0):
            K._order(x, out, buf, sign)
            assert list(out) == sorted(range(m), key=lambda i: (sign * x[i], i))


@pytest.mark.parametrize("m", [1, 2, 9, 64, 130])
def test_settle_order_is_the_stable_sort_from_any_start(m):
    """_settle_order finishes numpy's argsort (ties in any order) as the order by ``neg``
    then index, from any starting permutation: the result never depends on how the
    platform's sort broke ties."""
    rng = np.random.default_rng(m + 100)
    for trial in range(30):
        neg = -(rng.integers(0, 4, m).astype(float) if trial % 2 else rng.random(m))
        want = sorted(range(m), key=lambda i: (neg[i], i))
        for start in (np.argsort(neg), rng.permutation(m), np.arange(m)[::-1]):
            order = np.array(start, dtype=np.int64)
            K._settle_order(neg, order)
            assert order.tolist() == want


def test_replica_items_sorted_by_load_then_expert():
    rng = np.random.default_rng(1)
    for _ in range(40):
        e = int(rng.integers(1, 70))
        w = rng.integers(0, 5, (3, e)).astype(float) if _ % 2 else rng.random((3, e)) * 7
        c = rng.integers(1, 4, (3, e))
        c[:, 0] += 3 * e - c.sum(axis=1)           # equal row sums
        c[:, 0] = np.maximum(c[:, 0], 1)
        if len(set(c.sum(axis=1))) > 1:
            continue
        values, labels, bound = K.replica_items(w, c, 3)
        for r in range(3):
            experts = sorted(range(e), key=lambda j: (-(w[r, j] / c[r, j]), j))
            ref = [j for j in experts for _ in range(c[r, j])]
            assert list(labels[r]) == ref
            assert list(values[r]) == [w[r, j] / c[r, j] for j in ref]
            total = 0.0
            for x in values[r]:                     # added item by item, in item order
                total += x
            assert bound[r] == max(total / 3, values[r, 0])


# ------------------------------------------------------------------- seeds


def ref_snake(labels, P, rotate):
    """Snake over positions; with ``rotate`` a block whose first items continue the
    previous block's last label starts after them (a whole continuing block: no shift)."""
    n = len(labels)
    k = n // P
    lay = [[None] * k for _ in range(P)]
    rotated = False
    for b in range(k):
        block = list(range(b * P, b * P + P))
        if rotate and b > 0:
            lead = 0
            while lead < P and labels[b * P + lead] == labels[b * P - 1]:
                lead += 1
            rotated |= lead > 0
            lead = 0 if lead == P else lead
            block = block[lead:] + block[:lead]
        packs = range(P) if b % 2 == 0 else range(P - 1, -1, -1)
        for j, pack in enumerate(packs):
            lay[pack][b] = block[j]
    return lay, rotated


def test_snake_matches_reference():
    rng = np.random.default_rng(2)
    for _ in range(200):
        P, k = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        _, labels = random_row(rng, P, k, ties=True)
        for rotate in (False, True):
            lay = np.empty((P, k), dtype=np.int64)
            rotated = K._snake_row(labels, rotate, lay)
            ref, ref_rot = ref_snake(list(labels), P, rotate)
            assert lay.tolist() == ref and rotated == ref_rot


def ref_unsplit(labels, P):
    """unsplit_runs' rule on lists: at each boundary a run crosses (in order), the first
    ``a`` single items after the run move in front of it, where ``a`` is the run's
    count before the boundary, if the run then fits in the block."""
    n = len(labels)
    lab = list(labels)
    pos = list(range(n))
    single = [(i == 0 or lab[i] != lab[i - 1]) and (i == n - 1 or lab[i] != lab[i + 1]) for i in range(n)]
    for B in range(P, n, P):
        run = lab[B - 1]
        if lab[B] != run:
            continue
        a = next((j for j in range(P) if lab[B - 1 - j] != run), P)
        t = next((j for j in range(n - B) if lab[B + j] != run), n - B)
        taken = [q for q in range(B + t, n) if single[q]][:a]
        if a + t > P or len(taken) < a:
            continue
        rest = [q for q in range(B - a, n) if q not in taken]
        new = list(range(B - a)) + taken + rest
        lab, pos, single = [lab[q] for q in new], [pos[q] for q in new], [single[q] for q in new]
    split = any(lab[B] == lab[B - 1] for B in range(P, n, P))
    return pos, split


def test_unsplit_runs_matches_reference():
    rng = np.random.default_rng(3)
    for _ in range(300):
        P, k = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        _, labels = random_row(rng, P, k, ties=True)
        perm, split = H.unsplit_runs(labels[None, :], P)
        ref, ref_split = ref_unsplit(list(labels), P)
        assert list(perm[0]) == ref and bool(split[0]) == ref_split


def ref_kk(sv, P):
    """Largest differencing with exact cardinality on sorted loads: partitions of ``P``
    subsets (each a list of positions), merged two at a time (largest spreads, first
    index on ties), lightest subset of one with heaviest of the other; subsets ordered
    by load, ties by their order before the merge.  Returns pack -> positions (block
    order), packs numbered by the final partition's load order."""
    k = len(sv) // P
    parts = []
    for b in range(k):
        subs = [[b * P + P - 1 - i] for i in range(P)]           # ascending loads
        parts.append(subs)
    alive = list(range(k))

    def load(sub):
        total = 0.0
        for i in sub:
            total += sv[i]
        return total

    sums = [[sv[s[0]] for s in parts[b]] for b in range(k)]
    for _ in range(k - 1):
        spread = [(sums[b][-1] - sums[b][0]) if b in alive else -np.inf for b in range(k)]
        ia = max(range(k), key=lambda b: (spread[b], -b))
        spread[ia] = -np.inf
        ib = max(range(k), key=lambda b: (spread[b], -b))
        raw = [sums[ia][i] + sums[ib][P - 1 - i] for i in range(P)]
        subs = [parts[ia][i] + parts[ib][P - 1 - i] for i in range(P)]
        perm = sorted(range(P), key=lambda i: (raw[i], i))
        parts[ia] = [subs[i] for i in perm]
        sums[ia] = [raw[i] for i in perm]
        alive.remove(ib)
    final = parts[alive[0]]
    return [sorted(sub) for sub in final], load


def test_kk_matches_reference():
    """Merges sorted by counting (up to 32 packs) and by insertion (wider rows)."""
    rng = np.random.default_rng(4)
    for trial in range(300):
        P, k = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        if trial % 10 == 0:
            P, k = int(rng.integers(30, 40)), int(rng.integers(2, 5))
        sv, _ = random_row(rng, P, k, ties=trial % 2 == 0)
        lay = np.empty((P, k), dtype=np.int64)
        K._kk_row(sv, lay, K._kk_work(P, k))
        ref, _ = ref_kk(list(sv), P)
        assert lay.tolist() == ref


def test_lpt_items_matches_reference():
    rng = np.random.default_rng(5)
    for trial in range(300):
        P, k = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        sv, _ = random_row(rng, P, k, ties=trial % 2 == 0)
        lay = np.empty((P, k), dtype=np.int64)
        K._lpt_items_row(sv, lay)
        packs = [[] for _ in range(P)]
        loads = [0.0] * P
        for i, x in enumerate(sv):
            open_packs = [p for p in range(P) if len(packs[p]) < k]
            p = min(open_packs, key=lambda q: (loads[q], q))       # the lightest open pack
            packs[p].append(i)
            loads[p] += x
        assert lay.tolist() == packs


# ------------------------------------------------------------------- swaps


def brute_pair(v, lab, loads, h, l):
    """The lowest larger load of packs ``h`` and ``l`` over every duplicate-free
    1-for-1 swap that lowers ``h`` by more than float noise (``inf`` if none)."""
    P, k = v.shape
    best = np.inf
    for a in range(k):
        for b in range(k):
            if lab[l, b] in lab[h] or lab[h, a] in lab[l]:
                continue                                  # would double a label
            d = v[h, a] - v[l, b]
            m = max(loads[h] - d, loads[l] + d)
            if m < loads[h] * (1 - EPS):
                best = min(best, m)
    return best


def test_best_pair_swap_matches_brute_force():
    rng = np.random.default_rng(6)
    found = 0
    for trial in range(400):
        P, k = int(rng.integers(2, 7)), int(rng.integers(1, 6))
        _, _, (lay, v, lab, loads, occ, multi) = random_state(rng, P, k, ties=trial % 3 == 0)
        h, l = sorted(rng.choice(P, 2, replace=False), key=lambda p: -loads[p])
        new_max, a, b, mid, half = K._best_pair(v, lab, loads, occ, h, l, np.empty(k))
        best = brute_pair(v, lab, loads, h, l)
        if np.isinf(best):
            assert np.isinf(new_max)
            continue
        found += 1
        assert new_max == pytest.approx(best, rel=1e-12)
        assert lab[l, b] not in lab[h] and lab[h, a] not in lab[l]
        d = v[h, a] - v[l, b]
        assert max(loads[h] - d, loads[l] + d) == pytest.approx(best, rel=1e-12)
    assert found > 100


def test_separation_step_matches_brute_force():
    """One round of _separate_row: the first doubled slot (pack by pack) swaps with the
    item that changes loads least among those creating no duplicate and keeping both
    packs at or below the cap; rows with no such item keep their duplicate."""
    rng = np.random.default_rng(7)
    moved = 0
    for trial in range(400):
        P, k = int(rng.integers(2, 6)), int(rng.integers(2, 6))
        _, _, (lay, v, lab, loads, occ, multi) = random_state(rng, P, k, ties=trial % 3 == 0)
        cap = -np.inf if trial % 2 else loads.max() * 1.05
        first = next(((p, s) for p in range(P) for s in range(k) if list(lab[p]).count(lab[p, s]) > 1), None)
        before = (lay.copy(), v.copy(), loads.copy())
        left = K._separate_row(lay, v, lab, loads, occ, cap, 1)
        if first is None:
            assert not left and np.array_equal(lay, before[0])
            continue
        p, s = first
        row_cap = max(cap, before[2].max())
        options = []
        old_lab = state_labels(before[0], lay, lab)
        for g in range(P):
            for t in range(k):
                if g == p or old_lab[p, s] in old_lab[g] or old_lab[g, t] in old_lab[p]:
                    continue
                d = before[1][p, s] - before[1][g, t]
                if before[2][p] - d <= row_cap and before[2][g] + d <= row_cap:
                    options.append((abs(d), g, t))
        if not options:
            assert np.array_equal(lay, before[0])
            continue
        moved += 1
        _, g, t = min(options)
        expect = before[0].copy()
        expect[p, s], expect[g, t] = before[0][g, t], before[0][p, s]
        assert np.array_equal(lay, expect)
    assert moved > 50


def state_labels(old_lay, new_lay, new_lab):
    """Label ids of ``old_lay``'s slots, from the labels of the same items in ``new_lay``."""
    of_item = {int(i): int(l) for i, l in zip(new_lay.ravel(), new_lab.ravel())}
    return np.vectorize(lambda i: of_item[int(i)])(old_lay)


# -------------------------------------------------------------- refinement


def ref_pair(v, lab, loads, h, l, a_fixed=None):
    """(new max or inf, a, b, mid, half): the swap of packs h, l whose larger load
    ``mid + |v[h, a] - half - v[l, b]|`` is least, first (a, b) on ties, labels never
    doubled; ``a_fixed`` restricts a."""
    P, k = v.shape
    half = 0.5 * (loads[h] - loads[l])
    mid = loads[h] - half
    best, ba, bb = np.inf, 0, 0
    for a in range(k) if a_fixed is None else [a_fixed]:
        for b in range(k):
            if lab[l, b] in lab[h] or lab[h, a] in lab[l]:
                continue
            dev = abs(v[h, a] - half - v[l, b])
            if dev < best:
                best, ba, bb = dev, a, b
    ok = best < loads[h] * (1 - EPS) - mid
    return (mid + best if ok else np.inf), ba, bb, mid, half


def ref_swap(lay, v, lab, loads, p, s, q, t):
    for arr in (lay, v, lab):
        arr[p, s], arr[q, t] = arr[q, t], arr[p, s]
    d = v[q, t] - v[p, s]                  # after the swap: what p gave minus what it got
    loads[p] -= d
    loads[q] += d


def ref_round(lay, v, lab, loads, multi):
    """One refinement round (the rule _refine_round documents), in place."""
    P, k = v.shape
    order = sorted(range(P), key=lambda p: (loads[p], p))
    h = order[-1]
    near, pairs = min(P - 1, 8), min(P // 2, 8)
    res = [ref_pair(v, lab, loads, h, order[j]) for j in range(near)]
    paired = [ref_pair(v, lab, loads, order[P - 1 - i], order[i]) for i in range(pairs)]
    g = min(range(near), key=lambda j: (res[j][0], j))
    cands = [(res[g][1], order[g], res[g][2])]
    ok = [res[g][0] < np.inf]
    items = sorted(range(k), key=lambda s: (-v[h, s], s))
    for i in range(min(k, near)):
        val, a, b, _, _ = ref_pair(v, lab, loads, h, order[i], a_fixed=items[i])
        # ref_pair's test uses the pair's own mid: the same as the near pair's
        cands.append((items[i], order[i], b))
        ok.append(val < np.inf and items[i] != cands[0][0] and order[i] != cands[0][1])
    brought = [lab[c[1], c[2]] for c in cands]
    keep = [ok[0]] + [
        ok[c] and not (multi[brought[c]] and any(ok[j] and brought[j] == brought[c] for j in range(c)))
        for c in range(1, len(cands))
    ]
    accepted, shed, top, going = [], 0.0, -np.inf, True
    for c, (a, l, b) in enumerate(cands):
        if not keep[c]:
            accepted.append(False)
            continue
        d = v[h, a] - v[l, b]
        top = max(top, loads[l] + d)
        going = going and loads[h] - shed > top
        accepted.append(going or c == 0)
        shed += d
    touched = set()
    for c, (a, l, b) in enumerate(cands):
        if accepted[c]:
            ref_swap(lay, v, lab, loads, h, a, l, b)
            touched |= {h, l}
    for i in range(pairs):
        ph, pl = order[P - 1 - i], order[i]
        if paired[i][0] < np.inf and ph not in touched and pl not in touched:
            ref_swap(lay, v, lab, loads, ph, paired[i][1], pl, paired[i][2])
    return ok[0]


@pytest.mark.parametrize("ties", [False, True])
def test_refine_round_matches_reference(ties):
    rng = np.random.default_rng(8 + ties)
    improved = 0
    for _ in range(300):
        P, k = int(rng.integers(2, 12)), int(rng.integers(2, 8))
        values, labels, st = random_state(rng, P, k, ties)
        ref = [a.copy() for a in st]
        lay, v, lab, loads, occ, multi = st
        got = K._refine_round(lay, v, lab, loads, occ, multi, *K._round_work(P, k))
        want = ref_round(ref[0], ref[1], ref[2], ref[3], ref[5])
        assert got == want
        assert np.array_equal(lay, ref[0])
        assert np.allclose(loads, ref[3], rtol=1e-12)
        improved += got
    assert improved > 100


def test_refine_swaps_rounds_match_reference():
    """refine_swaps = rounds of the reference round while the row is above its target
    and its heaviest pack improves."""
    rng = np.random.default_rng(10)
    for trial in range(150):
        P, k = int(rng.integers(2, 9)), int(rng.integers(2, 7))
        values, labels = random_row(rng, P, k, ties=trial % 2 == 0)
        start = rng.permutation(P * k).reshape(1, P, k)
        target = np.array([values.sum() / P * 1.02]) if trial % 3 == 0 else None
        got = H.refine_swaps(values[None, :], labels[None, :], start, target=target, max_rounds=6)
        lay, v, lab, loads, occ, multi = state(values, labels, start[0])
        for _ in range(6):
            if target is not None and loads.max() <= target[0] * (1 + EPS):
                break
            if not ref_round(lay, v, lab, loads, multi):
                break
        assert np.array_equal(got[0], lay)


# ---------------------------------------------------------------- pipeline


def ref_separate(lay, v, lab, loads, cap, rounds):
    """Separation by the rule of test_separation_step_matches_brute_force, repeated."""
    P, k = v.shape
    for _ in range(rounds):
        first = next(((p, s) for p in range(P) for s in range(k) if list(lab[p]).count(lab[p, s]) > 1), None)
        if first is None:
            return
        p, s = first
        row_cap = max(cap, loads.max())
        options = [
            (abs(v[p, s] - v[g, t]), g, t) for g in range(P) for t in range(k)
            if g != p and lab[p, s] not in lab[g] and lab[g, t] not in lab[p]
            and loads[p] - (v[p, s] - v[g, t]) <= row_cap and loads[g] + (v[p, s] - v[g, t]) <= row_cap
        ]
        if not options:
            return
        _, g, t = min(options)
        ref_swap(lay, v, lab, loads, p, s, g, t)


def pack_max(values, lay):
    best = -np.inf
    for row in lay:
        total = 0.0
        for i in row:
            total += values[i]
        best = max(best, total)
    return best


def ref_seeds(values, labels, P):
    """pack_sorted's seeds without a target: the rotated snake, largest differencing on
    the unsplit order when no heavier, then separation of any duplicate."""
    snake, check = ref_snake(list(labels), P, True)
    perm, split = ref_unsplit(list(labels), P)
    kk, _ = ref_kk([values[i] for i in perm], P)
    kk = [[perm[i] for i in row] for row in kk]
    lay, best = snake, pack_max(values, snake)
    if pack_max(values, kk) <= best:
        lay, best, check = kk, pack_max(values, kk), split
    lay = np.array(lay, dtype=np.int64)
    if check:
        lay, v, lab, loads, _, _ = state(values, labels, lay)
        ref_separate(lay, v, lab, loads, best, 64)
    return lay


def test_pack_sorted_seeds_match_reference():
    rng = np.random.default_rng(11)
    for trial in range(200):
        P, k = int(rng.integers(2, 9)), int(rng.integers(2, 8))
        values, labels = random_row(rng, P, k, ties=trial % 2 == 0)
        got = H.pack_sorted(values[None, :], labels[None, :], P, refine_rounds=0)
        assert np.array_equal(got[0], ref_seeds(values, labels, P))


@pytest.mark.parametrize("allow_duplicates", [True, False])
def test_pack_sorted_is_valid_and_no_worse_than_its_seeds(allow_duplicates):
    rng = np.random.default_rng(12)
    for trial in range(60):
        P, k, S = int(rng.integers(2, 9)), int(rng.integers(2, 8)), int(rng.integers(1, 4))
        rows = [random_row(rng, P, k, ties=trial % 2 == 0) for _ in range(2 * S)]
        values = np.array([r[0] for r in rows])
        labels = np.array([r[1] for r in rows])
        bound = np.maximum(values.sum(axis=1) / P, values[:, 0])
        target = np.repeat(bound.reshape(-1, S).max(axis=1), S) if trial % 2 else None
        kw = dict(target=target, segment_size=S, allow_duplicates=allow_duplicates)
        seeds = H.pack_sorted(values, labels, P, refine_rounds=0, **kw)
        out = H.pack_sorted(values, labels, P, refine_rounds=4, **kw)
        assert (np.sort(out.reshape(2 * S, -1), axis=1) == np.arange(P * k)).all()
        seg = lambda lay: H.pack_loads(values, lay).max(axis=1).reshape(-1, S).max(axis=1)
        assert (seg(out) <= seg(seeds) * (1 + 1e-12)).all()
        if not allow_duplicates:
            lab = np.take_along_axis(labels, out.reshape(2 * S, -1), axis=1).reshape(out.shape)
            lab.sort(axis=-1)
            assert not (lab[..., 1:] == lab[..., :-1]).any()


def test_doubled_matches_plain_check():
    """_doubled: some pack holds two items of one label (the seeds' separation runs
    only then); the label table comes back all -1."""
    rng = np.random.default_rng(21)
    seen = set()
    for trial in range(400):
        P, k = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        values, labels = random_row(rng, P, k, ties=trial % 3 == 0)
        lay = rng.permutation(P * k).reshape(P, k).astype(np.int64)
        table = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
        got = K._doubled(labels, lay, table)
        want = any(len(set(labels[lay[p]].tolist())) < k for p in range(P))
        assert got == want, (labels, lay)
        assert (table == -1).all()
        seen.add(bool(got))
    assert seen == {True, False}
