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

Drift kinds (``generate(..., drift="walk")``; parameters in :data:`DRIFT_KINDS`, fixed
before any forecast was tuned on them).  Each changes log-popularity between windows in
one way only, on the same base popularity as the default, and every window is then
sampled as above (the sampling noise every kind shares):

* ``"steady"``: no change at all; windows differ by sampling noise only.
* ``"walk"``: a slow random walk, ``N(0, walk^2)`` per expert per window.
* ``"switch"``: sudden mix switches: before each window after the first, with
  probability ``switch_prob`` a new workload arrives and the traffic's offset to the
  base popularity is replaced by a fresh ``shift * skew * N(0, 1)`` per expert.
* ``"periodic"``: a daily cycle between two mixes (the base, and the base shifted by
  ``shift * skew * N(0, 1)``): the second's share of the traffic is
  ``(1 - cos(2 pi w / period)) / 2`` at window ``w``.
* ``"burst"``: before each window, with probability ``burst_prob`` a burst starts: in
  every layer ``hot_experts`` random experts get ``+boost`` log-popularity for
  ``duration`` windows (bursts may overlap).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Preset", "PRESETS", "DRIFT_KINDS", "drift_parameters", "generate", "example_weight"]


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


# Each drift kind's parameters (log-popularity units; windows for period / duration),
# fixed before any forecast was tuned on these traces.  JSON-able: benchmarks store them.
DRIFT_KINDS: dict[str, dict[str, float | int]] = {
    "steady": {},
    "walk": {"walk": 0.1},
    "switch": {"switch_prob": 0.2, "shift": 0.6},
    "periodic": {"period": 8, "shift": 0.6},
    "burst": {"burst_prob": 0.25, "hot_experts": 4, "boost": 1.5, "duration": 2},
}


def drift_parameters(kind: str, **base: float) -> dict[str, object]:
    """What :func:`generate` uses for drift ``kind``: ``{"kind": kind, **DRIFT_KINDS[kind]}``
    and the base popularity's parameters (``skew``, ``group_sigma``, ``dead_fraction``,
    ``df``; defaults unless given in ``base``), JSON-able for a results file."""
    if kind not in DRIFT_KINDS:
        raise ValueError(f"drift must be a number or one of {tuple(DRIFT_KINDS)}, got {kind!r}")
    out: dict[str, object] = {"kind": kind, **DRIFT_KINDS[kind]}
    out.update({"skew": 0.75, "group_sigma": 0.3, "dead_fraction": 0.01, "df": 8.0})
    out.update(base)
    return out


def generate(
    preset: str | Preset,
    *,
    windows: int = 2,
    seed: int = 0,
    skew: float = 0.75,
    group_sigma: float = 0.3,
    dead_fraction: float = 0.01,
    drift: float | str = 0.15,
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
        drift: per-window random-walk step of log-popularity, or a drift kind's name
            (:data:`DRIFT_KINDS`: ``"steady"``, ``"walk"``, ``"switch"``,
            ``"periodic"``, ``"burst"``; then ``mix_shift`` and ``mix_period`` stay 0).
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
    if isinstance(drift, str):
        if mix_shift or mix_period:
            raise ValueError(f"drift={drift!r} (a drift kind) with mix_shift={mix_shift!r}, mix_period={mix_period!r}: "
                             "a kind fixes its own changes; leave mix_shift and mix_period at 0")
        prm = drift_parameters(drift)
    rng = np.random.default_rng(seed)
    L, E = p.num_layers, p.num_experts
    groups = max(p.num_groups, 1)
    log_pop = skew * rng.standard_t(df, size=(L, E))
    log_pop += np.repeat(group_sigma * rng.standard_normal((L, groups)), E // groups, axis=1)
    dead = rng.random((L, E)) < dead_fraction
    if isinstance(drift, str):
        return _generate_kind(p, windows, rng, log_pop, dead, skew, prm)
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


def _sample(p: Preset, rng: np.random.Generator, prob: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """One window's token counts from unnormalised probabilities ``[L, E]``."""
    prob = prob.copy()
    prob[dead] = 0.0
    prob /= prob.sum(axis=1, keepdims=True)
    return rng.multinomial(p.tokens * p.top_k, prob).astype(np.float64)


def _softmax(lp: np.ndarray) -> np.ndarray:
    return np.exp(lp - lp.max(axis=1, keepdims=True))


def _generate_kind(p: Preset, windows: int, rng: np.random.Generator, log_pop: np.ndarray, dead: np.ndarray,
                   skew: float, prm: dict[str, object]) -> np.ndarray:
    """:func:`generate` for a drift kind (module docstring), from the base popularity."""
    kind = prm["kind"]
    L, E = log_pop.shape
    out = np.empty((windows, L, E))
    if kind == "periodic":
        other = _softmax(log_pop + float(prm["shift"]) * skew * rng.standard_normal((L, E)))
        base = _softmax(log_pop)
        base, other = base / base.sum(axis=1, keepdims=True), other / other.sum(axis=1, keepdims=True)
    offset = np.zeros((L, E))
    hot: list[tuple[int, np.ndarray]] = []         # (last window, [L, E] boost) of running bursts
    for w in range(windows):
        if kind == "walk" and w:
            log_pop = log_pop + float(prm["walk"]) * rng.standard_normal((L, E))
        elif kind == "switch" and w and rng.random() < float(prm["switch_prob"]):
            offset = float(prm["shift"]) * skew * rng.standard_normal((L, E))
        elif kind == "burst" and w and rng.random() < float(prm["burst_prob"]):
            boost = np.zeros((L, E))
            k = int(prm["hot_experts"])
            picks = np.argsort(rng.random((L, E)), axis=1)[:, :k]
            np.put_along_axis(boost, picks, float(prm["boost"]), axis=1)
            hot.append((w + int(prm["duration"]) - 1, boost))
        if kind == "periodic":
            share = (1.0 - np.cos(2.0 * np.pi * w / int(prm["period"]))) / 2.0
            prob = (1.0 - share) * base + share * other
        else:
            hot = [(end, b) for end, b in hot if end >= w]
            lp = log_pop + offset + sum((b for _, b in hot), np.zeros((L, E)))
            prob = _softmax(lp)
        out[w] = _sample(p, rng, prob, dead)
    return out


def example_weight(preset: str = "deepseek-v3-prefill", seed: int = 0) -> np.ndarray:
    """The bundled example: window 0 of :func:`generate` for ``preset``, ``[L, E]``."""
    return generate(preset, windows=1, seed=seed)[0]
