"""CP-SAT models (OR-Tools), imported only when exact mode is used.

Five models, each built in fixed sections (data, variables, constraints, objective,
solve, read-out):

* :func:`solve_neighbourhood`: re-place the items of a few GPUs of one sub-problem
  (a layer, or a layer's node), exactly ``k`` per GPU, minimising the heaviest of them;
  the large-neighbourhood step of exact mode.
* :func:`solve_fixed_counts`: a whole sub-problem for its current replica counts, with
  integer replica numbers ``n[e, g]`` per GPU, warm-started from the current plan; its
  proven bound holds only for those counts (a *conditional* bound).
* :func:`solve_complete`: a whole sub-problem with replica counts free (a menu of counts
  per expert) and integer replica numbers ``n[e, g]`` per GPU; used where it is small
  enough to be proved optimal.  Its proven bound is valid with counts free.
* :func:`solve_groups`: groups to nodes, exactly ``num_groups / N`` per node, minimising
  the heaviest node (where enumeration is too big).
* :func:`solve_min_moves`: fewest weighted moves for one node under a load cap.

Certificates (issue 12).  A bound read from a model holds for the true problem by
construction:

* loads are scaled to integers *rounded down* (:func:`scale_loads`; exactly, by a
  common multiple of the counts, when the loads are integers and fit), so every
  placement's load in the model is at most its true load, and a bound on the model is
  a bound on the true problem; the bound is converted back rounded down;
* every integer load is at most ``2**MAX_COEFF_BITS`` (``2**24``): OR-Tools 9.15's
  presolve was measured to return wrong OPTIMAL answers on these models from
  coefficients of about ``2**30`` (none at ``2**29`` and below in 1,200 checks per
  setting; the fault needs a GPU-load ordering constraint written over the replica
  variables, which no model here has any more) -- see
  ``benchmarks/experiments/cpsat_magnitude``;
* a bound above the true load of the model's own solution is a solver fault
  (:class:`SolverFault`): the caller keeps its plan and bound and names the event.

Plans read from a model are always re-evaluated in float64 by the caller.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from math import gcd
from typing import Sequence

import numpy as np
from ortools.sat.python import cp_model

from .status import SolverFault, current_log

__all__ = [
    "CompleteResult",
    "FixedResult",
    "MovesResult",
    "Scaling",
    "scale_loads",
    "solve_complete",
    "solve_fixed_counts",
    "solve_groups",
    "solve_min_moves",
    "solve_neighbourhood",
]

# Largest integer load (per replica, per group) in any model: CP-SAT 9.15 was measured
# to return wrong OPTIMAL answers on these models from coefficients of 2**30-2**31 and
# none at 2**29 or below (benchmarks/experiments/cpsat_magnitude); 2**24 leaves a margin
# of 64x while rounding costs at most 2**-23 of the heaviest item per item.
MAX_COEFF_BITS = 24


_STATUS_NAMES = {
    cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE", cp_model.INFEASIBLE: "INFEASIBLE",
    cp_model.UNKNOWN: "UNKNOWN", cp_model.MODEL_INVALID: "MODEL_INVALID",
}


def _solve_interruptibly(solver: cp_model.CpSolver, model: cp_model.CpModel) -> int:
    box: dict[str, object] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["status"] = solver.Solve(model)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="eplb-opt-cpsat", daemon=True).start()
    # Wait on an Event, not Thread.join: an interrupted join on Python 3.11 can mark a
    # running thread finished (bpo-45274), and the solver would outlive the call.
    try:
        done.wait()
    except KeyboardInterrupt:
        solver.StopSearch()
        done.wait()
        raise
    err = box.get("error")
    if isinstance(err, (Exception, KeyboardInterrupt)):
        raise err
    if err is not None:  # the solver thread died (SystemExit and the like)
        raise SolverFault(f"CP-SAT thread died ({type(err).__name__}: {err})") from err
    return box["status"]  # type: ignore[return-value]


def _run(solver: cp_model.CpSolver, model: cp_model.CpModel) -> int:
    """``solver.Solve(model)``, checked: ``MODEL_INVALID`` and unknown status codes raise
    :class:`SolverFault` naming them; every status is tallied in the thread's
    :class:`StatusLog`.

    On the main thread the solve runs on a helper thread while the main thread waits,
    so Ctrl-C is heard at once: the search is stopped and ``KeyboardInterrupt`` raised
    (a signal cannot reach Python code while the main thread sits inside the solver).
    """
    if threading.current_thread() is threading.main_thread():
        status = _solve_interruptibly(solver, model)
    else:
        status = solver.Solve(model)
    name = _STATUS_NAMES.get(status, f"status code {status!r}")
    log = current_log()
    if log is not None:
        log.add(name)
    if status == cp_model.MODEL_INVALID:
        why = model.Validate() or "no reason given"
        raise SolverFault(f"CP-SAT returned MODEL_INVALID ({why})")
    if status not in _STATUS_NAMES:
        raise SolverFault(f"CP-SAT returned an unknown {name}")
    return status


@dataclass(frozen=True)
class Scaling:
    """Integer loads, never above the true ones: ``ints * unit <= values`` for every item
    (exactly, not to a float tolerance), so any placement's load in the model is at most
    its true load and a bound the model proves is a bound on the true problem.

    Attributes:
        ints: integer loads, each at most ``2**MAX_COEFF_BITS``.
        unit: input load units per integer step (``Fraction``: ``1 / lcm`` when exact,
            a power of two otherwise).
        exact: ``ints * unit == values`` for every item.
        error: the largest ``values - ints * unit`` (input units, ``>= 0``).
    """

    ints: np.ndarray
    unit: Fraction
    exact: bool
    error: float

    def to_input(self, scaled: float) -> float:
        """A scaled quantity in input units (nearest float; see :meth:`bound_to_input`)."""
        return float(int(scaled) * self.unit)

    def bound_to_input(self, scaled: float) -> float:
        """A proven lower bound in scaled units, in input units, rounded *down*."""
        return float_down(Fraction(int(np.floor(scaled))) * self.unit)

    def to_scaled(self, value: float) -> float:
        """An input-unit quantity in scaled units."""
        return float(Fraction(value) / self.unit)


def float_down(x: Fraction) -> float:
    """The largest float64 not above ``x``."""
    f = float(x)
    if Fraction(f) > x:
        f = float(np.nextafter(f, -np.inf))
    return f


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * int(v) // gcd(out, int(v))
    return out


def scale_loads(weights: np.ndarray, counts: np.ndarray, slots_per_pack: int = 1) -> Scaling:
    """Integer per-replica loads for ``weights / counts`` (elementwise arrays), rounded
    down and no larger than ``2**MAX_COEFF_BITS`` (the magnitude at which CP-SAT was
    measured reliable; see the module docs).

    Exact (``unit = 1 / lcm(counts)``) when every weight is an integer and the scaled
    loads fit; otherwise ``unit`` is the power of two that puts the largest per-replica
    load just under ``2**MAX_COEFF_BITS``, and each load is rounded down exactly (checked
    in float64 arithmetic that is exact at these magnitudes).  ``slots_per_pack`` is
    kept for callers; a pack's sum is at most ``slots_per_pack * 2**MAX_COEFF_BITS``.
    """
    del slots_per_pack
    w = np.asarray(weights, dtype=np.float64)
    c = np.asarray(counts, dtype=np.int64)
    vals = w / c
    top = float(vals.max(initial=0.0))
    if top <= 0:
        return Scaling(np.zeros(w.shape, dtype=np.int64), Fraction(1), True, 0.0)
    limit = 2**MAX_COEFF_BITS
    if np.all(w == np.round(w)) and float(w.max()) < limit:
        m = _lcm(np.unique(c).tolist())
        if m * float(w.max()) <= limit:
            ints = (np.round(w).astype(np.int64) * (m // c)).astype(np.int64)
            return Scaling(ints, Fraction(1, m), True, 0.0)
    # Rounded: unit = 2**e with top / unit in (2**(B-1), 2**B].
    e = int(np.ceil(np.log2(top))) - MAX_COEFF_BITS
    unit = 2.0**e
    ints = np.floor(vals / unit)
    # ints * unit * c is exact in float64 (< 2**(B + 1 + log2 c) << 2**53), so these
    # comparisons with w are exact: step down where the division rounded up, up where
    # it rounded down by a whole step.
    ints = np.where(ints * unit * c > w, ints - 1, ints)
    ints = np.where((ints + 1) * unit * c <= w, ints + 1, ints)
    ints = np.maximum(ints, 0).astype(np.int64)
    err = float((vals - ints * unit).max())
    return Scaling(ints, Fraction(unit), False, max(err, 0.0))


def _solver(time_limit: float, seed: int, deterministic: bool, workers: int = 1,
            relative_gap: float | None = None, started: float | None = None) -> cp_model.CpSolver:
    """A CP-SAT solver with our parameters: a wall-clock limit, or (deterministic) a
    deterministic-time limit with interleaved search so several workers repeat.

    ``started`` (``time.perf_counter()`` when the caller's model function began): the
    wall-clock limit covers building the model too, so what the build took is taken off
    the solver's limit (a 512-variable model takes ~10 ms to build in Python, which made
    short calls overrun their deadline)."""
    solver = cp_model.CpSolver()
    # Ctrl-C belongs to the caller (KeyboardInterrupt), not to CP-SAT's own handler,
    # which would end only the current solve and swallow the signal.
    solver.parameters.catch_sigint_signal = False
    solver.parameters.num_workers = max(1, int(workers))
    solver.parameters.random_seed = int(seed)
    if relative_gap is not None:
        solver.parameters.relative_gap_limit = float(relative_gap)
    if deterministic:
        if workers > 1:
            solver.parameters.interleave_search = True
        solver.parameters.max_deterministic_time = max(time_limit, 1e-3)
    else:
        spent = 0.0 if started is None else time.perf_counter() - started
        solver.parameters.max_time_in_seconds = max(time_limit - spent, 1e-3)
    return solver


def _proven_bound(solver: cp_model.CpSolver, status: int, sc: Scaling) -> float | None:
    """The solver's proven objective bound in input units, rounded down; ``None`` when
    the solve proved nothing.  The model's loads are rounded down (:func:`scale_loads`),
    so a bound on the model bounds the true problem too."""
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.UNKNOWN):
        return None
    return max(0.0, sc.bound_to_input(solver.BestObjectiveBound()))


def _check_bound(bound: float | None, achieved: float, terms: int, what: str) -> None:
    """A model's proven bound can never exceed the true value of the solution the same
    model returned (its loads are rounded down); if it does, the solver's answer is not
    to be trusted at all: :class:`SolverFault` (the caller keeps its plan and bound and
    names the event)."""
    if bound is not None and bound > achieved * (1 + (terms + 2) * np.finfo(np.float64).eps):
        raise SolverFault(
            f"CP-SAT {what} proved a bound {bound!r} above the true load {achieved!r} of its own "
            "solution (inconsistent answer; discarded)"
        )


def solve_neighbourhood(
    ints: np.ndarray,
    labels: np.ndarray,
    upper: int,
    time_limit: float,
    seed: int = 0,
    deterministic: bool = False,
    allow_duplicates: bool = False,
) -> np.ndarray | None:
    """Best re-placement of the items of ``m`` GPUs (``k`` slots each).

    Args:
        ints: ``[m, k]`` integer item loads, current placement (GPU, slot).
        labels: ``[m, k]`` expert ids; two items of one expert never share a GPU
            (where the neighbourhood allows it) unless ``allow_duplicates``.
        upper: only placements whose heaviest GPU is below this are wanted.
        time_limit: seconds (wall clock, or deterministic units when ``deterministic``).
        seed: CP-SAT random seed.

    Returns:
        ``[m, k]`` indices into the flattened items giving the new placement, or
        ``None`` when no better placement was found in time (or none exists).
    """
    started = time.perf_counter()
    # Data.
    m, k = ints.shape
    v = ints.ravel()
    lab = labels.ravel()
    n = v.size
    order = np.argsort(-v, kind="stable")
    total = int(v.sum())
    lower = -(-total // m)
    if upper <= lower:
        return None
    # Variables.
    model = cp_model.CpModel()
    x = [[model.NewBoolVar("") for _ in range(m)] for _ in range(n)]
    top = model.NewIntVar(lower, upper - 1, "top")
    # Constraints.
    for i in range(n):
        model.AddExactlyOne(x[i])
    for g in range(m):
        model.Add(sum(x[i][g] for i in range(n)) == k)
        model.Add(sum(int(v[i]) * x[i][g] for i in range(n)) <= top)
    # GPUs are interchangeable: the j-th heaviest item may only use GPUs 0..j.
    for j, i in enumerate(order[: m - 1]):
        for g in range(j + 1, m):
            model.Add(x[i][g] == 0)
    if not allow_duplicates:
        uniq, inv, cnt = np.unique(lab, return_inverse=True, return_counts=True)
        for u in np.flatnonzero(cnt > 1):
            members = np.flatnonzero(inv == u)
            cap = -(-len(members) // m)
            for g in range(m):
                model.Add(sum(x[i][g] for i in members) <= cap)
    # Objective.
    model.Minimize(top)
    # Solve.
    solver = _solver(time_limit, seed, deterministic, started=started)
    status = _run(solver, model)
    # Read-out.
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    out = np.empty((m, k), dtype=np.int64)
    fill = [0] * m
    for i in range(n):
        for g in range(m):
            if solver.BooleanValue(x[i][g]):
                out[g, fill[g]] = i
                fill[g] += 1
                break
    return out


@dataclass(frozen=True)
class CompleteResult:
    """Outcome of :func:`solve_complete`.

    Attributes:
        counts: ``[E]`` replica counts chosen (or ``None`` when no solution was found).
        placement: ``[G, k]`` expert of each slot (or ``None``).
        objective: heaviest GPU load of the solution, in input units (recomputed).
        bound: proven lower bound in input units, valid with counts free (corrected
            outward for rounding), or ``None``.
        optimal: the solver proved optimality.
    """

    counts: np.ndarray | None
    placement: np.ndarray | None
    objective: float | None
    bound: float | None
    optimal: bool


def solve_complete(
    weights: np.ndarray,
    num_replicas: int,
    num_gpus: int,
    time_limit: float,
    hint: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
    workers: int = 1,
    deterministic: bool = False,
    allow_duplicates: bool = True,
) -> CompleteResult:
    """A whole sub-problem with replica counts free.

    Args:
        weights: ``[E]`` expert loads of the sub-problem.
        num_replicas: slots of the sub-problem (``>= E``, a multiple of ``num_gpus``).
        num_gpus: GPUs of the sub-problem.
        time_limit: seconds (deterministic units when ``deterministic``).
        hint: optional ``(counts [E], placement [G, k])`` warm start.
        allow_duplicates: when False, no two replicas of one expert on one GPU.

    Returns:
        :class:`CompleteResult`.
    """
    started = time.perf_counter()
    # Data.
    w = np.asarray(weights, dtype=np.float64)
    E = w.size
    G = num_gpus
    k = num_replicas // G
    menu = np.arange(1, num_replicas - E + 2)
    if not allow_duplicates:
        menu = menu[menu <= G]
    # Per-replica load of expert e with c replicas, scaled to integers.
    ee, cc = np.meshgrid(np.arange(E), menu, indexing="ij")
    sc = scale_loads(w[ee], cc, k)
    unit = sc.ints                                               # [E, len(menu)]
    # Variables: y[e][j] "expert e has menu[j] replicas"; n[e][j][g] replicas on GPU g.
    model = cp_model.CpModel()
    y = [[model.NewBoolVar("") for _ in menu] for _ in range(E)]
    nvar = [
        [[model.NewIntVar(0, int(min(c, 1 if not allow_duplicates else c)), "") for _ in range(G)] for c in menu]
        for _ in range(E)
    ]
    hi = int(unit.max()) * k
    top = model.NewIntVar(0, hi, "top")
    # Constraints.
    for e in range(E):
        model.AddExactlyOne(y[e])
        for j, c in enumerate(menu):
            model.Add(sum(nvar[e][j]) == int(c) * y[e][j])
    model.Add(sum(int(c) * y[e][j] for e in range(E) for j, c in enumerate(menu)) == num_replicas)
    for g in range(G):
        model.Add(sum(nvar[e][j][g] for e in range(E) for j in range(len(menu))) == k)
        model.Add(sum(int(unit[e, j]) * nvar[e][j][g] for e in range(E) for j in range(len(menu))) <= top)
    # GPUs are interchangeable.  With one replica per expert (no spare slot) the j-th
    # heaviest expert may only use GPUs 0..j (single variables fixed; the hint is
    # relabelled to match).  No ordering constraint on GPU loads: written over the
    # replica variables it made CP-SAT 9.15's presolve return wrong OPTIMAL answers from
    # coefficients of 2**30 (benchmarks/experiments/cpsat_magnitude), and on explicit load
    # variables it made these models slower to prove (4 of 30 no-redundancy node models
    # proven in 2 s against 11 without and 13 with the rule here).
    singles_fixed = len(menu) == 1
    if singles_fixed:
        for j, e in enumerate(np.argsort(-w, kind="stable")[: G - 1]):
            for g in range(j + 1, G):
                model.Add(nvar[e][0][g] == 0)
    if hint is not None and int(np.max(hint[0])) <= int(menu[-1]):
        h_counts, h_place = hint
        if singles_fixed:
            h_place = _relabel(np.asarray(h_place), w, np.asarray(h_counts))
        per_gpu = np.array([int(unit[h_place[g], h_counts[h_place[g]] - 1].sum()) for g in range(G)])
        for e in range(E):
            for j, c in enumerate(menu):
                model.AddHint(y[e][j], int(h_counts[e] == c))
        for g in range(G):
            on_gpu = np.bincount(h_place[g], minlength=E)
            for e in range(E):
                for j, c in enumerate(menu):
                    model.AddHint(nvar[e][j][g], int(on_gpu[e]) if h_counts[e] == c else 0)
        model.AddHint(top, int(per_gpu.max()))
    # Objective.
    model.Minimize(top)
    # Solve.
    solver = _solver(time_limit, seed, deterministic, workers, started=started)
    status = _run(solver, model)
    # Read-out.
    bound = _proven_bound(solver, status, sc)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CompleteResult(None, None, None, bound, False)
    counts = np.array([int(menu[[solver.BooleanValue(b) for b in y[e]].index(True)]) for e in range(E)])
    place = np.empty((G, k), dtype=np.int64)
    fill = [0] * G
    for e in range(E):
        j = int(np.flatnonzero(menu == counts[e])[0])
        for g in range(G):
            for _ in range(int(solver.Value(nvar[e][j][g]))):
                place[g, fill[g]] = e
                fill[g] += 1
    gpu = np.array([sum(w[e] / counts[e] for e in place[g]) for g in range(G)])
    _check_bound(bound, float(gpu.max()), k, "complete model")
    return CompleteResult(counts, place, float(gpu.max()), bound, status == cp_model.OPTIMAL)


@dataclass(frozen=True)
class FixedResult:
    """Outcome of :func:`solve_fixed_counts`: ``placement`` ``[G, k]`` expert indices (or
    ``None`` when nothing better than the hint was found), and ``bound``, a proven lower
    bound (input units, corrected outward for rounding) valid only for these counts."""

    placement: np.ndarray | None
    bound: float | None
    optimal: bool


def _relabel(place: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """GPU order of a placement that satisfies the symmetry breaking of
    :func:`solve_fixed_counts`: the j-th heaviest single-replica expert sits on GPU <= j."""
    G = place.shape[0]
    singles = np.flatnonzero(counts == 1)
    singles = singles[np.argsort(-weights[singles], kind="stable")]
    gpu_of = {}
    for g in range(G):
        for e in place[g]:
            gpu_of.setdefault(int(e), g)
    order: list[int] = []
    for e in singles:
        g = gpu_of[int(e)]
        if g not in order:
            order.append(g)
    order += [g for g in range(G) if g not in order]
    return place[order]


def solve_fixed_counts(
    weights: np.ndarray,
    counts: np.ndarray,
    num_gpus: int,
    hint: np.ndarray,
    lower: float,
    time_limit: float,
    relative_gap: float,
    seed: int = 0,
    workers: int = 1,
    deterministic: bool = False,
    allow_duplicates: bool = False,
) -> FixedResult:
    """A whole sub-problem for fixed replica counts.

    Variables ``n[e, g]`` (replicas of expert ``e`` on GPU ``g``, ``0..c_e``, at most 1
    when duplicates are forbidden and ``c_e <= G``), exactly ``k`` per GPU, objective the
    heaviest GPU ``T`` with domain ``[lower, hint's max]``.  GPUs are interchangeable; the
    j-th heaviest single-replica expert may only use GPUs ``0..j``, and the complete hint
    is relabelled to match.

    Args:
        weights, counts: ``[E]`` loads and replica counts of the sub-problem.
        num_gpus: ``G``.
        hint: ``[G, k]`` current placement (expert indices).
        lower: the start of ``T``'s domain (input units): a bound on the caller's
            objective (for a node, the layer's certified bound), so nothing below it is
            searched for; the proven bound is then one on ``max(heaviest GPU, lower)``.
        time_limit: seconds (deterministic units when ``deterministic``).
        relative_gap: stop when within this relative gap.
    """
    started = time.perf_counter()
    # Data.
    w = np.asarray(weights, dtype=np.float64)
    c = np.asarray(counts, dtype=np.int64)
    E, G = w.size, num_gpus
    k = int(c.sum()) // G
    sc = scale_loads(w, c, k)
    unit = sc.ints
    hint = _relabel(np.asarray(hint), w, c)
    hint_loads = np.array([int(unit[hint[g]].sum()) for g in range(G)])
    lo = int(np.floor(sc.to_scaled(lower))) - (0 if sc.exact else k)
    lo = max(0, min(lo, int(hint_loads.max())))
    # Variables.
    model = cp_model.CpModel()
    n = [
        [model.NewIntVar(0, int(1 if (not allow_duplicates and c[e] <= G) else c[e]), "") for _ in range(G)]
        for e in range(E)
    ]
    top = model.NewIntVar(lo, int(hint_loads.max()), "top")
    # Constraints.
    for e in range(E):
        model.Add(sum(n[e]) == int(c[e]))
    for g in range(G):
        model.Add(sum(n[e][g] for e in range(E)) == k)
        model.Add(sum(int(unit[e]) * n[e][g] for e in range(E)) <= top)
    singles = np.flatnonzero(c == 1)
    singles = singles[np.argsort(-w[singles], kind="stable")]
    for j, e in enumerate(singles[: G - 1]):
        for g in range(j + 1, G):
            model.Add(n[e][g] == 0)
    # Complete hint, relabelled above.
    for g in range(G):
        on = np.bincount(hint[g], minlength=E)
        for e in range(E):
            model.AddHint(n[e][g], int(on[e]))
    model.AddHint(top, int(hint_loads.max()))
    # Objective.
    model.Minimize(top)
    # Solve.
    solver = _solver(time_limit, seed, deterministic, workers, relative_gap=relative_gap, started=started)
    status = _run(solver, model)
    # Read-out.
    bound = _proven_bound(solver, status, sc)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return FixedResult(None, bound, False)
    place = np.empty((G, k), dtype=np.int64)
    fill = [0] * G
    for e in range(E):
        for g in range(G):
            for _ in range(int(solver.Value(n[e][g]))):
                place[g, fill[g]] = e
                fill[g] += 1
    # T's domain starts at `lower` (nothing below it matters to the caller), so the
    # proven bound is one on max(heaviest GPU, lower): checked against that.
    _check_bound(bound, max(float((w / c)[place].sum(axis=1).max()), float(lower)), k, "fixed-count model")
    return FixedResult(place, bound, status == cp_model.OPTIMAL)


def solve_groups(
    group_loads: np.ndarray,
    num_nodes: int,
    hint: np.ndarray,
    time_limit: float,
    seed: int = 0,
    deterministic: bool = False,
) -> tuple[np.ndarray | None, float | None, bool]:
    """Groups to nodes, ``num_groups / N`` per node, minimising the heaviest node.

    Args:
        group_loads: ``[num_groups]`` loads.
        hint: ``[num_groups]`` current node of each group.

    Returns:
        ``(node_of_group or None, proven lower bound on the heaviest node or None,
        optimal)``; the bound is valid over all assignments (rounding corrected).
    """
    started = time.perf_counter()
    gl = np.asarray(group_loads, dtype=np.float64)
    Gr, N = gl.size, num_nodes
    m = Gr // N
    sc = scale_loads(gl, np.ones(Gr, dtype=np.int64), m)
    v = sc.ints
    model = cp_model.CpModel()
    x = [[model.NewBoolVar("") for _ in range(N)] for _ in range(Gr)]
    top = model.NewIntVar(0, int(v.sum()), "top")
    for g in range(Gr):
        model.AddExactlyOne(x[g])
    for n in range(N):
        model.Add(sum(x[g][n] for g in range(Gr)) == m)
        model.Add(sum(int(v[g]) * x[g][n] for g in range(Gr)) <= top)
    # Nodes are interchangeable: group 0 on node 0; the j-th group on nodes <= j.
    for g in range(min(Gr, N)):
        for n in range(g + 1, N):
            model.Add(x[g][n] == 0)
    # Relabel the hint: nodes in order of their lowest group.
    first = {}
    for g in range(Gr):
        first.setdefault(int(hint[g]), len(first))
    for g in range(Gr):
        for n in range(N):
            model.AddHint(x[g][n], int(first[int(hint[g])] == n))
    model.Minimize(top)
    solver = _solver(time_limit, seed, deterministic, started=started)
    status = _run(solver, model)
    bound = _proven_bound(solver, status, sc)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, bound, False
    node = np.array([[solver.BooleanValue(b) for b in x[g]].index(True) for g in range(Gr)])
    _check_bound(bound, float(max(gl[node == n].sum() for n in range(N))), m, "group model")
    return node, bound, status == cp_model.OPTIMAL


@dataclass(frozen=True)
class MovesResult:
    """:func:`solve_min_moves` outcome: ``x`` ``[n, P]`` replicas of each expert on each
    GPU (None when no plan was found), its integer objective, and whether CP-SAT proved
    it the cheapest."""

    x: np.ndarray | None
    objective: int | None
    optimal: bool


def solve_min_moves(
    options: list[list[tuple[int, float]]],
    arrival_cost: np.ndarray,
    cap: float,
    slots_per_gpu: int,
    hint: np.ndarray,
    time_limit: float,
    *,
    max_per_gpu: int | None = None,
    seed: int = 0,
    workers: int = 1,
    deterministic: bool = False,
) -> MovesResult:
    """Fewest weighted moves for one block of GPUs (a node) under a load cap.

    Data: ``n`` experts; expert ``i`` picks one of ``options[i]``, pairs ``(t, v)``:
    ``t`` replicas in this block, each carrying load ``v``; ``arrival_cost[i, g]`` is the
    cost of each replica of expert ``i`` on GPU ``g`` (0 where the GPU held the expert).
    Variables: ``b[i, j]`` option chosen, ``y[i, g, j]`` replicas on GPU ``g`` under it.
    Constraints: ``sum_g y[i, g, j] = t_j b[i, j]``; exactly ``slots_per_gpu`` replicas
    per GPU; every GPU's load at most ``cap``, with loads rounded *up* to integers so a
    plan feasible for the model is feasible in float64.  Objective: minimise
    ``sum arrival_cost * y`` (costs rounded to hundredths).  ``hint`` ``[n, P]`` is a
    feasible placement (option = its row sums).
    """
    started = time.perf_counter()
    n, P = arrival_cost.shape
    vmax = max(v for opts in options for _, v in opts)
    if vmax <= 0 or cap <= 0:
        return MovesResult(None, None, False)
    scale = (2.0**MAX_COEFF_BITS / slots_per_gpu) / max(cap, vmax)   # reliable magnitude (module docs)
    cap_int = int(np.floor(cap * scale))
    cost_int = np.round(np.asarray(arrival_cost, dtype=np.float64) * 100).astype(np.int64)
    per_gpu = slots_per_gpu if max_per_gpu is None else max_per_gpu

    m = cp_model.CpModel()
    y: dict[tuple[int, int, int], cp_model.IntVar] = {}
    load_terms: list[list[tuple[cp_model.IntVar, int]]] = [[] for _ in range(P)]
    slot_terms: list[list[cp_model.IntVar]] = [[] for _ in range(P)]
    obj = []
    for i, opts in enumerate(options):
        bs = [m.NewBoolVar(f"b{i}_{j}") for j in range(len(opts))]
        m.AddExactlyOne(bs)
        h_total = int(hint[i].sum())
        for j, (t, v) in enumerate(opts):
            q = int(np.ceil(v * scale))
            ys = []
            for g in range(P):
                var = m.NewIntVar(0, min(t, per_gpu), f"y{i}_{g}_{j}")
                y[i, g, j] = var
                ys.append(var)
                load_terms[g].append((var, q))
                slot_terms[g].append(var)
                if cost_int[i, g]:
                    obj.append((var, int(cost_int[i, g])))
            m.Add(sum(ys) == t * bs[j])
            chosen = t == h_total and all(t2 != h_total for t2, _ in opts[:j])
            m.AddHint(bs[j], 1 if chosen else 0)
            for g in range(P):
                m.AddHint(y[i, g, j], int(hint[i, g]) if chosen else 0)
    for g in range(P):
        m.Add(sum(slot_terms[g]) == slots_per_gpu)
        m.Add(sum(var * q for var, q in load_terms[g]) <= cap_int)
    m.Minimize(sum(var * c for var, c in obj))

    solver = _solver(time_limit, seed, deterministic, workers, started=started)
    status = _run(solver, m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return MovesResult(None, None, False)
    x = np.zeros((n, P), dtype=np.int64)
    for (i, g, j), var in y.items():
        x[i, g] += solver.Value(var)
    return MovesResult(x, int(solver.ObjectiveValue()), status == cp_model.OPTIMAL)


# Set last: the module (and OR-Tools) is fully loaded (see eplb_opt.status.ortools_ready).
READY = True
