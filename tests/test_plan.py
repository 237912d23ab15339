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
