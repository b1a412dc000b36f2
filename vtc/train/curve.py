"""Learning curves drawn from a trainer's JSON-lines log (:mod:`vtc.train.loop`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vtc.train.loop import read_log


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    x = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(x, 0, 0.0))
    index = np.arange(1, len(x) + 1)
    low = np.maximum(index - window, 0)
    return (sums[index] - sums[low]) / (index - low)


def plot_curve(log_path: Path, png: Path, title: str = "", window: int = 25) -> Path:
    """Training losses (every numeric field of the step records, smoothed) on the left; validation
    numbers (every numeric field of ``val``, flattening one level of nesting) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r for r in records if "val" not in r]
    vals = [r for r in records if "val" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    right.set_prop_cycle(color=plt.cm.tab20.colors)  # validation series can outnumber tab10's colours
    for key in dict.fromkeys(k for r in steps for k, v in r.items() if k not in ("step", "lr") and isinstance(v, float)):
        points = [(r["step"], r[key]) for r in steps if key in r]
        left.plot([p[0] for p in points], smooth([p[1] for p in points], window), label=key)
    left.set_xlabel("step")
    left.set_ylabel(f"loss (mean of {window} steps)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in vals:
        for key, value in r["val"].items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    series.setdefault(f"{key}.{sub}", []).append((r["step"], v))
            elif isinstance(value, (int, float)):
                series.setdefault(key, []).append((r["step"], value))
    for key, points in series.items():
        right.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=key)
    right.set_xlabel("step")
    right.set_ylabel("validation")
    right.set_ylim(0, 1.02)
    right.grid(alpha=0.3)
    if series:
        right.legend(fontsize=8)
    fig.suptitle(title or Path(log_path).stem)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
