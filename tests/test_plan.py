"""The independent verifier catches every broken invariant; derived maps are right."""

import numpy as np
import pytest
import torch

from eplb_opt import InvalidPlanError, derive_maps, plan_violations, verify

# 8 experts in 4 groups (2 each), 2 nodes, 4 GPUs, 12 replicas (k = 3).
E, R, G, NG, NN = 8, 12, 4, 4, 2
GOOD = np.array([[0, 1, 0, 2, 3, 1,  4, 5, 6, 7, 4, 6]])


def check(p, **kw):
    return plan_violations(p, E, R, G, num_groups=NG, num_nodes=NN, hierarchical=True, **kw)


def test_good_plan_passes():
    assert check(GOOD) == []
    log2phy, logcnt = derive_maps(GOOD, E)
    assert check(GOOD, log2phy=log2phy, logcnt=logcnt) == []
    verify(torch.from_numpy(GOOD), E, R, G, num_groups=NG, num_nodes=NN, hierarchical=True)


def test_derive_maps_roundtrip():
    log2phy, logcnt = derive_maps(GOOD, E)
    assert log2phy.shape == (1, E, R - E + 1)
    assert logcnt.tolist() == [[2, 2, 1, 1, 2, 1, 2, 1]]
    assert log2phy[0, 0].tolist() == [0, 2, -1, -1, -1]
    for e in range(E):
        slots = log2phy[0, e][log2phy[0, e] >= 0]
        assert (GOOD[0, slots] == e).all()


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda p: p.__setitem__((0, 2), 8), "not an expert id"),
        (lambda p: p.__setitem__((0, 2), -1), "not an expert id"),
        (lambda p: p.__setitem__((0, 3), 0), "expert 2 has no replica"),
        # expert 4 (group 2, node 1) replaces a slot on node 0: group 2 split.
        (lambda p: p.__setitem__((0, 5), 4), "group 2 is split across nodes"),
    ],
)
def test_violations_are_named(mutate, pattern):
    p = GOOD.copy()
    mutate(p)
    problems = check(p)
    assert any(pattern in s for s in problems), problems
    with pytest.raises(InvalidPlanError, match=pattern):
        verify(p, E, R, G, num_groups=NG, num_nodes=NN, hierarchical=True)


def test_groups_per_node_rule():
    # Node 0 holds groups 0, 1 and 2; node 1 holds group 3 only: every group is whole
    # but the node counts are wrong.
    p = np.array([[0, 1, 2, 3, 4, 5,  6, 7, 6, 7, 6, 7]])
    assert any("holds 3 groups" in s for s in check(p))


def test_shape_and_dtype():
    assert "shape" in check(GOOD[:, :10])[0]
    assert "integers" in check(GOOD.astype(float))[0]
    assert "shape" in plan_violations(GOOD, E, R, G, num_layers=2)[0]
    assert any("same slot count" in s for s in plan_violations(GOOD, E, R, 5))


def test_map_mismatches():
    log2phy, logcnt = derive_maps(GOOD, E)
    bad_cnt = logcnt.copy()
    bad_cnt[0, 0] = 3
    assert any("logcnt[0, 0]" in s for s in check(GOOD, logcnt=bad_cnt))
    bad_map = log2phy.copy()
    bad_map[0, 0, 0], bad_map[0, 1, 0] = bad_map[0, 1, 0], bad_map[0, 0, 0]
    assert any("another expert" in s for s in check(GOOD, log2phy=bad_map))
    gap = log2phy.copy()
    gap[0, 0, 0] = -1
    assert any("first logcnt" in s for s in check(GOOD, log2phy=gap))
    twice = log2phy.copy()
    twice[0, 0, 1] = twice[0, 0, 0]
    assert any("exactly once" in s for s in check(GOOD, log2phy=twice))


# --- The verifier's compiled kernels (eplb_opt.verify_kernels) against plain loops ---
#
# Each reference below is the rule written as directly as Python allows; the kernels are
# called on many small random plans (valid ones, and ones with 1-3 entries broken), and
# every answer must be the reference's.

from eplb_opt import verify_kernels as vk  # noqa: E402

CASES = 400


def random_plan(rng, masked_ok=True):
    """``(p [L, R], E, G, mask [L, G] or None)``: a random small plan, often valid, with
    some empty GPUs (``-1``) and some broken entries."""
    L, G, k = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
    R = G * k
    E = int(rng.integers(1, R + 1))
    p = np.array([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R - E)])) for _ in range(L)],
                 dtype=np.int64).reshape(L, R)
    mask = None
    if masked_ok and rng.random() < 0.4:
        mask = rng.random((L, G)) < 0.3
        p[np.repeat(mask, k, axis=1)] = -1
    for _ in range(int(rng.integers(0, 4))):
        p[rng.integers(L), rng.integers(R)] = rng.integers(-2, E + 2)
    return p, E, G, mask


def ref_slot_maps(p, E, width):
    L, R = p.shape
    m, c, bad = np.full((L, E, width), -1), np.zeros((L, E), dtype=np.int64), -1
    for l in range(L):
        for s in range(R):
            e = p[l, s]
            if e >= E and bad < 0:
                bad = l * R + s
            if 0 <= e < E and bad < 0:
                if c[l, e] < width:
                    m[l, e, c[l, e]] = s
                c[l, e] += 1
    return m, c, bad


def test_slot_maps_matches_plain_loops():
    """Given widths, and ``-1``: ``R - E + 1``, or ``R - E`` where a slot is empty."""
    rng = np.random.default_rng(1)
    for case in range(CASES):
        p, E, _, _ = random_plan(rng)
        width = int(rng.integers(0, 4)) if case % 2 else -1
        m, c, bad = vk.slot_maps(p, E, width)
        if width < 0:
            width = max(p.shape[1] - E + (0 if (p < 0).any() else 1), 0)
            assert m.shape[2] == width, (p, E)
        rm, rc, rbad = ref_slot_maps(p, E, width)
        assert bad == rbad, p
        if bad < 0:
            assert np.array_equal(m, rm) and np.array_equal(c, rc), p


def test_expert_counts_matches_plain_loops():
    rng = np.random.default_rng(2)
    for _ in range(CASES):
        p, E, _, _ = random_plan(rng)
        empty = p == -1
        cnt, bad = vk.expert_counts(p, empty, E)
        slots = [(l, s) for l in range(p.shape[0]) for s in range(p.shape[1]) if not empty[l, s]]
        first_bad = next((l * p.shape[1] + s for l, s in slots if not 0 <= p[l, s] < E), -1)
        assert bad == first_bad, p
        if bad < 0:
            ref = np.zeros((p.shape[0], E), dtype=np.int64)
            for l, s in slots:
                ref[l, p[l, s]] += 1
            assert np.array_equal(cnt, ref), p


def test_masked_mismatches_matches_plain_loops():
    rng = np.random.default_rng(3)
    for _ in range(CASES):
        p, _, G, _ = random_plan(rng)
        mask = rng.random((p.shape[0], G)) < 0.3
        limit = int(rng.integers(0, 4))
        empty, where, total = vk.masked_mismatches(p, mask, limit)
        k = p.shape[1] // G
        ref_empty = np.array([[mask[l, s // k] for s in range(p.shape[1])] for l in range(p.shape[0])])
        wrong = [(l, s) for l in range(p.shape[0]) for s in range(p.shape[1]) if ref_empty[l, s] != (p[l, s] == -1)]
        assert np.array_equal(empty, ref_empty) and total == len(wrong), p
        assert where.tolist() == [list(x) for x in wrong[:limit]], p


def test_duplicate_gpus_matches_plain_loops():
    rng = np.random.default_rng(4)
    for _ in range(CASES):
        p, E, G, mask = random_plan(rng)
        # The verifier checks ids and the mask first: valid ids, whole GPUs empty.
        p = np.where((p < 0) | (p >= E), 0, p)
        empty = np.zeros(p.shape, dtype=bool) if mask is None else np.repeat(mask, p.shape[1] // G, axis=1)
        p[empty] = -1
        limit = int(rng.integers(0, 4))
        where, total = vk.duplicate_gpus(p, empty, G, E, limit)
        k = p.shape[1] // G
        ref = []
        for l in range(p.shape[0]):
            for g in range(G):
                held = [int(e) for e in p[l, g * k:(g + 1) * k]]
                if not empty[l, g * k] and len(set(held)) < len(held):
                    ref.append([l, g])
        assert total == len(ref) and where.tolist() == ref[:limit], p


def test_group_nodes_matches_plain_loops():
    rng = np.random.default_rng(5)
    for _ in range(CASES):
        nn = int(rng.integers(1, 4))
        ng, gs = nn * int(rng.integers(1, 3)), int(rng.integers(1, 4))
        R = nn * int(rng.integers(1, 5))
        p = rng.integers(0, ng * gs, (int(rng.integers(1, 4)), R))
        present = vk.group_nodes(p, gs, ng, nn)
        ref = np.zeros((p.shape[0], ng, nn), dtype=bool)
        for l in range(p.shape[0]):
            for s in range(R):
                ref[l, p[l, s] // gs, s // (R // nn)] = True
        assert np.array_equal(present, ref), p


def ref_log2phy_fault(m, p, cnt, empty):
    """The first rule broken, in plan_violations' order: layout, range, expert, once."""
    L, E, X = m.shape
    R = p.shape[1]
    rows = [(l, e, list(m[l, e])) for l in range(L) for e in range(E)]
    if any(v < 0 if j < cnt[l, e] else v != -1 for l, e, row in rows for j, v in enumerate(row)):
        return vk.LOG2PHY_LAYOUT
    listed = [(l, e, v) for l, e, row in rows for v in row[:cnt[l, e]]]
    if any(v >= R for _, _, v in listed):
        return vk.LOG2PHY_RANGE
    if any(p[l, v] != e for l, e, v in listed):
        return vk.LOG2PHY_EXPERT
    times = {(l, s): 0 for l in range(L) for s in range(R)}
    for l, _, v in listed:
        times[l, v] += 1
    if any(times[l, s] != (0 if empty[l, s] else 1) for l in range(L) for s in range(R)):
        return vk.LOG2PHY_ONCE
    return vk.LOG2PHY_OK


def test_log2phy_fault_matches_plain_loops():
    rng = np.random.default_rng(6)
    seen = set()
    for _ in range(CASES):
        p, E, _, _ = random_plan(rng)
        p = np.where((p < -1) | (p >= E), 0, p)
        m, cnt, _ = vk.slot_maps(p, E, p.shape[1] - E + 1)
        for _ in range(int(rng.integers(0, 3))):         # break 0-2 entries of the map
            l, e, j = (int(rng.integers(n)) for n in m.shape)
            m[l, e, j] = rng.integers(-2, p.shape[1] + 2)
        fault = vk.log2phy_fault(m, p, cnt, p == -1)
        assert fault == ref_log2phy_fault(m, p, cnt, p == -1), (p, m)
        seen.add(int(fault))
    assert seen == {0, 1, 2, 3, 4}                      # every answer was exercised


def ref_plan_ok(p, E, G, gs, nn, gpn, hierarchical, allow_dup, logcnt):
    """Every rule of plan_ok written out: ids, a replica each, counts, duplicates, groups."""
    L, R = p.shape
    k, per_node = R // G, R // nn
    for l in range(L):
        row = [int(e) for e in p[l]]
        if any(not 0 <= e < E for e in row):
            return False
        cnt = [row.count(e) for e in range(E)]
        if 0 in cnt or (logcnt is not None and cnt != logcnt[l].tolist()):
            return False
        if not allow_dup and any(len(set(row[g * k:(g + 1) * k])) < k for g in range(G)):
            return False
        if hierarchical:
            nodes = [{row[s] // gs for s in range(n * per_node, (n + 1) * per_node)} for n in range(nn)]
            if any(len(a & b) for i, a in enumerate(nodes) for b in nodes[i + 1:]):
                return False
            if any(len(groups) != gpn for groups in nodes):
                return False
    return True


def test_plan_ok_matches_plain_loops():
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(4 * CASES):
        nn = int(rng.integers(1, 4))
        gpn, gs = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        E = nn * gpn * gs
        G = nn * int(rng.integers(1, 3))
        R = G * int(rng.integers(1, 4))
        if R < E or R % nn:
            continue
        hierarchical = bool(rng.random() < 0.6) and (R // nn) >= gpn * gs
        if hierarchical:
            # A valid hierarchical plan: node n's slots hold its own groups' experts.
            order = rng.permutation(nn * gpn)
            rows = []
            for _ in range(int(rng.integers(1, 3))):
                row = []
                for n in range(nn):
                    mine = np.concatenate([np.arange(g * gs, (g + 1) * gs) for g in order[n * gpn:(n + 1) * gpn]])
                    row += rng.permutation(np.concatenate([mine, rng.choice(mine, R // nn - mine.size)])).tolist()
                rows.append(row)
            p = np.array(rows, dtype=np.int64)
        else:
            p = np.array([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R - E)]))
                          for _ in range(int(rng.integers(1, 3)))], dtype=np.int64)
        for _ in range(int(rng.integers(0, 3))):               # break 0-2 entries
            p[rng.integers(p.shape[0]), rng.integers(R)] = rng.integers(-1, E + 1)
        cnt = np.array([[int((row == e).sum()) for e in range(E)] for row in p], dtype=np.int64)
        if rng.random() < 0.2:
            cnt[0, rng.integers(E)] += 1
        allow_dup = bool(rng.random() < 0.5)
        has = bool(rng.random() < 0.5)
        got = vk.plan_ok(p, E, G, gs, nn, gpn, hierarchical, allow_dup, cnt, has)
        want = ref_plan_ok(p, E, G, gs, nn, gpn, hierarchical, allow_dup, cnt if has else None)
        assert got == want, (p, E, G, gs, nn, gpn, hierarchical, allow_dup, has)
        # The message path agrees: valid exactly when no violation is listed.
        if hierarchical:
            msgs = plan_violations(p, E, R, G, num_groups=nn * gpn, num_nodes=nn, hierarchical=True,
                                   allow_duplicates=allow_dup, logcnt=cnt if has else None)
            assert (msgs == []) == want, (p, msgs)
        seen.add(bool(got))
    assert seen == {True, False}


def test_plan_ok_counts_groups_per_node():
    # Every group whole on one node, but node 0 holds 3 groups and node 1 one.
    p = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 6, 7, 6, 7]])
    cnt = np.zeros((1, 1), dtype=np.int64)
    assert not ref_plan_ok(p, E, G, 2, NN, 2, True, True, None)
    assert not vk.plan_ok(p, E, G, 2, NN, 2, True, True, cnt, False)
    assert vk.plan_ok(GOOD, E, G, 2, NN, 2, True, True, cnt, False)


def test_checked_maps_are_the_maps_and_the_verdict():
    """``plan.derive_checked_maps`` (rebalance_experts' one call) gives derive_maps'
    arrays for a plan verify passes, and ``None`` for every plan verify rejects: an id
    out of range, an expert without a replica, a group split across nodes, a node with
    the wrong number of groups; and for sizes that do not divide."""
    from eplb_opt.plan import derive_checked_maps, derive_maps, plan_violations

    rng = np.random.default_rng(16)
    seen = {True: 0, False: 0}
    for trial in range(300):
        ng, nn, gs = [(1, 1, 4), (4, 2, 2), (6, 3, 1), (4, 4, 3)][trial % 4]
        E, G = ng * gs, nn * int(rng.integers(1, 3))
        R = G * int(rng.integers(-(-E // G), -(-E // G) + 3))
        hier = ng > 1
        from eplb_opt.heuristics import place

        w = rng.random((2, E))
        p = place(w, R, ng, nn, G).phy2log.copy()
        if trial % 3:
            l, s = int(rng.integers(2)), int(rng.integers(R))
            p[l, s] = int(rng.integers(-1, E + 1))
        valid = not plan_violations(p, E, R, G, num_groups=ng, num_nodes=nn, hierarchical=hier)
        got = derive_checked_maps(p, E, G, hierarchical=hier, num_groups=ng, num_nodes=nn)
        assert (got is not None) == valid, (trial, p)
        if valid:
            want = derive_maps(p, E)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        seen[valid] += 1
    assert min(seen.values()) > 50
    assert derive_checked_maps(np.zeros((1, 3), dtype=np.int64), 1, 2) is None
