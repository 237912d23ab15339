"""Command-line interface: ``eplb-opt <command> ...``.

Commands:
    example   plan a bundled synthetic workload and print per-layer and overall figures.
    score     grade any rebalance_experts-shaped function against certified bounds.
    bench     every policy and peer on a benchmark suite (needs a source checkout).
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


def _load_callable(spec: str):
    """``package.module:function`` or ``path/to/file.py:function``."""
    import importlib
    import importlib.util
    from pathlib import Path

    if ":" not in spec:
        raise SystemExit(f"eplb-opt score: expected MODULE:FUNCTION, got {spec!r}")
    mod_name, func = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name)
            if not path.exists():
                raise SystemExit(f"eplb-opt score: no such file {mod_name!r}")
            sp = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(sp)
            sp.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        raise SystemExit(f"eplb-opt score: cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise SystemExit(f"eplb-opt score: {mod_name!r} has no callable {func!r}")
    return fn


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
        print()
        print(ev.summary())
    if ev.invalid:
        print(f"eplb-opt score: {ev.invalid} plan(s) of {args.target} crashed or broke the "
              f"{args.policy} policy's rules", file=sys.stderr)
        return 1
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "bench.py").exists():
        print("eplb-opt bench: needs a source checkout (benchmarks/ is not installed with the package)",
              file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.bench import main as bench_main

    return bench_main(
        suite=args.suite, out=args.out, trace=args.trace, preset=args.preset, window=args.window,
        command="eplb-opt " + " ".join(sys.argv[1:]),
    )


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

    sc = sub.add_parser("score", help="grade a rebalance_experts-shaped function against certified bounds")
    sc.add_argument("target", help="MODULE:FUNCTION or path/to/file.py:FUNCTION")
    sc.add_argument("--suite", default="quick", choices=["quick", "full"])
    sc.add_argument("--policy", default="auto", choices=["auto", "hierarchical", "global"])
    sc.add_argument("--no-exact", action="store_true", help="score only eplb-opt's heuristic mode beside it")
    sc.add_argument("--no-ours", action="store_true", help="score only the target")
    sc.add_argument("--json", action="store_true", help="machine-readable output")
    sc.set_defaults(func=_cmd_score)

    be = sub.add_parser("bench", help="every policy and peer on a benchmark suite (source checkout)")
    be.add_argument("--suite", default="quick", choices=["quick", "full"])
    be.add_argument("--out", default="bench-out", help="directory for results.json, REPORT.md and plots")
    be.add_argument("--trace", default=None, help="a recorded trace (.json ADRS, .npy, .npz, .pt, SGLang dump dir)")
    be.add_argument("--preset", default=None, help="topology for --trace (a preset name)")
    be.add_argument("--window", type=int, default=None, help="steps per window for --trace")
    be.set_defaults(func=_cmd_bench)
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
