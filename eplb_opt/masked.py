"""Failed or drained GPUs: plans where masked GPUs hold nothing.

``solve(..., masked_gpus=...)`` marks GPUs that must stay empty, for every layer or per
layer.  Like SGLang's elasticity-aware algorithm (the peer), the remaining ``A`` GPUs of a
layer keep their ``k`` slots each, so the layer has ``k * A`` replicas (at least ``E``),
and the plan uses the global policy (equal GPUs per node no longer hold).  Layers with the
same number of active GPUs are planned together as one smaller problem, then every
active GPU gets its slots back in the full ``[L, R]`` map; a masked GPU's slots are
``-1``.  Loads and balancedness count every GPU, masked ones at zero load, so masking one
GPU of ``G`` lowers balancedness by at least the capacity lost (``1 / G``).

With ``previous``, the deployed plan restricted to the active GPUs is the start of the
migration search; experts whose only copies were on masked GPUs are first given a slot
of an expert with spare replicas.  Moves, costs and transfers are then counted against
the real deployed plan with the masked GPUs emptied: a copy of an expert no live GPU
holds has ``src_gpu = -1`` (host memory or storage).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .problem import as_mask  # noqa: F401 - validated with every other input, in problem.py

__all__ = ["as_mask", "compact_previous", "embed", "groups_by_active", "lower_bound"]


def compact_previous(previous: np.ndarray, mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The deployed plan on the active GPUs only (``[L', k*A]`` for layers with ``A``
    active GPUs), with every expert present: an expert whose copies were all on masked
    GPUs takes a slot of the expert with the most replicas (heaviest missing first)."""
    L, R = previous.shape
    G = mask.shape[1]
    k = R // G
    E = weight.shape[1]
    out = []
    for l in range(L):
        row = previous[l].reshape(G, k)[~mask[l]].ravel().copy()
        cnt = np.bincount(row, minlength=E)
        for e in sorted(np.flatnonzero(cnt == 0), key=lambda e: -weight[l, e]):
            f = int(np.argmax(cnt))                      # >= 2 replicas: k*A >= E
            s = int(np.flatnonzero(row == f)[-1])
            row[s] = e
            cnt[f] -= 1
            cnt[e] += 1
        out.append(row)
    return np.stack(out)


def embed(compact: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """``[L, G*k]`` map with the compact rows' GPUs put back in their places and ``-1``
    on masked GPUs (``compact`` rows list the active GPUs in increasing order)."""
    L, G = mask.shape
    out = np.full((L, G * k), -1, dtype=np.int64)
    for l in range(L):
        act = np.flatnonzero(~mask[l])
        out[l].reshape(G, k)[act] = compact[l].reshape(act.size, k)
    return out


def groups_by_active(mask: np.ndarray) -> list[np.ndarray]:
    """Layers grouped by their number of active GPUs (each group is one sub-problem)."""
    active = (~mask).sum(axis=1)
    return [np.flatnonzero(active == a) for a in np.unique(active)]


def lower_bound(weight: np.ndarray, num_replicas: int, mask: np.ndarray) -> np.ndarray:
    """``[L]`` certified bound of masked plans: each layer's active GPUs and their
    ``k`` slots each, under the global policy."""
    from .bounds import lower_bounds

    L, G = mask.shape
    k = num_replicas // G
    out = np.zeros(L)
    for idx in groups_by_active(mask):
        a = int((~mask[idx[0]]).sum())
        out[idx] = lower_bounds(weight[idx], k * a, a).lower_bound
    return out


def solve_masked(problem: Any, options: Any, start: float) -> Any:
    """:func:`eplb_opt.solve` with masked GPUs (``options.mask``): one global-policy
    sub-problem per active-GPU count, each solved by ``solve`` itself with its share of
    the budget, embedded back into the full map and finished by
    :func:`eplb_opt.result.build_result` like every other path."""
    from .budget import Budget
    from .bounds import Bounds
    from .plan import verify
    from .result import LayerFigures, build_result

    mask = options.mask
    L, G, R, E = problem.num_layers, problem.num_gpus, problem.num_replicas, problem.num_experts
    events: list[str] = []
    if problem.policy == "hierarchical":          # only from policy="auto": solve refuses an explicit one
        events.append("masked GPUs: nodes no longer have equal GPUs, so policy 'auto' planned the layers with "
                      "the global policy over the active GPUs (as SGLang's elasticity-aware algorithm does)")
    budget = Budget.of_call(problem.time_limit, problem.mode, start, options.deterministic) \
        if problem.mode == "exact" else None
    parts = _solve_parts(problem, options, budget, events)
    full = _stitch_plans([(idx, r.plan.phy2log.numpy()) for idx, r in parts], mask, problem.slots_per_gpu)
    verify(full, E, R, G, allow_duplicates=options.allow_duplicates, masked=mask)
    top, lb = _stitch(parts, "max_load", L), _stitch(parts, "lower_bound", L)
    status = [""] * L
    for idx, r in parts:
        for i, l in enumerate(idx):
            status[l] = r.status[i]
    comps: dict[str, np.ndarray] = {}
    for idx, r in parts:
        for name, arr in r.bounds.components.items():
            comps.setdefault(name, np.zeros(L))[idx] = arr
    bounds = Bounds(lower_bound=lb, components=comps, node_exact=False,
                    global_bound=_stitch(parts, "global_bound", L))
    migration = None if options.previous is None else _migration(problem, options, parts, full)
    return build_result(
        problem, options, start, full, bounds=bounds, lower_bound=lb, events=events, migration=migration,
        settled=LayerFigures(top, lb, tuple(status)), policy="global",
        parameters={"masked_gpus": mask.tolist(), "policy": "global", "workers": options.workers_given or 1},
    )


def _solve_parts(problem: Any, options: Any, budget: Any, events: list[str]) -> list[tuple[np.ndarray, Any]]:
    """``[(layers, SolveResult)]``: each active-GPU count's layers solved as one smaller
    problem over its active GPUs (``k`` slots each), given its share of the budget."""
    from .api import solve
    from .errors import SolveInterrupted

    mask, windows, L = options.mask, options.windows, problem.num_layers
    k = problem.slots_per_gpu
    prev = options.previous
    parts = []
    left_layers = L
    for idx in groups_by_active(mask):
        a = int(problem.num_gpus - mask[idx[0]].sum())
        share = None if budget is None else budget.share(len(idx), L, left_layers)
        left_layers -= len(idx)
        sub_w = windows[:, idx] if windows.shape[0] > 1 else windows[0][idx]
        try:
            r = solve(
                sub_w, num_replicas=k * a, num_gpus=a, mode=problem.mode, time_limit=share, seed=problem.seed,
                policy="global", deterministic=options.deterministic, workers=options.workers_given,
                tolerance=options.tolerance, allow_duplicates=options.allow_duplicates,
                executor=options.executor, ray_address=options.ray_address,
                previous=None if prev is None else compact_previous(prev[idx], mask[idx], problem.weight[idx]),
                max_balance_loss=None if prev is None else options.max_balance_loss,
                node_move_cost=options.node_move_cost, objective=options.objective,
            )
        except KeyboardInterrupt:
            # A sub-problem's partial plan covers some layers on fewer GPUs: not a plan
            # for the caller's problem, so none is offered.
            raise SolveInterrupted(
                "interrupted while planning around the masked GPUs; no partial plan is offered with masked_gpus",
                stage="masked sub-problems", partial=None,
            ) from None
        events.extend(f"{len(idx)} layer(s) with {a} active GPUs: {e}" for e in r.events)
        parts.append((idx, r))
    return parts


def _stitch(parts: list[tuple[np.ndarray, Any]], what: str, L: int) -> np.ndarray:
    """``[L]`` one per-layer figure of the sub-problems' results, in the full problem's layers."""
    out = np.zeros(L)
    for idx, r in parts:
        out[idx] = r.bounds.global_bound if what == "global_bound" else getattr(r, what)
    return out


def _stitch_plans(parts: list[tuple[np.ndarray, np.ndarray]], mask: np.ndarray, k: int) -> np.ndarray:
    """``[L, G*k]`` the sub-problems' ``[layers, k*A]`` plans embedded (masked slots -1)."""
    L, G = mask.shape
    out = np.full((L, G * k), -1, dtype=np.int64)
    for idx, plan in parts:
        out[idx] = embed(plan, mask[idx], k)
    return out


def _migration(problem: Any, options: Any, parts: list[tuple[np.ndarray, Any]], full: np.ndarray) -> Any:
    """Moves, costs and transfers against the deployed plan with the masked GPUs emptied."""
    from .metrics import balancedness, gpu_loads
    from .align import count_moves
    from .migrate import Migration, transfer_list

    mask, k, G, L = options.mask, problem.slots_per_gpu, problem.num_gpus, problem.num_layers
    base_full = _stitch_plans([(idx, r.migration.baseline_phy2log) for idx, r in parts], mask, k)
    cap, source = np.zeros(L), [""] * L
    for idx, r in parts:
        cap[idx] = r.migration.cap
        for i, l in enumerate(idx):
            source[l] = r.migration.source[i]
    nodes = problem.num_nodes if G % problem.num_nodes == 0 else 1
    old = options.previous.copy()
    old[np.repeat(mask, k, axis=1)] = -1                    # masked GPUs' copies are gone
    nmc, bpe = options.node_move_cost, options.bytes_per_expert
    moves, cost = count_moves(old, full, G, nodes, node_move_cost=nmc)
    bmoves, bcost = count_moves(old, base_full, G, nodes, node_move_cost=nmc)
    return Migration(
        moves=moves, cost=cost, transfers=transfer_list(old, full, G, nodes),
        bytes=None if bpe is None else int(moves.sum()) * bpe, baseline_moves=bmoves, baseline_cost=bcost,
        baseline_balancedness=balancedness(gpu_loads(problem.weight, base_full, G)), cap=cap,
        source=tuple(source), baseline_phy2log=base_full,
    )
