"""align.count_moves is the package's one move counter: on random plans (with ``-1``
masked slots) it gives exactly what a plain reference count gives, moves and
node-weighted cost alike, and keeps its own public behaviour (moves only, checked input).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from eplb_opt import InvalidProblemError, InvalidTypeError, align_to_previous, count_moves
from eplb_opt.align import keep_slots


def move_counts(old: np.ndarray, new: np.ndarray, G: int, N: int = 1, nmc: float = 4.0):
    """Reference: per layer, every replica of ``new`` on a GPU whose ``old`` content
    lacks that expert is a move; it costs 1 when ``old`` holds the expert somewhere on
    that GPU's node, else ``nmc``.  Empty slots (-1) hold and receive nothing."""
    L, R = new.shape
    k, P = R // G, G // N
    moves, cost = np.zeros(L, dtype=np.int64), np.zeros(L)
    for l in range(L):
        for g in range(G):
            held = set(int(x) for x in old[l, g * k:(g + 1) * k] if x >= 0)
            node = set(int(x) for x in old[l, (g // P) * P * k:(g // P + 1) * P * k] if x >= 0)
            for e in new[l, g * k:(g + 1) * k]:
                if e >= 0 and int(e) not in held:
                    moves[l] += 1
                    cost[l] += 1.0 if int(e) in node else nmc
    return moves, cost


def _random_plan(rng: np.random.Generator, L: int, E: int, G: int, k: int, masked: bool) -> np.ndarray:
    """``[L, G * k]``: every expert placed once, the other slots random, and with
    ``masked`` a random set of GPUs per layer emptied (``-1``)."""
    p = np.empty((L, G * k), dtype=np.int64)
    for l in range(L):
        row = np.concatenate([np.arange(E), rng.integers(0, E, G * k - E)])
        p[l] = rng.permutation(row)
        if masked:
            for g in np.flatnonzero(rng.random(G) < 0.25):
                p[l, g * k:(g + 1) * k] = -1
    return p


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_count_moves_equals_a_reference_count(seed, masked):
    rng = np.random.default_rng(seed)
    N = int(rng.choice([1, 2, 4]))
    G = N * int(rng.integers(1, 5))
    k = int(rng.integers(2, 7))
    E = int(rng.integers(1, G * k + 1))
    L = int(rng.integers(1, 6))
    old = _random_plan(rng, L, E, G, k, masked)
    new = _random_plan(rng, L, E, G, k, masked)
    if rng.random() < 0.3:                              # partly the same placement
        new[: L // 2] = old[: L // 2]
    for nmc in (4.0, 1.0, 2.5, 0.1):
        want_moves, want_cost = move_counts(old, new, G, N, nmc)
        moves, cost = count_moves(old, new, G, N, node_move_cost=nmc)
        assert moves.dtype == want_moves.dtype == np.int64 and cost.dtype == want_cost.dtype
        assert np.array_equal(moves, want_moves)
        assert np.allclose(cost, want_cost, rtol=1e-12, atol=0)
        assert np.array_equal(count_moves(old, new, G), want_moves)   # moves alone: no cost
    assert np.array_equal(move_counts(old, new, G)[0], count_moves(old, new, G, N))


def test_count_moves_keeps_its_public_behaviour():
    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = np.array([[1, 0, 3, 2], [0, 2, 1, 3]])          # layer 0: GPUs swapped; layer 1: one swap
    got = count_moves(old, new, 2)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.tolist() == [0, 2]
    assert count_moves(old, new, 2, node_move_cost=3.0)[1].tolist() == [0.0, 2.0]   # one node: cost 1
    assert count_moves(old, new, 2, 2, node_move_cost=3.0)[1].tolist() == [0.0, 6.0]
    with pytest.raises(InvalidProblemError, match="differ in shape"):
        count_moves(old, new[:, :2], 2)
    with pytest.raises(InvalidProblemError, match="must divide the 4 slots"):
        count_moves(old, new, 3)
    with pytest.raises(InvalidProblemError, match="num_nodes=3 must divide num_gpus=2"):
        count_moves(old, new, 2, 3)
    with pytest.raises(InvalidProblemError, match="negative expert id -2"):
        count_moves(old - 2, new, 2)
    with pytest.raises(InvalidTypeError, match="integer"):
        count_moves(old.astype(float), new, 2)


def test_keep_slots_keeps_old_slots():
    assert keep_slots(np.array([5, 1, 7]), np.array([7, 9, 5])).tolist() == [7, 1, 5]
    assert keep_slots(np.array([2, 2]), np.array([3, 2])).tolist() == [2, 2]


# ------------------------------------------------- the compiled matching (heuristics/matching.py)

def _best_by_permutations(score: np.ndarray) -> int:
    """Reference: the largest total of ``score[i, perm[i]]`` over every permutation."""
    n = score.shape[0]
    return max(sum(int(score[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("seed", range(6))
def test_max_assignment_reaches_the_brute_force_optimum(seed):
    from eplb_opt.heuristics.matching import max_assignment

    rng = np.random.default_rng(seed)
    for _ in range(150):
        n = int(rng.integers(1, 8))
        hi = int(rng.choice([1, 2, 3, 10, 1000]))        # small ranges: many tied optima
        score = rng.integers(0, hi + 1, size=(n, n)).astype(np.int64)
        perm = max_assignment(score)
        assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(n))
        assert int(score[np.arange(n), perm].sum()) == _best_by_permutations(score)
        assert np.array_equal(max_assignment(score.copy()), perm)       # deterministic


def _counts(row: np.ndarray, units: int, E: int) -> np.ndarray:
    span = row.size // units
    c = np.zeros((units, E), dtype=np.int64)
    for u in range(units):
        for e in row[u * span:(u + 1) * span]:
            c[u, e] += 1
    return c


@pytest.mark.parametrize("seed", range(8))
def test_align_to_previous_keeps_the_most_replicas(seed):
    """Per layer: the same experts per GPU (a relabelling), node overlap with the old plan
    the brute-force optimum; the GPU overlap within matched nodes the brute-force optimum
    given the node matching; every kept replica in one of its old slots."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(10):
        N = int(rng.choice([1, 2, 3]))
        P = int(rng.integers(1, 7 - 2 * (N > 1)))
        G, k = N * P, int(rng.integers(1, 4))
        E = int(rng.integers(1, G * k + 1))
        old, new = _random_plan(rng, 2, E, G, k, False), _random_plan(rng, 2, E, G, k, False)
        new[0] = new[0].reshape(N, P * k)[rng.permutation(N)].ravel() if rng.random() < 0.5 else new[0]
        out = align_to_previous(new, old, G, N)
        for l in range(2):
            cn, co, ca = _counts(new[l], G, E), _counts(old[l], G, E), _counts(out[l], G, E)
            assert sorted(map(tuple, cn.tolist())) == sorted(map(tuple, ca.tolist()))
            nn, no = _counts(new[l], N, E), _counts(old[l], N, E)
            assert np.minimum(_counts(out[l], N, E), no).sum() == _best_by_permutations(
                np.minimum(nn[:, None, :], no[None, :, :]).sum(axis=2))
            for b in range(N):                           # GPUs within the node now in old node b
                rows = ca[b * P:(b + 1) * P]
                got = np.minimum(rows, co[b * P:(b + 1) * P]).sum()
                assert got == _best_by_permutations(np.minimum(rows[:, None, :], co[None, b * P:(b + 1) * P, :]).sum(2))
            for g in range(G):
                o, a = old[l, g * k:(g + 1) * k], out[l, g * k:(g + 1) * k]
                assert np.array_equal(a, keep_slots(a, o))


@pytest.mark.parametrize("seed", range(4))
def test_align_to_previous_leaves_an_unchanged_plan_alone(seed):
    """Among equally good matchings the one keeping nodes and GPUs in place is taken: a
    plan aligned to itself (duplicates, many tied overlaps) comes back unchanged, and
    GPU overlap is never given up for nothing (whole nodes relabelled: all kept)."""
    rng = np.random.default_rng(200 + seed)
    for _ in range(20):
        N = int(rng.choice([1, 2, 4]))
        G, k = N * int(rng.integers(1, 5)), int(rng.integers(1, 4))
        E = int(rng.integers(1, G * k + 1))
        old = _random_plan(rng, 3, E, G, k, False)
        assert np.array_equal(align_to_previous(old, old, G, N), old)
        shuffled = old.reshape(3, N, -1)[:, rng.permutation(N)].reshape(3, -1)
        assert count_moves(old, align_to_previous(shuffled, old, G, N), G, N).sum() == 0


def _align_every_pair(new: np.ndarray, old: np.ndarray, G: int, N: int) -> np.ndarray:
    """Reference for :func:`align_rows`: every node pair scored ``node overlap * (R + 1)
    + best GPU overlap`` (all ``N^2`` GPU matchings), then the node matching, as the
    matching ran before it matched GPUs only within the node pairs it needs; the compiled
    :func:`max_assignment` (pinned above) solves each matching."""
    from eplb_opt.heuristics.matching import max_assignment

    def prefer_diagonal(s):
        return s * (s.shape[0] + 1) + np.eye(s.shape[0], dtype=np.int64)

    L, R = new.shape
    k, P = R // G, G // N
    E = int(max(new.max(), old.max())) + 1
    out = np.empty_like(new)
    for l in range(L):
        cn, co = _counts(new[l], G, E), _counts(old[l], G, E)
        perms = {}
        score = np.minimum(_counts(new[l], N, E)[:, None, :], _counts(old[l], N, E)[None, :, :]).sum(2) * (R + 1)
        for a in range(N):
            for b in range(N):
                sub = np.minimum(cn[a * P:(a + 1) * P, None, :], co[None, b * P:(b + 1) * P, :]).sum(2)
                perms[a, b] = max_assignment(prefer_diagonal(sub))
                score[a, b] += sub[np.arange(P), perms[a, b]].sum()
        node_of = max_assignment(prefer_diagonal(score)) if N > 1 else np.zeros(1, dtype=np.int64)
        for a in range(N):
            for i in range(P):
                g, h = a * P + i, node_of[a] * P + perms[a, node_of[a]][i]
                out[l, h * k:(h + 1) * k] = keep_slots(new[l, g * k:(g + 1) * k], old[l, h * k:(h + 1) * k])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_align_matches_gpus_only_in_the_node_pairs_it_needs(seed):
    """Where one node matching has the largest node overlap alone, only its node pairs
    are matched GPU by GPU (:func:`heuristics.matching._match_nodes`); the answer is the
    one that scores every pair, on layers with a unique best node matching and on layers
    with tied ones (few experts, few nodes: many ties), nodes shuffled or not."""
    rng = np.random.default_rng(300 + seed)
    unique = tied = 0
    for _ in range(40):
        N = int(rng.choice([2, 3, 4]))
        P, k = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        G = N * P
        E = int(rng.integers(1, G * k + 1))
        old, new = _random_plan(rng, 3, E, G, k, False), _random_plan(rng, 3, E, G, k, False)
        if rng.random() < 0.5:                      # a new plan close to the old one
            new[0] = old[0].reshape(N, P * k)[rng.permutation(N)].ravel()
        assert np.array_equal(align_to_previous(new, old, G, N), _align_every_pair(new, old, G, N))
        for l in range(3):
            nov = np.minimum(_counts(new[l], N, E)[:, None, :], _counts(old[l], N, E)[None, :, :]).sum(2)
            totals = sorted((sum(int(nov[a, p[a]]) for a in range(N)) for p in itertools.permutations(range(N))),
                            reverse=True)
            unique += totals[0] > totals[1]
            tied += totals[0] == totals[1]
    assert unique > 30 and tied > 30, (unique, tied)
