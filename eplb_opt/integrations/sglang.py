"""eplb-opt with SGLang's EPLB shapes.

SGLang's ``eplb_algorithms.rebalance_experts(tokens_per_expert, num_physical_experts,
num_local_physical_experts, num_groups, num_nodes, algorithm)`` takes per-step loads
``[steps, L, E]`` and the slots per GPU; :func:`rebalance_experts` here takes the same
arguments (the algorithm becomes eplb-opt's options) and returns SGLang's triple
``(physical_to_logical_map [L, R], logical_to_physical_map [L, E, R - E + 1],
logical_count [L, E])``, int64 on CPU, with the step axis summed first.

To use it inside SGLang, point its algorithm dispatch at this function, for example by
replacing ``sglang.srt.eplb.eplb_algorithms.rebalance_experts`` before the server starts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidProblemError, InvalidTypeError

__all__ = ["rebalance_experts"]


def rebalance_experts(
    tokens_per_expert: Any,
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    algorithm: Any = None,
    *,
    mode: str = "heuristic",
    time_limit: float | None = None,
    seed: int = 0,
    policy: str | None = None,
    enable_hierarchical: bool | None = None,
    objective: str = "sum",
    previous: Any = None,
    max_balance_loss: float | None = None,
    node_move_cost: float = 4.0,
    active_ranks: Any = None,
    cross_node_cost: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan with SGLang's shapes.

    Args:
        tokens_per_expert: ``[steps, L, E]`` (summed over steps) or ``[L, E]`` loads.
        num_physical_experts: ``R``.
        num_local_physical_experts: slots per GPU (``R / G``).
        num_groups: expert groups (``None``: no groups, the global policy).
        num_nodes: nodes.
        algorithm: SGLang's algorithm choice, if given: a name or enum member ending in
            ``_hierarchical`` asks for the hierarchical policy, others for the global one.
        mode, time_limit, seed: as in :func:`eplb_opt.solve`.
        policy: ``"auto"``, ``"hierarchical"`` or ``"global"`` (overrides ``algorithm``).
        enable_hierarchical: SGLang's flag (overrides ``algorithm``).
        objective: ``"sum"`` sums the step axis; ``"worst"`` / ``"mean"`` plan for the
            worst or mean step (the steps are the windows of :func:`eplb_opt.solve`).
        previous, max_balance_loss, node_move_cost: migration-aware replanning from the
            deployed ``physical_to_logical_map`` (as in :func:`eplb_opt.solve`).
        active_ranks: ``[G]`` bool/0-1 (SGLang's elastic EP): inactive ranks hold nothing
            (their slots are ``-1``; :mod:`eplb_opt.masked`).
        cross_node_cost: with ``policy="spill"``.
    """
    from ..api import solve
    from ..plan import derive_maps

    if isinstance(num_local_physical_experts, bool) or not isinstance(num_local_physical_experts, int):
        raise InvalidTypeError(f"num_local_physical_experts must be an int, got {num_local_physical_experts!r}")
    if num_local_physical_experts <= 0 or num_physical_experts % num_local_physical_experts:
        raise InvalidProblemError(
            f"num_physical_experts={num_physical_experts} is not a multiple of "
            f"num_local_physical_experts={num_local_physical_experts}"
        )
    t = tokens_per_expert if isinstance(tokens_per_expert, torch.Tensor) else torch.as_tensor(tokens_per_expert)
    if t.dim() == 3 and objective == "sum":
        t = t.to(torch.float64).sum(dim=0)
    masked = None
    if active_ranks is not None:
        masked = ~torch.as_tensor(active_ranks).detach().cpu().to(torch.bool).numpy()
    if policy is None:
        if enable_hierarchical is not None:
            policy = "hierarchical" if enable_hierarchical else "global"
        elif algorithm is not None:
            name = getattr(algorithm, "name", str(algorithm))
            policy = "hierarchical" if name.endswith("hierarchical") else "global"
        else:
            policy = "auto"
    groups = 1 if num_groups is None else num_groups
    result = solve(
        t, num_replicas=num_physical_experts, num_groups=groups, num_nodes=num_nodes,
        num_gpus=num_physical_experts // num_local_physical_experts, mode=mode, time_limit=time_limit,
        seed=seed, policy=policy, objective=objective, previous=previous, max_balance_loss=max_balance_loss,
        node_move_cost=node_move_cost, masked_gpus=masked, cross_node_cost=cross_node_cost,
    )
    p2l = result.plan.to_numpy()[0]
    l2p, cnt = derive_maps(p2l, result.plan.num_experts)
    return torch.from_numpy(p2l), torch.from_numpy(l2p), torch.from_numpy(cnt)
