"""Plans over several load windows: objective "sum", "worst" and "mean"."""

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import InvalidProblemError, InvalidTypeError, plan_violations
from eplb_opt.workloads import generate
from eplb_opt.heuristics.robust import robust_objective, robust_refine

from .oracle import assert_consistent_certificate

HIER = dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
GLOB = dict(num_replicas=160, num_gpus=32)


@pytest.fixture(scope="module")
def alternating():
    # Two traffic mixes taking turns, window by window: one plan must serve both.
    return generate("deepseek-v3-prefill", windows=3, seed=2, mix_shift=0.5, mix_period=1, drift=0.05)[:, :6]


def _worst(windows, p, G):
    return np.stack([eplb_opt.gpu_loads(x, p, G) for x in windows]).max(axis=2).max(axis=0)


def test_sum_objective_is_planning_the_total(alternating):
    a = eplb_opt.solve(alternating, **HIER)
    b = eplb_opt.solve(alternating.sum(axis=0), **HIER)
    assert torch.equal(a.plan.phy2log, b.plan.phy2log)
    assert np.allclose(a.max_load, b.max_load)
    assert len(a.window_balancedness) == 3 and a.objective == "sum"


@pytest.mark.parametrize("objective", ["worst", "mean"])
@pytest.mark.parametrize("topo", [HIER, GLOB])
def test_robust_objectives_never_worse_than_the_total_plan(alternating, objective, topo):
    w = alternating if topo is HIER else alternating[:, :, :128]
    base = eplb_opt.solve(w, **topo)
    r = eplb_opt.solve(w, **topo, objective=objective)
    G = topo["num_gpus"]
    p = r.plan.phy2log.numpy()
    hier = r.policy == "hierarchical"
    assert not plan_violations(p, w.shape[2], topo["num_replicas"], G, num_groups=topo.get("num_groups", 1),
                               num_nodes=topo.get("num_nodes", 1), hierarchical=hier)
    per = np.stack([eplb_opt.gpu_loads(x, p, G) for x in w])                      # [W, L, G]
    mine = robust_objective(np.moveaxis(per, 0, 1), objective)
    theirs = robust_objective(np.moveaxis(np.stack([eplb_opt.gpu_loads(x, base.plan.phy2log.numpy(), G)
                                                    for x in w]), 0, 1), objective)
    assert (mine <= theirs * (1 + 1e-12)).all() and (mine < theirs * (1 - 1e-6)).any()
    assert np.allclose(r.max_load, mine)
    assert_consistent_certificate(r)
    assert r.objective == objective and len(r.window_balancedness) == 3


def test_exact_mode_worst_is_at_least_as_good(alternating):
    h = eplb_opt.solve(alternating, **HIER, objective="worst")
    e = eplb_opt.solve(alternating, **HIER, objective="worst", mode="exact", time_limit=3)
    assert (e.max_load <= h.max_load * (1 + 1e-12)).all()
    assert any("CP-SAT is not used" in x for x in e.events)


def test_deterministic_robust_repeats(alternating):
    kw = dict(HIER, objective="mean", mode="exact", time_limit=1, deterministic=True)
    a = eplb_opt.solve(alternating, **kw)
    b = eplb_opt.solve(alternating, **kw)
    assert torch.equal(a.plan.phy2log, b.plan.phy2log)


def test_two_d_input_with_robust_objective_is_the_plain_plan(alternating):
    a = eplb_opt.solve(alternating[0], **HIER, objective="worst")
    b = eplb_opt.solve(alternating[0], **HIER)
    assert torch.equal(a.plan.phy2log, b.plan.phy2log) and a.window_balancedness is None


def test_robust_refine_on_a_hand_made_case():
    # Two windows, two GPUs of two slots, one replica each of four experts.  The plan for
    # the total ({0,1},{2,3}: 10/10) puts both of window 0's heavy experts on GPU 0.
    windows = np.array([[[4.0, 4.0, 1.0, 1.0]], [[1.0, 1.0, 4.0, 4.0]]])   # [W=2, L=1, E=4]
    start = np.array([[0, 1, 2, 3]])
    assert _worst(windows, start, 2)[0] == 8.0
    out, converged = robust_refine(windows, start, 2, 1, "worst")
    assert _worst(windows, out, 2)[0] == 5.0 and converged.all()


@pytest.mark.parametrize("kw, err, match", [
    (dict(objective="max"), InvalidProblemError, "objective"),
    (dict(objective=3), InvalidTypeError, "objective"),
])
def test_bad_objective(alternating, kw, err, match):
    with pytest.raises(err, match=match):
        eplb_opt.solve(alternating, **HIER, **kw)


def test_previous_with_robust_objective_is_refused(alternating):
    old = eplb_opt.solve(alternating[0], **HIER).plan.phy2log
    with pytest.raises(InvalidProblemError, match="previous with objective='worst'"):
        eplb_opt.solve(alternating, **HIER, objective="worst", previous=old)


def test_bad_windows_are_named():
    w = np.ones((3, 2, 8))
    w[1, 0, 5] = np.nan
    with pytest.raises(InvalidProblemError, match=r"\[window 1, layer 0, expert 5\]"):
        eplb_opt.solve(w, num_replicas=8, num_gpus=2)
    with pytest.raises(InvalidProblemError, match="no windows"):
        eplb_opt.solve(np.ones((0, 2, 8)), num_replicas=8, num_gpus=2)
    with pytest.raises(InvalidProblemError, match="3-D"):
        eplb_opt.solve(np.ones((2, 2, 2, 8)), num_replicas=8, num_gpus=2)


# -- the window step's cuts -----------------------------------------------------------


def _plain_step(w, S, P, worst, dup):
    """The step rule with every candidate priced in full (no bounds), in the kernel's
    order and arithmetic: critical GPUs (the busiest of each window, heaviest window
    first; one for "worst", up to four for "mean"), swaps in the node in order (i, h, j),
    then retargets in order (i, b); the first lowest wins.  Returns ``[value, kind, g,
    i, h|b, j]``."""
    W, E = w.shape
    G, k = S.shape
    M = np.zeros((G, E), dtype=np.int64)
    for g in range(G):
        for e in S[g]:
            M[g, e] += 1
    c = M.sum(axis=0)
    v = [[float(w[x, e]) / max(int(c[e]), 1) for e in range(E)] for x in range(W)]
    loads = []
    for x in range(W):
        row = []
        for g in range(G):
            s = 0.0
            for e in S[g]:
                s += v[x][e]
            row.append(s)
        loads.append(row)
    crit = []
    for x in sorted(range(W), key=lambda x: -max(loads[x])):
        g = int(np.argmax(loads[x]))
        if g not in crit:
            crit.append(g)
        if worst or len(crit) >= 4:
            break
    allowed = [{int(e) for q in range(g // P * P, g // P * P + P) for e in S[q]} for g in range(G)]
    best = [np.inf, 0, 0, 0, 0, 0]

    def offer(per, kind, g, i, hb, j):
        acc = -np.inf if worst else 0.0
        for p in per:                                   # in window order, as the kernel sums
            acc = max(acc, p) if worst else acc + p
        acc = acc if worst else acc / W
        if acc < best[0]:
            best[:] = [acc, kind, g, i, hb, j]

    for g in crit:
        n0 = g // P * P
        for i in range(k):
            a = int(S[g, i])
            for h in (range(n0, n0 + P) if P > 1 else ()):
                if h == g or a not in allowed[h]:
                    continue
                for j in range(k):
                    b = int(S[h, j])
                    if a == b or b not in allowed[g] or (not dup and (M[h, a] or M[g, b])):
                        continue
                    per = []
                    for x in range(W):
                        d = v[x][b] - v[x][a]
                        rest = max([loads[x][q] for q in range(G) if q not in (g, h)], default=-np.inf)
                        per.append(max(max(loads[x][g] + d, loads[x][h] - d), rest))
                    offer(per, 0, g, i, h, j)
        for i in range(k):
            a = int(S[g, i])
            if c[a] < 2:
                continue
            for b in range(E):
                if b == a or b not in allowed[g] or (not dup and M[g, b]):
                    continue
                per = []
                for x in range(W):
                    va2, vb2 = float(w[x, a]) / max(int(c[a]) - 1, 1), float(w[x, b]) / (int(c[b]) + 1)
                    da, db = va2 - v[x][a], vb2 - v[x][b]
                    top = -np.inf
                    for q in range(G):
                        y = loads[x][q]
                        if M[q, a] or M[q, b]:
                            y = loads[x][q] + M[q, a] * da + M[q, b] * db
                        if q == g:
                            y += vb2 - va2
                        top = max(top, y)
                    per.append(top)
                offer(per, 1, g, i, b, 0)
    return best


@pytest.mark.parametrize("worst", [True, False])
def test_window_step_cuts_never_change_the_move(worst):
    # The kernel cuts candidates by lower bounds (per slot, per GPU pair, window by
    # window, heaviest window first); it must pick exactly the move, ties included, that
    # pricing every candidate in full picks.  Integer loads make ties; scaled windows
    # (as "windows-ema" weights them) make the heaviest window not the first.
    from eplb_opt.heuristics import robust

    rng = np.random.default_rng(11 if worst else 12)
    for _ in range(150):
        N, P, k = int(rng.integers(1, 3)), int(rng.integers(1, 6)), int(rng.integers(1, 5))
        G = N * P
        E = int(rng.integers(1, G * k + 1))
        W = int(rng.integers(1, 6))
        S = rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, G * k - E)])).astype(np.int64)
        S = S.reshape(G, k)
        dup = bool(rng.integers(2)) or any(len(set(s)) < k for s in S.tolist())
        if rng.integers(2):
            w = rng.integers(0, 5, (W, E)).astype(np.float64)
        else:
            w = rng.gamma(0.5, 100.0, (W, E)) * 0.5 ** np.arange(W - 1, -1, -1)[:, None]
        allowed = robust._allowed(S, E, P)
        M, c, v, loads = robust._state(w, S)
        best = np.empty(6)
        robust._step(w, S, M, c, v, loads, allowed, P, worst, dup, best)
        ref = _plain_step(w, S, P, worst, dup)
        if ref[0] == np.inf:
            assert best[0] == np.inf
        else:
            assert best.tolist() == [float(x) for x in ref], (best, ref)
