"""Plugin entry points, exercised by the engines' real loaders (issue 13).

The loaders come from the published wheels (fetched once into the peer cache by
``eplb_opt.bench.peers.fetch_wheel``; the tests skip only when a wheel cannot be had):

* vLLM 0.33 (``vllm==0.33.0``): ``vllm/plugins/__init__.py`` (``load_general_plugins``,
  ``load_plugins_by_group``, the ``VLLM_PLUGINS`` allow-list) and ``vllm/envs.py`` it reads
  the allow-list from, run as shipped, plus the real policy registry files
  (``vllm/distributed/eplb/policy/{__init__,abstract,default}.py``,
  ``vllm/distributed/eplb/__init__.py``).  Stubbed: ``vllm/__init__.py``,
  ``vllm/distributed/__init__.py`` and ``vllm/config/__init__.py`` (empty: the real ones
  import vLLM's whole runtime, CUDA extensions and NCCL bindings) and
  ``vllm/config/parallel.py`` (only ``EPLBPolicyOption = Literal["default"]``, checked
  against the wheel's text; the real module needs pydantic and vLLM's config tree).
* SGLang 0.5.23 (``sglang==0.5.23``): ``sglang/srt/plugins/__init__.py`` (``load_plugins``,
  ``load_plugins_by_group``, the ``SGLANG_PLUGINS`` allow-list),
  ``sglang/srt/plugins/hook_registry.py`` (``HookRegistry.apply_hooks``) and
  ``sglang/srt/environ.py``, plus the real EPLB dispatch
  ``sglang/srt/eplb/eplb_algorithms/{__init__,deepseek,deepseek_vec,elasticity_aware}.py``.
  Stubbed: ``sglang/__init__.py`` (empty: the real one imports the runtime, transformers
  patches and the frontend language) and ``sglang/srt/elastic_ep/elastic_ep.py`` (a
  ``ElasticEPStateManager`` whose state the test sets: the real one needs
  ``torch.distributed`` and SGLang's server state).

Each scenario runs in a fresh interpreter whose ``sys.path`` holds only that tree and
the installed packages, so the entry points are found through the installed
distribution's metadata, as in a server (``pip install -e .`` must have run after the
entry points were added to pyproject.toml).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import types
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from eplb_opt import InvalidProblemError
from eplb_opt.integrations import sglang as eplb_sglang
from eplb_opt.integrations import vllm as eplb_vllm

ROOT = Path(__file__).resolve().parents[1]
VLLM_GROUP, SGLANG_GROUP = "vllm.general_plugins", "sglang.srt.plugins"
OURS = {VLLM_GROUP: "eplb_opt.integrations.vllm:register", SGLANG_GROUP: "eplb_opt.integrations.sglang:register"}

VLLM_REAL = [
    "vllm/envs.py",
    "vllm/plugins/__init__.py",
    "vllm/distributed/eplb/__init__.py",
    "vllm/distributed/eplb/policy/__init__.py",
    "vllm/distributed/eplb/policy/abstract.py",
    "vllm/distributed/eplb/policy/default.py",
]
SGLANG_REAL = [
    "sglang/srt/environ.py",
    "sglang/srt/plugins/__init__.py",
    "sglang/srt/plugins/hook_registry.py",
    "sglang/srt/eplb/__init__.py",
    "sglang/srt/eplb/eplb_algorithms/__init__.py",
    "sglang/srt/eplb/eplb_algorithms/deepseek.py",
    "sglang/srt/eplb/eplb_algorithms/deepseek_vec.py",
    "sglang/srt/eplb/eplb_algorithms/elasticity_aware.py",
]
ELASTIC_STUB = '''
class ElasticEPStateManager:
    """Test stand-in: instance() is what the test sets."""
    _instance = None

    @classmethod
    def instance(cls):
        return cls._instance

    @classmethod
    def healthy_rank_state(cls, *, ep_size=None, device=None):
        raise AssertionError("eplb-opt must not need torch.distributed for a healthy state")
'''


def _wheel(requirement: str) -> Path:
    try:
        from eplb_opt.bench.peers import fetch_wheel

        return fetch_wheel(requirement)
    except Exception as exc:  # noqa: BLE001 - no network and no cached wheel
        pytest.skip(f"{requirement} wheel unavailable: {exc}")


def _extract(zf: zipfile.ZipFile, root: Path, members: list[str]) -> None:
    for member in members:
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(zf.read(member))


def _stub(root: Path, path: str, text: str = "") -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)


@pytest.fixture(scope="module")
def vllm_site(tmp_path_factory):
    wheel = _wheel("vllm==0.33.0")
    root = tmp_path_factory.mktemp("vllm_plugins_site")
    with zipfile.ZipFile(wheel) as zf:
        _extract(zf, root, VLLM_REAL)
        text = {m: zf.read(m).decode() for m in ("vllm/config/parallel.py", "vllm/distributed/eplb/eplb_state.py",
                                                 "vllm/v1/worker/worker_base.py", "vllm/v1/engine/core.py")}
    # What the stubs and the plugin rely on, as shipped in the wheel:
    assert 'EPLBPolicyOption = Literal["default"]' in text["vllm/config/parallel.py"]
    assert "self.policy = EPLB_POLICIES[policy_type]" in text["vllm/distributed/eplb/eplb_state.py"]
    for caller in ("vllm/v1/worker/worker_base.py", "vllm/v1/engine/core.py"):   # workers and engine core
        assert "load_general_plugins()" in text[caller], caller
    for stub in ("vllm/__init__.py", "vllm/distributed/__init__.py", "vllm/config/__init__.py"):
        _stub(root, stub)
    _stub(root, "vllm/config/parallel.py", 'from typing import Literal\nEPLBPolicyOption = Literal["default"]\n')
    return root


@pytest.fixture(scope="module")
def sglang_site(tmp_path_factory):
    wheel = _wheel("sglang==0.5.23")
    root = tmp_path_factory.mktemp("sglang_plugins_site")
    with zipfile.ZipFile(wheel) as zf:
        _extract(zf, root, SGLANG_REAL)
        sources = {n: zf.read(n).decode(errors="replace") for n in zf.namelist()
                   if n.startswith("sglang/srt/") and n.endswith(".py")}
    # SGLang calls the dispatch through the module (so replacing the module attribute
    # reaches it), and nothing in the wheel holds a `from ... import rebalance_experts` copy.
    loc = sources["sglang/srt/eplb/expert_location.py"]
    assert "from sglang.srt.eplb import eplb_algorithms" in loc and "eplb_algorithms.rebalance_experts(" in loc
    by_name = [n for n, src in sources.items() if not n.startswith("sglang/srt/eplb/eplb_algorithms/")
               and re.search(r"from\s+sglang\.srt\.eplb\.eplb_algorithms\s+import[^\n]*rebalance_experts", src)]
    assert by_name == []
    for caller in ("sglang/srt/managers/scheduler.py", "sglang/srt/entrypoints/engine.py"):
        assert "load_plugins()" in sources[caller], caller
    _stub(root, "sglang/__init__.py")
    _stub(root, "sglang/srt/elastic_ep/elastic_ep.py", ELASTIC_STUB)
    return root


def _run(site: Path, code: str, **env_vars: str) -> str:
    """``code`` in a fresh interpreter on ``site`` + the installed packages, with only
    the given EPLB_OPT_* / allow-list variables set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EPLB_OPT_", "VLLM_", "SGLANG_")) and k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", **env_vars)
    proc = subprocess.run([sys.executable, "-c", CAPTURE + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=site, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


CAPTURE = """
import logging, os, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record)
def capture(name):
    log = logging.getLogger(name)
    log.setLevel(logging.DEBUG)
    log.addHandler(Keep(logging.DEBUG))
def mine(name, level=logging.INFO):
    return [r for r in records if r.name == name and r.levelno >= level]
"""


# -- metadata ---------------------------------------------------------------------------

def test_entry_points_are_declared_and_installed():
    tomllib = pytest.importorskip("tomllib")        # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for group, value in OURS.items():
        assert meta[group] == {"eplb_opt": value}
        got = {ep.name: ep.value for ep in entry_points(group=group)}
        assert got.get("eplb_opt") == value, (
            f"entry point {group} eplb_opt is not in the installed metadata ({got}); "
            "run `.venv/bin/python -m pip install --no-deps -e .`")


# -- vLLM: the real loader ------------------------------------------------------------------

def test_vllm_real_loader_disabled_and_allow_list(vllm_site):
    out = _run(vllm_site, """
        import vllm.plugins as plugins
        import vllm.distributed.eplb.policy as registry
        capture("vllm.eplb_opt")
        vllm_default = registry.EPLB_POLICIES["default"]
        assert vllm_default.__name__ == "DefaultEplbPolicy"

        # Discovery through the real loader and the installed metadata.
        found = plugins.load_plugins_by_group(plugins.DEFAULT_PLUGINS_GROUP)
        import eplb_opt.integrations.vllm as ev
        assert found["eplb_opt"] is ev.register, found

        # EPLB_OPT_VLLM unset: the loader calls register(), which changes nothing.
        plugins.load_general_plugins()
        assert registry.EPLB_POLICIES["default"] is vllm_default
        assert [r.getMessage() for r in mine("vllm.eplb_opt", logging.DEBUG)] == [
            "eplb-opt: EPLB_OPT_VLLM is not set; vLLM's EPLB policy is left alone"]
        assert mine("vllm.eplb_opt") == []                   # nothing at INFO or above

        # EPLB_OPT_VLLM=0: still nothing.
        os.environ["EPLB_OPT_VLLM"] = "0"
        plugins.plugins_loaded = False
        plugins.load_general_plugins()
        assert registry.EPLB_POLICIES["default"] is vllm_default

        # VLLM_PLUGINS is vLLM's allow-list: without eplb_opt in it, EPLB_OPT_VLLM=1 is not reached.
        os.environ.update(EPLB_OPT_VLLM="1", VLLM_PLUGINS="some_other_plugin")
        records.clear()
        plugins.plugins_loaded = False
        plugins.load_general_plugins()
        assert registry.EPLB_POLICIES["default"] is vllm_default and mine("vllm.eplb_opt", 0) == []

        # ... and with it in the allow-list, it is.
        os.environ["VLLM_PLUGINS"] = "some_other_plugin,eplb_opt"
        plugins.plugins_loaded = False
        plugins.load_general_plugins()
        assert registry.EPLB_POLICIES["default"] is ev.EplbOptPolicy
        print("ok")
    """)
    assert out.strip() == "ok"


def test_vllm_real_loader_enabled_installs_the_deterministic_policy(vllm_site):
    out = _run(vllm_site, """
        import torch
        import vllm.plugins as plugins
        import vllm.distributed.eplb.policy as registry
        from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy
        import eplb_opt
        from eplb_opt.workloads import generate
        capture("vllm.eplb_opt")
        vllm_default = registry.EPLB_POLICIES["default"]

        plugins.load_general_plugins()                       # EPLB_OPT_VLLM=1
        import eplb_opt.integrations.vllm as ev
        policy = registry.EPLB_POLICIES["default"]           # what vLLM's EplbState looks up
        assert policy is ev.EplbOptPolicy and issubclass(policy, AbstractEplbPolicy)
        assert set(registry.EPLB_POLICIES) == {"default"}
        [line] = [r.getMessage() for r in mine("vllm.eplb_opt")]
        assert "EPLB_OPT_VLLM=1" in line and "DefaultEplbPolicy" in line and "EplbOptPolicy" in line, line
        assert "mode='exact'" in line and "time_limit=0.2" in line and "deterministic=True" in line, line

        # Idempotent: loaded again (another engine in this process) or called directly.
        plugins.plugins_loaded = False
        plugins.load_general_plugins()
        assert ev.register() is policy and registry.EPLB_POLICIES["default"] is policy
        assert len(mine("vllm.eplb_opt")) == 1

        # The policy plans as solve(deterministic=True) with the environment's settings.
        w = torch.from_numpy(generate("deepseek-v3-prefill", seed=0, windows=1)[0][:2])
        import eplb_opt.api
        calls, real = [], eplb_opt.api.solve
        eplb_opt.api.solve = lambda *a, **k: (calls.append(k), real(*a, **k))[1]
        got = policy.rebalance_experts(w, 288, 8, 4, 32)
        eplb_opt.api.solve = real
        [kw] = calls
        assert (kw["mode"], kw["time_limit"], kw["deterministic"], kw["workers"]) == ("exact", 0.2, True, None), kw
        ref = eplb_opt.solve(w, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32,
                             mode="exact", time_limit=0.2, deterministic=True)
        assert torch.equal(got, ref.plan.phy2log)

        # Exact mode with EPLB_OPT_DETERMINISTIC=0 stops the engine's start with a clear
        # error (vLLM does not catch general plugins' errors) and changes nothing.
        registry.EPLB_POLICIES["default"] = vllm_default
        os.environ["EPLB_OPT_DETERMINISTIC"] = "0"
        plugins.plugins_loaded = False
        try:
            plugins.load_general_plugins()
        except eplb_opt.InvalidProblemError as exc:
            assert "EPLB_OPT_DETERMINISTIC=0" in str(exc) and "different plan" in str(exc), exc
        else:
            raise AssertionError("no error")
        assert registry.EPLB_POLICIES["default"] is vllm_default
        print("ok")
    """, EPLB_OPT_VLLM="1", EPLB_OPT_MODE="exact", EPLB_OPT_TIME_LIMIT="0.2")
    assert out.strip() == "ok"


# -- SGLang: the real loader ----------------------------------------------------------------

def test_sglang_real_loader_disabled_allow_list_and_bad_settings(sglang_site):
    out = _run(sglang_site, """
        import sglang.srt.plugins as plugins
        from sglang.srt.eplb import eplb_algorithms
        capture("eplb_opt.integrations.sglang")
        capture("sglang.srt.plugins")
        original = eplb_algorithms.rebalance_experts

        found = plugins.load_plugins_by_group(plugins.GENERAL_PLUGINS_GROUP)
        import eplb_opt.integrations.sglang as es
        func, dist = found["eplb_opt"]
        assert func is es.register and dist.replace("_", "-") == "eplb-opt", found

        # EPLB_OPT_SGLANG unset: the loader calls register(), which changes nothing.
        plugins.load_plugins()
        assert eplb_algorithms.rebalance_experts is original
        assert [r.getMessage() for r in mine("eplb_opt.integrations.sglang", logging.DEBUG)] == [
            "eplb-opt: EPLB_OPT_SGLANG is not set; SGLang's EPLB algorithms are left alone"]
        assert any(r.getMessage() == "Executed general plugin: eplb_opt" for r in mine("sglang.srt.plugins"))

        # SGLANG_PLUGINS is SGLang's allow-list: without eplb_opt in it, nothing is loaded.
        os.environ.update(EPLB_OPT_SGLANG="1", SGLANG_PLUGINS="some_other_plugin")
        records.clear()
        plugins._plugins_loaded = False
        plugins.load_plugins()
        assert eplb_algorithms.rebalance_experts is original
        assert mine("eplb_opt.integrations.sglang", 0) == []

        # Exact mode with EPLB_OPT_DETERMINISTIC=0: register() raises; SGLang's loader logs
        # it (with our message) and keeps its own algorithms.
        del os.environ["SGLANG_PLUGINS"]
        os.environ.update(EPLB_OPT_MODE="exact", EPLB_OPT_DETERMINISTIC="0")
        records.clear()
        plugins._plugins_loaded = False
        plugins.load_plugins()
        assert eplb_algorithms.rebalance_experts is original
        [failed] = [r for r in mine("sglang.srt.plugins", logging.ERROR)]
        assert failed.getMessage() == "Failed to execute general plugin: eplb_opt"
        assert isinstance(failed.exc_info[1], es.InvalidProblemError)
        assert "EPLB_OPT_DETERMINISTIC=0" in str(failed.exc_info[1]) and "SGLang" in str(failed.exc_info[1])
        print("ok")
    """)
    assert out.strip() == "ok"


def test_sglang_real_loader_enabled_puts_eplb_opt_behind_the_dispatch(sglang_site):
    out = _run(sglang_site, """
        import types
        import torch
        import sglang.srt.plugins as plugins
        from sglang.srt.plugins.hook_registry import HookRegistry
        from sglang.srt.eplb import eplb_algorithms
        from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
        import eplb_opt
        from eplb_opt.workloads import generate
        capture("eplb_opt.integrations.sglang")
        capture("sglang.srt.plugins.hook_registry")
        # (in a dict: SGLang's hook registry rebinds every module global that is the original,
        # this script's too)
        keep = {"original": eplb_algorithms.rebalance_experts}
        original = keep["original"]
        # A module holding a `from ... import rebalance_experts` copy (none in 0.5.23).
        copy = types.ModuleType("copy_holder")
        copy.rebalance_experts = original
        sys.modules["copy_holder"] = copy

        plugins.load_plugins()                                # EPLB_OPT_SGLANG=1
        import eplb_opt.integrations.sglang as es
        patched = eplb_algorithms.rebalance_experts
        assert patched is not keep["original"] and copy.rebalance_experts is patched
        assert patched.__wrapped__ is keep["original"]
        [line] = [r.getMessage() for r in mine("eplb_opt.integrations.sglang")]
        assert "EPLB_OPT_SGLANG=1" in line and "deterministic=True" in line and "mode='exact'" in line, line
        assert any("Applied 1 hook(s) to sglang.srt.eplb.eplb_algorithms.rebalance_experts" in r.getMessage()
                   and "plugin=eplb_opt" in r.getMessage() for r in mine("sglang.srt.plugins.hook_registry"))

        # Idempotent: loading again registers and applies nothing more.
        plugins._plugins_loaded = False
        plugins.load_plugins()
        assert es.register() is es.dispatch
        assert eplb_algorithms.rebalance_experts is patched
        assert len(HookRegistry._hooks[es.TARGET]) == 1 and len(mine("eplb_opt.integrations.sglang")) == 1

        # The call exactly as sglang/srt/eplb/expert_location.py's init_by_eplb makes it.
        steps = torch.from_numpy(generate("deepseek-v3-prefill", seed=0, windows=2)[:, :2])   # [steps, L, E]
        def init_by_eplb(logical_count, groups, nodes, raw_algorithm="auto"):
            return eplb_algorithms.rebalance_experts(
                tokens_per_expert=logical_count, num_physical_experts=288, num_local_physical_experts=288 // 32,
                num_groups=groups, num_nodes=nodes,
                algorithm=eplb_algorithms.compute_algorithm(raw_algorithm=raw_algorithm, num_groups=groups,
                                                            num_nodes=nodes))
        p2l, l2p, cnt = init_by_eplb(steps, 8, 4)
        # The step axis goes on as history (eplb_opt.integrations.sglang): with 2 steps, the
        # later one is the window planned for and the earlier one its history.
        last, past = steps[1], steps[:1].numpy()
        ref = eplb_opt.solve(last, history=past, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32,
                             mode="exact", time_limit=0.2, deterministic=True, policy="hierarchical")
        assert torch.equal(p2l, ref.plan.phy2log) and tuple(l2p.shape) == (2, 256, 33) and int(cnt.sum()) == 576
        flat = init_by_eplb(steps, None, 4)[0]                # no groups: SGLang's "auto" is the global deepseek
        glob = eplb_opt.solve(last, history=past, num_replicas=288, num_gpus=32, mode="exact", time_limit=0.2,
                              deterministic=True, policy="global")
        assert torch.equal(flat, glob.plan.phy2log)

        # Elasticity-aware algorithms: SGLang's inactive ranks hold nothing.
        state = types.SimpleNamespace(active_ranks=torch.ones(32, dtype=torch.int32))
        state.active_ranks[3] = 0
        ElasticEPStateManager._instance = state
        p2l = init_by_eplb(steps, 8, 4, "elasticity_aware_hierarchical")[0]
        assert (p2l[:, 27:36] == -1).all() and int((p2l == -1).sum()) == 2 * 9
        print("ok")
    """, EPLB_OPT_SGLANG="1", EPLB_OPT_MODE="exact", EPLB_OPT_TIME_LIMIT="0.2")
    assert out.strip() == "ok"


# -- register() without the engines' loaders (stand-in registries) ---------------------------

def _modules(monkeypatch, names: dict[str, types.ModuleType]) -> None:
    for name, module in names.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent in names:
            setattr(names[parent], child, module)


def _vllm_registry(monkeypatch, **attrs) -> types.ModuleType:
    names = {n: types.ModuleType(n) for n in ("vllm", "vllm.distributed", "vllm.distributed.eplb",
                                              "vllm.distributed.eplb.policy")}
    for key, val in attrs.items():
        setattr(names["vllm.distributed.eplb.policy"], key, val)
    _modules(monkeypatch, names)
    return names["vllm.distributed.eplb.policy"]


@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("EPLB_OPT_"):
            monkeypatch.delenv(var)
    yield monkeypatch
    eplb_vllm.EplbOptPolicy._config = {}
    eplb_sglang._config = {}


class _VllmDefault:
    pass


def test_vllm_register_disabled_enabled_idempotent_with_a_stand_in_registry(clean_env, caplog):
    registry = _vllm_registry(clean_env, EPLB_POLICIES={"default": _VllmDefault})
    caplog.set_level("DEBUG", logger="vllm.eplb_opt")
    assert eplb_vllm.register() is None and registry.EPLB_POLICIES["default"] is _VllmDefault
    clean_env.setenv("EPLB_OPT_VLLM", "off")
    assert eplb_vllm.register() is None and registry.EPLB_POLICIES["default"] is _VllmDefault
    clean_env.setenv("EPLB_OPT_VLLM", "1")
    assert eplb_vllm.register() is eplb_vllm.EplbOptPolicy
    assert eplb_vllm.register() is eplb_vllm.EplbOptPolicy
    assert registry.EPLB_POLICIES == {"default": eplb_vllm.EplbOptPolicy}
    infos = [r for r in caplog.records if r.name == "vllm.eplb_opt" and r.levelname == "INFO"]
    assert len(infos) == 1 and "_VllmDefault" in infos[0].getMessage()
    clean_env.setenv("EPLB_OPT_VLLM", "maybe")
    with pytest.raises(InvalidProblemError, match="EPLB_OPT_VLLM='maybe'"):
        eplb_vllm.register()


@pytest.mark.parametrize("attrs", [{}, {"EPLB_POLICIES": {"fancy": _VllmDefault}}, {"EPLB_POLICIES": ("default",)}])
def test_vllm_register_logs_and_keeps_vllm_when_the_registry_layout_differs(clean_env, caplog, attrs):
    registry = _vllm_registry(clean_env, **attrs)
    clean_env.setenv("EPLB_OPT_VLLM", "1")
    assert eplb_vllm.register() is None                      # no exception: the engine starts
    [err] = [r for r in caplog.records if r.name == "vllm.eplb_opt" and r.levelname == "ERROR"]
    assert "could NOT be installed" in err.getMessage() and "EPLB_POLICIES" in err.getMessage()
    assert getattr(registry, "EPLB_POLICIES", None) == attrs.get("EPLB_POLICIES")
    with pytest.raises(RuntimeError, match="not laid out as eplb-opt expects"):
        eplb_vllm.install()                                  # asked for in code: an error


def test_vllm_install_refuses_exact_without_determinism(clean_env):
    registry = _vllm_registry(clean_env, EPLB_POLICIES={"default": _VllmDefault})
    with pytest.raises(InvalidProblemError, match=r"deterministic=False with mode='exact' would give each rank"):
        eplb_vllm.install(mode="exact", deterministic=False)
    assert registry.EPLB_POLICIES["default"] is _VllmDefault
    assert eplb_vllm.install(mode="exact", time_limit=0.5) is eplb_vllm.EplbOptPolicy
    assert eplb_vllm.settings(eplb_vllm.EplbOptPolicy._config)["deterministic"] is True


def _sglang_stand_in(monkeypatch, fn) -> types.ModuleType:
    names = {n: types.ModuleType(n) for n in ("sglang", "sglang.srt", "sglang.srt.eplb",
                                              "sglang.srt.eplb.eplb_algorithms")}
    names["sglang.srt.eplb.eplb_algorithms"].rebalance_experts = fn
    _modules(monkeypatch, names)
    return names["sglang.srt.eplb.eplb_algorithms"]


def _sglang_original(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups, num_nodes,
                     algorithm):
    raise AssertionError("SGLang's own algorithm ran")


def test_sglang_register_outside_the_loader_installs_directly(clean_env, caplog):
    module = _sglang_stand_in(clean_env, _sglang_original)    # no sglang.srt.plugins: no hook registry
    caplog.set_level("INFO", logger="eplb_opt.integrations.sglang")
    assert eplb_sglang.register() is None and module.rebalance_experts is _sglang_original
    clean_env.setenv("EPLB_OPT_SGLANG", "1")
    assert eplb_sglang.register() is eplb_sglang.dispatch is module.rebalance_experts
    assert eplb_sglang.register() is eplb_sglang.dispatch
    [line] = [r.getMessage() for r in caplog.records if r.name == "eplb_opt.integrations.sglang"]
    assert "_sglang_original" in line and "deterministic=True" in line
    w = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(0))
    p2l = module.rebalance_experts(w, 32, 4, 4, 2, types.SimpleNamespace(name="deepseek_hierarchical"))[0]
    ref = eplb_sglang.rebalance_experts(w, 32, 4, 4, 2, enable_hierarchical=True)[0]
    assert torch.equal(p2l, ref)


def test_sglang_register_logs_and_keeps_sglang_when_the_dispatch_differs(clean_env, caplog):
    def other(weight, num_replicas, num_groups, num_nodes, num_gpus):   # another signature
        raise AssertionError

    module = _sglang_stand_in(clean_env, other)
    clean_env.setenv("EPLB_OPT_SGLANG", "1")
    assert eplb_sglang.register() is None and module.rebalance_experts is other
    [err] = [r for r in caplog.records if r.name == "eplb_opt.integrations.sglang" and r.levelname == "ERROR"]
    assert "could NOT be put behind" in err.getMessage() and "tokens_per_expert" in err.getMessage()
    with pytest.raises(RuntimeError, match="not laid out as eplb-opt expects"):
        eplb_sglang.install()
