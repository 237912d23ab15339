"""Regenerate every recorded benchmark and ``benchmarks/RESULTS.md``.

Usage (from the repository root; about 10 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.run_all

Runs, in order: the core heuristic benchmark (:mod:`benchmarks.run_core`), the
exact-mode benchmark on seeds 0-2 (:mod:`benchmarks.run_exact`), and the full suite of
``eplb-opt bench`` into ``benchmarks/bench-full``; then assembles RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from eplb_opt.bench import runner as bench

from . import report, run_core, run_exact


def main() -> int:
    here = Path(__file__).resolve().parent
    run_core.main(["--repeats", "15"])
    run_exact.main(["--seeds", "0", "1", "2"])
    bench.main(suite="full", out=here / "bench-full", command="python -m benchmarks.run_all")
    report.write(here)
    print(f"wrote {here / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
