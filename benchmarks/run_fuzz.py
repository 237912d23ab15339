"""The recorded long fuzz campaign: every property-based test under the ``long``
hypothesis profile, with per-test example counts.

Usage (from the repository root; about 5-10 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.run_fuzz [--seed N] [--out benchmarks/fuzz.json]

Runs ``pytest`` on the hypothesis test modules with ``HYPOTHESIS_PROFILE=long`` and
``--hypothesis-show-statistics`` (RuntimeWarnings turned into errors, so an overflow
anywhere fails the run), parses the passing / failing / invalid example counts of every
test, and writes them with the command, machine, date and seed to ``fuzz.json``; the
results page (``benchmarks/report.py``) renders it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

MODULES = ["tests/test_fuzz.py", "tests/test_properties.py", "tests/test_exact_properties.py",
           "tests/test_certificates.py"]
_TEST = re.compile(r"^(tests/\S+::\S+):\s*$")
_COUNTS = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")


def parse(output: str) -> dict[str, dict[str, int]]:
    """Per test: passing / failing / invalid examples summed over hypothesis's phases."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in output.splitlines():
        m = _TEST.match(line.strip())
        if m:
            current = m.group(1)
            out.setdefault(current, {"passing": 0, "failing": 0, "invalid": 0})
            continue
        m = _COUNTS.search(line)
        if m and current is not None:
            for key, val in zip(("passing", "failing", "invalid"), m.groups()):
                out[current][key] += int(val)
    return out


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261127, help="hypothesis seed (recorded)")
    ap.add_argument("--out", type=Path, default=here / "fuzz.json")
    ap.add_argument("--modules", nargs="+", default=MODULES,
                    help="test modules (default: every property-based module); e.g. "
                         "--modules tests/test_certificates.py --out benchmarks/fuzz-certificates.json")
    args = ap.parse_args(argv)
    root = here.parent
    # One process (``-o addopts=-ra`` drops the worker processes of the default run):
    # hypothesis prints its per-test statistics, which this script reads, only there.
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=-ra", *args.modules, "-p", "no:cacheprovider",
           "-W", "error::RuntimeWarning",
           "--hypothesis-show-statistics", f"--hypothesis-seed={args.seed}"]
    env = dict(os.environ, HYPOTHESIS_PROFILE="long")
    print("running:", "HYPOTHESIS_PROFILE=long", " ".join(cmd[2:]), file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    tests = parse(proc.stdout + proc.stderr)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    data = {
        "command": f"python -m benchmarks.run_fuzz --seed {args.seed}"
                   + ("" if args.modules == MODULES else " --modules " + " ".join(args.modules)),
        "pytest": "HYPOTHESIS_PROFILE=long python " + " ".join(cmd[1:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "seed": args.seed,
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "pytest_summary": summary,
        "tests": tests,
        "examples": sum(t["passing"] + t["failing"] for t in tests.values()),
        "failing": sum(t["failing"] for t in tests.values()),
    }
    if proc.returncode != 0:
        data["failure_output"] = (proc.stdout + proc.stderr)[-6000:]
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if proc.returncode == 0 else 1


def table(data: dict) -> str:
    lines = [f"{'test':<70} {'passing':>8} {'failing':>8} {'invalid':>8}"]
    for name, c in sorted(data["tests"].items()):
        lines.append(f"{name:<70} {c['passing']:>8} {c['failing']:>8} {c['invalid']:>8}")
    lines.append(f"{'total examples run':<70} {data['examples']:>8} {data['failing']:>8}")
    lines.append(f"pytest: {data['pytest_summary']} ({data['seconds']} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
