"""The compiled sums behind ``solve``'s figures and the node_replica bound, against the
numpy expressions they replace, bit for bit (golden fingerprints and certificates
depend on every bit)."""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import pytest

from eplb_opt import bounds as B
from eplb_opt.heuristics import ENUMERATION_LIMIT, node_load_lower_bound, num_partitions
from eplb_opt.metrics import gpu_loads, slot_gpu_loads, slot_loads


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.int64)


def test_gpu_loads_have_numpys_bits() -> None:
    rng = np.random.default_rng(3)
    for trial in range(400):
        k = int(rng.integers(1, 300)) if trial % 4 == 0 else int(rng.integers(1, 40))
        G, L, E = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(1, 30))
        w = rng.gamma(0.5, 1.0, (L, E)) * 10.0 ** rng.uniform(-6, 6, (L, E))
        if trial % 7 == 0:
            w[:, ::2] = 0.0
        p = rng.integers(-1 if trial % 5 == 0 else 0, E, (L, G * k))
        slots, gpus = slot_gpu_loads(w, p, G)
        want = slot_loads(w, p).reshape(L, G, -1).sum(axis=2)
        assert np.array_equal(_bits(slots), _bits(slot_loads(w, p)))
        assert np.array_equal(_bits(gpus), _bits(want)), (trial, k, G)
        assert np.array_equal(_bits(gpu_loads(w, p, G)), _bits(want))


def test_gpu_loads_keep_numpys_errors() -> None:
    with pytest.raises(ValueError):
        gpu_loads(np.ones((1, 3)), np.zeros((1, 4), dtype=np.int64), 3)
    with pytest.raises(IndexError, match=r"phy2log\[1, 2\] = 3"):
        slot_gpu_loads(np.ones((2, 3)), np.array([[0, 1, 2, 0], [0, 1, 3, 2]]), 2)


def _node_replica_reference(w: np.ndarray, R: int, ng: int, N: int, G: int, floor: np.ndarray) -> np.ndarray:
    """The numpy computation the compiled path replaced (enumerable case, spare slots)."""
    L, E = w.shape
    gs, m = E // ng, ng // N
    rn, gpn = R // N, G // N
    group_load = w.reshape(L, ng, gs).sum(axis=2)
    need = np.maximum(np.ceil(w / floor[:, None]) - 1, 0).reshape(L, ng, gs).sum(axis=2)
    subsets = np.array(list(combinations(range(ng), m)), dtype=np.int64)
    experts = (subsets[:, :, None] * gs + np.arange(gs)).reshape(len(subsets), -1)
    t = np.zeros((L, len(subsets)))
    li, ci = np.nonzero(need[:, subsets].sum(axis=2) > rn - m * gs)
    if li.size:
        t[li, ci] = B.min_max_replica_load(w[li[:, None], experts[ci]], rn)
    score = np.maximum(t, group_load[:, subsets].sum(axis=2) / gpn)
    return score[:, B._partition_blocks(ng, N)].max(axis=2).min(axis=1)


def test_node_replica_bound_matches_numpy_reference() -> None:
    rng = np.random.default_rng(5)
    checked = 0
    for trial in range(1500):
        N, m = int(rng.choice([2, 3, 4])), int(rng.choice([1, 2, 3]))
        ng, gs, gpn = N * m, int(rng.choice([1, 2, 3, 5, 9])), int(rng.choice([1, 2, 3]))
        E, G = ng * gs, N * gpn
        k = int(rng.integers(max(1, -(-E // G)), -(-E // G) + 4))
        R = k * G
        if R // N == m * gs or comb(ng, m) > B.SUBSET_LIMIT or num_partitions(ng, N) > ENUMERATION_LIMIT:
            continue
        L = int(rng.integers(1, 5))
        w = [rng.gamma(0.4, 100, (L, E)), rng.integers(0, 6, (L, E)).astype(float),
             np.round(rng.random((L, E)) * 8) / 4, rng.random((L, E)) ** 6][trial % 4]
        if trial % 13 == 0:
            w[0] = 0.0
        nb, _ = node_load_lower_bound(w.reshape(L, ng, gs).sum(axis=2), N)
        for floor in (nb / gpn, nb / gpn * rng.uniform(0.3, 1.0, L)):
            if not (floor > 0).all():
                continue
            got, exact = B.node_replica_bound(w, R, ng, N, G, floor=floor)
            assert exact
            assert np.array_equal(_bits(got), _bits(_node_replica_reference(w, R, ng, N, G, floor))), trial
            checked += 1
    assert checked > 500


def test_group_loads_have_numpys_bits() -> None:
    """``group_loads`` (pairwise sums in a kernel up to 128 experts a group, numpy
    beyond) against numpy's ``reshape(...).sum(axis=2)``, bit for bit; read-only and
    strided input too."""
    from eplb_opt.heuristics.grouping import group_loads

    rng = np.random.default_rng(11)
    for trial in range(300):
        gs = int(rng.integers(1, 140)) if trial % 3 else int(rng.choice([1, 7, 8, 9, 16, 17, 127, 128, 129]))
        ng, L = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        w = rng.gamma(0.5, 1.0, (L, ng * gs)) * 10.0 ** rng.uniform(-8, 8, (L, ng * gs))
        if trial % 5 == 0:
            w = np.round(w)
        want = w.reshape(L, ng, gs).sum(axis=2)
        assert np.array_equal(_bits(group_loads(w, ng)), _bits(want)), (trial, gs, ng)
        w.setflags(write=False)
        assert np.array_equal(_bits(group_loads(w, ng)), _bits(want))
    wide = rng.random((3, 40))
    assert np.array_equal(_bits(group_loads(wide[:, ::2], 4)), _bits(wide[:, ::2].reshape(3, 4, 5).sum(axis=2)))


def test_replica_component_of_rows_without_load_is_their_largest() -> None:
    """``min_max_replica_load`` on rows that are all zero (the kernel flags them; their
    answer is the row's largest load) beside rows with load, against the heap of shares
    in plain Python."""
    rng = np.random.default_rng(12)
    for trial in range(60):
        L, E = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        R = E + int(rng.integers(0, 2 * E + 2))
        w = rng.integers(0, 4, (L, E)).astype(float)
        w[rng.random(L) < 0.5] = 0.0
        got = B.min_max_replica_load(w, R)
        for l in range(L):
            shares = sorted((w[l, e] / j for e in range(E) for j in range(1, R - E + 2)), reverse=True)
            assert got[l] == (shares[R - E] if w[l].max() > 0 else 0.0), (trial, l)


def test_frozen_loads_reach_the_kernels_without_a_copy() -> None:
    """A call's loads (``as_weight``) are read-only, and ``writable`` hands the kernels
    their data itself; any other read-only array (a slice of them, a user's) is copied."""
    from eplb_opt.heuristics.compile import frozen_copy, writable
    from eplb_opt.problem import as_weight

    w = as_weight(np.arange(12).reshape(3, 4))
    assert w.dtype == np.float64 and not w.flags.writeable and w.flags.c_contiguous
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    k = writable(w)
    assert k.flags.writeable and np.shares_memory(k, w) and np.array_equal(k, w)
    assert not np.shares_memory(writable(w[1:]), w)
    again = w[None][0]                                  # a view of a view, as solve's are
    assert np.shares_memory(writable(again), w) and not np.shares_memory(writable(w[None][0, 1:]), w)
    assert not np.shares_memory(writable(w[:, :2]), w) and not np.shares_memory(writable(w.T), w)
    user = np.ones((2, 2))
    user.setflags(write=False)
    assert not np.shares_memory(writable(user), user)
    big = frozen_copy([[1, 2], [3, 2**60 + 1]])
    assert np.array_equal(big[0], np.array([[1, 2], [3, 2**60 + 1]], dtype=np.float64)) and not big[1]


def test_frozen_copy_checks_plain_loads_as_it_copies() -> None:
    """``frozen_copy`` of C-contiguous float64 loads copies them exactly and says whether
    every value is finite and non-negative (NaN, inf, a negative: no; -0.0: yes);
    other input is copied as numpy casts it and left unchecked."""
    from eplb_opt.heuristics.compile import frozen_copy

    rng = np.random.default_rng(13)
    for shape in ((7,), (3, 5), (2, 3, 4)):
        for bad in (None, np.nan, np.inf, -np.inf, -1e-300, -0.0):
            a = rng.random(shape) * 100
            if bad is not None:
                a.flat[int(rng.integers(a.size))] = bad
            out, plain = frozen_copy(a)
            assert np.array_equal(_bits(out), _bits(a)) and not out.flags.writeable
            assert plain == (bad is None or (bad == 0.0)), (shape, bad)
    strided = rng.random((4, 6))[:, ::2]
    out, plain = frozen_copy(strided)
    assert np.array_equal(out, strided) and out.flags.c_contiguous and not plain


def test_layer_marks_are_the_figures_and_statuses_of_the_numpy_path() -> None:
    """``metrics.layer_marks`` (solve's common case, one kernel pass) against the numpy
    path it replaces: ``max``/``mean`` of the GPU loads, ``metrics.gap``,
    ``result._statuses`` and ``metrics.balancedness`` of GPU and slot loads, bit for bit, with bounds at, just under and just over the
    status threshold, zero layers and solver-attempted layers; ``None`` where a bound
    exceeds the plan (``result._consistent_bound``'s case) or the rows are long."""
    from eplb_opt.metrics import balancedness, gap, layer_marks
    from eplb_opt.result import _EPS, _STATUS, _statuses

    rng = np.random.default_rng(14)
    for trial in range(300):
        L, G, k = int(rng.integers(1, 9)), int(rng.integers(1, 129)), int(rng.integers(1, 12))
        tol = float(rng.choice([0.0, 1e-4, 0.3]))
        gpus = rng.gamma(0.7, 1.0, (L, G)) * 10.0 ** rng.uniform(-5, 5, (L, 1))
        gpus[rng.random(L) < 0.15] = 0.0
        top = gpus.max(axis=1)
        hi = 1 + (k + 2) * _EPS
        edge = top * hi * (1.0 - tol) * (1 + 4 * _EPS)
        lb = np.where(rng.random(L) < 0.5, edge * rng.choice([1.0, 1 - 1e-16, 1 - 1e-9, 0.5, 0.0], L), top * hi)
        lb = np.minimum(lb, top * hi)                     # consistent: never above the plan
        att = rng.random(L) < 0.5
        slots = rng.gamma(0.5, 1.0, (L, int(rng.choice([1, 7, 128, 129, 288, 1000])))) * 10.0 ** rng.uniform(-5, 5)
        slots[rng.random(L) < 0.2] = 0.0
        got = layer_marks(gpus, slots, lb, att, hi, 1.0 - tol, 1 + 4 * _EPS)
        assert got is not None
        assert got[4] == balancedness(gpus) and got[5] == balancedness(slots), trial
        assert np.array_equal(_bits(got[0]), _bits(top)) and np.array_equal(_bits(got[1]), _bits(gpus.mean(axis=1)))
        assert np.array_equal(_bits(got[2]), _bits(gap(lb, top)))
        assert tuple(_STATUS[c] for c in got[3].tolist()) == _statuses(lb, top, k, tol, att), trial
        over = lb.copy()
        l = int(rng.integers(L))
        over[l] = np.nextafter(top[l] * hi, np.inf) if top[l] > 0 else 1.0     # just above the plan
        assert layer_marks(gpus, slots, over, att, hi, 1.0 - tol, 1 + 4 * _EPS) is None
    assert layer_marks(np.ones((2, 129)), np.ones((2, 3)), np.zeros(2), np.zeros(2, bool), 1.0, 1.0, 1.0) is None


def test_node_components_in_one_pass_match_the_steps() -> None:
    """``bounds._node_fused`` (two groups per node, enumerable: the node and
    node_replica components in one kernel pass) against the steps it fuses --
    ``group_loads``, ``node_load_lower_bound``, ``node_replica_bound`` -- bit for bit,
    with contents that need more spares than their node has (their per-replica optimum
    raises the score), ties and zero loads; ``None`` outside its case or where a layer
    has no load."""
    from eplb_opt.heuristics.grouping import group_loads

    rng = np.random.default_rng(15)
    raised = 0
    for trial in range(400):
        N = int(rng.choice([2, 3, 4]))
        ng, gs, gpn = 2 * N, int(rng.choice([1, 2, 3, 8, 32])), int(rng.choice([1, 2, 4, 8]))
        E, G = ng * gs, N * gpn
        k = int(rng.integers(max(1, -(-E // G)), -(-E // G) + 5))
        R = k * G
        L = int(rng.integers(1, 5))
        w = [rng.gamma(0.3, 100, (L, E)), rng.integers(0, 6, (L, E)).astype(float),
             rng.random((L, E)) ** 8, rng.pareto(0.8, (L, E))][trial % 4]
        got = B._node_fused(w, R, ng, N, G)
        if R // N == 2 * gs:
            assert got is None
            continue
        nb, _ = node_load_lower_bound(group_loads(w, ng), N)
        floor = nb / gpn
        if not (floor > 0).all():
            assert got is None
            continue
        want, exact = B.node_replica_bound(w, R, ng, N, G, floor=floor, group_load=group_loads(w, ng))
        assert exact and got is not None
        assert np.array_equal(_bits(got[0]), _bits(floor)) and np.array_equal(_bits(got[1]), _bits(want)), trial
        gl = group_loads(w, ng)
        subsets, _ = B._contents(ng, 2, gs)
        raised += int((want > (gl[:, subsets].sum(axis=2) / gpn).max(axis=1) * (1 + 1e-12)).sum())
    assert raised > 20                                   # the per-replica part was exercised
    assert B._node_fused(np.ones((2, 12)), 12, 6, 2, 6) is None          # three groups per node
    zero = np.ones((2, 8))
    zero[1] = 0.0
    assert B._node_fused(zero, 12, 4, 2, 6) is None                      # a layer without load
    # A content over its spares whose per-replica optimum is below its load per GPU, in
    # the best assignment: the score keeps the larger (163.25, not 156.5).
    w = np.array([[357.0, 3.0, 3.0, 200.0, 4.0, 13.0, 23.0, 100.0, 313.0, 4.0, 19.0, 8.0]])
    nb, _ = node_load_lower_bound(group_loads(w, 4), 2)
    want, _ = B.node_replica_bound(w, 16, 4, 2, 8, floor=nb / 4, group_load=group_loads(w, 4))
    got = B._node_fused(w, 16, 4, 2, 8)
    assert np.array_equal(_bits(got[1]), _bits(want)) and got[1][0] == 163.25


def test_pairwise_total_is_numpys_sum() -> None:
    """``grouping.pairwise_total`` (numpy's halving above 128 terms, without recursion)
    against ``ndarray.sum``, bit for bit, for every length up to 1200 and some longer,
    at an offset into the array, with infinities and NaN."""
    from eplb_opt.heuristics.grouping import pairwise_total

    rng = np.random.default_rng(17)
    stack = np.empty(4 * 64)
    for n in [*range(1, 1200), 2047, 2048, 4100, 70001]:
        a = rng.gamma(0.5, 1.0, n + 3) * 10.0 ** rng.uniform(-8, 8, n + 3)
        if n % 97 == 0:
            a[int(rng.integers(3, n + 3))] = [np.inf, np.nan][n % 2]
        want = a[3:].sum()
        got = 0.0 + pairwise_total(a, 3, n, stack)
        assert np.array_equal(_bits(np.array([got])), _bits(np.array([want]))) or (np.isnan(got) and np.isnan(want)), n


def test_average_component_has_numpys_row_sums() -> None:
    """``lower_bounds``' average component, whose row sums now come out of the replica
    bound's kernel pass, against ``w.sum(axis=1) / G`` shaved as before, bit for bit;
    and the replica component against ``min_max_replica_load``; zero rows and rows
    longer than 128 included."""
    rng = np.random.default_rng(18)
    for trial in range(120):
        L, E = int(rng.integers(1, 6)), int(rng.choice([3, 8, 64, 129, 256, 300]))
        G = int(rng.choice([1, 2, 4]))
        R = G * int(rng.integers(-(-E // G), -(-E // G) + 4))
        w = rng.gamma(0.5, 1.0, (L, E)) * 10.0 ** rng.uniform(-6, 6, (L, 1))
        w[rng.random(L) < 0.2] = 0.0
        b = B.lower_bounds(w, R, G)
        assert np.array_equal(_bits(b.components["average"]), _bits(B._shave(w.sum(axis=1) / G, E))), trial
        assert np.array_equal(_bits(b.components["replica"]), _bits(B._shave(B.min_max_replica_load(w, R), 1)))
