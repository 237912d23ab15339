"""The compiled kernels of replica counts, group placement and pair re-splits (issue 15),
pinned against plain references: brute force where a kernel claims an optimum (the
counts, the best group partition, the exact pair split) and plain Python loops where
it claims to follow a rule step by step (the replica-count rule and its reverse, a
re-split round's choice of pairs).  The references below share no code with
``heuristics``.
"""

from itertools import combinations

import numpy as np
import pytest

from eplb_opt.heuristics import apportion as A
from eplb_opt.heuristics.apportion import add_replicas, remove_replicas, replica_counts
from eplb_opt.heuristics.grouping import groups_to_nodes
from eplb_opt.heuristics.resplit import MAX_FREE, resplit_rounds, split_pairs

REL = 1e-12


# ------------------------------------------------------------------ replica counts


def _rule_steps(w, c, num, cap, frozen):
    """The rule, plain loops: each step one replica to the open expert (below ``cap``,
    not frozen) with the largest ``w / c``, the lowest index on ties."""
    c = [int(x) for x in c]
    for _ in range(num):
        best = -1
        for e in range(len(w)):
            if c[e] < cap and not frozen[e] and (best < 0 or w[e] / c[e] > w[best] / c[best]):
                best = e
        if best < 0:
            break
        c[best] += 1
    return c


def _reverse_steps(w, c, num, frozen):
    """The reverse rule, plain loops: each step one replica from the open expert
    (``c > 1``, not frozen) with the smallest ``w / (c - 1)``, the lowest index on ties."""
    c = [int(x) for x in c]
    for _ in range(num):
        best = -1
        for e in range(len(w)):
            if c[e] > 1 and not frozen[e] and (best < 0 or w[e] / (c[e] - 1) < w[best] / (c[best] - 1)):
                best = e
        if best < 0:
            break
        c[best] -= 1
    return c


def _all_counts(E, R, cap):
    """Every count vector (each ``1..cap``) of ``E`` experts summing to ``R``."""
    if E == 1:
        if 1 <= R <= cap:
            yield (R,)
        return
    for c in range(1, min(cap, R - E + 1) + 1):
        for rest in _all_counts(E - 1, R - c, cap):
            yield (c,) + rest


def _loads(rng, rows, E, kind):
    if kind == 0:
        return rng.integers(0, 4, size=(rows, E)).astype(np.float64)        # ties and zeros
    if kind == 1:
        return rng.random((rows, E)) * rng.choice([1e-300, 1.0, 1e300])
    return rng.pareto(1.0, size=(rows, E))


def test_counts_are_the_optimum_by_brute_force():
    """The largest per-replica load of the counts is the smallest over every count
    vector within the cap (float quotients, compared exactly)."""
    rng = np.random.default_rng(151)
    for trial in range(300):
        E, rows = int(rng.integers(1, 6)), 3
        R = E + int(rng.integers(0, 10))
        cap = None if trial % 3 == 0 else int(rng.integers(1, 5))
        eff_cap = R if cap is None else max(cap, -(-R // E))
        w = _loads(rng, rows, E, trial % 3)
        c = replica_counts(w, R, max_count=cap)
        assert (c.sum(axis=1) == R).all() and (c >= 1).all() and (c <= eff_cap).all()
        for r in range(rows):
            best = min(max(w[r, e] / cv[e] for e in range(E)) for cv in _all_counts(E, R, eff_cap))
            assert (w[r] / c[r]).max() == best, (w[r], R, cap, c[r])


def test_counts_are_the_rule_step_by_step():
    """Distinct loads: the counts equal the plain-loop rule from one replica each, with
    few spares (no certain seat) and with many (the threshold fixes most of them)."""
    rng = np.random.default_rng(152)
    for trial in range(300):
        E, rows = int(rng.integers(1, 40)), 2
        R = E + [int(rng.integers(1, 10)), int(rng.integers(10, 6 * E + 20))][trial % 2]
        cap = None if trial % 4 == 0 else int(rng.integers(1, 8))
        eff_cap = R if cap is None else max(cap, -(-R // E))
        w = rng.random((rows, E)) * rng.choice([1e-200, 1.0, 1e200])
        c = replica_counts(w, R, max_count=cap)
        for r in range(rows):
            assert c[r].tolist() == _rule_steps(w[r], [1] * E, R - E, eff_cap, [False] * E), (E, R, cap)


def test_seats_above_a_threshold_are_counted_on_the_quotients():
    """_seats_above counts, per expert, the ``j < cap`` with the float quotient ``w / j``
    above ``t`` (strictly: a seat equal to ``t`` is not counted), thresholds taken at
    seat values themselves included; when there are at most as many as the spares, the
    rule hands out every one of them (_certain_seats keeps only such thresholds)."""
    rng = np.random.default_rng(154)
    for trial in range(300):
        E = int(rng.integers(1, 12))
        cap = int(rng.integers(1, 9))
        w = _loads(rng, 1, E, trial % 3)[0]
        seats = [w[e] / j for e in range(E) for j in range(1, cap)]
        t = float(rng.choice(seats)) if seats and trial % 2 else float(rng.random() * (w.max() + 1e-300))
        if t <= 0:
            continue
        c = np.empty(E, dtype=np.int64)
        got = A._seats_above(w, t, cap, c)
        want = [1 + sum(1 for j in range(1, cap) if w[e] / j > t) for e in range(E)]
        assert c.tolist() == want and got == sum(want) - E, (w, t, cap)
        extra = int(rng.integers(1, 3 * E + 2))
        total = float(w.sum())
        if total > 0 and total < np.inf:
            cc = np.empty(E, dtype=np.int64)
            certain = A._certain_seats(w, total, extra, max(cap, 2), cc, np.empty(E, dtype=np.int64))
            assert certain == cc.sum() - E <= extra
            rule = _rule_steps(w, [1] * E, extra, max(cap, 2), [False] * E)
            assert all(a <= b for a, b in zip(cc.tolist(), rule)), (w, extra, cap)


def test_all_zero_rows_get_the_spares_round_robin():
    c = replica_counts(np.zeros((2, 4)), 11, max_count=1)
    assert c.tolist() == [[3, 3, 3, 2]] * 2


def test_add_and_remove_replicas_follow_the_plain_loops():
    """Ties included (the lowest index), frozen experts, caps, and rows that stop early."""
    rng = np.random.default_rng(153)
    for trial in range(400):
        E, rows = int(rng.integers(1, 12)), int(rng.integers(1, 4))
        cap = int(rng.integers(1, 6))
        w = _loads(rng, rows, E, trial % 3)
        c = rng.integers(1, cap + 1, size=(rows, E))
        frozen = rng.random((rows, E)) < 0.25
        num = rng.integers(0, 3 * E, size=rows)
        got = add_replicas(w, c, num, cap, frozen=frozen)
        back = remove_replicas(w, c, num, frozen=frozen)
        for r in range(rows):
            assert got[r].tolist() == _rule_steps(w[r], c[r], num[r], cap, frozen[r])
            assert back[r].tolist() == _reverse_steps(w[r], c[r], num[r], frozen[r])
    assert add_replicas(np.ones((1, 3)), np.ones((1, 3), dtype=np.int64), 2, 5).tolist() == [[2, 2, 1]]


# ------------------------------------------------------------------ group placement


def _partitions(groups, nodes):
    """Every partition of ``range(groups)`` into ``nodes`` unordered blocks of equal size."""
    m = groups // nodes

    def rec(left):
        if not left:
            yield ()
            return
        for others in combinations(left[1:], m - 1):
            block = (left[0],) + others
            for tail in rec(tuple(g for g in left if g not in block)):
                yield (block,) + tail

    return list(rec(tuple(range(groups))))


def _block_loads(gl, part):
    out = []
    for block in part:
        s = 0.0
        for g in block:                     # group by group, in index order
            s += gl[g]
        out.append(s)
    return out


@pytest.mark.parametrize("groups, nodes", [(4, 2), (6, 3), (8, 4), (6, 2), (9, 3), (12, 4), (8, 2), (12, 3)])
def test_groups_to_nodes_is_the_best_partition_by_brute_force(groups, nodes):
    """The heaviest node is the smallest over every partition (exactly, as floats summed
    group by group), and the assignment returned attains it."""
    rng = np.random.default_rng(groups * 100 + nodes)
    parts = _partitions(groups, nodes)
    for trial in range(6):
        gl = rng.pareto(1.2, size=(4, groups)) if trial % 2 else rng.integers(0, 5, size=(4, groups)).astype(float)
        node, worst, exact = groups_to_nodes(gl, nodes)
        assert exact
        for l in range(4):
            assert (np.bincount(node[l], minlength=nodes) == groups // nodes).all()
            best = min(max(_block_loads(gl[l], p)) for p in parts)
            assert worst[l] == best
            mine = tuple(tuple(np.flatnonzero(node[l] == n).tolist()) for n in range(nodes))
            assert max(_block_loads(gl[l], mine)) == best


@pytest.mark.parametrize("groups, nodes", [(6, 2), (9, 3), (12, 4), (8, 2), (12, 3)])
def test_enumerated_placement_is_the_most_even_optimum(groups, nodes):
    """Beyond two groups per node, among the optimal partitions the one returned has the
    smallest sum of squared node loads."""
    rng = np.random.default_rng(groups * 10 + nodes)
    parts = _partitions(groups, nodes)
    for _ in range(6):
        gl = rng.random((3, groups))
        node, _, _ = groups_to_nodes(gl, nodes)
        for l in range(3):
            loads = [_block_loads(gl[l], p) for p in parts]
            best = min(max(x) for x in loads)
            even = min(sum(v * v for v in x) for x in loads if max(x) == best)
            want = [p for p, x in zip(parts, loads) if max(x) == best and sum(v * v for v in x) == even]
            got = {frozenset(np.flatnonzero(node[l] == n).tolist()) for n in range(nodes)}
            assert got in [{frozenset(b) for b in p} for p in want]


# ------------------------------------------------------------------ exact pair splits


def _valid_first_packs(labels, k):
    """Every choice of ``k`` of the ``2k`` items for the first pack that keeps the items
    of a label apart: of a label's ``c`` items it takes ``floor(c / 2)`` or ``ceil(c / 2)``."""
    count = {}
    for x in labels:
        count[x] = count.get(x, 0) + 1
    for first in combinations(range(2 * k), k):
        mine = {}
        for i in first:
            mine[labels[i]] = mine.get(labels[i], 0) + 1
        if all(c // 2 <= mine.get(x, 0) <= (c + 1) // 2 for x, c in count.items()):
            yield first


def _heavier(values, first):
    a = sum(values[i] for i in first)
    return max(a, sum(values) - a)


def _pair(rng, k, kind):
    """``2k`` items of a pair: labels with repeats, one load per label."""
    labels = rng.integers(0, max(1, int(1.5 * k)), size=2 * k)
    per_label = rng.random(2 * k) if kind else rng.integers(1, 6, size=2 * k).astype(float)
    return per_label[labels], labels


def test_split_pairs_is_the_best_split_by_brute_force():
    rng = np.random.default_rng(154)
    for trial in range(300):
        k, pairs = int(rng.integers(1, 6)), 3
        vl = [_pair(rng, k, trial % 2) for _ in range(pairs)]
        values = np.array([v for v, _ in vl])
        labels = np.array([lab for _, lab in vl])
        side, heavier = split_pairs(values, labels)
        for p in range(pairs):
            first = tuple(np.flatnonzero(side[p]).tolist())
            lab = labels[p].tolist()
            assert first in set(_valid_first_packs(lab, k))
            assert heavier[p] == pytest.approx(_heavier(values[p].tolist(), first), rel=REL)
            best = min(_heavier(values[p].tolist(), f) for f in _valid_first_packs(lab, k))
            assert heavier[p] == pytest.approx(best, rel=REL), (values[p], lab)


def test_split_pairs_leaves_pairs_with_too_many_free_items():
    k = MAX_FREE + 1
    values = np.arange(2.0 * k)[None]
    side, heavier = split_pairs(values, np.arange(2 * k)[None])
    assert side[0].tolist() == [True] * k + [False] * k
    assert heavier[0] == values[0, k:].sum()


# ------------------------------------------------------------------ re-split rounds


def _pack_load(values, pack):
    s = 0.0
    for i in pack:
        s += values[i]
    return s


def _row_pairs(loads, partners):
    """The pairs a round tries: (i-th heaviest, i-th lightest), then the heaviest with
    the 2nd..partners-th lightest (loads sorted stably)."""
    P = len(loads)
    order = sorted(range(P), key=lambda p: loads[p])
    extra = max(min(partners, P - 1) - 1, 0)
    return ([(order[P - 1 - j], order[j]) for j in range(P // 2)]
            + [(order[P - 1], order[1 + j]) for j in range(extra)], P // 2)


def _reference_round(values, packs, partners):
    """One round on one row (distinct items), plain loops with brute-force splits;
    returns whether the row changed."""
    loads = [_pack_load(values, p) for p in packs]
    pairs, half = _row_pairs(loads, partners)
    gains, firsts = [], []
    for hp, lp in pairs:
        items = packs[hp] + packs[lp]
        k = len(packs[hp])
        total = sum(values[i] for i in items)
        first = min(combinations(items, k), key=lambda f: max(sum(values[i] for i in f),
                                                                total - sum(values[i] for i in f)))
        heavier = max(_pack_load(values, first), _pack_load(values, [i for i in items if i not in first]))
        old = max(loads[hp], loads[lp])
        gains.append(old - heavier if heavier < old * (1 - REL) else 0.0)
        firsts.append(first)
    best = max(range(half, len(pairs)), key=lambda j: (gains[j], -j), default=None)
    swap_in = best is not None and gains[best] > gains[0]
    apply = [j for j in range(half) if gains[j] > 0]
    if swap_in:
        partner = pairs[best][1]
        apply = [j for j in apply if j != 0 and partner not in pairs[j]] + [best]
    for j in apply:
        hp, lp = pairs[j]
        items = packs[hp] + packs[lp]
        packs[hp] = [i for i in items if i in firsts[j]]
        packs[lp] = [i for i in items if i not in firsts[j]]
    return bool(apply)


def _reference_rounds(values, layout, target, max_rounds, segment_size, partners):
    rows = layout.shape[0]
    packs = [[list(p) for p in layout[r].tolist()] for r in range(rows)]
    stuck = [False] * rows
    for _ in range(max_rounds):
        top = [max(_pack_load(values[r], p) for p in packs[r]) for r in range(rows)]
        active = [r for r in range(rows) if not stuck[r]
                  and (target is None or top[r] > target[r] * (1 + REL))
                  and top[r] >= max(top[r - r % segment_size : r - r % segment_size + segment_size]) * (1 - REL)]
        if not active:
            break
        for r in active:
            stuck[r] = not _reference_round(values[r].tolist(), packs[r], partners)
    return packs


def _canonical(packs):
    return sorted(tuple(sorted(p)) for p in packs)


def test_resplit_rounds_follow_the_reference_rounds():
    """Rows of distinct items: after 1..6 rounds the packs are the reference's (as sets:
    a split and its mirror image are the same), with and without targets, segments and
    extra partners."""
    rng = np.random.default_rng(155)
    for trial in range(100):
        P, k = int(rng.integers(2, 7)), int(rng.integers(1, 5))
        segment_size = int(rng.integers(1, 4))
        rows = segment_size * int(rng.integers(1, 3))
        values = rng.random((rows, P * k)) ** 2
        layout = np.stack([rng.permutation(P * k).reshape(P, k) for _ in range(rows)])
        target = values.sum(axis=1) / P * (1 + rng.random(rows) * 0.05) if trial % 2 else None
        partners, max_rounds = int(rng.integers(1, P + 1)), int(rng.integers(1, 7))
        got, _ = resplit_rounds(values, np.tile(np.arange(P * k), (rows, 1)), layout, target=target,
                                max_rounds=max_rounds, segment_size=segment_size, partners=partners)
        want = _reference_rounds(values, layout, target, max_rounds, segment_size, partners)
        for r in range(rows):
            assert _canonical(got[r].tolist()) == _canonical(want[r]), (trial, r)


def test_resplit_rounds_end_where_no_pair_of_a_round_gains():
    """Repeated labels (replicas of one expert): when the rounds stop, every pair the
    next round would try has no better split that keeps labels apart (brute force)."""
    rng = np.random.default_rng(156)
    for trial in range(60):
        P, k, rows = int(rng.integers(2, 6)), int(rng.integers(1, 5)), 3
        labels = rng.integers(0, max(2, P * k // 2), size=(rows, P * k))
        per_label = rng.random((rows, P * k)) if trial % 2 else rng.integers(1, 9, size=(rows, P * k)) * 1.0
        values = np.take_along_axis(per_label, labels, axis=1)
        layout = np.stack([rng.permutation(P * k).reshape(P, k) for _ in range(rows)])
        before = [max(_pack_load(values[r], p) for p in layout[r].tolist()) for r in range(rows)]
        got, rounds = resplit_rounds(values, labels, layout, max_rounds=1000, partners=P - 1)
        assert rounds < 1000
        for r in range(rows):
            assert sorted(got[r].ravel().tolist()) == list(range(P * k))
            packs = got[r].tolist()
            loads = [_pack_load(values[r], p) for p in packs]
            assert max(loads) <= before[r]
            for hp, lp in _row_pairs(loads, P - 1)[0]:
                items = packs[hp] + packs[lp]
                vals = [values[r, i] for i in items]
                labs = [int(labels[r, i]) for i in items]
                best = min(_heavier(vals, f) for f in _valid_first_packs(labs, k))
                assert best >= max(loads[hp], loads[lp]) * (1 - REL), (trial, r, hp, lp)


# ------------------------------------------------------------------ place's count step


def test_place_count_step_is_the_rule_and_the_item_order():
    """pipeline._counts_step on every node row: the counts are the plain-loop rule (few
    spares, where the rule starts from the sorted experts, and many), minus the
    per-replica loads, and the experts in order of them: with few spares ties by index
    (the experts given spares are merged back into the order taken first), with many
    numpy's argsort; loads with ties and zeros included."""
    from eplb_opt.heuristics import pipeline as pp

    rng = np.random.default_rng(154)
    for trial in range(300):
        N = int(rng.choice([1, 2, 4]))
        m = int(rng.choice([3, 8, 20, 70]))
        gpus = N * int(rng.integers(1, 4))
        R = gpus * int(rng.integers(-(-N * m // gpus), -(-N * m // gpus) + [2, 6, 40][trial // 3 % 3]))
        w = _loads(rng, 2, N * m, trial % 3)
        if trial % 7 == 0:
            w[0] = 0.0
        nog, _, experts, neg, cnt, logcnt, order, settled = pp._counts_step(w, R, N, N, gpus, None)
        assert settled == (R // N - m <= A._FEW)
        extra, cap = R // N - m, max(gpus // N, -(-(R // N) // m))
        for l in range(2):
            for nd in range(N):
                row = [w[l, x] for x in experts[l, nd]]
                want = _rule_steps(row, [1] * m, extra, cap, [False] * m)
                if max(row) <= 0:                         # all zero: round-robin
                    want = [1 + extra // m + (j < extra % m) for j in range(m)]
                assert cnt[l, nd].tolist() == want, (row, extra, cap)
                keys = [-(row[j] / want[j]) for j in range(m)]
                assert neg[l, nd].tolist() == keys
                if extra <= A._FEW:                      # the order kept through the counts
                    assert order[l, nd].tolist() == sorted(range(m), key=lambda j: (keys[j], j)), (row, want)
                else:                                     # numpy's argsort, settled by the packing
                    assert sorted(order[l, nd].tolist()) == list(range(m))
                    assert all(keys[a] <= keys[b] for a, b in zip(order[l, nd][:-1], order[l, nd][1:]))
                assert [logcnt[l, x] for x in experts[l, nd]] == want


@pytest.mark.parametrize("groups, nodes", [(1, 1), (4, 1), (4, 4), (4, 2), (8, 4), (10, 5)])
def test_place_group_step_is_the_pairing_and_the_node_rows(groups, nodes):
    """pipeline._counts_step's step 1 where it has a closed form (one node, one or two
    groups per node, computed in one kernel with the node rows): the assignment
    groups_to_nodes makes on numpy's group loads, and each node's experts (its groups in
    index order) with minus their per-replica loads after the counts, by plain loops;
    ties and zero loads included."""
    from eplb_opt.heuristics import pipeline as pp

    rng = np.random.default_rng(groups * 7 + nodes)
    for trial in range(12):
        gs = int(rng.choice([1, 3, 8, 32, 128]))
        L, E = 3, groups * gs
        w = _loads(rng, L, E, trial % 3)
        if trial % 4 == 0:
            w[1] = 0.0
        assert pp._closed_form(E, groups, nodes)
        gpus = nodes * 2
        R = gpus * -(-E // gpus)
        nog, exact, experts, neg, cnt = pp._counts_step(w, R, groups, nodes, gpus, None)[:5]
        want, _, _ = groups_to_nodes(w.reshape(L, groups, gs).sum(axis=2), nodes)
        assert exact and nog.tolist() == want.tolist(), (trial, gs)
        for l in range(L):
            for nd in range(nodes):
                mine = [g * gs + t for g in range(groups) if want[l, g] == nd for t in range(gs)]
                assert experts[l, nd].tolist() == mine
                assert neg[l, nd].tolist() == [-(w[l, x] / c) for x, c in zip(mine, cnt[l, nd])]
