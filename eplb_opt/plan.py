"""Placements: the :class:`Plan` container, derived maps, and the independent verifier.

Glossary (as in vLLM's EPLB docs): a *logical* expert is one of the model's ``E``
experts; a *physical* expert (slot, replica) is one of the ``R`` copies actually held
by GPUs; ``R - E`` of them are *redundant*.  GPU ``g`` holds physical slots
``g * k .. g * k + k - 1`` with ``k = R / G``.  Example: ``E = 4``, ``R = 6``, ``G = 2``:
``phy2log = [[0, 3, 1,  2, 0, 3]]`` puts experts 0, 3, 1 on GPU 0 and 2, 0, 3 on GPU 1;
experts 0 and 3 have two replicas each (``logcnt = [[2, 1, 1, 2]]``) and
``log2phy[0, 0] = [0, 4, -1]``.

``phy2log`` is the source of truth; ``logcnt`` and ``log2phy`` are derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import torch

from .errors import InvalidPlanError

__all__ = ["Plan", "derive_maps", "plan_violations", "verify"]


def derive_maps(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(log2phy [L, E, R - E + 1], logcnt [L, E])`` int64 from ``phy2log [L, R]``.

    ``log2phy[l, e, :logcnt[l, e]]`` lists the slots holding expert ``e`` in increasing
    order; the rest of the row is ``-1``.  Requires ``phy2log < E``; ``-1`` marks an
    empty slot (a masked GPU's), listed nowhere.
    """
    p = np.asarray(phy2log, dtype=np.int64)
    L, R = p.shape
    E = int(num_experts)
    if (p < 0).any():
        # Empty slots become a sentinel expert E, dropped from the maps.
        log2phy, logcnt = derive_maps(np.where(p < 0, E, p), E + 1)
        return log2phy[:, :E, : R - E + 1], logcnt[:, :E]
    width = R - E + 1
    # One flat pass over all layers: global expert ids, slots grouped by expert with a
    # stable sort (radix sort for 16-bit keys), rank of each slot within its expert.
    g = (p + (np.arange(L) * E)[:, None]).ravel()
    cnt = np.bincount(g, minlength=L * E)
    if L * E <= np.iinfo(np.int16).max:
        order = np.argsort(g.astype(np.int16), kind="stable")
    else:
        order = np.argsort(g, kind="stable")
    sorted_g = g[order]
    start = np.cumsum(cnt) - cnt
    rank = np.arange(L * R) - start[sorted_g]
    log2phy = np.full(L * E * width, -1, dtype=np.int64)
    log2phy[sorted_g * width + rank] = order % R
    return log2phy.reshape(L, E, width), cnt.reshape(L, E)


@dataclass(frozen=True)
class Plan:
    """An expert placement for every layer.

    Attributes:
        phy2log: ``[L, R]`` torch.int64 (CPU): logical expert held by each physical slot.
        num_experts: ``E``.

    ``log2phy`` (``[L, E, R - E + 1]``, padded with -1) and ``logcnt`` (``[L, E]``) are
    derived on first access and cached, both torch.int64 on CPU.
    """

    phy2log: torch.Tensor
    num_experts: int
    _np: np.ndarray = field(repr=False, compare=False)
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_numpy(cls, phy2log: np.ndarray, num_experts: int, metadata: Mapping[str, Any] | None = None) -> Plan:
        """A plan from a ``[L, R]`` placement; ``metadata`` (JSON-able) travels with it
        into plan files (see :meth:`save`)."""
        arr = np.ascontiguousarray(phy2log, dtype=np.int64)
        arr.setflags(write=False)
        return cls(
            phy2log=torch.from_numpy(arr.copy()), num_experts=int(num_experts), _np=arr,
            metadata=MappingProxyType(dict(metadata or {})),
        )

    def save(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write the plan to ``path`` (``.json``, ``.pt`` or ``.npz``, by suffix) in the
        versioned plan-file schema (:mod:`eplb_opt.planfile`): ``phy2log``, ``log2phy``,
        ``logcnt`` and the metadata.  The write is atomic: a failure never leaves a
        partial file and never replaces an existing one."""
        from .planfile import save_plan

        return save_plan(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file written by :meth:`save`; the maps are checked against
        ``phy2log``.  Raises :class:`~eplb_opt.planfile.PlanFileError` on an unknown
        schema version, a corrupt file or inconsistent maps."""
        from .planfile import load_plan

        return load_plan(path)

    @cached_property
    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        return derive_maps(self._np, self.num_experts)

    @property
    def log2phy(self) -> torch.Tensor:
        """``[L, E, R - E + 1]`` int64: slots of each expert, padded with -1."""
        return torch.from_numpy(self._maps[0])

    @property
    def logcnt(self) -> torch.Tensor:
        """``[L, E]`` int64: replica count of each expert."""
        return torch.from_numpy(self._maps[1])

    @property
    def num_layers(self) -> int:
        """``L``, layers in the plan."""
        return int(self._np.shape[0])

    @property
    def num_replicas(self) -> int:
        """``R``, physical expert slots per layer."""
        return int(self._np.shape[1])

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(phy2log, log2phy, logcnt)`` as int64 numpy arrays (copies)."""
        log2phy, logcnt = self._maps
        return self._np.copy(), log2phy.copy(), logcnt.copy()

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(phy2log, log2phy, logcnt)`` as DeepSeek's ``rebalance_experts`` returns."""
        return self.phy2log, self.log2phy, self.logcnt


def _to_np(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise InvalidPlanError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def plan_violations(
    phy2log: Any,
    num_experts: int,
    num_replicas: int,
    num_gpus: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    hierarchical: bool = False,
    log2phy: Any = None,
    logcnt: Any = None,
    num_layers: int | None = None,
    allow_duplicates: bool = True,
    limit: int = 10,
    masked: Any = None,
) -> list[str]:
    """Every broken invariant of a placement, as short messages (empty when valid).

    Checks, from the arrays alone: the shape ``[L, R]``; integer expert ids in
    ``[0, E)``; at least one replica per expert; ``R`` a multiple of the GPU count
    (exactly ``k = R / G`` slots per GPU); under the hierarchical policy, all replicas
    of a group on one node and exactly ``num_groups / num_nodes`` groups per node (so
    each node holds ``R / N`` replicas of its own experts); and, when given, that
    ``logcnt`` and ``log2phy`` agree with ``phy2log``; with ``allow_duplicates=False``,
    that no GPU holds two replicas of one expert.  With ``masked`` (``[L, G]`` bool),
    exactly the masked GPUs' slots are empty (``-1``) and the others hold experts
    (hierarchical rules are not checked then: masked plans use the global policy).
    """
    out: list[str] = []
    try:
        p = _to_np(phy2log, "phy2log")
    except InvalidPlanError as exc:
        return [str(exc)]
    E, R, G = int(num_experts), int(num_replicas), int(num_gpus)
    if p.ndim != 2 or p.shape[1] != R or (num_layers is not None and p.shape[0] != num_layers):
        want = f"[{num_layers if num_layers is not None else 'L'}, {R}]"
        return [f"phy2log has shape {tuple(p.shape)}, expected {want}"]
    L = p.shape[0]
    if G <= 0 or R % G:
        out.append(f"{R} slots cannot give every one of {G} GPUs the same slot count")
    empty = np.zeros(p.shape, dtype=bool)
    if masked is not None:
        mk = np.asarray(masked, dtype=bool)
        if mk.shape != (L, G) or R % G:
            return out + [f"masked has shape {tuple(mk.shape)}, expected {(L, G)}"]
        empty = np.repeat(mk, R // G, axis=1)
        wrong = np.argwhere(empty != (p == -1))
        for l, s in wrong[:limit]:
            what = "is empty but its GPU is not masked" if p[l, s] == -1 else "holds an expert on a masked GPU"
            out.append(f"layer {l}: slot {s} {what}")
        if wrong.size:
            return out
        hierarchical = False
    real = p[~empty]
    lo, hi = (int(real.min()), int(real.max())) if real.size else (0, 0)
    if lo < 0 or hi >= E:
        bad = np.argwhere(((p < 0) | (p >= E)) & ~empty)[0]
        return out + [
            f"phy2log[{bad[0]}, {bad[1]}] = {p[bad[0], bad[1]]} is not an expert id in [0, {E})"
        ]
    keys = (p + (np.arange(L) * E)[:, None])[~empty]
    cnt = np.bincount(keys, minlength=L * E).reshape(L, E)
    missing = np.argwhere(cnt == 0)
    for l, e in missing[:limit]:
        out.append(f"layer {l}: expert {e} has no replica")
    if not allow_duplicates and not out and G > 0 and R % G == 0:
        per_gpu = np.sort(p.reshape(L, G, R // G), axis=2)
        twice = np.argwhere((per_gpu[:, :, 1:] == per_gpu[:, :, :-1]).any(axis=2)
                            & ~empty.reshape(L, G, R // G)[:, :, 0])
        for l, g in twice[:limit]:
            out.append(f"layer {l}: GPU {g} holds two replicas of one expert (duplicates not allowed)")
    if hierarchical and not out:
        ng, nn = int(num_groups), int(num_nodes)
        if ng <= 0 or nn <= 0 or E % ng or ng % nn or R % nn or G % nn:
            out.append(f"hierarchical sizes do not divide: E={E}, groups={ng}, nodes={nn}, GPUs={G}, R={R}")
        else:
            node_of_slot = np.arange(R) // (R // nn)
            group = p // (E // ng)
            key = ((np.arange(L)[:, None] * ng + group) * nn + node_of_slot).ravel()
            present = np.bincount(key, minlength=L * ng * nn).reshape(L, ng, nn) > 0
            nodes_per_group = present.sum(axis=2)
            for l, g in np.argwhere(nodes_per_group != 1)[:limit]:
                out.append(
                    f"layer {l}: group {g} is split across nodes {np.flatnonzero(present[l, g]).tolist()}"
                )
            groups_per_node = present.sum(axis=1)
            for l, n in np.argwhere(groups_per_node != ng // nn)[:limit]:
                out.append(f"layer {l}: node {n} holds {groups_per_node[l, n]} groups, expected {ng // nn}")
    if logcnt is not None:
        try:
            c = _to_np(logcnt, "logcnt")
        except InvalidPlanError as exc:
            out.append(str(exc))
        else:
            if c.shape != (L, E):
                out.append(f"logcnt has shape {tuple(c.shape)}, expected {(L, E)}")
            elif not np.array_equal(c, cnt):
                l, e = np.argwhere(c != cnt)[0]
                out.append(f"logcnt[{l}, {e}] = {c[l, e]} but phy2log holds {cnt[l, e]} replicas")
    if log2phy is not None:
        try:
            m = _to_np(log2phy, "log2phy")
        except InvalidPlanError as exc:
            out.append(str(exc))
        else:
            if m.ndim != 3 or m.shape[:2] != (L, E) or m.shape[2] < cnt.max(initial=0):
                out.append(f"log2phy has shape {tuple(m.shape)}, expected ({L}, {E}, >= max count)")
            else:
                X = m.shape[2]
                prefix = np.arange(X)[None, None, :] < cnt[:, :, None]
                if not np.array_equal(m >= 0, prefix) or (~prefix & (m != -1)).any():
                    out.append("log2phy: valid entries must be the first logcnt of each row, the rest -1")
                else:
                    slots = m[prefix]
                    layer = np.broadcast_to(np.arange(L)[:, None, None], m.shape)[prefix]
                    expert = np.broadcast_to(np.arange(E)[None, :, None], m.shape)[prefix]
                    if (slots >= R).any():
                        out.append(f"log2phy holds a slot id >= {R}")
                    elif not np.array_equal(p[layer, slots], expert):
                        out.append("log2phy points at a slot that holds another expert")
                    elif (np.bincount(layer * R + slots, minlength=L * R) != (~empty).ravel()).any():
                        out.append("log2phy does not list every slot exactly once")
    return out


def verify(
    phy2log: Any,
    num_experts: int,
    num_replicas: int,
    num_gpus: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    hierarchical: bool = False,
    log2phy: Any = None,
    logcnt: Any = None,
    num_layers: int | None = None,
    allow_duplicates: bool = True,
    masked: Any = None,
) -> None:
    """Raise :class:`InvalidPlanError` listing the broken invariants of a placement
    (see :func:`plan_violations`); return ``None`` when it is valid."""
    problems = plan_violations(
        phy2log,
        num_experts,
        num_replicas,
        num_gpus,
        num_groups=num_groups,
        num_nodes=num_nodes,
        hierarchical=hierarchical,
        log2phy=log2phy,
        logcnt=logcnt,
        num_layers=num_layers,
        allow_duplicates=allow_duplicates,
        masked=masked,
    )
    if problems:
        raise InvalidPlanError("invalid placement: " + "; ".join(problems))
