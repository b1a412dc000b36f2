"""Budget tuning of a shipped shapes checkpoint in one call, configured by :class:`TuneOptions`
(plain scalar fields, so that a command line can be built from them)."""

from __future__ import annotations

from dataclasses import dataclass

from vtc.tune.knobs import parse_knob, parse_target
from vtc.tune.plot import plot_pareto
from vtc.tune.points import Point
from vtc.tune.results import Results
from vtc.tune.search import TuneResult, search, smallest_budget
from vtc.tune.shapes import shapes_evaluator


@dataclass(frozen=True)
class TuneOptions:
    """Find the token budget of a shapes checkpoint that meets a target (tuned on val, not test)."""

    model: str = "shapes-vit"  # shipped checkpoint: shapes-vit (digit classifier) or shapes-llava (LLaVA)
    knobs: str = "tome:r=0..16:2"  # knob(s), space-separated, e.g. "evit:keep=0.3,0.5,0.7" or "tome:r=0..8:4 pool:tokens=64,128"
    target: str = "agreement>=0.98"  # agreement, accuracy or cosine >= VALUE, or kl<=VALUE
    split: str = "val"  # examples tuned on: val by default, so that test stays for the final report
    examples: int = 200  # examples scored at every point
    qtypes: str | None = None  # shapes-llava only: comma-separated question types (default: all)
    results: str = "tune.csv"  # results CSV (setup in tune.csv.json); a rerun resumes from it
    coarse_step: int = 4  # one knob: the coarse grid takes every this many values, both ends always
    trials: int | None = None  # several knobs: Optuna trials (needs optuna) instead of the full grid
    batch_size: int = 50  # examples per forward / generate call
    repeats: int = 0  # timed repeats per point, side by side with the unreduced model (0: no latency)
    plot: str | None = None  # PNG of every point measured for this setup and the Pareto front
    device: str = "cpu"  # where the model runs: cpu, cuda or cuda:N


def run(options: TuneOptions) -> TuneResult | list[Point]:
    """One knob: :func:`smallest_budget` meeting the target; several: :func:`search`'s Pareto front
    of visual tokens against the target's metric. Draws ``options.plot`` when given."""
    knobs = [parse_knob(text) for text in options.knobs.split()]
    if not knobs:
        raise ValueError("give at least one knob, e.g. 'tome:r=0..16:2'")
    target = parse_target(options.target)
    qtypes = None if options.qtypes is None else tuple(q.strip() for q in options.qtypes.split(","))
    evaluator = shapes_evaluator(options.model, options.split, options.examples, qtypes, options.batch_size, options.repeats,
                                 options.device)
    outcome: TuneResult | list[Point]
    if len(knobs) == 1:
        outcome = smallest_budget(evaluator, knobs[0], target, options.results, options.coarse_step)
    else:
        outcome = search(evaluator, knobs, options.results, options.trials, y=target.metric)
    if options.plot:
        plot_pareto(list(Results(options.results, evaluator.setup).points.values()), options.plot, y=target.metric,
                    target=target)
    return outcome
