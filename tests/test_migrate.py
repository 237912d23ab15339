"""Migration-aware replanning: the balance cap holds, moves are counted right, the
transfer list rebuilds the plan, and nothing moves that need not."""

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import InvalidProblemError, InvalidTypeError, plan_violations
from eplb_opt.align import count_moves
from eplb_opt.migrate import transfer_list
from eplb_opt.workloads import generate

HIER = dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
GLOB = dict(HIER, policy="global")


@pytest.fixture(scope="module")
def drift():
    return generate("deepseek-v3-prefill", windows=2, seed=7)[:, :8]


@pytest.mark.parametrize("topo", [HIER, GLOB])
def test_unchanged_load_moves_nothing(drift, topo):
    first = eplb_opt.solve(drift[0], **topo)
    again = eplb_opt.solve(drift[0], **topo, previous=first.plan.phy2log)
    assert again.moves.sum() == 0 and len(again.transfers) == 0
    assert set(again.migration.source) == {"old"}
    assert torch.equal(again.plan.phy2log, first.plan.phy2log)


@pytest.mark.parametrize("topo", [HIER, GLOB])
def test_drifted_load_within_cap_and_fewer_moves(drift, topo):
    old = eplb_opt.solve(drift[0], **topo).plan.phy2log.numpy()
    fresh = eplb_opt.solve(drift[1], **topo)
    r = eplb_opt.solve(drift[1], **topo, previous=old, max_balance_loss=0.005, bytes_per_expert=1000)
    m = r.migration
    hier = r.policy == "hierarchical"
    p = r.plan.phy2log.numpy()
    assert not plan_violations(p, 256, 288, 32, num_groups=8, num_nodes=4, hierarchical=hier)
    assert (r.max_load <= fresh.max_load * 1.005 * (1 + 1e-9)).all()
    assert np.allclose(m.cap, fresh.max_load * 1.005)
    assert (m.cost <= m.baseline_cost + 1e-9).all()
    assert m.moves.sum() < 0.5 * m.baseline_moves.sum()
    moves, cost = count_moves(old, p, 32, 4, node_move_cost=4.0)
    assert np.array_equal(moves, m.moves) and np.allclose(cost, m.cost)
    assert m.bytes == m.moves.sum() * 1000
    assert abs(m.baseline_balancedness - fresh.balancedness) < 1e-12
    assert "migration:" in r.summary()


def test_transfer_list_rebuilds_the_plan(drift):
    old = eplb_opt.solve(drift[0], **GLOB).plan.phy2log.numpy()
    r = eplb_opt.solve(drift[1], **GLOB, previous=old, max_balance_loss=0.005)
    new = r.plan.phy2log.numpy()
    t = r.transfers
    rebuilt = old.copy()
    for row in t:
        assert old[row["layer"]].reshape(32, 9)[row["src_gpu"]].tolist().count(row["expert"]) >= 1
        assert row["dst_slot"] // 9 == row["dst_gpu"]
        rebuilt[row["layer"], row["dst_slot"]] = row["expert"]
    assert np.array_equal(rebuilt, new)
    remote = t[t["src_gpu"] != t["dst_gpu"]]
    assert len(remote) == r.moves.sum()
    # A copy comes from the destination's node whenever the old plan has the expert there.
    for row in remote:
        o = old[row["layer"]].reshape(4, 8 * 9)
        if (o[row["dst_gpu"] // 8] == row["expert"]).any():
            assert row["src_gpu"] // 8 == row["dst_gpu"] // 8


def test_relabelled_previous_moves_nothing(drift):
    first = eplb_opt.solve(drift[0], **HIER).plan.phy2log.numpy()
    # Same GPU contents, nodes and GPUs permuted, slots shuffled.
    g = first.reshape(8, 4, 8, 9)[:, [2, 0, 3, 1]][:, :, ::-1]
    rng = np.random.default_rng(1)
    old = np.take_along_axis(g, rng.permuted(np.broadcast_to(np.arange(9), g.shape), axis=-1), axis=-1)
    r = eplb_opt.solve(drift[0], **HIER, previous=old.reshape(8, 288))
    assert r.moves.sum() == 0


def test_zero_balance_loss_never_loses_balance(drift):
    old = eplb_opt.solve(drift[0], **HIER).plan.phy2log
    fresh = eplb_opt.solve(drift[1], **HIER)
    r = eplb_opt.solve(drift[1], **HIER, previous=old)
    assert (r.max_load <= fresh.max_load * (1 + 1e-9)).all()
    assert (r.migration.cost <= r.migration.baseline_cost + 1e-9).all()


def test_no_duplicates_with_previous(drift):
    topo = dict(GLOB, allow_duplicates=False)
    old = eplb_opt.solve(drift[0], **topo).plan.phy2log
    r = eplb_opt.solve(drift[1], **topo, previous=old, max_balance_loss=0.01)
    assert not plan_violations(r.plan.phy2log, 256, 288, 32, allow_duplicates=False)


def test_exact_mode_with_previous(drift):
    old = eplb_opt.solve(drift[0], **HIER).plan.phy2log
    heur = eplb_opt.solve(drift[1], **HIER, previous=old, max_balance_loss=0.005)
    ex = eplb_opt.solve(drift[1], **HIER, previous=old, max_balance_loss=0.005, mode="exact", time_limit=4)
    fresh = eplb_opt.solve(drift[1], **HIER, mode="exact", time_limit=2)
    assert (ex.max_load <= ex.migration.cap * (1 + 1e-9)).all()
    # The exact cap comes from the exact fresh plan, so it is at least as tight.
    assert (ex.migration.cap <= heur.migration.cap * (1 + 1e-9)).all()
    assert not plan_violations(ex.plan.phy2log, 256, 288, 32, num_groups=8, num_nodes=4, hierarchical=True)
    assert fresh.balancedness >= ex.balancedness - 0.006


@pytest.mark.parametrize("kw, err, match", [
    (dict(previous=np.zeros((8, 280), dtype=np.int64)), InvalidProblemError, r"previous has shape \(8, 280\)"),
    (dict(previous=np.zeros((8, 288))), InvalidTypeError, "integer expert ids"),
    (dict(previous=np.full((8, 288), 300)), InvalidProblemError, "previous is not a valid placement"),
    (dict(previous=np.zeros((8, 288), dtype=np.int64)), InvalidProblemError, "previous is not a valid placement"),
    (dict(previous="plan.json"), InvalidTypeError, "previous must be"),
    (dict(max_balance_loss=0.01), InvalidProblemError, "needs previous"),
    (dict(bytes_per_expert=10), InvalidProblemError, "needs previous"),
])
def test_bad_migration_arguments(drift, kw, err, match):
    with pytest.raises(err, match=match):
        eplb_opt.solve(drift[1], **HIER, **kw)


@pytest.mark.parametrize("kw, err, match", [
    (dict(max_balance_loss=-0.1), InvalidProblemError, "max_balance_loss"),
    (dict(max_balance_loss=float("nan")), InvalidProblemError, "max_balance_loss"),
    (dict(max_balance_loss="0.1"), InvalidTypeError, "max_balance_loss"),
    (dict(node_move_cost=0), InvalidProblemError, "node_move_cost"),
    (dict(bytes_per_expert=-5), InvalidProblemError, "bytes_per_expert"),
    (dict(bytes_per_expert=1.5), InvalidTypeError, "bytes_per_expert"),
])
def test_bad_migration_values(drift, kw, err, match):
    old = eplb_opt.solve(drift[0], **HIER).plan.phy2log
    with pytest.raises(err, match=match):
        eplb_opt.solve(drift[1], **HIER, previous=old, **kw)


def test_transfer_list_counts_local_slot_shuffles():
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[1, 0, 2, 3]])                       # GPU 0 swaps its two slots
    t = transfer_list(old, new, 2)
    assert len(t) == 2 and (t["src_gpu"] == t["dst_gpu"]).all()
    assert count_moves(old, new, 2).tolist() == [0]
