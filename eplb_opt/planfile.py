"""Plan files: a versioned schema in JSON, torch or numpy containers.

Schema ``eplb-opt/plan`` version 1 holds:

* ``phy2log`` ``[L, R]``, ``log2phy`` ``[L, E, R - E + 1]`` (padded with -1) and
  ``logcnt`` ``[L, E]``, all int64;
* ``metadata``: ``library_version``, ``created`` (UTC, ISO 8601), ``input_sha256`` (of the
  float64 ``[L, E]`` loads and their shape), ``parameters`` (replicas, groups, nodes,
  GPUs, policy, mode, time limit, seed, tolerance) and per-layer ``max_load``,
  ``lower_bound``, ``gap`` and ``status`` (whatever the writer knew).

Containers: ``.json`` (one object), ``.pt`` (a dict for ``torch.load(weights_only=True)``),
``.npz`` (the three arrays plus the schema header and metadata as a JSON string).
Writes go to a temporary file in the same folder and are renamed into place, so a failed
or interrupted write never leaves a partial file and never replaces an existing one.
TensorRT-LLM's offline EP load balancer reads a YAML file with ``num_slots``,
``layer_updates_per_iter`` and ``initial_global_assignments`` (per MoE layer index, the
expert of every slot): :func:`export_tensorrt_llm` writes it (``eplb-opt plan -o
moe_load_balancer.yaml`` too).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import EplbOptError, InvalidTypeError

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "TENSORRT_LLM_SUFFIXES",
    "PlanFileError",
    "atomic_write",
    "export_tensorrt_llm",
    "input_sha256",
    "load_plan",
    "save_plan",
]

SCHEMA = "eplb-opt/plan"
SCHEMA_VERSION = 1
_SUFFIXES = (".json", ".pt", ".npz")
TENSORRT_LLM_SUFFIXES = (".yaml", ".yml")


class PlanFileError(EplbOptError, ValueError):
    """A plan file cannot be written or read: unknown kind or version, corrupt content,
    or maps that disagree with ``phy2log``."""


def input_sha256(weight: np.ndarray) -> str:
    """SHA-256 of float64 loads and their shape (identifies the input of a plan)."""
    w = np.ascontiguousarray(weight, dtype=np.float64)
    h = hashlib.sha256(repr(w.shape).encode())
    h.update(w.tobytes())
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure (or interrupt) before the rename removes the temporary file and leaves any
    existing ``path`` untouched.  With ``overwrite=False`` an existing ``path`` is an error.
    """
    dest = Path(path)
    if dest.is_dir():
        raise PlanFileError(f"{dest} is a directory, not a file name")
    if dest.exists() and not overwrite:
        raise PlanFileError(f"{dest} exists (pass overwrite=True to replace it)")
    if not dest.parent.is_dir():
        raise PlanFileError(f"{dest.parent}: no such directory")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp makes 0600; give the usual 0644 (reading the umask would mean setting
        # it, which is process-wide and not thread-safe inside a serving engine).
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    return obj


def check_destination(path: str | Path, *, overwrite: bool = True, suffixes: tuple[str, ...] = _SUFFIXES) -> Path:
    """Raise :class:`PlanFileError` now if :func:`save_plan` (or, with
    ``suffixes=TENSORRT_LLM_SUFFIXES``, :func:`export_tensorrt_llm`) could not write
    ``path`` (unknown suffix, a directory, no parent directory, or an existing file
    without ``overwrite``), so a long solve does not end in that error."""
    dest = Path(path)
    suffix = dest.suffix.lower()
    if dest.is_dir():
        raise PlanFileError(f"{dest} is a directory, not a file name")
    if suffix not in suffixes:
        hint = (" (or .yaml / .yml for TensorRT-LLM's moe_load_balancer.yaml: eplb-opt plan -o, "
                "eplb_opt.export_tensorrt_llm)") if suffixes == _SUFFIXES else ""
        raise PlanFileError(f"{dest}: unknown plan file kind {suffix!r}; use one of {suffixes}{hint}")
    if not dest.parent.is_dir():
        raise PlanFileError(f"{dest.parent}: no such directory")
    if dest.exists() and not overwrite:
        raise PlanFileError(f"{dest} exists (pass overwrite=True to replace it)")
    return dest


def save_plan(plan: Any, path: str | Path, *, overwrite: bool = True) -> Path:
    """Write ``plan`` (an :class:`~eplb_opt.plan.Plan`) to ``path``; see module docs."""
    dest = check_destination(path, overwrite=overwrite)
    suffix = dest.suffix.lower()
    p2l, l2p, cnt = plan.to_numpy()
    meta = _jsonable(dict(plan.metadata))
    header = {"schema": SCHEMA, "version": SCHEMA_VERSION, "num_experts": int(plan.num_experts)}

    def write(tmp: Path) -> None:
        if suffix == ".json":
            doc = dict(header, metadata=meta, phy2log=p2l.tolist(), log2phy=l2p.tolist(), logcnt=cnt.tolist())
            tmp.write_text(json.dumps(doc, separators=(",", ":")))
        elif suffix == ".pt":
            import torch

            with open(tmp, "wb") as fh:
                torch.save(dict(header, metadata=meta, phy2log=torch.from_numpy(p2l),
                                log2phy=torch.from_numpy(l2p), logcnt=torch.from_numpy(cnt)), fh)
        else:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, phy2log=p2l, log2phy=l2p, logcnt=cnt,
                                    header=np.array(json.dumps(dict(header, metadata=meta))))

    return atomic_write(dest, write, overwrite=overwrite)


_NOT_A_PLAN = ("so it is not an eplb-opt plan file (a load trace? plan files are written by "
               "`eplb-opt plan` or Plan.save; `eplb-opt evaluate` takes the plan first, then the loads)")


def _arrays(doc: Any, path: Path, convert: Callable[[Any], np.ndarray]) -> list[np.ndarray]:
    keys = ("phy2log", "log2phy", "logcnt")
    if not hasattr(doc, "__contains__") or isinstance(doc, (str, bytes)):
        raise PlanFileError(f"{path}: holds a {type(doc).__name__}, not the plan's arrays, {_NOT_A_PLAN}")
    for k in keys:
        if k not in doc:
            raise PlanFileError(f"{path}: holds no {k!r} array, {_NOT_A_PLAN}")
    try:
        return [convert(doc[k]) for k in keys]
    except (TypeError, ValueError, AttributeError, OverflowError, RuntimeError) as exc:
        raise PlanFileError(f"{path}: corrupt plan arrays ({type(exc).__name__}: {exc})") from None


def _read(path: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise PlanFileError(f"{path}: not a readable plan file ({type(exc).__name__}: {exc})") from None
        arrays = _arrays(doc if isinstance(doc, dict) else [], path, lambda a: np.asarray(a, dtype=np.int64))
        header = {k: doc.get(k) for k in ("schema", "version", "num_experts", "metadata")}
    elif suffix == ".pt":
        import torch

        try:
            with warnings.catch_warnings():  # a corrupt file is our error, not torch's warnings
                warnings.simplefilter("ignore", UserWarning)
                doc = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file
            why = torch_load_problem(exc, "write plan files with eplb-opt plan or eplb_opt.Plan.save (a .pt "
                                          "plan holds only tensors and plain values)")
            raise PlanFileError(f"{path}: not a readable plan file: {why}") from None
        arrays = _arrays(doc if isinstance(doc, dict) else [], path, lambda a: a.cpu().numpy().astype(np.int64))
        header = {k: doc.get(k) for k in ("schema", "version", "num_experts", "metadata")}
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in ("phy2log", "log2phy", "logcnt", "header"):
                    if k not in z.files:
                        raise PlanFileError(f"{path}: holds no {k!r} entry, {_NOT_A_PLAN}")
                arrays = [z[k].astype(np.int64) for k in ("phy2log", "log2phy", "logcnt")]
                header = json.loads(str(z["header"]))
        except PlanFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file (truncated zip, bad zlib data, ...)
            raise PlanFileError(f"{path}: not a readable plan file ({type(exc).__name__}: {exc})") from None
        if not isinstance(header, dict):
            raise PlanFileError(f"{path}: corrupt plan header")
    else:
        hint = " (a load-trace kind: `eplb-opt evaluate` takes the plan first, then the loads)" if suffix in (
            ".npy", ".safetensors") else ""
        raise PlanFileError(f"{path}: unknown plan file kind {suffix!r}; expected one of {_SUFFIXES}{hint}")
    return header, *arrays


def _first_line(exc: BaseException) -> str:
    """The first line of an exception message (torch's load errors run to a page),
    without terminal escape codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    line = text[0].strip() if text else ""
    if len(line) > 300:          # whole sentences, never a cut one
        end = line.rfind(". ", 0, 300)
        line = line[: end + 1] if end > 0 else line[:297].rstrip() + "..."
    return line


def torch_load_problem(exc: BaseException, remedy: str) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in whole sentences.

    torch's "Weights only load failed" message runs to a page whose first line breaks off
    mid-explanation; this names what the safe loader refused and, for a file holding
    Python objects, ``remedy``.  Any other error gives its type and first line."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    refused = re.search(r"Unsupported global: GLOBAL (\S+?)(?: was not| |$)", text)
    if refused:
        return (f"it holds a Python object ({refused.group(1)}) that a safe load refuses: eplb-opt reads .pt files "
                f"with torch.load(weights_only=True), which never runs code from the file; {remedy}")
    if "Weights only load failed" in text or type(exc).__name__ == "UnpicklingError":
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines() if (
            "WeightsUnpickler error:" in text) else []
        what = f" (the safe loader stopped at: {detail[0].strip()[:200]})" if detail and detail[0].strip() else ""
        return f"it is not a torch file or it is corrupt{what}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def load_plan(path: str | Path) -> Any:
    """Read a plan file (see module docs) into an :class:`~eplb_opt.plan.Plan`."""
    from .plan import Plan, plan_violations

    p = Path(path)
    if not p.exists():
        raise PlanFileError(f"{p}: no such file")
    header, p2l, l2p, cnt = _read(p)
    if header.get("schema") != SCHEMA:
        raise PlanFileError(f"{p}: not an eplb-opt plan file (schema {header.get('schema')!r})")
    if header.get("version") != SCHEMA_VERSION:
        raise PlanFileError(
            f"{p}: plan file schema version {header.get('version')!r} is not supported "
            f"(this eplb-opt reads version {SCHEMA_VERSION})"
        )
    E = header.get("num_experts")
    if not isinstance(E, int) or E < 1 or p2l.ndim != 2:
        raise PlanFileError(f"{p}: corrupt plan file (num_experts {E!r}, phy2log shape {p2l.shape})")
    R = p2l.shape[1]
    meta = header.get("metadata") or {}
    params = meta.get("parameters", {}) if isinstance(meta, dict) else {}
    gpus = params.get("num_gpus") or 1
    masked = params.get("masked_gpus")
    if masked is not None:
        masked = np.asarray(masked, dtype=bool)
        if masked.shape != (p2l.shape[0], gpus):
            raise PlanFileError(f"{p}: corrupt plan file (masked_gpus shape {masked.shape})")
    elif (p2l < 0).any():
        raise PlanFileError(f"{p}: corrupt plan file (empty slots but no masked_gpus recorded)")
    problems = plan_violations(p2l, E, R, gpus if R % gpus == 0 else 1, log2phy=l2p, logcnt=cnt, masked=masked)
    if problems:
        raise PlanFileError(f"{p}: corrupt plan file: " + "; ".join(problems[:3]))
    return Plan.from_numpy(p2l, E, metadata=meta)


def _as_index(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise PlanFileError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def _ids(xs: list[int]) -> str:
    """Model layer ids for a message: ``3..60`` when contiguous."""
    if xs and xs == list(range(xs[0], xs[0] + len(xs))):
        return f"{xs[0]}..{xs[-1]}" if len(xs) > 1 else f"{xs[0]}"
    return ", ".join(map(str, xs[:8])) + (" ..." if len(xs) > 8 else "")


def export_tensorrt_llm(
    plan: Any, path: str | Path, *, first_layer: int = 0, layer_ids: list[int] | None = None,
    layer_updates_per_iter: int = 0, overwrite: bool = True,
) -> Path:
    """Write TensorRT-LLM's offline EP load-balancer file (``moe_load_balancer.yaml``).

    The file holds ``initial_global_assignments`` (model layer index -> the expert of every
    slot, ``num_slots`` long; GPU ``g`` holds slots ``g*k .. g*k+k-1``), ``num_slots`` and
    ``layer_updates_per_iter``, the fields of TensorRT-LLM's ``MoeLoadBalancerConfig``;
    point ``moe_config.load_balancer`` at it and serve with ``ep_size`` equal to the plan's
    GPU count (written in a comment at the top).

    Args:
        plan: an :class:`~eplb_opt.plan.Plan`.
        path: the YAML file to write (atomically).
        first_layer: model index of the plan's first MoE layer (e.g. 3 for DeepSeek-V3,
            whose first three layers are dense); layer ``l`` becomes ``first_layer + l``.
        layer_ids: explicit model layer index of every plan layer (overrides
            ``first_layer``); distinct, non-negative.
        layer_updates_per_iter: 0 for a static (offline) placement.

    Raises:
        PlanFileError: a plan with masked GPUs (empty slots, ``-1``): TensorRT-LLM
            requires an expert in every slot (its ``setInitialWeightAssignments`` checks
            ``0 <= expertId < expertCount``), so the error names the layer and GPU;
            an expert with no slot; bad ``first_layer`` / ``layer_ids`` /
            ``layer_updates_per_iter`` values; an unwritable ``path``.
        InvalidTypeError: a non-integer ``first_layer``, layer id or
            ``layer_updates_per_iter``.
    """
    # TensorRT-LLM reads this file with yaml.safe_load into MoeLoadBalancerConfig(**doc)
    # (tensorrt_llm/llmapi/llm_args.py, commit 0004396720054fd8e205cbf616f21f0b57c6b412:
    # num_slots: int, initial_global_assignments: Dict[int, List[int]],
    # layer_updates_per_iter: int, extra keys forbidden); get_layer_initial_global_assignments
    # requires every MoE layer's index as a key and len == num_slots; setup() requires
    # num_slots % ep_size == 0; and SingleLayerMoeLoadBalancer::setInitialWeightAssignments
    # (cpp/tensorrt_llm/runtime/moeLoadBalancer/moeLoadBalancer.cpp, commit
    # 0d919a4f8ddc94539e9f1c850898e9b3b5d0ca07) checks 0 <= expertId < expertCount per slot.
    p2l = plan.to_numpy()[0]                                             # [L, R]
    L, R = p2l.shape
    E = int(plan.num_experts)
    updates = _as_index(layer_updates_per_iter, "layer_updates_per_iter")
    ids = _model_layer_ids(L, first_layer, layer_ids)
    meta = dict(getattr(plan, "metadata", {}) or {})
    params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
    gpus = params.get("num_gpus")
    gpus = gpus if isinstance(gpus, int) and gpus > 0 and R % gpus == 0 else None
    _check_every_slot_served(p2l, E, ids, gpus, path)
    text = _tensorrt_llm_yaml(p2l, E, ids, gpus, updates, meta.get("library_version"))
    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)


def _model_layer_ids(L: int, first_layer: Any, layer_ids: Any) -> list[int]:
    """The model layer index of each of the plan's ``L`` layers: ``layer_ids`` checked
    (integers, ``L`` of them, distinct), else ``first_layer .. first_layer + L - 1``."""
    if layer_ids is None:
        first = _as_index(first_layer, "first_layer")
        return list(range(first, first + L))
    if isinstance(layer_ids, (str, bytes)) or not hasattr(layer_ids, "__len__"):
        raise InvalidTypeError(f"layer_ids must be a list of integers, got {layer_ids!r}")
    ids = [_as_index(i, f"layer_ids[{n}]") for n, i in enumerate(layer_ids)]
    if len(ids) != L:
        raise PlanFileError(f"layer_ids has {len(ids)} entries, the plan has {L} layers")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PlanFileError(f"layer_ids must be distinct (they are the YAML's keys), {dup} repeat")
    return ids


def _check_every_slot_served(p2l: np.ndarray, E: int, ids: list[int], gpus: int | None, path: Any) -> None:
    """Raise :class:`PlanFileError` unless every slot of ``p2l`` (``[L, R]``) holds an
    expert id in ``[0, E)`` and every expert has a slot in every layer, as TensorRT-LLM
    requires; masked GPUs (``-1``) are named per layer (by GPU when ``gpus`` is known)."""
    L, R = p2l.shape
    if (p2l < 0).any():
        k = R // gpus if gpus else 1
        where = []
        for l in range(L):
            empty = sorted({int(s) // k for s in np.flatnonzero(p2l[l] < 0)})
            if empty:
                unit = "GPU" if gpus else "slot"
                where.append(f"layer {l} (model layer {ids[l]}): {unit}{'s' if len(empty) > 1 else ''} "
                             + ", ".join(map(str, empty)))
        raise PlanFileError(
            f"{path}: the plan has masked GPUs (empty slots, -1) - " + "; ".join(where[:3])
            + (f"; ... ({len(where)} layers)" if len(where) > 3 else "")
            + ". TensorRT-LLM's load balancer needs an expert in every slot of every rank, so this plan "
            "cannot be exported; plan for the GPUs that serve (without --masked-gpus / masked_gpus) instead"
        )
    if (p2l >= E).any():
        l, s = map(int, np.argwhere(p2l >= E)[0])
        raise PlanFileError(f"{path}: layer {l} slot {s} holds expert {int(p2l[l, s])}, the plan has {E} experts")
    for l in range(L):
        absent = np.setdiff1d(np.arange(E), p2l[l])
        if absent.size:
            raise PlanFileError(f"{path}: layer {l} (model layer {ids[l]}) gives no slot to expert "
                                f"{int(absent[0])}; TensorRT-LLM would route its tokens nowhere")


def _tensorrt_llm_yaml(p2l: np.ndarray, E: int, ids: list[int], gpus: int | None, updates: int,
                       version: Any) -> str:
    """The YAML text: a two-line comment (writer, shape, ``ep_size``), then
    ``initial_global_assignments`` (model layer id -> the ``R`` experts of ``p2l``'s row),
    ``num_slots`` and ``layer_updates_per_iter``."""
    L, R = p2l.shape
    head = f"# TensorRT-LLM offline EP load balancer (moe_config.load_balancer), written by eplb-opt"
    lines = [head + (f" {version}" if version else ""),
             f"# {L} MoE layers (model layers {_ids(ids)}), {E} experts, {R} slots"
             + (f" = {gpus} GPUs x {R // gpus}: serve with ep_size {gpus}" if gpus else ""),
             "initial_global_assignments:"]
    for lid, row in zip(ids, p2l):
        lines.append(f"  {lid}: [{', '.join(str(int(e)) for e in row)}]")
    lines += [f"num_slots: {R}", f"layer_updates_per_iter: {updates}", ""]
    return "\n".join(lines)
