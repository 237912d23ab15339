"""The numpy heuristics on their own: counts, group placement, packing."""

import numpy as np
import pytest

import eplb_opt.heuristics as H


def greedy_counts(w, R, cap=None):
    cap = R if cap is None else max(cap, -(-R // len(w)))
    c = np.ones(len(w), dtype=np.int64)
    for _ in range(R - len(w)):
        r = np.where(c < cap, w / c, -np.inf)
        c[int(np.argmax(r))] += 1
    return c


@pytest.mark.parametrize("seed", range(8))
def test_replica_counts_minimise_max_per_replica_load(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        E = int(rng.integers(1, 14))
        R = E + int(rng.integers(0, 45))
        cap = int(rng.integers(1, 9)) if rng.random() < 0.5 else None
        w = rng.pareto(1.0, size=(4, E)) * rng.choice([1e-300, 1.0, 1e12])
        w[rng.random((4, E)) < 0.2] = 0
        c = H.replica_counts(w, R, max_count=cap)
        eff_cap = R if cap is None else max(cap, -(-R // E))
        assert (c.sum(axis=1) == R).all() and (c >= 1).all() and (c <= eff_cap).all()
        for r in range(4):
            g = greedy_counts(w[r], R, cap)
            assert (w[r] / c[r]).max() <= (w[r] / g).max() * (1 + 1e-12)


def test_replica_counts_rejects_bad_shapes():
    with pytest.raises(ValueError):
        H.replica_counts(np.ones(4), 4)
    with pytest.raises(ValueError):
        H.replica_counts(np.ones((1, 4)), 3)


def brute_min_max_partition(loads, nodes):
    best = np.inf
    for part in H.equal_partitions(len(loads), nodes):
        best = min(best, max(loads[part == b].sum() for b in range(nodes)))
    return best


@pytest.mark.parametrize("groups, nodes", [(4, 2), (6, 3), (6, 2), (8, 4), (8, 2), (9, 3), (12, 4), (4, 4), (4, 1)])
def test_groups_to_nodes_exact(groups, nodes):
    rng = np.random.default_rng(groups * 10 + nodes)
    gl = rng.pareto(1.5, size=(5, groups))
    node, worst, exact = H.groups_to_nodes(gl, nodes)
    assert exact
    for l in range(5):
        assert (np.bincount(node[l], minlength=nodes) == groups // nodes).all()
        achieved = max(gl[l][node[l] == b].sum() for b in range(nodes))
        assert np.isclose(achieved, worst[l])
        assert np.isclose(worst[l], brute_min_max_partition(gl[l], nodes))


def test_equal_partitions_count():
    for g, n in [(4, 2), (6, 3), (8, 4), (9, 3)]:
        parts = H.equal_partitions(g, n)
        assert len(parts) == H.num_partitions(g, n)
        assert len({tuple(p) for p in parts}) == len(parts)


def test_groups_to_nodes_large_uses_heuristic_with_valid_bound():
    rng = np.random.default_rng(0)
    gl = rng.pareto(1.5, size=(4, 24))
    node, worst, exact = H.groups_to_nodes(gl, 6)          # 4 per node: too many partitions
    assert not exact
    lb, lb_exact = H.node_load_lower_bound(gl, 6)
    assert not lb_exact
    assert (lb <= worst * (1 + 1e-12)).all()
    for l in range(4):
        assert (np.bincount(node[l], minlength=6) == 4).all()


def items(rng, rows, P, k, dup_labels=False):
    v = rng.pareto(1.3, size=(rows, P * k))
    lab = np.tile(np.arange(P * k), (rows, 1))
    if dup_labels:
        lab = np.sort(rng.integers(0, P * k // 2, size=(rows, P * k)), axis=1)
        v = np.take_along_axis(rng.random((rows, P * k)) + 0.1, lab, axis=1)  # equal loads per label
    return v, lab


def is_layout(lay, n):
    rows = lay.shape[0]
    return (np.sort(lay.reshape(rows, -1), axis=1) == np.arange(n)).all()


@pytest.mark.parametrize("P, k", [(2, 1), (2, 5), (4, 9), (8, 3), (7, 7), (1, 6)])
def test_seeds_and_pipeline_are_exact_capacity_layouts(P, k):
    rng = np.random.default_rng(P * 100 + k)
    v, lab = items(rng, 6, P, k)
    for lay in (H.snake_layout(v, P), H.lpt_rounds_layout(v, P), H.kk_layout(v, P, labels=lab), H.pack_items(v, lab, P)):
        assert lay.shape == (6, P, k) and is_layout(lay, P * k)


def test_kk_beats_lpt_on_average_and_pipeline_beats_both():
    rng = np.random.default_rng(11)
    v, lab = items(rng, 200, 8, 9)
    kk = H.pack_loads(v, H.kk_layout(v, 8)).max(axis=1)
    lpt = H.pack_loads(v, H.lpt_rounds_layout(v, 8)).max(axis=1)
    full = H.pack_loads(v, H.pack_items(v, lab, 8)).max(axis=1)
    assert kk.mean() < lpt.mean()
    assert (full <= np.minimum(kk, lpt) * (1 + 1e-12)).all()


def test_refinement_never_worsens_and_respects_labels():
    rng = np.random.default_rng(12)
    v, lab = items(rng, 100, 6, 5, dup_labels=True)
    seed = H.snake_layout(v, 6)
    out = H.refine_swaps(v, lab, seed)
    assert is_layout(out, 30)
    assert (H.pack_loads(v, out).max(axis=1) <= H.pack_loads(v, seed).max(axis=1) * (1 + 1e-12)).all()

    def dups(layout):
        l = np.take_along_axis(lab, layout.reshape(100, -1), axis=1).reshape(layout.shape)
        l.sort(axis=-1)
        return (l[..., 1:] == l[..., :-1]).sum(axis=(1, 2))

    assert (dups(out) <= dups(seed)).all()


def test_separate_duplicates_removes_free_duplicates():
    # Two packs; pack 0 holds both replicas of label 0 and an equal-load item sits in pack 1.
    v = np.array([[3.0, 3.0, 3.0, 3.0]])
    lab = np.array([[0, 0, 1, 2]])
    lay = np.array([[[0, 1], [2, 3]]])
    out = H.separate_duplicates(v, lab, lay)
    got = np.take_along_axis(lab, out.reshape(1, -1), axis=1).reshape(1, 2, 2)
    assert set(got[0, 0]) != {0} and set(got[0, 1]) != {0}
    assert H.pack_loads(v, out).max() == H.pack_loads(v, lay).max()


def test_place_is_deterministic_and_valid():
    rng = np.random.default_rng(13)
    w = rng.pareto(1.2, size=(7, 64)) * 50
    a = H.place(w, 96, 8, 4, 16)
    b = H.place(w.copy(), 96, 8, 4, 16)
    assert np.array_equal(a.phy2log, b.phy2log)
    assert (np.sort(a.phy2log, axis=1) >= 0).all()
    counts = np.stack([np.bincount(row, minlength=64) for row in a.phy2log])
    assert np.array_equal(counts, a.logcnt) and (counts >= 1).all()


def test_heuristics_imports_neither_torch_nor_ortools():
    import subprocess
    import sys

    # Run from another directory: the installed package, not the checkout's folder.
    code = ("import sys, eplb_opt.heuristics as h; h.place; "
            "print('torch' in sys.modules, 'ortools' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False False"


def test_no_top_level_heuristics_module_is_installed():
    """``heuristics`` installs as ``eplb_opt.heuristics``: a top-level module of that name
    would clash with an unrelated PyPI project."""
    import subprocess
    import sys

    code = "import importlib.util; print(importlib.util.find_spec('heuristics') is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "True"


def runs(rng, rows, n, P, hot):
    """Sorted items with `hot` multi-replica labels among single ones."""
    labs, vals = [], []
    for r in range(rows):
        c = [int(rng.integers(2, min(P, n // (2 * hot)) + 1)) for _ in range(hot)]
        c += [1] * (n - sum(c))
        v = np.sort(rng.random(len(c)))[::-1] / np.array(c)
        order = np.argsort(-v, kind="stable")
        labs.append(np.repeat(order, np.array(c)[order]))
        vals.append(np.repeat(v[order], np.array(c)[order]))
    return np.array(vals), np.array(labs)


@pytest.mark.parametrize("P, k, hot", [(8, 9, 3), (8, 5, 6), (4, 10, 5), (16, 4, 8)])
def test_unsplit_runs_keeps_runs_whole_and_in_one_block(P, k, hot):
    rng = np.random.default_rng(P * k + hot)
    v, lab = runs(rng, 40, P * k, P, hot)
    perm, split = H.unsplit_runs(lab, P)
    assert (np.sort(perm, axis=1) == np.arange(P * k)).all()
    moved = np.take_along_axis(lab, perm, axis=1)
    for r in np.flatnonzero(~split):
        block = np.arange(P * k) // P
        for e in np.unique(moved[r]):
            assert len(set(block[moved[r] == e])) == 1
    assert split.mean() < 0.2


@pytest.mark.parametrize("P, k, hot", [(8, 9, 3), (8, 5, 6), (16, 4, 8)])
def test_pipeline_puts_replicas_of_an_expert_on_different_gpus(P, k, hot):
    rng = np.random.default_rng(7 + P + k)
    v, lab = runs(rng, 40, P * k, P, hot)
    lay = H.pack_sorted(v, lab, P, refine_rounds=3)
    got = np.take_along_axis(lab, lay.reshape(40, -1), axis=1).reshape(lay.shape)
    got.sort(axis=-1)
    assert not (got[..., 1:] == got[..., :-1]).any()


def test_dominant_item_gets_the_smallest_items():
    # One item nearly fills a pack: the best plan gives its pack the k-1 smallest items.
    P = 4
    v = np.array([[100.0] + [30.0] * 3 + [20.0] * 4 + [10.0] * 4 + [1.0] * 4])
    lab = np.arange(16)[None, :]
    target = np.array([v.sum() / P])
    lay = H.pack_sorted(v, lab, P, target=target, refine_rounds=3)
    assert H.pack_loads(v, lay).max() == 103.0


@pytest.mark.parametrize("seed", range(6))
def test_place_equals_its_steps_composed(seed):
    """place()'s one compiled call per plan (_place_layers) is the composition of the
    public steps: node rows (groups in index order per node), replica_counts capped at
    the node's GPUs, replica_items, pack_sorted against each layer's largest bound."""
    from eplb_opt.heuristics import packing

    rng = np.random.default_rng(seed)
    N = int(rng.integers(1, 4))
    num_groups = N * int(rng.integers(1, 3))
    gs = int(rng.integers(1, 5))
    E = num_groups * gs
    gpn = int(rng.integers(1, 4))
    G = N * gpn
    k = int(rng.integers(1, 4))
    R = G * k
    while R < E:
        R += G
    L = int(rng.integers(1, 5))
    w = rng.gamma(0.7, 100.0, (L, E)).round() if seed % 2 else rng.pareto(1.3, (L, E))
    if seed == 4:
        w[0] = 0.0
    dup = bool(seed % 3) or R // G > E // N
    got = H.place(w, R, num_groups, N, G, allow_duplicates=dup)
    node = got.node_of_group
    rows = [[g * gs + x for n in range(N) for g in range(num_groups) if node[l, g] == n for x in range(gs)]
            for l in range(L)]
    experts = np.array(rows).reshape(L * N, E // N)
    node_w = np.array([w[l // N, experts[l]] for l in range(L * N)])
    counts = H.replica_counts(node_w, R // N, max_count=gpn)
    values, labels, bound = packing.replica_items(node_w, counts, gpn)
    target = np.repeat(bound.reshape(L, N).max(axis=1), N)
    lay = packing.pack_sorted(values, labels, gpn, target=target, segment_size=N, allow_duplicates=dup)
    local = np.array([labels[r][lay[r]] for r in range(L * N)]).reshape(L * N, -1)
    want = np.array([experts[r][local[r]] for r in range(L * N)]).reshape(L, R)
    assert np.array_equal(got.phy2log, want)
    cnt = np.zeros((L, E), dtype=np.int64)
    for r in range(L * N):
        cnt[r // N, experts[r]] = counts[r]
    assert np.array_equal(got.logcnt, cnt)
    # The counts alone (what the spill policy seeds its search with) are place()'s, and
    # they are the replicas its plan holds.
    assert np.array_equal(H.replica_counts_of(w, R, num_groups, N, G), cnt)
    assert np.array_equal(cnt, np.stack([np.bincount(r, minlength=E) for r in got.phy2log]))


def test_slot_loads_matches_plain_loops():
    from eplb_opt.metrics import gpu_loads, slot_loads

    rng = np.random.default_rng(3)
    for _ in range(200):
        L, E = int(rng.integers(1, 4)), int(rng.integers(1, 8))
        R = E + int(rng.integers(0, 6))
        p = np.array([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R - E)])) for _ in range(L)])
        if rng.random() < 0.3:
            p[rng.random(p.shape) < 0.2] = -1
        w = rng.random((L, E)) * 1000
        want = np.array([[w[l, e] / list(p[l]).count(e) if e >= 0 else 0.0 for e in p[l]] for l in range(L)])
        assert np.array_equal(slot_loads(w, p), want)
        assert np.array_equal(gpu_loads(w, p, 1), want.sum(axis=1, keepdims=True))
    with pytest.raises(IndexError):
        slot_loads(np.ones((1, 2)), np.array([[0, 2]]))
