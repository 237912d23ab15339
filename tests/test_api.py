"""The public API contract (DESIGN.md section 5) in heuristic mode."""

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import gpu_loads, balancedness, verify

from .oracle import assert_consistent_certificate

# DeepSeek's own plan on its README case scores this (measured with the reference
# from the sglang==0.5.23 wheel; tests/test_peers.py re-measures it).
DEEPSEEK_README_BALANCEDNESS = 0.8155737704918032


def test_readme_case_valid_and_at_least_as_balanced_as_deepseek(readme_weight):
    phy2log, log2phy, logcnt = eplb_opt.rebalance_experts(readme_weight, 16, 4, 2, 8)
    assert phy2log.shape == (2, 16) and log2phy.shape == (2, 12, 5) and logcnt.shape == (2, 12)
    for t in (phy2log, log2phy, logcnt):
        assert t.dtype == torch.int64 and t.device.type == "cpu"
    verify(phy2log, 12, 16, 8, num_groups=4, num_nodes=2, hierarchical=True, log2phy=log2phy, logcnt=logcnt)
    bal = balancedness(gpu_loads(readme_weight.numpy(), phy2log.numpy(), 8))
    assert bal >= DEEPSEEK_README_BALANCEDNESS - 1e-12


def test_solve_result_fields(readme_weight):
    r = eplb_opt.solve(readme_weight, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    L = 2
    for arr in (r.max_load, r.lower_bound, r.gap, r.mean_load):
        assert arr.shape == (L,) and arr.dtype == np.float64
    assert len(r.status) == L and set(r.status) <= {"optimal", "heuristic"}
    assert r.policy == "hierarchical"
    assert_consistent_certificate(r)
    assert np.allclose(r.gap, 1 - r.lower_bound / r.max_load)
    assert 0 < r.balancedness <= r.balancedness_ceiling <= 1
    assert isinstance(r.runtime, float) and r.runtime > 0
    assert isinstance(r.events, tuple)
    # The plan agrees with the figures.
    loads = gpu_loads(readme_weight.numpy(), r.plan.phy2log.numpy(), 8)
    assert np.allclose(loads.max(axis=1), r.max_load)
    p, m, c = r.plan.to_numpy()
    assert p.shape == (2, 16) and m.shape == (2, 12, 5) and c.shape == (2, 12)
    assert "balancedness" in r.summary() and "layer" in r.summary(per_layer=True)
    with pytest.raises(Exception):
        r.gap = None  # frozen


def test_rebalance_matches_solve_plan(readme_weight):
    p1, _, _ = eplb_opt.rebalance_experts(readme_weight, 16, 4, 2, 8)
    r = eplb_opt.solve(readme_weight, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert torch.equal(p1, r.plan.phy2log)


def test_same_input_and_seed_same_plan():
    rng = np.random.default_rng(3)
    w = rng.pareto(1.1, size=(6, 64)) * 100
    a = eplb_opt.solve(w, num_replicas=80, num_groups=8, num_nodes=2, num_gpus=16, seed=7)
    b = eplb_opt.solve(w.copy(), num_replicas=80, num_groups=8, num_nodes=2, num_gpus=16, seed=7)
    assert torch.equal(a.plan.phy2log, b.plan.phy2log)
    c = eplb_opt.rebalance_experts(torch.tensor(w), 80, 8, 2, 16, seed=7)[0]
    assert torch.equal(a.plan.phy2log, c)


def test_policy_auto_global_and_explicit():
    rng = np.random.default_rng(0)
    w = rng.random((3, 12)) * 10
    # 3 groups do not divide 2 nodes: auto falls back to the global policy, as DeepSeek.
    r = eplb_opt.solve(w, num_replicas=16, num_groups=3, num_nodes=2, num_gpus=4)
    assert r.policy == "global"
    r = eplb_opt.solve(w, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=4, policy="global")
    assert r.policy == "global"
    r = eplb_opt.solve(w, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=4, policy="hierarchical")
    assert r.policy == "hierarchical"
    verify(r.plan.phy2log, 12, 16, 4, num_groups=4, num_nodes=2, hierarchical=True)


def test_heuristic_mode_does_not_import_ortools():
    """Nor, without ``previous``, the migration planner and the exact modules (and their
    kernels' dispatchers): a server's first plain call pays only for what it runs."""
    import subprocess
    import sys

    code = (
        "import sys, torch, eplb_opt;"
        "eplb_opt.solve(torch.rand(2, 8), num_replicas=8, num_gpus=2);"
        "eplb_opt.rebalance_experts(torch.rand(2, 8), 8, 1, 1, 2);"
        "print(sorted(m for m in ('ortools', 'eplb_opt.migrate', 'eplb_opt.exact', 'eplb_opt.cpsat') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_global_policy_beats_hierarchical_cap_when_one_group_per_node():
    from eplb_opt.workloads import PRESETS, example_weight

    p = PRESETS["deepseek-v3-decode"]
    w = example_weight("deepseek-v3-decode")
    hier = eplb_opt.solve(w, **p.topology())
    glob = eplb_opt.solve(w, **p.topology(), policy="global")
    assert hier.policy_capped.any()
    assert glob.balancedness > hier.balancedness
    assert glob.balancedness_ceiling >= glob.balancedness


def test_plan_metadata_hashes_the_input_on_first_read():
    """The input hash in a result's metadata is computed when read (LazyMetadata): it is
    the hash of the loads the call was given, even after the caller changes its array,
    survives pickling, and the mapping stays read-only."""
    import pickle

    from eplb_opt.planfile import input_sha256

    w = np.random.default_rng(3).random((4, 16))
    want = input_sha256(w)
    r = eplb_opt.solve(w, num_replicas=24, num_gpus=4)
    w[:] = 0.0
    meta = r.plan.metadata
    assert pickle.loads(pickle.dumps(meta))["input_sha256"] == want
    assert meta["input_sha256"] == want and dict(meta)["input_sha256"] == want
    assert list(meta)[:3] == ["library_version", "created", "input_sha256"]
    import datetime
    import time

    created = datetime.datetime.fromisoformat(meta["created"])       # formatted on first read
    assert created.utcoffset() == datetime.timedelta(0) and abs(time.time() - created.timestamp()) < 300
    assert pickle.loads(pickle.dumps(meta))["created"] == meta["created"]
    with pytest.raises(TypeError):
        meta["input_sha256"] = "x"  # type: ignore[index]
