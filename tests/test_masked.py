"""masked_gpus: failed or drained GPUs hold nothing; the rest carry every replica."""

import numpy as np
import pytest

import eplb_opt
from eplb_opt import InvalidProblemError, InvalidTypeError, Plan, plan_violations
from eplb_opt.workloads import generate

from .oracle import assert_consistent_certificate

TOPO = dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)


@pytest.fixture(scope="module")
def loads():
    return generate("deepseek-v3-prefill", windows=2, seed=3)[:, :6]


def test_masked_gpu_holds_nothing_and_costs_only_its_capacity(loads):
    full = eplb_opt.solve(loads[0], **TOPO, policy="global")
    r = eplb_opt.solve(loads[0], **TOPO, policy="global", masked_gpus=[7])
    p = r.plan.phy2log.numpy()
    assert (p[:, 63:72] == -1).all() and (np.delete(p, np.s_[63:72], axis=1) >= 0).all()
    mask = np.zeros((6, 32), dtype=bool)
    mask[:, 7] = True
    assert not plan_violations(p, 256, 288, 32, masked=mask)
    assert r.plan.logcnt.sum() == 6 * 279 and (r.plan.logcnt >= 1).all()
    g = eplb_opt.gpu_loads(loads[0], p, 32)
    assert (g[:, 7] == 0).all() and np.allclose(r.max_load, g.max(axis=1))
    assert r.balancedness >= full.balancedness * 31 / 32 - 0.005
    assert_consistent_certificate(r)


def test_per_layer_masks_and_bool_masks(loads):
    per_layer = [[0], [1, 2], [], [31], [0], [5, 6]]
    r = eplb_opt.solve(loads[0], **TOPO, masked_gpus=per_layer)
    p = r.plan.phy2log.numpy().reshape(6, 32, 9)
    for l, ids in enumerate(per_layer):
        empty = np.flatnonzero((p[l] == -1).all(axis=1))
        assert empty.tolist() == sorted(ids)
    mask = np.zeros(32, dtype=bool)
    mask[[3, 4]] = True
    a = eplb_opt.solve(loads[0], **TOPO, masked_gpus=mask)
    b = eplb_opt.solve(loads[0], **TOPO, masked_gpus=[3, 4])
    assert np.array_equal(a.plan.phy2log.numpy(), b.plan.phy2log.numpy())
    assert any("global policy" in e for e in a.events)


def test_masked_plan_file_roundtrip(loads, tmp_path):
    r = eplb_opt.solve(loads[0], **TOPO, masked_gpus=[9])
    back = Plan.load(r.plan.save(tmp_path / "m.npz"))
    assert np.array_equal(back.phy2log.numpy(), r.plan.phy2log.numpy())
    l2p = back.log2phy.numpy()
    assert not (np.isin(l2p, np.arange(81, 90))).any()            # GPU 9's slots listed nowhere


def test_masked_with_previous_counts_lost_copies(loads):
    old = eplb_opt.solve(loads[0], **TOPO, policy="global").plan.phy2log.numpy()
    r = eplb_opt.solve(loads[1], **TOPO, policy="global", masked_gpus=[2], previous=old, max_balance_loss=0.005)
    t = r.transfers
    lost = old.reshape(6, 32, 9)[:, 2]
    for row in t[t["src_gpu"] == -1]:
        # no live GPU held the expert: its copies were only on GPU 2
        others = np.delete(old.reshape(6, 32, 9)[row["layer"]], 2, axis=0)
        assert row["expert"] in lost[row["layer"]] and not (others == row["expert"]).any()
    assert r.moves.sum() < r.migration.baseline_moves.sum()
    assert (t["dst_gpu"] != 2).all()


@pytest.mark.parametrize("masked, err, match", [
    ([32], InvalidProblemError, r"GPU id 32, not in \[0, 32\)"),
    ([-1], InvalidProblemError, "GPU id -1"),
    ([1.5], InvalidTypeError, "integer GPU ids"),
    ("3", InvalidTypeError, "masked_gpus"),
    (list(range(5)), InvalidProblemError, "fewer than the 256 experts"),
    (np.zeros((3, 32), dtype=bool), InvalidProblemError, "bool mask has shape"),
])
def test_bad_masks(loads, masked, err, match):
    with pytest.raises(err, match=match):
        eplb_opt.solve(loads[0], **TOPO, masked_gpus=masked)


def test_empty_mask_is_the_plain_plan(loads):
    a = eplb_opt.solve(loads[0], **TOPO, masked_gpus=[])
    b = eplb_opt.solve(loads[0], **TOPO)
    assert np.array_equal(a.plan.phy2log.numpy(), b.plan.phy2log.numpy())


def test_an_explicit_hierarchical_policy_with_masked_gpus_is_an_error():
    """An explicit choice is never switched: policy='hierarchical' cannot plan around masked
    GPUs (nodes lose their equal GPU counts); 'auto' plans them with the global policy and
    says so."""
    import eplb_opt
    from eplb_opt.errors import InvalidProblemError

    w = np.random.default_rng(0).random((2, 16)) * 10
    topo = dict(num_replicas=32, num_groups=4, num_nodes=2, num_gpus=8)
    mask = np.zeros(8, dtype=bool)
    mask[3] = True
    with pytest.raises(InvalidProblemError, match="policy='hierarchical' with masked_gpus"):
        eplb_opt.solve(w, **topo, policy="hierarchical", masked_gpus=mask)
    r = eplb_opt.solve(w, **topo, policy="auto", masked_gpus=mask)
    assert r.policy == "global" and any("policy 'auto' planned" in e for e in r.events)
