"""Certified lower bounds never exceed the true optimum (exact rational brute force on tiny
cases, :mod:`tests.oracle`; no tolerance)."""

import numpy as np
import pytest

import eplb_opt
from eplb_opt.bounds import lower_bounds, partition_cardinality_bound

from fractions import Fraction

from .oracle import layer_optima

CASES = [
    # (E, R, G, groups, nodes, hierarchical)
    (3, 4, 2, 1, 1, False),
    (4, 6, 2, 1, 1, False),
    (4, 6, 3, 1, 1, False),
    (5, 8, 2, 1, 1, False),   # DeepSeek's greedy is 2.6% above optimum on such a case
    (4, 4, 2, 1, 1, False),   # no redundancy: cardinality bound
    (6, 6, 3, 1, 1, False),
    (4, 6, 2, 2, 2, True),
    (4, 8, 4, 2, 2, True),
    (6, 8, 4, 3, 1, True),
    (4, 4, 2, 4, 2, True),
    (6, 9, 3, 3, 3, True),
    (8, 8, 4, 2, 2, True),    # no redundancy, hierarchical: per-node cardinality bound
    (12, 12, 4, 4, 2, True),
]


@pytest.mark.parametrize("E, R, G, groups, nodes, hier", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_below_optimum_and_plan_above(E, R, G, groups, nodes, hier, seed):
    rng = np.random.default_rng(seed + 100 * E + R)
    w = np.round(rng.pareto(1.0, size=(2, E)) * 20 + rng.integers(0, 3, size=(2, E)), 1)
    opt = layer_optima(w, R, G, groups, nodes, hier)
    b = lower_bounds(w, R, G, hierarchical=hier, num_groups=groups, num_nodes=nodes)
    assert all(Fraction(x) <= o for x, o in zip(b.lower_bound, opt)), (b.components, opt)
    policy = "hierarchical" if hier else "global"
    r = eplb_opt.solve(w, num_replicas=R, num_groups=groups, num_nodes=nodes, num_gpus=G, policy=policy)
    assert all(m >= float(o) * (1 - 1e-12) for m, o in zip(r.max_load, opt))
    assert all(Fraction(x) <= o for x, o in zip(r.lower_bound, opt))


def test_cardinality_bound_is_tight_on_pigeonhole_case():
    # 4 experts on 2 GPUs with 2 slots each: {10, 10, 10, 1} -> some GPU gets two 10s.
    w = np.array([[10.0, 10.0, 10.0, 1.0]])
    assert partition_cardinality_bound(w, 2)[0] == 20.0
    b = lower_bounds(w, 4, 2)
    assert b.lower_bound[0] >= 20.0 * (1 - 1e-12)
    r = eplb_opt.solve(w, num_replicas=4, num_gpus=2)
    assert r.status == ("optimal",)


def test_node_bound_counts_policy_cap():
    # Groups {0,1} and {2,3}; 2 nodes; the hot group makes its node the bottleneck.
    w = np.array([[100.0, 100.0, 1.0, 1.0]])
    hier = lower_bounds(w, 8, 4, hierarchical=True, num_groups=2, num_nodes=2)
    glob = lower_bounds(w, 8, 4)
    assert hier.lower_bound[0] >= 100.0 * (1 - 1e-12)   # 200 over the node's 2 GPUs
    assert glob.lower_bound[0] <= 202.0 / 4 * (1 + 1e-12)


def test_per_node_cardinality_bound_is_tight_on_pigeonhole_case():
    # Two nodes of one group each, no spare slot: node 0 holds {10, 10, 10, 1} on 2 GPUs
    # with 2 slots each, so some GPU gets two 10s (20); the global pigeonhole bound over
    # all 8 experts on 4 GPUs and the node averages (31 / 2) say less.
    w = np.array([[10.0, 10.0, 10.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    b = lower_bounds(w, 8, 4, hierarchical=True, num_groups=2, num_nodes=2)
    assert b.lower_bound[0] >= 20.0 * (1 - 1e-12)
    assert partition_cardinality_bound(w, 4)[0] < 20.0
    r = eplb_opt.solve(w, num_replicas=8, num_groups=2, num_nodes=2, num_gpus=4)
    assert r.status == ("optimal",) and r.max_load[0] == 20.0


@pytest.mark.parametrize("E, G, groups, nodes, hier", [(4, 2, 1, 1, False), (6, 3, 1, 1, False),
                                                       (6, 2, 1, 1, False), (8, 4, 2, 2, True),
                                                       (8, 2, 4, 2, True), (12, 4, 4, 2, True)])
@pytest.mark.parametrize("seed", range(6))
def test_integer_ceiling_without_redundancy_is_below_the_optimum(E, G, groups, nodes, hier, seed):
    # R == E and integer loads: every GPU load is an integer, so the bound is rounded up
    # to one; the oracle's exact optimum is never below it.  Small integers (ceilings
    # that bind), odd sums (a fractional average), int64 counts above 2**53.
    rng = np.random.default_rng(seed + 17 * E + G)
    small = rng.integers(0, 9, size=(3, E)).astype(np.float64)
    small[1] += (small[1].sum() % G == 0)                           # average not an integer
    huge = rng.integers(2**52, 2**62, size=(2, E), dtype=np.int64).astype(np.float64)
    for w in (small, huge):
        opt = layer_optima(w, E, G, groups, nodes, hier)
        b = lower_bounds(w, E, G, hierarchical=hier, num_groups=groups, num_nodes=nodes)
        assert (b.lower_bound == np.floor(b.lower_bound)).all()
        assert all(Fraction(x) <= o for x, o in zip(b.lower_bound, opt)), (w, b.components, opt)
        assert all(Fraction(x) <= o for x, o in zip(b.global_bound, opt))


def test_integer_ceiling_closes_a_fractional_average():
    # 5 + 4 + 4 + 0 on 2 GPUs, 2 slots each: the average is 6.5, every GPU load an
    # integer, so the average component is 7 (the pigeonhole bound, two of the three
    # heaviest on one GPU, is 8, the optimum).
    w = np.array([[5.0, 4.0, 4.0, 0.0]])
    b = lower_bounds(w, 4, 2)
    assert b.components["average"][0] == 7.0 and b.lower_bound[0] == 8.0
    # Loads that are not integers are left alone.
    assert lower_bounds(w + 0.5, 4, 2).components["average"][0] < 8.5
    # With redundancy the counts may split a load: no ceiling.
    assert lower_bounds(np.array([[5.0, 4.0, 4.0]]), 4, 2).components["average"][0] < 6.5


def _kth_share_oracle(w: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest of every row's shares ``w_e / j`` (``j = 1..k``, float64
    quotients), by sorting them all."""
    shares = np.concatenate([w / j for j in range(1, k + 1)], axis=1)
    return -np.sort(-shares, axis=1)[:, k - 1]


def test_replica_component_is_the_kth_largest_share():
    """``min_max_replica_load`` (the heap over the ``left + 1`` largest next shares,
    and the counted start with many spares) against sorting every share, bit for bit:
    few and many spares, ties across seats, zeros, wide magnitudes, E up to 300."""
    from eplb_opt.bounds import min_max_replica_load

    rng = np.random.default_rng(11)
    for trial in range(600):
        E = int(rng.integers(1, 300)) if trial % 3 else int(rng.integers(1, 12))
        spares = [int(rng.integers(0, 3)), int(rng.integers(1, 40)), int(rng.integers(E // 2 + 1, 2 * E + 3)),
                  int(rng.integers(1, 4 * E + 10))][trial % 4]
        rows = int(rng.integers(1, 4))
        w = [rng.gamma(0.5, 100.0, (rows, E)), rng.integers(0, 5, (rows, E)).astype(float),
             rng.choice([1.0, 2.0, 3.0, 6.0, 12.0], (rows, E)), rng.random((rows, E)) ** 8 * 1e6][trial % 4]
        w[:, 0] += 1.0                                        # every row live
        k = spares + 1
        got = min_max_replica_load(w, E + spares)
        want = _kth_share_oracle(w, k) if k > 1 else w.max(axis=1)
        assert np.array_equal(got.view(np.int64), want.view(np.int64)), (trial, E, spares)


def test_both_ways_to_the_kth_share_agree_with_sorting():
    """The two methods ``min_max_replica_load`` picks between by ``k`` (the list of the
    shares above the average, the heap), each on every case, bit for bit against
    sorting every share: few and many spares, ties, a dominant expert, zeros."""
    from eplb_opt.bounds import _kth_by_heap, _kth_by_list

    rng = np.random.default_rng(12)
    for trial in range(400):
        E = int(rng.integers(1, 200)) if trial % 3 else int(rng.integers(1, 10))
        k = int(rng.integers(1, 3 * E + 5)) if trial % 2 else int(rng.integers(1, max(2, E // 4)))
        w = [rng.gamma(0.5, 100.0, E), rng.integers(0, 4, E).astype(float), rng.choice([1.0, 2.0, 6.0], E),
             np.where(np.arange(E) == 0, 1e4, rng.random(E))][trial % 4]
        w[0] += 1.0                                           # a positive load
        want = _kth_share_oracle(w[None, :], k)[0]
        ok, listed = _kth_by_list(w, k, np.empty(k + E + 64), np.empty(k + E + 64), np.empty(128, dtype=np.int64))
        heap = _kth_by_heap(w, k, np.empty(E), np.empty(E, dtype=np.int64), np.empty(E, dtype=np.int64))
        assert ok, (trial, E, k)
        assert np.float64(listed).view(np.int64) == np.float64(want).view(np.int64), (trial, E, k, "list")
        assert np.float64(heap).view(np.int64) == np.float64(want).view(np.int64), (trial, E, k, "heap")
    # A list that does not fit says so (the caller then takes the heap).
    assert not _kth_by_list(np.array([5.0, 1.0, 1.0]), 3, np.empty(2), np.empty(2), np.empty(128, dtype=np.int64))[0]


def test_shares_above_lists_every_share_at_or_above_the_floor():
    """The shares at or above ``lo``, as a multiset, against plain loops: first shares
    gathered without a branch, the rest by the experts with a second one; floors at
    shares themselves (ties), loads near the subnormals, lists that do not fit."""
    from eplb_opt.bounds import _shares_above

    rng = np.random.default_rng(13)
    for trial in range(400):
        E = int(rng.integers(1, 60))
        w = [rng.gamma(0.5, 100.0, E), rng.integers(0, 5, E).astype(float),
             rng.integers(1, 9, E) * 5e-324, rng.random(E)][trial % 4]
        pos = w[w > 0]
        if pos.size == 0:
            continue
        lo = float(rng.choice(pos) / rng.integers(1, 4)) if trial % 3 else float(pos.mean() / 2)
        if lo <= 0:
            continue
        want = _plain_shares(w, lo)
        room = len(want) + int(rng.integers(-2, 3)) + (E + 1 if trial % 5 else 0)
        listed = np.empty(max(room, 0))
        n = _shares_above(w, lo, listed)
        if len(want) > listed.size:
            assert n == -1, (trial, len(want), listed.size)
        else:
            assert sorted(listed[:n].tolist()) == want, (trial, E, lo)


def _plain_shares(w, lo):
    out = []
    for v in w:
        j = 1
        while v / j >= lo:
            out.append(v / j)
            j += 1
    return sorted(out)


def test_select_by_bits_is_the_kth_largest():
    """The bucketed selection of the k-th largest against sorting: ties (few distinct
    values, all equal), buckets ranked among themselves and buckets passed to FIND,
    values spread over many binades, every k."""
    from eplb_opt.bounds import _select_by_bits

    rng = np.random.default_rng(14)
    buckets = np.empty(128, dtype=np.int64)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        a = [rng.random(n) + 0.5, rng.integers(1, 4, n).astype(float), np.full(n, 7.0),
             10.0 ** rng.uniform(-300, 300, n), rng.pareto(1.0, n) + 1e-3][trial % 5]
        for k in sorted({1, n, int(rng.integers(1, n + 1)), (n + 1) // 2}):
            want = np.sort(a)[::-1][k - 1]
            got = _select_by_bits(a.copy(), n, k, np.empty(n), buckets)
            assert got == want, (trial, n, k)
