"""Fixed benchmark suites (used by ``eplb-opt bench`` and ``eplb-opt score``).

A suite is a set of presets (:data:`eplb_opt.workloads.PRESETS`), workload seeds, a cap
on layers per preset, and timing repeats.  Each workload has two windows: plans are made
from window 0 and scored on window 0 (in-window) and window 1 (next window).

* ``quick``: every model preset, seed 0, the first 16 layers, 3 timing repeats, exact
  mode with 1 s per workload.  Runs in about a minute.
* ``full``: every model preset, seeds 0-2, all layers, 7 timing repeats, exact mode with
  10 s per workload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .workloads import PRESETS, Preset, generate

__all__ = ["Suite", "SUITES", "Workload", "workloads"]

MODEL_PRESETS = (
    "deepseek-v3-prefill",
    "deepseek-v3-decode",
    "qwen3-235b",
    "kimi-k2",
    "no-redundancy",
    "deepseek-v2-lite",
)


@dataclass(frozen=True)
class Suite:
    name: str
    presets: tuple[str, ...]
    seeds: tuple[int, ...]
    max_layers: int | None
    repeats: int
    exact_time: float


SUITES = {
    "quick": Suite("quick", MODEL_PRESETS, (0,), 16, 3, 1.0),
    "full": Suite("full", MODEL_PRESETS, (0, 1, 2), None, 7, 10.0),
}


@dataclass(frozen=True)
class Workload:
    """One suite workload: ``windows`` ``[2, L, E]`` token counts of ``preset``."""

    preset: Preset
    seed: int
    windows: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.preset.name}/seed{self.seed}"


def workloads(suite: str | Suite) -> Iterator[Workload]:
    """The suite's workloads, in a fixed order."""
    s = SUITES[suite] if isinstance(suite, str) else suite
    for name in s.presets:
        p = PRESETS[name]
        for seed in s.seeds:
            w = generate(p, windows=2, seed=seed)
            if s.max_layers is not None:
                w = w[:, : s.max_layers]
            yield Workload(p, seed, w)
