"""Plots of the shapes benchmark's rows (:mod:`vtc.shapes_benchmark`): accuracy against visual
tokens and FLOPs (Pareto curves), and accuracy per question type with 95% intervals (bars);
:func:`write_outputs` writes every result file of a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vtc.shapes_benchmark import BenchmarkOptions, Row, write_csv, write_json


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(rows: Sequence[Row], path: Path) -> Path:
    """Accuracy against visual tokens and against GFLOPs, one panel row per model, one line per reducer."""
    plt = _pyplot()
    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    for (ax_tokens, ax_flops), model in zip(axes, models):
        group = [r for r in rows if r.model == model]
        full = next(r for r in group if r.reducer == "none")
        for reducer in dict.fromkeys(r.reducer for r in group if r.reducer != "none"):
            line = sorted((r for r in group if r.reducer == reducer), key=lambda r: r.visual_tokens)
            ax_tokens.plot([r.visual_tokens for r in line], [r.scores.accuracy for r in line], "o-", label=reducer)
            ax_flops.plot([r.gflops for r in line], [r.scores.accuracy for r in line], "o-", label=reducer)
        for ax, x in ((ax_tokens, full.visual_tokens), (ax_flops, full.gflops)):
            ax.plot([x], [full.scores.accuracy], "k*", markersize=12, label="all tokens")
            ax.set_xscale("log", base=2)
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            ax.set_ylim(0, 1.02)
        ax_tokens.set_xlabel("visual tokens per image")
        ax_flops.set_xlabel("GFLOPs per image (a VLM: vision + prefill)")
        ax_tokens.set_title(f"{model}: accuracy vs visual tokens")
        ax_flops.set_title(f"{model}: accuracy vs FLOPs")
        ax_tokens.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _budget_title(rows: Sequence[Row], budget: int) -> str:
    if budget < 0:
        return "extra specs"
    presets = "/".join(dict.fromkeys(r.spec.partition("preset=")[2].partition(",")[0] for r in rows
                                      if r.reducer.startswith("dymu")))
    if not presets:
        return f"{budget} visual tokens"
    dymu = f"DyMU {presets} (target {budget})"
    return f"{budget} visual tokens, {dymu}" if any(not r.reducer.startswith("dymu") for r in rows) else dymu


def plot_per_type(rows: Sequence[Row], path: Path) -> Path:
    """Accuracy per question type with its 95% Wilson interval: one row of panels per model, one
    panel per budget (DyMU presets and extra specs get their own), one bar per reducer in each
    question type's group, the unreduced model as the first bar of every panel."""
    plt = _pyplot()
    models = list(dict.fromkeys(r.model for r in rows))
    panels = {model: sorted({r.budget for r in rows if r.model == model and r.reducer != "none"}, reverse=True)
              for model in models}
    columns = max((len(b) for b in panels.values()), default=1) or 1
    fig, axes = plt.subplots(len(models), columns, figsize=(4.2 * columns, 3.6 * len(models)), squeeze=False)
    for axes_row, model in zip(axes, models):
        full = next(r for r in rows if r.model == model and r.reducer == "none")
        qtypes = list(full.scores.by_type())
        for ax, budget in zip(axes_row, panels[model] or [full.budget]):
            group = [full] + [r for r in rows if r.model == model and r.budget == budget and r.reducer != "none"]
            width = 0.8 / len(group)
            for i, row in enumerate(group):
                by_type = row.scores.by_type()
                heights = [by_type[q] for q in qtypes]
                intervals = [row.scores.interval(q) for q in qtypes]
                errors = [[max(h - low, 0.0) for h, (low, _) in zip(heights, intervals)],  # >= 0 despite rounding
                          [max(high - h, 0.0) for h, (_, high) in zip(heights, intervals)]]
                positions = [q + (i - (len(group) - 1) / 2) * width for q in range(len(qtypes))]
                ax.bar(positions, heights, width, yerr=errors, capsize=2,
                       label="all tokens" if row.reducer == "none" else row.reducer)
            ax.set_xticks(range(len(qtypes)), qtypes, fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{model}: {_budget_title(group[1:], budget) if len(group) > 1 else 'unreduced'}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=6)
        axes_row[0].set_ylabel("test accuracy (95% interval)")
        for ax in axes_row[len(panels[model] or [full.budget]):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(rows: Sequence[Row], out: Path, options: BenchmarkOptions, command: str) -> list[Path]:
    """shapes.csv, shapes.json, pareto.png and per_type.png under ``out``."""
    return [write_csv(rows, out / "shapes.csv"), write_json(rows, out / "shapes.json", options, command),
            plot_pareto(rows, out / "pareto.png"), plot_per_type(rows, out / "per_type.png")]
