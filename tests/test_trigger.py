"""should_rebalance: a replan is worth its moves only when it gains enough."""

import pytest

import eplb_opt
from eplb_opt import InvalidProblemError
from eplb_opt.workloads import generate

TOPO = dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)


@pytest.fixture(scope="module")
def drift():
    return generate("deepseek-v3-prefill", windows=3, seed=1)[:, :8]


def test_unchanged_load_is_not_worth_a_replan(drift):
    plan = eplb_opt.solve(drift[0], **TOPO).plan
    d = eplb_opt.should_rebalance(plan, drift[0])
    assert not d.worth and d.gain == 0 and d.moves == 0


def test_drifted_load_is_worth_it_and_the_candidate_applies(drift):
    plan = eplb_opt.solve(drift[0], **TOPO).plan
    d = eplb_opt.should_rebalance(plan, drift[2])
    assert d.worth and d.gain > 0.02 and d.moves > 0
    assert d.new_balancedness > d.current_balancedness
    cur = eplb_opt.gpu_loads(drift[2], plan.phy2log.numpy(), 32).max(axis=1).sum()
    assert abs(d.gain - (1 - d.candidate.max_load.sum() / cur)) < 1e-12
    assert d.moves == d.candidate.moves.sum()


def test_thresholds_and_cost_model(drift):
    plan = eplb_opt.solve(drift[0], **TOPO).plan
    assert not eplb_opt.should_rebalance(plan, drift[2], min_gain=0.9).worth
    assert not eplb_opt.should_rebalance(plan, drift[2], min_gain_per_move=1.0).worth
    kw = dict(bytes_per_expert=44_040_192, bandwidth_bytes_per_s=50e9, step_time_s=0.05)
    long = eplb_opt.should_rebalance(plan, drift[2], horizon_steps=100_000, **kw)
    short = eplb_opt.should_rebalance(plan, drift[2], horizon_steps=1, **kw)
    assert long.worth and not short.worth
    assert short.copy_s == pytest.approx(short.moves * 44_040_192 / 50e9)


def test_bare_array_needs_topology(drift):
    p2l = eplb_opt.solve(drift[0], **TOPO).plan.phy2log
    with pytest.raises(InvalidProblemError, match="num_gpus is required"):
        eplb_opt.should_rebalance(p2l, drift[1])
    d = eplb_opt.should_rebalance(p2l, drift[1], num_gpus=32, num_groups=8, num_nodes=4)
    assert d.candidate.policy == "hierarchical"
    with pytest.raises(InvalidProblemError, match="cost model needs"):
        eplb_opt.should_rebalance(p2l, drift[1], num_gpus=32, step_time_s=0.1)
