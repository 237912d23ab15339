"""Exact mode: refine a heuristic plan under a deadline, with certified figures.

Sub-problems are layers (global policy) or a layer's nodes (hierarchical policy; a
layer's step time is its heaviest node, so work goes to the node that sets it).
Phases, all sharing one deadline:

1. *Complete models* for small sub-problems: CP-SAT over replica counts and placement
   together (:func:`eplb_opt.cpsat.solve_complete`); a proof there is a bound valid with
   counts free, and it joins the certified bound.
2. *Exact pair re-splits* (:mod:`heuristics.resplit`), batched over every layer still
   above its bound: fast, and on model-shaped loads it closes most of the gap.
3. *CP-SAT large-neighbourhood search*: for the layers still above tolerance, largest
   gap first, the heaviest GPU and a few others are re-placed exactly
   (:func:`eplb_opt.cpsat.solve_neighbourhood`), in worker threads.  Before it, under
   the hierarchical policy with one group per node, the heaviest node of each open layer
   gets a complete model (counts free), whose proven bound holds for the layer.

Replica counts and the group-to-node assignment stay as the heuristic chose them except
in phase 1.  Every change only ever lowers a layer's heaviest GPU; the caller checks
that again on the final plan.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .heuristics.pipeline import pack_rows
from .heuristics.resplit import resplit_rounds

from .status import StatusLog, logging_statuses, ortools_ready, status_events

__all__ = ["ExactOutcome", "RefineInterrupted", "refine"]

# Sub-problems whose complete model has at most this many variables get phase 1.
COMPLETE_LIMIT = 4000
# CP-SAT time per neighbourhood (seconds, or deterministic units).
NEIGHBOURHOOD_TIME = 0.05
# Share of the time left after the pair re-splits given to replica-count moves.
COUNT_SHARE = 0.7
# No CP-SAT call starts with less time than this left.
MIN_SOLVE = 0.005
# Complete hierarchical models: share of a layer's time for the first pass over all node
# contents (the rest goes to the contents that decide the layer).
FIRST_SHARE = 0.15
# Wall seconds per variable to build a CP-SAT model in Python (a 512-variable fixed-count
# model: ~10 ms on this project's machine); no model is built with less time than that.
BUILD_SECONDS_PER_VAR = 2e-5
# Wall time to load OR-Tools the first time (measured here: ~0.4 s).
IMPORT_SECONDS = 0.6
# Deterministic mode: wall seconds one candidate-item of a count move takes on this
# project's 2-core machine (58x256 prefill-shaped loads, 320 and 160 replicas: a 16 s
# deterministic budget then runs ~15.5 s; measured 2026-11-27).
SECONDS_PER_CANDIDATE_ITEM = 6e-6
# Whole-sub-problem models (fixed counts) are built up to this many n[e, g] variables,
# with this share of the time left before the neighbourhood search.
FIXED_LIMIT = 2500
FIXED_SHARE = 0.5
# Share of the time left before the neighbourhood search given to complete models of the
# heaviest node (hierarchical policy with one group per node).
NODE_SHARE = 0.5


@dataclass
class ExactOutcome:
    """What exact mode did.

    Attributes:
        phy2log: ``[L, R]`` refined placement.
        attempted: ``[L]`` bool, layers some exact phase worked on.
        proven: ``[L]`` float, bounds proved by complete models or the group model
            (valid with counts and placement free; NaN where none), in input units.
        conditional: ``[L]`` float, bounds proved for the plan's replica counts and group
            placement only (NaN where none); never merged into the certified bound.
        events: short notes (skips, timeouts, failures).
    """

    phy2log: np.ndarray
    attempted: np.ndarray
    proven: np.ndarray
    events: list[str] = field(default_factory=list)
    conditional: np.ndarray | None = None


class RefineInterrupted(KeyboardInterrupt):
    """Ctrl-C (``KeyboardInterrupt``) during :func:`refine`; ``outcome`` is the
    :class:`ExactOutcome` as far as the refinement got (not yet verified)."""

    def __init__(self, outcome: ExactOutcome) -> None:
        super().__init__("interrupted during exact refinement")
        self.outcome = outcome


class _Partial:
    """What :func:`refine` has so far (the arrays are shared, not copied), for an
    interrupt; ``stop`` tells worker threads to finish."""

    def __init__(self) -> None:
        self.p: np.ndarray | None = None
        self.stop = threading.Event()

    def track(self, p: np.ndarray, attempted: np.ndarray, proven: np.ndarray, conditional: np.ndarray,
              events: list[str]) -> None:
        self.p, self.attempted, self.proven, self.conditional, self.events = p, attempted, proven, conditional, events


_TIMED_OUT = "timed out in CP-SAT search (kept the best plan found)"


def _failed(events: list[str], where: str, exc: BaseException) -> None:
    """Record a solver failure (the plan of that sub-problem is kept) as an event and a
    warning."""
    msg = f"{where} failed ({type(exc).__name__}: {exc}); kept the plan"
    events.append(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _fixed_size(experts: int, gpus: int) -> int:
    return experts * gpus


def _groups_exact(num_groups: int, num_nodes: int) -> bool:
    """Whether the heuristic group step is already exact (as heuristics.grouping)."""
    from .heuristics import ENUMERATION_LIMIT, num_partitions

    m = num_groups // num_nodes
    return num_nodes == 1 or m <= 2 or num_partitions(num_groups, num_nodes) <= ENUMERATION_LIMIT


def _groups_by_cpsat(
    w: np.ndarray,
    p: np.ndarray,
    layers: np.ndarray,
    *,
    R: int,
    G: int,
    N: int,
    num_groups: int,
    deadline: float,
    budget: float,
    deterministic: bool,
    seed: int,
    proven: np.ndarray,
    events: list[str],
    allow_duplicates: bool,
    cpsat,
    ids: np.ndarray,
    box: "_Partial | None" = None,
) -> np.ndarray:
    """Groups to nodes exactly by CP-SAT where enumeration is too big; re-plans a layer
    whose heaviest node gets lighter.  A proven optimum of the heaviest node, over its GPUs,
    bounds every plan (certified)."""
    from .heuristics import place

    L, E = w.shape
    gs = E // num_groups
    gpn = G // N
    p = p.copy()
    if box is not None:
        box.p = p
    share_end = time.perf_counter() + 0.2 * max(0.0, deadline - time.perf_counter())
    improved = 0
    for i, l in enumerate(layers):
        if not deterministic and time.perf_counter() >= share_end:
            events.append("group placement: time share ran out before every layer was solved")
            break
        gl = w[l].reshape(num_groups, gs).sum(axis=1)
        hint = np.empty(num_groups, dtype=np.int64)
        for n in range(N):
            for g in np.unique(p[l].reshape(N, R // N)[n] // gs):
                hint[g] = n
        limit = (budget / 10) if deterministic else max(
            0.01, (share_end - time.perf_counter()) / (len(layers) - i)
        )
        try:
            node, bound, optimal = cpsat.solve_groups(gl, N, hint, limit, seed=seed, deterministic=deterministic)
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
            _failed(events, f"layer {ids[l]}: CP-SAT group placement", exc)
            continue
        if bound is not None and optimal:
            proven[l] = np.fmax(proven[l], bound / gpn * (1 - 1e-12))
        if node is None:
            continue
        cur_node = np.array([gl[hint == n].sum() for n in range(N)]).max()
        new_node = np.array([gl[node == n].sum() for n in range(N)]).max()
        if new_node < cur_node * (1 - 1e-12):
            alt = place(w[l : l + 1], R, num_groups, N, G, node_of_group=node[None, :],
                        allow_duplicates=allow_duplicates).phy2log[0]
            if _gpu_loads(w[l : l + 1], alt[None], G).max() < _gpu_loads(w[l : l + 1], p[l : l + 1], G).max():
                p[l] = alt
                improved += 1
    if improved:
        events.append(f"group placement improved by CP-SAT on {improved} layer(s)")
    return p


def _jumps(w: np.ndarray, c: np.ndarray, multi: np.ndarray, cap: int, max_jump: int) -> np.ndarray:
    """Count vectors where one expert of ``multi`` gives away (or takes) ``t`` replicas,
    ``t = 2..max_jump``, the others following the greedy rule; ``[n, len(w)]``."""
    out = []
    for e in multi:
        for t in range(2, max_jump + 1):
            if c[e] - t >= 1:                                  # give t away
                nc = c.copy()
                nc[e] -= t
                for _ in range(t):
                    ratio = np.where((nc < cap) & (np.arange(len(w)) != e), w / nc, -np.inf)
                    nc[int(ratio.argmax())] += 1
                out.append(nc)
            if c[e] + t <= cap:                                # take t
                nc = c.copy()
                nc[e] += t
                for _ in range(t):
                    ratio = np.where((nc > 1) & (np.arange(len(w)) != e), w / np.maximum(nc - 1, 1), np.inf)
                    j = int(ratio.argmin())
                    if not np.isfinite(ratio[j]):
                        break
                    nc[j] -= 1
                if nc.sum() == c.sum():
                    out.append(nc)
    return np.array(out, dtype=np.int64).reshape(-1, len(w))


def _complete_size(num_experts: int, num_replicas: int, num_gpus: int) -> int:
    """Variables of the complete model (as :func:`eplb_opt.cpsat.complete_size`)."""
    return num_experts * (num_replicas - num_experts + 1) * (num_gpus + 1)


def _hier_complete_ok(E: int, R: int, G: int, N: int, num_groups: int) -> bool:
    """Small enough to solve every node content completely and enumerate assignments."""
    from math import comb

    from .heuristics import ENUMERATION_LIMIT, num_partitions

    m = num_groups // N
    contents = comb(num_groups, m)
    size = _complete_size(E // N, R // N, G // N)
    return (
        num_partitions(num_groups, N) <= ENUMERATION_LIMIT
        and contents * size <= COMPLETE_LIMIT * 4
        and size <= COMPLETE_LIMIT
    )


def _complete_hierarchical(
    w: np.ndarray,
    p: np.ndarray,
    layers: np.ndarray,
    *,
    R: int,
    G: int,
    N: int,
    num_groups: int,
    deadline: float,
    budget: float,
    deterministic: bool,
    seed: int,
    workers: int,
    allow_duplicates: bool,
    tolerance: float,
    attempted: np.ndarray,
    proven: np.ndarray,
    events: list[str],
    ids: np.ndarray,
    box: "_Partial | None" = None,
) -> np.ndarray:
    """Hierarchical policy, small problems: every node content (a set of groups) is solved
    completely, and the best group-to-node assignment is read off by enumeration.  The
    min-max of the contents' proven bounds is certified with counts and group placement
    free.

    Per layer, a first pass gives every content a short solve (warm-started from the
    plan where the plan has that content on a node); the rest of the layer's time goes,
    one doubled solve at a time, to the content that decides the layer: the unproven one
    of largest load in the assignment with the lowest bound or in the best assignment."""
    from itertools import combinations

    from .heuristics import equal_partitions

    from . import cpsat

    L, E = w.shape
    gs, m = E // num_groups, num_groups // N
    rn, gpn = R // N, G // N
    k = R // G
    contents = list(combinations(range(num_groups), m))
    parts = equal_partitions(num_groups, N)
    index = {c: i for i, c in enumerate(contents)}
    blocks = np.array([[index[tuple(np.flatnonzero(row == b).tolist())] for b in range(N)] for row in parts])
    members = [np.concatenate([np.arange(g * gs, (g + 1) * gs) for g in c]) for c in contents]
    p = p.copy()
    if box is not None:
        box.p = p
    nc = len(contents)
    for i, l in enumerate(layers):
        attempted[l] = True
        layer_end = time.perf_counter() + max(0.0, deadline - time.perf_counter()) / (len(layers) - i)
        obj = np.full(nc, np.inf)
        bnd = np.zeros(nc)
        solved = np.zeros(nc, dtype=bool)
        optimal = np.zeros(nc, dtype=bool)
        limit = np.zeros(nc)
        place: list[np.ndarray | None] = [None] * nc
        # The plan's own node contents, as hints.
        hints: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for node in p[l].reshape(N, rn):
            groups = tuple(np.unique(node // gs).tolist())
            if groups in index:
                local = np.searchsorted(members[index[groups]], node)
                hints[index[groups]] = (np.bincount(local, minlength=m * gs), local.reshape(gpn, k))
        spent = 0.0  # deterministic units handed out

        def left() -> float:
            return (budget - spent) if deterministic else layer_end - time.perf_counter()

        def run(ci: int, t: float) -> bool:
            nonlocal spent
            spent += t
            limit[ci] = t
            try:
                res = cpsat.solve_complete(
                    w[l, members[ci]], rn, gpn, time_limit=max(t, 0.01), hint=hints.get(ci),
                    seed=seed, workers=workers, deterministic=deterministic,
                    forbid_duplicates=not allow_duplicates,
                )
            except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
                _failed(events, f"layer {ids[l]}: complete CP-SAT model", exc)
                return False
            solved[ci] = True
            if res.bound is not None:
                bnd[ci] = max(bnd[ci], res.bound)
            if res.placement is not None and res.objective < obj[ci]:
                obj[ci] = res.objective
                place[ci] = members[ci][res.placement]
                hints[ci] = (res.counts, res.placement)
            optimal[ci] |= res.optimal
            return True

        failed = False
        first = FIRST_SHARE * left() / nc
        for ci in range(nc):
            if not deterministic and time.perf_counter() >= layer_end:
                break
            if not run(ci, first if deterministic else max(first, FIRST_SHARE * left() / (nc - ci))):
                failed = True
                break
        while not failed and solved.all():
            lbs, ubs = bnd[blocks].max(axis=1), obj[blocks].max(axis=1)
            lo, hi = int(np.argmin(lbs)), int(np.argmin(ubs))
            if not np.isfinite(ubs[hi]) or ubs[hi] <= 0 or 1 - lbs[lo] / ubs[hi] <= tolerance:
                break
            # The unproven content that can move the layer's bound (largest load in the
            # assignment with the lowest bound) or its plan (the best assignment's heaviest).
            cands = [c for c in blocks[lo] if not optimal[c] and obj[c] > lbs[lo]]
            cands += [c for c in blocks[hi] if not optimal[c] and obj[c] >= ubs[hi]]
            if not cands:
                break
            ci = max(cands, key=lambda c: (obj[c] - bnd[c], -c))
            t = min(2 * limit[ci], left())
            if t < (0.01 if deterministic else MIN_SOLVE + BUILD_SECONDS_PER_VAR * _complete_size(m * gs, rn, gpn)):
                break
            failed = not run(ci, t)
        complete = solved.all() and bool(optimal[blocks].all(axis=1).any())
        if solved.all():
            proven[l] = float(bnd[blocks].max(axis=1).min())
        if not complete:
            events.append(f"layer {ids[l]}: complete models timed out (kept the best plan found)")
        best = int(np.argmin(obj[blocks].max(axis=1)))
        best_obj = float(obj[blocks[best]].max())
        cur = _gpu_loads(w[l : l + 1], p[l : l + 1], G).max()
        if np.isfinite(best_obj) and best_obj < cur * (1 - 1e-12):
            p[l] = np.concatenate([place[b].ravel() for b in blocks[best]])
    return p


def _cpsat(deterministic: bool, deadline: float, events: list[str], what: str):
    """:mod:`eplb_opt.cpsat`, importing OR-Tools if needed -- or ``None`` (and an event)
    when that import (about 0.5 s, once per process) would overrun a wall-clock deadline.
    Nothing is loaded in the background: an import running beside a call holds the GIL
    for long stretches and was measured to slow the caller's own work by up to 0.1-0.2 s
    (issue 12); ``eplb_opt.warm_up()`` loads it up front."""
    if not deterministic and not ortools_ready() and deadline - time.perf_counter() < IMPORT_SECONDS:
        events.append(f"{what} skipped: loading OR-Tools (about 0.5 s, once per process) would overrun the "
                      "deadline; call eplb_opt.warm_up() at start-up")
        return None
    from . import cpsat  # OR-Tools is imported only when a model is built

    return cpsat


def _complete_heaviest_nodes(
    w: np.ndarray,
    p: np.ndarray,
    layers: list[int],
    *,
    cpsat,
    R: int,
    N: int,
    P: int,
    deadline: float,
    budget: float,
    deterministic: bool,
    seed: int,
    workers: int,
    allow_duplicates: bool,
    proven: np.ndarray,
    lower_bound: np.ndarray,
    tol: float,
    events: list[str],
    ids: np.ndarray,
) -> np.ndarray:
    """Phase 3c of :func:`_refine` (one group per node): for each layer, largest gap
    first, the complete model (replica counts free) of the node that sets the layer's
    maximum.  Its proven bound holds for the layer (that group sits alone on some node in
    every plan) and joins ``proven``; a better node placement replaces the node's."""
    L, E = w.shape
    rn, k = R // N, R // (N * P)
    p = p.copy()
    improved = 0
    for i, l in enumerate(layers):
        if not deterministic and time.perf_counter() >= deadline:
            events.append(f"complete node models: time share ran out after {i} of {len(layers)} layer(s)")
            break
        cnt = np.bincount(p[l], minlength=E)
        nodes = p[l].reshape(N, rn)
        node_max = (w[l] / np.maximum(cnt, 1))[nodes].reshape(N, P, k).sum(axis=2).max(axis=1)
        n = int(node_max.argmax())
        ex = np.unique(nodes[n])
        local = np.searchsorted(ex, nodes[n]).reshape(P, k)
        share = max(0.0, deadline - time.perf_counter()) / (len(layers) - i)
        if not deterministic and share < BUILD_SECONDS_PER_VAR * _complete_size(ex.size, rn, P) + MIN_SOLVE:
            events.append(f"complete node models: time share too short after {i} of {len(layers)} layer(s)")
            break
        try:
            res = cpsat.solve_complete(
                w[l, ex], rn, P, time_limit=(budget / 4) if deterministic else max(share, 0.01),
                hint=(cnt[ex], local), seed=seed, workers=workers, deterministic=deterministic,
                forbid_duplicates=not allow_duplicates,
            )
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
            _failed(events, f"layer {ids[l]} node {n}: complete CP-SAT model", exc)
            continue
        if res.bound is not None:
            proven[l] = np.fmax(proven[l], res.bound)
        if res.placement is not None and res.objective < node_max[n] * (1 - 1e-12):
            p[l, n * rn : (n + 1) * rn] = ex[res.placement].ravel()
            improved += 1
    if improved:
        events.append(f"complete node models improved {improved} layer(s)")
    return p


def _gpu_loads(w: np.ndarray, p: np.ndarray, gpus: int) -> np.ndarray:
    L, E = w.shape
    cnt = np.bincount((p + (np.arange(L) * E)[:, None]).ravel(), minlength=L * E).reshape(L, E)
    per = np.take_along_axis(w / np.maximum(cnt, 1), p, axis=1)
    return per.reshape(L, gpus, -1).sum(axis=2)


def refine(weight: np.ndarray, phy2log: np.ndarray, **kw: Any) -> ExactOutcome:
    """Refine ``phy2log`` (see module docs and :func:`_refine` for the arguments).

    Every CP-SAT status is tallied; ``UNKNOWN`` answers are reported in the events and
    ``MODEL_INVALID`` or unknown status codes count as a failed solve (the sub-problem
    keeps its plan, an event names the fault).  A ``KeyboardInterrupt`` stops the worker
    threads and is re-raised as :class:`RefineInterrupted`, carrying the plan as far as
    it got (every row a complete, consistent re-placement).

    Returns:
        :class:`ExactOutcome`.
    """
    box = _Partial()
    log = StatusLog()
    try:
        with logging_statuses(log):
            out = _refine(weight, phy2log, box=box, log=log, **kw)
    except KeyboardInterrupt:
        if box.p is None:
            raise
        box.stop.set()
        events = list(box.events) + status_events(log)
        raise RefineInterrupted(
            ExactOutcome(box.p.copy(), box.attempted.copy(), box.proven.copy(), events, box.conditional.copy())
        ) from None
    out.events.extend(status_events(log))
    return out


def _refine(
    weight: np.ndarray,
    phy2log: np.ndarray,
    *,
    box: "_Partial",
    log: StatusLog,
    num_gpus: int,
    num_nodes: int,
    lower_bound: np.ndarray,
    num_groups: int = 1,
    deadline: float,
    tolerance: float,
    workers: int | None = None,
    deterministic: bool = False,
    seed: int = 0,
    allow_duplicates: bool = True,
    budget: float = 1.0,
    total_layers: int | None = None,
    layer_ids: np.ndarray | None = None,
) -> ExactOutcome:
    """The body of :func:`refine`; ``box`` tracks the plan so far for interrupts and
    ``log`` is installed on the worker threads.

    Args:
        weight: ``[L, E]`` float64 loads.
        phy2log: ``[L, R]`` warm-start placement (hierarchical: node ``n`` holds slots
            ``n * R / N ..``; global: pass ``num_nodes=1``).
        num_gpus, num_nodes: topology of the plan (``num_nodes=1`` for the global policy).
        num_groups: expert groups (hierarchical policy; used by the complete models).
        lower_bound: ``[L]`` certified bounds (a layer within ``tolerance`` is skipped).
        deadline: ``time.perf_counter()`` value by which to stop.
        workers: threads for CP-SAT (default: available cores).
        deterministic: iteration and deterministic-time budgets instead of wall clock
            (``budget / total_layers`` seconds' worth per layer, never shared between
            layers), so each layer's result depends only on its own loads, the seed, the
            workers and ``budget / total_layers``: any split of the layers into calls
            (see :mod:`eplb_opt.distributed`) gives the same plan.
        seed: seeds CP-SAT and the neighbourhood choice.
        allow_duplicates: let CP-SAT put two replicas of one expert on a GPU.
        budget: the time budget (seconds) of the whole problem, used to size
            deterministic budgets.
        total_layers: layers of the whole problem when this call refines a part of it
            (default: ``L``).
        layer_ids: ``[L]`` the layers' indices in the whole problem (seeds and messages;
            default ``0..L-1``).

    Returns:
        :class:`ExactOutcome`.
    """
    w = np.asarray(weight, dtype=np.float64)
    p = np.array(phy2log, dtype=np.int64, copy=True)
    L, E = w.shape
    R = p.shape[1]
    G, N = num_gpus, num_nodes
    P, k = G // N, R // G
    workers = max(1, int(workers or os.cpu_count() or 1))
    ids = np.arange(L) if layer_ids is None else np.asarray(layer_ids, dtype=np.int64)
    layer_budget = budget / max(1, int(total_layers or L))
    events: list[str] = []
    attempted = np.zeros(L, dtype=bool)
    proven = np.full(L, np.nan)
    conditional = np.full(L, np.nan)
    tol = tolerance
    box.track(p, attempted, proven, conditional, events)

    def out_of_time() -> bool:
        return (not deterministic) and time.perf_counter() >= deadline

    def layer_gap(loads: np.ndarray) -> np.ndarray:
        top = loads.max(axis=1)
        return np.where(top > 0, 1 - lower_bound / np.where(top > 0, top, 1), 0.0)

    def refresh(plan: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """GPU loads, replica counts, per-replica loads and the layers above tolerance
        (largest gap first) of ``plan``."""
        gpu = _gpu_loads(w, plan, G)
        counts = np.bincount((plan + (np.arange(L) * E)[:, None]).ravel(), minlength=L * E).reshape(L, E)
        gaps = layer_gap(gpu)
        return gpu, counts, w / np.maximum(counts, 1), [int(l) for l in np.argsort(-gaps) if gaps[l] > tol]

    loads = _gpu_loads(w, p, G)
    open_layers = np.flatnonzero(layer_gap(loads) > tol)
    skipped = L - open_layers.size
    if skipped:
        events.append(f"solver skipped on {skipped} layer(s): certified gap already within tolerance {tol:g}")
    if open_layers.size == 0:
        return ExactOutcome(p, attempted, proven, events, conditional)

    # Phase 1: complete models where the whole problem is small.
    # (Where OR-Tools cannot be loaded in time, the phases below that need no solver run.)
    if N == 1 and _complete_size(E, R, G) <= COMPLETE_LIMIT and (
            cpsat := _cpsat(deterministic, deadline, events, f"complete models on {open_layers.size} layer(s)")):

        share = max(0.0, deadline - time.perf_counter()) / max(open_layers.size, 1)
        for l in open_layers:
            if out_of_time():
                events.append(f"layer {ids[l]}: time ran out before the complete model")
                continue
            attempted[l] = True
            cnt = np.bincount(p[l], minlength=E)
            try:
                res = cpsat.solve_complete(
                    w[l], R, G,
                    time_limit=layer_budget if deterministic else max(share, 0.01),
                    hint=(cnt, p[l].reshape(G, k)), seed=seed, workers=workers,
                    deterministic=deterministic, forbid_duplicates=not allow_duplicates,
                )
            except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
                _failed(events, f"layer {ids[l]}: complete CP-SAT model", exc)
                continue
            if res.bound is not None:
                proven[l] = res.bound
            if res.placement is not None and res.objective < loads[l].max() * (1 - 1e-12):
                p[l] = res.placement.ravel()
            if not res.optimal:
                events.append(f"layer {ids[l]}: complete model timed out (kept the best plan found)")
        return ExactOutcome(p, attempted, proven, events, conditional)
    if N > 1 and _hier_complete_ok(E, R, G, N, num_groups) and _cpsat(
            deterministic, deadline, events, f"complete models on {open_layers.size} layer(s)"):
        p = _complete_hierarchical(
            w, p, open_layers, R=R, G=G, N=N, num_groups=num_groups, deadline=deadline,
            budget=layer_budget, deterministic=deterministic, seed=seed, workers=workers,
            allow_duplicates=allow_duplicates, tolerance=tol, attempted=attempted, proven=proven,
            events=events, ids=ids, box=box,
        )
        return ExactOutcome(p, attempted, proven, events, conditional)

    # Phase 0 (hierarchical, groups too many to enumerate): groups to nodes by CP-SAT.
    if N > 1 and not _groups_exact(num_groups, N) and not out_of_time():
        cpsat = _cpsat(deterministic, deadline, events, "CP-SAT group placement")
        if cpsat is not None:
            p = _groups_by_cpsat(
                w, p, open_layers, R=R, G=G, N=N, num_groups=num_groups, deadline=deadline,
                budget=layer_budget, deterministic=deterministic, seed=seed, proven=proven,
                events=events, allow_duplicates=allow_duplicates, cpsat=cpsat, ids=ids, box=box,
            )
            box.p = p
            loads = _gpu_loads(w, p, G)
            open_layers = np.flatnonzero(layer_gap(loads) > tol)

    # Phase 2: exact pair re-splits, all open layers at once.
    rows = L * N
    slots = p.reshape(rows, P * k)
    cnt = np.bincount((p + (np.arange(L) * E)[:, None]).ravel(), minlength=L * E).reshape(L, E)
    per = w / np.maximum(cnt, 1)
    row_layer = np.repeat(np.arange(L), N)
    values = per[row_layer[:, None], slots]
    layout = np.broadcast_to(np.arange(P * k).reshape(1, P, k), (rows, P, k))
    open_rows = np.flatnonzero(np.isin(row_layer, open_layers))
    attempted[open_layers] = True
    if P >= 2 and not out_of_time():
        lay, _ = resplit_rounds(
            values[open_rows], slots[open_rows], layout[open_rows],
            target=np.repeat(lower_bound, N)[open_rows],
            max_rounds=int(5 + 5 * budget) if deterministic else 10_000,
            segment_size=N, partners=P - 1,
            deadline=None if deterministic else deadline,
        )
        slots = slots.copy()
        slots[open_rows] = np.take_along_axis(slots[open_rows], lay.reshape(open_rows.size, -1), axis=1)
        p = slots.reshape(L, R)
        box.p = p
        loads = _gpu_loads(w, p, G)

    # Phase 3: replica-count moves where the counts' granularity is what blocks the
    # layer (one replica moved from one expert to another, re-packed and re-split; the
    # best of all such moves is kept while it lowers the layer's heaviest GPU).
    gaps = layer_gap(loads)
    todo = [int(l) for l in np.argsort(-gaps) if gaps[l] > tol]
    if todo and not out_of_time():
        # Most of what is left, shared by the open layers, largest gap first; CP-SAT
        # gets the rest.
        phase_end = time.perf_counter() + COUNT_SHARE * max(0.0, deadline - time.perf_counter())
        p, moved = _count_moves(
            w, p, todo, G=G, N=N, lower_bound=lower_bound, tol=tol, deadline=phase_end,
            deterministic=deterministic, max_steps=1000,
            work=(COUNT_SHARE * layer_budget / SECONDS_PER_CANDIDATE_ITEM) if deterministic else None,
            allow_duplicates=allow_duplicates, box=box,
        )
        box.p = p
        if moved:
            events.append(f"replica counts revisited on {moved} layer(s)")
        loads = _gpu_loads(w, p, G)
        cnt = np.bincount((p + (np.arange(L) * E)[:, None]).ravel(), minlength=L * E).reshape(L, E)
        per = w / np.maximum(cnt, 1)

    # Phase 4: CP-SAT neighbourhoods, largest gap first.
    gaps = layer_gap(loads)
    todo = [int(l) for l in np.argsort(-gaps) if gaps[l] > tol]
    if not todo or P < 3:
        return ExactOutcome(p, attempted, proven, events, conditional)
    if out_of_time():
        events.append(f"time ran out before CP-SAT on {len(todo)} layer(s) above tolerance")
        return ExactOutcome(p, attempted, proven, events, conditional)

    cpsat = _cpsat(deterministic, deadline, events, f"CP-SAT on {len(todo)} layer(s) above tolerance")
    if cpsat is None:
        return ExactOutcome(p, attempted, proven, events, conditional)

    # Phase 3c (hierarchical, one group per node): every plan puts each group alone on
    # some node, so a complete model (counts free) of the heaviest node's group proves a
    # bound for the layer, and may improve that node.
    if N > 1 and num_groups == N and _complete_size(E // N, R // N, P) <= COMPLETE_LIMIT:
        p = _complete_heaviest_nodes(
            w, p, todo, cpsat=cpsat, R=R, N=N, P=P, deadline=time.perf_counter()
            + NODE_SHARE * max(0.0, deadline - time.perf_counter()), budget=layer_budget,
            deterministic=deterministic, seed=seed, workers=workers, allow_duplicates=allow_duplicates,
            proven=proven, lower_bound=lower_bound, tol=tol, events=events, ids=ids,
        )
        box.p = p
        # The proven bounds hold for the layer: later phases stop at them.
        lower_bound = np.fmax(lower_bound, np.nan_to_num(proven, nan=0.0))
        loads, cnt, per, todo = refresh(p)
        if not todo or out_of_time():
            return ExactOutcome(p, attempted, proven, events, conditional)

    # Phase 3b: the whole sub-problem for its counts (n[e, g] model, warm-started), where
    # it is small enough to build quickly; its bound is conditional on the counts.
    phase_end = time.perf_counter() + FIXED_SHARE * max(0.0, deadline - time.perf_counter())
    for i, l in enumerate(list(todo)):
        if _fixed_size(E // N, P) > FIXED_LIMIT:
            break
        if not deterministic and time.perf_counter() >= phase_end:
            break
        share = max(0.0, phase_end - time.perf_counter()) / (len(todo) - i)
        if not deterministic and share < BUILD_SECONDS_PER_VAR * _fixed_size(E // N, P) + MIN_SOLVE:
            break                                   # building the model alone would overrun
        cnt_l = np.bincount(p[l], minlength=E)
        nodes = p[l].reshape(N, R // N)
        node_loads = (w[l] / np.maximum(cnt_l, 1))[nodes].reshape(N, P, k).sum(axis=2)
        n = int(node_loads.max(axis=1).argmax())
        ex = np.unique(nodes[n])
        local = np.searchsorted(ex, nodes[n]).reshape(P, k)
        try:
            res = cpsat.solve_fixed_counts(
                w[l, ex], cnt_l[ex], P, local, lower_bound[l],
                time_limit=(layer_budget / 4) if deterministic else share,
                relative_gap=tol, seed=seed, workers=workers, deterministic=deterministic,
                forbid_duplicates=not allow_duplicates,
            )
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
            _failed(events, f"layer {ids[l]} node {n}: CP-SAT (fixed counts)", exc)
            continue
        if res.bound is not None:
            conditional[l] = max(res.bound, lower_bound[l])
        if res.placement is not None:
            new_loads = (w[l, ex] / cnt_l[ex])[res.placement].sum(axis=1)
            if new_loads.max() < node_loads[n].max() * (1 - 1e-12):
                p[l, n * (R // N) : (n + 1) * (R // N)] = ex[res.placement].ravel()
    loads, cnt, per, todo = refresh(p)
    if not todo or out_of_time():
        return ExactOutcome(p, attempted, proven, events, conditional)

    iters_per_layer = max(2, int(10 * layer_budget)) if deterministic else None
    nb_time = NEIGHBOURHOOD_TIME

    def work(l: int) -> tuple[int, np.ndarray, list[str]]:
        # A crash in one layer's search (even a worker thread told to exit) keeps that
        # layer's plan and loses no other work; only an interrupt goes through.
        try:
            with logging_statuses(log):
                return _work(l)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            msg = f"layer {ids[l]}: CP-SAT search worker died ({type(exc).__name__}: {exc}); kept the plan"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return l, p[l].copy(), [msg]

    def _work(l: int) -> tuple[int, np.ndarray, list[str]]:
        notes: list[str] = []
        rng = np.random.default_rng([seed, int(ids[l])])
        sl = p[l].reshape(N, P, k).copy()
        v = per[l][sl]                                           # [N, P, k]
        fails = 0
        it = 0
        while True:
            if box.stop.is_set():
                break
            if deterministic:
                if it >= iters_per_layer:
                    break
            elif deadline - time.perf_counter() < MIN_SOLVE:
                notes.append(f"layer {ids[l]}: {_TIMED_OUT}")
                break
            it += 1
            node_loads = v.sum(axis=2)
            n = int(np.unravel_index(node_loads.argmax(), node_loads.shape)[0])
            top = node_loads[n].max()
            if top <= lower_bound[l] * (1 + tol):
                break
            m = min(P, 3 + min(fails // 4, 3))                    # grow after failures
            h = int(node_loads[n].argmax())
            order = np.argsort(node_loads[n])
            others = [g for g in order[: max(1, (m - 1) // 2)] if g != h]
            rest = [g for g in range(P) if g != h and g not in others]
            others += list(rng.choice(rest, size=min(m - 1 - len(others), len(rest)), replace=False))
            gpus = [h] + [int(g) for g in others]
            items_e = sl[n, gpus]                                # [m, k] expert ids
            sc = cpsat.scale_loads(w[l][items_e], cnt[l][items_e], k)
            upper = int(sc.ints.sum(axis=1).max())
            try:
                limit = nb_time if deterministic else min(nb_time, deadline - time.perf_counter())
                new = cpsat.solve_neighbourhood(
                    sc.ints, items_e, upper, limit, seed=seed + it,
                    deterministic=deterministic, forbid_duplicates=True,
                )
            except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
                notes.append(f"layer {ids[l]} node {n}: CP-SAT failed ({type(exc).__name__}: {exc}); kept the plan")
                break
            if new is None:
                fails += 1
                if fails >= 24:
                    break
                continue
            flat_e = items_e.ravel()[new]                        # [m, k]
            new_loads = (w[l][flat_e] / cnt[l][flat_e]).sum(axis=1)
            if new_loads.max() < node_loads[n, gpus].max() * (1 - 1e-12):
                sl[n, gpus] = flat_e
                v[n, gpus] = w[l][flat_e] / cnt[l][flat_e]
                fails = 0
            else:
                fails += 1
        return l, sl.reshape(R), notes

    timed_out: list[int] = []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for l, new_row, notes in pool.map(work, todo):
            p[l] = new_row
            for note in notes:
                if note.endswith(_TIMED_OUT):
                    timed_out.append(int(ids[l]))
                else:
                    events.append(note)
    finally:
        # On an interrupt, running searches stop after their current neighbourhood
        # (at most NEIGHBOURHOOD_TIME) and queued layers never start.
        box.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    if timed_out:
        shown = ", ".join(str(x) for x in sorted(timed_out)[:12]) + (", ..." if len(timed_out) > 12 else "")
        events.append(f"CP-SAT search timed out on {len(timed_out)} layer(s) (kept the best plan found): "
                      f"layers {shown}")
    return ExactOutcome(p, attempted, proven, events, conditional)


def _count_moves(
    w: np.ndarray,
    p: np.ndarray,
    layers: list[int],
    *,
    G: int,
    N: int,
    lower_bound: np.ndarray,
    tol: float,
    deadline: float,
    deterministic: bool,
    max_steps: int,
    allow_duplicates: bool,
    singles: int = 4,
    work: float | None = None,
    box: "_Partial | None" = None,
) -> tuple[np.ndarray, int]:
    """Improve stuck layers by moving one replica between experts of the node that sets
    the layer's maximum (see :func:`refine`); returns ``(phy2log, layers changed)``."""
    L, E = w.shape
    R = p.shape[1]
    P, k = G // N, R // G
    rn = R // N
    p = p.copy()
    if box is not None:
        box.p = p
    changed = 0
    # Deterministic budget: `work` candidate-items per layer (never shared, so a layer's
    # result does not depend on the others); every layer gets at least one step.
    for i, l in enumerate(layers):
        improved_layer = False
        allowance = work
        # This layer's share of the time left.
        layer_end = time.perf_counter() + max(0.0, deadline - time.perf_counter()) / (len(layers) - i)
        last = 0.0
        rate = SECONDS_PER_CANDIDATE_ITEM          # raised to the measured rate after a step
        for _ in range(max_steps):
            # Do not start a step the previous one says would end after the deadline.
            if not deterministic and time.perf_counter() + last >= min(layer_end + last / 2, deadline):
                break
            if allowance is not None and allowance <= 0:
                break
            t_step = time.perf_counter()
            nodes = p[l].reshape(N, rn)
            cnt = np.bincount(p[l], minlength=E)
            node_loads = (w[l] / np.maximum(cnt, 1))[nodes].reshape(N, P, k).sum(axis=2)
            n = int(node_loads.max(axis=1).argmax())
            current = node_loads[n].max()
            if current <= lower_bound[l] * (1 + tol):
                break
            # A node's own experts (every one has a replica there).
            ex = np.unique(nodes[n])
            wr, cr = w[l, ex], cnt[ex]
            multi = np.flatnonzero(cr >= 2)
            if multi.size == 0:
                break
            cap = P if not allow_duplicates else max(P, -(-rn // ex.size))
            heavy_single = np.flatnonzero(cr == 1)
            heavy_single = heavy_single[np.argsort(-wr[heavy_single])[:singles]]
            recv = np.concatenate([multi, heavy_single])
            d, r = np.meshgrid(multi, recv, indexing="ij")
            keep = (d != r) & (cr[r] < cap)
            d, r = d[keep], r[keep]
            cand = np.repeat(cr[None, :], d.size, axis=0)
            cand[np.arange(d.size), d] -= 1
            cand[np.arange(d.size), r] += 1
            # Bigger moves: an expert with several replicas gives t of them (t = 2..4)
            # to the experts the greedy rule would pick, or takes t from those it would
            # give up first; a count's granularity can need a jump to clear a layer.
            cand = np.concatenate([cand, _jumps(wr, cr, multi, cap, max_jump=4)], axis=0)
            if cand.shape[0] == 0:
                break
            # Only as many candidates as the work allowance (deterministic) or the
            # time left (wall clock, at SECONDS_PER_CANDIDATE_ITEM) pays for, those
            # whose heaviest replica is lightest first.  Wall clock: stop when not even
            # one fits; a step's cost grows with its candidates, so this bounds it.
            if allowance is not None:
                fit = max(1, int(allowance // rn))
            else:
                # Half the room, at the larger of the calibrated and the measured rate:
                # sized to the whole room at the calibrated rate, a step overran the
                # deadline by 0.1-0.3 s on a loaded machine (issue 12's deadline study).
                room = min(layer_end, deadline) - time.perf_counter()
                fit = int(0.5 * room / (rate * rn))
                if fit < 1:
                    break
            if cand.shape[0] > fit:
                heaviest = (wr[None, :] / cand).max(axis=1)
                cand = cand[np.argsort(heaviest, kind="stable")[:fit]]
            if allowance is not None:
                allowance -= cand.shape[0] * rn
            d = np.arange(cand.shape[0])  # candidate index (sizes below)
            wrow = np.repeat(wr[None, :], d.size, axis=0)
            lb_row = np.full(d.size, lower_bound[l])
            local = pack_rows(wrow, cand, P, refine_rounds=8, allow_duplicates=allow_duplicates, target=lb_row)
            vals = (wrow / cand)[np.arange(d.size)[:, None, None], local]
            lay, _ = resplit_rounds(
                vals.reshape(d.size, -1), local.reshape(d.size, -1),
                np.broadcast_to(np.arange(P * k).reshape(1, P, k), (d.size, P, k)),
                target=lb_row, max_rounds=20 if deterministic else 60, partners=min(P - 1, 8),
                deadline=None if deterministic else layer_end,
            )
            flat = np.take_along_axis(local.reshape(d.size, -1), lay.reshape(d.size, -1), axis=1)
            tops = (wrow / cand)[np.arange(d.size)[:, None], flat].reshape(d.size, P, k).sum(axis=2).max(axis=1)
            best = int(tops.argmin())
            last = time.perf_counter() - t_step
            rate = max(rate, last / (cand.shape[0] * rn))
            if tops[best] >= current * (1 - 1e-12):
                break
            p[l, n * rn : (n + 1) * rn] = ex[flat[best]]
            improved_layer = True
            last = time.perf_counter() - t_step
        changed += improved_layer
    return p, changed
