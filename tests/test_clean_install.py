"""A clean install (issue 13): the wheel built from this checkout, installed without the
checkout, runs ``eplb-opt bench --suite quick`` from another directory, with no peer
wheel to be had (an empty peer cache, pip offline): bench runs without the peers and
says so on stderr and in the report.

The wheel is installed with ``pip install --no-deps --target`` into a temporary folder
and run with that folder first on ``PYTHONPATH`` (the dependencies come from this
environment's site-packages); the editable install of the checkout never comes into it
(checked: ``eplb_opt`` is imported from the folder).  About 20-30 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target folder, wheel path): the wheel built from a copy of the sources."""
    base = tmp_path_factory.mktemp("clean-install")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("eplb_opt", "heuristics"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    dist = base / "dist"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("eplb_opt-*.whl")
    target = base / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return target, wheel


def _env(target: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLB_OPT_") and k != "PYTHONPATH"}
    deps = sysconfig.get_paths()["purelib"]          # numpy, torch, ... of this environment
    env.update(PYTHONPATH=os.pathsep.join([str(target), deps]), PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def test_wheel_layout(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert "heuristics" not in tops and "benchmarks" not in tops and "tests" not in tops
    for member in ("eplb_opt/heuristics/__init__.py", "eplb_opt/bench/__init__.py", "eplb_opt/bench/runner.py",
                   "eplb_opt/bench/peers.py", "eplb_opt/cli.py", "eplb_opt/integrations/vllm.py"):
        assert member in names, member


def test_version_written_once(installed):
    """pyproject.toml takes the version from eplb_opt.__version__ (issue 14): the wheel's
    name and metadata and the installed package all carry the source's one string."""
    import re

    target, wheel = installed
    init = (ROOT / "eplb_opt" / "__init__.py").read_text()
    (version,) = re.findall(r'^__version__ = "([^"]+)"$', init, flags=re.M)
    assert "version =" not in (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.dynamic]")[0]
    assert wheel.name.startswith(f"eplb_opt-{version}-")
    meta = zipfile.ZipFile(wheel).read(f"eplb_opt-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in meta
    got = subprocess.run([sys.executable, "-c", "import sys, eplb_opt; print(eplb_opt.__version__, "
                          "'torch' in sys.modules)"], env=_env(target), cwd=target, capture_output=True,
                         text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == [version, "False"]


def test_bench_quick_from_the_wheel_without_peers(installed, tmp_path):
    target, _ = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    empty_cache = tmp_path / "no-peers"
    env = _env(target, EPLB_OPT_PEER_CACHE=str(empty_cache))
    # The console script pip wrote (its interpreter: this environment's python).
    script = target / "bin" / "eplb-opt"
    assert script.exists()
    where = subprocess.run([sys.executable, "-c", "import eplb_opt, eplb_opt.bench.runner as r; "
                            "print(eplb_opt.__file__); print(r.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(target.resolve()), where.stdout
    t = time.perf_counter()
    proc = subprocess.run([str(script), "bench", "--suite", "quick", "--out", "out"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "needs a source checkout" not in proc.stderr
    # Every peer is left out and named, on stderr and in the report; nothing crashed.
    for peer in ("DeepSeek EPLB (sglang 0.5.23)", "SGLang deepseek_vec (0.5.23)", "vLLM 0.33 default",
                 "seed heuristic"):
        assert f"peer unavailable, left out: {peer}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    report = (work / "out" / "REPORT.md").read_text()
    assert "Peers left out (could not be loaded here): 4." in report
    assert "sglang==0.5.23 is not in the peer cache" in report
    data = json.loads((work / "out" / "results.json").read_text())
    assert {r["policy"] for r in data["rows"]} == {"eplb-opt heuristic", "eplb-opt exact"}
    assert all(r["valid"] for r in data["rows"]) and len(data["rows"]) == 12
    assert len(data["missing_peers"]) == 4
    print(f"bench --suite quick from the wheel, no peers: {elapsed:.1f} s")


def test_score_from_the_wheel_outside_the_checkout(installed, tmp_path):
    """``score module:Class.method`` with the module in the current directory."""
    target, _ = installed
    (tmp_path / "mypolicy.py").write_text(
        "import eplb_opt\n"
        "class Policy:\n"
        "    @classmethod\n"
        "    def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_gpus):\n"
        "        return eplb_opt.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)\n"
    )
    proc = subprocess.run([str(target / "bin" / "eplb-opt"), "score", "mypolicy:Policy.rebalance_experts",
                           "--no-ours", "--json"], cwd=tmp_path, env=_env(target), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["invalid"] == 0 and data["candidate"] == "mypolicy:Policy.rebalance_experts"
