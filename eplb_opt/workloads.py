"""Seeded synthetic expert-load workloads shaped like real MoE models.

Real expert-load traces are not bundled; these generators reproduce their main
features so benchmarks and examples are repeatable:

* heavy-tailed popularity (log-popularity from a Student-t, 8 degrees of freedom by
  default);
* group effects (experts of one group share a random offset);
* dead experts (a small share routed no tokens at all);
* drift between windows (a random walk on log-popularity) and, optionally, a workload
  mix shift halfway through;
* token counts drawn from a multinomial with ``tokens x top_k`` routed tokens per layer.

Loads are float64 token counts, ``[W, L, E]`` for ``W`` windows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Preset", "PRESETS", "generate", "example_weight"]


@dataclass(frozen=True)
class Preset:
    """Model shape and EP topology of a workload preset."""

    name: str
    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    top_k: int = 8
    tokens: int = 16384

    def topology(self) -> dict[str, int]:
        """Keyword arguments for :func:`eplb_opt.solve`."""
        return {
            "num_replicas": self.num_replicas,
            "num_groups": self.num_groups,
            "num_nodes": self.num_nodes,
            "num_gpus": self.num_gpus,
        }

    def as_dict(self) -> dict[str, object]:
        """The preset's fields as a plain dict (JSON-able)."""
        return asdict(self)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("deepseek-v3-prefill", 58, 256, 288, 8, 4, 32),
        Preset("deepseek-v3-decode", 58, 256, 320, 8, 8, 64, tokens=4096),
        Preset("qwen3-235b", 94, 128, 160, 1, 4, 32),
        Preset("kimi-k2", 61, 384, 448, 1, 8, 64),
        Preset("no-redundancy", 32, 128, 128, 4, 2, 16),
        Preset("deepseek-v2-lite", 26, 64, 80, 1, 1, 8, top_k=6),
        Preset("scale-1024", 60, 1024, 2048, 16, 8, 256),
    )
}


def generate(
    preset: str | Preset,
    *,
    windows: int = 2,
    seed: int = 0,
    skew: float = 0.75,
    group_sigma: float = 0.3,
    dead_fraction: float = 0.01,
    drift: float = 0.15,
    mix_shift: float = 0.0,
    df: float = 8.0,
    mix_period: int = 0,
) -> np.ndarray:
    """Token counts ``[windows, L, E]`` (float64) for a preset.

    Args:
        preset: a name from :data:`PRESETS` or a :class:`Preset`.
        windows: number of consecutive windows.
        seed: RNG seed; the same arguments always give the same array.
        skew: scale of the heavy-tailed log-popularity.
        group_sigma: spread of the per-group offset.
        dead_fraction: share of experts that receive no tokens.
        drift: per-window random-walk step of log-popularity.
        mix_shift: extra shift of log-popularity (same scale as ``skew``), as when the
            traffic mix changes: applied from the middle window on, or (``mix_period``)
            switched on and off every ``mix_period`` windows.
        df: degrees of freedom of the Student-t (lower: heavier tails).
        mix_period: with ``mix_shift``, alternate the two traffic mixes every this many
            windows (0: one change at the middle window).

    The defaults put DeepSeek's reference near the figures quoted for DeepSeek-V3
    prefill-shaped loads (about 0.84 in-window under the hierarchical policy).
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    rng = np.random.default_rng(seed)
    L, E = p.num_layers, p.num_experts
    groups = max(p.num_groups, 1)
    log_pop = skew * rng.standard_t(df, size=(L, E))
    log_pop += np.repeat(group_sigma * rng.standard_normal((L, groups)), E // groups, axis=1)
    dead = rng.random((L, E)) < dead_fraction
    shift = mix_shift * skew * rng.standard_normal((L, E)) if mix_shift else None
    routed = p.tokens * p.top_k
    out = np.empty((windows, L, E))
    for w in range(windows):
        if w:
            log_pop = log_pop + drift * rng.standard_normal((L, E))
        if shift is None:
            on = False
        elif mix_period > 0:
            on = (w // mix_period) % 2 == 1
        else:
            on = w >= windows // 2 and windows > 1
        lp = log_pop + shift if on else log_pop
        prob = np.exp(lp - lp.max(axis=1, keepdims=True))
        prob[dead] = 0.0
        prob /= prob.sum(axis=1, keepdims=True)
        out[w] = rng.multinomial(routed, prob).astype(np.float64)
    return out


def example_weight(preset: str = "deepseek-v3-prefill", seed: int = 0) -> np.ndarray:
    """The bundled example: window 0 of :func:`generate` for ``preset``, ``[L, E]``."""
    return generate(preset, windows=1, seed=seed)[0]
