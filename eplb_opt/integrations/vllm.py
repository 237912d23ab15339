"""eplb-opt as a vLLM EPLB policy (vLLM 0.33's ``AbstractEplbPolicy`` contract).

Usage, in the process that builds the engine (before EPLB first rebalances)::

    from eplb_opt.integrations import vllm as eplb_vllm
    eplb_vllm.install(mode="exact", time_limit=2.0)   # or configure through the environment

vLLM looks its policy up in ``vllm.distributed.eplb.policy.EPLB_POLICIES`` by the name in
its parallel config, a ``Literal`` that only admits ``"default"``, and asserts that the
registry keys equal that literal, so a new name cannot be registered: :func:`install`
replaces the ``"default"`` entry instead.

:class:`EplbOptPolicy` implements ``rebalance_experts(weight, num_replicas, num_groups,
num_nodes, num_ranks, old_global_expert_indices=None) -> phy2log`` (``[L, R]`` int64 on
CPU).  With ``old_global_expert_indices`` (the placement deployed now, ``[L, R]``), the new
plan's nodes and GPUs are matched to the old ones and replicas that stay on a GPU keep
their slot (:func:`eplb_opt.align.align_to_previous`), so only replicas that change GPU
move weights; on an unchanged load nothing moves.

Settings come from :meth:`EplbOptPolicy.configure` or, where not set there, from the
environment: ``EPLB_OPT_MODE`` (``heuristic``/``exact``), ``EPLB_OPT_TIME_LIMIT``
(seconds), ``EPLB_OPT_SEED``, ``EPLB_OPT_POLICY`` (``auto``/``hierarchical``/``global``),
``EPLB_OPT_DETERMINISTIC`` (``1``/``0``), ``EPLB_OPT_WORKERS``, ``EPLB_OPT_MAX_BALANCE_LOSS``
and ``EPLB_OPT_NODE_MOVE_COST``.  With ``max_balance_loss`` set, a rebalance plans
migration-aware from the deployed placement (:func:`eplb_opt.solve` with ``previous``):
each layer may give up that fraction of max load to move fewer expert weights.

The module imports without vLLM; where vLLM is importable the class subclasses vLLM's
real ``AbstractEplbPolicy``.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from ..errors import InvalidProblemError

__all__ = ["EplbOptPolicy", "install", "settings"]

try:  # pragma: no cover - depends on whether vLLM is installed
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy as _Base
except Exception:  # noqa: BLE001 - any failure to import vLLM: use the same contract locally

    class _Base(ABC):  # type: ignore[no-redef]
        """Stand-in with vLLM 0.33's ``AbstractEplbPolicy`` contract."""

        @classmethod
        @abstractmethod
        def rebalance_experts(
            cls,
            weight: torch.Tensor,
            num_replicas: int,
            num_groups: int,
            num_nodes: int,
            num_ranks: int,
            old_global_expert_indices: torch.Tensor | None = None,
        ) -> torch.Tensor:
            raise NotImplementedError


_ENV = {
    "mode": ("EPLB_OPT_MODE", str),
    "time_limit": ("EPLB_OPT_TIME_LIMIT", float),
    "seed": ("EPLB_OPT_SEED", int),
    "policy": ("EPLB_OPT_POLICY", str),
    "deterministic": ("EPLB_OPT_DETERMINISTIC", lambda v: v.strip().lower() in ("1", "true", "yes", "on")),
    "workers": ("EPLB_OPT_WORKERS", int),
    "max_balance_loss": ("EPLB_OPT_MAX_BALANCE_LOSS", float),
    "node_move_cost": ("EPLB_OPT_NODE_MOVE_COST", float),
}
_DEFAULTS: dict[str, Any] = {"mode": "heuristic", "time_limit": None, "seed": 0, "policy": "auto",
                             "deterministic": False, "workers": None, "max_balance_loss": None,
                             "node_move_cost": 4.0}


def settings(explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Effective settings: explicit ones, else the environment, else the defaults."""
    out = dict(_DEFAULTS)
    for key, (var, conv) in _ENV.items():
        raw = os.environ.get(var)
        if raw is not None and raw != "":
            try:
                out[key] = conv(raw)
            except ValueError:
                raise InvalidProblemError(f"environment variable {var}={raw!r} is not a valid {key}") from None
    for key, val in (explicit or {}).items():
        if key not in _DEFAULTS:
            raise InvalidProblemError(f"unknown setting {key!r}; expected one of {sorted(_DEFAULTS)}")
        if val is not None:
            out[key] = val
    return out


class EplbOptPolicy(_Base):
    """vLLM EPLB policy backed by :func:`eplb_opt.solve` (see module docs)."""

    _config: dict[str, Any] = {}

    @classmethod
    def configure(cls, **config: Any) -> type["EplbOptPolicy"]:
        """Set ``mode``, ``time_limit``, ``seed``, ``policy``, ``deterministic``,
        ``workers``, ``max_balance_loss`` or ``node_move_cost`` (unset ones fall back to
        the environment, then the defaults); returns the class."""
        settings(config)  # validates the names and the environment
        cls._config = {k: v for k, v in config.items() if v is not None}
        return cls

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New physical-to-logical map ``[L, R]`` (int64, CPU) for ``weight`` ``[L, E]``.

        ``num_ranks`` is the number of GPUs.  With ``old_global_expert_indices`` (the
        deployed ``[L, R]`` physical-to-logical map, which is what vLLM 0.33 passes; its
        docstring says ``[layers, num_logical_experts]``) the result is relabelled to move
        as few weights as possible; ``-1`` entries are empty slots.  An old map of another
        shape (the slot count changed) cannot be matched: a warning says so."""
        from ..align import align_to_previous
        from ..api import solve

        cfg = settings(cls._config)
        kw = dict(
            num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_ranks,
            mode=cfg["mode"], time_limit=cfg["time_limit"], seed=cfg["seed"], policy=cfg["policy"],
            deterministic=cfg["deterministic"], workers=cfg["workers"],
        )
        old = None
        if old_global_expert_indices is not None:
            old = _old_map(old_global_expert_indices, weight)
        migrate = (cfg["max_balance_loss"] is not None and old is not None and old.ndim == 2
                   and old.shape[1] == num_replicas and (old >= 0).all())
        if migrate:
            result = solve(weight, **kw, previous=old, max_balance_loss=cfg["max_balance_loss"],
                           node_move_cost=cfg["node_move_cost"])
            return torch.from_numpy(result.plan.to_numpy()[0]).to(torch.int64)
        result = solve(weight, **kw)
        p2l = result.plan.to_numpy()[0]
        if old is not None:
            if old.shape == p2l.shape:
                # Empty slots (-1, elastic scaling) match no expert.
                old = np.where(old < 0, p2l.max() + 1, old)
                nodes = num_nodes if result.policy == "hierarchical" else 1
                p2l = align_to_previous(p2l, old, num_ranks, nodes)
            else:
                warnings.warn(
                    f"eplb-opt: old_global_expert_indices has shape {tuple(old.shape)}, the new plan "
                    f"{tuple(p2l.shape)} (the number of slots changed); every replica is placed afresh",
                    RuntimeWarning, stacklevel=2,
                )
        return torch.from_numpy(p2l).to(torch.int64)


def _old_map(old_global_expert_indices: Any, weight: Any) -> np.ndarray:
    """The deployed map as int64, checked: integer ids in ``[-1, E)`` (``-1`` empty)."""
    from ..errors import InvalidProblemError, InvalidTypeError

    try:
        old = torch.as_tensor(old_global_expert_indices).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidTypeError(f"old_global_expert_indices could not be read as a tensor: {exc}") from None
    if old.dtype.is_floating_point or old.dtype.is_complex or old.dtype == torch.bool:
        raise InvalidTypeError(f"old_global_expert_indices must hold integer expert ids, got {old.dtype}")
    old = old.numpy().astype(np.int64)
    num_experts = int(weight.shape[-1]) if hasattr(weight, "shape") and len(weight.shape) else None
    if num_experts is not None and old.size and (old.min() < -1 or old.max() >= num_experts):
        bad = old[(old < -1) | (old >= num_experts)].flat[0]
        raise InvalidProblemError(
            f"old_global_expert_indices holds expert id {int(bad)}, outside [-1, {num_experts}) "
            "(-1 marks an empty slot)"
        )
    return old


def install(**config: Any) -> type[EplbOptPolicy]:
    """Configure :class:`EplbOptPolicy` and put it in vLLM's policy registry as
    ``"default"`` (vLLM admits no other name); returns the class.

    Raises:
        ImportError: vLLM is not importable here.
    """
    import vllm.distributed.eplb.policy as registry  # noqa: PLC0415 - only when installing

    policy = EplbOptPolicy.configure(**config)
    registry.EPLB_POLICIES["default"] = policy
    return policy
