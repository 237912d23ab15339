"""Input validation and conversion.

Everything a user passes is checked here, once, and turned into a :class:`Problem`
holding float64 numpy loads and plain ints.  Errors name the argument and its value.
"""

from __future__ import annotations

import math
import numbers
import sys
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidProblemError, InvalidTypeError

__all__ = ["Problem", "make_problem", "as_weight", "MODES", "POLICIES"]

MODES = ("heuristic", "exact")
POLICIES = ("auto", "hierarchical", "global", "spill")


@dataclass(frozen=True)
class Problem:
    """A validated EPLB instance.

    Attributes:
        weight: ``[L, E]`` float64 loads (read-only), in the caller's units.
        num_replicas: ``R``, physical expert slots per layer.
        num_groups, num_nodes, num_gpus: topology as given by the caller.
        policy: resolved policy, ``"hierarchical"``, ``"global"`` or ``"spill"``.
        mode: ``"heuristic"`` or ``"exact"``.
        time_limit: seconds, or ``None``.
        seed: non-negative int.
    """

    weight: np.ndarray
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    policy: str
    mode: str
    time_limit: float | None
    seed: int

    @property
    def num_layers(self) -> int:
        """``L``, layers."""
        return int(self.weight.shape[0])

    @property
    def num_experts(self) -> int:
        """``E``, logical experts per layer."""
        return int(self.weight.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        """``k = R / G``."""
        return self.num_replicas // self.num_gpus

    @property
    def hierarchical(self) -> bool:
        """Whether the resolved policy is the hierarchical one."""
        return self.policy == "hierarchical"

    @property
    def plan_groups(self) -> int:
        """Groups the planner uses (1 under the global policy)."""
        return self.num_groups if self.hierarchical else 1

    @property
    def plan_nodes(self) -> int:
        """Nodes the planner uses (1 under the global policy)."""
        return self.num_nodes if self.hierarchical else 1


def _size(name: str, value: Any) -> int:
    """A positive integer size (Python, numpy or 0-d torch integer; not bool)."""
    if isinstance(value, bool) or isinstance(value, np.bool_):
        raise InvalidTypeError(f"{name} must be a positive integer, got bool {value!r}")
    if isinstance(value, numbers.Integral):
        out = int(value)
    else:
        try:
            out = operator.index(value)
        except TypeError:
            raise InvalidTypeError(
                f"{name} must be a positive integer, got {type(value).__name__} {value!r}"
            ) from None
    if out <= 0:
        raise InvalidProblemError(f"{name} must be a positive integer, got {out}")
    return out


def _torch_to_numpy(value: Any) -> np.ndarray:
    import torch

    t = value.detach()
    if t.is_complex():
        raise InvalidTypeError(f"weight must hold real loads, got complex dtype {t.dtype}")
    if t.dtype == torch.bool:
        raise InvalidTypeError("weight must hold numeric loads, got dtype torch.bool")
    if t.is_floating_point():
        t = t.to(device="cpu", dtype=torch.float64)
    else:
        # Integers: go through int64 so no value is lost before the float64 conversion.
        t = t.to(device="cpu", dtype=torch.int64)
    return t.numpy()


def _object_numbers(arr: np.ndarray, name: str) -> np.ndarray:
    """Python integers too big for int64 (numpy keeps them as objects) and other plain
    real numbers become float64, rounded as float64 would round them."""
    flat = arr.ravel()
    if flat.size == 0 or not all(
        isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) for x in flat
    ):
        return arr  # reported below as non-numeric
    try:
        return arr.astype(np.float64)
    except OverflowError:
        big = next(x for x in flat if abs(x) > sys.float_info.max)  # exact int/float comparison
        raise InvalidProblemError(f"{name} holds a value beyond float64's range: {big!r:.40}") from None


def as_weight(weight: Any, name: str = "weight", windows: bool = False) -> np.ndarray:
    """Validate loads and return them as a read-only float64 ``[L, E]`` array (with
    ``windows=True``, ``[L, E]`` or ``[W, L, E]``).

    Accepts a torch tensor (any real dtype, any device) or a numpy array / nested
    sequence of real numbers.  Integer loads above 2**53 are rounded to the nearest
    float64, as float64 arithmetic would; they never overflow.
    """
    if weight is None:
        raise InvalidTypeError(f"{name} must be a [layers, experts] tensor or array, got None")
    if type(weight).__module__.startswith("torch"):
        arr = _torch_to_numpy(weight)
    else:
        try:
            arr = np.asarray(weight)
        except (ValueError, TypeError) as exc:
            raise InvalidTypeError(f"{name} could not be read as a numeric array: {exc}") from None
    if arr.dtype.kind == "O":
        arr = _object_numbers(arr, name)
    kind = arr.dtype.kind
    if kind == "c":
        raise InvalidTypeError(f"{name} must hold real loads, got complex dtype {arr.dtype}")
    if kind == "b":
        raise InvalidTypeError(f"{name} must hold numeric loads, got dtype {arr.dtype}")
    if kind not in "iuf":
        raise InvalidTypeError(f"{name} must hold numeric loads, got dtype {arr.dtype}")
    if arr.ndim != 2 and not (windows and arr.ndim == 3):
        want = "2-D [layers, experts] or 3-D [windows, layers, experts]" if windows else "2-D [layers, experts]"
        hint = " (sum the leading step axis first)" if arr.ndim == 3 else ""
        raise InvalidProblemError(f"{name} must be {want}, got shape {tuple(arr.shape)}{hint}")
    if arr.ndim == 3 and arr.shape[0] == 0:
        raise InvalidProblemError(f"{name} has no windows: shape {tuple(arr.shape)}")
    if arr.shape[-2] == 0:
        raise InvalidProblemError(f"{name} has no layers: shape {tuple(arr.shape)}")
    if arr.shape[-1] == 0:
        raise InvalidProblemError(f"{name} has no experts: shape {tuple(arr.shape)}")
    out = np.array(arr, dtype=np.float64, order="C", copy=True)
    finite = np.isfinite(out)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise InvalidProblemError(
            f"{name} must be finite: {len(bad)} NaN/inf value(s), first at "
            f"{_where(bad[0])} = {float(out[tuple(bad[0])])!r}"
        )
    if (out < 0).any():
        bad = np.argwhere(out < 0)
        raise InvalidProblemError(
            f"{name} must be non-negative: {len(bad)} negative value(s), first at "
            f"{_where(bad[0])} = {float(out[tuple(bad[0])])!r}"
        )
    out.setflags(write=False)
    return out


def _where(index: np.ndarray) -> str:
    names = ("layer", "expert") if len(index) == 2 else ("window", "layer", "expert")
    return "[" + ", ".join(f"{n} {int(i)}" for n, i in zip(names, index)) + "]"


def _time_limit(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(
            f"time_limit must be a number of seconds or None, got {type(value).__name__} {value!r}"
        )
    out = float(value)
    if math.isnan(out) or out < 0:
        raise InvalidProblemError(f"time_limit must be >= 0 seconds (or None), got {value!r}")
    return out


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise InvalidTypeError(f"{name} must be one of {allowed}, got {type(value).__name__} {value!r}")
    if value not in allowed:
        raise InvalidProblemError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def make_problem(
    weight: Any,
    num_replicas: Any,
    num_groups: Any,
    num_nodes: Any,
    num_gpus: Any,
    *,
    mode: Any = "heuristic",
    time_limit: Any = None,
    seed: Any = 0,
    policy: Any = "auto",
    weight_checked: bool = False,
) -> Problem:
    """Validate every argument of a planning call and build a :class:`Problem`
    (``weight_checked``: ``weight`` already came from :func:`as_weight`).

    Raises:
        InvalidTypeError: an argument has the wrong type.
        InvalidProblemError: an argument has a bad value or the sizes do not fit.
    """
    mode = _choice("mode", mode, MODES)
    policy = _choice("policy", policy, POLICIES)
    R = _size("num_replicas", num_replicas)
    groups = _size("num_groups", num_groups)
    nodes = _size("num_nodes", num_nodes)
    gpus = _size("num_gpus", num_gpus)
    limit = _time_limit(time_limit)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise InvalidTypeError(f"seed must be a non-negative integer, got {type(seed).__name__} {seed!r}")
    if int(seed) < 0:
        raise InvalidProblemError(f"seed must be a non-negative integer, got {seed!r}")
    w = weight if weight_checked else as_weight(weight)
    E = w.shape[1]

    if R < E:
        raise InvalidProblemError(
            f"num_replicas={R} is below the number of experts {E}: every expert needs a slot"
        )
    if R % gpus:
        raise InvalidProblemError(
            f"num_replicas={R} is not a multiple of num_gpus={gpus}: every GPU needs the same slot count"
        )
    divisible = groups % nodes == 0
    if policy == "auto":
        policy = "hierarchical" if divisible else "global"
    if policy in ("hierarchical", "spill"):
        if not divisible:
            raise InvalidProblemError(
                f"policy={policy!r} needs num_groups={groups} to be a multiple of num_nodes={nodes}"
            )
        if E % groups:
            raise InvalidProblemError(
                f"the {policy} policy needs the expert count {E} to be a multiple of num_groups={groups}"
            )
        if gpus % nodes:
            raise InvalidProblemError(
                f"the {policy} policy needs num_gpus={gpus} to be a multiple of num_nodes={nodes}"
            )
    return Problem(
        weight=w,
        num_replicas=R,
        num_groups=groups,
        num_nodes=nodes,
        num_gpus=gpus,
        policy=policy,
        mode=mode,
        time_limit=limit,
        seed=int(seed),
    )
