"""How the heuristics' hot loops are compiled: one decorator, one set of options.

Every kernel in ``eplb_opt.heuristics`` (and the migration, spill and window searches
built on it) is a plain Python function over numpy arrays and scalars, compiled by
:func:`kernel` with numba:

* ``cache=True``: machine code is written next to the module, or -- on a read-only
  install -- to numba's user cache directory (``NUMBA_CACHE_DIR`` overrides both), so a
  fresh process loads it instead of compiling (well under a second);
* ``nogil=True``: a kernel releases the GIL, so a server's other threads keep running;
* no ``fastmath`` and no parallel reductions: every sum runs in a fixed order, so a
  plan is the same bit for bit on every rank, whatever its thread count or CPU;
* ``boundscheck`` stays off (numba's default); kernels index only within the shapes
  their callers checked.

:func:`compile_all` compiles every kernel up front on small inputs
(``eplb_opt.warm_up()`` calls it), so a serving engine pays the compile time, once, at
start-up rather than on its first rebalance.
"""

from __future__ import annotations

from typing import Any, Callable

import numba

__all__ = ["kernel", "warmer", "compile_all", "writable", "NUMBA_VERSION"]

NUMBA_VERSION = numba.__version__

# Functions that call the kernels on small inputs of every type they are used with.
_WARMERS: list[Callable[[], Any]] = []


def kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Compile ``fn`` with the package's options (see module docs)."""
    return numba.njit(cache=True, nogil=True, fastmath=False)(fn)


def writable(a: Any) -> Any:
    """``a`` itself when it is writeable, else a copy.

    numba types a read-only array differently from a writeable one, so passing one to a
    kernel compiles a second specialisation after :func:`compile_all` (seconds, on a
    serving engine's rebalance path).  Entry points pass their array arguments through
    this instead; a copy of loads or maps costs microseconds."""
    return a if a.flags.writeable else a.copy()


def warmer(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Register ``fn`` (no arguments) to run by :func:`compile_all`: it calls kernels on
    small inputs with the argument types real calls use, so they compile (or load from
    the cache) then."""
    _WARMERS.append(fn)
    return fn


def compile_all() -> int:
    """Compile (or load from the cache) every registered kernel; returns the number of
    warmers run.  Importing the modules that define kernels registers their warmers
    (the plan verifier's kernels, :mod:`eplb_opt.verify_kernels`, included)."""
    from . import apportion, grouping, local, matching, packing, pipeline, resplit, robust, spill  # noqa: F401
    from .. import verify_kernels  # noqa: F401  (eplb_opt.verify_kernels: numpy and numba only)

    for fn in list(_WARMERS):
        fn()
    return len(_WARMERS)
