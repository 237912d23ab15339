"""Rebalance trigger: is a replan worth the expert weights it copies?

Between scheduled replans a serving engine can ask :func:`should_rebalance` with the
plan it runs and the loads it has seen since.  It plans a candidate from the current
placement (:func:`eplb_opt.solve` with ``previous``, so the candidate moves as little as
its balance allows) and compares:

* **gain**: the share of the summed per-layer max GPU load the candidate removes,
  ``1 - sum_l new_max / sum_l current_max`` (a layer's step time follows its busiest
  GPU, so this is the share of MoE step time saved, to first order);
* **cost**: replicas copied (and bytes, with ``bytes_per_expert``).

Two rules.  With the cost model (``step_time_s``, ``horizon_steps``,
``bytes_per_expert`` and ``bandwidth_bytes_per_s`` all given) a replan is worth it when
the time saved over the horizon, ``gain * step_time_s * horizon_steps``, exceeds the copy
time, ``bytes / bandwidth``.  Otherwise it is worth it when ``gain >= min_gain`` and
the gain per copied replica is at least ``min_gain_per_move``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidProblemError, InvalidTypeError

__all__ = ["RebalanceDecision", "should_rebalance"]


@dataclass(frozen=True)
class RebalanceDecision:
    """What :func:`should_rebalance` found.

    Attributes:
        worth: replan now.
        gain: share of the summed per-layer max load the candidate removes.
        current_balancedness, new_balancedness: on the given loads.
        moves: replicas the candidate copies; bytes: with ``bytes_per_expert``.
        saved_s, copy_s: the cost model's two sides (None without it).
        reason: one line saying why.
        candidate: the candidate :class:`~eplb_opt.api.SolveResult` (apply
            ``candidate.plan`` and ``candidate.transfers`` when ``worth``).
    """

    worth: bool
    gain: float
    current_balancedness: float
    new_balancedness: float
    moves: int
    bytes: int | None
    saved_s: float | None
    copy_s: float | None
    reason: str
    candidate: Any


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InvalidProblemError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return v


def should_rebalance(
    current_plan: Any,
    weight: Any,
    *,
    num_gpus: int | None = None,
    num_groups: int | None = None,
    num_nodes: int | None = None,
    policy: str | None = None,
    mode: str = "heuristic",
    time_limit: float | None = None,
    max_balance_loss: float = 0.005,
    node_move_cost: float = 4.0,
    min_gain: float = 0.02,
    min_gain_per_move: float = 0.0,
    bytes_per_expert: int | None = None,
    step_time_s: float | None = None,
    horizon_steps: int | None = None,
    bandwidth_bytes_per_s: float | None = None,
) -> RebalanceDecision:
    """Whether replanning ``current_plan`` for ``weight`` is worth its moves (see
    module docs).

    Args:
        current_plan: the deployed :class:`~eplb_opt.plan.Plan` (its recorded topology
            is used) or its ``[L, R]`` ``phy2log`` (then ``num_gpus`` is required).
        weight: ``[L, E]`` loads seen since it was deployed.
        num_gpus, num_groups, num_nodes, policy: topology; default: the plan's metadata
            (``num_groups = num_nodes = 1`` and ``"auto"`` for a bare array).
        mode, time_limit, max_balance_loss, node_move_cost: for the candidate
            (:func:`eplb_opt.solve`).
        min_gain: smallest gain worth a replan (threshold rule).
        min_gain_per_move: smallest gain per copied replica (threshold rule).
        bytes_per_expert, step_time_s, horizon_steps, bandwidth_bytes_per_s: the cost
            model, used when all four are given.
    """
    from .api import solve
    from .metrics import balancedness, gpu_loads
    from .problem import as_weight

    p2l, topo = _deployed(current_plan, num_gpus, num_groups, num_nodes, policy)
    use_model = _check_thresholds(min_gain, min_gain_per_move, step_time_s, horizon_steps, bytes_per_expert,
                                  bandwidth_bytes_per_s)
    w = as_weight(weight)
    cand = solve(w, num_replicas=p2l.shape[1], **topo, mode=mode, time_limit=time_limit, previous=p2l,
                 max_balance_loss=max_balance_loss, node_move_cost=node_move_cost,
                 bytes_per_expert=bytes_per_expert)
    cur = gpu_loads(w, p2l, topo["num_gpus"])                           # [L, G]
    cur_sum, new_sum = float(cur.max(axis=1).sum()), float(cand.max_load.sum())
    gain = 0.0 if cur_sum <= 0 else max(0.0, 1.0 - new_sum / cur_sum)
    moves = int(cand.moves.sum())
    nbytes = cand.migration.bytes
    saved = copy = None
    if use_model:
        saved = gain * _positive("step_time_s", step_time_s) * _positive("horizon_steps", horizon_steps)
        copy = nbytes / _positive("bandwidth_bytes_per_s", bandwidth_bytes_per_s)
        worth = saved > copy
        reason = (f"saves {saved:.3g} s over {horizon_steps} steps against {copy:.3g} s of copies"
                  + ("" if worth else ": not worth it"))
    else:
        worth, reason = _threshold_rule(gain, moves, min_gain, min_gain_per_move)
    return RebalanceDecision(
        worth=bool(worth), gain=gain, current_balancedness=balancedness(cur), new_balancedness=cand.balancedness,
        moves=moves, bytes=nbytes, saved_s=saved, copy_s=copy, reason=reason, candidate=cand,
    )


def _deployed(current_plan: Any, num_gpus: int | None, num_groups: int | None, num_nodes: int | None,
              policy: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """``(phy2log [L, R], topology)``: the deployed placement as an array and the keyword
    arguments ``num_gpus``, ``num_groups``, ``num_nodes``, ``policy`` of
    :func:`eplb_opt.solve`, each the given one, else the plan's recorded one, else the
    default (``num_gpus`` has none)."""
    from .plan import Plan

    params: dict[str, Any] = {}
    if isinstance(current_plan, Plan):
        params = dict(current_plan.metadata.get("parameters", {}))
        p2l = current_plan.to_numpy()[0]
    else:
        try:
            import torch

            if isinstance(current_plan, torch.Tensor):
                current_plan = current_plan.detach().cpu().numpy()
        except ImportError:  # pragma: no cover
            pass
        p2l = np.asarray(current_plan)
    G = num_gpus if num_gpus is not None else params.get("num_gpus")
    if G is None:
        raise InvalidProblemError("num_gpus is required when current_plan is a bare array (no recorded topology)")
    groups = num_groups if num_groups is not None else params.get("num_groups", 1)
    nodes = num_nodes if num_nodes is not None else params.get("num_nodes", 1)
    pol = policy if policy is not None else params.get("policy", "auto")
    if p2l.ndim != 2:
        raise InvalidProblemError(f"current_plan must be [L, R], got shape {tuple(p2l.shape)}")
    return p2l, {"num_groups": groups, "num_nodes": nodes, "num_gpus": G, "policy": pol}


def _check_thresholds(min_gain: Any, min_gain_per_move: Any, step_time_s: Any, horizon_steps: Any,
                      bytes_per_expert: Any, bandwidth_bytes_per_s: Any) -> bool:
    """Check the threshold rule's numbers; True when the cost model is complete (all four
    of its values given).  Raises when only some of them are (``bytes_per_expert`` alone
    is fine: it also sizes the migration)."""
    _positive("min_gain", min_gain, allow_zero=True)
    _positive("min_gain_per_move", min_gain_per_move, allow_zero=True)
    model = [step_time_s, horizon_steps, bytes_per_expert, bandwidth_bytes_per_s]
    use_model = all(x is not None for x in model)
    if any(x is not None for x in model[:2] + model[3:]) and not use_model:
        raise InvalidProblemError("the cost model needs step_time_s, horizon_steps, bytes_per_expert and "
                                  "bandwidth_bytes_per_s together")
    return use_model


def _threshold_rule(gain: float, moves: int, min_gain: float, min_gain_per_move: float) -> tuple[bool, str]:
    """``(worth, reason)`` without the cost model: ``gain >= min_gain`` and a gain per copied
    replica of at least ``min_gain_per_move``."""
    per_move = gain / moves if moves else float("inf")
    worth = gain >= min_gain and per_move >= min_gain_per_move and gain > 0
    reason = (f"gain {gain:.2%} with {moves} replica moves; "
              + ("worth it" if worth else f"below min_gain {min_gain:.2%}" if gain < min_gain
                 else "gain per move below min_gain_per_move" if per_move < min_gain_per_move else "no gain"))
    return worth, reason
