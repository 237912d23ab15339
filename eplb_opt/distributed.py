"""Exact refinement fanned out over Ray (``solve(..., executor="ray")``).

The heuristic plan, the certified bounds and the final verification stay in the calling
process; only the exact refinement of the layers above tolerance travels.  Layers are
independent sub-problems, so the open layers are cut into as many chunks as the cluster
has free task slots and each chunk is refined by :func:`eplb_opt.exact.refine` in a Ray
task.  Each chunk gets the call's whole remaining wall-clock budget (it runs in parallel
with the others); with ``deterministic=True`` every layer's work budget is
``time_limit / L`` whatever the chunking, so a Ray run and a local run give the same plan.

Ray is an optional dependency (``pip install 'eplb-opt[ray]'``).  With no address a local
Ray instance is started (and left running for later calls in the process; call
``ray.shutdown()`` to stop it); ``"auto"`` or ``"ray://host:10001"`` joins a cluster, whose
nodes must have ``eplb-opt`` installed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import gap as certified_gap, gpu_loads

from .errors import ExecutorError, InvalidProblemError

# Seconds kept back from a non-deterministic chunk's budget for shipping its result home.
RETURN_RESERVE = 0.25
# Extra seconds the driver waits past the deadline before giving up on a task.
WAIT_GRACE = 5.0


@dataclass
class ChunkTiming:
    """One sub-problem's timings (seconds)."""

    layers: int
    round_trip: float   # submit to result in the driver
    compute: float      # inside the task

    @property
    def overhead(self) -> float:
        """Seconds the round trip took beyond the work (shipping, scheduling, queueing)."""
        return max(0.0, self.round_trip - self.compute)


@dataclass
class DistributedStats:
    """How a Ray refinement went: task timings and the cluster it ran on."""

    tasks: list[ChunkTiming] = field(default_factory=list)
    cluster_cpus: float = 0.0
    startup: float = 0.0   # seconds spent starting / joining Ray in this call

    def median_overhead(self) -> float:
        """Median :attr:`ChunkTiming.overhead` over the tasks (0 when none ran)."""
        return float(np.median([t.overhead for t in self.tasks])) if self.tasks else 0.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError(
            "executor='ray' needs Ray: pip install 'eplb-opt[ray]' (or pip install ray)"
        ) from exc
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> tuple[Any, float]:
    """Start a local Ray instance (``address=None``) or join one; returns ``(ray, seconds)``.

    An already initialised Ray in this process is reused as it is.
    """
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise InvalidProblemError(f"ray_address must be a non-empty string or None, got {address!r}")
    ray = _import_ray()
    t0 = time.perf_counter()
    if not ray.is_initialized():
        kw: dict[str, Any] = dict(
            include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, logging_level=logging.ERROR,
        )
        if address is None and num_cpus is not None:
            kw["num_cpus"] = int(num_cpus)
        try:
            ray.init(address=address, **kw)
        except Exception as exc:  # noqa: BLE001 - reported with the address
            raise ExecutorError(f"could not start or join Ray at ray_address={address!r}: {exc}") from exc
    return ray, time.perf_counter() - t0


def _refine_chunk(w: np.ndarray, p: np.ndarray, lb: np.ndarray, ids: np.ndarray,
                  seconds: float, kw: dict[str, Any]) -> tuple[Any, float]:
    """The Ray task body: refine one chunk of layers with ``seconds`` of wall clock."""
    from . import exact

    t0 = time.perf_counter()
    out = exact.refine(w, p, lower_bound=lb, layer_ids=ids,
                       deadline=t0 + max(0.0, seconds), **kw)
    return out, time.perf_counter() - t0


def refine(
    weight: np.ndarray,
    phy2log: np.ndarray,
    *,
    lower_bound: np.ndarray,
    tolerance: float,
    deterministic: bool,
    seconds: float,
    workers: int,
    ray_address: str | None = None,
    layers_per_task: int | None = None,
    **kw: Any,
) -> tuple[Any, DistributedStats]:
    """Refine ``phy2log`` like :func:`eplb_opt.exact.refine`, one Ray task per chunk of
    open layers; returns ``(eplb_opt.exact.ExactOutcome, DistributedStats)``.

    ``seconds`` is the wall-clock budget left (ignored with ``deterministic=True``, where
    ``kw["budget"]`` sizes the work); ``workers`` is the CP-SAT threads (and Ray CPUs) per
    task; ``layers_per_task`` (default: as many tasks as the cluster runs at once) sets
    the chunk size.  A failed or late task keeps the heuristic plan on its layers and
    says so.
    """
    from .exact import ExactOutcome

    w = np.asarray(weight, dtype=np.float64)
    p = np.array(phy2log, dtype=np.int64, copy=True)
    L = w.shape[0]
    stats = DistributedStats()
    out = ExactOutcome(p, np.zeros(L, dtype=bool), np.full(L, np.nan), [], np.full(L, np.nan))
    open_layers = _open_layers(w, p, lower_bound, tolerance, kw["num_gpus"], out.events)
    if open_layers.size == 0:
        return out, stats
    t_start = time.perf_counter()
    ray, stats.startup = connect(ray_address)
    stats.cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if workers > stats.cluster_cpus:
        raise InvalidProblemError(
            f"workers={workers} CP-SAT threads per Ray task exceed the cluster's {stats.cluster_cpus:g} CPUs"
        )
    slots = max(1, int(stats.cluster_cpus // workers))
    n_tasks = slots if layers_per_task is None else -(-open_layers.size // max(1, int(layers_per_task)))
    chunks = np.array_split(open_layers, min(n_tasks, open_layers.size))
    left = seconds - (time.perf_counter() - t_start)
    remote = ray.remote(num_cpus=workers, max_retries=0)(_refine_chunk)
    common = dict(kw, tolerance=tolerance, deterministic=deterministic, workers=workers, total_layers=L)
    submitted: dict[Any, tuple[np.ndarray, float]] = {}
    for c in chunks:
        ref = remote.remote(w[c], p[c], lower_bound[c], c, max(0.0, left - RETURN_RESERVE), common)
        submitted[ref] = (c, time.perf_counter())
    wait_until = None if deterministic else time.perf_counter() + max(0.0, left) + WAIT_GRACE
    _collect(ray, submitted, wait_until, out, stats)
    out.events.append(
        f"Ray: {len(stats.tasks)} of {len(chunks)} sub-problem(s) on {stats.cluster_cpus:g} CPU(s); "
        f"median overhead {stats.median_overhead() * 1e3:.0f} ms per sub-problem"
        + (f", {stats.startup:.1f} s to start Ray" if stats.startup > 0.05 else "")
    )
    return out, stats


def _open_layers(w: np.ndarray, p: np.ndarray, lower_bound: np.ndarray, tolerance: float, G: int,
                 events: list[str]) -> np.ndarray:
    """Layers whose certified gap is above ``tolerance`` (an event counts the others)."""
    gap = certified_gap(lower_bound, gpu_loads(w, p, G).max(axis=1))
    open_layers = np.flatnonzero(gap > tolerance)
    if w.shape[0] - open_layers.size:
        events.append(f"solver skipped on {w.shape[0] - open_layers.size} layer(s): certified gap already within "
                      f"tolerance {tolerance:g}")
    return open_layers


def _collect(ray: Any, submitted: dict[Any, tuple[np.ndarray, float]], wait_until: float | None, out: Any,
             stats: DistributedStats) -> None:
    """Merge the chunks' outcomes into ``out`` as they come back (until ``wait_until``);
    a failed or late task keeps the heuristic plan on its layers and says so.  Ctrl-C
    cancels what is still running and raises :class:`~eplb_opt.exact.RefineInterrupted`
    with the chunks that came back."""
    from .exact import RefineInterrupted

    events = out.events
    pending = list(submitted)
    while pending:
        timeout = None if wait_until is None else max(0.0, wait_until - time.perf_counter())
        try:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            events.append(f"interrupted with {len(pending)} of {len(submitted)} Ray task(s) still running; "
                          "those layers keep the heuristic plan")
            raise RefineInterrupted(out) from None
        if not done:
            break
        for ref in done:
            c, t_sub = submitted[ref]
            try:
                got, compute = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a lost task keeps the heuristic layers
                events.append(f"Ray task for layers {c[0]}..{c[-1]} failed ({type(exc).__name__}: {exc}); "
                              "kept the heuristic plan there")
                continue
            stats.tasks.append(ChunkTiming(int(c.size), time.perf_counter() - t_sub, float(compute)))
            out.phy2log[c] = got.phy2log
            out.attempted[c] = got.attempted
            out.proven[c] = got.proven
            out.conditional[c] = got.conditional
            events.extend(e for e in got.events if not e.startswith("solver skipped on"))
    for ref in pending:
        c, _ = submitted[ref]
        ray.cancel(ref, force=True)
        events.append(f"Ray task for layers {c[0]}..{c[-1]} did not return in time; kept the heuristic plan there")
