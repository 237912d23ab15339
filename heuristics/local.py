"""One layer's placement as mutable state for local search, over one or more load
windows: the two moves every search here uses, evaluated for many candidates at once.

* **swap**: slot ``i`` of GPU ``g`` trades experts with slot ``j`` of GPU ``h``;
* **retarget**: slot ``i`` of GPU ``g`` (expert ``a``, ``>= 2`` replicas) is given to
  expert ``b``: ``a`` loses a replica, ``b`` gains one, so the per-replica loads of both
  change on every GPU that holds them.

Shapes: ``W`` windows, ``E`` experts, ``G`` GPUs with ``k`` slots.  Loads per window are
``weights[w, e] / count[e]`` per replica.  :mod:`eplb_opt.migrate` (``W = 1``, a load
cap and a move cost) and :mod:`heuristics.robust` (worst or mean window) build on it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LayerState", "gpu_counts"]


def gpu_counts(p: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """``[G, E]`` replica counts of one layer's placement ``p`` ``[R]`` (``-1``: empty)."""
    k = p.size // num_gpus
    key = (np.arange(num_gpus)[:, None] * num_experts + p.reshape(num_gpus, k)).ravel()
    if (p < 0).any():                                   # empty slots (-1) count for nothing
        key = key[p.ravel() >= 0]
    return np.bincount(key, minlength=num_gpus * num_experts).reshape(num_gpus, num_experts)


class LayerState:
    """Placement ``S [G, k]`` of one layer with replica counts and per-window GPU loads.

    Args:
        weights: ``[W, E]`` (or ``[E]``, one window) non-negative loads.
        placement: ``[R]`` experts of the slots, GPU ``g`` holding ``g*k .. g*k+k-1``.
        num_gpus: ``G``.
        allowed: ``[G, E]`` bool, experts each GPU may hold (default: all).
        allow_duplicates: whether a GPU may hold two replicas of one expert.
    """

    def __init__(self, weights: np.ndarray, placement: np.ndarray, num_gpus: int,
                 allowed: np.ndarray | None = None, allow_duplicates: bool = True) -> None:
        w = np.asarray(weights, dtype=np.float64)
        self.w = w[None, :] if w.ndim == 1 else w                   # [W, E]
        self.W, self.E = self.w.shape
        self.G = num_gpus
        self.k = placement.size // num_gpus
        self.S = np.asarray(placement, dtype=np.int64).reshape(num_gpus, self.k).copy()
        self.M = gpu_counts(self.S.ravel(), num_gpus, self.E)
        self.c = self.M.sum(axis=0)
        self.allowed = np.ones((num_gpus, self.E), dtype=bool) if allowed is None else allowed
        self.dup = allow_duplicates
        self._refresh()

    def _refresh(self) -> None:
        self.v = self.w / np.maximum(self.c, 1)                     # [W, E]
        self.loads = self.v[:, self.S].sum(axis=2)                  # [W, G]

    @property
    def placement(self) -> np.ndarray:
        """``[R]`` the current placement."""
        return self.S.ravel().copy()

    def swap_loads(self, g: int, partners: np.ndarray):
        """All swaps of a slot of ``g`` with a slot of a GPU in ``partners`` (``H`` of them).

        Returns ``(lg, lh, ok, a, b)``: new loads of ``g`` and of the partner, each
        ``[W, k, H, k]`` (slot of ``g``, partner, slot of the partner); ``ok`` ``[k, H, k]``
        marks allowed swaps; ``a`` ``[k, 1, 1]`` and ``b`` ``[1, H, k]`` the experts traded.
        """
        a = self.S[g][:, None, None]
        b = self.S[partners][None, :, :]
        H = partners[None, :, None]
        d = self.v[:, b] - self.v[:, a]                              # [W, k, H, k]
        lg = self.loads[:, g][:, None, None, None] + d
        lh = self.loads[:, partners][:, None, :, None] - d
        ok = (a != b) & self.allowed[H, a] & self.allowed[g, b]
        if not self.dup:
            ok &= (self.M[H, a] == 0) & (self.M[g, b] == 0)
        return lg, lh, ok, a, b

    def retarget_loads(self, g: int, slots: np.ndarray | None = None, experts: np.ndarray | None = None):
        """All retargets of a slot of ``g`` in ``slots`` (default all ``k``) to an expert
        in ``experts`` (default those allowed on ``g``).

        Returns ``(new, ok, slots, experts)``: ``new`` ``[W, s, x, G]`` every GPU's load
        after the retarget; ``ok`` ``[s, x]`` marks allowed ones.
        """
        if slots is None:
            slots = np.arange(self.k)
        if experts is None:
            experts = np.flatnonzero(self.allowed[g])
        w, c, v, M = self.w, self.c, self.v, self.M
        a, b = self.S[g, slots], experts
        ca = c[a]
        va2 = w[:, a] / np.maximum(ca - 1, 1)                       # ca == 1 is masked below
        vb2 = w[:, b] / (c[b] + 1)
        new = (self.loads[:, None, None, :]
               + (M[:, a].T[None, :, :] * (va2 - v[:, a])[:, :, None])[:, :, None, :]
               + (M[:, b].T[None, :, :] * (vb2 - v[:, b])[:, :, None])[:, None, :, :])
        new[:, :, :, g] += vb2[:, None, :] - va2[:, :, None]
        ok = (ca >= 2)[:, None] & (a[:, None] != b[None, :]) & self.allowed[g, b][None, :]
        if not self.dup:
            ok &= (M[g, b] == 0)[None, :]
        return new, ok, slots, experts

    def do_swap(self, g: int, i: int, h: int, j: int) -> None:
        """Apply a swap (loads updated incrementally)."""
        a, b = self.S[g, i], self.S[h, j]
        self.S[g, i], self.S[h, j] = b, a
        self.M[g, a] -= 1
        self.M[g, b] += 1
        self.M[h, b] -= 1
        self.M[h, a] += 1
        d = self.v[:, b] - self.v[:, a]
        self.loads[:, g] += d
        self.loads[:, h] -= d

    def do_retarget(self, g: int, i: int, b: int) -> None:
        """Apply a retarget (counts and loads recomputed)."""
        a = self.S[g, i]
        self.S[g, i] = b
        self.M[g, a] -= 1
        self.M[g, b] += 1
        self.c[a] -= 1
        self.c[b] += 1
        self._refresh()
