"""One replica-count rule (issue 14).

``heuristics.apportion`` holds the rule (:func:`add_replicas`, its reverse
:func:`remove_replicas`, and :func:`replica_counts`, the rule from one replica each,
its certain seats fixed by a threshold).  ``eplb_opt.bounds.min_max_replica_load`` derives the smallest largest
per-replica load on its own; these tests check that the two agree, so that editing the
heuristic cannot silently move a certificate.
"""

import ast
import inspect

import numpy as np
import pytest

import eplb_opt.bounds as bounds
import eplb_opt.heuristics as H
from eplb_opt.bounds import min_max_replica_load
from eplb_opt.heuristics.apportion import add_replicas, remove_replicas

EPS = np.finfo(np.float64).eps


def _weights(rng, rows, E, kind):
    """Loads of several kinds: many exact ties, zeros, tiny and huge magnitudes."""
    if kind == 0:
        return rng.integers(0, 5, size=(rows, E)).astype(np.float64)         # ties and zeros
    if kind == 1:
        return rng.choice([1.0, 2.0, 3.0, 4.0, 6.0, 12.0], size=(rows, E))    # ties across seats
    if kind == 2:
        return rng.random((rows, E)) ** 3 * rng.choice([1e-300, 1.0, 1e300])
    if kind == 3:
        return rng.integers(0, 10_000, size=(rows, E)).astype(np.float64)
    if kind == 4:
        w = rng.pareto(1.0, size=(rows, E))
        w[rng.random((rows, E)) < 0.3] = 0
        return w
    w = np.zeros((rows, E))                                                   # one live expert
    w[:, 0] = rng.random(rows)
    w[0] = 0                                                                  # an all-zero row
    return w


def _spares(rng, E, trial):
    """R - E: none (R == E), few (partial-sort path), many (threshold path), very many."""
    return [0, int(rng.integers(1, 17)), int(rng.integers(17, 4 * E + 40)), int(rng.integers(100, 3000))][trial % 4]


def test_bound_derivation_agrees_with_the_heuristic_rule():
    """Bit for bit, on inputs with ties, zeros, R == E, large R, tiny and huge loads."""
    rng = np.random.default_rng(20260514)
    for trial in range(3000):
        E, rows = int(rng.integers(1, 70)), int(rng.integers(1, 5))
        R = E + _spares(rng, E, trial)
        w = _weights(rng, rows, E, trial % 6)
        derived = min_max_replica_load(w, R)
        rule = (w / H.replica_counts(w, R)).max(axis=1)
        assert np.array_equal(derived, rule), (E, R, w, derived, rule)


def test_bound_derivation_is_the_exact_float_optimum_on_near_ties():
    """Loads built so that shares of other experts fall within a few ulps of the optimum.
    The derivation is the k-th largest float share (checked by sorting all of them); the
    heuristic hands out its last seats on the float quotients ``w / c`` themselves (its
    threshold fixes only seats far above the optimum), so it lands on the same float,
    bit for bit."""
    rng = np.random.default_rng(7)
    for _ in range(3000):
        E = int(rng.integers(2, 40))
        R = E + int(rng.integers(1, 3 * E + 30))
        w = rng.random((1, E)) * rng.choice([1.0, 3.0, 1e5])
        t = min_max_replica_load(w, R)[0]
        for _ in range(int(rng.integers(1, 4))):
            x = t * int(rng.integers(1, 6))
            for _ in range(int(rng.integers(0, 4))):
                x = np.nextafter(x, np.inf if rng.random() < 0.5 else -np.inf)
            w[0, int(rng.integers(E))] = x
        k = R - E + 1
        shares = np.sort(np.concatenate([w[0] / j for j in range(1, k + 1)]))[::-1]
        derived = min_max_replica_load(w, R)[0]
        assert derived == shares[k - 1]
        rule = (w / H.replica_counts(w, R)).max()
        assert rule == derived


def test_bounds_module_does_not_use_the_heuristic_rule():
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(bounds))):
        if isinstance(node, ast.ImportFrom):
            names.update(a.name for a in node.names)
            names.add(node.module or "")
    assert not names & {"replica_counts", "add_replicas", "remove_replicas", "max_replica_load", "apportion",
                        "heuristics.apportion"}


@pytest.mark.parametrize("cap", [None, 1, 2, 3, 5])
def test_closed_form_hands_out_the_rules_seats(cap):
    """Distinct loads (no tied seats): the counts from one replica each equal the rule
    step by step (``tests/test_kernels_counts.py`` checks both against plain loops)."""
    rng = np.random.default_rng(0 if cap is None else cap)
    for trial in range(400):
        E, rows = int(rng.integers(1, 50)), int(rng.integers(1, 5))
        R = E + _spares(rng, E, trial + 1 if trial % 4 == 3 else trial)
        w = rng.random((rows, E)) * rng.choice([1e-200, 1.0, 1e200])
        eff_cap = R if cap is None else max(cap, -(-R // E))
        got = H.replica_counts(w, R, max_count=cap)
        want = add_replicas(w, np.ones((rows, E), dtype=np.int64), R - E, eff_cap)
        assert np.array_equal(got, want), (E, R, cap)


def test_with_ties_the_closed_form_still_takes_the_largest_seats():
    """Tied seats may be taken in another order than the step-by-step rule (the threshold
    fixes some of them at once), but the counts
    hold the largest seats (every seat taken is worth at least every seat not taken)
    and reach the same largest per-replica load."""
    rng = np.random.default_rng(3)
    for trial in range(900):
        E, rows = int(rng.integers(1, 50)), int(rng.integers(1, 5))
        R = E + _spares(rng, E, trial % 3)          # the step-by-step rule is slow on huge R
        w = _weights(rng, rows, E, trial % 6)
        cap = None if trial % 3 else int(rng.integers(1, 10))
        eff_cap = R if cap is None else max(cap, -(-R // E))
        c = H.replica_counts(w, R, max_count=cap)
        assert (c.sum(axis=1) == R).all() and (c >= 1).all() and (c <= eff_cap).all()
        step = add_replicas(w, np.ones_like(c), R - E, eff_cap)
        live = w.max(axis=1) > 0
        assert np.array_equal((w / c).max(axis=1)[live], (w / step).max(axis=1)[live])
        taken = np.where(c > 1, w / np.maximum(c - 1, 1), np.inf).min(axis=1)
        left = np.where(c < eff_cap, w / c, -np.inf).max(axis=1)
        assert (taken[live] >= left[live] * (1 - 4 * EPS)).all()


def _jumps_reference(w, c, e, t, cap):
    """The give / take loops of ``eplb_opt.exact._jumps`` for one expert and one ``t``."""
    give = take = None
    if c[e] - t >= 1:
        nc = c.copy()
        nc[e] -= t
        for _ in range(t):
            ratio = np.where((nc < cap) & (np.arange(len(w)) != e), w / nc, -np.inf)
            nc[int(ratio.argmax())] += 1
        give = nc
    if c[e] + t <= cap:
        nc = c.copy()
        nc[e] += t
        for _ in range(t):
            ratio = np.where((nc > 1) & (np.arange(len(w)) != e), w / np.maximum(nc - 1, 1), np.inf)
            j = int(ratio.argmin())
            if not np.isfinite(ratio[j]):
                break
            nc[j] -= 1
        take = nc if nc.sum() == c.sum() else None
    return give, take


def test_add_and_remove_replicas_are_the_exact_jump_steps():
    """``add_replicas`` / ``remove_replicas`` with the moving expert frozen give what
    ``exact._jumps`` computes with its own loops (where the others have room)."""
    rng = np.random.default_rng(11)
    for trial in range(600):
        E = int(rng.integers(2, 12))
        w = _weights(rng, 1, E, trial % 5)[0]
        cap = int(rng.integers(2, 7))
        c = rng.integers(1, cap + 1, size=E).astype(np.int64)
        e, t = int(rng.integers(E)), int(rng.integers(2, 5))
        give, take = _jumps_reference(w, c, e, t, cap)
        frozen = (np.arange(E) == e)[None]
        if give is not None and (cap - np.delete(c, e)).sum() >= t:
            start = c.copy()
            start[e] -= t
            assert np.array_equal(add_replicas(w[None], start[None], t, cap, frozen=frozen)[0], give)
        if c[e] + t <= cap:
            start = c.copy()
            start[e] += t
            got = remove_replicas(w[None], start[None], t, frozen=frozen)[0]
            if take is not None:
                assert np.array_equal(got, take)
            else:
                assert got.sum() > c.sum()          # stopped: the others had too few to give


def test_add_and_remove_stop_rows_that_cannot_move():
    w = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    c = np.array([[2, 2, 1], [1, 1, 1]])
    got = add_replicas(w, c, np.array([3, 1]), cap=2)
    assert got.tolist() == [[2, 2, 2], [2, 1, 1]]             # row 0: only one slot below the cap
    back = remove_replicas(w, got, 5)
    assert back.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert remove_replicas(w, c, 1, frozen=np.array([[True, False, False], [False] * 3])).tolist() == [
        [2, 1, 1], [1, 1, 1]]
