"""Readers for recorded expert-load traces.

Every reader returns float64 token counts ``[W, L, E]``: ``W`` windows of summed steps,
``L`` MoE layers, ``E`` logical experts.  Formats (chosen by suffix, or a directory):

* ``.json``: the ADRS / OpenEvolve ``expert-load.json`` layout,
  ``{"load_history": [{"logical_expert_load": [[...E...] per layer]}, ...]}``, one entry
  per recorded step.
* ``.npy`` / ``.npz`` / ``.safetensors``: an array ``[T, L, E]`` of per-step counts (or
  ``[L, E]``, one step); in ``.npz`` and ``.safetensors`` the array named ``loads``, else
  the only array.
* ``.pt``: a torch tensor ``[T, L, E]`` / ``[L, E]``, or an SGLang expert-distribution
  dump (``sglang/srt/eplb/expert_distribution.py``): ``stat`` mode writes
  ``{"logical_count": [steps, L, E], ...}``; ``per_pass`` mode writes
  ``{"records": [{"forward_pass_id", "rank", "global_physical_count": [L, R]}],
  "last_physical_to_logical_map": [L, R]}``, converted to logical counts with that map.
* a directory: every SGLang dump (``*.pt``) in it, per-pass records summed over ranks and
  ordered by forward pass, stat dumps concatenated in file-name (time) order.

vLLM 0.33 keeps its expert-load window in memory (``EplbState``) and documents no dump
file, so there is no vLLM reader; save its ``[steps, L, E]`` tensor with ``torch.save``
or ``numpy.save`` and read that.

Steps are summed into windows of ``window`` consecutive steps (``None``: one window of
all steps); a trailing partial window is kept only when it is the only one.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EplbOptError

__all__ = ["TraceError", "read_trace", "windows"]


class TraceError(EplbOptError, ValueError):
    """A trace file is missing, of an unknown kind, corrupt, or shaped wrongly."""


def windows(steps: np.ndarray, window: int | None) -> np.ndarray:
    """Sum ``[T, L, E]`` steps into ``[W, L, E]`` windows of ``window`` steps."""
    s = np.asarray(steps, dtype=np.float64)
    if s.ndim != 3:
        raise TraceError(f"expected per-step loads [steps, layers, experts], got shape {s.shape}")
    T = s.shape[0]
    if T == 0:
        raise TraceError("the trace holds no steps")
    if window is None or window >= T:
        return s.sum(axis=0, keepdims=True)
    if window < 1:
        raise TraceError(f"window must be a positive number of steps, got {window!r}")
    full = T // window
    return s[: full * window].reshape(full, window, *s.shape[1:]).sum(axis=1)


def _check_counts(arr: np.ndarray, path: Path) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind not in "iuf":
        raise TraceError(f"{path}: loads must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or 0 in a.shape:
        raise TraceError(f"{path}: expected loads [steps, layers, experts], got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise TraceError(f"{path}: loads must be finite and non-negative")
    return a


_A_PLAN = ("is an eplb-opt plan file, not a load trace (loads are per-step expert token counts; "
           "`eplb-opt evaluate` takes the plan first, then the loads)")


def _adrs_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TraceError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(data, dict) and "phy2log" in data:
        raise TraceError(f"{path}: {_A_PLAN}")
    if not isinstance(data, dict) or not isinstance(data.get("load_history"), list):
        raise TraceError(f"{path}: expected an object with a 'load_history' list (ADRS expert-load.json layout)")
    steps = []
    for i, entry in enumerate(data["load_history"]):
        if not isinstance(entry, dict) or "logical_expert_load" not in entry:
            raise TraceError(f"{path}: load_history[{i}] has no 'logical_expert_load'")
        try:
            steps.append(np.asarray(entry["logical_expert_load"], dtype=np.float64))
        except (TypeError, ValueError, OverflowError):
            raise TraceError(f"{path}: load_history[{i}].logical_expert_load is not a [layers, experts] table") from None
    if not steps:
        raise TraceError(f"{path}: load_history is empty")
    shapes = {s.shape for s in steps}
    if len(shapes) != 1:
        raise TraceError(f"{path}: steps have different shapes {sorted(shapes)}")
    return _check_counts(np.stack(steps), path)


def _numpy(path: Path) -> np.ndarray:
    try:
        obj = np.load(path, allow_pickle=False)
        if isinstance(obj, np.lib.npyio.NpzFile):
            with obj:
                names = obj.files
                if "phy2log" in names:
                    raise TraceError(f"{path}: {_A_PLAN}")
                if "loads" in names:
                    arr = obj["loads"]
                elif len(names) == 1:
                    arr = obj[names[0]]
                else:
                    raise TraceError(f"{path}: several arrays {names}; name the loads array 'loads'")
        else:
            arr = obj
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad zlib data, short .npy, pickled data, ...
        raise TraceError(f"{path}: not a readable numpy file ({type(exc).__name__}: {exc})") from None
    return _check_counts(arr, path)


def _safetensors(path: Path) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TraceError(f"{path}: not a readable safetensors file ({exc})") from None
    if "loads" in arrays:
        arr = arrays["loads"]
    elif len(arrays) == 1:
        arr = next(iter(arrays.values()))
    else:
        raise TraceError(f"{path}: several tensors {sorted(arrays)}; name the loads tensor 'loads'")
    return _check_counts(arr, path)


def _sglang_physical(records: list, phy2log: Any, path: Path) -> np.ndarray:
    import torch

    per_pass: dict[int, Any] = defaultdict(lambda: 0)
    for rec in records:
        try:
            per_pass[int(rec["forward_pass_id"])] = per_pass[int(rec["forward_pass_id"])] + rec[
                "global_physical_count"
            ].to(torch.float64)
        except (KeyError, TypeError, AttributeError):
            raise TraceError(f"{path}: an SGLang per-pass record lacks forward_pass_id / global_physical_count") from None
    gpc = torch.stack([per_pass[k] for k in sorted(per_pass)])               # [passes, L, R]
    p2l = torch.as_tensor(phy2log).to(torch.int64)
    L, R = p2l.shape
    if gpc.shape[1:] != (L, R):
        raise TraceError(f"{path}: physical counts {tuple(gpc.shape[1:])} do not match the map {(L, R)}")
    E = int(p2l.max()) + 1
    out = torch.zeros((gpc.shape[0], L, E), dtype=torch.float64)
    out.scatter_add_(2, p2l.unsqueeze(0).expand(gpc.shape[0], -1, -1), gpc)
    return out.numpy()


def _torch_file(path: Path) -> tuple[str, Any]:
    import torch

    try:
        with warnings.catch_warnings():  # a corrupt file is our error, not torch's warnings
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        first = (str(exc).strip().splitlines() or [""])[0][:300]   # torch's messages run to a page
        raise TraceError(f"{path}: not a readable torch file ({type(exc).__name__}: {first})") from None
    if isinstance(obj, dict) and "phy2log" in obj:
        raise TraceError(f"{path}: {_A_PLAN}")
    if isinstance(obj, torch.Tensor):
        return "tensor", obj
    if isinstance(obj, dict) and "logical_count" in obj:
        return "stat", obj
    if isinstance(obj, dict) and "records" in obj and "last_physical_to_logical_map" in obj:
        return "per_pass", obj
    raise TraceError(
        f"{path}: a torch file must hold a [steps, layers, experts] tensor or an SGLang "
        "expert-distribution dump (keys 'logical_count', or 'records' and 'last_physical_to_logical_map')"
    )


def _torch(path: Path) -> np.ndarray:
    kind, obj = _torch_file(path)
    if kind == "tensor":
        return _check_counts(obj.detach().cpu().to(dtype=__import__("torch").float64).numpy(), path)
    if kind == "stat":
        return _check_counts(obj["logical_count"].cpu().double().numpy(), path)
    return _check_counts(_sglang_physical(obj["records"], obj["last_physical_to_logical_map"], path), path)


def _directory(path: Path) -> np.ndarray:
    files = sorted(path.glob("*.pt"))
    if not files:
        raise TraceError(f"{path}: no *.pt files (SGLang expert-distribution dumps) in the directory")
    stats, records, phy2log = [], [], None
    for f in files:
        kind, obj = _torch_file(f)
        if kind == "stat":
            stats.append(_check_counts(obj["logical_count"].cpu().double().numpy(), f))
        elif kind == "per_pass":
            records.extend(obj["records"])
            phy2log = obj["last_physical_to_logical_map"]
        else:
            stats.append(_check_counts(obj.cpu().double().numpy(), f))
    if records and stats:
        raise TraceError(f"{path}: mixes per-pass and stat dumps")
    if records:
        return _check_counts(_sglang_physical(records, phy2log, path), path)
    shapes = {s.shape[1:] for s in stats}
    if len(shapes) != 1:
        raise TraceError(f"{path}: dumps have different shapes {sorted(shapes)}")
    return np.concatenate(stats, axis=0)


def read_trace(path: str | Path, *, window: int | None = None) -> np.ndarray:
    """Read a recorded trace (see module docs) as ``[W, L, E]`` float64 token counts.

    Args:
        path: a file (``.json``, ``.npy``, ``.npz``, ``.pt``) or a directory of SGLang dumps.
        window: steps per window (``None``: one window of every step).

    Raises:
        TraceError: missing, unknown, corrupt or misshapen input (the message says which).
    """
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: no such file or directory")
    if p.is_dir():
        steps = _guarded(_directory, p)
    else:
        suffix = p.suffix.lower()
        readers = {".json": _adrs_json, ".npy": _numpy, ".npz": _numpy, ".pt": _torch, ".pth": _torch,
                   ".safetensors": _safetensors}
        if suffix not in readers:
            raise TraceError(
                f"{p}: unknown trace kind {suffix!r}; expected .json, .npy, .npz, .pt, .safetensors or a directory"
            )
        steps = _guarded(readers[suffix], p)
    return windows(steps, window)


def _guarded(reader: Any, path: Path) -> np.ndarray:
    """Run a reader; whatever a malformed file makes it trip over becomes a
    :class:`TraceError` naming the file (never an IndexError from deep inside)."""
    try:
        return reader(path)
    except TraceError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
        raise TraceError(f"{path}: malformed trace ({type(exc).__name__}: {exc})") from None
