"""Load metrics of a placement.

A replica of expert ``e`` carries ``w[l, e] / c[l, e]`` (tokens are split evenly over an
expert's replicas).  A GPU's load is the sum over its ``k`` slots; the step time of a
layer is set by its busiest GPU.  All loads are float64 in the units of ``weight``.
An empty slot (``-1``, a masked GPU's) carries nothing.
"""

from __future__ import annotations

import numpy as np

from .heuristics.compile import kernel, warmer, writable
from .heuristics.grouping import pairwise_sum, pairwise_total

__all__ = ["slot_loads", "gpu_loads", "slot_gpu_loads", "max_load", "balancedness", "replica_counts_of", "gap",
           "layer_marks"]


def replica_counts_of(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` int64 replica counts of a ``[L, R]`` placement."""
    p = np.asarray(phy2log, dtype=np.int64)
    L = p.shape[0]
    keys = (p + (np.arange(L) * num_experts)[:, None]).ravel()
    if (p < 0).any():
        keys = keys[p.ravel() >= 0]
    return np.bincount(keys, minlength=L * num_experts).reshape(L, num_experts)


def slot_loads(weight: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    """``[L, R]`` float64 load of every physical slot.

    Args:
        weight: ``[L, E]`` loads.
        phy2log: ``[L, R]`` placement (every expert must have a replica).
    """
    w = np.ascontiguousarray(weight, dtype=np.float64)
    p = np.ascontiguousarray(phy2log, dtype=np.int64)
    if w.ndim != 2 or p.ndim != 2 or w.shape[0] != p.shape[0]:
        raise ValueError(f"weight {w.shape} and phy2log {p.shape} must be [L, E] and [L, R]")
    w, p = writable(w), writable(p)
    out = np.empty(p.shape)
    bad = _slot_loads(w, p, out)
    if bad >= 0:
        raise IndexError(f"phy2log[{bad // p.shape[1]}, {bad % p.shape[1]}] = {p.flat[bad]} is not an expert id "
                         f"below {w.shape[1]}")
    return out


@kernel
def _slot_loads(w, p, out):
    """``out [L, R]``: each slot's expert load over that expert's replica count in its
    layer (0 for an empty slot, ``-1``); returns the flat index of the first id ``>= E``
    (-1: none; ``out`` is then incomplete).  Each expert's share is divided once per
    layer (an expert without a replica is divided by 1, and read by no slot)."""
    L, R = p.shape
    E = w.shape[1]
    cnt = np.zeros(E, dtype=np.int64)
    share = np.empty(E)
    for l in range(L):
        cnt[:] = 0
        for s in range(R):
            e = p[l, s]
            if e >= E:
                return l * R + s
            if e >= 0:
                cnt[e] += 1
        for e in range(E):          # one division per expert, in a loop without branches
            share[e] = w[l, e] / max(cnt[e], 1)
        for s in range(R):
            e = p[l, s]
            out[l, s] = share[e] if e >= 0 else 0.0
    return -1


@kernel
def _pack_sums(slots, num_gpus, out):
    """``out [L, G]``: each GPU's ``k = R / G <= 128`` slot loads of ``slots [L, R]``
    summed as numpy's ``slots.reshape(L, G, k).sum(axis=2)`` sums them
    (:func:`pairwise_sum`, added to ``0.0``), bit for bit."""
    L, R = slots.shape
    k = R // num_gpus
    for l in range(L):
        row = slots[l]
        for g in range(num_gpus):
            out[l, g] = 0.0 + pairwise_sum(row, g * k, k)


@warmer
def _warm() -> None:
    """Compile :func:`_slot_loads` and :func:`_pack_sums` with the argument types real
    calls use."""
    _, gpus = slot_gpu_loads(np.ones((1, 2)), np.array([[0, 1, -1, 0]]), 2)
    layer_marks(gpus, np.ones((1, 4)), np.zeros(1), np.zeros(1, dtype=bool), 1.0, 1.0, 1.0)


def slot_gpu_loads(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """``(slot_loads [L, R], gpu_loads [L, G])`` of a placement, the GPU loads summed in
    one pass over the slot loads (the same bits as ``gpu_loads``)."""
    w = np.ascontiguousarray(weight, dtype=np.float64)
    p = np.ascontiguousarray(phy2log, dtype=np.int64)
    G = int(num_gpus)
    if w.ndim == 2 and p.ndim == 2 and 0 < w.shape[0] == p.shape[0] and G > 0 and p.shape[1] % G == 0 \
            and p.shape[1] // G <= 128:                # both steps in one kernel call
        s, out = np.empty(p.shape), np.empty((p.shape[0], G))
        if _slot_gpu_rows(writable(w), writable(p), G, s, out) < 0:
            return s, out
    s = slot_loads(w, p)                                # (raises on a bad id)
    L, R = s.shape
    if L == 0 or G <= 0 or R % G or R // G > 128:
        # numpy itself: its error for sizes that do not divide, its halving for long rows
        return s, s.reshape(L, num_gpus, -1).sum(axis=2)
    out = np.empty((L, G))
    _pack_sums(s, G, out)
    return s, out


@kernel
def _slot_gpu_rows(w, p, num_gpus, slots, gpus):
    """:func:`_slot_loads` into ``slots`` then :func:`_pack_sums` into ``gpus``; returns
    ``_slot_loads``' answer (``>= 0``: a bad id, ``gpus`` not written)."""
    bad = _slot_loads(w, p, slots)
    if bad < 0:
        _pack_sums(slots, num_gpus, gpus)
    return bad


def layer_marks(gpus: np.ndarray, slots: np.ndarray, lower_bound: np.ndarray, attempted: np.ndarray, hi: float,
                ok_scale: float, eps4: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float,
                                                      float] | None:
    """``(top, mean, gap, code, balancedness, slot_balancedness)`` of GPU loads ``gpus``
    ``[L, G]``, slot loads ``slots`` ``[L, R]`` and a bound ``[L]``, in one kernel pass
    (:func:`_marks`): per layer the busiest GPU, the mean GPU load (numpy's
    ``mean(axis=1)`` bits), :func:`gap`, and ``2`` where ``top <= 0`` or ``lower_bound
    >= top * hi * ok_scale * eps4`` (multiplied in that order), else ``1`` where
    ``attempted``, else ``0`` (``eplb_opt.result``'s statuses, whose constants these
    are); and :func:`balancedness` of both loads (numpy's sums, the same bits).  ``None``
    where a bound exceeds ``top * hi`` (the caller's checked path names it) or ``G`` is
    above 128."""
    L, G = gpus.shape
    if G == 0 or G > 128 or L == 0 or slots.shape[0] != L or slots.shape[1] == 0:
        return None
    top, mean, gap_, code = np.empty(L), np.empty(L), np.empty(L), np.empty(L, dtype=np.int64)
    totals = np.empty(4)
    att = np.ascontiguousarray(attempted, dtype=np.bool_)
    if _marks(writable(np.ascontiguousarray(gpus)), writable(np.ascontiguousarray(slots)),
              writable(np.ascontiguousarray(lower_bound, dtype=np.float64)), writable(att), float(hi),
              float(ok_scale), float(eps4), top, mean, gap_, code, totals):
        return None
    t, m, st, sm = totals.tolist()
    return top, mean, gap_, code, 1.0 if t <= 0 else float(m / t), 1.0 if st <= 0 else float(sm / st)


@kernel
def _marks(gpus, slots, lb, attempted, hi, ok_scale, eps4, top, mean, gap_, code, totals):
    """:func:`layer_marks`' loop; ``totals``: the sums over layers of ``top``, ``mean``
    and the slots' row maxima and means (numpy's pairwise sums, :func:`pairwise_total`);
    returns how many layers have ``lb > top * hi``."""
    L, G = gpus.shape
    R = slots.shape[1]
    stack = np.empty(4 * 64)
    slot_top, slot_mean = np.empty(L), np.empty(L)
    bad = 0
    for l in range(L):
        row = gpus[l]
        t = row[0]
        for g in range(1, G):
            t = max(t, row[g])
        top[l] = t
        mean[l] = (0.0 + pairwise_sum(row, 0, G)) / G
        t_hi = t * hi
        bad += lb[l] > t_hi
        gap_[l] = 1.0 - min(lb[l], t) / t if t > 0 else 0.0
        code[l] = 2 if (t <= 0 or lb[l] >= t_hi * ok_scale * eps4) else (1 if attempted[l] else 0)
        srow = slots[l]
        st = srow[0]
        for s in range(1, R):
            st = max(st, srow[s])
        slot_top[l] = st
        slot_mean[l] = (0.0 + pairwise_total(srow, 0, R, stack)) / R
    totals[0] = 0.0 + pairwise_total(top, 0, L, stack)
    totals[1] = 0.0 + pairwise_total(mean, 0, L, stack)
    totals[2] = 0.0 + pairwise_total(slot_top, 0, L, stack)
    totals[3] = 0.0 + pairwise_total(slot_mean, 0, L, stack)
    return bad


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L, G]`` float64 load of every GPU (GPU ``g`` holds slots ``g*k .. g*k+k-1``)."""
    return slot_gpu_loads(weight, phy2log, num_gpus)[1]


def max_load(loads: np.ndarray) -> np.ndarray:
    """``[L]`` busiest unit (GPU or slot) per layer."""
    return np.asarray(loads).max(axis=1)


def balancedness(loads: np.ndarray) -> float:
    """``sum_l mean_g load / sum_l max_g load`` over ``[L, units]`` loads (1.0 is perfect,
    and 1.0 by convention when every load is zero).  Pass GPU loads for the usual
    figure, slot loads for slot-level balancedness."""
    a = np.asarray(loads, dtype=np.float64)
    top = a.max(axis=1).sum()
    if top <= 0:
        return 1.0
    return float(a.mean(axis=1).sum() / top)


def gap(lower_bound: np.ndarray, max_load: np.ndarray) -> np.ndarray:
    """``[L]`` float64 ``1 - lower_bound / max_load`` per layer: how far a plan's busiest
    GPU is above a bound, as a share of it (0 where ``max_load`` is 0; a bound above the
    max load counts as equal to it, so the gap is never negative).  The one gap formula
    of the package."""
    lb = np.asarray(lower_bound, dtype=np.float64)
    top = np.asarray(max_load, dtype=np.float64)
    return np.where(top > 0, 1.0 - np.minimum(lb, top) / np.where(top > 0, top, 1.0), 0.0)
