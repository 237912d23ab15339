"""Settings shared by the serving integrations: ``EPLB_OPT_*`` environment variables,
explicit overrides, and the rule that keeps every EP rank on the same plan.

vLLM 0.33 calls its EPLB policy on every EP rank separately and never broadcasts the
result; SGLang 0.5.23 does the same with ``eplb_algorithms.rebalance_experts``.  Every
rank must therefore compute the *same* plan from the same loads, so the integrations run
:func:`eplb_opt.solve` with ``deterministic=True`` by default: ``time_limit`` is then a
deterministic budget (iterations and CP-SAT deterministic time units, which do not
depend on the machine, its load or the clock; their wall time is not the budget's: every
layer gets a minimum of search, see ``benchmarks/run_deterministic_wall.py``).  Exact mode with
``deterministic=False`` would make each rank's plan depend on its own clock, so it is
refused with :class:`~eplb_opt.errors.InvalidProblemError` instead of being changed
silently.  Heuristic mode is deterministic either way.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from ..errors import InvalidProblemError

__all__ = ["ENV", "announce", "check_same_plan", "describe", "flag", "parse_bool", "resolve"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); anything else is a ValueError."""
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(raw)


def _opt_float(raw: str) -> float | None:
    return None if raw.strip().lower() == "none" else float(raw)


#: setting -> (environment variable, parser)
ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "mode": ("EPLB_OPT_MODE", lambda v: v.strip()),
    "time_limit": ("EPLB_OPT_TIME_LIMIT", _opt_float),
    "seed": ("EPLB_OPT_SEED", int),
    "policy": ("EPLB_OPT_POLICY", lambda v: v.strip()),
    "deterministic": ("EPLB_OPT_DETERMINISTIC", parse_bool),
    "workers": ("EPLB_OPT_WORKERS", int),
    "max_balance_loss": ("EPLB_OPT_MAX_BALANCE_LOSS", float),
    "node_move_cost": ("EPLB_OPT_NODE_MOVE_COST", float),
}


def flag(var: str) -> bool:
    """An on/off switch such as ``EPLB_OPT_VLLM``: unset or empty is off; a value that is
    neither on nor off raises :class:`InvalidProblemError` naming the variable."""
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return False
    try:
        return parse_bool(raw)
    except ValueError:
        raise InvalidProblemError(
            f"environment variable {var}={raw!r} is neither on (1/true/yes/on) nor off (0/false/no/off)"
        ) from None


def resolve(explicit: dict[str, Any] | None, defaults: dict[str, Any], engine: str,
            ) -> tuple[dict[str, Any], dict[str, str]]:
    """Effective settings (explicit ones, else ``EPLB_OPT_*``, else ``defaults``) and where
    each came from, checked for the same-plan-on-every-rank rule.

    Raises:
        InvalidProblemError: an unknown setting, an unparsable environment value, or
            exact mode without ``deterministic`` (each rank would plan differently).
    """
    out = dict(defaults)
    source = {key: f"{key}={val!r} (default)" for key, val in defaults.items()}
    for key in defaults:
        var, conv = ENV[key]
        raw = os.environ.get(var)
        if raw is not None and raw != "":
            try:
                out[key] = conv(raw)
            except ValueError:
                raise InvalidProblemError(f"environment variable {var}={raw!r} is not a valid {key}") from None
            source[key] = f"{var}={raw}"
    for key, val in (explicit or {}).items():
        if key not in defaults:
            raise InvalidProblemError(f"unknown setting {key!r}; expected one of {sorted(defaults)}")
        if val is not None:
            out[key] = val
            source[key] = f"{key}={val!r}"
    check_same_plan(out["mode"], out["deterministic"], engine, source["mode"], source["deterministic"])
    return out, source


def check_same_plan(mode: Any, deterministic: Any, engine: str, mode_source: str | None = None,
                    det_source: str | None = None) -> None:
    """Refuse exact mode without ``deterministic`` (see the module docs)."""
    if mode == "exact" and not deterministic:
        given = " and ".join(x for x in (det_source or f"deterministic={deterministic!r}", mode_source) if x)
        raise InvalidProblemError(
            "EPLB_OPT_DETERMINISTIC=0 / deterministic=False with mode='exact' would give each rank a different "
            f"plan (set here by {given}): {engine} runs the EPLB algorithm on every EP rank separately and "
            "never broadcasts the result, and a wall-clock budget depends on each rank's machine and load. "
            "Leave deterministic at its default (True: time_limit becomes a deterministic budget) or use "
            "mode='heuristic'."
        )


def describe(cfg: dict[str, Any]) -> str:
    """``mode=exact, time_limit=2.0, ...`` for log lines."""
    return ", ".join(f"{k}={v!r}" for k, v in cfg.items())


def announce(logger: logging.Logger, msg: str, *args: Any) -> None:
    """Log ``msg`` at INFO where a handler will show it; where none is configured yet
    (SGLang loads plugins before it configures logging) at WARNING, which Python's
    last-resort handler prints, so the line is never lost."""
    if logger.hasHandlers():
        logger.info(msg, *args)
    else:
        logger.warning(msg, *args)
