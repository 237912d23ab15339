"""Exact mode over random instances (few examples: each runs the solver)."""

from hypothesis import given, settings

import eplb_opt
from eplb_opt import plan_violations

from .test_properties import problems
from .oracle import assert_consistent_certificate


@settings(max_examples=12, deadline=None)
@given(problems())
def test_exact_is_valid_bounded_and_never_worse(args):
    w, R, groups, nodes, G, policy = args
    kw = dict(num_replicas=R, num_groups=groups, num_nodes=nodes, num_gpus=G, policy=policy)
    h = eplb_opt.solve(w, **kw)
    e = eplb_opt.solve(w, **kw, mode="exact", time_limit=0.3)
    assert plan_violations(e.plan.phy2log, w.shape[1], R, G, num_groups=groups, num_nodes=nodes,
                           hierarchical=e.policy == "hierarchical") == []
    assert (e.max_load <= h.max_load * (1 + 1e-12)).all()
    assert_consistent_certificate(e)
    assert (e.lower_bound >= h.lower_bound * (1 - 1e-12)).all()
