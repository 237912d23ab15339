"""Replay policies: what plans a placement at each rebalance.

A policy is a :class:`ReplayPolicy`: a name and a function of a :class:`PlanRequest`
(the step the plan serves from, the :class:`~eplb_opt.replay.History` of past steps it
may use, the placement deployed now and the topology) returning ``phy2log [L, R]``.
A forecast (``"last"``, ``"ema"``, ...) is a policy that reads ``history`` its own way.

Built-in names (usable on the command line):

* ``ours``: ``eplb_opt.solve(mode="heuristic")`` on the summed window.
* ``exact``: ``solve(mode="exact", deterministic=True, time_limit=exact_time_limit)``.
* ``migrate``: ``solve(previous=<deployed>, max_balance_loss=max_balance_loss)``: the
  migration-aware replan from the placement deployed now.
* ``windows``: ``solve(objective=windows_objective)`` on the window cut into
  ``sub_windows`` consecutive sub-windows ``[W, L, E]``.
* ``forecast``: ``solve(latest, history=earlier)`` (the default forecast with history)
  on the same sub-windows: the latest is ``weight``, the ones before it ``history``.
* ``deepseek``: DeepSeek's EPLB (``sglang==0.5.23`` wheel) on the summed window.
* ``vllm``: vLLM 0.33's default policy (``vllm==0.33.0`` wheel) on the summed window.
* ``sglang_vec``: SGLang's ``deepseek_vec`` (``sglang==0.5.23`` wheel) on the window's
  steps ``[steps, L, E]`` (float32), as SGLang's recorder hands over its buffer.

Peers are loaded by :mod:`eplb_opt.bench.peers`, as ``eplb-opt bench`` does; one that
cannot be loaded is reported as skipped, with the reason.  Every policy plans under the
``"auto"`` policy rule (hierarchical when ``num_groups % num_nodes == 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import InvalidProblemError, InvalidTypeError
from ._source import History

__all__ = ["BASELINES", "DEFAULT_POLICIES", "POLICY_NAMES", "PlanRequest", "PolicyError", "ReplayPolicy",
           "Topology", "load_policies"]

DEFAULT_POLICIES = ("ours", "migrate", "windows", "deepseek", "vllm")
POLICY_NAMES = ("ours", "exact", "migrate", "windows", "forecast", "deepseek", "vllm", "sglang_vec")
BASELINES = ("static", "clairvoyant")


class PolicyError(InvalidProblemError):
    """A policy returned something that is not a placement of the replay's shape."""


@dataclass(frozen=True)
class Topology:
    """``num_replicas`` ``R``, ``num_groups``, ``num_nodes``, ``num_gpus`` ``G``, and the
    trace's ``num_layers`` ``L`` and ``num_experts`` ``E``; ``hierarchical`` is the
    ``"auto"`` rule's choice (``num_groups % num_nodes == 0``)."""

    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @property
    def hierarchical(self) -> bool:
        return self.num_groups % self.num_nodes == 0

    def solve_kwargs(self) -> dict[str, int]:
        """Topology keyword arguments of :func:`eplb_opt.solve`."""
        return {"num_replicas": self.num_replicas, "num_groups": self.num_groups, "num_nodes": self.num_nodes,
                "num_gpus": self.num_gpus}

    def peer_args(self) -> tuple[int, int, int, int]:
        """``(num_replicas, num_groups, num_nodes, num_gpus)``, DeepSeek's argument order."""
        return self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus


@dataclass(frozen=True)
class PlanRequest:
    """What a policy is given at a rebalance.

    Attributes:
        step: the plan serves from this step on (0 for a run's first plan, made from the
            first steps before serving starts).
        history: the past steps it may use (``history.stop == step``; for the first plan,
            the first steps of the trace).
        deployed: ``[L, R]`` int64 (read-only), the placement serving now (for the first
            plan, the round-robin placement: nothing serves yet).
        topology: the :class:`Topology`.
    """

    step: int
    history: History
    deployed: np.ndarray
    topology: Topology


@dataclass(frozen=True)
class ReplayPolicy:
    """A policy for :func:`eplb_opt.replay`.

    Attributes:
        name: how results name it (not ``"static"`` or ``"clairvoyant"``).
        plan: ``plan(request) -> phy2log [L, R]`` (numpy or torch, or a tuple whose first
            item is it, as DeepSeek's ``rebalance_experts`` returns).
        uses_deployed: the plan depends on ``request.deployed``; False lets a replay reuse
            a plan for the same history at every interval it sweeps.
        description: one line for reports.
    """

    name: str
    plan: Callable[[PlanRequest], Any]
    uses_deployed: bool = False
    description: str = ""


@dataclass(frozen=True)
class PolicyOptions:
    exact_time_limit: float
    max_balance_loss: float
    sub_windows: int
    windows_objective: str


def _solve(weight: np.ndarray, topo: Topology, **kw: Any) -> np.ndarray:
    from .. import solve

    return np.asarray(solve(weight, **topo.solve_kwargs(), **kw).plan.phy2log)


def _ours(o: PolicyOptions) -> ReplayPolicy:
    return ReplayPolicy("ours", lambda r: _solve(r.history.summed(), r.topology, mode="heuristic"),
                        description="eplb-opt heuristic: solve(mode='heuristic') on the summed window")


def _exact(o: PolicyOptions) -> ReplayPolicy:
    from ..status import warm_up

    warm_up()            # OR-Tools loads now, not inside the first plan's budget
    return ReplayPolicy(
        "exact", lambda r: _solve(r.history.summed(), r.topology, mode="exact", deterministic=True,
                                  time_limit=o.exact_time_limit),
        description=f"eplb-opt exact: solve(mode='exact', deterministic=True, time_limit={o.exact_time_limit:g})")


def _migrate(o: PolicyOptions) -> ReplayPolicy:
    return ReplayPolicy(
        "migrate", lambda r: _solve(r.history.summed(), r.topology, previous=r.deployed,
                                    max_balance_loss=o.max_balance_loss),
        uses_deployed=True,
        description=f"eplb-opt migration-aware: solve(previous=deployed, max_balance_loss={o.max_balance_loss:g})")


def _windows(o: PolicyOptions) -> ReplayPolicy:
    def plan(r: PlanRequest) -> np.ndarray:
        n = min(o.sub_windows, r.history.num_steps)
        return _solve(r.history.windows(n), r.topology, objective=o.windows_objective)

    return ReplayPolicy("windows", plan, description=f"eplb-opt windows: solve(objective='{o.windows_objective}') "
                                                     f"on the window cut into {o.sub_windows} sub-windows")


def _forecast(o: PolicyOptions) -> ReplayPolicy:
    from ..problem import DEFAULT_FORECAST

    def plan(r: PlanRequest) -> np.ndarray:
        h = r.history.windows(min(o.sub_windows, r.history.num_steps))
        return _solve(h[-1], r.topology, history=h[:-1] if len(h) > 1 else None)

    return ReplayPolicy("forecast", plan, description=f"eplb-opt forecast: solve(history=...) (forecast "
                                                      f"'{DEFAULT_FORECAST}') on the window cut into {o.sub_windows} "
                                                      "sub-windows, the latest as weight")


def _torch(a: np.ndarray, dtype: str = "float64") -> Any:
    import torch

    return torch.from_numpy(np.array(a, dtype=dtype))


def _deepseek(o: PolicyOptions) -> ReplayPolicy:
    from ..bench.peers import deepseek_rebalance

    fn = deepseek_rebalance()
    return ReplayPolicy("deepseek", lambda r: fn(_torch(r.history.summed()), *r.topology.peer_args()),
                        description="DeepSeek EPLB (sglang==0.5.23 wheel) on the summed window")


def _vllm(o: PolicyOptions) -> ReplayPolicy:
    from ..bench.peers import vllm_default_rebalance

    fn = vllm_default_rebalance()
    return ReplayPolicy("vllm", lambda r: fn(_torch(r.history.summed()), *r.topology.peer_args()),
                        description="vLLM 0.33 default policy (vllm==0.33.0 wheel) on the summed window")


def _sglang_vec(o: PolicyOptions) -> ReplayPolicy:
    from ..bench.peers import deepseek_vec_rebalance

    fn = deepseek_vec_rebalance()
    return ReplayPolicy("sglang_vec", lambda r: fn(_torch(r.history.steps(), "float32"), *r.topology.peer_args()),
                        description="SGLang deepseek_vec (sglang==0.5.23 wheel) on the window's steps")


_FACTORIES: dict[str, Callable[[PolicyOptions], ReplayPolicy]] = {
    "ours": _ours, "exact": _exact, "migrate": _migrate, "windows": _windows, "forecast": _forecast,
    "deepseek": _deepseek,
    "vllm": _vllm, "sglang_vec": _sglang_vec,
}


def load_policies(policies: Any, options: PolicyOptions) -> tuple[list[ReplayPolicy], dict[str, str]]:
    """Built-in names and :class:`ReplayPolicy` objects -> (policies that loaded, skipped
    name -> reason).  A peer that cannot be loaded is skipped, never dropped silently."""
    if isinstance(policies, (str, ReplayPolicy)):
        policies = [policies]
    try:
        items = list(policies)
    except TypeError:
        raise InvalidTypeError(f"policies must be a list of policy names or ReplayPolicy objects, "
                               f"got {type(policies).__name__}") from None
    if not items:
        raise InvalidProblemError("policies must name at least one policy, got an empty list")
    loaded: list[ReplayPolicy] = []
    skipped: dict[str, str] = {}
    for item in items:
        if isinstance(item, ReplayPolicy):
            if not isinstance(item.name, str) or not item.name or item.name in BASELINES or not callable(item.plan):
                raise InvalidProblemError(f"a ReplayPolicy needs a name other than {BASELINES} and a callable plan, "
                                          f"got name {item.name!r}")
            loaded.append(item)
            continue
        if not isinstance(item, str):
            raise InvalidTypeError(f"policies must hold policy names or ReplayPolicy objects, got "
                                   f"{type(item).__name__} {item!r}")
        if item not in _FACTORIES:
            raise InvalidProblemError(f"policies: unknown policy {item!r}; choose from {', '.join(POLICY_NAMES)} "
                                      "(static and clairvoyant always run)")
        try:
            loaded.append(_FACTORIES[item](options))
        except Exception as exc:  # noqa: BLE001 - a peer that cannot load is reported, not dropped
            skipped[item] = f"{type(exc).__name__}: {exc}"
    names = [p.name for p in loaded] + list(skipped)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidProblemError(f"policies: {', '.join(dup)} named more than once")
    return loaded, skipped


def plan_array(out: Any, topo: Topology, name: str) -> np.ndarray:
    """A policy's answer as an int64 ``[L, R]`` placement holding every expert.

    Raises:
        PolicyError: anything else (the message names the policy)."""
    if isinstance(out, tuple):
        out = out[0] if out else None
    if type(out).__module__.startswith("torch"):
        out = out.detach().cpu().numpy()
    a = np.asarray(out)
    L, R, E = topo.num_layers, topo.num_replicas, topo.num_experts
    if a.dtype.kind not in "iu":
        raise PolicyError(f"policy {name!r} returned a placement of dtype {a.dtype}, expected integers")
    if a.shape != (L, R):
        raise PolicyError(f"policy {name!r} returned shape {a.shape}, expected [layers, replicas] = ({L}, {R})")
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= E:
        raise PolicyError(f"policy {name!r} returned expert ids outside 0..{E - 1}")
    keys = (a + (np.arange(L) * E)[:, None]).ravel()
    if (np.bincount(keys, minlength=L * E) == 0).any():
        raise PolicyError(f"policy {name!r} returned a placement that leaves an expert without a replica")
    return a
