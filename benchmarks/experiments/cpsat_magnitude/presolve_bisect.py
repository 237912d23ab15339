"""Which presolve reduction loses the optimum?  (standalone; issue 12)

Bisects CP-SAT's ``debug_max_num_presolve_operations`` on one instance of the model in
``repro.py`` until the smallest operation count whose result is wrong, then prints the
presolve rules whose counts differ between that count and the one before it (from the
solver's own presolve summary).

Run:  .venv/bin/python benchmarks/experiments/cpsat_magnitude/presolve_bisect.py [case] [bits]
(``case`` indexes ``repro.KNOWN``; default 0 at 34 bits).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ortools.sat.python import cp_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro import KNOWN, brute, build, int_loads  # noqa: E402


def solve(model, max_ops: int, log: bool = False):
    s = cp_model.CpSolver()
    s.parameters.num_workers = 1
    s.parameters.debug_max_num_presolve_operations = max_ops
    lines: list[str] = []
    if log:
        s.parameters.log_search_progress = True
        s.parameters.log_to_stdout = False
        s.log_callback = lines.append
    st = s.Solve(model)
    return s.StatusName(st), round(s.ObjectiveValue()), lines


def rules(lines: list[str]) -> dict[str, int]:
    out = {}
    for line in lines:
        m = re.match(r"\s*- rule '(.*)' was applied (\S+) time", line)
        if m:
            out[m.group(1)] = int(m.group(2).replace("'", ""))
    return out


def main() -> None:
    case = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    bits = float(sys.argv[2]) if len(sys.argv) > 2 else 34
    w, R, G, nodup = KNOWN[case]
    menu = [c for c in range(1, R - len(w) + 2) if not nodup or c <= G]
    ints = int_loads(w, menu, bits)
    opt = brute(ints, menu, R, G, nodup)

    def wrong(n: int) -> bool:
        status, obj, _ = solve(build(ints, menu, R, G, True, nodup), n)
        return status != "OPTIMAL" or obj != opt

    full = wrong(0)
    print(f"case {case} {w} R={R} G={G} nodup={nodup} bits={bits}: optimum {opt}, "
          f"full presolve {'WRONG' if full else 'right'}")
    if not full:
        return
    hi = 1
    while not wrong(hi):
        hi *= 2
    lo = hi // 2                      # wrong(hi), not wrong(lo) (or lo == 0 ... hi == 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if wrong(mid) else (mid, hi)
    a = rules(solve(build(ints, menu, R, G, True, nodup), lo, log=True)[2])
    b = rules(solve(build(ints, menu, R, G, True, nodup), hi, log=True)[2])
    print(f"first wrong after presolve operation {hi} (right with {lo})")
    for name in sorted(set(a) | set(b)):
        if a.get(name, 0) != b.get(name, 0):
            print(f"  {name!r}: {a.get(name, 0)} -> {b.get(name, 0)}")


if __name__ == "__main__":
    main()
