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
expert of every slot): :func:`export_tensorrt_llm` writes it.
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

from .errors import EplbOptError

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
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


def check_destination(path: str | Path, *, overwrite: bool = True) -> Path:
    """Raise :class:`PlanFileError` now if :func:`save_plan` could not write ``path``
    (unknown suffix, a directory, no parent directory, or an existing file without
    ``overwrite``), so a long solve does not end in that error."""
    dest = Path(path)
    suffix = dest.suffix.lower()
    if dest.is_dir():
        raise PlanFileError(f"{dest} is a directory, not a file name")
    if suffix not in _SUFFIXES:
        raise PlanFileError(f"{dest}: unknown plan file kind {suffix!r}; use one of {_SUFFIXES}")
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
            raise PlanFileError(f"{path}: not a readable plan file ({type(exc).__name__}: {_first_line(exc)})") from None
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
    """The first line of an exception message (torch's load errors run to a page)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


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


def export_tensorrt_llm(
    plan: Any, path: str | Path, *, first_layer: int = 0, layer_ids: list[int] | None = None,
    layer_updates_per_iter: int = 0, overwrite: bool = True,
) -> Path:
    """Write TensorRT-LLM's offline EP load-balancer file (``moe_load_balancer.yaml``).

    Args:
        plan: an :class:`~eplb_opt.plan.Plan`.
        path: the YAML file to write (atomically).
        first_layer: model index of the plan's first MoE layer (e.g. 3 for DeepSeek-V3,
            whose first three layers are dense); layer ``l`` becomes ``first_layer + l``.
        layer_ids: explicit model layer index of every plan layer (overrides
            ``first_layer``).
        layer_updates_per_iter: 0 for a static (offline) placement.
    """
    p2l = plan.to_numpy()[0]
    L, R = p2l.shape
    ids = list(range(first_layer, first_layer + L)) if layer_ids is None else [int(i) for i in layer_ids]
    if len(ids) != L:
        raise PlanFileError(f"layer_ids has {len(ids)} entries, the plan has {L} layers")
    lines = ["initial_global_assignments:"]
    for lid, row in zip(ids, p2l):
        lines.append(f"  {lid}: [{', '.join(str(int(e)) for e in row)}]")
    lines += [f"num_slots: {R}", f"layer_updates_per_iter: {int(layer_updates_per_iter)}", ""]
    text = "\n".join(lines)
    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)
