#!/usr/bin/env bash
# The kernel tests on the lowest numba this project declares and on the newest one
# (issue 15: "The kernel tests must pass on the lowest version you declare as well as on
# the newest.  Record both runs.").
#
#   bash scripts/check_numba_versions.sh               # set up both venvs, run, record
#   bash scripts/check_numba_versions.sh --setup-only  # only build the venvs
#
# Each run gets a throwaway venv under /tmp (/tmp/eplb-numba-lowest, /tmp/eplb-numba-newest;
# kept between calls so a second call skips the installs, remove them to start over):
# torch first (pip install torch==2.13.0, as scripts/setup.sh does), then this checkout
# with its test extra (pip install -e '.[test]'), then numba forced to the version under
# test: LOWEST (default 0.65.0, the pin of vllm==0.33.0 and the floor of pyproject's
# numba>=0.65) or the newest release the index offers.  pip takes numpy down when that
# numba's metadata caps it; should numba still refuse the numpy it got at import, numpy
# steps down through NUMPY_FALLBACKS until it imports, in that venv only.
#
# Each venv runs  pytest -q tests/test_kernel*.py tests/test_heuristics.py tests/test_bounds.py
# tests/test_fused_figures.py tests/test_plan.py (the certified bounds, the figures and the
# verifier have kernels too) with its own
# NUMBA_CACHE_DIR (so the versions never share or overwrite the checkout's cache), and the
# versions, counts and durations go to benchmarks/numba_versions.json (OUT overrides).
# Exit status: 0 when every run passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
LOWEST="${LOWEST:-0.65.0}"
OUT="${OUT:-$ROOT/benchmarks/numba_versions.json}"
NUMPY_FALLBACKS="${NUMPY_FALLBACKS:-2.3.5 2.2.6 2.1.3 2.0.2 1.26.4}"
TESTS=(tests/test_kernel*.py tests/test_heuristics.py tests/test_bounds.py tests/test_fused_figures.py tests/test_plan.py)
SETUP_ONLY=0
[[ "${1:-}" == "--setup-only" ]] && SETUP_ONLY=1

# setup LABEL REQUIREMENT: the venv /tmp/eplb-numba-LABEL with numba REQUIREMENT.
setup() {
    local venv="/tmp/eplb-numba-$1" req="$2"
    if [[ ! -x "$venv/bin/python" ]]; then
        "$PY" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q torch==2.13.0
        "$venv/bin/python" -m pip install -q -e "$ROOT[test]"
    fi
    "$venv/bin/python" -m pip install -q "$req"
    if ! "$venv/bin/python" -c "import numba" 2>/dev/null; then
        local np
        for np in $NUMPY_FALLBACKS; do
            echo "numba does not import with numpy $("$venv/bin/python" -c 'import numpy; print(numpy.__version__)'); trying numpy==$np" >&2
            "$venv/bin/python" -m pip install -q "numpy==$np"
            "$venv/bin/python" -c "import numba" 2>/dev/null && break
        done
    fi
    "$venv/bin/python" -c "import numba, numpy, llvmlite, torch; print('$1:', 'numba', numba.__version__, 'llvmlite', llvmlite.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
}

# run LABEL: the tests in that venv; writes /tmp/eplb-numba-LABEL/result.json.
run() {
    local venv="/tmp/eplb-numba-$1" start end rc=0
    rm -rf "$venv/numba-cache"
    start=$(date +%s.%N)
    NUMBA_CACHE_DIR="$venv/numba-cache" "$venv/bin/python" -m pytest -q -o addopts=-ra -p no:cacheprovider \
        "${TESTS[@]}" >"$venv/pytest.log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    tail -n 3 "$venv/pytest.log"
    "$venv/bin/python" - "$1" "$rc" "$start" "$end" "$venv" "${TESTS[@]}" <<'EOF'
import json, re, sys
import llvmlite, numba, numpy, torch
label, rc, start, end, venv, *tests = sys.argv[1:]
log = open(f"{venv}/pytest.log").read().splitlines()
summary = next((l for l in reversed(log) if re.search(r"\b(passed|failed|error)", l)), "")
count = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}
json.dump({
    "label": label, "numba": numba.__version__, "llvmlite": llvmlite.__version__,
    "numpy": numpy.__version__, "torch": torch.__version__, "exit_code": int(rc),
    "passed": count.get("passed", 0), "failed": count.get("failed", 0),
    "errors": count.get("errors", count.get("error", 0)), "skipped": count.get("skipped", 0),
    "seconds": round(float(end) - float(start), 1), "summary": summary.strip("= "),
    "failures": [l for l in log if l.startswith(("FAILED", "ERROR"))][:20],
}, open(f"{venv}/result.json", "w"), indent=1)
EOF
}

NEWEST="$("$PY" -m pip index versions numba 2>/dev/null | sed -n 's/^numba (\(.*\))$/\1/p')"
[[ -n "$NEWEST" ]] || { echo "could not find the newest numba on the index" >&2; exit 2; }
setup lowest "numba==$LOWEST"
setup newest "numba==$NEWEST"
[[ $SETUP_ONLY == 1 ]] && exit 0

run lowest
run newest
"$PY" - "$OUT" "${TESTS[@]}" <<'EOF'
import json, os, platform, sys, time
out, *tests = sys.argv[1:]
runs = [json.load(open(f"/tmp/eplb-numba-{label}/result.json")) for label in ("lowest", "newest")]
json.dump({
    "what": "tests/test_kernel*.py, tests/test_heuristics.py, tests/test_bounds.py, tests/test_fused_figures.py and tests/test_plan.py on the lowest declared and the newest numba "
            "(scripts/check_numba_versions.sh); seconds are the whole pytest run, cold numba cache, wall clock",
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "tests": tests, "runs": runs,
}, open(out, "w"), indent=1)
print(open(out).read())
sys.exit(0 if all(r["exit_code"] == 0 for r in runs) else 1)
EOF
