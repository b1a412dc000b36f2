"""A PNG of tuning points: each with its 95% interval, the Pareto front, the unreduced model and an
optional target line (matplotlib's Agg canvas; pyplot's global state is not touched)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vtc.tune.knobs import Target
from vtc.tune.points import Point, pareto

LABELS = {"visual_tokens": "visual tokens per image", "flops": "FLOPs per image", "flops_ratio": "FLOPs / unreduced",
          "latency_ms": "ms per batch", "agreement": "agreement with the unreduced model", "accuracy": "accuracy",
          "kl": "KL(unreduced || reduced)", "cosine": "cosine to the unreduced output"}


def plot_pareto(points: Sequence[Point], path: str | Path, x: str = "visual_tokens", y: str = "agreement",
                target: Target | None = None) -> Path:
    """Draw ``y`` against ``x`` for every point (error bars: the Wilson interval of agreement or
    accuracy), the front of :func:`vtc.tune.points.pareto` as a line with its specs written
    beside it, the unreduced model as a star and ``target`` (on ``y``) as a dashed line."""
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("plot_pareto needs at least one point")
    front = pareto(points, x, y)
    figure = Figure(figsize=(8, 5))
    ax = figure.add_subplot()
    xs, ys = [p.metric(x) for p in points], [p.metric(y) for p in points]
    intervals = [p.interval(y) for p in points]
    bounds = [interval for interval in intervals if interval is not None]
    errors = None
    if len(bounds) == len(points):
        errors = [[max(0.0, v - low) for v, (low, _) in zip(ys, bounds)], [max(0.0, high - v) for v, (_, high) in zip(ys, bounds)]]
    ax.errorbar(xs, ys, yerr=errors, fmt="o", color="tab:blue", alpha=0.5, capsize=2, label="points (95% interval)")
    ax.plot([p.metric(x) for p in front], [p.metric(y) for p in front], "o-", color="tab:red", label="Pareto front")
    labels: dict[tuple[float, float], list[str]] = {}  # points that tie share one note
    for point in front:
        labels.setdefault((point.metric(x), point.metric(y)), []).append(point.label)
    for where, names in labels.items():
        ax.annotate("\n".join(names), where, fontsize=7, xytext=(4, 4), textcoords="offset points")
    for point in points:
        if not point.specs:
            ax.plot([point.metric(x)], [point.metric(y)], "k*", markersize=12, label="unreduced")
    if target is not None and target.metric == y:
        ax.axhline(target.value, color="tab:green", linestyle="--", label=f"target {target}")
    ax.set_xlabel(LABELS[x])
    ax.set_ylabel(LABELS[y])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path
