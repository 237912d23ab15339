"""Replay: what a plan does to serving over time.

:func:`replay` plays a per-step trace ``[steps, layers, experts]`` through a serving
engine's rebalance loop: every ``interval`` steps each policy plans from the last
``window`` steps, and its plan serves the steps that follow.  It reports, per step and
over the run, the MoE-layer time proxy (sum over layers of the busiest GPU's load)
against the mean (balancedness), the replicas and bytes each rebalance copies, and, with
the time model, seconds; all against a static placement, a clairvoyant plan and the
certified lower bound.  ``eplb-opt replay`` is the command line.  ``eplb_opt.replay`` is
this function; the rest is imported from the package (``from eplb_opt.replay import
ReplayPolicy, step_trace``).

Policies (``POLICY_NAMES``; every one plans under the ``"auto"`` rule, hierarchical when
``num_groups % num_nodes == 0``):

* ``ours``: ``eplb_opt.solve(mode="heuristic")`` on the summed window; ``exact``:
  ``mode="exact", deterministic=True, time_limit=exact_time_limit``; ``migrate``:
  ``previous=<deployed placement>, max_balance_loss=max_balance_loss``; ``windows``:
  ``objective=windows_objective`` on the window cut into ``sub_windows`` sub-windows;
  ``forecast``: ``history=`` the earlier of those sub-windows, the latest as ``weight``
  (``solve``'s default forecast with history).
* Peers from their published wheels, loaded as ``eplb-opt bench`` loads them
  (:mod:`eplb_opt.bench.peers`), each given the history its engine gives it: ``deepseek``
  (DeepSeek EPLB, ``sglang==0.5.23``) and ``vllm`` (vLLM 0.33's default policy) the summed
  window; ``sglang_vec`` (SGLang's ``deepseek_vec``) the window's steps
  ``[steps, L, E]``, as SGLang's recorder hands over its buffer.  A peer that cannot be
  loaded is reported in ``ReplayResult.skipped`` with the reason.
* Any :class:`ReplayPolicy`: a name and ``plan(request) -> phy2log``; the
  :class:`PlanRequest` carries the :class:`History` of past steps it may use (summed,
  as steps, or cut into sub-windows) and the deployed placement, so a forecast is one
  more policy.

Rules the figures follow:

* **Schedule.** Rebalances happen at steps ``interval, 2 * interval, ...``; the plan made
  at step ``s`` sees steps ``max(0, s - window) .. s - 1`` and serves ``s .. s + interval - 1``
  (a *served window*; the last may be shorter).  Before the first rebalance every run
  starts from its **initial placement**, deployed before serving starts (it copies
  nothing).  ``initial="plan"`` (default): each policy's own plan of the first ``window``
  steps summed (the shortest interval's length when ``window`` is not given), so no
  policy pays to move away from another's start; it sees the first steps it serves, the
  same for every policy and interval.  The clairvoyant run starts from its plan of the
  first served window; the **static** baseline is eplb-opt's heuristic plan of the first
  ``window`` steps, never rebalanced ("planned once").  ``initial="round_robin"``: every
  run, static included, starts from slot ``j`` of node ``n`` holding expert
  ``n * E / N + (j mod E / N)``, each node its own groups' experts in order with the
  spare slots going round again (``N`` = nodes under the hierarchical rule, else 1: then
  it is ``r mod E``, SGLang's ``trivial`` start-up placement and vLLM's initial one).
  Either obeys the policy rule.
* **Clairvoyant.** eplb-opt's heuristic planned at each rebalance on the summed steps of
  the very window it serves (same interval): what a perfect forecast of the window's
  total reaches.  It is not a bound: another run may beat it.
* **Lower bound.** For each served window, the sum over layers of
  :func:`eplb_opt.lower_bounds` of the window's summed loads (the policy rule's bound: no
  plan obeying it does better).  A plan fixed over a window cannot make the busiest GPU's
  load of the window's *sum* smaller, and a step's busiest GPU carries at least its
  share of it, so the bound is at most every run's ``window_max_load`` total, and that
  at most its ``max_load`` total.  Every run's plans are fixed over each served window
  (copies do not delay a switch), so the bound holds for every run whose plans obey the
  rule (``ReplayRun.obeys_policy``; the global-rule bound holds for any plan).
* **Moves.** Each plan is first aligned to the deployed placement
  (:func:`eplb_opt.align_to_previous`, nodes matched first under the hierarchical rule),
  then counted with :func:`eplb_opt.count_moves`: a move is a replica on a GPU that held
  no replica of that expert.  No policy pays for labels.  A move is **same-node** when
  some replica of the expert lived on the receiving GPU's node before, else
  **cross-node**.
* **Time model** (on by default; ``gpu_tokens_per_s=None`` turns it off): a step's
  compute time is its ``max_load / gpu_tokens_per_s``; a rebalance's copy time is the
  slowest receiving GPU's ``same-node bytes / same-node rate + cross-node bytes /
  cross-node rate``, and is charged to the steps it overlaps from the rebalance step on
  (:meth:`ReplayResult.step_time_s`), so a run's time grows by its copy time.  Without
  copy costs the shortest interval would always win.
* **Reading.** ``.npy`` files (memory-mapped), single-tensor ``.safetensors`` files and
  numpy arrays are read chunk by chunk; ``.npz``, ``.pt``, ADRS ``.json``, SGLang and
  TensorRT-LLM dumps load whole (see :mod:`eplb_opt.traces`).  Beyond the trace, a
  replay holds one float64 per step per run (8 MB per million steps per run) and, for
  ``sglang_vec``, the window's steps as float32.

Defaults of the time model (DeepSeek-V3-shaped, H100-class):

* ``gpu_tokens_per_s = 5.6e6``: an H100 SXM5 does 989 TFLOPS dense BF16 (NVIDIA H100
  datasheet); a DeepSeek-V3 expert (``config.json``: hidden_size 7168,
  moe_intermediate_size 2048) costs ``3 x 7168 x 2048 x 2`` = 88.1 MFLOP per token; at
  50 % of peak in grouped expert GEMMs that is 5.6 million tokens per second per layer.
* ``link_gbps = (450, 50)``: NVLink 4 gives an H100 SXM5 900 GB/s in both directions
  together (datasheet), 450 GB/s received; a DGX H100 has one ConnectX-7 NDR 400 Gb/s
  InfiniBand port per GPU, 50 GB/s.
* ``bytes_per_expert = 44_040_192``: a DeepSeek-V3 expert's ``3 x 7168 x 2048`` weights in
  FP8 (its released format; the block scales add 0.02 %).
"""

from __future__ import annotations

import math
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InvalidProblemError, InvalidTypeError
from ._engine import INITIAL_DESCRIPTIONS, Context, Progress, replay_interval
from ._policies import (BASELINES, DEFAULT_POLICIES, POLICY_NAMES, PlanRequest, PolicyError, PolicyOptions,
                        ReplayPolicy, Topology, load_policies)
from ._result import ReplayResult, ReplayRun, TimeModel, frozen_map, make_run
from ._source import CHUNK_BYTES, History, default_chunk, open_trace
from ._trace import KIND_WINDOW_STEPS, step_trace, step_trace_parameters

__all__ = [
    "BASELINES", "CHUNK_BYTES", "DEFAULT_BYTES_PER_EXPERT", "DEFAULT_GPU_TOKENS_PER_S", "DEFAULT_LINK_GBPS",
    "DEFAULT_POLICIES", "History", "INITIAL_PLACEMENTS", "POLICY_NAMES", "PlanRequest", "PolicyError", "ReplayPolicy", "ReplayResult",
    "KIND_WINDOW_STEPS", "ReplayRun", "TimeModel", "Topology", "replay", "step_trace", "step_trace_parameters",
]

DEFAULT_GPU_TOKENS_PER_S = 5.6e6
DEFAULT_LINK_GBPS = (450.0, 50.0)
DEFAULT_BYTES_PER_EXPERT = 44_040_192
INITIAL_PLACEMENTS = ("plan", "round_robin")



def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise InvalidProblemError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _number(name: str, value: Any, low: float, *, open_low: bool, high: float = math.inf) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (open_low and v == low) or v >= high:
        rng = f"{'>' if open_low else '>='} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
        raise InvalidProblemError(f"{name} must be a finite number {rng}, got {value!r}")
    return v


def _intervals(interval: Any, steps: int) -> list[int]:
    items = [interval] if isinstance(interval, (int, np.integer)) and not isinstance(interval, bool) else interval
    try:
        vals = [_int("interval", v, 1) for v in items]
    except TypeError:
        raise InvalidTypeError(f"interval must be an integer or a list of integers, got {interval!r}") from None
    if not vals:
        raise InvalidProblemError("interval must name at least one interval, got an empty list")
    if len(set(vals)) != len(vals):
        raise InvalidProblemError(f"interval lists a value twice: {vals}")
    too_long = [v for v in vals if v >= steps]
    if too_long:
        raise InvalidProblemError(f"interval {too_long[0]} leaves no rebalance in a trace of {steps} steps "
                                  f"(an interval must be < the number of steps)")
    return sorted(vals)


def _topology(shape: tuple[int, int, int], num_replicas: Any, num_groups: Any, num_nodes: Any,
              num_gpus: Any) -> Topology:
    _, L, E = shape
    R, Gr = _int("num_replicas", num_replicas, 1), _int("num_groups", num_groups, 1)
    N, G = _int("num_nodes", num_nodes, 1), _int("num_gpus", num_gpus, 1)
    if R < E:
        raise InvalidProblemError(f"num_replicas={R} must be >= the trace's {E} experts")
    if R % G or G % N:
        raise InvalidProblemError(f"num_gpus={G} must divide num_replicas={R}, and num_nodes={N} must divide num_gpus")
    topo = Topology(L, E, R, Gr, N, G)
    if topo.hierarchical and E % Gr:
        raise InvalidProblemError(f"num_groups={Gr} must divide the trace's {E} experts (hierarchical policy: "
                                  f"num_groups % num_nodes == 0)")
    return topo


def _time_model(gpu_tokens_per_s: Any, link_gbps: Any) -> TimeModel | None:
    if gpu_tokens_per_s is None:
        return None
    rate = _number("gpu_tokens_per_s", gpu_tokens_per_s, 0.0, open_low=True)
    try:
        same, cross = link_gbps
    except (TypeError, ValueError):
        raise InvalidTypeError(f"link_gbps must be a pair (same node, cross node) of GB/s, got {link_gbps!r}") from None
    return TimeModel(rate, _number("link_gbps[0] (same node)", same, 0.0, open_low=True),
                     _number("link_gbps[1] (cross node)", cross, 0.0, open_low=True))


def _options(exact_time_limit: Any, max_balance_loss: Any, sub_windows: Any, windows_objective: Any) -> PolicyOptions:
    if windows_objective not in ("worst", "mean"):
        raise InvalidProblemError(f"windows_objective must be 'worst' or 'mean', got {windows_objective!r}")
    return PolicyOptions(
        exact_time_limit=_number("exact_time_limit", exact_time_limit, 0.0, open_low=False),
        max_balance_loss=_number("max_balance_loss", max_balance_loss, 0.0, open_low=False, high=1.0),
        sub_windows=_int("sub_windows", sub_windows, 1), windows_objective=windows_objective)


def replay(
    trace: Any,
    *,
    num_replicas: int,
    num_gpus: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    policies: Sequence[str | ReplayPolicy] = DEFAULT_POLICIES,
    interval: int | Sequence[int] = 1000,
    window: int | None = None,
    bytes_per_expert: int = DEFAULT_BYTES_PER_EXPERT,
    gpu_tokens_per_s: float | None = DEFAULT_GPU_TOKENS_PER_S,
    link_gbps: tuple[float, float] = DEFAULT_LINK_GBPS,
    exact_time_limit: float = 1.0,
    max_balance_loss: float = 0.005,
    sub_windows: int = 4,
    windows_objective: str = "worst",
    clairvoyant: bool = True,
    initial: str = "plan",
    chunk_steps: int | None = None,
    progress: bool | None = None,
) -> ReplayResult:
    """Replay a per-step trace through each policy's rebalance loop (the rules: the
    ``eplb_opt.replay`` module docs).

    Args:
        trace: per-step token counts ``[steps, layers, experts]``: a path read as
            :func:`eplb_opt.read_trace` reads it (``.npy`` and single-tensor
            ``.safetensors`` stream), a numpy array or memmap (streams), or a torch tensor.
            At least 2 steps, finite and non-negative.
        num_replicas, num_gpus, num_groups, num_nodes: the topology, as for
            :func:`eplb_opt.solve`; every policy plans under the ``"auto"`` rule.
        policies: names from ``POLICY_NAMES`` (``ours``, ``exact``, ``migrate``,
            ``windows``, ``forecast``, ``deepseek``, ``vllm``, ``sglang_vec``) and/or
            :class:`ReplayPolicy` objects.  ``static`` and ``clairvoyant`` always run.
        interval: steps between rebalances, or a list of them (an interval sweep).
        window: steps each plan is made from (default: the interval, as SGLang's recorder
            buffers ``eplb_rebalance_num_iterations`` steps).
        bytes_per_expert: bytes one replica copy moves.
        gpu_tokens_per_s: tokens per second one GPU serves through one MoE layer; None
            turns the time model off (no seconds, copies free).
        link_gbps: ``(same node, cross node)`` GB/s a GPU receives at.
        exact_time_limit: ``exact``'s deterministic budget per plan (``time_limit``).
        max_balance_loss: ``migrate``'s balance budget.
        sub_windows, windows_objective: ``windows`` plans for the ``"worst"`` or ``"mean"``
            of this many consecutive sub-windows of its window; ``forecast`` plans from
            the same sub-windows as history.
        clairvoyant: also replay the clairvoyant plan (one heuristic plan per window).
        initial: what every run serves with before its first rebalance: ``"plan"`` (its
            own plan of the first ``window`` steps, default: the shortest interval) or
            ``"round_robin"`` (module docs).
        chunk_steps: steps read and scored at a time (default: 32 MiB of float64).
        progress: progress on stderr (default: when stderr is a terminal).

    Returns:
        :class:`ReplayResult`: per-step and per-rebalance figures of every run, and
        ``summary()`` / ``totals()`` / ``to_dict()``.

    Raises:
        InvalidProblemError / InvalidTypeError: a bad argument (named with its value).
        TraceError: a trace that cannot be read, or bad loads in it (named with the steps).
    """
    t0 = time.perf_counter()
    with open_trace(trace) as source:
        setup = _setup(source, num_replicas=num_replicas, num_gpus=num_gpus, num_groups=num_groups,
                       num_nodes=num_nodes, policies=policies, interval=interval, window=window,
                       bytes_per_expert=bytes_per_expert, gpu_tokens_per_s=gpu_tokens_per_s, link_gbps=link_gbps,
                       exact_time_limit=exact_time_limit, max_balance_loss=max_balance_loss,
                       sub_windows=sub_windows, windows_objective=windows_objective, clairvoyant=clairvoyant,
                       initial=initial, chunk_steps=chunk_steps, progress=progress)
        runs, failed, edges, bounds = _run(setup)
        mean_load = np.zeros(source.shape[0])
        for c0, steps in source.chunks(0, source.shape[0], setup.ctx.chunk):
            mean_load[c0:c0 + len(steps)] = steps.sum(axis=2).sum(axis=1) / setup.ctx.topo.num_gpus
        setup.ctx.progress.done()
        return _result(setup, mean_load, edges, bounds, runs, failed, time.perf_counter() - t0)


@dataclass
class _Setup:
    ctx: Context
    intervals: list[int]
    window: int | None
    clairvoyant: bool
    policies: list[ReplayPolicy]
    skipped: dict[str, str]
    model: TimeModel | None
    initial: str


def _setup(source: Any, **a: Any) -> _Setup:
    """Check every argument (before any planning starts) and build the replay's context."""
    T = source.shape[0]
    if T < 2:
        raise InvalidProblemError(f"trace must hold at least 2 steps to replay, got {T}")
    topo = _topology(source.shape, a["num_replicas"], a["num_groups"], a["num_nodes"], a["num_gpus"])
    intervals = _intervals(a["interval"], T)
    win = None if a["window"] is None else _int("window", a["window"], 1)
    model = _time_model(a["gpu_tokens_per_s"], a["link_gbps"])
    bpe = _int("bytes_per_expert", a["bytes_per_expert"], 0)
    for flag in ("clairvoyant", "progress"):
        if not isinstance(a[flag], (bool, np.bool_)) and not (flag == "progress" and a[flag] is None):
            raise InvalidTypeError(f"{flag} must be True or False{' or None' if flag == 'progress' else ''}, "
                                   f"got {a[flag]!r}")
    if a["initial"] not in INITIAL_PLACEMENTS:
        raise InvalidProblemError(f"initial must be one of {INITIAL_PLACEMENTS}, got {a['initial']!r}")
    chunk = default_chunk(source.shape) if a["chunk_steps"] is None else _int("chunk_steps", a["chunk_steps"], 1)
    opts = _options(a["exact_time_limit"], a["max_balance_loss"], a["sub_windows"], a["windows_objective"])
    loaded, skipped = load_policies(a["policies"], opts)
    show = sys.stderr.isatty() if a["progress"] is None else bool(a["progress"])
    first = min(win or intervals[0], T)
    ctx = Context(source, topo, chunk,
                  None if model is None else (model.same_node_gbps * 1e9, model.cross_node_gbps * 1e9),
                  bpe, Progress(show, intervals), a["initial"], first)
    described = INITIAL_DESCRIPTIONS[a["initial"]].format(n=first)
    return _Setup(ctx, intervals, win, bool(a["clairvoyant"]), loaded, skipped, model, described)


def _run(setup: _Setup) -> tuple[list[ReplayRun], dict[str, str], dict, tuple[dict, dict]]:
    """Every interval: (finished runs, failed runs' reasons, window edges, (bounds, global bounds))."""
    runs, failed, edges, bounds = [], {}, {}, ({}, {})
    for iv in setup.intervals:
        w = iv if setup.window is None else setup.window
        done, edges[iv], bounds[0][iv], bounds[1][iv] = replay_interval(setup.ctx, setup.policies, iv, w,
                                                                        setup.clairvoyant)
        for name, r in done.items():
            if r.failed is not None:
                failed[f"{name}@{iv}"] = r.failed
            else:
                runs.append(make_run(name, iv, w, r.max_load, r.window_max_load, r.events, r.obeys))
    return runs, failed, edges, bounds


def _result(setup: _Setup, mean_load: np.ndarray, edges: dict, bounds: tuple, runs: list, failed: dict,
            elapsed: float) -> ReplayResult:
    ctx, topo = setup.ctx, setup.ctx.topo
    mean_load.setflags(write=False)
    for d in (edges, *bounds):
        for v in d.values():
            v.setflags(write=False)
    descriptions = {"static": "the static placement (see initial_placement), never rebalanced",
                    "clairvoyant": "eplb-opt heuristic planned on the summed steps it serves"}
    descriptions.update({p.name: p.description for p in setup.policies})
    return ReplayResult(
        steps=ctx.source.shape[0], num_layers=topo.num_layers, num_experts=topo.num_experts,
        num_replicas=topo.num_replicas, num_groups=topo.num_groups, num_nodes=topo.num_nodes,
        num_gpus=topo.num_gpus, hierarchical=topo.hierarchical, intervals=tuple(setup.intervals),
        mean_load=mean_load, window_edges=frozen_map(edges), lower_bound=frozen_map(bounds[0]),
        global_lower_bound=frozen_map(bounds[1]), runs=tuple(runs), skipped=frozen_map(setup.skipped),
        failed=frozen_map(failed), bytes_per_expert=ctx.bytes_per_expert, time_model=setup.model,
        trace=ctx.source.label, streamed=ctx.source.streams, initial_placement=setup.initial,
        policy_descriptions=frozen_map(descriptions), elapsed_s=elapsed)


class _CallableModule(types.ModuleType):
    """``eplb_opt.replay`` is both this package and the function: importing the package
    (``import eplb_opt.replay``) makes Python bind the name to the module on ``eplb_opt``,
    so calling the module calls :func:`replay`."""

    def __call__(self, *args: Any, **kwargs: Any) -> ReplayResult:
        return replay(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
