"""docs/API.md matches the docstrings it is generated from."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, (
        "docs/API.md is missing or out of date with the docstrings; "
        "run `python scripts/gen_api_docs.py` and commit the result.\n"
        f"{proc.stdout}{proc.stderr}"
    )
