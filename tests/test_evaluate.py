"""The scoring harness: valid candidates scored, crashes and broken rules reported."""

import pytest
import torch

import eplb_opt
from eplb_opt.evaluate import evaluate
from eplb_opt.suites import Suite

TINY = Suite("tiny", ("deepseek-v2-lite", "deepseek-v3-prefill"), (0,), 3, 1, 0.2)


def ours(weight, num_replicas, num_groups, num_nodes, num_gpus):
    return eplb_opt.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)


def only_phy2log(weight, num_replicas, num_groups, num_nodes, num_gpus):
    return ours(weight, num_replicas, num_groups, num_nodes, num_gpus)[0]


def crashes(weight, *args):
    raise RuntimeError("boom")


def global_plan(weight, num_replicas, num_groups, num_nodes, num_gpus):
    # Ignores the hierarchy: under the hierarchical policy its groups straddle nodes.
    return eplb_opt.rebalance_experts(weight, num_replicas, 1, 1, num_gpus)


def out_of_range(weight, num_replicas, num_groups, num_nodes, num_gpus):
    L, E = weight.shape
    return torch.full((L, num_replicas), E, dtype=torch.int64)


def test_valid_candidate_scored_beside_our_modes():
    ev = evaluate(ours, TINY, modes=("heuristic",))
    assert ev.invalid == 0
    mine = [s for s in ev.scores if s.contender == "ours"]
    heur = [s for s in ev.scores if s.contender == "eplb-opt heuristic"]
    assert len(mine) == len(heur) == 2
    for a, b in zip(mine, heur):
        assert a.balancedness == pytest.approx(b.balancedness)
        assert 0 <= a.gap_max < 1 and a.time_s > 0
    assert "ours" in ev.table() and "valid" in ev.summary()


def test_phy2log_only_output_accepted():
    assert evaluate(only_phy2log, TINY, modes=()).invalid == 0


def test_crash_reported_not_hidden():
    ev = evaluate(crashes, TINY, modes=())
    assert ev.invalid == 2
    assert all("crashed: RuntimeError: boom" in s.problem for s in ev.scores)


def test_broken_hierarchy_reported_with_the_rule():
    ev = evaluate(global_plan, TINY, policy="hierarchical", modes=())
    prefill = [s for s in ev.scores if s.workload.startswith("deepseek-v3-prefill")][0]
    assert not prefill.valid and "split across nodes" in prefill.problem
    # The same plans are fine under the global policy.
    assert evaluate(global_plan, TINY, policy="global", modes=()).invalid == 0


def test_bad_output_reported():
    ev = evaluate(out_of_range, TINY, modes=())
    assert ev.invalid == 2 and "not an expert id" in ev.scores[0].problem


def test_arguments_validated():
    with pytest.raises(eplb_opt.InvalidProblemError):
        evaluate(ours, TINY, policy="local")
    with pytest.raises(TypeError):
        evaluate(42, TINY)
