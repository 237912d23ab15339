"""A seeded per-step trace for a workload preset: what :func:`eplb_opt.workloads.generate`
gives per window, with a step axis.

* Popularity: the preset's heavy-tailed log-popularity with group offsets and dead experts
  (the ingredients and defaults of :func:`eplb_opt.workloads.generate`).
* Drift: a random walk on log-popularity at every step, ``drift / sqrt(drift_steps)`` per
  step, so that it moves by ``drift`` (``generate``'s window-to-window step) every
  ``drift_steps`` steps.
* A mix switch (a new workload arrives): from step ``mix_step`` on (default: the middle),
  log-popularity is shifted by ``mix_shift * skew * N(0, 1)`` per expert.
* Counts: Poisson token counts with mean ``tokens_per_step * top_k * p`` per layer (the
  preset's ``tokens`` and ``top_k``), i.e. the sampling noise of one step.

Steps are drawn in fixed blocks of :data:`BLOCK` steps from one generator, so the same
arguments give the same trace whether it is kept in memory or written to a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidProblemError, InvalidTypeError
from ..workloads import PRESETS, Preset

__all__ = ["BLOCK", "step_trace", "step_trace_parameters"]

BLOCK = 256


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise InvalidProblemError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def _float(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not np.isfinite(value) or value < 0:
        raise InvalidProblemError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def step_trace_parameters(preset: str | Preset, steps: int, *, seed: int = 0, tokens_per_step: int | None = None,
                          drift: float = 0.15, drift_steps: int = 500, mix_shift: float = 0.5,
                          mix_step: int | None = None) -> dict[str, Any]:
    """The checked parameters :func:`step_trace` uses (JSON-able), defaults filled in.

    Raises:
        InvalidProblemError / InvalidTypeError: an unknown preset or a bad value (named).
    """
    return _checked(preset, steps, seed, tokens_per_step, drift, drift_steps, mix_shift, mix_step)[1]


def _checked(preset: Any, steps: Any, seed: Any, tokens_per_step: Any, drift: Any, drift_steps: Any,
             mix_shift: Any, mix_step: Any) -> tuple[Preset, dict[str, Any]]:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise InvalidProblemError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    if not isinstance(preset, Preset):
        raise InvalidTypeError(f"preset must be a preset name or a Preset, got {type(preset).__name__}")
    steps = _int("steps", steps, 1)
    tokens = preset.tokens if tokens_per_step is None else _int("tokens_per_step", tokens_per_step, 1)
    mix = steps // 2 if mix_step is None else _int("mix_step", mix_step, 0)
    return preset, {"preset": preset.name, "steps": steps, "seed": _int("seed", seed, 0), "tokens_per_step": tokens,
                    "top_k": preset.top_k, "drift": _float("drift", drift),
                    "drift_steps": _int("drift_steps", drift_steps, 1), "mix_shift": _float("mix_shift", mix_shift),
                    "mix_step": mix}


def _base(p: Preset, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Log-popularity ``[L, E]`` and dead experts, as :func:`eplb_opt.workloads.generate` draws them."""
    skew, group_sigma, dead_fraction, df = 0.75, 0.3, 0.01, 8.0
    L, E, groups = p.num_layers, p.num_experts, max(p.num_groups, 1)
    log_pop = skew * rng.standard_t(df, size=(L, E))
    log_pop += np.repeat(group_sigma * rng.standard_normal((L, groups)), E // groups, axis=1)
    return log_pop, rng.random((L, E)) < dead_fraction


def step_trace(preset: str | Preset, steps: int, *, seed: int = 0, tokens_per_step: int | None = None,
               drift: float = 0.15, drift_steps: int = 500, mix_shift: float = 0.5, mix_step: int | None = None,
               out: str | Path | None = None) -> np.ndarray | Path:
    """Per-step token counts ``[steps, L, E]`` (int32) for a preset (see module docs).

    Args:
        preset: a name from :data:`eplb_opt.workloads.PRESETS` or a ``Preset``.
        steps: number of steps.
        seed: RNG seed; the same arguments give the same trace.
        tokens_per_step: tokens routed per step and layer before ``top_k`` (default: the
            preset's ``tokens``).
        drift: random-walk displacement of log-popularity every ``drift_steps`` steps.
        drift_steps: see ``drift``.
        mix_shift: size of the mix switch (0: none), in units of the popularity's skew.
        mix_step: the step the mix switches at (default ``steps // 2``).
        out: write an ``.npy`` file there (chunk by chunk, never the whole trace in
            memory) and return its path; ``None``: return the array.
    """
    p, prm = _checked(preset, steps, seed, tokens_per_step, drift, drift_steps, mix_shift, mix_step)
    rng = np.random.default_rng(prm["seed"])
    log_pop, dead = _base(p, rng)
    shift = prm["mix_shift"] * 0.75 * rng.standard_normal(log_pop.shape)
    sigma = prm["drift"] / np.sqrt(prm["drift_steps"])
    routed = float(prm["tokens_per_step"] * p.top_k)
    shape = (prm["steps"], p.num_layers, p.num_experts)
    if out is None:
        target: Any = np.empty(shape, dtype=np.int32)
    else:
        target = np.lib.format.open_memmap(Path(out), mode="w+", dtype=np.int32, shape=shape)
    for a in range(0, shape[0], BLOCK):
        n = min(BLOCK, shape[0] - a)
        walk = log_pop + np.cumsum(sigma * rng.standard_normal((n, *log_pop.shape)), axis=0)
        log_pop = walk[-1]
        step = np.arange(a, a + n)[:, None, None]
        lp = np.where(step >= prm["mix_step"], walk + shift, walk)
        prob = np.exp(lp - lp.max(axis=2, keepdims=True))
        prob[:, dead] = 0.0
        prob /= prob.sum(axis=2, keepdims=True)
        target[a:a + n] = rng.poisson(routed * prob)
    if out is None:
        return target
    target.flush()
    del target
    return Path(out)
