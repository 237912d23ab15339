"""eplb-opt as a vLLM EPLB policy (vLLM 0.33's ``AbstractEplbPolicy`` contract).

Two ways in, both explicit:

* **Plugin** (nothing to patch): installing eplb-opt registers the ``vllm.general_plugins``
  entry point ``eplb_opt`` -> :func:`register`, which vLLM calls in every process that
  builds an engine (front end, engine core, workers).  It does nothing unless
  ``EPLB_OPT_VLLM=1``; then it puts :class:`EplbOptPolicy` in vLLM's policy registry with
  settings from the environment and logs one line saying so.  ``VLLM_PLUGINS`` is vLLM's
  allow-list of plugin names: when you set it, include ``eplb_opt``.
* **In code**, in the process that builds the engine (before EPLB first rebalances)::

      from eplb_opt.integrations import vllm as eplb_vllm
      eplb_vllm.install(mode="exact", time_limit=2.0)

vLLM looks its policy up in ``vllm.distributed.eplb.policy.EPLB_POLICIES`` by the name in
its parallel config, a ``Literal`` that only admits ``"default"``, and asserts that the
registry keys equal that literal, so a new name cannot be registered: :func:`install`
and :func:`register` replace the ``"default"`` entry instead.

**Same plan on every rank.**  vLLM calls ``policy.rebalance_experts(...)`` on every EP
rank separately and never broadcasts the result, so the policy runs
:func:`eplb_opt.solve` with ``deterministic=True`` by default: ``time_limit`` is then a
deterministic budget (iterations and CP-SAT deterministic time units, roughly seconds,
but independent of the machine, its load and the clock; the wall time only approximates
it) and ``workers`` defaults to 1.  Exact mode with ``deterministic=False``
(``EPLB_OPT_DETERMINISTIC=0``) raises :class:`~eplb_opt.errors.InvalidProblemError`;
heuristic mode is deterministic either way.

:class:`EplbOptPolicy` implements ``rebalance_experts(weight, num_replicas, num_groups,
num_nodes, num_ranks, old_global_expert_indices=None) -> phy2log`` (``[L, R]`` int64 on
CPU).  With ``old_global_expert_indices`` (the placement deployed now, ``[L, R]``), the new
plan's nodes and GPUs are matched to the old ones and replicas that stay on a GPU keep
their slot (:func:`eplb_opt.align.align_to_previous`), so only replicas that change GPU
move weights; on an unchanged load nothing moves.

Settings come from :meth:`EplbOptPolicy.configure` (or :func:`install`) or, where not set
there, from the environment: ``EPLB_OPT_MODE`` (``heuristic``/``exact``, default
heuristic), ``EPLB_OPT_TIME_LIMIT`` (the budget; default 10 in exact mode),
``EPLB_OPT_SEED``, ``EPLB_OPT_POLICY`` (``auto``/``hierarchical``/``global``),
``EPLB_OPT_DETERMINISTIC`` (``1``/``0``, default 1), ``EPLB_OPT_WORKERS`` (CP-SAT threads;
the plan depends on it, so use the same value on every rank),
``EPLB_OPT_MAX_BALANCE_LOSS`` and ``EPLB_OPT_NODE_MOVE_COST``.  With ``max_balance_loss``
set, a rebalance plans migration-aware from the deployed placement
(:func:`eplb_opt.solve` with ``previous``): each layer may give up that fraction of max
load to move fewer expert weights.

The module imports without vLLM; where vLLM is importable the class subclasses vLLM's
real ``AbstractEplbPolicy``.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from . import engine_env

__all__ = ["EplbOptPolicy", "install", "register", "settings"]

# A child of vLLM's "vllm" logger, so that vLLM's own handler prints our lines.
_log = logging.getLogger("vllm.eplb_opt")

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


_DEFAULTS: dict[str, Any] = {"mode": "heuristic", "time_limit": None, "seed": 0, "policy": "auto",
                             "deterministic": True, "workers": None, "max_balance_loss": None,
                             "node_move_cost": 4.0}
_ENGINE = "vLLM"


def settings(explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Effective settings: explicit ones, else the environment (``EPLB_OPT_*``), else the
    defaults (heuristic mode, ``deterministic=True``).

    Raises:
        InvalidProblemError: an unknown setting, an environment value that does not
            parse, or exact mode with ``deterministic=False`` (each EP rank would compute
            a different plan; see the module docs)."""
    return engine_env.resolve(explicit, _DEFAULTS, _ENGINE)[0]


class EplbOptPolicy(_Base):
    """vLLM EPLB policy backed by :func:`eplb_opt.solve` (see module docs)."""

    _config: dict[str, Any] = {}

    @classmethod
    def configure(cls, **config: Any) -> type["EplbOptPolicy"]:
        """Set ``mode``, ``time_limit``, ``seed``, ``policy``, ``deterministic`` (default
        True), ``workers``, ``max_balance_loss`` or ``node_move_cost`` (unset ones fall
        back to the environment, then the defaults); returns the class.

        Raises:
            InvalidProblemError: an unknown setting, a bad environment value, or
                ``mode="exact"`` with ``deterministic=False``."""
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


def _registry() -> Any:
    """vLLM's policy registry dict, checked for the layout this module was written for."""
    import vllm.distributed.eplb.policy as registry  # noqa: PLC0415 - only when installing

    policies = getattr(registry, "EPLB_POLICIES", None)
    if not hasattr(policies, "__setitem__") or not hasattr(policies, "get") or "default" not in policies:
        raise RuntimeError(
            "vLLM's EPLB policy registry is not laid out as eplb-opt expects (vLLM 0.33: a dict "
            "vllm.distributed.eplb.policy.EPLB_POLICIES with a 'default' entry); found "
            f"EPLB_POLICIES={policies!r} in {getattr(registry, '__file__', registry)!r}"
        )
    return policies


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def install(**config: Any) -> type[EplbOptPolicy]:
    """Configure :class:`EplbOptPolicy` and put it in vLLM's policy registry as
    ``"default"`` (vLLM admits no other name); returns the class.  Settings not given
    here come from ``EPLB_OPT_*``, then the defaults (``deterministic=True``).

    Raises:
        ImportError: vLLM is not importable here.
        RuntimeError: vLLM's policy registry is laid out differently from vLLM 0.33's.
        InvalidProblemError: bad settings, or ``mode="exact"`` with ``deterministic=False``.
    """
    policies = _registry()
    policy = EplbOptPolicy.configure(**config)
    policies["default"] = policy
    return policy


def register() -> type[EplbOptPolicy] | None:
    """The ``vllm.general_plugins`` entry point (``eplb_opt``), which vLLM calls in every
    process that builds an engine.

    Does nothing (returns None) unless ``EPLB_OPT_VLLM=1``.  Then it puts
    :class:`EplbOptPolicy` in vLLM's registry as ``"default"`` with the settings from
    ``EPLB_OPT_*`` and logs one line naming the policy it replaced and the settings.
    Calling it again changes nothing and logs nothing.  Where vLLM's registry is not laid
    out as in vLLM 0.33 it logs an error and leaves vLLM's policy in place (vLLM does not
    catch errors from general plugins, so raising would stop the engine).

    Raises:
        InvalidProblemError: ``EPLB_OPT_VLLM`` is neither on nor off, or (with it on) the
            ``EPLB_OPT_*`` settings are invalid, e.g. ``EPLB_OPT_MODE=exact`` with
            ``EPLB_OPT_DETERMINISTIC=0`` -- engine start stops with that message rather
            than serving with settings that were not asked for.
    """
    if not engine_env.flag("EPLB_OPT_VLLM"):
        _log.debug("eplb-opt: EPLB_OPT_VLLM is not set; vLLM's EPLB policy is left alone")
        return None
    cfg = settings(EplbOptPolicy._config)
    try:
        policies = _registry()
    except Exception as exc:  # noqa: BLE001 - never stop the engine over a layout change
        _log.error("eplb-opt: EPLB_OPT_VLLM=1 but eplb-opt could NOT be installed, vLLM's own EPLB policy "
                   "stays in use: %s: %s", type(exc).__name__, exc)
        return None
    current = policies["default"]
    if current is EplbOptPolicy:
        return EplbOptPolicy
    policies["default"] = EplbOptPolicy
    engine_env.announce(_log, "eplb-opt: EPLB_OPT_VLLM=1: vLLM's EPLB policy 'default' (%s) is now "
                        "eplb_opt.integrations.vllm.EplbOptPolicy (%s)", _name(current), engine_env.describe(cfg))
    return EplbOptPolicy
