"""Standalone reproduction of CP-SAT's wrong OPTIMAL on large coefficients (issue 12).

No eplb-opt code: the model below is the "complete" EPLB model (replica counts from a
menu, integer replica numbers per GPU, heaviest GPU minimised) written from scratch,
with loads scaled to integers whose largest per-replica load is ``2**bits``.  Every
answer CP-SAT calls OPTIMAL is compared with an exhaustive optimum of the *same
integer model* (so rounding of the loads plays no part), for random tiny instances,
with and without the GPU-load ordering constraint and under a few solver settings.

Run:  .venv/bin/python benchmarks/experiments/cpsat_magnitude/repro.py [--per-level 200]
Writes results.json beside this file and prints a table (wrong / checked per level).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

from ortools.sat.python import cp_model


def int_loads(w, menu, bits):
    """Per-replica loads ``w[e] / c`` scaled so the largest is ``2**bits``, rounded."""
    vals = [[w[e] / c for c in menu] for e in range(len(w))]
    top = max(max(r) for r in vals)
    return [[int(round(v / top * 2**bits)) for v in r] for r in vals]


def build(ints, menu, R, G, order, nodup):
    """``order``: False (no ordering), True (``load_g >= load_{g+1}`` written as one
    long linear over the replica variables, as eplb-opt did), or ``"vars"`` (the same
    ordering on explicit load variables, ``load_g == sum ...``, two-term constraints)."""
    E = len(ints)
    k = R // G
    m = cp_model.CpModel()
    y = [[m.NewBoolVar(f"y{e}_{c}") for c in menu] for e in range(E)]
    n = [[[m.NewIntVar(0, min(c, 1) if nodup else c, f"n{e}_{c}_{g}") for g in range(G)] for c in menu]
         for e in range(E)]
    top = m.NewIntVar(0, max(max(r) for r in ints) * k, "top")
    for e in range(E):
        m.AddExactlyOne(y[e])
        for j, c in enumerate(menu):
            m.Add(sum(n[e][j]) == c * y[e][j])
    m.Add(sum(c * y[e][j] for e in range(E) for j, c in enumerate(menu)) == R)
    loads = []
    for g in range(G):
        m.Add(sum(n[e][j][g] for e in range(E) for j in range(len(menu))) == k)
        ld = sum(ints[e][j] * n[e][j][g] for e in range(E) for j in range(len(menu)))
        if order == "vars":
            var = m.NewIntVar(0, max(max(r) for r in ints) * k, f"load{g}")
            m.Add(var == ld)
            ld = var
        loads.append(ld)
        m.Add(ld <= top)
    if order:
        for g in range(G - 1):
            m.Add(loads[g] >= loads[g + 1])
    m.Minimize(top)
    return m


def brute(ints, menu, R, G, nodup):
    """Exhaustive optimum of the integer model."""
    E = len(ints)
    k = R // G
    best = None
    for pick in itertools.product(range(len(menu)), repeat=E):
        counts = [menu[j] for j in pick]
        if sum(counts) != R:
            continue
        per = [ints[e][pick[e]] for e in range(E)]
        loads = [0] * G
        space = [k] * G
        held = [[0] * E for _ in range(G)]

        def place(e, left):
            nonlocal best
            if e == E:
                t = max(loads)
                if best is None or t < best:
                    best = t
                return
            if left == 0:
                place(e + 1, counts[e + 1] if e + 1 < E else 0)
                return
            if best is not None and max(loads) >= best:
                return
            for g in range(G):
                if space[g] == 0 or (nodup and held[g][e]):
                    continue
                space[g] -= 1
                loads[g] += per[e]
                held[g][e] += 1
                place(e, left - 1)
                held[g][e] -= 1
                loads[g] -= per[e]
                space[g] += 1

        place(0, counts[0])
    return best


SETTINGS = {
    "default": {},
    "symmetry_level=0": {"symmetry_level": 0},
    "cp_model_presolve=False": {"cp_model_presolve": False},
}


def solve(model, params):
    s = cp_model.CpSolver()
    s.parameters.num_workers = 1
    s.parameters.max_time_in_seconds = 10.0
    for key, v in params.items():
        setattr(s.parameters, key, v)
    st = s.Solve(model)
    return s.StatusName(st), (round(s.ObjectiveValue()) if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None)


# The audit's failing instances (issue 12), first: (loads, R, G, no duplicates).
KNOWN = [
    ([2.0, 2.0, 1.0, 2.1, 3.0], 8, 2, True),
    ([1036626811.0, 2682724336.0, 3691249995.0, 2335697175.0], 6, 2, True),
    ([7.908521498201095, 2.2, 1.8], 4, 2, True),           # node 0 of the hierarchical case
    ([3.2554641024909214, 8.9, 2.7718916492318613], 4, 2, True),
    ([7.5, 8.4, 0.4, 9.7], 6, 2, True),
    ([2 / 3, 2 / 3, 1 / 3, 0.7, 1.0], 8, 2, True),
]


def instances(n, seed):
    rng = random.Random(seed)
    out = list(KNOWN)
    while len(out) < n:
        G = rng.choice([2, 2, 3])
        k = rng.choice([1, 2, 3, 4])
        R = G * k
        lo, hi = max(2, R - 4), min(R, 6)
        if lo > hi:
            continue
        E = rng.randint(lo, hi)
        nodup = rng.random() < 0.5
        if nodup and -(-R // G) > E:       # not enough experts for k distinct per GPU
            continue
        # Ties (equal loads) and near-ties make the symmetric structure under which the
        # fault shows; pools of a few values give them often.
        pool = [rng.uniform(0.1, 10) for _ in range(rng.randint(2, E))] + [2 / 3, 1.0, 2.0]
        w = [rng.choice(pool) for _ in range(E)]
        out.append((w, R, G, nodup))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-level", type=int, default=200)
    ap.add_argument("--bits", default="16,20,24,26,28,30,31,32,33,34,36,40,44,48,50")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    levels = [float(b) for b in args.bits.split(",")]
    cases = instances(args.per_level, args.seed)
    rows = []
    t0 = time.perf_counter()
    print(f"{'bits':>5} {'order':>5} {'setting':>24} {'checked':>7} {'wrong':>5} {'wrong OPTIMAL':>13}")
    examples = []
    for bits in levels:
        for order in (True, "vars", False):
            for name, params in SETTINGS.items():
                if order is not True and name != "default":
                    continue
                wrong = wrong_opt = checked = 0
                for w, R, G, nodup in cases:
                    menu = [c for c in range(1, R - len(w) + 2) if not nodup or c <= G]
                    ints = int_loads(w, menu, bits)
                    opt = brute(ints, menu, R, G, nodup)
                    status, obj = solve(build(ints, menu, R, G, order, nodup), params)
                    checked += 1
                    if opt is None:
                        bad = status != "INFEASIBLE"
                    else:
                        bad = status == "INFEASIBLE" or (status == "OPTIMAL" and obj != opt) or (obj is not None and obj < opt)
                    if bad:
                        wrong += 1
                        wrong_opt += status == "OPTIMAL"
                        if len(examples) < 20:
                            examples.append({"bits": bits, "order": order, "setting": name, "w": w, "R": R, "G": G,
                                             "nodup": nodup, "status": status, "objective": obj, "optimum": opt})
                rows.append({"bits": bits, "order": order, "setting": name, "checked": checked,
                             "wrong": wrong, "wrong_optimal": wrong_opt})
                print(f"{bits:>5g} {str(order):>5} {name:>24} {checked:>7} {wrong:>5} {wrong_opt:>13}", flush=True)
    import ortools
    out = {"ortools": ortools.__version__, "python": sys.version.split()[0], "per_level": args.per_level,
           "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1), "rows": rows, "examples": examples}
    Path(__file__).with_name("results.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
