"""Robust placement over several load windows: local search on the worst window's or the
mean window's busiest GPU.

A plan made for the windows' total can leave one window badly balanced.  Starting from
any valid placement (usually the plan for the total), :func:`robust_refine` applies, per
layer, the swap or retarget (:mod:`heuristics.local`) that lowers the objective most,
taken on the GPUs that set it, until none does:

* ``"worst"``: ``max_w max_g load[w, g]``;
* ``"mean"``: ``mean_w max_g load[w, g]``.

Swaps stay within a node (``num_nodes`` blocks of GPUs; pass 1 for the global policy)
and retargets only to experts the node already holds, so a hierarchical plan stays
hierarchical.  Never worse than the start (only improving steps are taken).
"""

from __future__ import annotations

import time

import numpy as np

from .local import LayerState

__all__ = ["OBJECTIVES", "robust_objective", "robust_refine"]

OBJECTIVES = ("worst", "mean")


def robust_objective(loads: np.ndarray, objective: str) -> np.ndarray:
    """Objective of GPU loads ``[..., W, G]`` (last two axes: windows, GPUs)."""
    per_window = loads.max(axis=-1)
    return per_window.max(axis=-1) if objective == "worst" else per_window.mean(axis=-1)


def _critical(loads: np.ndarray, objective: str, limit: int = 4) -> list[int]:
    """GPUs that set the objective: the argmax of each window (worst window first)."""
    top = loads.max(axis=1)
    out: list[int] = []
    for w in np.argsort(-top):
        g = int(loads[w].argmax())
        if g not in out:
            out.append(g)
        if objective == "worst" or len(out) >= limit:
            break
    return out


def _refine_layer(st: LayerState, node_size: int, objective: str, max_steps: int,
                  deadline: float | None = None) -> bool:
    """Improving steps until none is left (returns True) or the step cap or deadline."""
    for _ in range(max_steps):
        if deadline is not None and time.perf_counter() >= deadline:
            return False
        f0 = float(robust_objective(st.loads, objective))
        eps = 1e-12 * max(f0, 1e-300)
        best = None                                    # (value, kind, args)
        for g in _critical(st.loads, objective):
            n0 = (g // node_size) * node_size
            partners = np.array([h for h in range(n0, n0 + node_size) if h != g], dtype=np.int64)
            if partners.size:
                lg, lh, ok, _, _ = st.swap_loads(g, partners)
                W, k, H, _ = lg.shape
                # Loads of the other GPUs do not change: per window, the max over GPUs
                # other than g and h is the top one, or the second where h is the top.
                others = st.loads.copy()
                others[:, g] = -np.inf
                if others.shape[1] >= 2:
                    top2 = np.argpartition(-others, 1, axis=1)[:, :2]
                    v2 = np.take_along_axis(others, top2, axis=1)
                    first = np.where(v2[:, 0] >= v2[:, 1], 0, 1)
                    i1 = top2[np.arange(W), first]
                    val1, val2 = v2[np.arange(W), first], v2[np.arange(W), 1 - first]
                    excl = np.where(i1[:, None] == partners[None, :], val2[:, None], val1[:, None])
                else:
                    excl = np.full((W, H), -np.inf)
                per_window = np.maximum(np.maximum(lg, lh), excl[:, None, :, None])     # [W, k, H, k]
                val = per_window.max(axis=0) if objective == "worst" else per_window.mean(axis=0)
                val = np.where(ok, val, np.inf)
                idx = np.unravel_index(int(np.argmin(val)), val.shape)
                if val[idx] < f0 - eps and (best is None or val[idx] < best[0]):
                    best = (float(val[idx]), "swap", (g, int(idx[0]), int(partners[idx[1]]), int(idx[2])))
            new, ok, slots, experts = st.retarget_loads(g)
            val = robust_objective(np.moveaxis(new, 0, 2), objective)                  # [s, x]
            val = np.where(ok, val, np.inf)
            if val.size:
                idx = np.unravel_index(int(np.argmin(val)), val.shape)
                if val[idx] < f0 - eps and (best is None or val[idx] < best[0]):
                    best = (float(val[idx]), "retarget", (g, int(slots[idx[0]]), int(experts[idx[1]])))
        if best is None:
            return True
        if best[1] == "swap":
            st.do_swap(*best[2])
        else:
            st.do_retarget(*best[2])
    return False


def robust_refine(
    windows: np.ndarray,
    phy2log: np.ndarray,
    num_gpus: int,
    num_nodes: int = 1,
    objective: str = "worst",
    max_steps: int = 64,
    allow_duplicates: bool = True,
    deadline: float | None = None,
    layers: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lower the worst or mean window's busiest GPU of every layer (see module docs).

    Args:
        windows: ``[W, L, E]`` non-negative loads per window.
        phy2log: ``[L, R]`` start placement (hierarchical: node ``n`` holds slots
            ``n * R / N ..``).
        num_gpus: ``G``; num_nodes: blocks of GPUs swaps stay within.
        objective: ``"worst"`` or ``"mean"``.
        max_steps: improving steps per layer at most.
        deadline: ``time.perf_counter()`` value after which no step starts.
        layers: the layers to work on (default all).

    Returns:
        ``(phy2log [L, R], converged [L] bool)``: ``converged`` marks layers where no
        improving step was left (not cut by ``max_steps`` or the deadline).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    W, L, E = windows.shape
    out = np.array(phy2log, dtype=np.int64, copy=True)
    P = num_gpus // num_nodes
    converged = np.zeros(L, dtype=bool)
    for l in (range(L) if layers is None else layers):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        st = LayerState(windows[:, l, :], out[l], num_gpus, allow_duplicates=allow_duplicates)
        # Experts stay in the node that holds them.
        node_has = st.M.reshape(num_nodes, P, E).sum(axis=1) > 0
        st.allowed = np.repeat(node_has, P, axis=0)
        converged[l] = _refine_layer(st, P, objective, max_steps, deadline)
        out[l] = st.placement
    return out, converged
