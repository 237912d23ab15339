#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with eplb-opt
# (editable) and its test tools.  Only Python >= 3.10 with venv is assumed.
#
# PyTorch: the CPU build is installed first with `pip install torch==2.13.0` (on this
# project's machines that resolves to a local CPU wheel; elsewhere it downloads the
# default build for your platform).  Set EPLB_OPT_TORCH to another requirement to
# override, e.g. EPLB_OPT_TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! $VPY -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  $VPY -m pip install --quiet ${EPLB_OPT_TORCH:-torch==2.13.0}
fi
$VPY -m pip install --quiet -e '.[test,ray]'
