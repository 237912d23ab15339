"""Exact mode: refine a heuristic plan under a deadline, with certified figures.

Sub-problems are layers (global policy) or a layer's nodes (hierarchical policy; a
layer's step time is its heaviest node, so work goes to the node that sets it).
:func:`refine` runs the phases below in this order.  They share one
:class:`_Refinement` state (plan, bounds, budget, events) and one deadline, and each
works on the layers still above tolerance, largest gap first:

1. *Complete models*, where the whole problem is small.
   Global policy: CP-SAT over replica counts and placement together
   (:func:`eplb_opt.cpsat.solve_complete`; the refinement ends there).  Hierarchical:
   every node content (a set of groups) solved completely, the best group-to-node
   assignment read off by enumeration.  A proof holds with counts and group placement
   free and joins the certified bound.  On a wall clock the hierarchical models run after
   the pair re-splits (phase 3) with ``HIER_COMPLETE_SHARE`` of the time, and the layers
   they leave open go on to phases 2-7 (deterministic: they get it all and end there).
2. *Group placement by CP-SAT* (hierarchical, groups too many to enumerate): may move
   groups to other nodes; a proven optimum of the group step bounds every plan.
3. *Exact pair re-splits* (:mod:`heuristics.resplit`), batched over every open layer:
   fast, and on model-shaped loads it closes most of the gap.
3b. *Whole-node covers* (hierarchical, wall-clock budgets of at least
   ``NODE_COVER_MIN_BUDGET``; :mod:`heuristics.nodecover`): the
   node that sets a layer's maximum re-partitioned whole at a target near its average,
   by an exact-cover search over the ``k``-sets in the window the target leaves, with
   the plan's replica counts, counts built for the target, and count vectors near them;
   node after node.  It runs after phase 3 and again, on the layers phase 4 changed,
   after phase 4.  On
   deepseek-v3-decode (one group per node) it finds the near-perfect partitions the
   other phases miss (issue 12: seed 0, layers over 0.05 %: 16 before, 3 after).
4. *Replica-count moves*: one replica (or a few) moved between experts of the node that
   sets the layer's maximum, re-packed and re-split; changes the replica counts.
5. *Complete models of the heaviest node* (hierarchical, one group per node): that
   group sits alone on some node in every plan, so the proof bounds the layer.
6. *Fixed-count models of the heaviest node* (the ``n[e, g]`` model, warm-started);
   their bound holds for the plan's counts only (``conditional``).
7. *CP-SAT large-neighbourhood search* in worker threads: the heaviest GPU and a few
   others re-placed exactly (:func:`eplb_opt.cpsat.solve_neighbourhood`).

Phases 2, 3b and 4 change groups or replica counts; the others change placement only.
Where OR-Tools cannot be loaded in time, phases 3 and 4 (no solver) still run.  Every
change only ever lowers a layer's heaviest GPU; the caller checks that again on the final
plan.
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

from . import budget as units
from .budget import SECONDS_PER_CANDIDATE_ITEM
from .heuristics.pipeline import pack_rows
from .heuristics.nodecover import search_node
from .heuristics.resplit import resplit_rounds
from .metrics import gap as certified_gap, gpu_loads, replica_counts_of

from .status import StatusLog, logging_statuses, ortools_ready, status_events

__all__ = ["ExactOutcome", "RefineInterrupted", "refine"]

# Sub-problems whose complete model has at most this many variables get phase 1.
COMPLETE_LIMIT = 4000
# CP-SAT time per neighbourhood (seconds, or deterministic units).
NEIGHBOURHOOD_TIME = 0.05
# Share of the time left after the pair re-splits given to replica-count moves (0.7
# before issue 12's gap study: 0.4 leaves the neighbourhood search more time and
# lowered the mean gap on qwen3-235b seeds 1-2 by 13-14% and on deepseek-v3-decode
# seed 0 by 2%, worst gaps unchanged, in paired 60 s runs).  Deterministic budgets keep
# the share they were calibrated with (COUNT_SHARE_UNITS), so their plans do not move.
COUNT_SHARE = 0.4
COUNT_SHARE_UNITS = 0.7
# No CP-SAT call starts with less time than this left.
MIN_SOLVE = 0.005
# Wall-clock neighbourhood solves end this long before the deadline: CP-SAT overran
# its own limit on these small models by p50 4 ms, p99 20 ms, max 31 ms (its setup and
# presolve check the clock rarely; issue 12's deadline study, 140 limit-bound solves at
# time_limit=0.5 on the prefill preset), and those overruns were what took the
# overshoot past 20 ms.  A search stops when less than MIN_SOLVE is left after it.
NEIGHBOURHOOD_RESERVE = 0.02
# Complete hierarchical models: share of a layer's time for the first pass over all node
# contents (the rest goes to the contents that decide the layer).
FIRST_SHARE = 0.15
# Hierarchical complete models (phase 1, wall clock): share of the time left after the
# pair re-splits; the layers they leave open get the later phases' searches.
HIER_COMPLETE_SHARE = 0.5
# Wall seconds per variable to build a CP-SAT model in Python (a 512-variable fixed-count
# model: ~10 ms on this project's machine); no model is built with less time than that.
BUILD_SECONDS_PER_VAR = 2e-5
# Wall time to load OR-Tools the first time (measured here: ~0.4 s).
IMPORT_SECONDS = 0.6
# Whole-sub-problem models (fixed counts) are built up to this many n[e, g] variables,
# with this share of the time left before the neighbourhood search.
FIXED_LIMIT = 2500
FIXED_SHARE = 0.5
# Whole-node covers (phase 3b, wall clock, hierarchical): share of the time left after
# the pair re-splits, and again after the count moves (on the layers they changed).
NODE_COVER_SHARE = 0.5
NODE_COVER_SHARE_AFTER = 0.6
# ... and at most this share of the whole budget per layer and pass (the time left goes
# to the later phases).  A cap of 1 s at time_limit=60 left one decode layer over
# 0.05 % (seed 2 layer 27, 0.066 %); uncapped, a short call spent its CP-SAT time here.
NODE_COVER_LAYER_SHARE = 0.04
# One cover search runs to its end once started (the deadline is read between covers),
# and took up to about 50 ms: at time_limit 0.1-0.2 s on the prefill preset the phase
# overshot the deadline by p99 37-45 ms (100 warm calls, idle).  So it runs only on
# budgets of at least NODE_COVER_MIN_BUDGET seconds and starts no cover later than
# NODE_COVER_RESERVE seconds before the deadline.
NODE_COVER_MIN_BUDGET = 1.0
NODE_COVER_RESERVE = 0.1
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


_TIMED_OUT = "timed out in CP-SAT search (kept the best plan found)"


@dataclass
class _Refinement:
    """The state the phases of one :func:`refine` call share.

    Arrays: ``w`` ``[L, E]`` loads; ``p`` ``[L, R]`` the plan so far (hierarchical:
    node ``n`` holds slots ``n * R / N ..``); ``lower_bound`` ``[L]`` the certified bound
    the phases aim at (raised by phase 5's proofs); ``attempted`` ``[L]`` bool,
    ``proven`` and ``conditional`` ``[L]`` float (NaN where none) as in
    :class:`ExactOutcome`.  ``layer_budget`` is each layer's share of ``budget`` (wall
    seconds, or deterministic units); ``deadline`` a ``time.perf_counter()`` value.
    ``stop`` tells worker threads to finish (an interrupt).
    """

    w: np.ndarray
    p: np.ndarray
    G: int
    N: int
    num_groups: int
    lower_bound: np.ndarray
    tol: float
    deadline: float
    budget: float
    layer_budget: float
    deterministic: bool
    seed: int
    workers: int
    allow_duplicates: bool
    ids: np.ndarray
    log: StatusLog
    attempted: np.ndarray
    proven: np.ndarray
    conditional: np.ndarray
    events: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def L(self) -> int:
        return self.w.shape[0]

    @property
    def E(self) -> int:
        return self.w.shape[1]

    @property
    def R(self) -> int:
        return self.p.shape[1]

    @property
    def P(self) -> int:
        """GPUs per node."""
        return self.G // self.N

    @property
    def k(self) -> int:
        """Slots per GPU."""
        return self.R // self.G

    def out_of_time(self) -> bool:
        return (not self.deterministic) and time.perf_counter() >= self.deadline

    def loads(self) -> np.ndarray:
        """``[L, G]`` GPU loads of the plan."""
        return gpu_loads(self.w, self.p, self.G)

    def open_layers(self, loads: np.ndarray | None = None) -> list[int]:
        """Layers above tolerance, largest gap first."""
        gaps = certified_gap(self.lower_bound, (self.loads() if loads is None else loads).max(axis=1))
        return [int(l) for l in np.argsort(-gaps) if gaps[l] > self.tol]

    def per_replica(self) -> tuple[np.ndarray, np.ndarray]:
        """``([L, E] replica counts, [L, E] per-replica loads)`` of the plan."""
        cnt = replica_counts_of(self.p, self.E)
        return cnt, self.w / np.maximum(cnt, 1)

    def outcome(self) -> ExactOutcome:
        return ExactOutcome(self.p, self.attempted, self.proven, self.events, self.conditional)


def _failed(events: list[str], where: str, exc: BaseException) -> None:
    """Record a solver failure (the plan of that sub-problem is kept) as an event and a
    warning."""
    msg = f"{where} failed ({type(exc).__name__}: {exc}); kept the plan"
    events.append(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _complete_size(num_experts: int, num_replicas: int, num_gpus: int) -> int:
    """Variables of the complete model (:func:`eplb_opt.cpsat.solve_complete`)."""
    return num_experts * (num_replicas - num_experts + 1) * (num_gpus + 1)


def _fixed_size(experts: int, gpus: int) -> int:
    """Variables of the fixed-count model (:func:`eplb_opt.cpsat.solve_fixed_counts`)."""
    return experts * gpus


def refine(
    weight: np.ndarray,
    phy2log: np.ndarray,
    *,
    num_gpus: int,
    num_nodes: int,
    lower_bound: np.ndarray,
    deadline: float,
    tolerance: float,
    num_groups: int = 1,
    workers: int | None = None,
    deterministic: bool = False,
    seed: int = 0,
    allow_duplicates: bool = True,
    budget: float = 1.0,
    total_layers: int | None = None,
    layer_ids: np.ndarray | None = None,
) -> ExactOutcome:
    """Refine ``phy2log`` by the phases of the module docs.

    Args:
        weight: ``[L, E]`` float64 loads.
        phy2log: ``[L, R]`` warm-start placement (hierarchical: node ``n`` holds slots
            ``n * R / N ..``; global: pass ``num_nodes=1``).
        num_gpus, num_nodes: topology of the plan (``num_nodes=1`` for the global policy).
        lower_bound: ``[L]`` certified bounds (a layer within ``tolerance`` is skipped).
        deadline: ``time.perf_counter()`` value by which to stop.
        tolerance: the gap at which a layer counts as solved.
        num_groups: expert groups (hierarchical policy; used by the complete models).
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

    Every CP-SAT status is tallied; ``UNKNOWN`` answers are reported in the events and
    ``MODEL_INVALID`` or unknown status codes count as a failed solve (the sub-problem
    keeps its plan, an event names the fault).  A ``KeyboardInterrupt`` stops the worker
    threads and is re-raised as :class:`RefineInterrupted`, carrying the plan as far as
    it got (every row a complete, consistent re-placement).

    Returns:
        :class:`ExactOutcome`.
    """
    w = np.asarray(weight, dtype=np.float64)
    L = w.shape[0]
    s = _Refinement(
        w=w, p=np.array(phy2log, dtype=np.int64, copy=True), G=num_gpus, N=num_nodes, num_groups=num_groups,
        lower_bound=lower_bound, tol=tolerance, deadline=deadline, budget=budget,
        layer_budget=budget / max(1, int(total_layers or L)), deterministic=deterministic, seed=seed,
        workers=max(1, int(workers or os.cpu_count() or 1)), allow_duplicates=allow_duplicates,
        ids=np.arange(L) if layer_ids is None else np.asarray(layer_ids, dtype=np.int64), log=StatusLog(),
        attempted=np.zeros(L, dtype=bool), proven=np.full(L, np.nan), conditional=np.full(L, np.nan),
    )
    try:
        with logging_statuses(s.log):
            _run_phases(s)
    except KeyboardInterrupt:
        s.stop.set()
        raise RefineInterrupted(ExactOutcome(
            s.p.copy(), s.attempted.copy(), s.proven.copy(), list(s.events) + status_events(s.log),
            s.conditional.copy(),
        )) from None
    s.events.extend(status_events(s.log))
    return s.outcome()


def _run_phases(s: _Refinement) -> None:
    """The phases of the module docs, in order, until the layers are within tolerance
    or the budget is spent."""
    open_layers = s.open_layers()
    skipped = s.L - len(open_layers)
    if skipped:
        s.events.append(f"solver skipped on {skipped} layer(s): certified gap already within tolerance {s.tol:g}")
    if not open_layers:
        return
    open_layers = np.sort(np.asarray(open_layers, dtype=np.int64))
    if _phase1_complete_models(s, open_layers):
        # Hierarchical complete models get a share of a wall-clock budget; the layers
        # they leave open go on to the searches below (deterministic: they had it all).
        if s.deterministic or s.N == 1:
            return
        open_layers = np.sort(np.asarray(s.open_layers(), dtype=np.int64))
        if not open_layers.size or s.out_of_time():
            return
    open_layers = _phase2_groups_by_cpsat(s, open_layers)
    _phase3_pair_resplits(s, open_layers)
    _phase3b_node_covers(s, NODE_COVER_SHARE)
    before = s.p.copy()
    _phase4_count_moves(s)
    _phase3b_node_covers(s, NODE_COVER_SHARE_AFTER, changed_since=before)
    todo = s.open_layers()
    if not todo or s.P < 3:
        return
    if s.out_of_time():
        s.events.append(f"time ran out before CP-SAT on {len(todo)} layer(s) above tolerance")
        return
    cpsat = _cpsat(s.deterministic, s.deadline, s.events, f"CP-SAT on {len(todo)} layer(s) above tolerance")
    if cpsat is None:
        return
    if s.N > 1 and s.num_groups == s.N and _complete_size(s.E // s.N, s.R // s.N, s.P) <= COMPLETE_LIMIT:
        _phase5_heaviest_node_models(s, todo, cpsat)
        todo = s.open_layers()
        if not todo or s.out_of_time():
            return
    _phase6_fixed_count_models(s, todo, cpsat)
    todo = s.open_layers()
    if not todo or s.out_of_time():
        return
    _phase7_neighbourhoods(s, todo, cpsat)


def _phase1_complete_models(s: _Refinement, open_layers: np.ndarray) -> bool:
    """Phase 1: complete models where the whole problem is small; returns whether it ran
    (the refinement then ends).  Where OR-Tools cannot be loaded in time it does not."""
    what = f"complete models on {open_layers.size} layer(s)"
    if s.N == 1 and _complete_size(s.E, s.R, s.G) <= COMPLETE_LIMIT:
        cpsat = _cpsat(s.deterministic, s.deadline, s.events, what)
        if cpsat is None:
            return False
        _complete_layers(s, open_layers, cpsat)
        return True
    if s.N > 1 and _hier_complete_ok(s.E, s.R, s.G, s.N, s.num_groups) and _cpsat(
            s.deterministic, s.deadline, s.events, what):
        if not s.deterministic:
            # Wall clock: the pair re-splits first (a fraction of a second; the complete
            # models' CP-SAT search finds near-perfect partitions slowly, 0.2% above the
            # bound where the re-splits and neighbourhoods reach 0.01%), then the models
            # with HIER_COMPLETE_SHARE of the time, warm-started from that plan.
            _phase3_pair_resplits(s, open_layers)
            open_layers = np.sort(np.asarray(s.open_layers(), dtype=np.int64))
            end = time.perf_counter() + HIER_COMPLETE_SHARE * max(0.0, s.deadline - time.perf_counter())
        else:
            end = s.deadline
        _complete_hierarchical(s, open_layers, end)
        s.lower_bound = np.fmax(s.lower_bound, np.nan_to_num(s.proven, nan=0.0))
        return True
    return False


def _complete_layers(s: _Refinement, open_layers: np.ndarray, cpsat: Any) -> None:
    """Phase 1, global policy: one complete model (counts and placement) per layer."""
    share = max(0.0, s.deadline - time.perf_counter()) / max(open_layers.size, 1)
    loads = s.loads()
    for l in open_layers:
        if s.out_of_time():
            s.events.append(f"layer {s.ids[l]}: time ran out before the complete model")
            continue
        s.attempted[l] = True
        cnt = np.bincount(s.p[l], minlength=s.E)
        try:
            res = cpsat.solve_complete(
                s.w[l], s.R, s.G, time_limit=s.layer_budget if s.deterministic else max(share, 0.01),
                hint=(cnt, s.p[l].reshape(s.G, s.k)), seed=s.seed, workers=s.workers,
                deterministic=s.deterministic, allow_duplicates=s.allow_duplicates,
            )
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
            _failed(s.events, f"layer {s.ids[l]}: complete CP-SAT model", exc)
            continue
        if res.bound is not None:
            s.proven[l] = res.bound
        if res.placement is not None and res.objective < loads[l].max() * (1 - 1e-12):
            s.p[l] = res.placement.ravel()
        if not res.optimal:
            s.events.append(f"layer {s.ids[l]}: complete model timed out (kept the best plan found)")


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


@dataclass
class _Contents:
    """Phase 1, hierarchical policy: the node contents (sets of ``m`` groups) of a layer
    and the assignments of groups to nodes, as indices into them.

    Attributes:
        members: per content, ``[m * group_size]`` its expert ids (ascending).
        index: content (a sorted tuple of group ids) -> its index.
        blocks: ``[assignments, N]`` the contents of each group-to-node assignment.
    """

    members: list[np.ndarray]
    index: dict[tuple[int, ...], int]
    blocks: np.ndarray

    @classmethod
    def of(cls, E: int, N: int, num_groups: int) -> "_Contents":
        from itertools import combinations

        from .heuristics import equal_partitions

        gs, m = E // num_groups, num_groups // N
        contents = list(combinations(range(num_groups), m))
        index = {c: i for i, c in enumerate(contents)}
        blocks = np.array([[index[tuple(np.flatnonzero(row == b).tolist())] for b in range(N)]
                           for row in equal_partitions(num_groups, N)])
        members = [np.concatenate([np.arange(g * gs, (g + 1) * gs) for g in c]) for c in contents]
        return cls(members, index, blocks)


def _complete_hierarchical(s: _Refinement, layers: np.ndarray, end: float) -> None:
    """Phase 1, hierarchical policy: every node content solved completely, the best
    group-to-node assignment read off by enumeration.  The min over assignments of the
    max of their contents' proven bounds is certified with counts and group placement
    free.  Per layer, a first pass gives every content a short solve (warm-started
    from the plan where the plan has that content on a node); the rest of the layer's
    time goes, one doubled solve at a time, to the content that decides the layer
    (:class:`_LayerContents`).

    Wall clock: the layers go largest gap first, each with a share of the time left
    (until ``end``) in proportion to its gap, since a layer the pair re-splits left
    far above its bound is one whose group placement or heavy experts need these
    models, while one left near its bound gets the later phases' searches."""
    from . import cpsat

    contents = _Contents.of(s.E, s.N, s.num_groups)
    s.p = s.p.copy()
    weight = np.ones(len(layers))
    if not s.deterministic:
        gaps = certified_gap(s.lower_bound[layers], s.loads()[layers].max(axis=1))
        order = np.argsort(-gaps, kind="stable")
        layers, weight = np.asarray(layers)[order], np.maximum(gaps[order], 1e-12)
    for i, l in enumerate(layers):
        s.attempted[l] = True
        share = weight[i] / weight[i:].sum()
        layer_end = time.perf_counter() + max(0.0, end - time.perf_counter()) * share
        search = _LayerContents(s, int(l), contents, cpsat, layer_end)
        search.run()
        if search.solved.all():
            s.proven[l] = float(search.bnd[contents.blocks].max(axis=1).min())
        if not search.complete():
            s.events.append(f"layer {s.ids[l]}: complete models timed out (kept the best plan found)")
        best = int(np.argmin(search.obj[contents.blocks].max(axis=1)))
        best_obj = float(search.obj[contents.blocks[best]].max())
        cur = gpu_loads(s.w[l : l + 1], s.p[l : l + 1], s.G).max()
        if np.isfinite(best_obj) and best_obj < cur * (1 - 1e-12):
            s.p[l] = np.concatenate([search.place[b].ravel() for b in contents.blocks[best]])


class _LayerContents:
    """The complete models of one layer's node contents (phase 1, hierarchical).

    Per content ``c``: ``obj[c]`` the best placement's max GPU load (inf: none yet),
    ``bnd[c]`` its proven bound, ``solved``/``optimal`` flags, ``limit[c]`` the last time
    limit, ``place[c]`` ``[G/N, k]`` expert ids of the best placement and ``hints[c]``
    the warm start ``(counts, local placement)``."""

    def __init__(self, s: _Refinement, l: int, contents: _Contents, cpsat: Any, layer_end: float) -> None:
        self.s, self.l, self.c, self.cpsat, self.layer_end = s, l, contents, cpsat, layer_end
        nc = len(contents.members)
        self.obj, self.bnd, self.limit = np.full(nc, np.inf), np.zeros(nc), np.zeros(nc)
        self.solved, self.optimal = np.zeros(nc, dtype=bool), np.zeros(nc, dtype=bool)
        self.place: list[np.ndarray | None] = [None] * nc
        self.spent = 0.0  # deterministic units handed out
        gs = s.E // s.num_groups
        m = s.num_groups // s.N
        # The plan's own node contents, as hints.
        self.hints: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for node in s.p[l].reshape(s.N, s.R // s.N):
            groups = tuple(np.unique(node // gs).tolist())
            if groups in contents.index:
                ci = contents.index[groups]
                local = np.searchsorted(contents.members[ci], node)
                self.hints[ci] = (np.bincount(local, minlength=m * gs), local.reshape(s.P, s.k))

    def left(self) -> float:
        s = self.s
        return (s.layer_budget - self.spent) if s.deterministic else self.layer_end - time.perf_counter()

    def solve(self, ci: int, t: float) -> bool:
        """One complete model of content ``ci`` with time limit ``t``; False if it failed."""
        s, l = self.s, self.l
        self.spent += t
        self.limit[ci] = t
        members = self.c.members[ci]
        try:
            res = self.cpsat.solve_complete(
                s.w[l, members], s.R // s.N, s.P, time_limit=max(t, 0.01), hint=self.hints.get(ci),
                seed=s.seed, workers=s.workers, deterministic=s.deterministic, allow_duplicates=s.allow_duplicates,
            )
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
            _failed(s.events, f"layer {s.ids[l]}: complete CP-SAT model", exc)
            return False
        self.solved[ci] = True
        if res.bound is not None:
            self.bnd[ci] = max(self.bnd[ci], res.bound)
        if res.placement is not None and res.objective < self.obj[ci]:
            self.obj[ci] = res.objective
            self.place[ci] = members[res.placement]
            self.hints[ci] = (res.counts, res.placement)
        self.optimal[ci] |= res.optimal
        return True

    def run(self) -> None:
        """A short first pass over every content, then doubled solves on the content
        that decides the layer until the gap is within tolerance or time is spent."""
        s, nc = self.s, len(self.c.members)
        first = FIRST_SHARE * self.left() / nc
        for ci in range(nc):
            if not s.deterministic and time.perf_counter() >= self.layer_end:
                break
            if not self.solve(ci, first if s.deterministic else max(first, FIRST_SHARE * self.left() / (nc - ci))):
                return
        while self.solved.all():
            ci = self._deciding()
            if ci is None:
                return
            t = min(2 * self.limit[ci], self.left())
            gs, m = s.E // s.num_groups, s.num_groups // s.N
            floor = 0.01 if s.deterministic else MIN_SOLVE + BUILD_SECONDS_PER_VAR * _complete_size(
                m * gs, s.R // s.N, s.P)
            if t < floor or not self.solve(ci, t):
                return

    def _deciding(self) -> int | None:
        """The unproven content that can move the layer's bound (largest load in the
        assignment with the lowest bound) or its plan (the best assignment's heaviest);
        None when the layer is within tolerance or no content can."""
        blocks, obj, bnd, optimal = self.c.blocks, self.obj, self.bnd, self.optimal
        lbs, ubs = bnd[blocks].max(axis=1), obj[blocks].max(axis=1)
        lo, hi = int(np.argmin(lbs)), int(np.argmin(ubs))
        if not np.isfinite(ubs[hi]) or ubs[hi] <= 0 or 1 - lbs[lo] / ubs[hi] <= self.s.tol:
            return None
        cands = [c for c in blocks[lo] if not optimal[c] and obj[c] > lbs[lo]]
        cands += [c for c in blocks[hi] if not optimal[c] and obj[c] >= ubs[hi]]
        if not cands:
            return None
        return max(cands, key=lambda c: (obj[c] - bnd[c], -c))

    def complete(self) -> bool:
        """Every content solved and some assignment's contents all proven optimal."""
        return self.solved.all() and bool(self.optimal[self.c.blocks].all(axis=1).any())


def _groups_exact(num_groups: int, num_nodes: int) -> bool:
    """Whether the heuristic group step is already exact (as heuristics.grouping)."""
    from .heuristics import ENUMERATION_LIMIT, num_partitions

    m = num_groups // num_nodes
    return num_nodes == 1 or m <= 2 or num_partitions(num_groups, num_nodes) <= ENUMERATION_LIMIT


def _phase2_groups_by_cpsat(s: _Refinement, open_layers: np.ndarray) -> np.ndarray:
    """Phase 2 (hierarchical, groups too many to enumerate): groups to nodes exactly by
    CP-SAT; a layer whose heaviest node gets lighter is re-planned.  A proven optimum of
    the heaviest node, over its GPUs, bounds every plan (certified).  Returns the layers
    still above tolerance (ascending)."""
    if s.N == 1 or _groups_exact(s.num_groups, s.N) or s.out_of_time():
        return open_layers
    cpsat = _cpsat(s.deterministic, s.deadline, s.events, "CP-SAT group placement")
    if cpsat is None:
        return open_layers
    s.p = s.p.copy()
    share_end = time.perf_counter() + 0.2 * max(0.0, s.deadline - time.perf_counter())
    improved = 0
    for i, l in enumerate(open_layers):
        if not s.deterministic and time.perf_counter() >= share_end:
            s.events.append("group placement: time share ran out before every layer was solved")
            break
        limit = units.model_time(s.layer_budget, 10) if s.deterministic else max(
            0.01, (share_end - time.perf_counter()) / (len(open_layers) - i))
        improved += _group_layer(s, int(l), limit, cpsat)
    if improved:
        s.events.append(f"group placement improved by CP-SAT on {improved} layer(s)")
    return np.flatnonzero(certified_gap(s.lower_bound, s.loads().max(axis=1)) > s.tol)


def _group_layer(s: _Refinement, l: int, limit: float, cpsat: Any) -> bool:
    """Phase 2 on layer ``l``: solve its group placement; True if the layer was re-planned."""
    from .heuristics import place

    R, N, G = s.R, s.N, s.G
    gs = s.E // s.num_groups
    gl = s.w[l].reshape(s.num_groups, gs).sum(axis=1)
    hint = np.empty(s.num_groups, dtype=np.int64)
    for n in range(N):
        for g in np.unique(s.p[l].reshape(N, R // N)[n] // gs):
            hint[g] = n
    try:
        node, bound, optimal = cpsat.solve_groups(gl, N, hint, limit, seed=s.seed, deterministic=s.deterministic)
    except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
        _failed(s.events, f"layer {s.ids[l]}: CP-SAT group placement", exc)
        return False
    if bound is not None and optimal:
        s.proven[l] = np.fmax(s.proven[l], bound / s.P * (1 - 1e-12))
    if node is None:
        return False
    cur_node = np.array([gl[hint == n].sum() for n in range(N)]).max()
    new_node = np.array([gl[node == n].sum() for n in range(N)]).max()
    if new_node < cur_node * (1 - 1e-12):
        alt = place(s.w[l : l + 1], R, s.num_groups, N, G, node_of_group=node[None, :],
                    allow_duplicates=s.allow_duplicates).phy2log[0]
        if gpu_loads(s.w[l : l + 1], alt[None], G).max() < gpu_loads(s.w[l : l + 1], s.p[l : l + 1], G).max():
            s.p[l] = alt
            return True
    return False


def _phase3_pair_resplits(s: _Refinement, open_layers: np.ndarray) -> None:
    """Phase 3: exact pair re-splits of every open layer's nodes at once
    (:func:`heuristics.resplit.resplit_rounds`); deterministic: ``5 + 5 * budget`` rounds."""
    L, N, P, k = s.L, s.N, s.P, s.k
    rows = L * N
    slots = s.p.reshape(rows, P * k)
    _, per = s.per_replica()
    row_layer = np.repeat(np.arange(L), N)
    values = per[row_layer[:, None], slots]
    layout = np.broadcast_to(np.arange(P * k).reshape(1, P, k), (rows, P, k))
    open_rows = np.flatnonzero(np.isin(row_layer, open_layers))
    s.attempted[open_layers] = True
    if P < 2 or s.out_of_time():
        return
    lay, _ = resplit_rounds(
        values[open_rows], slots[open_rows], layout[open_rows],
        target=np.repeat(s.lower_bound, N)[open_rows],
        max_rounds=units.resplit_rounds(s.budget) if s.deterministic else 10_000,
        segment_size=N, partners=P - 1,
        deadline=None if s.deterministic else s.deadline,
    )
    slots = slots.copy()
    slots[open_rows] = np.take_along_axis(slots[open_rows], lay.reshape(open_rows.size, -1), axis=1)
    s.p = slots.reshape(L, s.R)


def _phase3b_node_covers(s: _Refinement, share: float, changed_since: np.ndarray | None = None) -> None:
    """Phase 3b (hierarchical, wall clock): the node that sets each open layer's maximum
    re-partitioned whole at a target (:func:`heuristics.nodecover.search_node`: exact
    covers by ``k``-sets in the window the target leaves, over the plan's replica counts
    and count vectors near them), node after node while that lowers the layer's
    heaviest GPU.  The layers share ``share`` of the time left (at most
    ``NODE_COVER_LAYER_SHARE`` of the budget each), ``workers`` at a time, largest gap first.  An
    interrupt stops the running searches (``s.stop``) within one cover.  With
    ``changed_since`` (a plan), only the layers whose rows differ from it (the search
    is deterministic: run again on the same node it would repeat itself)."""
    if s.N == 1 or s.P < 2 or s.deterministic or s.out_of_time() or s.budget < NODE_COVER_MIN_BUDGET:
        return
    todo = s.open_layers()
    if changed_since is not None:
        todo = [l for l in todo if not np.array_equal(s.p[l], changed_since[l])]
    if not todo:
        return
    end = time.perf_counter() + share * max(0.0, s.deadline - time.perf_counter())
    s.p = s.p.copy()
    left = [len(todo)]
    lock = threading.Lock()

    def work(l: int) -> tuple[int, np.ndarray, bool]:
        with lock:
            ahead = left[0]
            left[0] -= 1
        now = time.perf_counter()
        cap = NODE_COVER_LAYER_SHARE * s.budget
        layer_end = now + min(cap, max(0.0, end - now) * min(1.0, s.workers / max(ahead, 1)))
        try:
            return l, *_cover_layer(s, l, layer_end)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a failure keeps the layer's plan
            _failed(s.events, f"layer {s.ids[l]}: node cover search", exc)
            return l, s.p[l].copy(), False

    improved = 0
    pool = ThreadPoolExecutor(max_workers=s.workers)
    try:
        for l, row, better in pool.map(work, todo):
            s.p[l] = row
            improved += better
    except BaseException:
        s.stop.set()                    # an interrupt: running searches stop at once
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if improved:
        s.events.append(f"whole-node covers improved {improved} layer(s)")


def _cover_layer(s: _Refinement, l: int, layer_end: float) -> tuple[np.ndarray, bool]:
    """Phase 3b on layer ``l`` until ``layer_end``: returns ``([R] its plan, improved)``."""
    row = s.p[l].copy()
    rn, aim = s.R // s.N, s.lower_bound[l] * (1 + s.tol)
    improved = False
    stop_at = min(layer_end, s.deadline - NODE_COVER_RESERVE)
    while not s.stop.is_set() and time.perf_counter() < stop_at:
        cnt = np.bincount(row, minlength=s.E)
        nodes = row.reshape(s.N, rn)
        node_loads = (s.w[l] / np.maximum(cnt, 1))[nodes].reshape(s.N, s.P, s.k).sum(axis=2)
        n = int(node_loads.max(axis=1).argmax())
        current = node_loads[n].max()
        ex = np.unique(nodes[n])
        if current <= aim or int(cnt[ex].sum()) != rn:
            break
        got_cnt, place, top = search_node(s.w[l, ex], cnt[ex], s.P, s.k, aim=aim, upper=current,
                                          deadline=stop_at, stop=s.stop)
        if place is None:
            break
        new_loads = (s.w[l, ex] / got_cnt)[place].sum(axis=1)
        if new_loads.max() >= current * (1 - 1e-12):
            break
        row[n * rn : (n + 1) * rn] = ex[place].ravel()
        improved = True
    return row, improved


def _phase4_count_moves(s: _Refinement) -> None:
    """Phase 4: replica-count moves where the counts' granularity is what blocks the
    layer (one replica moved from one expert to another, re-packed and re-split; the
    best of all such moves is kept while it lowers the layer's heaviest GPU).  It gets
    ``COUNT_SHARE`` of the time left (deterministic: ``COUNT_SHARE_UNITS`` of the layer's
    units), shared by the open layers, largest gap first."""
    todo = s.open_layers()
    if not todo or s.out_of_time():
        return
    phase_end = time.perf_counter() + COUNT_SHARE * max(0.0, s.deadline - time.perf_counter())
    moved = _count_moves(
        s, todo, deadline=phase_end, max_steps=1000,
        work=units.count_move_items(s.layer_budget, COUNT_SHARE_UNITS) if s.deterministic else None,
    )
    if moved:
        s.events.append(f"replica counts revisited on {moved} layer(s)")


def _count_moves(s: _Refinement, layers: list[int], *, deadline: float, max_steps: int,
                 work: float | None = None) -> int:
    """Phase 4's search: improve stuck layers by moving replicas between experts of the
    node that sets the layer's maximum; returns the number of layers changed.

    Deterministic budget: ``work`` candidate-items per layer (never shared, so a layer's
    result does not depend on the others); every layer gets at least one step."""
    s.p = s.p.copy()
    changed = 0
    # Wall clock: each layer's share of the time left is in proportion to its gap, so a
    # layer far from its bound (a 5 % heuristic gap among layers at 0.1-0.3 %) gets the
    # candidates it needs; an equal share left one such decode layer at its heuristic
    # plan in the quiet gap rerun, though alone it reached 0.056 % in seconds.
    gaps = certified_gap(s.lower_bound[layers], s.loads()[layers].max(axis=1))
    for i, l in enumerate(layers):
        improved_layer = False
        allowance = work
        share = gaps[i] / gaps[i:].sum() if gaps[i:].sum() > 0 else 1.0 / (len(layers) - i)
        layer_end = time.perf_counter() + max(0.0, deadline - time.perf_counter()) * share
        last = 0.0
        rate = SECONDS_PER_CANDIDATE_ITEM          # raised to the measured rate after a step
        for _ in range(max_steps):
            # Do not start a step the previous one says would end after the deadline.
            if not s.deterministic and time.perf_counter() + last >= min(layer_end + last / 2, deadline):
                break
            if allowance is not None and allowance <= 0:
                break
            t_step = time.perf_counter()
            step = _count_step(s, l, allowance, rate, min(layer_end, deadline), layer_end)
            if step is None:
                break
            tried, better = step
            if allowance is not None:
                allowance -= tried * (s.R // s.N)
            last = time.perf_counter() - t_step
            rate = max(rate, last / (tried * (s.R // s.N)))
            if not better:
                break
            improved_layer = True
            last = time.perf_counter() - t_step
        changed += improved_layer
    return changed


def _count_candidates(s: _Refinement, wr: np.ndarray, cr: np.ndarray, singles: int = 4) -> np.ndarray:
    """``[n, experts]`` count vectors for a node's experts (loads ``wr``, counts ``cr``):
    one replica moved from an expert with several to another (or to one of the
    ``singles`` heaviest single-replica experts), and the bigger jumps of :func:`_jumps`."""
    multi = np.flatnonzero(cr >= 2)
    rn = s.R // s.N
    cap = s.P if not s.allow_duplicates else max(s.P, -(-rn // wr.size))
    heavy_single = np.flatnonzero(cr == 1)
    heavy_single = heavy_single[np.argsort(-wr[heavy_single])[:singles]]
    recv = np.concatenate([multi, heavy_single])
    d, r = np.meshgrid(multi, recv, indexing="ij")
    keep = (d != r) & (cr[r] < cap)
    d, r = d[keep], r[keep]
    cand = np.repeat(cr[None, :], d.size, axis=0)
    cand[np.arange(d.size), d] -= 1
    cand[np.arange(d.size), r] += 1
    # Bigger moves: an expert with several replicas gives t of them (t = 2..4) to the
    # experts the greedy rule would pick, or takes t from those it would give up first;
    # a count's granularity can need a jump to clear a layer.
    return np.concatenate([cand, _jumps(wr, cr, multi, cap, max_jump=4)], axis=0)


def _count_step(s: _Refinement, l: int, allowance: float | None, rate: float, room_end: float,
                layer_end: float) -> tuple[int, bool] | None:
    """One step of :func:`_count_moves` on layer ``l``: every candidate count vector of
    the heaviest node that the allowance (deterministic) or the time left pays for,
    re-packed and re-split; the best replaces the node if it lowers its heaviest GPU.
    Returns ``(candidates tried, improved)``, or None when no step can be taken."""
    N, P, k, rn = s.N, s.P, s.k, s.R // s.N
    nodes = s.p[l].reshape(N, rn)
    cnt = np.bincount(s.p[l], minlength=s.E)
    node_loads = (s.w[l] / np.maximum(cnt, 1))[nodes].reshape(N, P, k).sum(axis=2)
    n = int(node_loads.max(axis=1).argmax())
    current = node_loads[n].max()
    if current <= s.lower_bound[l] * (1 + s.tol):
        return None
    ex = np.unique(nodes[n])                 # a node's own experts (every one has a replica there)
    wr, cr = s.w[l, ex], cnt[ex]
    if not (cr >= 2).any():
        return None
    cand = _count_candidates(s, wr, cr)
    if cand.shape[0] == 0:
        return None
    # Only as many candidates as the work allowance (deterministic) or the time left
    # (wall clock, at the larger of the calibrated and the measured rate) pays for,
    # those whose heaviest replica is lightest first.  Half the room: sized to the whole
    # room at the calibrated rate, a step overran the deadline by 0.1-0.3 s on a loaded
    # machine (issue 12's deadline study).  Wall clock: stop when not even one fits.
    if allowance is not None:
        fit = max(1, int(allowance // rn))
    else:
        fit = int(0.5 * (room_end - time.perf_counter()) / (rate * rn))
        if fit < 1:
            return None
    if cand.shape[0] > fit:
        heaviest = (wr[None, :] / cand).max(axis=1)
        cand = cand[np.argsort(heaviest, kind="stable")[:fit]]
    flat, tops = _pack_candidates(s, wr, cand, s.lower_bound[l], layer_end)
    best = int(tops.argmin())
    if tops[best] >= current * (1 - 1e-12):
        return cand.shape[0], False
    s.p[l, n * rn : (n + 1) * rn] = ex[flat[best]]
    return cand.shape[0], True


def _pack_candidates(s: _Refinement, wr: np.ndarray, cand: np.ndarray, target: float,
                     layer_end: float) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate count vector ``[n, experts]`` packed onto the node's ``P`` GPUs and
    re-split: ``([n, P*k] expert indices into wr, [n] heaviest GPU)``."""
    P, k = s.P, s.k
    n = cand.shape[0]
    wrow = np.repeat(wr[None, :], n, axis=0)
    lb_row = np.full(n, target)
    local = pack_rows(wrow, cand, P, refine_rounds=8, allow_duplicates=s.allow_duplicates, target=lb_row)
    vals = (wrow / cand)[np.arange(n)[:, None, None], local]
    lay, _ = resplit_rounds(
        vals.reshape(n, -1), local.reshape(n, -1),
        np.broadcast_to(np.arange(P * k).reshape(1, P, k), (n, P, k)),
        target=lb_row, max_rounds=20 if s.deterministic else 60, partners=min(P - 1, 8),
        deadline=None if s.deterministic else layer_end,
    )
    flat = np.take_along_axis(local.reshape(n, -1), lay.reshape(n, -1), axis=1)
    tops = (wrow / cand)[np.arange(n)[:, None], flat].reshape(n, P, k).sum(axis=2).max(axis=1)
    return flat, tops


def _jumps(w: np.ndarray, c: np.ndarray, multi: np.ndarray, cap: int, max_jump: int) -> np.ndarray:
    """Count vectors where one expert of ``multi`` gives away (or takes) ``t`` replicas,
    ``t = 2..max_jump``, the others following the heuristic's replica-count rule
    (:func:`heuristics.apportion.add_replicas` / ``remove_replicas``); ``[n, len(w)]``."""
    from .heuristics.apportion import add_replicas, remove_replicas

    out = []
    for e in multi:
        others = np.arange(len(w)) == e                        # e itself takes no part
        for t in range(2, max_jump + 1):
            if c[e] - t >= 1:                                  # give t away
                nc = c.copy()
                nc[e] -= t
                nc = add_replicas(w[None], nc[None], t, cap, frozen=others[None])[0]
                if nc.sum() == c.sum():
                    out.append(nc)
            if c[e] + t <= cap:                                # take t
                nc = c.copy()
                nc[e] += t
                nc = remove_replicas(w[None], nc[None], t, frozen=others[None])[0]
                if nc.sum() == c.sum():
                    out.append(nc)
    return np.array(out, dtype=np.int64).reshape(-1, len(w))


def _heaviest_node(s: _Refinement, l: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Layer ``l``'s node that sets its maximum: ``(node, [P, k] GPU loads of every
    node's GPUs as [N, P], its expert ids ex, [P, k] its slots as indices into ex,
    [E] replica counts)``."""
    cnt = np.bincount(s.p[l], minlength=s.E)
    nodes = s.p[l].reshape(s.N, s.R // s.N)
    node_loads = (s.w[l] / np.maximum(cnt, 1))[nodes].reshape(s.N, s.P, s.k).sum(axis=2)
    n = int(node_loads.max(axis=1).argmax())
    ex = np.unique(nodes[n])
    local = np.searchsorted(ex, nodes[n]).reshape(s.P, s.k)
    return n, node_loads, ex, local, cnt


def _phase5_heaviest_node_models(s: _Refinement, layers: list[int], cpsat: Any) -> None:
    """Phase 5 (hierarchical, one group per node): for each layer, largest gap first, the
    complete model (replica counts free) of the node that sets the layer's maximum.  Its
    proven bound holds for the layer (that group sits alone on some node in every plan)
    and joins ``proven``; the later phases stop at it.  A better node placement replaces
    the node's."""
    deadline = time.perf_counter() + NODE_SHARE * max(0.0, s.deadline - time.perf_counter())
    rn = s.R // s.N
    s.p = s.p.copy()
    improved = 0
    for i, l in enumerate(layers):
        if not s.deterministic and time.perf_counter() >= deadline:
            s.events.append(f"complete node models: time share ran out after {i} of {len(layers)} layer(s)")
            break
        n, node_loads, ex, local, cnt = _heaviest_node(s, l)
        share = max(0.0, deadline - time.perf_counter()) / (len(layers) - i)
        if not s.deterministic and share < BUILD_SECONDS_PER_VAR * _complete_size(ex.size, rn, s.P) + MIN_SOLVE:
            s.events.append(f"complete node models: time share too short after {i} of {len(layers)} layer(s)")
            break
        try:
            res = cpsat.solve_complete(
                s.w[l, ex], rn, s.P,
                time_limit=units.model_time(s.layer_budget, 4) if s.deterministic else max(share, 0.01),
                hint=(cnt[ex], local), seed=s.seed, workers=s.workers, deterministic=s.deterministic,
                allow_duplicates=s.allow_duplicates,
            )
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
            _failed(s.events, f"layer {s.ids[l]} node {n}: complete CP-SAT model", exc)
            continue
        if res.bound is not None:
            s.proven[l] = np.fmax(s.proven[l], res.bound)
        if res.placement is not None and res.objective < node_loads[n].max() * (1 - 1e-12):
            s.p[l, n * rn : (n + 1) * rn] = ex[res.placement].ravel()
            improved += 1
    if improved:
        s.events.append(f"complete node models improved {improved} layer(s)")
    s.lower_bound = np.fmax(s.lower_bound, np.nan_to_num(s.proven, nan=0.0))


def _phase6_fixed_count_models(s: _Refinement, layers: list[int], cpsat: Any) -> None:
    """Phase 6: the heaviest node's whole placement for its replica counts (the
    ``n[e, g]`` model, warm-started), where it is small enough to build quickly, within
    ``FIXED_SHARE`` of the time left; its bound is conditional on the counts."""
    size = _fixed_size(s.E // s.N, s.P)
    if size > FIXED_LIMIT:
        return
    phase_end = time.perf_counter() + FIXED_SHARE * max(0.0, s.deadline - time.perf_counter())
    rn = s.R // s.N
    for i, l in enumerate(layers):
        if not s.deterministic and time.perf_counter() >= phase_end:
            return
        share = max(0.0, phase_end - time.perf_counter()) / (len(layers) - i)
        if not s.deterministic and share < BUILD_SECONDS_PER_VAR * size + MIN_SOLVE:
            return                                  # building the model alone would overrun
        n, node_loads, ex, local, cnt = _heaviest_node(s, l)
        try:
            res = cpsat.solve_fixed_counts(
                s.w[l, ex], cnt[ex], s.P, local, s.lower_bound[l],
                time_limit=units.model_time(s.layer_budget, 4) if s.deterministic else share,
                relative_gap=s.tol, seed=s.seed, workers=s.workers, deterministic=s.deterministic,
                allow_duplicates=s.allow_duplicates,
            )
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
            _failed(s.events, f"layer {s.ids[l]} node {n}: CP-SAT (fixed counts)", exc)
            continue
        if res.bound is not None:
            s.conditional[l] = max(res.bound, s.lower_bound[l])
        if res.placement is not None:
            new_loads = (s.w[l, ex] / cnt[ex])[res.placement].sum(axis=1)
            if new_loads.max() < node_loads[n].max() * (1 - 1e-12):
                s.p[l, n * rn : (n + 1) * rn] = ex[res.placement].ravel()


def _phase7_neighbourhoods(s: _Refinement, layers: list[int], cpsat: Any) -> None:
    """Phase 7: CP-SAT large-neighbourhood search, one layer per worker thread, largest
    gap first (:func:`_neighbourhood_search`); deterministic: ``max(2, 10 * layer
    budget)`` neighbourhoods per layer."""
    cnt, per = s.per_replica()
    iters = units.neighbourhoods(s.layer_budget) if s.deterministic else None

    def work(l: int) -> tuple[int, np.ndarray, list[str]]:
        # A crash in one layer's search (even a worker thread told to exit) keeps that
        # layer's plan and loses no other work; only an interrupt goes through.
        try:
            with logging_statuses(s.log):
                return l, *_neighbourhood_search(s, l, cpsat, cnt[l], per[l], iters)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            msg = f"layer {s.ids[l]}: CP-SAT search worker died ({type(exc).__name__}: {exc}); kept the plan"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return l, s.p[l].copy(), [msg]

    timed_out: list[int] = []
    pool = ThreadPoolExecutor(max_workers=s.workers)
    try:
        for l, new_row, notes in pool.map(work, layers):
            s.p[l] = new_row
            for note in notes:
                if note.endswith(_TIMED_OUT):
                    timed_out.append(int(s.ids[l]))
                else:
                    s.events.append(note)
    finally:
        # On an interrupt, running searches stop after their current neighbourhood
        # (at most NEIGHBOURHOOD_TIME) and queued layers never start.
        s.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    if timed_out:
        shown = ", ".join(str(x) for x in sorted(timed_out)[:12]) + (", ..." if len(timed_out) > 12 else "")
        s.events.append(f"CP-SAT search timed out on {len(timed_out)} layer(s) (kept the best plan found): "
                        f"layers {shown}")


def _neighbourhood_search(s: _Refinement, l: int, cpsat: Any, cnt: np.ndarray, per: np.ndarray,
                          iters: int | None) -> tuple[np.ndarray, list[str]]:
    """Layer ``l``'s neighbourhood search: the heaviest GPU of the heaviest node and a
    few others (the lightest, then random; more after failures) re-placed exactly while
    that lowers their maximum.  Returns ``([R] the layer's plan, notes)``."""
    N, P, k = s.N, s.P, s.k
    notes: list[str] = []
    rng = np.random.default_rng([s.seed, int(s.ids[l])])
    sl = s.p[l].reshape(N, P, k).copy()
    v = per[sl]                                              # [N, P, k]
    fails = it = 0
    while not s.stop.is_set():
        if s.deterministic:
            if it >= iters:
                break
        elif s.deadline - time.perf_counter() < MIN_SOLVE + NEIGHBOURHOOD_RESERVE:
            notes.append(f"layer {s.ids[l]}: {_TIMED_OUT}")
            break
        it += 1
        node_loads = v.sum(axis=2)
        n = int(np.unravel_index(node_loads.argmax(), node_loads.shape)[0])
        if node_loads[n].max() <= s.lower_bound[l] * (1 + s.tol):
            break
        gpus = _neighbourhood(node_loads[n], P, fails, rng)
        items_e = sl[n, gpus]                                # [m, k] expert ids
        sc = cpsat.scale_loads(s.w[l][items_e], cnt[items_e], k)
        try:
            limit = NEIGHBOURHOOD_TIME if s.deterministic else min(
                NEIGHBOURHOOD_TIME, s.deadline - NEIGHBOURHOOD_RESERVE - time.perf_counter())
            new = cpsat.solve_neighbourhood(sc.ints, items_e, int(sc.ints.sum(axis=1).max()), limit,
                                            seed=s.seed + it, deterministic=s.deterministic)
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the plan
            notes.append(f"layer {s.ids[l]} node {n}: CP-SAT failed ({type(exc).__name__}: {exc}); kept the plan")
            break
        if new is None:
            fails += 1
            if fails >= 24:
                break
            continue
        flat_e = items_e.ravel()[new]                        # [m, k]
        new_loads = (s.w[l][flat_e] / cnt[flat_e]).sum(axis=1)
        if new_loads.max() < node_loads[n, gpus].max() * (1 - 1e-12):
            sl[n, gpus] = flat_e
            v[n, gpus] = s.w[l][flat_e] / cnt[flat_e]
            fails = 0
        else:
            fails += 1
    return sl.reshape(s.R), notes


def _neighbourhood(gpu_loads: np.ndarray, P: int, fails: int, rng: np.random.Generator) -> list[int]:
    """GPUs of a node to re-place together: the heaviest, the lightest few, and random
    others; ``3 + min(fails // 4, 3)`` of them (capped at ``P``), growing after failures."""
    m = min(P, 3 + min(fails // 4, 3))
    h = int(gpu_loads.argmax())
    order = np.argsort(gpu_loads)
    others = [g for g in order[: max(1, (m - 1) // 2)] if g != h]
    rest = [g for g in range(P) if g != h and g not in others]
    others += list(rng.choice(rest, size=min(m - 1 - len(others), len(rest)), replace=False))
    return [h] + [int(g) for g in others]


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
