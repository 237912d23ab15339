"""Plan reports: one figure a person reads at a glance (``eplb-opt report``).

Panels: per-GPU load of every layer before (static placement: expert ``e`` on GPU
``e * G / E``, spare slots to experts in order) and after the plan, as load over the
layer's mean; per-layer balancedness before and after with the certified ceiling; the
per-layer gap to the certified bound; and the replica count of every expert.  Written as
PNG, or as a self-contained HTML page with the figure and the per-layer table.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from .bounds import lower_bounds
from .metrics import gpu_loads, replica_counts_of
from .planfile import PlanFileError, atomic_write

__all__ = ["write_report", "static_placement", "plan_figures"]


def static_placement(num_layers: int, num_experts: int, num_replicas: int) -> np.ndarray:
    """``[L, R]``: expert ``e`` on GPU ``e * G / E`` in order; spare slots repeat the
    first experts.  The "no rebalancing" baseline of reports and benchmarks."""
    row = np.sort(np.concatenate([np.arange(num_experts), np.arange(num_replicas - num_experts) % num_experts]))
    return np.broadcast_to(row, (num_layers, num_replicas)).copy()


def plan_figures(
    weight: np.ndarray, phy2log: np.ndarray, *, num_gpus: int, hierarchical: bool, num_groups: int,
    num_nodes: int, title: str = "", masked: np.ndarray | None = None,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Build the report figure; returns ``(matplotlib figure, per-layer figures)``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise PlanFileError(f"reports need matplotlib ({exc})") from None
    w = np.asarray(weight, dtype=np.float64)
    L, E = w.shape
    R = phy2log.shape[1]
    before = gpu_loads(w, static_placement(L, E, R), num_gpus)
    after = gpu_loads(w, phy2log, num_gpus)
    mean = np.maximum(after.mean(axis=1, keepdims=True), 1e-300)
    if masked is None:
        bound = lower_bounds(w, R, num_gpus, hierarchical=hierarchical, num_groups=num_groups,
                             num_nodes=num_nodes).lower_bound
    else:
        from .masked import lower_bound

        bound = lower_bound(w, R, masked)
    top = after.max(axis=1)
    gap = np.where(top > 0, 1 - np.minimum(bound, top) / np.where(top > 0, top, 1), 0.0)
    bal_before = before.mean(axis=1) / np.maximum(before.max(axis=1), 1e-300)
    bal_after = after.mean(axis=1) / np.maximum(top, 1e-300)
    ceiling = np.minimum(1.0, after.mean(axis=1) / np.maximum(bound, 1e-300))
    counts = replica_counts_of(phy2log, E)

    fig = plt.figure(figsize=(14, 9.5))
    grid = fig.add_gridspec(3, 2, height_ratios=[1.25, 1, 1], hspace=0.45, wspace=0.18)
    vmax = max(1.05, float(np.quantile(before / mean, 0.995)))
    for col, (mat, name) in enumerate(((before, "before: static placement"), (after, "after: this plan"))):
        ax = fig.add_subplot(grid[0, col])
        im = ax.imshow((mat / mean).T, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{name}\nper-GPU load / layer mean (brightest: busiest); worst layer "
                     f"{(mat / mean).max():.2f}x mean", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("GPU")
        fig.colorbar(im, ax=ax, fraction=0.03)
    ax = fig.add_subplot(grid[1, :])
    x = np.arange(L)
    ax.plot(x, bal_before, color="#999999", lw=1, label=f"before (overall {before.mean(1).sum() / before.max(1).sum():.3f})")
    ax.plot(x, bal_after, color="#1f77b4", lw=1.5, label=f"after (overall {after.mean(1).sum() / top.sum():.4f})")
    ax.plot(x, ceiling, color="k", lw=0.8, ls="--", label="certified ceiling (no plan of this policy above it)")
    ax.set_ylim(0, 1.25)  # headroom for the legend above the curves
    ax.set_xlim(-0.5, L - 0.5)
    ax.set_ylabel("balancedness (mean / max)")
    ax.set_title("Per-layer balancedness", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    ax = fig.add_subplot(grid[2, 0])
    ax.bar(x, gap * 100, color="#d62728")
    ax.set_xlim(-0.5, L - 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("gap to certified bound (%)")
    ax.set_title(f"Gap: 1 - lower bound / max load (worst {gap.max():.3%}, mean {gap.mean():.3%})", fontsize=9)
    ax = fig.add_subplot(grid[2, 1])
    im = ax.imshow(counts.T, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_title(f"Replica count per expert (max {counts.max()})", fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("expert")
    fig.colorbar(im, ax=ax, fraction=0.03)
    if title:
        fig.suptitle(title, fontsize=11)
    per_layer = {"balancedness_before": bal_before, "balancedness_after": bal_after, "ceiling": ceiling,
                 "max_load": top, "lower_bound": bound, "gap": gap}
    return fig, per_layer


def write_report(
    path: str | Path, weight: np.ndarray, phy2log: np.ndarray, *, num_gpus: int, hierarchical: bool,
    num_groups: int, num_nodes: int, title: str = "", masked: np.ndarray | None = None,
) -> Path:
    """Write the report to ``path`` (``.png`` or ``.html``), atomically."""
    dest = Path(path)
    kind = dest.suffix.lower()
    if kind not in (".png", ".html"):
        raise PlanFileError(f"{dest}: reports are .png or .html, got {kind!r}")
    fig, per_layer = plan_figures(weight, phy2log, num_gpus=num_gpus, hierarchical=hierarchical,
                                  num_groups=num_groups, num_nodes=num_nodes, title=title, masked=masked)
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    png = buf.getvalue()
    if kind == ".png":
        return atomic_write(dest, lambda tmp: tmp.write_bytes(png))
    rows = "\n".join(
        f"<tr><td>{l}</td><td>{per_layer['max_load'][l]:.6g}</td><td>{per_layer['lower_bound'][l]:.6g}</td>"
        f"<td>{per_layer['gap'][l]:.4%}</td><td>{per_layer['balancedness_before'][l]:.4f}</td>"
        f"<td>{per_layer['balancedness_after'][l]:.5f}</td></tr>"
        for l in range(len(per_layer["gap"]))
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title or 'eplb-opt plan report')}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head>
<body><h1>{html.escape(title or 'eplb-opt plan report')}</h1>
<img alt="plan report" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Per layer</h2>
<table><tr><th>layer</th><th>max GPU load</th><th>certified lower bound</th><th>gap</th>
<th>balancedness before</th><th>balancedness after</th></tr>
{rows}
</table></body></html>
"""
    return atomic_write(dest, lambda tmp: tmp.write_text(page))
