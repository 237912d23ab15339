"""Command-line interface: ``eplb-opt <command> ...``.

Commands:
    example   plan a bundled synthetic workload and print per-layer and overall figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from . import __version__
from .errors import EplbOptError
from .api import SolveResult, solve
from .workloads import PRESETS, example_weight

__all__ = ["main"]


def _binding(result: SolveResult) -> list[str]:
    """Name of the bound component that sets each layer's lower bound."""
    names = list(result.bounds.components)
    stack = np.stack([result.bounds.components[n] for n in names])
    return [names[i] for i in stack.argmax(axis=0)]


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


def _cmd_example(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    weight = example_weight(args.preset, seed=args.seed)
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
    print("loads are token counts per expert; 'balance' is mean/max GPU load of the layer;")
    print("'gap' is 1 - lower_bound/max_load against the certified bound; 'bound' names its binding part\n")
    if not args.quiet:
        print(_table(result))
        print()
    print(result.summary())
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eplb-opt", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"eplb-opt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="plan a bundled example workload and print its figures")
    ex.add_argument("--preset", default="deepseek-v3-prefill", choices=sorted(PRESETS))
    ex.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    ex.add_argument("--mode", default="heuristic", choices=["heuristic", "exact"])
    ex.add_argument("--time-limit", type=float, default=None, help="seconds for the whole call (exact mode: default 10)")
    ex.add_argument("--policy", default="auto", choices=["auto", "hierarchical", "global"])
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.add_argument("--quiet", action="store_true", help="overall figures only, no per-layer table")
    ex.set_defaults(func=_cmd_example)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EplbOptError as exc:
        print(f"eplb-opt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
