"""Migration-aware replanning: a plan within a balance budget that moves the fewest
expert weights from the placement deployed now.

A *move* is a replica on a GPU that did not hold that expert before (per layer; a
further replica of an expert the GPU already held is a copy within the GPU, not a
move).  Its weight is copied from a GPU that holds the expert in the old placement: from
the same node when one does (cost 1), else across nodes (cost ``node_move_cost``).

Given the best plan found without the old placement (per-layer max load ``B``), every
layer gets the cap ``T = B * (1 + max_balance_loss)``, and the plan chosen per layer is
the cheaper of

* **repair**: start from the old placement (no move at all) and, while a GPU is above
  ``T``, apply one operation on the heaviest: swap two replicas between GPUs, or give a
  slot of an expert with several replicas to another expert (its count changes).  It
  takes the operation that removes the most excess at no move cost where one does
  (operations that undo earlier moves cost nothing or less), else the cheapest that
  removes the GPU's whole excess, else the most excess removed per unit of move cost.
  Under the hierarchical policy experts stay in the old plan's nodes.  Then moves that
  are no longer needed are undone where every GPU stays under ``T``;
* **relabelled replan** (the fair baseline): the fresh plan with its nodes and GPUs
  matched to the old ones (:func:`eplb_opt.align.align_to_previous`).

Exact mode then runs a CP-SAT model per node (per layer for the global policy where
small enough): integer replica counts per (expert, GPU), each expert's total chosen
from a small menu around the repair's counts, every GPU under ``T``, minimising the move
cost, warm-started from the heuristic answer; it keeps a solution only when it is
cheaper.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .heuristics import place
from .heuristics.apportion import unit_scale
from .heuristics.local import gpu_counts as _gpu_counts, group_nodes, nearby_partitions, repair_attempt, transfer_rows

from .exact import IMPORT_SECONDS
from .status import ortools_ready
from .align import align_to_previous, arrival_cost, count_moves, keep_slots
from .metrics import balancedness, gpu_loads
from .problem import as_previous  # noqa: F401 - validated with every other input, in problem.py
from .result import Migration  # noqa: F401 - defined beside SolveResult, which holds one; exported here too

__all__ = ["Migration", "TRANSFER_DTYPE", "as_previous", "transfer_list", "replan"]

# Fields of a transfer list (one row per replica whose weights are copied).
TRANSFER_DTYPE = np.dtype([
    ("layer", np.int64), ("expert", np.int64), ("src_gpu", np.int64), ("dst_gpu", np.int64), ("dst_slot", np.int64),
])


def transfer_list(old: np.ndarray, new: np.ndarray, num_gpus: int, num_nodes: int = 1) -> np.ndarray:
    """Every weight copy ``new`` needs from ``old``: a structured array of
    :data:`TRANSFER_DTYPE` rows ``(layer, expert, src_gpu, dst_gpu, dst_slot)``.

    ``dst_slot`` is the global slot index (``dst_gpu * k + position``) that receives the
    expert.  A slot that keeps its expert is not listed.  A slot whose expert the GPU
    already held in another slot is a copy within the GPU (``src_gpu == dst_gpu``, not a
    move); otherwise ``src_gpu`` holds the expert in ``old``, on the destination's node
    where one does (lowest index first), or ``-1`` where no GPU of ``old`` holds it
    (its only copies were on masked GPUs: load it from host memory or storage).  Empty
    slots (``-1``) in either plan are neither sources nor destinations.
    """
    rows = transfer_rows(np.ascontiguousarray(old, dtype=np.int64), np.ascontiguousarray(new, dtype=np.int64),
                         int(num_gpus), int(num_nodes))
    rec = np.empty(rows.shape[1], dtype=TRANSFER_DTYPE)
    for i, name in enumerate(TRANSFER_DTYPE.names):
        rec[name] = rows[i]
    return rec


@dataclass
class _Replan:
    """What :func:`replan` settles per layer as its steps run (arrays updated in place).

    Attributes:
        w: ``[L, E]`` loads, scaled per layer by a power of two (no decision changes).
        old: ``[L, R]`` the deployed placement.
        out: ``[L, R]`` the chosen plan so far (starts as the relabelled replan).
        moves, cost: ``[L]`` its moves and move cost against ``old``.
        cap: ``[L]`` every layer's max-load cap (scaled units).
        source: per layer ``"replan"``, ``"old"``, ``"repair"`` or ``"exact"``.
    """

    w: np.ndarray
    old: np.ndarray
    out: np.ndarray
    moves: np.ndarray
    cost: np.ndarray
    cap: np.ndarray
    source: list[str]
    G: int
    N: int
    hierarchical: bool
    num_groups: int
    node_move_cost: float
    allow_duplicates: bool
    events: list[str]

    @property
    def P(self) -> int:
        return self.G // self.N

    def take(self, l: int, row: np.ndarray, moves: int, cost: float, source: str) -> None:
        """Layer ``l``'s plan becomes ``row`` (each GPU's kept experts already in their old
        slots)."""
        self.out[l] = row
        self.moves[l], self.cost[l], self.source[l] = moves, cost, source


def replan(
    weight: np.ndarray,
    old: np.ndarray,
    fresh: np.ndarray,
    *,
    num_gpus: int,
    num_nodes: int,
    hierarchical: bool,
    max_balance_loss: float,
    num_groups: int = 1,
    node_move_cost: float = 4.0,
    allow_duplicates: bool = True,
    deadline: float | None = None,
    exact: bool = False,
    exact_deadline: float | None = None,
    exact_budget: float = 0.0,
    deterministic: bool = False,
    seed: int = 0,
    workers: int = 1,
    bytes_per_expert: int | None = None,
) -> tuple[np.ndarray, Migration, list[str]]:
    """Per layer, the cheapest plan (in move cost) whose max GPU load is at most
    ``(1 + max_balance_loss)`` times ``fresh``'s (see module docs).

    Args:
        weight: ``[L, E]`` float64 loads.
        old: ``[L, R]`` the placement deployed now (a valid plan; hierarchical: each node
            holds whole groups when ``hierarchical``).
        fresh: ``[L, R]`` the best plan found without ``old``.
        num_gpus, num_nodes: the cluster (moves across nodes cost ``node_move_cost``).
        hierarchical: keep experts in the old plan's nodes while repairing.
        deadline: ``time.perf_counter()`` value after which layers not yet repaired
            take the relabelled replan.
        exact: then refine the costliest layers block by block (a node at a time) with
            :func:`eplb_opt.cpsat.solve_min_moves` until ``exact_deadline``; with
            ``deterministic``, ``exact_budget / blocks`` of CP-SAT deterministic time per
            block instead.
        seed, workers: for CP-SAT.
        bytes_per_expert: bytes of one expert's weights (``Migration.bytes``), or None.

    Returns:
        ``(phy2log [L, R], migration, events)``: the plan, its :class:`Migration`
        figures (transfers, baseline) and notes on what happened.
    """
    # Per-layer power-of-two scaling changes no decision (every test compares loads of
    # one layer) and keeps the cost ratios of huge loads finite.
    w = unit_scale(np.asarray(weight, dtype=np.float64))
    G, N = num_gpus, num_nodes
    aligned = align_to_previous(fresh, old, G, N)
    base_moves, base_cost = count_moves(old, aligned, G, N, node_move_cost=node_move_cost)
    st = _Replan(
        w=w, old=old, out=aligned.copy(), moves=base_moves.copy(), cost=base_cost.copy(),
        cap=gpu_loads(w, fresh, G).max(axis=1) * (1.0 + max_balance_loss), source=["replan"] * w.shape[0],
        G=G, N=N, hierarchical=hierarchical, num_groups=num_groups, node_move_cost=node_move_cost,
        allow_duplicates=allow_duplicates, events=[],
    )
    _repair_layers(st, deadline)
    if exact:
        _exact_blocks(st, deadline=exact_deadline, budget=exact_budget, deterministic=deterministic, seed=seed,
                      workers=workers)
    fresh_loads = gpu_loads(np.asarray(weight, dtype=np.float64), fresh, G)
    migration = Migration(
        moves=st.moves, cost=st.cost, transfers=transfer_list(old, st.out, G, N),
        bytes=None if bytes_per_expert is None else int(st.moves.sum()) * bytes_per_expert,
        baseline_moves=base_moves, baseline_cost=base_cost, baseline_balancedness=balancedness(fresh_loads),
        cap=fresh_loads.max(axis=1) * (1.0 + max_balance_loss), source=tuple(st.source), baseline_phy2log=aligned,
    )
    return st.out, migration, st.events


def _repair_layers(st: _Replan, deadline: float | None) -> None:
    """Per layer, the cheapest repair under the cap from each start
    (:func:`_starts`; the compiled :func:`heuristics.local.repair_attempt`, at most
    ``4 R`` repair steps and ``R`` undo steps), where cheaper than the relabelled
    replan; layers not reached by ``deadline`` keep the replan (an event counts them)."""
    L, R = st.old.shape
    late = 0
    starts = _starts(st)
    w = np.ascontiguousarray(st.w, dtype=np.float64)
    old = np.ascontiguousarray(st.old, dtype=np.int64)
    G, N, hier, dup = int(st.G), int(st.N), bool(st.hierarchical), bool(st.allow_duplicates)
    nmc = float(st.node_move_cost)
    for l in range(L):
        if deadline is not None and time.perf_counter() >= deadline:
            late += 1
            continue
        T = float(st.cap[l])
        for i, start in enumerate(starts[l]):
            if i and deadline is not None and time.perf_counter() >= deadline:
                break
            ok, row, m, c = repair_attempt(w[l], old[l], np.ascontiguousarray(start, dtype=np.int64), G, N, hier, nmc,
                                           dup, T, 4 * R, R)
            if ok and (c < st.cost[l] or (c == st.cost[l] and st.source[l] == "replan")):
                st.take(l, row, int(m), float(c), "old" if m == 0 else "repair")
    if late:
        st.events.append(f"migration: time ran out before {late} layer(s) were repaired (relabelled replan kept)")


def _starts(st: _Replan) -> list[list[np.ndarray]]:
    """Per layer, the ``[R]`` placements its repair starts from: the old one (global
    policy, or hierarchical where it holds whole groups per node) and, hierarchical,
    partitions a few group swaps away where the old one cannot meet the cap (its
    heaviest node is above it on average; :func:`heuristics.local.nearby_partitions`),
    nodes that kept their groups keeping their old content.  The partitions of all
    layers are placed and relabelled in one batch."""
    old, L = st.old, st.old.shape[0]
    if not st.hierarchical:
        return [[old[l]] for l in range(L)]
    R, E = old.shape[1], st.w.shape[1]
    gs = E // st.num_groups
    node, whole = group_nodes(np.ascontiguousarray(old, dtype=np.int64), st.N, st.num_groups, gs)
    starts: list[list[np.ndarray]] = [[old[l]] if whole[l] else [] for l in range(L)]
    gl = st.w.reshape(L, st.num_groups, gs).sum(axis=2)
    ls, nodes = nearby_partitions(gl, node, whole, st.N, st.P, np.ascontiguousarray(st.cap, dtype=np.float64), 3)
    if not ls.size:
        return starts
    rows = place(st.w[ls], R, st.num_groups, st.N, st.G, node_of_group=nodes,
                 allow_duplicates=st.allow_duplicates).phy2log
    rows = align_to_previous(rows, old[ls], st.G, st.N)
    rn = R // st.N
    on = np.arange(st.N)
    kept = ((nodes[:, :, None] == on) == (node[ls][:, :, None] == on)).all(axis=1)    # [A, N]: same groups
    for a, l in enumerate(ls):
        for n in np.flatnonzero(kept[a]):
            rows[a, n * rn:(n + 1) * rn] = old[l, n * rn:(n + 1) * rn]
        starts[l].append(rows[a])
    return starts


def _cpsat_time(st: _Replan, deadline: float | None, deterministic: bool) -> bool:
    """Whether the CP-SAT move model may start (events say why not)."""
    if deterministic or deadline is None:
        return True
    left = deadline - time.perf_counter()
    if left <= 0.01:
        st.events.append("migration: no time left for the CP-SAT move model")
        return False
    if not ortools_ready() and left < IMPORT_SECONDS:
        st.events.append("migration: CP-SAT move model skipped: loading OR-Tools (about 0.5 s, once per "
                         "process) would overrun the deadline; call eplb_opt.warm_up() at start-up")
        return False
    return True


def _exact_blocks(st: _Replan, *, deadline: float | None, budget: float, deterministic: bool, seed: int,
                  workers: int) -> None:
    """CP-SAT per node (see :func:`replan`), costliest layers first: a node's content is
    replaced where the model finds it cheaper and the whole layer stays under its cap."""
    if not _cpsat_time(st, deadline, deterministic):
        return
    from . import cpsat

    todo = [int(l) for l in np.argsort(-st.cost) if st.cost[l] > 0]
    improved = solved = failed = 0
    blocks = [(l, n) for l in todo for n in range(st.N)]
    for bi, (l, n) in enumerate(blocks):
        left = (deadline - time.perf_counter()) if deadline is not None else 1.0
        if not deterministic and left <= 0.01:
            st.events.append(f"migration: CP-SAT time ran out with {len(blocks) - bi} node block(s) left")
            break
        model = _block_model(st, l, n)
        if model is None:
            continue
        if deterministic:
            share = max(0.01, budget / max(1, len(blocks)))
        else:
            share = max(0.01, left / max(1, len(blocks) - bi))
        try:
            res = cpsat.solve_min_moves(model.options, model.arrival, float(st.cap[l]), model.k, model.hint, share,
                                        max_per_gpu=None if st.allow_duplicates else 1, seed=seed, workers=workers,
                                        deterministic=deterministic)
        except Exception as exc:  # noqa: BLE001 - a solver failure keeps the heuristic answer
            failed += 1
            st.events.append(f"layer {l} node {n}: CP-SAT move model failed ({type(exc).__name__}: {exc}); "
                             "kept the repair")
            continue
        solved += 1
        if res.x is not None:
            improved += _take_block(st, l, n, model, res.x)
    if solved or failed:
        st.events.append(f"migration: CP-SAT move model on {solved} node block(s), cheaper on {improved}"
                         + (f", failed on {failed}" if failed else ""))


@dataclass
class _Block:
    """The move model of one node of one layer.

    Attributes:
        X: ``[n]`` the experts the node holds now.
        options: per expert of ``X``, ``(count, per-replica load)`` choices.
        arrival: ``[n, P]`` cost of a replica arriving on each GPU of the node.
        hint: ``[n, P]`` the replicas per GPU now.
        O: ``[G, E]`` old replica counts; cin: ``[G, E]`` arrival costs.
        c_now: ``[E]`` replica counts now; cur_cost: the node's move cost now.
    """

    X: np.ndarray
    options: list
    arrival: np.ndarray
    hint: np.ndarray
    O: np.ndarray
    cin: np.ndarray
    c_now: np.ndarray
    cur_cost: float
    k: int


def _block_model(st: _Replan, l: int, n: int) -> _Block | None:
    """The data of node ``n``'s move model in layer ``l``, or None where the node
    already costs nothing."""
    E = st.w.shape[1]
    G, P = st.G, st.P
    k = st.out.shape[1] // G
    O = _gpu_counts(st.old[l], G, E)
    cin = arrival_cost(O, st.N, st.node_move_cost)
    M = _gpu_counts(st.out[l], G, E)
    gs = slice(n * P, (n + 1) * P)
    cur_cost = float((M[gs] * (O[gs] == 0) * cin[gs]).sum())
    if cur_cost <= 0:
        return None
    c_now = M.sum(axis=0)
    X = np.flatnonzero(M[gs].sum(axis=0) > 0)
    options = []
    for e in X:
        in_block = int(M[gs, e].sum())
        if st.hierarchical:
            c_old = int(O[:, e].sum())
            menu = sorted({t for t in (in_block - 1, in_block, in_block + 1, c_old) if 1 <= t <= P * k})
            if not st.allow_duplicates:
                menu = [t for t in menu if t <= P]
            options.append([(t, float(st.w[l, e]) / t) for t in menu])
        else:
            options.append([(in_block, float(st.w[l, e]) / c_now[e])])
    arrival = (cin[gs][:, X] * (O[gs][:, X] == 0)).T          # [n, P]
    return _Block(X, options, arrival, M[gs][:, X].T, O, cin, c_now, cur_cost, k)


def _take_block(st: _Replan, l: int, n: int, b: _Block, x: np.ndarray) -> bool:
    """Replace node ``n`` of layer ``l`` by the model's answer ``x`` ``[n, P]`` when, read
    out and checked in float64, it is cheaper and keeps the whole layer under its cap."""
    G, P, k = st.G, st.P, b.k
    gs = slice(n * P, (n + 1) * P)
    cnt = b.c_now.copy()
    if st.hierarchical:
        cnt[b.X] = x.sum(axis=1)
    per = st.w[l] / np.maximum(cnt, 1)
    loads = (x * per[b.X][:, None]).sum(axis=0)
    new_cost = float((x.T * (b.O[gs][:, b.X] == 0) * b.cin[gs][:, b.X]).sum())
    if (loads > st.cap[l] * (1 + 1e-12)).any() or (x.sum(axis=0) != k).any() or new_cost >= b.cur_cost - 1e-9:
        return False
    new_row = st.out[l].copy()
    o = st.old[l].reshape(G, k)
    for j, g in enumerate(range(n * P, (n + 1) * P)):
        new_row[g * k:(g + 1) * k] = keep_slots(np.repeat(b.X, x[:, j]), o[g])
    # Other blocks are untouched; the whole layer stays within the cap.
    if gpu_loads(st.w[l:l + 1], new_row[None], G).max() > st.cap[l] * (1 + 1e-12):
        return False
    st.out[l] = new_row
    Mn = _gpu_counts(new_row, G, st.w.shape[1])
    st.moves[l] = int((Mn * (b.O == 0)).sum())
    st.cost[l] = float((Mn * (b.O == 0) * b.cin).sum())
    st.source[l] = "exact"
    return True
