"""eplb-opt with SGLang's EPLB shapes, and behind SGLang's EPLB dispatch.

SGLang's ``eplb_algorithms.rebalance_experts(tokens_per_expert, num_physical_experts,
num_local_physical_experts, num_groups, num_nodes, algorithm)`` takes per-step loads
``[steps, L, E]`` and the slots per GPU; :func:`rebalance_experts` here takes the same
arguments (the algorithm becomes eplb-opt's options) and returns SGLang's triple
``(physical_to_logical_map [L, R], logical_to_physical_map [L, E, R - E + 1],
logical_count [L, E])``, int64 on CPU.

**The step axis as history.**  SGLang hands every rank the same recorder buffer
``[steps, L, E]``.  By default (``history_windows=4``) it is cut into that many
consecutive sub-windows of near-equal length (edges ``i * steps // n``, oldest first,
each summed in float64 numpy in step order), the latest passed to :func:`eplb_opt.solve`
as ``weight`` and the earlier ones as ``history``, so the plan is for solve's default
forecast of the next window (``"windows-ema"``) rather than for the summed buffer:
``eplb_opt.replay``'s ``forecast`` policy, given the same buffer.  It depends only on the
buffer every rank receives, never on state kept in a process, so ranks (and a restarted
rank) compute byte-identical plans.  ``history_windows=0`` (or 1), or
``EPLB_OPT_HISTORY_WINDOWS=0``, turns it off: the step axis is summed and planned as one
window, as before.  It applies to ``objective="sum"`` without ``previous`` (a
migration-aware replan, and ``"worst"`` / ``"mean"`` over the steps, plan as before), to a
3-D buffer of at least 2 steps, and not to ``policy="spill"``.

Inside SGLang (0.5.23), two explicit ways in, neither patching the server's code:

* **Plugin**: installing eplb-opt registers the ``sglang.srt.plugins`` entry point
  ``eplb_opt`` -> :func:`register`, which SGLang's ``load_plugins()`` calls in its engine,
  scheduler and other processes.  It does nothing unless ``EPLB_OPT_SGLANG=1``; then it
  registers a REPLACE hook (SGLang's ``HookRegistry``) on
  ``sglang.srt.eplb.eplb_algorithms.rebalance_experts``, which ``load_plugins()`` applies
  right after, and logs one line saying so.  SGLang's only caller,
  ``ExpertLocationMetadata.init_by_eplb`` (used by the EPLB manager's rebalances and by
  ``--init-expert-location`` with ``logical_count``), calls it through the module, so
  every rebalance then runs :func:`dispatch`.  ``SGLANG_PLUGINS`` is SGLang's allow-list
  of plugin names: when you set it, include ``eplb_opt``.
* **In code**: :func:`install` replaces the same function directly, with explicit
  settings, in the process that plans.

:func:`dispatch` takes its settings from ``EPLB_OPT_MODE``, ``EPLB_OPT_TIME_LIMIT``,
``EPLB_OPT_SEED``, ``EPLB_OPT_POLICY`` (default: from SGLang's algorithm, i.e.
``--eplb-algorithm``: ``*_hierarchical`` -> hierarchical, others global),
``EPLB_OPT_DETERMINISTIC``, ``EPLB_OPT_WORKERS`` and ``EPLB_OPT_HISTORY_WINDOWS`` (an
integer >= 0, default 4; see above); SGLang's elasticity-aware algorithms
pass its inactive ranks on as ``active_ranks``.

**Same plan on every rank.**  SGLang runs the algorithm on every rank separately and
never broadcasts the result, so every path here defaults to ``deterministic=True``:
``time_limit`` is then a deterministic budget (iterations and CP-SAT deterministic time
units, roughly seconds, independent of the machine, its load and the clock) and
``workers`` defaults to 1.  Exact mode with ``deterministic=False`` raises
:class:`~eplb_opt.errors.InvalidProblemError`; heuristic mode is deterministic either way.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import numpy as np
import torch

from ..errors import InvalidProblemError, InvalidTypeError
from . import engine_env

__all__ = ["dispatch", "install", "rebalance_experts", "register", "settings"]

TARGET = "sglang.srt.eplb.eplb_algorithms.rebalance_experts"
_PARAMS = ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts", "num_groups",
           "num_nodes", "algorithm")
_DEFAULTS: dict[str, Any] = {"mode": "heuristic", "time_limit": None, "seed": 0, "policy": None,
                             "deterministic": True, "workers": None}
_ENGINE = "SGLang"
HISTORY_ENV = "EPLB_OPT_HISTORY_WINDOWS"
DEFAULT_HISTORY_WINDOWS = 4
_log = logging.getLogger("eplb_opt.integrations.sglang")
_config: dict[str, Any] = {}


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
    deterministic: bool = True,
    workers: int | None = None,
    history_windows: int = DEFAULT_HISTORY_WINDOWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan with SGLang's shapes.

    Args:
        tokens_per_expert: ``[steps, L, E]`` (the step axis cut into ``history_windows``
            sub-windows, or summed; module docs) or ``[L, E]`` loads.
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
            (their slots are ``-1``; :mod:`eplb_opt.masked`); with an inactive rank and
            no ``policy``, the global policy, as SGLang's elasticity-aware algorithm.
        cross_node_cost: with ``policy="spill"``.
        deterministic: as in :func:`eplb_opt.solve`; default True, so that every rank
            computes the same plan (``time_limit`` is then a deterministic budget).
        workers: CP-SAT threads (default 1 with ``deterministic``); the plan depends on
            it, so use the same value on every rank.
        history_windows: cut a 3-D buffer into this many sub-windows, the earlier ones
            passed as ``history`` (module docs); 0 or 1: sum the step axis (no history).

    Raises:
        InvalidProblemError: ``mode="exact"`` with ``deterministic=False`` (each SGLang
            rank would compute a different plan), or a bad argument.
    """
    from ..api import solve

    engine_env.check_same_plan(mode, deterministic, _ENGINE)
    G = _gpu_count(num_physical_experts, num_local_physical_experts)
    n = _history_count(history_windows)
    if previous is not None or objective != "sum" or policy == "spill":
        n = 0
    t, history = _step_loads(tokens_per_expert, objective, n)
    masked = None
    if active_ranks is not None:
        masked = ~torch.as_tensor(active_ranks).detach().cpu().to(torch.bool).numpy()     # [G]
    if policy is None:
        policy = _policy_of(masked, enable_hierarchical, algorithm)
    groups = 1 if num_groups is None else num_groups
    result = solve(
        t, num_replicas=num_physical_experts, num_groups=groups, num_nodes=num_nodes,
        num_gpus=G, mode=mode, time_limit=time_limit,
        seed=seed, policy=policy, objective=objective, previous=previous, max_balance_loss=max_balance_loss,
        node_move_cost=node_move_cost, masked_gpus=masked, cross_node_cost=cross_node_cost,
        deterministic=deterministic, workers=workers, history=history,
    )
    p2l, l2p, cnt = result.plan.to_numpy()                  # copies of the plan's cached maps
    return torch.from_numpy(p2l), torch.from_numpy(l2p), torch.from_numpy(cnt)


def _gpu_count(num_physical_experts: int, num_local_physical_experts: int) -> int:
    """``G = R / k`` from SGLang's slot counts, checked: ``k`` a positive int dividing ``R``."""
    if isinstance(num_local_physical_experts, bool) or not isinstance(num_local_physical_experts, int):
        raise InvalidTypeError(f"num_local_physical_experts must be an int, got {num_local_physical_experts!r}")
    if num_local_physical_experts <= 0 or num_physical_experts % num_local_physical_experts:
        raise InvalidProblemError(
            f"num_physical_experts={num_physical_experts} is not a multiple of "
            f"num_local_physical_experts={num_local_physical_experts}"
        )
    return num_physical_experts // num_local_physical_experts


def _history_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidProblemError(f"history_windows must be an integer >= 0, got {value!r}")
    return value


def _step_loads(tokens_per_expert: Any, objective: str, n: int = 0) -> tuple[Any, Any]:
    """``(weight, history)`` :func:`eplb_opt.solve` gets.  ``[steps, L, E]`` with
    ``objective="sum"``: cut into ``min(n, steps)`` consecutive sub-windows (edges
    ``i * steps // n``), each summed (float64); the latest is ``weight`` (``[L, E]``), the
    earlier ones ``history`` (None with fewer than 2).  Otherwise as given, no history."""
    t = tokens_per_expert if isinstance(tokens_per_expert, torch.Tensor) else torch.as_tensor(tokens_per_expert)
    if t.dim() != 3 or objective != "sum":
        return t, None
    # Summed in numpy (a fixed order): torch's CPU reduction may split the step axis
    # over threads, and ranks with other thread counts would see other last bits.
    a = t.detach().cpu().to(torch.float64).numpy()
    k = max(1, min(n, a.shape[0]))
    edges = (np.arange(k + 1) * a.shape[0]) // k
    windows = [a[lo:hi].sum(axis=0) for lo, hi in zip(edges[:-1], edges[1:])]
    history = np.stack(windows[:-1]) if k > 1 else None
    return torch.from_numpy(windows[-1]), history


def _policy_of(masked: Any, enable_hierarchical: bool | None, algorithm: Any) -> str:
    """The policy when none is given: global with an inactive rank (``masked`` ``[G]``
    bool), else from ``enable_hierarchical``, else from SGLang's algorithm name
    (``*hierarchical`` or not), else ``"auto"``."""
    if masked is not None and masked.any():
        # SGLang's own elasticity-aware algorithm plans with the global policy while
        # ranks are inactive (nodes no longer have equal GPUs), whatever it was asked.
        return "global"
    if enable_hierarchical is not None:
        return "hierarchical" if enable_hierarchical else "global"
    if algorithm is not None:
        name = getattr(algorithm, "name", str(algorithm))
        return "hierarchical" if name.endswith("hierarchical") else "global"
    return "auto"


def settings(explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`dispatch`'s effective settings: explicit ones (:func:`install`), else
    ``EPLB_OPT_*``, else the defaults (heuristic mode, ``deterministic=True``, the policy
    from SGLang's algorithm, ``history_windows=4``).

    Raises:
        InvalidProblemError: an unknown setting, an environment value that does not
            parse, or exact mode with ``deterministic=False``."""
    explicit = dict(explicit or {})
    n = explicit.pop("history_windows", None)
    out = engine_env.resolve(explicit, _DEFAULTS, _ENGINE)[0]
    if n is None:
        raw = os.environ.get(HISTORY_ENV, "").strip()
        try:
            n = int(raw) if raw else DEFAULT_HISTORY_WINDOWS
        except ValueError:
            raise InvalidProblemError(f"environment variable {HISTORY_ENV}={raw!r} is not a valid history_windows "
                                      "(an integer >= 0)") from None
    out["history_windows"] = _history_count(n)
    return out


def dispatch(
    tokens_per_expert: torch.Tensor,
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    algorithm: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What SGLang's ``eplb_algorithms.rebalance_experts`` runs once :func:`register` or
    :func:`install` put eplb-opt behind it: the same signature, :func:`rebalance_experts`
    with the settings of :func:`settings`.  SGLang's ``elasticity_aware*`` algorithms get
    the inactive ranks of SGLang's ``ElasticEPStateManager`` masked, as SGLang does."""
    cfg = settings(_config)
    active = None
    name = getattr(algorithm, "name", str(algorithm))
    if name.startswith("elasticity_aware"):
        from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager  # noqa: PLC0415

        state = ElasticEPStateManager.instance()
        if state is not None:              # None: every rank healthy (SGLang's default)
            ranks = torch.as_tensor(state.active_ranks).detach().cpu()
            if not bool(ranks.to(torch.bool).all()):
                active = ranks
    return rebalance_experts(
        tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups, num_nodes, algorithm,
        mode=cfg["mode"], time_limit=cfg["time_limit"], seed=cfg["seed"], policy=cfg["policy"],
        deterministic=cfg["deterministic"], workers=cfg["workers"], active_ranks=active,
        history_windows=cfg["history_windows"],
    )


def _dispatch_module() -> Any:
    """``sglang.srt.eplb.eplb_algorithms``, checked for the layout of SGLang 0.5.23."""
    import sglang.srt.eplb.eplb_algorithms as module  # noqa: PLC0415 - only inside SGLang

    fn = getattr(module, "rebalance_experts", None)
    try:
        params = tuple(inspect.signature(fn).parameters)[:len(_PARAMS)] if callable(fn) else None
    except (TypeError, ValueError):
        params = None
    if params != _PARAMS:
        raise RuntimeError(
            f"SGLang's EPLB dispatch is not laid out as eplb-opt expects (SGLang 0.5.23: {TARGET}"
            f"{_PARAMS}); found {fn!r} with parameters {params} in {getattr(module, '__file__', module)!r}"
        )
    return module


def install(**config: Any) -> Any:
    """Replace ``sglang.srt.eplb.eplb_algorithms.rebalance_experts`` with :func:`dispatch`
    in this process, with ``config`` (``mode``, ``time_limit``, ``seed``, ``policy``,
    ``deterministic``, ``workers``, ``history_windows``) over ``EPLB_OPT_*``; returns :func:`dispatch`.
    Calling it again only updates the settings.

    Raises:
        ImportError: SGLang is not importable here.
        RuntimeError: SGLang's dispatch differs from SGLang 0.5.23's.
        InvalidProblemError: bad settings, or ``mode="exact"`` with ``deterministic=False``.
    """
    global _config
    module = _dispatch_module()
    cfg = settings(config)
    _config = {k: v for k, v in config.items() if v is not None}
    previous = module.rebalance_experts
    if not _is_ours(previous):
        module.rebalance_experts = dispatch
        engine_env.announce(_log, "eplb-opt: %s is now eplb_opt.integrations.sglang.dispatch, was %s (%s)",
                            TARGET, _qualname(previous), engine_env.describe(cfg))
    return dispatch


def _is_ours(fn: Any) -> bool:
    """``fn`` is :func:`dispatch` or SGLang's hook wrapper around it."""
    cells = getattr(fn, "__closure__", None) or ()
    return fn is dispatch or any(_cell(c) is dispatch for c in cells)


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register() -> Any:
    """The ``sglang.srt.plugins`` entry point (``eplb_opt``), which SGLang's
    ``load_plugins()`` calls in its engine, scheduler and other processes.

    Does nothing (returns None) unless ``EPLB_OPT_SGLANG=1``.  Then it registers
    :func:`dispatch` as a REPLACE hook on ``sglang.srt.eplb.eplb_algorithms.rebalance_experts``
    with SGLang's ``HookRegistry`` (``load_plugins()`` applies it right after the plugins
    ran, and also rebinds any ``from ... import rebalance_experts`` copies), or, called
    outside ``load_plugins()`` or where SGLang has no hook registry, replaces the function
    directly (:func:`install`); and logs one line.  Settings
    come from ``EPLB_OPT_*`` at each call.  Calling it again changes nothing.  Where
    SGLang's dispatch is not laid out as in SGLang 0.5.23 it logs an error and leaves
    SGLang's algorithms in place.  Returns :func:`dispatch` when eplb-opt is (or will be,
    once the hooks are applied) behind the dispatch.

    Raises:
        InvalidProblemError: ``EPLB_OPT_SGLANG`` is neither on nor off, or the
            ``EPLB_OPT_*`` settings are invalid (e.g. exact mode with
            ``EPLB_OPT_DETERMINISTIC=0``).  SGLang's loader logs a plugin's exception
            ("Failed to execute general plugin: eplb_opt") and keeps its own algorithms.
    """
    if not engine_env.flag("EPLB_OPT_SGLANG"):
        _log.debug("eplb-opt: EPLB_OPT_SGLANG is not set; SGLang's EPLB algorithms are left alone")
        return None
    cfg = settings(_config)
    try:
        module = _dispatch_module()
    except Exception as exc:  # noqa: BLE001 - report, never break SGLang's start
        _log.error("eplb-opt: EPLB_OPT_SGLANG=1 but eplb-opt could NOT be put behind SGLang's EPLB dispatch, "
                   "SGLang's own algorithms stay in use: %s: %s", type(exc).__name__, exc)
        return None
    if _is_ours(module.rebalance_experts):
        return dispatch
    try:
        from sglang.srt.plugins import hook_registry  # noqa: PLC0415
        HookRegistry, HookType = hook_registry.HookRegistry, hook_registry.HookType
    except (ImportError, AttributeError):
        return install()
    hooks = getattr(HookRegistry, "_hooks", {})
    if any(hook is dispatch for _type, hook, *_ in hooks.get(TARGET, ())):
        return dispatch                    # registered already; load_plugins() applies it
    loading = getattr(hook_registry, "_current_plugin_source", None)
    if loading is None or loading.get() is None:
        # Not called by load_plugins(), which applies the hooks: nothing would apply ours.
        return install()
    HookRegistry.register(TARGET, dispatch, HookType.REPLACE)
    engine_env.announce(_log, "eplb-opt: EPLB_OPT_SGLANG=1: %s (%s) will run eplb_opt.integrations.sglang.dispatch "
                        "(a REPLACE hook, applied by SGLang's load_plugins) (%s)", TARGET,
                        _qualname(module.rebalance_experts), engine_env.describe(cfg))
    return dispatch
