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

Drift kinds (``drift_kind=``, one of :data:`eplb_opt.workloads.DRIFT_KINDS`): instead of
the walk and the one mix switch above, the kind's own change, with the parameters of
:func:`eplb_opt.workloads.generate`'s kinds at per-step granularity.  One window of a kind
is ``kind_window`` steps (default :data:`KIND_WINDOW_STEPS` = 500, ``drift_steps``'s
default, fixed before any replay was run on these traces); a per-window chance becomes a
per-step one of ``chance / kind_window``, and a length in windows becomes that many times
``kind_window`` steps:

* ``"steady"``: no change; steps differ by sampling noise only.
* ``"walk"``: a random walk of ``walk / sqrt(kind_window)`` per expert per step.
* ``"switch"``: from step ``kind_window`` on, at each step with chance
  ``switch_prob / kind_window`` a new workload arrives: the offset to the base popularity
  is replaced by a fresh ``shift * skew * N(0, 1)`` per expert.
* ``"periodic"``: the base mix and a second one (the base shifted by
  ``shift * skew * N(0, 1)``); the second's share at step ``s`` is
  ``(1 - cos(2 pi s / (period * kind_window))) / 2``.
* ``"burst"``: from step ``kind_window`` on, at each step with chance
  ``burst_prob / kind_window`` a burst starts: in every layer ``hot_experts`` random experts
  get ``+boost`` log-popularity for ``duration * kind_window`` steps (bursts may overlap).

Steps are drawn in fixed blocks of :data:`BLOCK` steps from one generator, so the same
arguments give the same trace whether it is kept in memory or written to a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidProblemError, InvalidTypeError
from ..workloads import DRIFT_KINDS, PRESETS, Preset, drift_parameters

__all__ = ["BLOCK", "KIND_WINDOW_STEPS", "step_trace", "step_trace_parameters"]

BLOCK = 256
KIND_WINDOW_STEPS = 500


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
                          drift: float | None = None, drift_steps: int | None = None, mix_shift: float | None = None,
                          mix_step: int | None = None, drift_kind: str | None = None,
                          kind_window: int | None = None) -> dict[str, Any]:
    """The checked parameters :func:`step_trace` uses (JSON-able), defaults filled in
    (with ``drift_kind``: the kind's parameters and ``kind_window`` instead of the walk's
    and the mix switch's).

    Raises:
        InvalidProblemError / InvalidTypeError: an unknown preset or a bad value (named).
    """
    return _checked(preset, steps, seed, tokens_per_step, drift, drift_steps, mix_shift, mix_step, drift_kind,
                    kind_window)[1]


def _kind_checked(p: Preset, head: dict[str, Any], drift_kind: Any, kind_window: Any,
                  others: dict[str, Any]) -> tuple[Preset, dict[str, Any]]:
    if not isinstance(drift_kind, str) or drift_kind not in DRIFT_KINDS:
        raise InvalidProblemError(f"drift_kind must be one of {tuple(DRIFT_KINDS)} or None, got {drift_kind!r}")
    given = sorted(k for k, v in others.items() if v is not None)
    if given:
        raise InvalidProblemError(f"drift_kind={drift_kind!r} fixes its own changes; leave {', '.join(given)} unset "
                                  f"(got {', '.join(f'{k}={others[k]!r}' for k in given)})")
    win = KIND_WINDOW_STEPS if kind_window is None else _int("kind_window", kind_window, 1)
    prm = drift_parameters(drift_kind)
    prm = {"drift_kind": prm.pop("kind"), **prm}
    return p, {**head, **prm, "kind_window": win}


def _checked(preset: Any, steps: Any, seed: Any, tokens_per_step: Any, drift: Any, drift_steps: Any,
             mix_shift: Any, mix_step: Any, drift_kind: Any = None,
             kind_window: Any = None) -> tuple[Preset, dict[str, Any]]:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise InvalidProblemError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    if not isinstance(preset, Preset):
        raise InvalidTypeError(f"preset must be a preset name or a Preset, got {type(preset).__name__}")
    steps = _int("steps", steps, 1)
    tokens = preset.tokens if tokens_per_step is None else _int("tokens_per_step", tokens_per_step, 1)
    head = {"preset": preset.name, "steps": steps, "seed": _int("seed", seed, 0), "tokens_per_step": tokens,
            "top_k": preset.top_k}
    if drift_kind is not None:
        return _kind_checked(preset, head, drift_kind, kind_window,
                             {"drift": drift, "drift_steps": drift_steps, "mix_shift": mix_shift, "mix_step": mix_step})
    if kind_window is not None:
        raise InvalidProblemError(f"kind_window={kind_window!r} needs a drift_kind")
    mix = steps // 2 if mix_step is None else _int("mix_step", mix_step, 0)
    return preset, {**head, "drift": _float("drift", 0.15 if drift is None else drift),
                    "drift_steps": _int("drift_steps", 500 if drift_steps is None else drift_steps, 1),
                    "mix_shift": _float("mix_shift", 0.5 if mix_shift is None else mix_shift), "mix_step": mix}


def _base(p: Preset, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Log-popularity ``[L, E]`` and dead experts, as :func:`eplb_opt.workloads.generate` draws them."""
    skew, group_sigma, dead_fraction, df = 0.75, 0.3, 0.01, 8.0
    L, E, groups = p.num_layers, p.num_experts, max(p.num_groups, 1)
    log_pop = skew * rng.standard_t(df, size=(L, E))
    log_pop += np.repeat(group_sigma * rng.standard_normal((L, groups)), E // groups, axis=1)
    return log_pop, rng.random((L, E)) < dead_fraction


def step_trace(preset: str | Preset, steps: int, *, seed: int = 0, tokens_per_step: int | None = None,
               drift: float | None = None, drift_steps: int | None = None, mix_shift: float | None = None,
               mix_step: int | None = None, drift_kind: str | None = None, kind_window: int | None = None,
               out: str | Path | None = None) -> np.ndarray | Path:
    """Per-step token counts ``[steps, L, E]`` (int32) for a preset (see module docs).

    Args:
        preset: a name from :data:`eplb_opt.workloads.PRESETS` or a ``Preset``.
        steps: number of steps.
        seed: RNG seed; the same arguments give the same trace.
        tokens_per_step: tokens routed per step and layer before ``top_k`` (default: the
            preset's ``tokens``).
        drift: random-walk displacement of log-popularity every ``drift_steps`` steps
            (default 0.15).
        drift_steps: see ``drift`` (default 500).
        mix_shift: size of the mix switch (0: none), in units of the popularity's skew
            (default 0.5).
        mix_step: the step the mix switches at (default ``steps // 2``).
        drift_kind: a drift kind of :data:`eplb_opt.workloads.DRIFT_KINDS` instead of the
            walk and the mix switch (module docs); then leave ``drift``, ``drift_steps``,
            ``mix_shift`` and ``mix_step`` unset.
        kind_window: steps per window of the kind (default :data:`KIND_WINDOW_STEPS`).
        out: write an ``.npy`` file there (chunk by chunk, never the whole trace in
            memory) and return its path; ``None``: return the array.
    """
    p, prm = _checked(preset, steps, seed, tokens_per_step, drift, drift_steps, mix_shift, mix_step, drift_kind,
                      kind_window)
    rng = np.random.default_rng(prm["seed"])
    log_pop, dead = _base(p, rng)
    shape = (prm["steps"], p.num_layers, p.num_experts)
    if out is None:
        target: Any = np.empty(shape, dtype=np.int32)
    else:
        target = np.lib.format.open_memmap(Path(out), mode="w+", dtype=np.int32, shape=shape)
    if drift_kind is None:
        _walk_and_switch(p, prm, rng, log_pop, dead, target)
    else:
        _KindState(prm, rng, log_pop).fill(p, rng, dead, target)
    if out is None:
        return target
    target.flush()
    del target
    return Path(out)


def _walk_and_switch(p: Preset, prm: dict[str, Any], rng: np.random.Generator, log_pop: np.ndarray,
                     dead: np.ndarray, target: Any) -> None:
    """The default trace (no ``drift_kind``): the walk and one mix switch, into ``target``."""
    shift = prm["mix_shift"] * 0.75 * rng.standard_normal(log_pop.shape)
    sigma = prm["drift"] / np.sqrt(prm["drift_steps"])
    routed = float(prm["tokens_per_step"] * p.top_k)
    shape = target.shape
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


def _normalised(lp: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of log-popularity."""
    prob = np.exp(lp - lp.max(axis=-1, keepdims=True))
    return prob / prob.sum(axis=-1, keepdims=True)


class _KindState:
    """A drift kind's state between steps (module docs), drawn block by block."""

    def __init__(self, prm: dict[str, Any], rng: np.random.Generator, log_pop: np.ndarray) -> None:
        self.prm, self.kind, self.win = prm, prm["drift_kind"], prm["kind_window"]
        self.skew = float(prm["skew"])
        self.log_pop, self.offset = log_pop, np.zeros_like(log_pop)
        self.bursts: list[tuple[int, np.ndarray]] = []          # (last step, [L, E] boost) of running bursts
        if self.kind == "periodic":
            self.base = _normalised(log_pop)
            self.other = _normalised(log_pop + float(prm["shift"]) * self.skew * rng.standard_normal(log_pop.shape))

    def fill(self, p: Preset, rng: np.random.Generator, dead: np.ndarray, target: Any) -> None:
        routed = float(self.prm["tokens_per_step"] * p.top_k)
        for a in range(0, target.shape[0], BLOCK):
            n = min(BLOCK, target.shape[0] - a)
            prob = self.block(rng, a, n)
            prob[:, dead] = 0.0
            prob /= prob.sum(axis=2, keepdims=True)
            target[a:a + n] = rng.poisson(routed * prob)

    def block(self, rng: np.random.Generator, a: int, n: int) -> np.ndarray:
        """Unnormalised probabilities ``[n, L, E]`` of steps ``a .. a + n - 1``."""
        prm, win, shape = self.prm, self.win, self.log_pop.shape
        if self.kind == "walk":
            walk = self.log_pop + np.cumsum(float(prm["walk"]) / np.sqrt(win) * rng.standard_normal((n, *shape)), axis=0)
            self.log_pop = walk[-1]
            return _normalised(walk)
        if self.kind == "periodic":
            share = (1.0 - np.cos(2.0 * np.pi * np.arange(a, a + n) / (int(prm["period"]) * win))) / 2.0
            return (1.0 - share)[:, None, None] * self.base + share[:, None, None] * self.other
        if self.kind == "steady":
            return np.broadcast_to(_normalised(self.log_pop), (n, *shape)).copy()
        return self._events(rng, a, n)

    def _events(self, rng: np.random.Generator, a: int, n: int) -> np.ndarray:
        """Switch and burst: per-step chances, events drawn in step order."""
        prm, win, shape = self.prm, self.win, self.log_pop.shape
        chance = float(prm["switch_prob" if self.kind == "switch" else "burst_prob"]) / win
        hits = rng.random(n) < chance
        out = np.empty((n, *shape))
        for i in range(n):
            s = a + i
            if hits[i] and s >= win and self.kind == "switch":
                self.offset = float(prm["shift"]) * self.skew * rng.standard_normal(shape)
            elif hits[i] and s >= win:
                boost = np.zeros(shape)
                picks = np.argsort(rng.random(shape), axis=1)[:, :int(prm["hot_experts"])]
                np.put_along_axis(boost, picks, float(prm["boost"]), axis=1)
                self.bursts.append((s + int(prm["duration"]) * win - 1, boost))
            self.bursts = [(end, b) for end, b in self.bursts if end >= s]
            out[i] = self.log_pop + self.offset + sum((b for _, b in self.bursts), np.zeros(shape))
        return _normalised(out)
