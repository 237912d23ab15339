"""Input validation and conversion: every check of the public API, in one module.

Everything a user passes is checked here, once.  :func:`make_problem` turns the instance
(loads and topology) into a frozen :class:`Problem` holding float64 numpy loads and
plain ints; :func:`validate_solve` does the same for every other argument of
:func:`eplb_opt.solve` and returns a frozen :class:`SolveOptions`.  Option combinations
that are refused are listed in two tables: :data:`HISTORY_CONFLICTS` (how ``history``,
``forecast`` and a 3-D ``weight`` with ``objective`` may meet, checked before the loads
to plan for are formed) and :data:`CONFLICTS` (everything else, checked last).
:func:`forecast_loads` turns ``history`` and ``weight`` into the loads the plan is for.  Errors name the argument
and its value (:class:`~eplb_opt.errors.InvalidTypeError` for a wrong type,
:class:`~eplb_opt.errors.InvalidProblemError` for a wrong value).

``heuristics`` keeps only the shape checks it needs to run on its own (DESIGN §5).
"""

from __future__ import annotations

import math
import numbers
import sys
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidProblemError, InvalidTypeError
from .heuristics.compile import frozen_copy

__all__ = ["Problem", "SolveOptions", "make_problem", "validate_solve", "as_weight", "as_previous", "as_mask",
           "choice", "number", "positive_int", "as_placement", "forecast_loads", "MODES", "POLICIES", "OBJECTIVES",
           "FORECASTS", "FORECAST_PARAMETERS", "DEFAULT_FORECAST", "DEFAULT_POINT_FORECAST", "CONFLICTS", "HISTORY_CONFLICTS"]

MODES = ("heuristic", "exact")
POLICIES = ("auto", "hierarchical", "global", "spill")
OBJECTIVES = ("sum", "worst", "mean")
# Forecasts of the next window from ``history`` + ``weight`` (:func:`forecast_loads`).
FORECASTS = ("windows-ema", "ema", "last", "mean", "windows-worst", "windows-mean")
# The default with history, chosen on benchmarks/run_forecast.py's seeds 0-1; where a
# hedge is refused (previous, policy="spill") the point forecast with its weights.
DEFAULT_FORECAST = "windows-ema"
# The largest num_replicas / num_groups / num_nodes / num_gpus accepted: 2**24 slots per
# layer (16,777,216; any cluster is far below it).  Larger ones (up to 2**70 in the fuzz
# tests) reached numpy's allocation as "Maximum allowed dimension exceeded".
MAX_SIZE = 2**24
DEFAULT_POINT_FORECAST = "ema"
# Their fixed parameters: the half-life, in windows, of "ema" and "windows-ema"'s
# recency weights (0.5 chosen on seeds 0-1 over 1, 2 and 4).
FORECAST_PARAMETERS: dict[str, float] = {"ema_halflife": 0.5}


@dataclass(frozen=True)
class Problem:
    """A validated EPLB instance.

    Attributes:
        weight: ``[L, E]`` float64 loads (read-only), in the caller's units.
        num_replicas: ``R``, physical expert slots per layer.
        num_groups, num_nodes, num_gpus: topology as given by the caller.
        policy: resolved policy, ``"hierarchical"``, ``"global"`` or ``"spill"``.
        mode: ``"heuristic"`` or ``"exact"``.
        time_limit: seconds, or ``None``.
        seed: non-negative int.
    """

    weight: np.ndarray
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    policy: str
    mode: str
    time_limit: float | None
    seed: int

    @property
    def num_layers(self) -> int:
        """``L``, layers."""
        return int(self.weight.shape[0])

    @property
    def num_experts(self) -> int:
        """``E``, logical experts per layer."""
        return int(self.weight.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        """``k = R / G``."""
        return self.num_replicas // self.num_gpus

    @property
    def hierarchical(self) -> bool:
        """Whether the resolved policy is the hierarchical one."""
        return self.policy == "hierarchical"

    @property
    def plan_groups(self) -> int:
        """Groups the planner uses (1 under the global policy)."""
        return self.num_groups if self.hierarchical else 1

    @property
    def plan_nodes(self) -> int:
        """Nodes the planner uses (1 under the global policy)."""
        return self.num_nodes if self.hierarchical else 1


def positive_int(name: str, value: Any) -> int:
    """A positive integer size (Python, numpy or 0-d torch integer; not bool), else an
    error naming ``name``."""
    if type(value) is int:                      # the common case, without the ABC check below
        out = value
    elif isinstance(value, bool) or isinstance(value, np.bool_):
        raise InvalidTypeError(f"{name} must be a positive integer, got bool {value!r}")
    elif isinstance(value, numbers.Integral):
        out = int(value)
    else:
        try:
            out = operator.index(value)
        except TypeError:
            raise InvalidTypeError(
                f"{name} must be a positive integer, got {type(value).__name__} {value!r}"
            ) from None
    if out <= 0:
        raise InvalidProblemError(f"{name} must be a positive integer, got {out}")
    return out


def _torch_to_numpy(value: Any) -> np.ndarray:
    import torch

    try:
        arr = value.numpy()                     # the common case: a CPU tensor, no grad
    except (RuntimeError, TypeError):           # on a GPU, needing grad, bfloat16, ...
        arr = None
    if arr is not None and arr.dtype == np.float64:
        return arr
    t = value.detach()
    if t.dtype == torch.float64 and t.device.type == "cpu":
        return t.numpy()
    if t.is_complex():
        raise InvalidTypeError(f"weight must hold real loads, got complex dtype {t.dtype}")
    if t.dtype == torch.bool:
        raise InvalidTypeError("weight must hold numeric loads, got dtype torch.bool")
    if t.is_floating_point():
        t = t.to(device="cpu", dtype=torch.float64)
    else:
        # Integers: go through int64 so no value is lost before the float64 conversion.
        t = t.to(device="cpu", dtype=torch.int64)
    return t.numpy()


def _object_numbers(arr: np.ndarray, name: str) -> np.ndarray:
    """Python integers too big for int64 (numpy keeps them as objects) and other plain
    real numbers become float64, rounded as float64 would round them."""
    flat = arr.ravel()
    if flat.size == 0 or not all(
        isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) for x in flat
    ):
        return arr  # reported below as non-numeric
    try:
        return arr.astype(np.float64)
    except OverflowError:
        big = next(x for x in flat if abs(x) > sys.float_info.max)  # exact int/float comparison
        raise InvalidProblemError(f"{name} holds a value beyond float64's range: {big!r:.40}") from None


def as_weight(weight: Any, name: str = "weight", windows: bool = False) -> np.ndarray:
    """Validate loads and return them as a read-only float64 ``[L, E]`` array (with
    ``windows=True``, ``[L, E]`` or ``[W, L, E]``).

    Accepts a torch tensor (any real dtype, any device) or a numpy array / nested
    sequence of real numbers.  Integer loads above 2**53 are rounded to the nearest
    float64, as float64 arithmetic would; they never overflow.
    """
    if weight is None:
        raise InvalidTypeError(f"{name} must be a [layers, experts] tensor or array, got None")
    if type(weight).__module__.startswith("torch"):
        arr = _torch_to_numpy(weight)
    else:
        try:
            arr = np.asarray(weight)
        except (ValueError, TypeError) as exc:
            raise InvalidTypeError(f"{name} could not be read as a numeric array: {exc}") from None
    if arr.dtype.kind == "O":
        arr = _object_numbers(arr, name)
    kind = arr.dtype.kind
    if kind == "c":
        raise InvalidTypeError(f"{name} must hold real loads, got complex dtype {arr.dtype}")
    if kind == "b":
        raise InvalidTypeError(f"{name} must hold numeric loads, got dtype {arr.dtype}")
    if kind not in "iuf":
        raise InvalidTypeError(f"{name} must hold numeric loads, got dtype {arr.dtype}")
    if arr.ndim != 2 and not (windows and arr.ndim == 3):
        want = "2-D [layers, experts] or 3-D [windows, layers, experts]" if windows else "2-D [layers, experts]"
        hint = " (sum the leading step axis first)" if arr.ndim == 3 else ""
        raise InvalidProblemError(f"{name} must be {want}, got shape {tuple(arr.shape)}{hint}")
    if arr.ndim == 3 and arr.shape[0] == 0:
        raise InvalidProblemError(f"{name} has no windows: shape {tuple(arr.shape)}")
    if arr.shape[-2] == 0:
        raise InvalidProblemError(f"{name} has no layers: shape {tuple(arr.shape)}")
    if arr.shape[-1] == 0:
        raise InvalidProblemError(f"{name} has no experts: shape {tuple(arr.shape)}")
    out, plain = frozen_copy(arr)               # read-only; kernels read it without a copy
    if plain:                                   # the common case, checked as it was copied
        return out
    lo, hi = out.min(), out.max()               # NaN propagates: fails both tests
    if lo >= 0 and hi < np.inf:
        return out
    finite = np.isfinite(out)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise InvalidProblemError(
            f"{name} must be finite: {len(bad)} NaN/inf value(s), first at "
            f"{_where(bad[0])} = {float(out[tuple(bad[0])])!r}"
        )
    if (out < 0).any():
        bad = np.argwhere(out < 0)
        raise InvalidProblemError(
            f"{name} must be non-negative: {len(bad)} negative value(s), first at "
            f"{_where(bad[0])} = {float(out[tuple(bad[0])])!r}"
        )
    return out


def _where(index: np.ndarray) -> str:
    names = ("layer", "expert") if len(index) == 2 else ("window", "layer", "expert")
    return "[" + ", ".join(f"{n} {int(i)}" for n, i in zip(names, index)) + "]"


def _time_limit(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(
            f"time_limit must be a number of seconds or None, got {type(value).__name__} {value!r}"
        )
    out = float(value)
    if math.isnan(out) or out < 0:
        raise InvalidProblemError(f"time_limit must be >= 0 seconds (or None), got {value!r}")
    return out


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` when it is one of the strings ``allowed``, else an error naming ``name``."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"{name} must be one of {allowed}, got {type(value).__name__} {value!r}")
    if value not in allowed:
        raise InvalidProblemError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def make_problem(
    weight: Any,
    num_replicas: Any,
    num_groups: Any,
    num_nodes: Any,
    num_gpus: Any,
    *,
    mode: Any = "heuristic",
    time_limit: Any = None,
    seed: Any = 0,
    policy: Any = "auto",
    weight_checked: bool = False,
) -> Problem:
    """Validate every argument of a planning call and build a :class:`Problem`
    (``weight_checked``: ``weight`` already came from :func:`as_weight`).

    Raises:
        InvalidTypeError: an argument has the wrong type.
        InvalidProblemError: an argument has a bad value or the sizes do not fit (each
            of the four sizes at most :data:`MAX_SIZE`, 2**24).
    """
    mode = choice("mode", mode, MODES)
    policy = choice("policy", policy, POLICIES)
    R = positive_int("num_replicas", num_replicas)
    groups = positive_int("num_groups", num_groups)
    nodes = positive_int("num_nodes", num_nodes)
    gpus = positive_int("num_gpus", num_gpus)
    for name, value in (("num_replicas", R), ("num_groups", groups), ("num_nodes", nodes), ("num_gpus", gpus)):
        if value > MAX_SIZE:
            raise InvalidProblemError(f"{name}={value} is above the largest size supported, 2**24 = {MAX_SIZE}")
    limit = _time_limit(time_limit)
    if type(seed) is not int and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral)):
        raise InvalidTypeError(f"seed must be a non-negative integer, got {type(seed).__name__} {seed!r}")
    if int(seed) < 0:
        raise InvalidProblemError(f"seed must be a non-negative integer, got {seed!r}")
    w = weight if weight_checked else as_weight(weight)
    E = w.shape[1]

    if R < E:
        raise InvalidProblemError(
            f"num_replicas={R} is below the number of experts {E}: every expert needs a slot"
        )
    if R % gpus:
        raise InvalidProblemError(
            f"num_replicas={R} is not a multiple of num_gpus={gpus}: every GPU needs the same slot count"
        )
    divisible = groups % nodes == 0
    if policy == "auto":
        policy = "hierarchical" if divisible else "global"
    if policy in ("hierarchical", "spill"):
        if not divisible:
            raise InvalidProblemError(
                f"policy={policy!r} needs num_groups={groups} to be a multiple of num_nodes={nodes}"
            )
        if E % groups:
            raise InvalidProblemError(
                f"the {policy} policy needs the expert count {E} to be a multiple of num_groups={groups}"
            )
        if gpus % nodes:
            raise InvalidProblemError(
                f"the {policy} policy needs num_gpus={gpus} to be a multiple of num_nodes={nodes}"
            )
    return Problem(
        weight=w,
        num_replicas=R,
        num_groups=groups,
        num_nodes=nodes,
        num_gpus=gpus,
        policy=policy,
        mode=mode,
        time_limit=limit,
        seed=int(seed),
    )


# ---------------------------------------------------------------------------------------
# Every other argument of solve()


@dataclass(frozen=True)
class SolveOptions:
    """The validated options of one :func:`eplb_opt.solve` call.

    Attributes:
        windows: ``[W, L, E]`` float64 loads as given (``W = 1`` for ``[L, E]`` input);
            the problem's ``weight`` is their sum.
        objective: ``"sum"``, ``"worst"`` or ``"mean"``.
        tolerance: the gap below which a layer is ``"optimal"``, in ``[0, 1)``.
        deterministic: budgets of work instead of wall clock.
        workers: CP-SAT threads, resolved (1 when deterministic or with Ray and not given).
        workers_given: ``workers`` as the caller passed it (``None`` or an int).
        allow_duplicates: whether a GPU may hold two replicas of one expert.
        executor: ``None``, ``"local"`` or ``"ray"``; ``ray_address`` goes with ``"ray"``.
        previous: ``[L, R]`` int64 deployed placement, or ``None``.
        max_balance_loss, node_move_cost, bytes_per_expert: migration settings
            (defaults when ``previous`` is ``None``).
        cross_node_cost: the spill policy's price of off-node load (``inf`` allowed).
        mask: ``[L, G]`` bool masked GPUs, or ``None`` when no GPU is masked.
        requested_policy: the ``policy`` argument as given (before ``"auto"`` is resolved).
        forecast: with ``history``, the forecast the plan is for (resolved: never
            ``None``); ``None`` without history.
        history_windows: past windows given in ``history`` (0 without).
    """

    windows: np.ndarray
    objective: str
    tolerance: float
    deterministic: bool
    workers: int
    workers_given: int | None
    allow_duplicates: bool
    executor: str | None
    ray_address: str | None
    previous: np.ndarray | None
    max_balance_loss: float
    node_move_cost: float
    bytes_per_expert: int | None
    cross_node_cost: float
    mask: np.ndarray | None
    requested_policy: str
    forecast: str | None = None
    history_windows: int = 0

    @property
    def robust(self) -> bool:
        """A worst / mean objective over several windows."""
        return self.objective != "sum" and self.windows.shape[0] > 1

    @property
    def use_ray(self) -> bool:
        """Exact refinement fans out as Ray tasks."""
        return self.executor == "ray"


# Option combinations solve() refuses, checked in this order once every argument is
# valid on its own: (when, message), both functions of (problem, options).
CONFLICTS: tuple[tuple[Any, Any], ...] = (
    (lambda p, o: p.policy == "spill" and o.robust and o.forecast is not None,
     lambda p, o: f"policy='spill' with forecast={o.forecast!r} is not supported: the spill search plans for one "
                  "load; use forecast='ema', 'mean' or 'last' (or the default)"),
    (lambda p, o: o.previous is not None and o.robust and o.forecast is not None,
     lambda p, o: f"previous with forecast={o.forecast!r} is not supported: migration plans for one load; use "
                  "forecast='ema', 'mean' or 'last' (or the default)"),
    (lambda p, o: p.policy == "spill" and o.robust,
     lambda p, o: "policy='spill' with a worst/mean objective is not supported"),
    (lambda p, o: p.policy == "spill" and o.previous is not None,
     lambda p, o: "policy='spill' with previous is not supported"),
    (lambda p, o: p.policy == "spill" and o.mask is not None,
     lambda p, o: "policy='spill' with masked_gpus is not supported"),
    (lambda p, o: o.requested_policy == "hierarchical" and o.mask is not None,
     # An explicit choice is never switched; policy="auto" plans around the masked GPUs
     # with the global policy (an event says so).
     lambda p, o: "policy='hierarchical' with masked_gpus: masked GPUs leave the nodes with unequal GPU "
                  "counts, and the hierarchical policy needs equal nodes; pass policy='global' (or "
                  "policy='auto', which plans around masked GPUs with the global policy)"),
    (lambda p, o: o.previous is not None and o.robust,
     lambda p, o: f"previous with objective={o.objective!r} is not supported: migration plans for the summed "
                  "load (objective='sum')"),
)


# How history, forecast and the windows of a 3-D weight may meet: (when, message), both
# functions of (weight's shape, history given, objective, forecast as given), checked in
# this order before the loads to plan for are formed.  One meaning each: a 3-D
# ``weight`` holds the windows the plan serves (``objective`` scores them); ``history``
# holds windows already past, and ``forecast`` says how they and ``weight`` (then the
# latest window, [L, E]) become the loads of the window to come.
HISTORY_CONFLICTS: tuple[tuple[Any, Any], ...] = (
    (lambda shape, h, obj, fc: h and len(shape) == 3,
     lambda shape, h, obj, fc: f"history with a 3-D weight of shape {shape}: with history, weight is the latest window "
                               "[layers, experts] and history the windows before it; a 3-D weight holds the windows "
                               "to plan for (objective=) -- pass one or the other"),
    (lambda shape, h, obj, fc: h and obj != "sum",
     lambda shape, h, obj, fc: f"objective={obj!r} with history: objective scores the windows of a 3-D weight; to "
                               f"hedge over past windows pass forecast='windows-{obj}'"),
    (lambda shape, h, obj, fc: not h and len(shape) == 3 and fc is not None,
     lambda shape, h, obj, fc: f"forecast={fc!r} with a 3-D weight of shape {shape} and no history: a 3-D weight "
                               "holds the windows to plan for (objective=); a forecast needs past windows: pass them "
                               "as history= and the latest window as weight"),
)


def forecast_loads(windows: np.ndarray, forecast: str) -> tuple[np.ndarray, str]:
    """The loads a plan is for, from ``windows`` ``[W, L, E]`` (history then the latest
    window, oldest first), and the objective over them.

    * ``"windows-ema"``: a hedge: every window is a scenario of the next one, weighted
      by recency ``2 ** (-age / ema_halflife)`` (age 0 for the latest;
      :data:`FORECAST_PARAMETERS`), and the plan lowers the weighted mean over them of
      the busiest GPU (``objective="mean"`` on the weighted windows,
      :mod:`heuristics.robust`, starting from the plan for the ``"ema"`` loads).
    * ``"ema"``: the windows' mean with those weights (one load).
    * ``"last"``: the latest window alone (``[1, L, E]``, ``"sum"``): what ``solve``
      plans from without history.
    * ``"mean"``: every window with the same weight.
    * ``"windows-worst"`` / ``"windows-mean"``: hedges over the windows as they are,
      lowering the worst / mean window's busiest GPU (``objective="worst"`` /
      ``"mean"``).

    Point forecasts are weighted means and ``"windows-ema"``'s windows are weighted
    shares of them: one window's units.  One window: ``[1, L, E]`` as it is.
    :func:`eplb_opt.solve`'s default with history is :data:`DEFAULT_FORECAST`
    (:data:`DEFAULT_POINT_FORECAST` with ``previous`` or ``policy="spill"``, where the
    hedges are refused); ``benchmarks/run_forecast.py`` measures each on the next window.
    """
    W = windows.shape[0]
    if forecast == "last" or W == 1:
        return windows[-1:], "sum"
    if forecast in ("windows-worst", "windows-mean"):
        return windows, forecast[len("windows-"):]
    if forecast == "mean":
        weights = np.full(W, 1.0 / W)
    else:
        age = np.arange(W - 1, -1, -1, dtype=np.float64)
        weights = 0.5 ** (age / FORECAST_PARAMETERS["ema_halflife"])
        weights /= weights.sum()
    if forecast == "windows-ema":
        return windows * weights[:, None, None], "mean"
    return np.tensordot(weights, windows, axes=1)[None], "sum"


def _history(weight: Any, history: Any, objective: str, forecast: Any, point_only: bool,
             ) -> tuple[np.ndarray, str, str | None, int]:
    """``(windows, objective, forecast, history windows)`` of a call: the weight's
    windows as today without history; with it, the forecast's loads (``point_only``:
    the default is :data:`DEFAULT_POINT_FORECAST`, where a hedge is refused)."""
    if forecast is not None:
        forecast = choice("forecast", forecast, FORECASTS)
    windows = as_weight(weight, windows=True)
    given = history is not None
    for when, message in HISTORY_CONFLICTS:
        if when(tuple(windows.shape), given, objective, forecast):
            raise InvalidProblemError(message(tuple(windows.shape), given, objective, forecast))
    if windows.ndim == 2:
        windows = windows[None]
    if not given:
        return windows, objective, None, 0
    past = as_weight(history, name="history", windows=True)
    if past.ndim == 2:
        past = past[None]
    if past.shape[1:] != windows.shape[1:]:
        raise InvalidProblemError(f"history has shape {tuple(past.shape)}, expected [windows, layers, experts] with "
                                  f"the weight's layers and experts {tuple(windows.shape[1:])}")
    forecast = forecast or (DEFAULT_POINT_FORECAST if point_only else DEFAULT_FORECAST)
    loads, objective = forecast_loads(np.concatenate([past, windows]), forecast)
    loads.setflags(write=False)
    return loads, objective, forecast, int(past.shape[0])


def _tolerance(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidTypeError(f"tolerance must be a number, got {type(value).__name__} {value!r}")
    tol = float(value)
    if not (0.0 <= tol < 1.0):
        raise InvalidProblemError(f"tolerance must be in [0, 1), got {value!r}")
    return tol


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _workers(workers: Any, deterministic: bool, use_ray: bool) -> int:
    if workers is None:
        if deterministic or use_ray:
            return 1                   # a plan that does not depend on the machine
        import os

        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer)):
        raise InvalidTypeError(f"workers must be a positive integer or None, got {type(workers).__name__} {workers!r}")
    if int(workers) < 1:
        raise InvalidProblemError(f"workers must be a positive integer or None, got {workers!r}")
    return int(workers)


def _no_duplicates_fit(problem: Problem) -> None:
    # policy="spill" packs each node's home replicas first, so it needs the node bound
    # too (found by the long certificate campaign: a raw ValueError escaped).
    nodes = problem.num_nodes if problem.policy == "spill" else problem.plan_nodes
    per_node = problem.num_experts // nodes
    if problem.slots_per_gpu > per_node:
        raise InvalidProblemError(
            f"allow_duplicates=False needs at most {per_node} slots per GPU (the experts a GPU can "
            f"choose from), got num_replicas / num_gpus = {problem.slots_per_gpu}"
        )


def _executor(executor: Any, ray_address: Any) -> None:
    if executor is not None and (not isinstance(executor, str) or executor not in ("local", "ray")):
        raise InvalidProblemError(f"executor must be None, 'local' or 'ray', got {executor!r}")
    if ray_address is not None:
        if executor != "ray":
            raise InvalidProblemError(f"ray_address={ray_address!r} needs executor='ray'")
        if not isinstance(ray_address, str) or not ray_address.strip():
            raise InvalidTypeError(
                f"ray_address must be a non-empty string or None, got {type(ray_address).__name__} {ray_address!r}"
            )


def number(name: str, value: Any, low: float, *, open_low: bool = False) -> float:
    """A finite real ``value >= low`` (``> low`` with ``open_low``), else an error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (open_low and v == low):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise InvalidProblemError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def _cross_node_cost(value: Any) -> float:
    if isinstance(value, (float, np.floating)) and value == float("inf"):
        return float("inf")
    return number("cross_node_cost", value, 0.0)


def _migration(problem: Problem, previous: Any, max_balance_loss: Any, node_move_cost: Any,
               bytes_per_expert: Any) -> tuple[np.ndarray | None, float, float, int | None]:
    if previous is None:
        for name, val in (("max_balance_loss", max_balance_loss), ("bytes_per_expert", bytes_per_expert)):
            if val is not None:
                raise InvalidProblemError(f"{name}={val!r} needs previous (the placement deployed now)")
        return None, 0.0, 4.0, None
    old = as_previous(previous, problem.num_layers, problem.num_experts, problem.num_replicas, problem.num_gpus)
    mbl = 0.0 if max_balance_loss is None else number("max_balance_loss", max_balance_loss, 0.0)
    nmc = number("node_move_cost", node_move_cost, 0.0, open_low=True)
    bpe = None
    if bytes_per_expert is not None:
        if isinstance(bytes_per_expert, (bool, np.bool_)) or not isinstance(bytes_per_expert, (int, np.integer)):
            raise InvalidTypeError(f"bytes_per_expert must be a positive integer, got {bytes_per_expert!r}")
        if bytes_per_expert <= 0:
            raise InvalidProblemError(f"bytes_per_expert must be a positive integer, got {bytes_per_expert!r}")
        bpe = int(bytes_per_expert)
    return old, mbl, nmc, bpe


def validate_solve(weight: Any, *, num_replicas: Any, num_groups: Any, num_nodes: Any, num_gpus: Any,
                   mode: Any, time_limit: Any, seed: Any, policy: Any, deterministic: Any, workers: Any,
                   tolerance: Any, allow_duplicates: Any, executor: Any, ray_address: Any, previous: Any,
                   max_balance_loss: Any, node_move_cost: Any, bytes_per_expert: Any, objective: Any,
                   cross_node_cost: Any, masked_gpus: Any, history: Any = None,
                   forecast: Any = None) -> tuple[Problem, SolveOptions]:
    """Check every argument of :func:`eplb_opt.solve` (same names and meanings) and the
    :data:`HISTORY_CONFLICTS` and :data:`CONFLICTS` between them.

    Returns:
        ``(problem, options)``: the instance for the summed load (with ``history``, for
        the forecast's loads: :func:`forecast_loads`), and the rest.
    """
    tol = _tolerance(tolerance)
    objective = choice("objective", objective, OBJECTIVES)
    windows, objective, forecast, n_past = _history(weight, history, objective, forecast,
                                                    point_only=previous is not None or policy == "spill")
    problem = make_problem(
        windows.sum(axis=0) if windows.shape[0] > 1 else windows[0], num_replicas, num_groups, num_nodes,
        num_gpus, mode=mode, time_limit=time_limit, seed=seed, policy=policy, weight_checked=True,
    )
    lam = _cross_node_cost(cross_node_cost)
    det, allow_dup = _flag("deterministic", deterministic), _flag("allow_duplicates", allow_duplicates)
    if not allow_dup:
        _no_duplicates_fit(problem)
    _executor(executor, ray_address)
    n_workers = _workers(workers, det, executor == "ray")
    prev, mbl, nmc, bpe = _migration(problem, previous, max_balance_loss, node_move_cost, bytes_per_expert)
    mask = None
    if masked_gpus is not None:
        mask = as_mask(masked_gpus, problem.num_layers, problem.num_gpus, problem.slots_per_gpu,
                       problem.num_experts)
        mask = mask if mask.any() else None
    options = SolveOptions(
        windows=windows, objective=objective, tolerance=tol, deterministic=det, workers=n_workers,
        workers_given=None if workers is None else int(workers), allow_duplicates=allow_dup, executor=executor,
        ray_address=ray_address, previous=prev, max_balance_loss=mbl, node_move_cost=nmc,
        bytes_per_expert=bpe, cross_node_cost=lam, mask=mask, requested_policy=policy, forecast=forecast,
        history_windows=n_past,
    )
    for when, message in CONFLICTS:
        if when(problem, options):
            raise InvalidProblemError(message(problem, options))
    return problem, options


def as_previous(previous: object, num_layers: int, num_experts: int, num_replicas: int, num_gpus: int) -> np.ndarray:
    """Validate the deployed placement passed as ``previous``: ``[L, R]`` integer expert
    ids in ``[0, E)``, every expert with a replica in every layer.  Returns int64."""
    from .plan import Plan, plan_violations

    if isinstance(previous, Plan):
        previous = previous.phy2log
    if type(previous).__module__.startswith("torch"):
        previous = previous.detach().cpu().numpy()
    if isinstance(previous, (str, bytes)) or not hasattr(previous, "__len__") and not isinstance(previous, np.ndarray):
        raise InvalidTypeError(f"previous must be an [L, R] integer array or tensor, got {type(previous).__name__}")
    try:
        p = np.asarray(previous)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise InvalidTypeError(f"previous could not be read as an array: {exc}") from None
    if p.dtype.kind not in "iu":
        raise InvalidTypeError(f"previous must hold integer expert ids, got dtype {p.dtype}")
    if p.shape != (num_layers, num_replicas):
        raise InvalidProblemError(
            f"previous has shape {tuple(p.shape)}, expected [num_layers, num_replicas] = [{num_layers}, {num_replicas}]"
        )
    problems = plan_violations(p, num_experts, num_replicas, num_gpus, limit=3)
    if problems:
        raise InvalidProblemError("previous is not a valid placement: " + "; ".join(problems))
    return p.astype(np.int64)


def as_mask(masked_gpus: Any, num_layers: int, num_gpus: int, slots_per_gpu: int, num_experts: int) -> np.ndarray:
    """``[L, G]`` bool from ``masked_gpus``: a list of GPU ids (all layers), a ``[G]`` or
    ``[L, G]`` bool array, or a length-``L`` list of GPU-id lists.  Every layer must keep
    enough active GPUs for one replica per expert."""
    L, G = num_layers, num_gpus
    if type(masked_gpus).__module__.startswith("torch"):
        masked_gpus = masked_gpus.detach().cpu().numpy()
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
            mask[l, _gpu_ids(ids, G)] = True
    else:
        mask[:, _gpu_ids(masked_gpus, G)] = True
    active = G - mask.sum(axis=1)
    bad = np.flatnonzero(active * slots_per_gpu < num_experts)
    if bad.size:
        l = int(bad[0])
        raise InvalidProblemError(
            f"masked_gpus leaves layer {l} {int(active[l])} active GPU(s) x {slots_per_gpu} slots, fewer than "
            f"the {num_experts} experts"
        )
    return mask


def _gpu_ids(ids: Any, G: int) -> np.ndarray:
    a = np.asarray(ids)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise InvalidTypeError(f"masked_gpus must list integer GPU ids, got {ids!r}")
    if a.min() < 0 or a.max() >= G:
        raise InvalidProblemError(f"masked_gpus holds GPU id {int(a.min() if a.min() < 0 else a.max())}, "
                                  f"not in [0, {G})")
    return a.astype(np.int64)


def as_placement(x: object, name: str, empty_ok: bool = False) -> np.ndarray:
    """``x`` (array or tensor) as an int64 ``[L, R]`` placement of expert ids;
    ``empty_ok``: ``-1`` (an empty slot, a masked GPU's) is allowed."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise InvalidTypeError(f"{name} must be an integer [L, R] placement, got dtype {a.dtype}")
    if a.ndim != 2 or a.size == 0:
        raise InvalidProblemError(f"{name} must be a non-empty [L, R] placement, got shape {a.shape}")
    if a.min() < (-1 if empty_ok else 0):
        raise InvalidProblemError(f"{name} holds a negative expert id {int(a.min())}")
    return a.astype(np.int64)
