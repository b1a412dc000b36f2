"""The tuning operations: :func:`sweep` (every value of a knob), :func:`smallest_budget` (the fewest
visual tokens meeting a target, coarse grid then refinement, :mod:`vtc.tune.plan`) and
:func:`search` (several knobs at once: the full grid, or an Optuna study; the Pareto front).
Every point goes through the results file, so an interrupted run resumes where it stopped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vtc.tune.evaluator import Evaluator
from vtc.tune.knobs import METRICS, Knob, Target
from vtc.tune.plan import best_by_metric, coarse_indices, grid, meets, refine_indices, smallest_passing
from vtc.tune.points import COSTS, Point, label, pareto
from vtc.tune.results import Results, TuneError


def cached_point(evaluator: Evaluator, specs: tuple[str, ...], results: Results) -> Point:
    """The point of ``specs``: from ``results`` when finished before, else evaluated and recorded."""
    point = results.get(specs)
    if point is None:
        try:
            point = evaluator(list(specs))
        except ValueError as error:  # e.g. a combination of knob values the model cannot take
            raise TuneError(f"{label(specs)}: {error}") from error
        if point.specs != specs:
            raise TuneError(f"the evaluator returned a point for {point.label!r} when asked for {label(specs)!r}")
        results.add(point)
    return point


def sweep(evaluator: Evaluator, knob: Knob, results: str | Path) -> list[Point]:
    """The unreduced point, then every value of ``knob`` in its order."""
    store = Results(results, evaluator.setup)
    return [cached_point(evaluator, specs, store) for specs in [(), *((spec,) for spec in knob.specs)]]


@dataclass(frozen=True)
class TuneResult:
    """What :func:`smallest_budget` found; ``below`` is checkable proof that the next smaller budget
    on the grid misses the target."""

    target: Target  # what the budget had to reach
    best: Point  # the fewest visual tokens meeting the target
    below: Point | None  # the evaluated grid point with the next fewer tokens (misses the target); None: best is the smallest
    unreduced: Point  # the model without reducers, on the same examples
    points: tuple[Point, ...]  # every knob point evaluated (coarse grid and refinement), fewest tokens first

    def __str__(self) -> str:
        metric = self.target.metric
        lines = [f"smallest budget meeting {self.target}: {self.best.describe(metric)}",
                 f"  FLOPs {self.best.flops_ratio:.3f}x of the unreduced model ({self.unreduced.describe(metric)})"]
        if self.below is None:
            lines.append("  it is the smallest budget on the grid")
        else:
            lines.append(f"  next smaller budget on the grid misses it: {self.below.describe(metric)}")
        return "\n".join(lines)


def smallest_budget(evaluator: Evaluator, knob: Knob, target: Target, results: str | Path, coarse_step: int = 4) -> TuneResult:
    """The value of ``knob`` with the fewest measured visual tokens whose point meets ``target``.

    Evaluates the unreduced model, a coarse grid (every ``coarse_step``-th value, both ends), then
    every value between the passing coarse point with the fewest tokens and the coarse point with
    the next fewer tokens; answers with the passing point with the fewest tokens among all of
    them. Raises :class:`TuneError` naming the best point found when none meets the target.
    """
    store = Results(results, evaluator.setup)
    unreduced = cached_point(evaluator, (), store)
    unreduced.metric(target.metric)  # refuses a metric this evaluator does not measure, before the grid
    specs = knob.specs
    evaluated = {i: cached_point(evaluator, (specs[i],), store) for i in coarse_indices(len(specs), coarse_step)}
    plan = refine_indices({i: (p.visual_tokens, meets(p, target)) for i, p in evaluated.items()})
    evaluated.update({i: cached_point(evaluator, (specs[i],), store) for i in plan})
    points = sorted(evaluated.values(), key=lambda p: p.visual_tokens)
    best, below = smallest_passing(points, target)
    if best is None:
        raise TuneError(f"none of the {len(points)} values of {knob} evaluated (coarse step {coarse_step}, both ends) "
                        f"meets {target}; best point found: {best_by_metric(points, target.metric).describe(target.metric)}; "
                        f"unreduced model: {unreduced.describe(target.metric)}")
    return TuneResult(target, best, below, unreduced, tuple(points))


def search(evaluator: Evaluator, knobs: Sequence[Knob], results: str | Path, trials: int | None = None,
           x: str = "visual_tokens", y: str = "agreement", seed: int = 0) -> list[Point]:
    """Several knobs at once (reducers at sites that compose); the Pareto front of ``x`` (a cost,
    minimised) against ``y`` (a metric), the unreduced point included.

    Without ``trials`` every combination is evaluated; with ``trials`` an Optuna multi-objective
    study (TPE, ``seed``) picks that many combinations (needs ``optuna``; repeats are read back
    from the results file, not evaluated again).
    """
    if not knobs:
        raise ValueError("search needs at least one knob")
    if x not in COSTS or y not in METRICS:
        raise ValueError(f"x must be one of {', '.join(COSTS)} and y one of {', '.join(METRICS)}; got {x!r}, {y!r}")
    store = Results(results, evaluator.setup)
    points = [cached_point(evaluator, (), store)]
    if trials is None:
        points += [cached_point(evaluator, specs, store) for specs in grid(knobs)]
    else:
        points += _study(evaluator, knobs, store, trials, x, y, seed)
    return pareto(list({p.specs: p for p in points}.values()), x, y)


def _study(evaluator: Evaluator, knobs: Sequence[Knob], store: Results, trials: int, x: str, y: str, seed: int) -> list[Point]:
    try:
        import optuna
    except ImportError:
        raise ImportError("search(..., trials=N) runs an Optuna study and needs optuna (pip install optuna); "
                          "leave trials unset to evaluate the full grid") from None
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    points = []

    def objective(trial) -> tuple[float, float]:
        specs = tuple(knob.spec(trial.suggest_categorical(f"knob{i}: {knob.template}", list(knob.values)))
                      for i, knob in enumerate(knobs))
        point = cached_point(evaluator, specs, store)
        points.append(point)
        return point.metric(x), point.metric(y)

    directions = ["minimize", "maximize" if METRICS[y] == ">=" else "minimize"]
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return points
