"""The whole-node cover search (heuristics.nodecover): its placements are valid, it
never returns one above its target or its upper limit, and with no node limit it
finds a placement exactly when one exists (checked by brute force on tiny nodes)."""

from itertools import permutations

import numpy as np
import pytest

from eplb_opt.heuristics.nodecover import NodeCover, count_bound, search_node


def _valid(place: np.ndarray, cnt: np.ndarray, P: int, k: int) -> None:
    assert place.shape == (P, k)
    assert np.array_equal(np.bincount(place.ravel(), minlength=cnt.size), cnt)
    for row in place:
        assert len(set(row.tolist())) == k            # replicas of one expert apart


def _brute_best(w: np.ndarray, cnt: np.ndarray, P: int, k: int) -> float:
    """Least heaviest GPU over every placement with distinct experts per GPU."""
    items = np.repeat(np.arange(w.size), cnt)
    best = np.inf
    for perm in set(permutations(items.tolist())):
        rows = np.array(perm).reshape(P, k)
        if all(len(set(r.tolist())) == k for r in rows):
            best = min(best, float((w[rows] / cnt[rows]).sum(axis=1).max()))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_cover_is_exact_on_tiny_nodes(seed):
    rng = np.random.default_rng(seed)
    P, k = 3, 2
    m = int(rng.integers(4, 7))
    cnt = np.ones(m, dtype=np.int64)
    for e in rng.choice(m, size=P * k - m, replace=True):
        cnt[e] += 1
    if cnt.max() > P:
        pytest.skip("more replicas than GPUs")
    w = rng.integers(1, 30, size=m).astype(float)
    best = _brute_best(w, cnt, P, k)
    nc = NodeCover(P, k)
    place, got, top = nc.cover(w, cnt, best, node_limit=10**7)
    assert place is not None and top <= best * (1 + 1e-9)
    assert np.array_equal(got, cnt)
    _valid(place, cnt, P, k)
    below, _, _ = nc.cover(w, cnt, best * (1 - 1e-6), node_limit=10**7)
    assert below is None


def _count_vectors(least, most, total):
    if least.size == 0:
        if total == 0:
            yield np.zeros(0, dtype=np.int64)
        return
    for c in range(int(least[0]), int(most[0]) + 1):
        for rest in _count_vectors(least[1:], most[1:], total - c):
            yield np.concatenate([[c], rest]).astype(np.int64)


@pytest.mark.parametrize("seed", range(10))
def test_count_free_cover_is_exact_on_tiny_nodes(seed):
    rng = np.random.default_rng(100 + seed)
    P, k = 3, 2
    m = int(rng.integers(3, 6))
    w = rng.integers(1, 40, size=m).astype(float)
    least = np.ones(m, dtype=np.int64)
    most = np.minimum(least + rng.integers(0, 3, size=m), P)
    vectors = [c for c in _count_vectors(least, most, P * k)]
    if not vectors:
        pytest.skip("no count vector fills the node")
    best = min(_brute_best(w, c, P, k) for c in vectors)
    if not np.isfinite(best):
        pytest.skip("no placement with distinct experts per GPU")
    nc = NodeCover(P, k)
    place, got, top = nc.cover(w, least, best, node_limit=10**7, most=most)
    assert place is not None and top <= best * (1 + 1e-9)
    assert (least <= got).all() and (got <= most).all()
    _valid(place, got, P, k)
    below, _, _ = nc.cover(w, least, best * (1 - 1e-6), node_limit=10**7, most=most)
    assert below is None


def test_search_finds_a_perfect_partition_with_other_counts():
    # 8 GPUs of 5 on one node: a heavy expert needs 3 replicas, the plan gave it 5.
    rng = np.random.default_rng(3)
    w = np.concatenate([[2400.0, 1500.0], rng.integers(20, 160, size=30).astype(float)])
    cnt = np.ones(32, dtype=np.int64)
    cnt[0], cnt[1], cnt[2], cnt[3] = 5, 2, 2, 2
    P, k = 8, 5
    upper = np.inf
    got_cnt, place, top = search_node(w, cnt, P, k, aim=w.sum() / P * 1.001, upper=upper, node_budget=10**6)
    assert place is not None and top <= w.sum() / P * 1.001
    _valid(place, got_cnt, P, k)
    assert got_cnt.sum() == P * k
    assert top >= count_bound(w, got_cnt, P, k) * (1 - 1e-12)
    assert top == pytest.approx(float((w[place] / got_cnt[place]).sum(axis=1).max()))


def test_search_never_returns_a_worse_node():
    rng = np.random.default_rng(5)
    w = rng.integers(1, 100, size=12).astype(float)
    cnt = np.array([2, 2, 2, 2] + [1] * 8)
    upper = float(w.sum() / 4)                     # the average itself: nothing is below
    got_cnt, place, top = search_node(w, cnt, 4, 4, aim=upper / 2, upper=upper, node_budget=10**5)
    assert place is None and got_cnt is None and top == upper


def test_search_is_deterministic_under_a_node_budget():
    rng = np.random.default_rng(8)
    w = rng.integers(1, 500, size=32).astype(float)
    cnt = np.ones(32, dtype=np.int64)
    cnt[np.argsort(-w)[:8]] = 2
    runs = [search_node(w, cnt, 8, 5, aim=w.sum() / 8, upper=np.inf, node_budget=50_000) for _ in range(2)]
    assert np.array_equal(runs[0][1], runs[1][1]) and runs[0][2] == runs[1][2]


def test_search_closes_the_worst_decode_layer_of_the_gap_study():
    """Issue 12: deepseek-v3-decode seed 1 layer 11 stayed at 739.0 / 738.333 against a
    bound of 737.625 (0.19 %) with the heaviest expert on all 8 GPUs; an independent
    CP-SAT model reached only [737.625, 738.286] in 30 s.  With 6 replicas of it and
    other counts the node reaches 737.833 (0.028 %), within a fixed node budget."""
    from eplb_opt.workloads import generate

    w = generate("deepseek-v3-decode", windows=1, seed=1)[0][11].reshape(8, 32)
    we = w[int(w.sum(axis=1).argmax())]
    avg = we.sum() / 8
    order = np.argsort(-we)
    cnt = np.ones(32, dtype=np.int64)
    cnt[order[0]], cnt[order[1]] = 8, 2                  # the plan's counts there
    got_cnt, place, top = search_node(we, cnt, 8, 5, aim=avg * 1.0001, upper=739.0, node_budget=300_000)
    assert place is not None
    _valid(place, got_cnt, 8, 5)
    assert top == pytest.approx(float((we[place] / got_cnt[place]).sum(axis=1).max()))
    assert 1 - avg / top <= 5e-4, top
