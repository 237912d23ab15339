"""CP-SAT status bookkeeping shared by the exact-mode code (no OR-Tools import here, so
exact mode can set it up before deciding whether to load OR-Tools)."""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

__all__ = ["SolverFault", "StatusLog", "current_log", "logging_statuses", "status_events"]


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
