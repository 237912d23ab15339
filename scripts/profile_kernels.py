"""Where a prefill call's time goes, compiled function by compiled function (issue 15).

Usage (Linux with ``perf``; from the repository root; about a minute, most of it the
compile)::

    .venv/bin/python scripts/profile_kernels.py [--call rebalance_experts|solve] [--seconds 15]

The call runs in a loop, back to back, on 20 DeepSeek-V3 prefill inputs in turn, under
``perf record`` (software clock: no hardware counters needed).  It runs with an empty
numba cache directory of its own, so that every kernel is compiled in that process and
the address of each compiled function is known (numba's cache loader keeps no symbol
table, so ``perf`` alone shows bare addresses).  Each sample in compiled code is then
given to the function whose code holds it and the shares are printed, largest first.

A numba function called from another is compiled as its own function unless LLVM
inlines it, so the names are the Python kernels' names.  ``NRT_incref`` and
``NRT_decref`` are numba's reference counts on arrays: one pair for every array argument
of a call whose counts numba's pruning pass could not remove, and for every slice taken.
Samples outside compiled code (Python, numpy, the compile) are counted apart.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_NAME = re.compile(r"(?:pipeline|packing|apportion|grouping|bounds|verify_kernels|metrics|local|matching|resplit)"
                   r"\d+([A-Za-z_0-9]+?)B\d")


def child(call: str, seconds: float, symbols: Path) -> None:
    """The profiled process: the call once (compiling), every compiled function's
    address to ``symbols``, then the loop."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import eplb_opt
    from eplb_opt.workloads import PRESETS, generate

    p = PRESETS["deepseek-v3-prefill"]
    inputs = [torch.from_numpy(np.ascontiguousarray(generate(p.name, windows=1, seed=s)[0])) for s in range(20)]
    topo = (p.num_replicas, p.num_groups, p.num_nodes, p.num_gpus)
    run = (lambda x: eplb_opt.rebalance_experts(x, *topo)) if call == "rebalance_experts" else \
        (lambda x: eplb_opt.solve(x, **p.topology()))
    run(inputs[0])
    addresses = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("eplb_opt"):
            continue
        for value in list(vars(module).values()):
            if type(value).__name__ != "LazyKernel" or not value.built:
                continue
            for compiled in value.dispatcher.overloads.values():
                library = compiled.library
                for fn in library._final_module.functions:
                    if not fn.is_declaration:
                        addresses[fn.name] = library.get_pointer_to_function(fn.name)
    symbols.write_text(json.dumps(addresses))
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run(inputs[calls % 20])
        calls += 1
    print(f"{calls} calls, {(time.perf_counter() - start) / calls * 1e3:.3f} ms each (under perf)")


def shares(data: Path, symbols: Path) -> tuple[collections.Counter, int]:
    """Samples per compiled function (``perf script`` on ``data``), and samples elsewhere."""
    table = sorted((a, n) for n, a in json.loads(symbols.read_text()).items() if a)
    starts = [a for a, _ in table]
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym"], capture_output=True, text=True,
                         check=True).stdout
    counts, elsewhere = collections.Counter(), 0
    for line in out.splitlines():
        fields = line.split()
        if not fields:
            continue
        ip = int(fields[0], 16)
        i = bisect.bisect_right(starts, ip) - 1
        name = table[i][1] if i >= 0 and ip - starts[i] < 65536 else ""
        m = _NAME.search(name)
        if name.startswith("NRT_") or m:
            counts[name if m is None else m.group(1)] += 1
        else:
            elsewhere += 1
    return counts, elsewhere


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--call", choices=("rebalance_experts", "solve"), default="rebalance_experts")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.call, args.seconds, args.child)
        return 0
    if shutil.which("perf") is None:
        ap.error("perf is not installed (linux-perf / linux-tools)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
        data, symbols = tmp_path / "perf.data", tmp_path / "symbols.json"
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "10000", "-o", str(data), sys.executable,
                        __file__, "--call", args.call, "--seconds", str(args.seconds), "--child", str(symbols)],
                       env=env, check=True)
        counts, elsewhere = shares(data, symbols)
    total = sum(counts.values())
    print(f"{args.call}: {total} samples in compiled code, {elsewhere} elsewhere (Python, numpy, the compile)")
    for name, n in counts.most_common():
        print(f"{n / total * 100:6.2f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
