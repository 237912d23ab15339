"""The time budget of one call: its default, its reserve, its shares and its
deterministic units, in one place.

A :class:`Budget` is the caller's ``time_limit`` (or :data:`DEFAULT_SECONDS` in exact
mode) counted from the start of the call.  With ``deterministic=False`` it is wall
clock: :attr:`Budget.deadline` is a ``time.perf_counter()`` value, kept
:data:`FINISH_RESERVE` before the limit for the final verification and figures.  With
``deterministic=True`` nothing reads the clock: the same number of seconds is a
quantity of work, split into equal per-layer units (:meth:`Budget.per_layer`) that
exact mode turns into CP-SAT deterministic time, search iterations and re-split rounds
(:mod:`eplb_opt.exact`), so the plan depends only on the input.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator

__all__ = ["Budget", "DEFAULT_SECONDS", "FINISH_RESERVE", "collector_paused"]

# Exact mode's budget when the caller gives no time_limit (seconds).
DEFAULT_SECONDS = 10.0
# Time kept back from the refinement budget for the final verification and figures.
FINISH_RESERVE = 0.004


@dataclass(frozen=True)
class Budget:
    """``seconds`` of budget from ``start`` (a ``time.perf_counter()`` value).

    Attributes:
        seconds: the budget, ``>= 0``.
        start: when the call started.
        deterministic: a budget of work, never of wall clock (see module docs).
    """

    seconds: float
    start: float
    deterministic: bool = False

    @classmethod
    def of_call(cls, time_limit: float | None, mode: str, start: float, deterministic: bool) -> "Budget | None":
        """The budget of a ``solve`` call: ``time_limit``, or :data:`DEFAULT_SECONDS` in
        exact mode; ``None`` in heuristic mode without a limit."""
        if time_limit is None:
            if mode != "exact":
                return None
            time_limit = DEFAULT_SECONDS
        return cls(float(time_limit), start, deterministic)

    @property
    def deadline(self) -> float:
        """The wall-clock end of the budget, less :data:`FINISH_RESERVE`."""
        return self.start + self.seconds - FINISH_RESERVE

    def part(self, fraction: float) -> "Budget":
        """The first ``fraction`` of this budget (same start)."""
        return replace(self, seconds=self.seconds * fraction)

    def left(self) -> float:
        """Wall seconds left until the end of the budget (no reserve), at least 0."""
        return max(0.0, self.start + self.seconds - time.perf_counter())

    def expired(self) -> bool:
        """Whether the wall-clock deadline has passed (never, when deterministic)."""
        return not self.deterministic and time.perf_counter() >= self.deadline

    def per_layer(self, layers: int) -> float:
        """Each layer's equal share of the budget (seconds, or deterministic units)."""
        return self.seconds / max(1, int(layers))

    def share(self, layers: int, of_layers: int, left_layers: int) -> float:
        """Seconds for a part of ``layers`` of the call's ``of_layers``: by layer count
        alone when deterministic, else that part's share of the time still left among
        the ``left_layers`` layers not yet planned."""
        if self.deterministic:
            return self.seconds * layers / of_layers
        return max(0.0, (self.start + self.seconds - time.perf_counter()) * layers / left_layers)


# ---------------------------------------------------------------------------------------
# Deterministic units: what a deterministic budget buys in exact mode.  ``budget`` is the
# whole call's seconds, ``units`` one layer's share (:meth:`Budget.per_layer`).  Every
# phase of a layer gets at least some search, so small budgets cost more wall time than
# their value (measured in benchmarks/deterministic_wall.json).

# Wall seconds one candidate-item of a replica-count move takes on this project's 2-core
# machine (58x256 prefill-shaped loads, 320 and 160 replicas: a 16 s deterministic budget
# then runs ~15.5 s; measured 2026-11-27).  Also the starting rate of a wall-clock budget.
SECONDS_PER_CANDIDATE_ITEM = 6e-6


def resplit_rounds(budget: float) -> int:
    """Rounds of pair re-splits over all open layers: ``5 + 5 * budget``."""
    return int(5 + 5 * budget)


def count_move_items(units: float, share: float) -> float:
    """Candidate-items of replica-count moves per layer: ``share`` of the layer's units."""
    return share * units / SECONDS_PER_CANDIDATE_ITEM


def neighbourhoods(units: float) -> int:
    """CP-SAT neighbourhoods per layer: ``10`` per unit, at least 2."""
    return max(2, int(10 * units))


def model_time(units: float, parts: int) -> float:
    """CP-SAT deterministic time of one whole-sub-problem model: ``1 / parts`` of a layer's units."""
    return units / parts


# Calls now inside collector_paused(True), and whether the collector was on before the
# first of them paused it (several threads may plan at once).
_paused_lock = threading.Lock()
_paused_calls = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused(active: bool) -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a wall-clock-budgeted call runs
    (``active``); reference counting still frees everything the call drops.

    Issue 12's deadline study: a full (generation 2) collection that happened to start
    inside an exact call cost 0.1-0.37 s in a process with torch, numba and OR-Tools
    loaded, and was the largest overshoot of a ``time_limit``.  Paused calls nest and
    may overlap across threads: the collector is switched back on (if it was on) when
    the last of them ends, and collects later, outside any deadline."""
    global _paused_calls, _was_enabled
    if not active:
        yield
        return
    with _paused_lock:
        if _paused_calls == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused_calls += 1
    try:
        yield
    finally:
        with _paused_lock:
            _paused_calls -= 1
            if _paused_calls == 0 and _was_enabled:
                gc.enable()
