"""Valid corner cases get valid plans with consistent bounds."""

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import verify

from .oracle import assert_consistent_certificate


def check(weight, R, groups, nodes, gpus, **kw):
    r = eplb_opt.solve(weight, num_replicas=R, num_groups=groups, num_nodes=nodes, num_gpus=gpus, **kw)
    E = r.plan.num_experts
    p, m, c = r.plan.to_numpy()
    verify(p, E, R, gpus, num_groups=groups, num_nodes=nodes, hierarchical=r.policy == "hierarchical",
           log2phy=m, logcnt=c)
    assert_consistent_certificate(r)
    assert ((0 <= r.gap) & (r.gap <= 1)).all()
    assert np.isfinite(r.balancedness)
    return r


def test_all_zero_loads():
    r = check(np.zeros((3, 16)), 24, 4, 2, 8)
    assert r.balancedness == 1.0 and (r.gap == 0).all() and set(r.status) == {"optimal"}


def test_one_expert_holds_all_load():
    w = np.zeros((2, 16))
    w[:, 5] = 1000.0
    r = check(w, 32, 1, 1, 8)
    # 8 GPUs can each take an equal share of expert 5: the average bound is met.
    assert np.allclose(r.max_load, 125.0) and r.status == ("optimal", "optimal")
    c = r.plan.logcnt.numpy()
    assert (c[:, 5] == 8).all()


def test_one_expert_holds_all_load_hierarchical():
    w = np.zeros((2, 16))
    w[:, 5] = 1000.0
    check(w, 32, 4, 2, 8)


def test_no_redundancy():
    rng = np.random.default_rng(1)
    r = check(rng.random((4, 32)) * 100, 32, 4, 2, 8)
    assert (r.plan.logcnt.numpy() == 1).all()


def test_one_gpu():
    rng = np.random.default_rng(2)
    r = check(rng.random((3, 10)) * 5, 14, 1, 1, 1)
    assert set(r.status) == {"optimal"}


def test_one_slot_per_gpu():
    rng = np.random.default_rng(2)
    check(rng.random((3, 10)) * 5, 10, 1, 1, 10)


@pytest.mark.parametrize("scale", [2.0**40, 1e-300, 1e-12])
def test_magnitudes(scale):
    rng = np.random.default_rng(4)
    w = rng.random((3, 24)) * scale
    r = check(w, 32, 4, 2, 8)
    base = check(rng.random((3, 24)), 32, 4, 2, 8)
    assert r.balancedness > 0.5 and base.balancedness > 0.5


def test_counts_near_2_pow_40_integer():
    w = torch.full((2, 16), 2**40, dtype=torch.int64) + torch.arange(16)
    check(w, 24, 1, 1, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.float32, torch.uint8])
def test_torch_dtypes(dtype):
    w = (torch.rand(3, 16) * 100).to(dtype)
    check(w, 24, 4, 2, 8)


def test_numpy_and_list_inputs():
    w = np.random.default_rng(0).integers(0, 100, size=(2, 8)).astype(np.int32)
    check(w, 12, 2, 1, 4)
    check(w.tolist(), 12, 2, 1, 4)


def test_groups_do_not_divide_nodes_uses_global_policy():
    rng = np.random.default_rng(5)
    r = check(rng.random((2, 12)) * 10, 18, 3, 2, 6)
    assert r.policy == "global"


def test_ties_and_equal_loads():
    check(np.ones((2, 32)), 48, 4, 2, 8)
    check(np.tile([5.0, 5.0, 1.0, 1.0], (2, 8)), 40, 8, 4, 8)


def test_many_replicas_per_expert():
    rng = np.random.default_rng(6)
    r = check(rng.random((2, 4)) * 10, 64, 1, 1, 4)
    assert r.plan.logcnt.numpy().max() >= 4


def test_integer_above_2_pow_53_accepted():
    w = np.array([[2**60, 2**60 + 1, 3, 4]], dtype=np.int64)
    r = check(w, 4, 1, 1, 2)
    assert r.max_load[0] >= 2.0**60
