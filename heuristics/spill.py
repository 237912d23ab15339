"""Locality-aware spill: between the hierarchical and the global policy.

Every expert keeps one replica (its *primary*) on its group's home node; its other
replicas may go to any node.  Load served by a replica outside the home node costs
``cross_node_cost`` per unit (a proxy for inter-node traffic under group-limited
routing).  Per layer the search minimises, at node level,

    max_n load[n] / P  +  cross_node_cost * (load served off-node) / G

(``P`` GPUs per node, ``G`` in all: both terms are per-GPU loads), then packs every
node's replicas onto its GPUs (:func:`heuristics.pipeline.pack_rows`).

The node-level search starts from the hierarchical plan's replica counts and node
contents (nothing off-node) and applies, while one lowers the objective, the best of

* a **swap** of a replica on the heaviest node with one on another node;
* a **retarget**: a slot on any node given from an expert with spare replicas to
  another expert (counts change, so every replica of both changes load).

then polishes at GPU level (swaps between any two GPUs and retargets on the busiest
GPUs, same objective with the GPU max in place of the node term).  A primary never
leaves home.  ``cross_node_cost = inf`` keeps the hierarchical plan; ``0`` trades
locality away freely.
"""

from __future__ import annotations

import time

import numpy as np

from .apportion import unit_scale
from .local import LayerState
from .pipeline import pack_rows

__all__ = ["off_node_load", "spill_refine"]


def off_node_load(weight: np.ndarray, phy2log: np.ndarray, num_nodes: int, home: np.ndarray) -> np.ndarray:
    """``[L]`` load served by replicas outside their expert's home node.

    Args:
        weight: ``[L, E]``; phy2log: ``[L, R]`` (node ``n`` holds slots ``n*R/N ..``);
        home: ``[L, E]`` home node of every expert.
    """
    L, E = weight.shape
    R = phy2log.shape[1]
    node_of_slot = np.arange(R) // (R // num_nodes)
    cnt = np.bincount((phy2log + (np.arange(L) * E)[:, None]).ravel(), minlength=L * E).reshape(L, E)
    per = np.take_along_axis(weight / np.maximum(cnt, 1), phy2log, axis=1)
    away = node_of_slot[None, :] != np.take_along_axis(home, phy2log, axis=1)
    return (per * away).sum(axis=1)


class _Nodes:
    """Node-level state of one layer: ``x [E, N]`` replicas of each expert per node."""

    def __init__(self, w: np.ndarray, x: np.ndarray, home: np.ndarray, P: int, G: int, lam: float,
                 cap: float = np.inf) -> None:
        # cap: most replicas of one expert on one node (P when no GPU may hold two).
        self.w, self.x, self.home, self.P, self.G, self.lam, self.cap = w, x.copy(), home, P, G, lam, cap
        self.E, self.N = x.shape
        self.away = np.arange(self.N)[None, :] != home[:, None]    # [E, N]
        self._refresh()

    def _refresh(self) -> None:
        self.c = self.x.sum(axis=1)
        self.v = self.w / np.maximum(self.c, 1)
        # Not a BLAS product (its summation order depends on threads and CPU).
        self.loads = (self.v[:, None] * self.x).sum(axis=0)         # [N]
        self.off = float((self.v * (self.x * self.away).sum(axis=1)).sum())

    def objective(self, loads: np.ndarray, off, vmax=None) -> np.ndarray:
        # A GPU carries at least the heaviest replica: without that term the search
        # balances nodes with replicas no GPU can split.
        top = loads.max(axis=-1) / self.P
        return np.maximum(top, self.v.max() if vmax is None else vmax) + self.lam * off / self.G

    def movable(self, n: int) -> np.ndarray:
        """Experts with a replica on ``n`` that may leave it (not the last home one)."""
        x = self.x[:, n]
        return np.flatnonzero((x >= 1) & ~((~self.away[:, n]) & (x == 1)))

    def best_step(self, eps: float):
        f0 = float(self.objective(self.loads, self.off))
        h = int(np.argmax(self.loads))
        best = None
        v, away = self.v, self.away
        # Swaps: e leaves h for m, f leaves m for h.
        es = self.movable(h)
        for m in range(self.N):
            if m == h or es.size == 0:
                continue
            fs = self.movable(m)
            if fs.size == 0:
                continue
            d = v[fs][None, :] - v[es][:, None]                       # load change on h
            loads = np.broadcast_to(self.loads, d.shape + (self.N,)).copy()
            loads[..., h] += d
            loads[..., m] -= d
            d_off = (v[es] * (away[es, m].astype(float) - away[es, h]))[:, None] + \
                (v[fs] * (away[fs, h].astype(float) - away[fs, m]))[None, :]
            val = self.objective(loads, self.off + d_off)
            fits = (self.x[es, m] < self.cap)[:, None] & (self.x[fs, h] < self.cap)[None, :]
            val = np.where((es[:, None] != fs[None, :]) & fits, val, np.inf)
            i, j = np.unravel_index(int(np.argmin(val)), val.shape)
            if val[i, j] < f0 - eps and (best is None or val[i, j] < best[0]):
                best = (float(val[i, j]), "swap", (int(es[i]), h, int(fs[j]), m))
        # Retargets: a slot of node n goes from expert f (count >= 2, may leave n) to e.
        for n in range(self.N):
            fs = self.movable(n)
            fs = fs[self.c[fs] >= 2]
            if fs.size == 0:
                continue
            es = np.arange(self.E)
            vf2 = self.w[fs] / (self.c[fs] - 1)
            ve2 = self.w[es] / (self.c[es] + 1)
            # loads [f, e, N]
            loads = (self.loads[None, None, :]
                     + (self.x[fs] * (vf2 - v[fs])[:, None])[:, None, :]
                     + (self.x[es] * (ve2 - v[es])[:, None])[None, :, :])
            loads[:, :, n] += ve2[None, :] - vf2[:, None]
            off_f = (self.x[fs] * away[fs]).sum(axis=1)
            off_e = (self.x[es] * away[es]).sum(axis=1)
            d_off = ((vf2 * (off_f - away[fs, n]) - v[fs] * off_f)[:, None]
                     + (ve2 * (off_e + away[es, n]) - v[es] * off_e)[None, :])
            # heaviest replica after the retarget: the top of the others, vf2 and ve2
            order = np.argsort(-v)
            t0, t1, t2 = order[:3] if self.E >= 3 else np.pad(order, (0, 3 - self.E), constant_values=order[0])
            other = np.where((fs[:, None] != t0) & (es[None, :] != t0), v[t0],
                             np.where((fs[:, None] != t1) & (es[None, :] != t1), v[t1], v[t2]))
            vmax = np.maximum(other, np.maximum(vf2[:, None], ve2[None, :]))
            val = self.objective(loads, self.off + d_off, vmax)
            fits = (self.x[es, n] < self.cap)[None, :]
            val = np.where((fs[:, None] != es[None, :]) & fits, val, np.inf)
            i, j = np.unravel_index(int(np.argmin(val)), val.shape)
            if val[i, j] < f0 - eps and (best is None or val[i, j] < best[0]):
                best = (float(val[i, j]), "retarget", (int(fs[i]), int(es[j]), n))
        return best

    def apply(self, kind: str, args: tuple) -> None:
        if kind == "swap":
            e, h, f, m = args
            self.x[e, h] -= 1
            self.x[e, m] += 1
            self.x[f, m] -= 1
            self.x[f, h] += 1
        else:
            f, e, n = args
            self.x[f, n] -= 1
            self.x[e, n] += 1
        self._refresh()


class _Gpus(LayerState):
    """GPU-level polish: swaps between any two GPUs and retargets, on the busiest GPUs,
    with the off-node term and the primaries kept home."""

    def __init__(self, w, placement, G, N, home, lam, allow_duplicates):
        super().__init__(w, placement, G, allow_duplicates=allow_duplicates)
        self.node = np.arange(G) // (G // N)
        self.lam = lam
        self.away = self.node[:, None] != home[None, :]           # [G, E]
        self._count_home()

    def _count_home(self) -> None:
        self.hc = ((~self.away) * self.M).sum(axis=0)              # home replicas per expert

    def off(self) -> float:
        return float((self.w[0] / np.maximum(self.c, 1) * (self.M * self.away).sum(axis=0)).sum())

    def objective(self) -> float:
        return float(self.loads[0].max()) + self.lam * self.off() / self.G

    def best_step(self, g: int, f0: float, eps: float):
        w = self.w[0]
        off0 = self.off()
        partners = np.array([h for h in range(self.G) if h != g], dtype=np.int64)
        lg, lh, ok, a, b = self.swap_loads(g, partners)
        lg, lh = lg[0], lh[0]
        H = partners[None, :, None]
        va, vb = w[a] / self.c[a], w[b] / self.c[b]
        d_off = (va * (self.away[H, a].astype(float) - self.away[g, a])
                 + vb * (self.away[g, b].astype(float) - self.away[H, b]))
        ok = ok & ~((~self.away[g, a]) & (self.hc[a] == 1) & self.away[H, a])
        ok = ok & ~((~self.away[H, b]) & (self.hc[b] == 1) & self.away[g, b])
        others = self.loads[0].copy()
        others[g] = -np.inf
        i1 = int(np.argmax(others))
        v1 = others[i1]
        others[i1] = -np.inf
        excl = np.where(partners == i1, others.max(), v1)[None, :, None]
        val = np.maximum(np.maximum(lg, lh), excl) + self.lam * (off0 + d_off) / self.G
        # Tie-break on the sum of squared loads: a step that keeps the objective but
        # evens the loads out opens the way for the next one.
        sq0 = float((self.loads[0] ** 2).sum())
        sq = sq0 - self.loads[0][g] ** 2 - (self.loads[0][partners] ** 2)[None, :, None] + lg ** 2 + lh ** 2
        best = self._better(None, val, sq, ok, f0, sq0, eps, lambda idx: (
            "swap", (g, int(idx[0]), int(partners[idx[1]]), int(idx[2]))))
        new, ok, slots, experts = self.retarget_loads(g, experts=np.arange(self.E))
        a, b = self.S[g, slots], experts
        ca, cb = self.c[a], self.c[b]
        offa = (self.M[:, a] * self.away[:, a]).sum(axis=0)
        offb = (self.M[:, b] * self.away[:, b]).sum(axis=0)
        d_off = ((w[a] * (offa - self.away[g, a]) / np.maximum(ca - 1, 1) - w[a] * offa / ca)[:, None]
                 + (w[b] * (offb + self.away[g, b]) / (cb + 1) - w[b] * offb / np.maximum(cb, 1))[None, :])
        ok = ok & ~(((~self.away[g, a]) & (self.hc[a] == 1))[:, None])
        val = new[0].max(axis=2) + self.lam * (off0 + d_off) / self.G
        sq = (new[0] ** 2).sum(axis=2)
        return self._better(best, val, sq, ok, f0, sq0, eps, lambda idx: (
            "retarget", (g, int(slots[idx[0]]), int(experts[idx[1]]))))

    @staticmethod
    def _better(best, val, sq, ok, f0, sq0, eps, describe):
        """Keep ``best`` or take the best candidate: lower objective first, then (at
        an equal objective) a lower sum of squares.  Entries: ``(key, kind, args)``."""
        if val.size == 0:
            return best
        down = ok & (val < f0 - eps)
        if down.any():
            v = np.where(down, val, np.inf)
            idx = np.unravel_index(int(np.argmin(v)), v.shape)
            key = (0, float(val[idx]))
        else:
            flat = ok & (val <= f0 + eps) & (sq < sq0 * (1 - 1e-12))
            if not flat.any():
                return best
            v = np.where(flat, sq, np.inf)
            idx = np.unravel_index(int(np.argmin(v)), v.shape)
            key = (1, float(sq[idx]))
        if best is None or key < best[0]:
            return (key, *describe(idx))
        return best

    def apply(self, kind: str, args: tuple) -> None:
        if kind == "swap":
            self.do_swap(*args)
        else:
            self.do_retarget(*args)
        self._count_home()


def _primaries_home(row: np.ndarray, home: np.ndarray, N: int) -> np.ndarray:
    """Swap replicas so that every expert has one on its home node: an expert with
    none there trades places with a replica on its home node that is away from its own
    home or a spare home replica (one always exists: a node has more slots than home
    experts).  Loads per replica do not change."""
    row = row.copy()
    R = row.size
    rn = R // N
    node = np.arange(R) // rn
    for e in np.argsort(home, kind="stable"):
        h = home[e]
        if (row[h * rn:(h + 1) * rn] == e).any():
            continue
        seg = row[h * rn:(h + 1) * rn]
        at_home = home[seg] == h
        # spare home replicas: experts with more than one replica on this node
        counts = np.bincount(seg, minlength=home.size)
        spare = at_home & (counts[seg] >= 2)
        cand = np.flatnonzero(~at_home)
        if cand.size == 0:
            cand = np.flatnonzero(spare)
        s = h * rn + int(cand[0])
        src = np.flatnonzero((row == e) & (node != h))[0]
        row[s], row[src] = row[src], row[s]
    return row


def spill_refine(
    weight: np.ndarray,
    phy2log: np.ndarray,
    home: np.ndarray,
    num_gpus: int,
    num_nodes: int,
    cross_node_cost: float,
    max_steps: int = 2000,
    allow_duplicates: bool = True,
    deadline: float | None = None,
    global_plan: np.ndarray | None = None,
) -> np.ndarray:
    """Spill replicas off their home node where it pays (see module docs).

    Args:
        weight: ``[L, E]`` loads.
        phy2log: ``[L, R]`` start, a hierarchical plan (every replica on its home node).
        home: ``[L, E]`` home node of every expert.
        num_gpus, num_nodes: the cluster.
        cross_node_cost: cost per unit of load served off-node (``inf``: nothing moves).
        max_steps: improving node-level steps per layer at most.
        deadline: ``time.perf_counter()`` value after which layers are left as they are.
        global_plan: optional ``[L, R]`` global-policy plan: a second start per layer
            (its replicas swapped so every primary is home), kept where it ends with
            the lower objective; it helps where ``cross_node_cost`` is small.

    Returns:
        ``[L, R]`` placement (node ``n`` holds slots ``n*R/N ..``); every expert keeps a
        replica on its home node.  Layers where nothing spills keep their start plan.
    """
    out = np.array(phy2log, dtype=np.int64, copy=True)
    if not np.isfinite(cross_node_cost):
        return out
    # Per-layer power-of-two scaling: the objective is linear in the loads, so the
    # search is unchanged, and its sums of squares cannot overflow.
    weight = unit_scale(weight)
    L, E = weight.shape
    R = out.shape[1]
    N, G = num_nodes, num_gpus
    P, rn = G // N, R // N
    for l in range(L):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        x0 = np.zeros((E, N), dtype=np.int64)
        np.add.at(x0, (out[l], np.arange(R) // rn), 1)
        st = _Nodes(weight[l], x0, home[l], P, G, float(cross_node_cost), np.inf if allow_duplicates else P)
        for _ in range(max_steps):
            f0 = float(st.objective(st.loads, st.off))
            step = st.best_step(1e-12 * max(f0, 1e-300))
            if step is None:
                break
            st.apply(step[1], step[2])
        if np.array_equal(st.x, x0) and global_plan is None:
            continue
        row = np.empty(R, dtype=np.int64)
        for n in range(N):
            items = np.flatnonzero(st.x[:, n])
            cnt = st.x[items, n]
            local = pack_rows((st.v[items] * cnt)[None, :], cnt[None, :], P,
                              allow_duplicates=allow_duplicates)[0]             # [P, k] indices
            row[n * rn:(n + 1) * rn] = items[local].ravel()
        # GPU-level polish: node balance does not make the replicas pack well.
        starts = [row] + ([] if global_plan is None else [_primaries_home(global_plan[l], home[l], N)])
        results = [_polish(weight[l], start, G, N, home[l], float(cross_node_cost), allow_duplicates, max_steps)
                   for start in starts]
        best = min(results, key=lambda r: r[0])
        if np.isfinite(best[0]):           # else no start kept the rules: the start plan stays
            out[l] = best[1]
    return out


def _polish(w, row, G, N, home, lam, allow_duplicates, max_steps):
    """GPU-level search from ``row``; ``(objective, placement)``."""
    if not allow_duplicates and (np.bincount((np.arange(row.size) // (row.size // G)) * w.size + row) > 1).any():
        return np.inf, row             # a start that breaks the rule is not used
    gs = _Gpus(w, row, G, N, home, lam, allow_duplicates)
    for _ in range(max_steps):
        f0 = gs.objective()
        eps = 1e-12 * max(f0, 1e-300)
        best = None
        for g in np.argsort(-gs.loads[0])[:4]:
            cand = gs.best_step(int(g), f0, eps)
            if cand is not None and (best is None or cand[0] < best[0]):
                best = cand
            if best is not None and best[0][0] == 0:
                break
        if best is None:
            break
        gs.apply(best[1], best[2])
    return gs.objective(), gs.placement
