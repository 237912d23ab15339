"""Readers for recorded expert-load traces.

Every reader returns float64 token counts ``[W, L, E]``: ``W`` windows of summed steps,
``L`` MoE layers, ``E`` logical experts.  Formats (chosen by suffix, or a directory):

* ``.json``: the ``expert-load.json`` layout of ADRS (AI-Driven Research for Systems, UC
  Berkeley's study that evolved EPLB algorithms with OpenEvolve),
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
* a TensorRT-LLM expert-statistic dump: the directory ``EXPERT_STATISTIC_PATH`` holding
  ``meta_info.json`` and ``rank<r>.safetensors`` (see :func:`read_tensorrt_llm`); steps
  are iterations, layers are the recorded MoE layers in model order, each rank's counts
  summed.

vLLM 0.33 keeps its expert-load window in memory (``EplbState``) and documents no dump
file, so there is no vLLM reader; save its ``[steps, L, E]`` tensor with ``torch.save``
or ``numpy.save`` and read that.

Steps are summed into windows of ``window`` consecutive steps (``None``: one window of
all steps); a trailing partial window is kept only when it is the only one.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EplbOptError

__all__ = ["TensorRTLLMDump", "TraceError", "read_tensorrt_llm", "read_trace", "trace_layer_ids", "windows"]


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
    elif arrays and all(_TRTLLM_KEY.match(k) for k in arrays):
        raise TraceError(
            f"{path}: one rank's TensorRT-LLM expert statistic ({len(arrays)} tensors named "
            f"<iteration>_<layer>); each rank records only its own tokens, so read the whole dump: "
            f"pass its directory {path.parent} (meta_info.json and every rank*.safetensors)"
        )
    elif len(arrays) == 1:
        arr = next(iter(arrays.values()))
    else:
        names = sorted(arrays)
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        raise TraceError(f"{path}: several tensors ({shown}); name the loads tensor 'loads'")
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
        from .planfile import torch_load_problem

        why = torch_load_problem(exc, "save the loads as a plain tensor (torch.save(torch.as_tensor(loads), "
                                      "path)) or as a .npy array (numpy.save)")
        raise TraceError(f"{path}: not a readable torch file: {why}") from None
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


# --- TensorRT-LLM expert-statistic dumps -------------------------------------------------
#
# Format, as read from NVIDIA/TensorRT-LLM:
# * tensorrt_llm/_torch/expert_statistic.py (commits c85e8726ad9c0f4f4c182d8959f522c2e1fa50b7 and
#   0fccc5b97dd7b23c438e740b3bf4dcde607266c4): with EXPERT_STATISTIC_ITER_RANGE=start-stop set,
#   every rank adds, in each iteration start <= it < stop and each MoE layer,
#   torch.bincount(token_selected_experts.flatten(), minlength=expert_count) of its own tokens to
#   the record named f"{iter}_{layer_idx}" (layer_idx: the model's layer index, 3..60 on
#   DeepSeek-V3); at iteration `stop` it writes safetensors.torch.save_file(records,
#   f"{EXPERT_STATISTIC_PATH}/rank{rank}.safetensors") (int64 tensors [expert_count]), and rank 0
#   writes meta_info.json = {"num_experts": expert_count, "num_experts_per_token": top_k}
#   (json null when rank 0 recorded nothing).  The call sites (fused_moe_wide_ep.py and the
#   other MoE backends: ExpertStatistic.set_layer(self.layer_idx); maybe_add_info(self.num_slots,
#   token_selected_slots)) count expert ids, or slot ids when a load balancer is on.
# * examples/wide_ep/ep_load_balancer/utils.py (commit 7ce477f3c73bffd52edebf6ffbd10d530dff2e6f),
#   load_expert_statistic: reads meta_info.json, sums every rank*.safetensors (leaving out
#   *_raw.safetensors) key by key, and requires contiguous iterations and every (iteration,
#   layer) pair; generate_eplb_config.py (commit 76a646e90c8e863629009ea5d365697da147348f) sums a
#   layer's iterations into the load it places.

_TRTLLM_KEY = re.compile(r"^(\d+)_(\d+)$")
_TRTLLM_RANK = re.compile(r"^rank(\d+)\.safetensors$")
_TRTLLM_META = "meta_info.json"


@dataclass(frozen=True)
class TensorRTLLMDump:
    """A TensorRT-LLM expert-statistic dump, read by :func:`read_tensorrt_llm`.

    Attributes:
        steps: float64 ``[iterations, layers, experts]`` token counts, summed over ranks.
        iterations: the recorded iteration numbers (contiguous), one per step.
        layer_ids: the model layer index of every layer (sorted), e.g. ``3..60`` for
            DeepSeek-V3; these are the keys of ``initial_global_assignments`` in
            TensorRT-LLM's ``moe_load_balancer.yaml``.
        num_experts: ``num_experts`` of ``meta_info.json``.
        num_experts_per_token: ``num_experts_per_token`` of ``meta_info.json`` (or ``None``).
        ranks: how many ``rank<r>.safetensors`` files were summed.
    """

    steps: np.ndarray
    iterations: list[int]
    layer_ids: list[int]
    num_experts: int
    num_experts_per_token: int | None
    ranks: int


def _is_tensorrt_llm_dir(path: Path) -> bool:
    return (path / _TRTLLM_META).exists() or any(_TRTLLM_RANK.match(f.name) for f in path.iterdir())


def _trtllm_rank_files(path: Path) -> list[Path]:
    """``rank<r>.safetensors`` of ranks ``0 .. N-1``, in rank order (a gap is an error)."""
    by_rank: dict[int, Path] = {}
    for f in sorted(path.iterdir()):
        m = _TRTLLM_RANK.match(f.name)
        if m is None:
            continue
        r = int(m.group(1))
        if r in by_rank:
            raise TraceError(f"{path}: {by_rank[r].name} and {f.name} are both rank {r}")
        by_rank[r] = f
    if not by_rank:
        raise TraceError(f"{path}: no rank<r>.safetensors files beside {_TRTLLM_META} (TensorRT-LLM "
                         "writes one per rank at the end of EXPERT_STATISTIC_ITER_RANGE)")
    missing = sorted(set(range(max(by_rank) + 1)) - set(by_rank))
    if missing:
        names = ", ".join(f"rank{r}.safetensors" for r in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise TraceError(f"{path}: {names} missing (found ranks {sorted(by_rank)}); each rank records only "
                         "its own tokens, so the loads would be short")
    return [by_rank[r] for r in sorted(by_rank)]


def _trtllm_meta(path: Path) -> tuple[int, int | None]:
    meta_path = path / _TRTLLM_META
    if not meta_path.exists():
        raise TraceError(f"{path}: no {_TRTLLM_META} beside the rank*.safetensors files (TensorRT-LLM's "
                         "rank 0 writes it into EXPERT_STATISTIC_PATH; copy it with the rank files)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TraceError(f"{meta_path}: not a readable JSON file ({exc})") from None
    if meta is None:
        raise TraceError(f"{meta_path}: holds null: rank 0 recorded no tokens (did the run reach the "
                         "iterations of EXPERT_STATISTIC_ITER_RANGE?)")
    if not isinstance(meta, dict):
        raise TraceError(f"{meta_path}: holds a {type(meta).__name__}, expected an object with 'num_experts'")
    e, k = meta.get("num_experts"), meta.get("num_experts_per_token")
    if isinstance(e, bool) or not isinstance(e, int) or e < 1:
        raise TraceError(f"{meta_path}: num_experts must be a positive integer, got {e!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise TraceError(f"{meta_path}: num_experts_per_token must be a positive integer, got {k!r}")
    return e, k


def _trtllm_load(f: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise TraceError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def read_tensorrt_llm(path: str | Path) -> TensorRTLLMDump:
    """Read a TensorRT-LLM expert-statistic dump (``EXPERT_STATISTIC_PATH``).

    TensorRT-LLM (PyTorch backend) records it when ``EXPERT_STATISTIC_ITER_RANGE=start-stop``
    is set: every rank writes ``rank<r>.safetensors`` with one int64 tensor
    ``[num_experts]`` per iteration and MoE layer, named ``"<iteration>_<layer index>"``,
    counting the expert ids its own tokens were routed to; rank 0 writes
    ``meta_info.json`` (``num_experts``, ``num_experts_per_token``).  The ranks' counts
    are summed (as TensorRT-LLM's ``load_expert_statistic`` does), ``*_raw.safetensors``
    files are left out.  With attention DP each rank sees its own tokens and the sum is
    the total; without it every rank counts every token, which scales all loads alike.
    A dump recorded with a load balancer on counts slot ids (``num_experts`` is then the
    slot count), not experts: record with the load balancer off.

    Raises:
        TraceError: no ``meta_info.json``, a missing rank file, a tensor of the wrong
            shape or name, missing iterations or layers (the message names the file).
    """
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise TraceError(f"{p}: a TensorRT-LLM expert-statistic dump is a directory "
                         f"({_TRTLLM_META} and rank*.safetensors)")
    files = _trtllm_rank_files(p)
    num_experts, top_k = _trtllm_meta(p)
    total: dict[tuple[int, int], np.ndarray] = {}
    rank_iters: list[tuple[Path, set[int]]] = []
    for f in files:
        iters: set[int] = set()
        for key, arr in _trtllm_load(f).items():
            m = _TRTLLM_KEY.match(key)
            if m is None:
                raise TraceError(f"{f}: tensor {key!r} is not named <iteration>_<layer> (TensorRT-LLM's "
                                 "expert statistic names each record so)")
            a = np.asarray(arr)
            if a.dtype.kind not in "iuf":
                raise TraceError(f"{f}: tensor {key!r} must hold counts, got dtype {a.dtype}")
            if a.shape != (num_experts,):
                raise TraceError(f"{f}: tensor {key!r} has shape {list(a.shape)}, expected [{num_experts}] "
                                 f"(num_experts in {_TRTLLM_META})")
            a = a.astype(np.float64)
            if not np.isfinite(a).all() or (a < 0).any():
                raise TraceError(f"{f}: tensor {key!r}: counts must be finite and non-negative")
            it, layer = int(m.group(1)), int(m.group(2))
            iters.add(it)
            total[(it, layer)] = total[(it, layer)] + a if (it, layer) in total else a
        rank_iters.append((f, iters))
    if not total:
        raise TraceError(f"{p}: the rank files hold no records (no iteration of EXPERT_STATISTIC_ITER_RANGE "
                         "was recorded)")
    iterations = sorted({it for it, _ in total})
    layer_ids = sorted({layer for _, layer in total})
    span = set(range(iterations[0], iterations[-1] + 1))
    if len(iterations) != len(span):
        gaps = sorted(span - set(iterations))
        raise TraceError(f"{p}: iterations {_ranges(gaps)} are missing between {iterations[0]} and "
                         f"{iterations[-1]} (rank files from different runs?)")
    for f, iters in rank_iters:
        if iters and iters != set(iterations):
            raise TraceError(f"{f}: records iterations {_ranges(sorted(iters))}, the other ranks "
                             f"{_ranges(iterations)} (rank files from different runs?)")
    absent = [(it, layer) for it in iterations for layer in layer_ids if (it, layer) not in total]
    if absent:
        shown = ", ".join(f"{it}_{layer}" for it, layer in absent[:4])
        raise TraceError(f"{p}: no rank recorded {shown}{' ...' if len(absent) > 4 else ''} "
                         f"({len(absent)} of {len(iterations) * len(layer_ids)} iteration/layer records missing)")
    steps = np.stack([np.stack([total[(it, layer)] for layer in layer_ids]) for it in iterations])
    return TensorRTLLMDump(steps=steps, iterations=iterations, layer_ids=layer_ids, num_experts=num_experts,
                           num_experts_per_token=top_k, ranks=len(files))


def _ranges(xs: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1..3, 7"`` (at most six runs shown)."""
    runs: list[list[int]] = []
    for x in xs:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    text = ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs[:6])
    return text + (" ..." if len(runs) > 6 else "")


def trace_layer_ids(path: str | Path) -> list[int] | None:
    """The model layer index of each layer of a trace, where the trace records it (a
    TensorRT-LLM dump: the ``<layer>`` of its ``<iteration>_<layer>`` records, sorted,
    read from the file headers only); ``None`` for other traces, whose layers are just
    ``0 .. L-1``."""
    p = Path(path)
    if not (p.is_dir() and _is_tensorrt_llm_dir(p)):
        return None
    from safetensors import SafetensorError, safe_open

    layers: set[int] = set()
    for f in _trtllm_rank_files(p):
        try:
            with safe_open(str(f), framework="numpy") as fh:
                keys = list(fh.keys())
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise TraceError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        for k in keys:
            m = _TRTLLM_KEY.match(k)
            if m is None:
                raise TraceError(f"{f}: tensor {k!r} is not named <iteration>_<layer>")
            layers.add(int(m.group(2)))
    return sorted(layers)


def _directory(path: Path) -> np.ndarray:
    if _is_tensorrt_llm_dir(path):
        return read_tensorrt_llm(path).steps
    files = sorted(path.glob("*.pt"))
    if not files:
        raise TraceError(f"{path}: no *.pt files (SGLang expert-distribution dumps) and no meta_info.json / "
                         "rank*.safetensors (a TensorRT-LLM expert-statistic dump) in the directory")
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
        path: a file (``.json``, ``.npy``, ``.npz``, ``.pt``, ``.safetensors``), a directory
            of SGLang dumps, or a TensorRT-LLM expert-statistic dump (a directory).
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
