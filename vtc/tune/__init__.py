"""Budget tuning: find the token budget for a model instead of reading a sweep table by eye.

    from vtc.tune import ClassifierEvaluator, parse_knob, parse_target, smallest_budget

    evaluator = ClassifierEvaluator(model, images, labels)          # or VLMEvaluator, shapes_evaluator
    result = smallest_budget(evaluator, parse_knob("tome:r=0..16:2"), parse_target("agreement>=0.98"), "tune.csv")
    print(result)          # the fewest visual tokens meeting the target, with its interval, and the
                           # next smaller budget on the grid, which misses it

- :mod:`~vtc.tune.knobs`: :class:`Knob` (a spec template and its values), :class:`Target`;
- :mod:`~vtc.tune.points`: :class:`Point` (one measured spec list), :func:`pareto`;
- :mod:`~vtc.tune.evaluator`, :mod:`~vtc.tune.classifier`, :mod:`~vtc.tune.vlm`,
  :mod:`~vtc.tune.shapes`: evaluators (spec list -> Point, against the unreduced model);
- :mod:`~vtc.tune.results`: the results CSV + setup sidecar a run resumes from;
- :mod:`~vtc.tune.plan`, :mod:`~vtc.tune.search`: :func:`sweep`, :func:`smallest_budget`, :func:`search`;
- :mod:`~vtc.tune.plot`: :func:`plot_pareto`; :mod:`~vtc.tune.options`: :class:`TuneOptions`, :func:`run`.
"""

from vtc.tune.classifier import ClassifierEvaluator
from vtc.tune.evaluator import Evaluator
from vtc.tune.knobs import Knob, Target, parse_knob, parse_target
from vtc.tune.options import TuneOptions, run
from vtc.tune.plot import plot_pareto
from vtc.tune.points import Point, pareto
from vtc.tune.results import TuneError
from vtc.tune.search import TuneResult, search, smallest_budget, sweep
from vtc.tune.shapes import shapes_evaluator
from vtc.tune.vlm import VLMEvaluator

__all__ = [
    "ClassifierEvaluator", "Evaluator", "Knob", "Point", "Target", "TuneError", "TuneOptions", "TuneResult",
    "VLMEvaluator", "parse_knob", "parse_target", "pareto", "plot_pareto", "run", "search", "shapes_evaluator",
    "smallest_budget", "sweep",
]
