"""Peers loaded from their published wheels, never re-implemented.

Wheels are fetched once with ``pip download --no-deps`` into a cache outside the
repository (``~/.cache/eplb-opt/peers``, or ``$EPLB_OPT_PEER_CACHE``); the one source
file a peer needs is extracted next to the wheel and imported from there by path, so
no peer package (and none of its dependency tree) is installed.  A wheel that cannot be
had (no network and no cached copy) raises :class:`PeerUnavailable`; ``eplb-opt bench``
then runs without that peer and says so.

* ``deepseek``: DeepSeek's EPLB, as copied verbatim into SGLang
  (``sglang==0.5.23``: ``sglang/srt/eplb/eplb_algorithms/deepseek.py``; imports only torch).
* ``deepseek_original``: the same algorithm in DeepSeek's original form (its loops index
  torch tensors element by element, as deepseek-ai/EPLB's ``eplb.py`` does), as SGLang
  shipped it before 0.5 (``sglang==0.4.10``, same path); it gives the same plans as the
  0.5.23 copy, which converts to Python lists first.  Its one SGLang import
  (``sglang.srt.utils.get_bool_env_var``, unused) is served by a stand-in module while the
  file loads.  Timing context only: the targets compare against ``deepseek``.
* ``deepseek_vec``: SGLang's vectorised variant beside it (``deepseek_vec.py``; takes
  per-step loads ``[steps, L, E]`` and the GPU count as slots per GPU).
* ``elasticity_aware``: SGLang's elasticity-aware variant for inactive ranks
  (``elasticity_aware.py``, same wheel), the peer for masked GPUs.
* ``vllm_default``: vLLM 0.33's ``DefaultEplbPolicy`` (``vllm==0.33.0``:
  ``vllm/distributed/eplb/policy/abstract.py`` and ``default.py``), loaded as a small
  package of its own so the rest of vLLM (whose ``policy/__init__.py`` imports vLLM's
  config) is never imported.
* ``seed``: the heuristic this project grew from, ``$EPLB_OPT_SEED_HEURISTIC`` or, in a
  source checkout, ``../shared/reference/seed_heuristic.py`` beside the repository, when
  present; benchmarks only, the planner never imports it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

__all__ = [
    "CACHE",
    "PeerUnavailable",
    "available_peers",
    "cache_dir",
    "deepseek_original_rebalance",
    "deepseek_rebalance",
    "deepseek_vec_rebalance",
    "elasticity_rebalance",
    "fetch_wheel",
    "load_deepseek",
    "load_deepseek_original",
    "load_deepseek_vec",
    "load_elasticity_aware",
    "load_seed",
    "load_vllm_default",
    "seed_rebalance",
    "vllm_default_rebalance",
]

def cache_dir() -> Path:
    """The peer wheel cache: ``$EPLB_OPT_PEER_CACHE``, else ``~/.cache/eplb-opt/peers``
    (read at each call)."""
    return Path(os.environ.get("EPLB_OPT_PEER_CACHE") or "~/.cache/eplb-opt/peers").expanduser()


CACHE = cache_dir()   # the cache at import time (kept for callers of the old constant)
SGLANG = "sglang==0.5.23"
VLLM = "vllm==0.33.0"
SGLANG_ORIGINAL = "sglang==0.4.10"
# How long one ``pip download`` may take before the peer counts as unavailable (a
# network that drops packets would otherwise hold ``bench`` for pip's retries).
DOWNLOAD_TIMEOUT_S = 300.0


def _seed_path() -> Path | None:
    """``$EPLB_OPT_SEED_HEURISTIC``, else ``../shared/reference/seed_heuristic.py`` beside
    a source checkout (None in an installed package)."""
    env = os.environ.get("EPLB_OPT_SEED_HEURISTIC")
    if env:
        return Path(env).expanduser()
    root = Path(__file__).resolve().parents[2]          # the checkout holding eplb_opt/
    if (root / "pyproject.toml").exists() and (root / "benchmarks").is_dir():
        return root.parent / "shared" / "reference" / "seed_heuristic.py"
    return None


SEED = _seed_path()


class PeerUnavailable(RuntimeError):
    """A peer wheel could not be fetched (no network and no cached copy), or a peer's
    file is absent."""


# Requirements whose download already failed in this process: not retried (bench loads
# two peers from the SGLang wheel, and an offline machine should pay for pip once).
_FAILED: dict[tuple[str, str], str] = {}


def fetch_wheel(requirement: str) -> Path:
    """Path of the cached wheel for ``requirement`` (``name==version``), downloading it
    with ``pip download --no-deps`` into :func:`cache_dir` on first use.

    Raises:
        PeerUnavailable: not cached and pip could not download it (no network, no pip,
            no such release, or pip ran past ``DOWNLOAD_TIMEOUT_S``).
    """
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    cache = cache_dir()
    found = sorted(cache.glob(pattern)) if cache.is_dir() else []
    if found:
        return found[-1]
    key = (str(cache), requirement)
    if key in _FAILED:
        raise PeerUnavailable(_FAILED[key])
    try:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--retries", "2", requirement, "-d", str(cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
        why = (proc.stderr.strip().splitlines() or [f"pip exited with status {proc.returncode}"])[-1][-300:]
    except subprocess.TimeoutExpired:
        proc, why = None, f"pip download ran past {DOWNLOAD_TIMEOUT_S:g} s"
    except OSError as exc:
        proc, why = None, f"{type(exc).__name__}: {exc}"
    found = sorted(cache.glob(pattern)) if cache.is_dir() else []
    if proc is None or proc.returncode != 0 or not found:
        msg = (f"{requirement} is not in the peer cache {cache} and could not be downloaded "
               f"(no network?): {why}")
        _FAILED[key] = msg
        raise PeerUnavailable(msg)
    return found[-1]


def _extract(requirement: str, member: str) -> Path:
    wheel = fetch_wheel(requirement)
    target = wheel.parent / wheel.stem / member
    if not target.exists():
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return target


def _import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover
        raise PeerUnavailable(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def load_deepseek() -> ModuleType:
    """DeepSeek EPLB (``rebalance_experts(weight, num_replicas, num_groups, num_nodes,
    num_gpus, enable_hierarchical)``) from the SGLang wheel."""
    path = _extract(SGLANG, "sglang/srt/eplb/eplb_algorithms/deepseek.py")
    return _import_file(path, "eplb_peer_deepseek")


def deepseek_rebalance(policy: str = "auto") -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """DeepSeek's reference behind the 5-argument signature.

    ``policy="auto"`` picks the hierarchical policy when ``num_groups % num_nodes == 0``,
    as SGLang's ``compute_algorithm`` and vLLM do."""
    ds = load_deepseek()

    def run(weight, num_replicas, num_groups, num_nodes, num_gpus):
        if policy == "auto":
            hier = num_groups % num_nodes == 0
        else:
            hier = policy == "hierarchical"
        w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(weight)
        return ds.rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus, hier)

    return run


@lru_cache(maxsize=None)
def load_deepseek_original() -> ModuleType:
    """DeepSeek EPLB in its original tensor-indexing form, from the ``sglang==0.4.10``
    wheel (``rebalance_experts(..., enable_hierarchical)``, as :func:`load_deepseek`)."""
    import types

    path = _extract(SGLANG_ORIGINAL, "sglang/srt/eplb/eplb_algorithms/deepseek.py")
    names = ["sglang", "sglang.srt", "sglang.srt.utils"]
    if any(n in sys.modules for n in names):  # pragma: no cover - a real SGLang is loaded
        return _import_file(path, "eplb_peer_deepseek_original")
    stub = types.ModuleType("sglang.srt.utils")
    stub.get_bool_env_var = lambda name, default="false": False  # type: ignore[attr-defined]
    sys.modules.update({"sglang": types.ModuleType("sglang"), "sglang.srt": types.ModuleType("sglang.srt"),
                        "sglang.srt.utils": stub})
    try:
        return _import_file(path, "eplb_peer_deepseek_original")
    finally:
        for n in names:
            sys.modules.pop(n, None)


def deepseek_original_rebalance() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`load_deepseek_original` behind the 5-argument signature (policy as
    :func:`deepseek_rebalance` with ``"auto"``)."""
    ds = load_deepseek_original()

    def run(weight, num_replicas, num_groups, num_nodes, num_gpus):
        w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(weight)
        return ds.rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus, num_groups % num_nodes == 0)

    return run


@lru_cache(maxsize=None)
def load_deepseek_vec() -> ModuleType:
    """SGLang's vectorised DeepSeek variant (``rebalance_experts(tokens_per_expert
    [steps, L, E], num_physical_experts, num_local_physical_experts, num_groups,
    num_nodes, enable_hierarchical)``)."""
    path = _extract(SGLANG, "sglang/srt/eplb/eplb_algorithms/deepseek_vec.py")
    return _import_file(path, "eplb_peer_deepseek_vec")


def deepseek_vec_rebalance(policy: str = "auto") -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``deepseek_vec`` behind the 5-argument signature (one step of loads; a
    ``[steps, L, E]`` weight is passed through as steps)."""
    mod = load_deepseek_vec()

    def run(weight, num_replicas, num_groups, num_nodes, num_gpus):
        hier = (num_groups % num_nodes == 0) if policy == "auto" else policy == "hierarchical"
        w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(weight)
        if w.dim() == 2:
            w = w.unsqueeze(0)
        return mod.rebalance_experts(
            tokens_per_expert=w, num_physical_experts=num_replicas,
            num_local_physical_experts=num_replicas // num_gpus, num_groups=num_groups,
            num_nodes=num_nodes, enable_hierarchical=hier,
        )

    return run


@lru_cache(maxsize=None)
def load_elasticity_aware() -> ModuleType:
    """SGLang's elasticity-aware algorithm (``elasticity_aware.py``: plans with
    ``num_local_experts * active`` replicas under the global policy when ranks are
    inactive, then inserts placeholder slots for them).  It imports DeepSeek's module by
    its package path, so that path is registered first, pointing at the same wheel file."""
    import types

    ds = load_deepseek()
    for name in ("sglang", "sglang.srt", "sglang.srt.eplb", "sglang.srt.eplb.eplb_algorithms"):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = []                       # a namespace stub: nothing else of sglang loads
            sys.modules[name] = pkg
    sys.modules.setdefault("sglang.srt.eplb.eplb_algorithms.deepseek", ds)
    path = _extract(SGLANG, "sglang/srt/eplb/eplb_algorithms/elasticity_aware.py")
    return _import_file(path, "eplb_peer_elasticity_aware")


def elasticity_rebalance() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus,
    active_ranks)`` of SGLang's elasticity-aware algorithm (hierarchical when every rank
    is active and ``num_groups % num_nodes == 0``)."""
    mod = load_elasticity_aware()

    def run(weight, num_replicas, num_groups, num_nodes, num_gpus, active_ranks):
        w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(weight)
        active = torch.as_tensor(active_ranks, dtype=torch.bool).to(torch.int64)
        return mod.rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus,
                                     num_groups % num_nodes == 0, active)

    return run


@lru_cache(maxsize=None)
def load_vllm_default() -> type:
    """vLLM 0.33's ``DefaultEplbPolicy`` class, from its two files only."""
    abstract = _extract(VLLM, "vllm/distributed/eplb/policy/abstract.py")
    default = _extract(VLLM, "vllm/distributed/eplb/policy/default.py")
    pkg_dir = abstract.parent
    init = pkg_dir / "_eplb_peer_init.py"
    if not init.exists():
        init.write_text("# package stub: vLLM's own __init__ imports vllm.config\n")
    import importlib.machinery

    name = "eplb_peer_vllm_policy"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(pkg_dir)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
    mod = importlib.import_module(f"{name}.default")
    del default
    return mod.DefaultEplbPolicy


def vllm_default_rebalance() -> Callable[..., torch.Tensor]:
    """vLLM's default policy behind the 5-argument signature (returns ``phy2log``)."""
    cls = load_vllm_default()

    def run(weight, num_replicas, num_groups, num_nodes, num_gpus):
        w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(weight)
        return cls.rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus)

    return run


@lru_cache(maxsize=None)
def load_seed() -> ModuleType:
    """The seed heuristic (``$EPLB_OPT_SEED_HEURISTIC``, else
    ``../shared/reference/seed_heuristic.py`` beside a source checkout)."""
    path = _seed_path()
    if path is None:
        raise PeerUnavailable("not part of the package (set EPLB_OPT_SEED_HEURISTIC to its seed_heuristic.py)")
    if not path.exists():
        raise PeerUnavailable(f"seed heuristic not found at {path}")
    return _import_file(path, "eplb_peer_seed")


def seed_rebalance() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    mod = load_seed()

    def run(weight, num_replicas, num_groups, num_nodes, num_gpus):
        w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(weight)
        return mod.rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus)

    return run


def available_peers() -> dict[str, Callable[..., object]]:
    """Every peer that loads here, by display name; a peer that cannot be fetched is
    left out (and named in the returned ``"_missing"`` entry's list)."""
    peers: dict[str, Callable[..., object]] = {}
    missing: list[str] = []
    for label, factory in (
        ("DeepSeek EPLB (sglang 0.5.23)", deepseek_rebalance),
        ("SGLang deepseek_vec (0.5.23)", deepseek_vec_rebalance),
        ("vLLM 0.33 default", vllm_default_rebalance),
        ("seed heuristic", seed_rebalance),
    ):
        try:
            peers[label] = factory()
        except Exception as exc:  # noqa: BLE001 - a peer that cannot load is reported
            missing.append(f"{label}: {type(exc).__name__}: {exc}")
    peers["_missing"] = missing  # type: ignore[assignment]
    return peers
