"""policy="spill": primaries stay home, the curve's ends, validation."""

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import InvalidProblemError, InvalidTypeError, plan_violations
from eplb_opt.workloads import generate
from eplb_opt.heuristics.spill import off_node_load

from .oracle import assert_consistent_certificate

TOPO = dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)


@pytest.fixture(scope="module")
def loads():
    return generate("deepseek-v3-prefill", windows=1, seed=4)[0][:6]


def _home(w):
    from eplb_opt.heuristics import place

    return np.repeat(place(w, 288, 8, 4, 32).node_of_group, 32, axis=1)


def test_infinite_cost_is_the_hierarchical_plan(loads):
    a = eplb_opt.solve(loads, **TOPO, policy="spill", cross_node_cost=float("inf"))
    b = eplb_opt.solve(loads, **TOPO, policy="hierarchical")
    assert torch.equal(a.plan.phy2log, b.plan.phy2log)
    assert a.off_node_share == 0.0 and a.policy == "spill"


def test_curve_runs_from_hierarchical_towards_global(loads):
    hier = eplb_opt.solve(loads, **TOPO, policy="hierarchical").balancedness
    glob = eplb_opt.solve(loads, **TOPO, policy="global").balancedness
    bal, share = [], []
    for lam in (4.0, 1.0, 0.0):
        r = eplb_opt.solve(loads, **TOPO, policy="spill", cross_node_cost=lam)
        p = r.plan.phy2log.numpy()
        assert not plan_violations(p, 256, 288, 32)
        home = _home(loads)
        node = np.arange(288) // 72
        for l in range(p.shape[0]):
            for e in range(256):
                assert (node[p[l] == e] == home[l, e]).any(), (lam, l, e)
        assert abs(r.off_node_share - off_node_load(loads, p, 4, home).sum() / loads.sum()) < 1e-12
        assert_consistent_certificate(r)
        bal.append(r.balancedness)
        share.append(r.off_node_share)
    assert hier <= bal[0] + 1e-12 and bal[-1] > hier
    assert bal[-1] >= glob - 0.01           # the free end comes within 1% of the global policy
    assert share[-1] > 0 and share[-1] >= share[0]


def test_spill_through_rebalance_experts(loads):
    p, l2p, cnt = eplb_opt.rebalance_experts(loads, 288, 8, 4, 32, policy="spill")
    assert p.shape == (6, 288) and int(cnt.sum()) == 6 * 288


@pytest.mark.parametrize("kw, err, match", [
    (dict(cross_node_cost=-1.0), InvalidProblemError, "cross_node_cost"),
    (dict(cross_node_cost="high"), InvalidTypeError, "cross_node_cost"),
    (dict(num_groups=6), InvalidProblemError, "policy='spill' needs num_groups=6"),
])
def test_bad_spill_arguments(loads, kw, err, match):
    with pytest.raises(err, match=match):
        eplb_opt.solve(loads, **{**TOPO, **kw}, policy="spill")


def test_spill_refuses_previous_and_robust_objectives(loads):
    old = eplb_opt.solve(loads, **TOPO).plan.phy2log
    with pytest.raises(InvalidProblemError, match="spill' with previous"):
        eplb_opt.solve(loads, **TOPO, policy="spill", previous=old)
    with pytest.raises(InvalidProblemError, match="spill' with a worst/mean objective"):
        eplb_opt.solve(np.stack([loads, loads]), **TOPO, policy="spill", objective="worst")
