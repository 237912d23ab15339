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

from .errors import InvalidProblemError, InvalidTypeError

__all__ = ["as_mask", "compact_previous", "embed", "groups_by_active", "lower_bound"]


def as_mask(masked_gpus: Any, num_layers: int, num_gpus: int, slots_per_gpu: int, num_experts: int) -> np.ndarray:
    """``[L, G]`` bool from ``masked_gpus``: a list of GPU ids (all layers), a ``[G]`` or
    ``[L, G]`` bool array, or a length-``L`` list of GPU-id lists.  Every layer must keep
    enough active GPUs for one replica per expert."""
    L, G = num_layers, num_gpus
    try:
        import torch

        if isinstance(masked_gpus, torch.Tensor):
            masked_gpus = masked_gpus.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(masked_gpus, (str, bytes)) or np.isscalar(masked_gpus):
        raise InvalidTypeError(f"masked_gpus must be GPU ids or a bool mask, got {masked_gpus!r}")
    arr = np.asarray(masked_gpus, dtype=object) if isinstance(masked_gpus, list) else np.asarray(masked_gpus)
    mask = np.zeros((L, G), dtype=bool)
    if arr.dtype == bool:
        if arr.shape == (G,):
            mask[:] = arr
        elif arr.shape == (L, G):
            mask = arr.copy()
        else:
            raise InvalidProblemError(f"masked_gpus bool mask has shape {arr.shape}, expected ({G},) or ({L}, {G})")
    elif isinstance(masked_gpus, (list, tuple)) and len(masked_gpus) == L and L > 0 and all(
            isinstance(x, (list, tuple, np.ndarray)) for x in masked_gpus):
        for l, ids in enumerate(masked_gpus):
            mask[l, _ids(ids, G)] = True
    else:
        mask[:, _ids(masked_gpus, G)] = True
    active = G - mask.sum(axis=1)
    bad = np.flatnonzero(active * slots_per_gpu < num_experts)
    if bad.size:
        l = int(bad[0])
        raise InvalidProblemError(
            f"masked_gpus leaves layer {l} {int(active[l])} active GPU(s) x {slots_per_gpu} slots, fewer than "
            f"the {num_experts} experts"
        )
    return mask


def _ids(ids: Any, G: int) -> np.ndarray:
    a = np.asarray(ids)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise InvalidTypeError(f"masked_gpus must list integer GPU ids, got {ids!r}")
    if a.min() < 0 or a.max() >= G:
        raise InvalidProblemError(f"masked_gpus holds GPU id {int(a.min() if a.min() < 0 else a.max())}, "
                                  f"not in [0, {G})")
    return a.astype(np.int64)


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
