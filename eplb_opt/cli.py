"""Command-line interface: ``eplb-opt <command> ...``.

Commands:
    example   plan a bundled synthetic workload and print per-layer and overall figures.
    plan      plan recorded loads and write a plan file.
    evaluate  check a plan file and score it on load files.
    report    draw a plan's per-GPU loads, balancedness, gaps and replica counts.
    score     grade any rebalance_experts-shaped function against certified bounds.
    bench     every policy and peer on a benchmark suite.
    replay    replay a per-step trace through each policy's rebalance loop over time.

Exit status: 0 success; 1 an evaluated plan is invalid (or a scored function crashed or
broke a rule); 2 bad input or usage; 3 Ray could not be started or joined; 130
interrupted (no plan file written or replaced).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .errors import EplbOptError, ExecutorError, InvalidProblemError, SolveInterrupted
from .api import SolveResult, solve
from .budget import DEFAULT_SECONDS
from .problem import FORECASTS
from .workloads import PRESETS, example_weight

__all__ = ["main"]


def _binding(result: SolveResult) -> list[str]:
    """Name of the bound component that sets each layer's lower bound."""
    names = list(result.bounds.components)
    stack = np.stack([result.bounds.components[n] for n in names])
    return [names[i] for i in stack.argmax(axis=0)]


# What the printed figures mean (example, plan, evaluate, score print these).
_TABLE_LEGEND = (
    "loads are token counts per expert; 'balance' = mean / max GPU load of the layer (1.0 is perfect);\n"
    "'lower bound' = a certified floor on the busiest GPU's load that no plan under the policy can go below;\n"
    "'gap' = 1 - lower_bound / max_load (0% proves the layer's plan optimal);\n"
    "'bound' = the part of the lower bound that sets it: average (total load / GPUs), replica (the\n"
    "  heaviest single replica under the best replica counts), cardinality (whole experts per GPU when\n"
    "  there is no spare slot), node / node_replica (hierarchical policy: the heaviest node's load or\n"
    "  replicas under the best group-to-node assignment)"
)
_SLOT_LEGEND = (
    "slot-level balancedness: the same mean / max ratio over single replica slots instead of GPUs, i.e. how "
    "evenly the load is split between individual replicas (lower than the GPU figure: a GPU's several slots "
    "even each other out)"
)


_SCORE_LEGEND = (
    "bal: in-window balancedness (mean / max GPU load, summed over layers; 1.0 is perfect); next: the same plan "
    "on the next window;\nslot: slot-level balancedness, the same ratio over single replica slots instead of "
    "GPUs; gap: to eplb-opt's certified lower bound"
)


def _summary(result: SolveResult) -> str:
    """``result.summary()`` with its hints in command-line terms (``--policy global``,
    not Python's ``policy='global'``)."""
    return (result.summary().replace("try policy='global'", "try --policy global")
            .replace("call eplb_opt.warm_up() at start-up", "give a larger --time-limit"))


def _warm_up(mode: str) -> None:
    """Exact mode from the command line: load OR-Tools (about 0.5 s) before the clock
    starts, so that ``--time-limit`` buys search time (a fresh process would otherwise
    skip CP-SAT under short limits)."""
    if mode != "exact":
        return
    from .status import warm_up

    try:
        warm_up()
    except Exception:  # noqa: BLE001 - solve reports a missing or broken OR-Tools itself
        pass


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _auto_note(policy: str, groups: int, nodes: int, masked: bool) -> str | None:
    """Which policy ``--policy auto`` resolves to, and why (None on one node, where the
    choice changes nothing)."""
    if policy != "auto" or nodes <= 1:
        return None
    if groups % nodes:
        return (f"policy auto -> global: {_count(groups, 'group')} {'does' if groups == 1 else 'do'} not divide "
                f"evenly over {nodes} nodes (the hierarchical policy puts whole groups on each node)")
    if masked:
        return (f"policy auto -> global: masked GPUs leave the {nodes} nodes with unequal GPU counts "
                "(the hierarchical policy needs equal nodes)")
    return (f"policy auto -> hierarchical: {groups} groups divide evenly over {nodes} nodes "
            "(pass --policy global to let an expert's replicas cross nodes)")


def _table(result: SolveResult) -> str:
    binding = _binding(result)
    head = f"{'layer':>5} {'max load':>12} {'mean load':>12} {'balance':>8} {'lower bound':>12} {'gap':>8}  bound"
    rows = [head, "-" * len(head)]
    for l in range(len(result.max_load)):
        top, mean = result.max_load[l], result.mean_load[l]
        bal = mean / top if top > 0 else 1.0
        rows.append(
            f"{l:>5} {top:>12.1f} {mean:>12.1f} {bal:>8.4f} {result.lower_bound[l]:>12.1f} "
            f"{result.gap[l]:>8.3%}  {binding[l]}"
        )
    return "\n".join(rows)


def _prog() -> str:
    """How to call this command again from the current directory: ``eplb-opt`` when that
    name on ``PATH`` is this script, else the path it was run by (e.g.
    ``.venv/bin/eplb-opt`` in a shell where the virtual environment is not active)."""
    import os
    import shutil

    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.name != "eplb-opt" or not script.exists():
        return "eplb-opt"
    found = shutil.which("eplb-opt")
    if found and Path(found).resolve() == script.resolve():
        return "eplb-opt"
    try:
        rel = os.path.relpath(script.absolute())
    except ValueError:                 # another drive (Windows)
        rel = ".."
    return str(script.absolute()) if rel.startswith("..") else rel


def _write_example_loads(args: argparse.Namespace) -> int:
    """The example workload as load files: window 0 (to plan) and window 1 (the next)."""
    from .planfile import atomic_write
    from .workloads import generate

    folder = Path(args.write_loads)
    folder.mkdir(parents=True, exist_ok=True)
    w = generate(args.preset, windows=2, seed=args.seed)
    def saver(arr: np.ndarray):
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:        # a file object: np.save would add ".npy" to a name
                np.save(fh, arr)
        return write

    for i in range(2):
        path = folder / f"window{i}.npy"
        atomic_write(path, saver(w[i]))
        print(f"wrote {path}  ({args.preset}, seed {args.seed}, window {i}: {w.shape[1]} layers x {w.shape[2]} experts)")
    t = PRESETS[args.preset].topology()
    print(f"plan it with: {_prog()} plan {folder / 'window0.npy'} --replicas {t['num_replicas']} "
          f"--groups {t['num_groups']} --nodes {t['num_nodes']} --gpus {t['num_gpus']} -o plan.json")
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    if args.write_loads:
        return _write_example_loads(args)
    preset = PRESETS[args.preset]
    weight = example_weight(args.preset, seed=args.seed)
    note = _auto_note(args.policy, preset.num_groups, preset.num_nodes, masked=False)
    if note:
        print(f"eplb-opt: {note}", file=sys.stderr)
    _warm_up(args.mode)
    result = solve(
        weight, **preset.topology(), mode=args.mode, time_limit=args.time_limit, seed=args.seed, policy=args.policy
    )
    if args.json:
        out = {
            "preset": preset.as_dict(),
            "seed": args.seed,
            "policy": result.policy,
            "balancedness": result.balancedness,
            "slot_balancedness": result.slot_balancedness,
            "runtime_s": result.runtime,
            "layers": [
                {
                    "layer": l,
                    "max_load": float(result.max_load[l]),
                    "mean_load": float(result.mean_load[l]),
                    "lower_bound": float(result.lower_bound[l]),
                    "gap": float(result.gap[l]),
                    "status": result.status[l],
                }
                for l in range(len(result.max_load))
            ],
            "events": list(result.events),
        }
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    print(
        f"eplb-opt {__version__}: example workload '{preset.name}' (seed {args.seed}): "
        f"{preset.num_layers} layers x {preset.num_experts} experts, {preset.num_replicas} replicas, "
        f"{preset.num_groups} groups, {preset.num_nodes} nodes, {preset.num_gpus} GPUs; mode {args.mode}"
    )
    if not args.quiet:
        print(_TABLE_LEGEND + "\n")
        print(_table(result))
        print()
    print(_summary(result))
    print(_SLOT_LEGEND)
    return 0


class _Progress:
    """A progress bar on stderr for calls expected to run more than a couple of seconds
    (only on a terminal, or when forced)."""

    def __init__(self, seconds: float | None, label: str, enabled: bool) -> None:
        self.seconds, self.label, self.enabled = seconds, label, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        start = time.perf_counter()
        if self._stop.wait(2.0):
            return
        while not self._stop.wait(0.25):
            t = time.perf_counter() - start
            if self.seconds:
                frac = min(1.0, t / self.seconds)
                bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
                sys.stderr.write(f"\r{self.label} [{bar}] {t:5.1f} / {self.seconds:g} s")
            else:
                sys.stderr.write(f"\r{self.label} {t:5.1f} s")
            sys.stderr.flush()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


def _read_loads(path: str, window: int | None = None) -> "np.ndarray":
    from .traces import read_trace

    return read_trace(path, window=window).sum(axis=0)


def _topology_from(plan_meta: dict, path: str) -> dict:
    params = plan_meta.get("parameters") if isinstance(plan_meta, dict) else None
    if not params:
        raise InvalidProblemError(f"plan file {path} records no parameters (not written by eplb-opt plan?)")
    return params


def _gpu_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidProblemError(f"--masked-gpus must be comma-separated GPU ids, got {text!r}") from None


def _cmd_plan(args: argparse.Namespace) -> int:
    """``plan``: check the arguments and the destination, read the loads, solve, write
    the plan file (or TensorRT-LLM's YAML) and print the figures."""
    from .planfile import TENSORRT_LLM_SUFFIXES, export_tensorrt_llm
    from .traces import read_trace

    # -o FILE.yaml / .yml: TensorRT-LLM's moe_load_balancer.yaml instead of a plan file.
    trtllm = Path(args.output).suffix.lower() in TENSORRT_LLM_SUFFIXES
    masked = _plan_flags(args, trtllm)
    windows = read_trace(args.loads, window=args.window)
    # The objective decides how windows count; "sum" plans for their total.
    loads = windows.sum(axis=0) if args.objective == "sum" else windows
    history = None if args.history is None else _read_history(args.history, windows.shape)
    layer_ids = _tensorrt_llm_layers(args, windows.shape[1]) if trtllm else None
    if not _destination_ok(args, trtllm):
        return 2
    kw = _solve_kwargs(args, masked)
    note = _auto_note(args.policy, args.groups, args.nodes, masked=bool(masked))
    if note:
        print(f"eplb-opt: {note}", file=sys.stderr)
    budget = args.time_limit if args.time_limit is not None else (DEFAULT_SECONDS if args.mode == "exact" else None)
    show = args.progress or (sys.stderr.isatty() and not args.json)
    try:
        _warm_up(args.mode)
        with _Progress(budget, f"planning ({args.mode})", show):
            result = solve(loads, history=history, forecast=args.forecast, **kw)
    except SolveInterrupted as stop:
        return _plan_interrupted(args, stop)
    if trtllm:
        path = export_tensorrt_llm(result.plan, args.output, layer_ids=layer_ids, overwrite=True)
    else:
        path = result.plan.save(args.output, overwrite=True)
    if args.json:
        json.dump(_plan_json(result, path, layer_ids if trtllm else None), sys.stdout, indent=1)
        print()
    else:
        print(_summary(result))
        if trtllm:
            print(f"wrote {path} (TensorRT-LLM load balancer: model layers {layer_ids[0]}..{layer_ids[-1]}, "
                  f"num_slots {args.replicas}; serve with ep_size {args.gpus})")
        else:
            print(f"wrote {path}")
    return 0


def _read_history(path: str, shape: tuple[int, ...]) -> "np.ndarray":
    """``--history FILE``: past windows ``[H, L, E]``, oldest first (a ``[L, E]`` file is
    one window), in any format ``plan`` reads loads from; each step of the file is one
    window.  Its layers and experts must be the loads'."""
    from .traces import read_trace

    hist = read_trace(path, window=1)          # every step of the file is one window
    if tuple(hist.shape[1:]) != tuple(shape[1:]):
        raise InvalidProblemError(f"--history {path} holds windows of shape {tuple(hist.shape[1:])} [layers, experts], "
                                  f"but the loads are {tuple(shape[1:])}")
    return hist


def _plan_flags(args: argparse.Namespace, trtllm: bool) -> list[int] | None:
    """The flag combinations ``plan`` refuses; returns the masked GPU ids."""
    if args.forecast is not None and args.history is None:
        raise InvalidProblemError(f"--forecast {args.forecast} needs --history FILE (the past windows it forecasts "
                                  "from)")
    if args.first_layer is not None and not trtllm:
        raise InvalidProblemError(f"--first-layer applies to a TensorRT-LLM output (-o FILE.yaml or .yml), "
                                  f"got -o {args.output}")
    if args.first_layer is not None and args.first_layer < 0:
        raise InvalidProblemError(f"--first-layer must be >= 0, got {args.first_layer}")
    masked = _gpu_list(args.masked_gpus)
    if masked and args.policy in ("hierarchical", "spill"):
        # An explicit choice is never quietly changed: solve would plan masked layers with
        # the global policy.
        raise InvalidProblemError(
            f"--policy {args.policy} cannot be combined with --masked-gpus {args.masked_gpus}: masked GPUs leave "
            f"the nodes with unequal GPU counts, and the {args.policy} policy needs equal nodes; pass "
            "--policy global (or --policy auto, which plans around masked GPUs with the global policy)")
    if trtllm and args.masked_gpus is not None:
        raise InvalidProblemError("--masked-gpus leaves empty slots, which TensorRT-LLM's load balancer cannot "
                                  f"hold (every slot needs an expert); write a plan file instead of {args.output}")
    if args.previous is None and (args.max_balance_loss is not None or args.bytes_per_expert is not None):
        raise InvalidProblemError("--max-balance-loss and --bytes-per-expert need --previous PLAN")
    return masked


def _tensorrt_llm_layers(args: argparse.Namespace, L: int) -> list[int]:
    """The model layer ids of a TensorRT-LLM output: the dump's own, or ``--first-layer``
    on (checked against the dump's), or ``0..L-1``."""
    from .traces import trace_layer_ids

    layer_ids = trace_layer_ids(args.loads)     # a TensorRT-LLM dump knows its model layers
    if args.first_layer is not None:
        wanted = list(range(args.first_layer, args.first_layer + L))
        if layer_ids is not None and layer_ids != wanted:
            raise InvalidProblemError(
                f"--first-layer {args.first_layer} gives model layers {wanted[0]}..{wanted[-1]}, but the "
                f"TensorRT-LLM dump {args.loads} recorded layers {layer_ids[0]}..{layer_ids[-1]} "
                f"({len(layer_ids)} layers); leave --first-layer out to use the dump's")
        return wanted
    return list(range(L)) if layer_ids is None else layer_ids


def _destination_ok(args: argparse.Namespace, trtllm: bool) -> bool:
    """Refuse a destination we could not write before the solve, not after it; False
    (and a message) when the plan file exists without ``--overwrite``."""
    from .planfile import TENSORRT_LLM_SUFFIXES, check_destination

    if args.output and Path(args.output).exists() and not Path(args.output).is_dir() and not args.overwrite:
        print(f"eplb-opt: {args.output} exists (pass --overwrite to replace it)", file=sys.stderr)
        return False
    if trtllm:
        check_destination(args.output, suffixes=TENSORRT_LLM_SUFFIXES)
    else:
        check_destination(args.output)
    if args.partial_output is not None:
        if Path(args.partial_output).resolve() == Path(args.output).resolve():
            raise InvalidProblemError("--partial-output must differ from --output (the plan file stays untouched)")
        check_destination(args.partial_output, overwrite=args.overwrite)
    return True


def _solve_kwargs(args: argparse.Namespace, masked: list[int] | None) -> dict[str, Any]:
    """``solve``'s keyword arguments from ``plan``'s flags."""
    from .plan import Plan

    kw: dict[str, Any] = dict(
        num_replicas=args.replicas, num_groups=args.groups, num_nodes=args.nodes, num_gpus=args.gpus,
        mode=args.mode, time_limit=args.time_limit, seed=args.seed, policy=args.policy,
        deterministic=args.deterministic, workers=args.workers, objective=args.objective,
        masked_gpus=masked, cross_node_cost=args.cross_node_cost,
    )
    if args.previous is not None:
        kw.update(previous=Plan.load(args.previous).phy2log, max_balance_loss=args.max_balance_loss,
                  node_move_cost=args.node_move_cost, bytes_per_expert=args.bytes_per_expert)
    if args.ray is not None:
        kw["executor"] = "ray"
        kw["ray_address"] = args.ray or None
    return kw


def _plan_interrupted(args: argparse.Namespace, stop: SolveInterrupted) -> int:
    """Ctrl-C during ``plan``: the plan file (--output) is never written or replaced; the
    partial plan goes only where --partial-output says.  Exit status 130."""
    print(f"\neplb-opt: interrupted during {stop.stage}; {args.output} was not written or replaced",
          file=sys.stderr)
    if stop.partial is None:
        print("eplb-opt: no finished plan to save (with --previous only a plan near it counts)", file=sys.stderr)
    elif args.partial_output is None:
        print("eplb-opt: pass --partial-output FILE to keep the plan finished so far", file=sys.stderr)
    else:
        path = stop.partial.plan.save(args.partial_output, overwrite=args.overwrite)
        print(f"eplb-opt: saved the plan finished before the interrupt (verified; "
              f"balancedness {stop.partial.balancedness:.4f}, gap max {stop.partial.gap.max():.4%}) to {path}",
              file=sys.stderr)
    return 130


def _plan_json(result: SolveResult, path: Path, layer_ids: list[int] | None) -> dict[str, Any]:
    """``plan --json``'s summary of a result."""
    out: dict[str, Any] = {
        "plan": str(path), "policy": result.policy, "balancedness": result.balancedness,
        "gap_max": float(result.gap.max()), "gap_mean": float(result.gap.mean()), "status": list(result.status),
        "events": list(result.events), "runtime_s": result.runtime, "objective": result.objective,
    }
    if layer_ids is not None:
        out["format"] = "tensorrt-llm"
        out["layer_ids"] = layer_ids
    if result.window_balancedness is not None:
        out["window_balancedness"] = list(result.window_balancedness)
    if result.off_node_share is not None:
        out["off_node_share"] = result.off_node_share
    if result.migration is not None:
        m = result.migration
        out["migration"] = {"moves": int(m.moves.sum()), "cost": float(m.cost.sum()), "bytes": m.bytes,
                            "baseline_moves": int(m.baseline_moves.sum()), "transfers": len(m.transfers)}
    return out


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .bounds import lower_bounds
    from .metrics import balancedness, gpu_loads, slot_loads
    from .plan import Plan, plan_violations

    plan = Plan.load(args.plan)
    prm = _topology_from(dict(plan.metadata), args.plan)
    p2l = plan.to_numpy()[0]
    hier = prm.get("policy") == "hierarchical"
    mask = None if prm.get("masked_gpus") is None else np.asarray(prm["masked_gpus"], dtype=bool)
    problems = plan_violations(
        p2l, plan.num_experts, plan.num_replicas, prm["num_gpus"], num_groups=prm["num_groups"],
        num_nodes=prm["num_nodes"], hierarchical=hier, allow_duplicates=prm.get("allow_duplicates", True),
        masked=mask,
    )
    out = {"plan": args.plan, "valid": not problems, "problems": problems, "policy": prm.get("policy"), "loads": []}
    for path in args.loads:
        w = _read_loads(path)
        if w.shape != (plan.num_layers, plan.num_experts):
            raise InvalidProblemError(f"loads file {path} holds loads {w.shape}, the plan is for "
                                      f"{(plan.num_layers, plan.num_experts)}")
        if problems:
            break
        g = gpu_loads(w, p2l, prm["num_gpus"])
        if mask is None:
            lb = lower_bounds(w, plan.num_replicas, prm["num_gpus"], hierarchical=hier,
                              num_groups=prm["num_groups"], num_nodes=prm["num_nodes"]).lower_bound
        else:
            from .masked import lower_bound

            lb = lower_bound(w, plan.num_replicas, mask)     # each layer's active GPUs
        top = g.max(axis=1)
        gap = np.where(top > 0, 1 - np.minimum(lb, top) / np.where(top > 0, top, 1), 0.0)
        out["loads"].append({"file": path, "balancedness": balancedness(g),
                             "slot_balancedness": balancedness(slot_loads(w, p2l)),
                             "gap_max": float(gap.max()), "gap_mean": float(gap.mean()),
                             "ceiling": float(min(1.0, g.mean(axis=1).sum() / max(lb.sum(), 1e-300)))})
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(f"{args.plan}: {'valid' if not problems else 'INVALID'} plan, {plan.num_layers} layers x "
              f"{plan.num_experts} experts, {plan.num_replicas} replicas, policy {prm.get('policy')}")
        for prob in problems:
            print(f"  broken: {prob}")
        for r in out["loads"]:
            print(f"  {r['file']}: balancedness {r['balancedness']:.6f} (certified ceiling {r['ceiling']:.6f}), "
                  f"slot-level {r['slot_balancedness']:.6f}, gap max {r['gap_max']:.4%} mean {r['gap_mean']:.4%}")
        if out["loads"]:
            print("balancedness: sum of mean GPU loads / sum of max GPU loads over the layers (1.0 is perfect); "
                  "certified ceiling: no plan under the policy can do better; " + _SLOT_LEGEND)
    return 1 if problems else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .plan import Plan
    from .report import write_report

    plan = Plan.load(args.plan)
    prm = _topology_from(dict(plan.metadata), args.plan)
    w = _read_loads(args.loads)
    if w.shape != (plan.num_layers, plan.num_experts):
        raise InvalidProblemError(f"loads file {args.loads} holds loads {w.shape}, the plan is for "
                                  f"{(plan.num_layers, plan.num_experts)}")
    title = (f"{Path(args.plan).name} on {Path(args.loads).name}: {plan.num_layers} layers x {plan.num_experts} "
             f"experts, {plan.num_replicas} replicas on {prm['num_gpus']} GPUs ({prm.get('policy')} policy, "
             f"{prm.get('mode')} mode)")
    mask = None if prm.get("masked_gpus") is None else np.asarray(prm["masked_gpus"], dtype=bool)
    path = write_report(args.output, w, plan.to_numpy()[0], num_gpus=prm["num_gpus"],
                        hierarchical=prm.get("policy") == "hierarchical", num_groups=prm["num_groups"],
                        num_nodes=prm["num_nodes"], title=title, masked=mask)
    print(f"wrote {path}")
    return 0


class _TargetError(EplbOptError):
    """``eplb-opt score``: the target could not be found or loaded (exit status 2)."""


_TARGET_FORMS = "MODULE:FUNCTION, MODULE:Class.method or path/to/file.py:FUNCTION (or :Class.method)"


def _load_callable(spec: str):
    """The callable named by ``spec``: ``package.module:function``,
    ``package.module:Class.method`` (e.g. a vLLM-style policy class's classmethod
    ``rebalance_experts``), or ``path/to/file.py:`` with either.  A module name is looked
    up in the current directory first, as ``python -m`` does.  An instance method is
    bound to ``Class()``.  Raises :class:`_TargetError` naming what was not found."""
    import importlib
    import importlib.util
    import inspect
    import os

    if ":" not in spec:
        raise _TargetError(f"score: expected {_TARGET_FORMS}, got {spec!r}")
    mod_name, attr_path = spec.rsplit(":", 1)
    if not mod_name or not attr_path or not all(part.isidentifier() for part in attr_path.split(".")):
        raise _TargetError(f"score: expected {_TARGET_FORMS}, got {spec!r}")
    is_file = mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name
    try:
        if is_file:
            path = Path(mod_name)
            if not path.is_file():
                raise _TargetError(f"score: no such file {mod_name!r} (from {spec!r})")
            folder = str(path.resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)          # the file's own imports of its neighbours
            sp = importlib.util.spec_from_file_location(f"_eplb_opt_target_{path.stem}", path)
            if sp is None or sp.loader is None:
                raise _TargetError(f"score: cannot load {mod_name!r} as a Python file")
            module = importlib.util.module_from_spec(sp)
            sp.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())     # as `python -m` would find it
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError as exc:
                if exc.name is not None and mod_name.startswith(exc.name) and (
                        len(exc.name) == len(mod_name) or mod_name[len(exc.name)] == "."):
                    raise _TargetError(
                        f"score: no module named {exc.name!r} (from {spec!r}; looked in the current directory "
                        "and on the Python path; for a file pass path/to/file.py:FUNCTION)") from None
                raise
    except _TargetError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        raise _TargetError(f"score: cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from None
    obj, owner, where = module, None, mod_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise _TargetError(f"score: {where!r} has no attribute {part!r} (looking for {attr_path!r} in {mod_name!r})")
        owner, obj, where = obj, getattr(obj, part), f"{where}:{part}" if owner is None else f"{where}.{part}"
    if inspect.isclass(owner) and inspect.isfunction(obj):
        kind = inspect.getattr_static(owner, attr_path.rsplit(".", 1)[-1])
        if not isinstance(kind, staticmethod):
            # An instance method: call it on an instance made without arguments.
            try:
                obj = getattr(owner(), attr_path.rsplit(".", 1)[-1])
            except Exception as exc:  # noqa: BLE001 - the class needs arguments
                raise _TargetError(
                    f"score: {attr_path!r} is an instance method and {owner.__name__}() failed "
                    f"({type(exc).__name__}: {exc}); make it a classmethod or staticmethod, or pass a "
                    "module-level function") from None
    if inspect.isclass(obj) or not callable(obj):
        raise _TargetError(f"score: {spec!r} is {'a class' if inspect.isclass(obj) else type(obj).__name__}, "
                           "not a function or method (pass MODULE:Class.method)")
    return obj


def _cmd_score(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    fn = _load_callable(args.target)
    modes = () if args.no_ours else (("heuristic",) if args.no_exact else ("heuristic", "exact"))
    ev = evaluate(
        fn, args.suite, policy=args.policy, name=args.target, modes=modes,
        progress=None if args.json else (lambda m: print(m, file=sys.stderr, flush=True)),
    )
    if args.json:
        json.dump(ev.to_dict(), sys.stdout, indent=1)
        print()
    else:
        print(ev.table())
        print(_SCORE_LEGEND)
        print()
        print(ev.summary())
    if ev.invalid:
        print(f"eplb-opt score: {ev.invalid} plan(s) of {args.target} crashed or broke the "
              f"{args.policy} policy's rules", file=sys.stderr)
        return 1
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.runner import main as bench_main

    return bench_main(
        suite=args.suite, out=args.out, trace=args.trace, preset=args.preset, window=args.window,
        command="eplb-opt " + " ".join(getattr(args, "argv", sys.argv[1:])),
    )


def _cmd_replay(args: argparse.Namespace) -> int:
    from .replay._cli import main as replay_main

    return replay_main(args)


def _replay_parser(sub: "argparse._SubParsersAction") -> None:
    from .replay import (DEFAULT_BYTES_PER_EXPERT, DEFAULT_GPU_TOKENS_PER_S, DEFAULT_LINK_GBPS, DEFAULT_POLICIES,
                         POLICY_NAMES)

    rl = sub.add_parser(
        "replay", help="replay a per-step trace: each policy's balance, copies and time over time",
        description="Replay a per-step trace [steps, layers, experts]: every --interval steps each policy plans "
        "from the last --window steps and its plan serves the steps that follow.  Reports balancedness, "
        "replicas and bytes copied (after alignment to the deployed placement) and time, against a static "
        "placement, a clairvoyant plan and the certified lower bound; writes results.json, REPORT.md and plots "
        "with --out.  Rules and defaults: eplb_opt.replay in docs/API.md.")
    rl.add_argument("trace", nargs="?", default=None,
                    help="per-step loads [steps, layers, experts]: .npy or single-tensor .safetensors (read in "
                         "chunks), or .npz, .pt, ADRS expert-load.json (the layout of ADRS, AI-Driven Research for "
                         "Systems), SGLang or TensorRT-LLM dumps (loaded whole); omit it with --preset to generate one")
    rl.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="the topology of a preset (flags below override it); without TRACE, also generate a "
                         "drifting per-step trace of it (eplb_opt.replay.step_trace)")
    rl.add_argument("--steps", type=int, default=None, help="steps of the generated trace (default 4000)")
    rl.add_argument("--seed", type=int, default=0, help="seed of the generated trace (default 0)")
    rl.add_argument("--replicas", type=int, default=None, help="physical expert slots per layer (R)")
    rl.add_argument("--groups", type=int, default=None, help="expert groups (default 1, or the preset's)")
    rl.add_argument("--nodes", type=int, default=None, help="server nodes, equal GPUs each (default 1, or the preset's)")
    rl.add_argument("--gpus", type=int, default=None, help="GPUs in total; each holds replicas / gpus slots")
    rl.add_argument("--interval", default="1000", metavar="STEPS[,STEPS...]",
                    help="steps between rebalances; a comma list sweeps them, e.g. 100,500,2000 (default 1000)")
    rl.add_argument("--window", type=int, default=None, metavar="STEPS",
                    help="steps each plan is made from (default: the interval, as SGLang records)")
    rl.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help=f"comma list from {','.join(POLICY_NAMES)} (default {','.join(DEFAULT_POLICIES)}); "
                         "static and clairvoyant always run")
    rl.add_argument("--bytes-per-expert", type=int, default=DEFAULT_BYTES_PER_EXPERT,
                    help=f"bytes one replica copy moves (default {DEFAULT_BYTES_PER_EXPERT}: a DeepSeek-V3 expert "
                         "in FP8)")
    rl.add_argument("--gpu-tokens-per-s", type=float, default=DEFAULT_GPU_TOKENS_PER_S,
                    help=f"tokens per second a GPU serves through one MoE layer (default {DEFAULT_GPU_TOKENS_PER_S:g}: "
                         "H100-class, DeepSeek-V3 experts)")
    rl.add_argument("--link-gbps", default=",".join(f"{x:g}" for x in DEFAULT_LINK_GBPS), metavar="SAME,CROSS",
                    help="GB/s a GPU receives within its node and from other nodes (default 450,50: NVLink 4, "
                         "400 Gb/s InfiniBand)")
    rl.add_argument("--no-time-model", action="store_true", help="report loads only (no seconds; copies free)")
    rl.add_argument("--exact-time-limit", type=float, default=1.0, help="exact policy: deterministic budget per plan")
    rl.add_argument("--max-balance-loss", type=float, default=0.005, help="migrate policy: balance budget")
    rl.add_argument("--sub-windows", type=int, default=4, help="windows policy: sub-windows of its window")
    rl.add_argument("--objective", default="worst", choices=["worst", "mean"], help="windows policy: objective")
    rl.add_argument("--out", default=None, metavar="DIR", help="write results.json, REPORT.md and plots here")
    rl.add_argument("--json", action="store_true", help="print the summary as JSON")
    rl.add_argument("--progress", action="store_true", help="show progress on stderr even off a terminal")
    rl.set_defaults(func=_cmd_replay)


def _example_parser(sub: Any) -> None:
    """``example``: plan a bundled workload."""
    ex = sub.add_parser("example", help="plan a bundled example workload and print its figures",
                        description="Plan a bundled synthetic workload (a preset's topology: replicas, groups, "
                        "nodes, GPUs) and print each layer's max and mean GPU load, balance, certified lower "
                        "bound, gap and the bound's binding part, then the overall figures.",
                        epilog=_TABLE_LEGEND + "\n" + _SLOT_LEGEND,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("--preset", default="deepseek-v3-prefill", choices=sorted(PRESETS))
    ex.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    ex.add_argument("--mode", default="heuristic", choices=["heuristic", "exact"])
    ex.add_argument("--time-limit", type=float, default=None, help="seconds for the planning call (exact mode: default 10; OR-Tools, about 0.5 s, "
                    "loads before the clock starts)")
    ex.add_argument("--policy", default="auto", choices=["auto", "hierarchical", "global"],
                    help="auto (default): hierarchical when the preset's groups divide evenly over its nodes, "
                         "else global (the choice is said on stderr)")
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.add_argument("--quiet", action="store_true", help="overall figures only, no per-layer table")
    ex.add_argument("--write-loads", metavar="DIR", default=None,
                    help="instead of planning, write the workload's window0.npy (to plan) and window1.npy "
                         "(the next window) into DIR, for plan / evaluate / report")
    ex.set_defaults(func=_cmd_example)


def _plan_parser(sub: Any) -> None:
    """``plan``: plan recorded loads and write a plan file."""
    pl = sub.add_parser("plan", help="plan recorded loads and write a plan file")
    pl.add_argument("loads", help="loads: .npy/.npz/.pt/.safetensors [steps, L, E] or [L, E], ADRS "
                    "expert-load.json (the layout of ADRS, AI-Driven Research for Systems: UC Berkeley's OpenEvolve "
                    "EPLB study), SGLang "
                    "dumps, or a TensorRT-LLM expert-statistic dump directory (meta_info.json + rank*.safetensors)")
    pl.add_argument("--replicas", type=int, required=True, help="physical expert slots per layer (R)")
    pl.add_argument("--groups", type=int, default=1,
                    help="expert groups (the model's n_group, e.g. 8 for DeepSeek-V3); the hierarchical policy keeps "
                         "each group whole on one node (default 1: no groups)")
    pl.add_argument("--nodes", type=int, default=1,
                    help="server nodes the GPUs are spread over, equal GPUs each (default 1)")
    pl.add_argument("--gpus", type=int, required=True,
                    help="GPUs in total (the expert-parallel size); each holds replicas / gpus slots")
    pl.add_argument("--policy", default="auto", choices=["auto", "hierarchical", "global", "spill"],
                    help="auto (default): hierarchical when --groups divides evenly over --nodes (whole groups "
                         "per node, the choice is said on stderr), else global (any replica on any GPU); spill: "
                         "hierarchical with off-node replicas at --cross-node-cost")
    pl.add_argument("--mode", default="heuristic", choices=["heuristic", "exact"])
    pl.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the planning call (exact mode: default 10; OR-Tools, about 0.5 s, loads "
                         "before the clock starts)")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--deterministic", action="store_true", help="repeatable exact mode (for a seed)")
    pl.add_argument("--workers", type=int, default=None, help="CP-SAT threads (per Ray task with --ray); default: available cores, "
                    "or 1 with --deterministic or --ray")
    pl.add_argument("--window", type=int, default=None, metavar="STEPS",
                    help="sum the trace's steps into windows of STEPS (default: one window of all steps)")
    pl.add_argument("--objective", default="sum", choices=["sum", "worst", "mean"],
                    help="how windows count: their total (default), the worst one, or their mean")
    pl.add_argument("--history", metavar="FILE", default=None,
                    help="past windows [H, L, E], oldest first, the last just before the loads (any format the "
                         "loads may have; each step of the file is one window): plan for a forecast of the next "
                         "window from the history and the loads (summed as one window) instead of for the loads")
    pl.add_argument("--forecast", default=None, choices=list(FORECASTS),
                    help="with --history: how the next window is forecast (default windows-ema: a hedge over the "
                         "recent windows; see docs/USAGE.md)")
    pl.add_argument("--previous", metavar="PLAN", default=None,
                    help="the plan deployed now: move as few expert weights from it as the balance allows")
    pl.add_argument("--max-balance-loss", type=float, default=None,
                    help="with --previous: max-load fraction a layer may give up to move less (default 0)")
    pl.add_argument("--node-move-cost", type=float, default=4.0, help="with --previous: cost of a cross-node copy")
    pl.add_argument("--bytes-per-expert", type=int, default=None, help="with --previous: to report bytes copied")
    pl.add_argument("--masked-gpus", metavar="IDS", default=None,
                    help="comma-separated GPUs that must hold nothing (failed or drained); planned with the "
                         "global policy (an error with --policy hierarchical or spill)")
    pl.add_argument("--cross-node-cost", type=float, default=1.0,
                    help="--policy spill: cost per unit of load served off an expert's home node")
    pl.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="fan sub-problems out on Ray (start a local one, or join ADDRESS)")
    pl.add_argument("-o", "--output", required=True,
                    help="plan file: .json, .pt or .npz; or .yaml / .yml: TensorRT-LLM's offline EP "
                         "load-balancer file (moe_load_balancer.yaml, for moe_config.load_balancer)")
    pl.add_argument("--first-layer", type=int, default=None, metavar="N",
                    help="with -o FILE.yaml: model index of the first MoE layer (e.g. 3 for DeepSeek-V3, whose "
                         "first three layers are dense); plan layer l is model layer N + l (default 0, or the "
                         "layers a TensorRT-LLM dump recorded)")
    pl.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    pl.add_argument("--partial-output", metavar="FILE", default=None,
                    help="on Ctrl-C, save the verified plan finished so far here (the -o file is never "
                         "touched by an interrupted run)")
    pl.add_argument("--progress", action="store_true", help="show a progress bar even off a terminal")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=_cmd_plan)


def _evaluate_report_parsers(sub: Any) -> None:
    """``evaluate`` and ``report``: score and draw a plan file."""
    ev = sub.add_parser("evaluate", help="check a plan file and score it on load files")
    ev.add_argument("plan")
    ev.add_argument("loads", nargs="+", help="one or more load files (the first is usually the planning window)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    rp = sub.add_parser("report", help="draw a plan's loads, balancedness, gaps and replica counts")
    rp.add_argument("plan")
    rp.add_argument("loads")
    rp.add_argument("-o", "--output", required=True, help="FILE.png or FILE.html")
    rp.set_defaults(func=_cmd_report)


def _score_parser(sub: Any) -> None:
    """``score``: grade a rebalance_experts-shaped function."""
    sc = sub.add_parser("score", help="grade a rebalance_experts-shaped function against certified bounds",
                        description="Grade any function with DeepSeek's signature fn(weight, num_replicas, "
                        "num_groups, num_nodes, num_gpus) -> phy2log or (phy2log, log2phy, logcnt) on a fixed "
                        "suite, beside eplb-opt's modes.  Exit status 1 when a plan crashed or broke a rule, 2 "
                        "when the target cannot be found.",
                        epilog=_SCORE_LEGEND, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("target", help="MODULE:FUNCTION, MODULE:Class.method (e.g. a vLLM-style policy class's "
                    "classmethod rebalance_experts), or path/to/file.py:FUNCTION (or :Class.method)")
    sc.add_argument("--suite", default="quick", choices=["quick", "full"])
    sc.add_argument("--policy", default="auto", choices=["auto", "hierarchical", "global"],
                    help="rules the plans are checked against: auto (default) hierarchical where a workload's "
                         "groups divide over its nodes; global calls the target with 1 group and 1 node")
    sc.add_argument("--no-exact", action="store_true", help="score only eplb-opt's heuristic mode beside it")
    sc.add_argument("--no-ours", action="store_true", help="score only the target")
    sc.add_argument("--json", action="store_true", help="machine-readable output")
    sc.set_defaults(func=_cmd_score)


def _bench_parser(sub: Any) -> None:
    """``bench``: every policy and peer on a suite."""
    be = sub.add_parser("bench", help="every policy and peer on a benchmark suite",
                        description="Run eplb-opt's modes and the peers (DeepSeek EPLB and SGLang deepseek_vec "
                        "from the sglang==0.5.23 wheel, vLLM 0.33's default policy from the vllm==0.33.0 wheel, "
                        "fetched once into ~/.cache/eplb-opt/peers or $EPLB_OPT_PEER_CACHE) on a suite and write "
                        "results.json, REPORT.md and plots.  A peer whose wheel cannot be had (no network, no "
                        "cached copy) is left out, with a line on stderr and in the report.")
    be.add_argument("--suite", default="quick", choices=["quick", "full"])
    be.add_argument("--out", default="bench-out", help="directory for results.json, REPORT.md and plots")
    be.add_argument("--trace", default=None, help="a recorded trace: ADRS expert-load.json (the layout of "
                    "ADRS, AI-Driven Research for Systems: UC Berkeley's OpenEvolve EPLB study), .npy, .npz, .pt, an SGLang dump or a "
                    "TensorRT-LLM expert-statistic dump directory")
    be.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="topology for --trace (replicas, groups, nodes, GPUs of a preset)")
    be.add_argument("--window", type=int, default=None, help="steps per window for --trace")
    be.set_defaults(func=_cmd_bench)

def _parser() -> argparse.ArgumentParser:
    """The command line: one sub-parser per command, each built by its own function."""
    p = argparse.ArgumentParser(prog="eplb-opt", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"eplb-opt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _example_parser(sub)
    _plan_parser(sub)
    _evaluate_report_parsers(sub)
    _score_parser(sub)
    _bench_parser(sub)
    _replay_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except ExecutorError as exc:
        print(f"eplb-opt: error: {exc}", file=sys.stderr)
        return 3
    except EplbOptError as exc:
        print(f"eplb-opt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\neplb-opt: interrupted; no plan file was written or replaced", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
