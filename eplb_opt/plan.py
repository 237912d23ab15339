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
from .verify_kernels import (
    LOG2PHY_EXPERT,
    LOG2PHY_LAYOUT,
    LOG2PHY_OK,
    LOG2PHY_RANGE,
    checked_maps,
    duplicate_gpus,
    expert_counts,
    group_nodes,
    log2phy_fault,
    masked_mismatches,
    plan_ok,
    slot_maps,
)

__all__ = ["LazyMetadata", "Plan", "derive_maps", "derive_checked_maps", "plan_violations", "verify"]


def derive_maps(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(log2phy [L, E, R - E + 1], logcnt [L, E])`` int64 from ``phy2log [L, R]``.

    ``log2phy[l, e, :logcnt[l, e]]`` lists the slots holding expert ``e`` in increasing
    order; the rest of the row is ``-1``.  Requires ``phy2log < E`` (a larger id raises
    ``ValueError``); a negative id (``-1``) marks an empty slot (a masked GPU's), listed
    nowhere, and a plan with empty slots gets rows of ``R - E`` entries.  A row lists at
    most its width of slots (more only when some expert has no replica).
    """
    p = _int64_c(phy2log)
    L, R = p.shape
    E = int(num_experts)
    log2phy, logcnt, bad = slot_maps(p, E, -1)
    if bad >= 0:
        raise ValueError(f"phy2log[{bad // R}, {bad % R}] = {p.flat[bad]} is not an expert id below {E}")
    return log2phy, logcnt


def derive_checked_maps(phy2log: np.ndarray, num_experts: int, num_gpus: int, *, hierarchical: bool = False,
                        num_groups: int = 1, num_nodes: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`derive_maps` of a plan that :func:`verify` passes (duplicates allowed, its
    ``logcnt`` given), in one kernel call (:func:`~eplb_opt.verify_kernels.checked_maps`);
    ``None`` where the plan or the sizes fail (the caller then runs both for the
    messages)."""
    p = _int64_c(phy2log)
    L, R = p.shape
    E, G, ng, nn = int(num_experts), int(num_gpus), int(num_groups), int(num_nodes)
    if E <= 0 or G <= 0 or R % G or (hierarchical and (ng <= 0 or nn <= 0 or E % ng or ng % nn or R % nn or G % nn)):
        return None
    log2phy, logcnt, ok = checked_maps(p, E, G, E // ng if hierarchical else E, nn if hierarchical else 1,
                                       ng // nn if hierarchical else 1, bool(hierarchical))
    return (log2phy, logcnt) if ok else None


def _int64_c(x: Any) -> np.ndarray:
    """``x`` as a C-contiguous, writable, native int64 array (the layout the kernels of
    :mod:`eplb_opt.verify_kernels` are compiled for; a copy only when ``x`` differs)."""
    if type(x) is np.ndarray and x.dtype == np.int64 and x.flags.c_contiguous and x.flags.writeable:
        return x                                 # the common case, without np.require's own steps
    return np.require(x, dtype=np.int64, requirements=["C", "W"])


class LazyMetadata(Mapping[str, Any]):
    """Read-only plan metadata whose costly entries are computed on first read.

    ``items`` holds every key in order (a pending key's value is a placeholder);
    ``pending`` maps a key to ``(function, args)`` that computes it, from inputs the
    caller no longer changes (a :func:`~eplb_opt.solve` call's private copy of the loads
    for ``input_sha256``, which costs 0.1-0.4 ms that a call whose metadata is never read
    need not pay).  Picklable when the functions are module-level."""

    def __init__(self, items: Mapping[str, Any], pending: Mapping[str, tuple[Any, tuple[Any, ...]]]):
        self._items = dict(items)
        self._pending = dict(pending)

    def __getitem__(self, key: str) -> Any:
        job = self._pending.get(key)
        if job is not None:
            self._items[key] = job[0](*job[1])
            self._pending.pop(key, None)
        return self._items[key]

    def __iter__(self) -> Any:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(dict(self))


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
            metadata=metadata if isinstance(metadata, LazyMetadata) else MappingProxyType(dict(metadata or {})),
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
    # Steps, in order; a step whose failure makes the later ones meaningless returns early.
    try:
        p = _to_np(phy2log, "phy2log")                                   # [L, R]
    except InvalidPlanError as exc:
        return [str(exc)]
    E, R, G = int(num_experts), int(num_replicas), int(num_gpus)
    if p.ndim != 2 or p.shape[1] != R or (num_layers is not None and p.shape[0] != num_layers):
        want = f"[{num_layers if num_layers is not None else 'L'}, {R}]"
        return [f"phy2log has shape {tuple(p.shape)}, expected {want}"]
    p = _int64_c(p)
    if masked is None and log2phy is None and _passes(p, E, G, hierarchical, int(num_groups), int(num_nodes),
                                                      allow_duplicates, logcnt):
        return []
    out: list[str] = []
    if G <= 0 or R % G:
        out.append(f"{R} slots cannot give every one of {G} GPUs the same slot count")
    empty = np.zeros(p.shape, dtype=bool)                                # [L, R] masked slots
    if masked is not None:
        empty, wrong = _masked_violations(p, masked, G, limit)
        if empty is None:
            return out + wrong
        hierarchical = False
    cnt, bad_id = _expert_id_violation(p, empty, E)                      # [L, E] replicas
    if bad_id:
        return out + [bad_id]
    out += [f"layer {l}: expert {e} has no replica" for l, e in np.argwhere(cnt == 0)[:limit]]
    if not allow_duplicates and not out and G > 0 and R % G == 0:
        out += _duplicate_violations(p, empty, G, E, limit)
    if hierarchical and not out:
        out += _hierarchy_violations(p, E, G, int(num_groups), int(num_nodes), limit)
    if logcnt is not None:
        out += _logcnt_violations(logcnt, cnt)
    if log2phy is not None:
        out += _log2phy_violations(log2phy, p, cnt, empty)
    return out


def _passes(p: np.ndarray, E: int, G: int, hierarchical: bool, ng: int, nn: int, allow_duplicates: bool,
            logcnt: Any) -> bool:
    """The common case in one pass (:func:`~eplb_opt.verify_kernels.plan_ok`): ``True``
    when ``p`` (``[L, R]`` int64, no mask) breaks no rule :func:`plan_violations`
    checks; ``False`` also whenever the sizes or ``logcnt`` are such that only the
    rule-by-rule checks can say what is wrong."""
    L, R = p.shape
    if E <= 0 or G <= 0 or R % G:
        return False
    if hierarchical and (ng <= 0 or nn <= 0 or E % ng or ng % nn or R % nn or G % nn):
        return False
    cnt = _NO_COUNTS
    if logcnt is not None:
        try:
            cnt = _int64_c(_to_np(logcnt, "logcnt"))
        except InvalidPlanError:
            return False
        if cnt.shape != (L, E):
            return False
    return bool(plan_ok(p, E, G, E // ng if hierarchical else E, nn if hierarchical else 1,
                        ng // nn if hierarchical else 1, bool(hierarchical), bool(allow_duplicates), cnt,
                        logcnt is not None))


_NO_COUNTS = np.zeros((1, 1), dtype=np.int64)


def _masked_violations(p: np.ndarray, masked: Any, G: int, limit: int) -> tuple[np.ndarray | None, list[str]]:
    """``(empty [L, R] bool, [])``: the slots of the GPUs that ``masked`` (``[L, G]``)
    marks, when ``p`` (``[L, R]``) has exactly those empty (``-1``); else ``(None,
    messages)``: where they disagree (up to ``limit``), or ``masked``'s wrong shape."""
    L, R = p.shape
    mk = np.asarray(masked, dtype=bool)
    if mk.shape != (L, G) or R % G:
        return None, [f"masked has shape {tuple(mk.shape)}, expected {(L, G)}"]
    empty, wrong, total = masked_mismatches(p, np.require(mk, requirements=["C", "W"]), int(limit))
    out = []
    for l, s in wrong:
        what = "is empty but its GPU is not masked" if p[l, s] == -1 else "holds an expert on a masked GPU"
        out.append(f"layer {l}: slot {s} {what}")
    return (None, out) if total else (empty, out)


def _expert_id_violation(p: np.ndarray, empty: np.ndarray, E: int) -> tuple[np.ndarray, str | None]:
    """``(cnt [L, E], message)``: the replicas of every expert in ``p`` (``[L, R]``) outside
    ``empty``, and a message naming the first such slot whose id is not in ``[0, E)``
    (``None`` when every id is; ``cnt`` is incomplete otherwise)."""
    cnt, bad = expert_counts(p, empty, E)
    if bad >= 0:
        l, s = divmod(int(bad), p.shape[1])
        return cnt, f"phy2log[{l}, {s}] = {p[l, s]} is not an expert id in [0, {E})"
    return cnt, None


def _duplicate_violations(p: np.ndarray, empty: np.ndarray, G: int, E: int, limit: int) -> list[str]:
    """A message per (layer, unmasked GPU) of ``p`` (``[L, R]``, ``G`` dividing ``R``)
    holding two replicas of one expert."""
    twice, _ = duplicate_gpus(p, empty, G, E, int(limit))
    return [f"layer {l}: GPU {g} holds two replicas of one expert (duplicates not allowed)" for l, g in twice]


def _hierarchy_violations(p: np.ndarray, E: int, G: int, ng: int, nn: int, limit: int) -> list[str]:
    """The hierarchical policy's rules on ``p`` (``[L, R]``, valid ids): the sizes divide,
    every group of ``E / ng`` experts lies on one node and every node holds ``ng / nn``
    groups."""
    R = p.shape[1]
    if ng <= 0 or nn <= 0 or E % ng or ng % nn or R % nn or G % nn:
        return [f"hierarchical sizes do not divide: E={E}, groups={ng}, nodes={nn}, GPUs={G}, R={R}"]
    out = []
    present = group_nodes(p, E // ng, ng, nn)                           # [L, groups, nodes]
    nodes_per_group = present.sum(axis=2)
    for l, g in np.argwhere(nodes_per_group != 1)[:limit]:
        out.append(f"layer {l}: group {g} is split across nodes {np.flatnonzero(present[l, g]).tolist()}")
    groups_per_node = present.sum(axis=1)
    for l, n in np.argwhere(groups_per_node != ng // nn)[:limit]:
        out.append(f"layer {l}: node {n} holds {groups_per_node[l, n]} groups, expected {ng // nn}")
    return out


def _logcnt_violations(logcnt: Any, cnt: np.ndarray) -> list[str]:
    """Whether a given ``logcnt`` equals the counts ``cnt`` (``[L, E]``) of ``phy2log``."""
    try:
        c = _to_np(logcnt, "logcnt")
    except InvalidPlanError as exc:
        return [str(exc)]
    L, E = cnt.shape
    if c.shape != (L, E):
        return [f"logcnt has shape {tuple(c.shape)}, expected {(L, E)}"]
    if not np.array_equal(c, cnt):
        l, e = np.argwhere(c != cnt)[0]
        return [f"logcnt[{l}, {e}] = {c[l, e]} but phy2log holds {cnt[l, e]} replicas"]
    return []


def _log2phy_violations(log2phy: Any, p: np.ndarray, cnt: np.ndarray, empty: np.ndarray) -> list[str]:
    """Whether a given ``log2phy`` (``[L, E, X]``) lists, for every expert, exactly the
    slots of ``p`` (``[L, R]``) holding it first in each row (``cnt`` ``[L, E]`` of them)
    and ``-1`` after, every non-``empty`` slot once."""
    try:
        m = _to_np(log2phy, "log2phy")
    except InvalidPlanError as exc:
        return [str(exc)]
    (L, E), R = cnt.shape, p.shape[1]
    if m.ndim != 3 or m.shape[:2] != (L, E) or m.shape[2] < cnt.max(initial=0):
        return [f"log2phy has shape {tuple(m.shape)}, expected ({L}, {E}, >= max count)"]
    fault = log2phy_fault(_int64_c(m), p, cnt, empty)
    if fault == LOG2PHY_OK:
        return []
    return [{
        LOG2PHY_LAYOUT: "log2phy: valid entries must be the first logcnt of each row, the rest -1",
        LOG2PHY_RANGE: f"log2phy holds a slot id >= {R}",
        LOG2PHY_EXPERT: "log2phy points at a slot that holds another expert",
    }.get(int(fault), "log2phy does not list every slot exactly once")]


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
