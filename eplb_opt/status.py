"""CP-SAT status bookkeeping shared by the exact-mode code (no OR-Tools import here, so
exact mode can set it up before deciding whether to load OR-Tools)."""

from __future__ import annotations

import importlib
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

__all__ = ["SolverFault", "StatusLog", "current_log", "logging_statuses", "ortools_ready",
           "preload_in_background", "status_events", "warm_up"]


class SolverFault(RuntimeError):
    """CP-SAT answered something that is not a result: ``MODEL_INVALID`` (a bug in the
    model we built) or a status code this module does not know.  Callers keep the plan
    they had and report the fault by name."""


class StatusLog:
    """Thread-safe tally of the CP-SAT statuses seen while it is installed with
    :func:`logging_statuses` (one per thread; worker threads install the same log)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


_local = threading.local()


def current_log() -> StatusLog | None:
    """The log installed on this thread (``None`` when none is)."""
    return getattr(_local, "log", None)


@contextmanager
def logging_statuses(log: StatusLog | None) -> Iterator[StatusLog | None]:
    """Record the status of every CP-SAT solve made by this thread into ``log``."""
    before = getattr(_local, "log", None)
    _local.log = log
    try:
        yield log
    finally:
        _local.log = before


def status_events(log: StatusLog) -> list[str]:
    """Events for statuses a caller should hear about: ``UNKNOWN`` (a solve found no
    solution within its time limit, so its sub-problem kept the plan it had)."""
    with log._lock:
        counts = dict(log.counts)
    total = sum(counts.values())
    out = []
    if counts.get("UNKNOWN"):
        out.append(
            f"CP-SAT returned UNKNOWN (no better solution found within its time limit) on {counts['UNKNOWN']} of {total} "
            "solve(s); those sub-problems kept the plan they had"
        )
    return out


_preload_lock = threading.Lock()
_preload_thread: threading.Thread | None = None


def ortools_ready() -> bool:
    """Whether :mod:`eplb_opt.cpsat` (and so OR-Tools) is fully loaded in this process.
    A module still being imported (by the background preload) does not count: importing
    it again would wait for that import."""
    mod = sys.modules.get("eplb_opt.cpsat")
    return mod is not None and getattr(mod, "READY", False)


def _load() -> None:
    try:
        importlib.import_module("eplb_opt.cpsat")
    except Exception:  # noqa: BLE001 - the next call that needs it imports it and reports the failure
        pass


def preload_in_background() -> bool:
    """Start loading OR-Tools on a daemon thread (once); ``True`` when started by this
    call.  Only :func:`warm_up` with ``background=True`` calls this: solve calls never
    do, because an import running beside a call slows the call (see :func:`warm_up`)."""
    global _preload_thread
    with _preload_lock:
        if ortools_ready() or (_preload_thread is not None and _preload_thread.is_alive()):
            return False
        _preload_thread = threading.Thread(target=_load, name="eplb-opt-preload", daemon=True)
        _preload_thread.start()
        return True


def warm_up(background: bool = False) -> None:
    """Compile (or load from numba's cache) every kernel of the heuristics
    (:func:`eplb_opt.heuristics.compile.compile_all`), then load OR-Tools (about 0.5 s,
    once per process), so that exact mode with short budgets can use CP-SAT from its
    first call.  Serving engines call this at start-up.

    Exact-mode calls whose wall-clock budget cannot pay for the import skip CP-SAT (and
    say so in ``events``) rather than load it: the import holds the GIL for long
    stretches, and calls made while it ran in the background were measured 0.1-0.2 s
    over their deadline.  ``background=True`` starts the import on a daemon thread and
    returns at once, for a server that accepts slower calls during that half second.
    """
    from .heuristics.compile import compile_all

    compile_all()
    if background:
        preload_in_background()
        return
    with _preload_lock:
        thread = _preload_thread
    if thread is not None:
        thread.join()
    importlib.import_module("eplb_opt.cpsat")
