"""Exception hierarchy.  Every error raised on purpose by eplb-opt derives from
:class:`EplbOptError`; bad values also derive from :class:`ValueError`, bad types from
:class:`TypeError`, so ``except ValueError`` in caller code keeps working."""

from __future__ import annotations

__all__ = [
    "EplbOptError",
    "InvalidProblemError",
    "InvalidTypeError",
    "InvalidPlanError",
    "ExecutorError",
    "SolveInterrupted",
]


class EplbOptError(Exception):
    """Root of all eplb-opt errors."""


class InvalidProblemError(EplbOptError, ValueError):
    """An argument has a bad value (shape, range, divisibility, NaN, ...)."""


class InvalidTypeError(EplbOptError, TypeError):
    """An argument has a bad type (complex or non-numeric loads, a float size, ...)."""


class InvalidPlanError(EplbOptError, ValueError):
    """A placement breaks an invariant (raised by :func:`eplb_opt.verify`)."""


class ExecutorError(EplbOptError, RuntimeError):
    """``executor="ray"``: Ray could not be imported, started or joined."""


class SolveInterrupted(KeyboardInterrupt):
    """Ctrl-C (``KeyboardInterrupt``) arrived during a call.  It stays a
    ``KeyboardInterrupt`` (``except Exception`` does not swallow it).

    Attributes:
        stage: what was running (``"exact refinement"``, ``"robust refinement"``, ...).
        partial: a verified :class:`~eplb_opt.api.SolveResult` with the plan as far as
            the call got (its ``events`` say so), or ``None`` where no finished plan of
            the requested kind existed yet.
    """

    def __init__(self, message: str, *, stage: str, partial: object | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.partial = partial
