"""``eplb-opt replay``: the command line's work (the parser lives in :mod:`eplb_opt.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InvalidProblemError
from ..workloads import PRESETS
from . import replay
from ._output import write_outputs
from ._trace import step_trace, step_trace_parameters

__all__ = ["DEFAULT_STEPS", "main"]

DEFAULT_STEPS = 4000


def _ints(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidProblemError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise InvalidProblemError(f"{flag} must name at least one value, got {text!r}")
    return vals


def _link(text: str) -> tuple[float, float]:
    try:
        same, cross = (float(x) for x in text.split(","))
    except ValueError:
        raise InvalidProblemError(f"--link-gbps must be SAME,CROSS (two numbers of GB/s), got {text!r}") from None
    return same, cross


def _topology(args: argparse.Namespace) -> dict[str, int]:
    base = PRESETS[args.preset].topology() if args.preset else {}
    given = {"num_replicas": args.replicas, "num_groups": args.groups, "num_nodes": args.nodes,
             "num_gpus": args.gpus}
    topo = {**base, **{k: v for k, v in given.items() if v is not None}}
    missing = [f for f, k in (("--replicas", "num_replicas"), ("--gpus", "num_gpus")) if k not in topo]
    if missing:
        raise InvalidProblemError(f"{' and '.join(missing)} needed (or --preset NAME for its topology)")
    topo.setdefault("num_groups", 1)
    topo.setdefault("num_nodes", 1)
    return topo


def _trace(args: argparse.Namespace, tmp: Path) -> tuple[Any, dict | None]:
    """The trace to replay and, for a generated one, its parameters."""
    if args.trace is not None:
        if args.steps is not None:
            raise InvalidProblemError(f"--steps applies to a generated trace (--preset without TRACE); "
                                      f"got TRACE {args.trace}")
        return args.trace, None
    if args.preset is None:
        raise InvalidProblemError("give a TRACE file, or --preset NAME (and --steps N) to generate one")
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    prm = step_trace_parameters(args.preset, steps, seed=args.seed)
    path = step_trace(args.preset, steps, seed=args.seed, out=tmp / "trace.npy")
    return path, prm


def _summary_json(data: dict) -> dict:
    """``results.json`` without the per-bin series (what ``--json`` prints)."""
    keep = {k: v for k, v in data.items() if k not in ("runs", "series_steps")}
    keep["runs"] = [{k: v for k, v in r.items() if not k.startswith("series_") and not k.endswith("_per_rebalance")}
                    for r in data["runs"]]
    return keep


def main(args: argparse.Namespace) -> int:
    """Run ``eplb-opt replay`` from parsed arguments; 0 on success."""
    from ..bench.runner import machine

    intervals = _ints("--interval", args.interval)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    topo = _topology(args)
    command = "eplb-opt " + " ".join(getattr(args, "argv", sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="eplb-opt-replay-") as tmp:
        trace, prm = _trace(args, Path(tmp))
        result = replay(
            trace, **topo, policies=policies, interval=intervals, window=args.window,
            bytes_per_expert=args.bytes_per_expert,
            gpu_tokens_per_s=None if args.no_time_model else args.gpu_tokens_per_s,
            link_gbps=_link(args.link_gbps), exact_time_limit=args.exact_time_limit,
            max_balance_loss=args.max_balance_loss, sub_windows=args.sub_windows,
            windows_objective=args.objective, progress=True if args.progress else None,
        )
    if prm is not None:
        result = _named(result, prm)
    if args.out:
        data = write_outputs(result, args.out, command=command, machine=machine(), trace_parameters=prm)
    else:
        data = {**result.to_dict(), "command": command, "trace_parameters": prm}
    if args.json:
        json.dump(_summary_json(data), sys.stdout, indent=1)
        print()
    else:
        print(result.summary())
        if args.out:
            print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'REPORT.md'} and "
                  + ", ".join(str(Path(args.out) / p) for p in data.get("plots", [])))
    return 0


def _named(result: Any, prm: dict) -> Any:
    """A generated trace is named by its preset and seed, not by its temporary file."""
    from dataclasses import replace

    return replace(result, trace=f"generated {prm['preset']} trace (seed {prm['seed']}, {prm['steps']} steps)")
