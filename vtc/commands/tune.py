"""``vtc tune``: the smallest token budget meeting a target on a shapes checkpoint, or the Pareto
front of several knobs (:mod:`vtc.tune`); options built from :class:`vtc.tune.TuneOptions`."""

from __future__ import annotations

import argparse

from vtc.commands.common import DEVICE_FLAGS, positive_int
from vtc.commands.options import Flag, add_options, from_options
from vtc.tune import Point, TuneError, TuneOptions, run

DESCRIPTION = """\
Find the token budget of a shipped shapes checkpoint that meets a target, tuned on the val split
(test stays for the final report). One knob: a coarse grid over its values, then every value
between the smallest passing coarse point and the next smaller one (accuracy is not monotone in the
budget), reporting the budget found with its 95% interval and the next smaller budget on the grid,
which misses the target. Several knobs: the grid (or Optuna trials with --trials, when optuna is
installed) and the Pareto front of visual tokens against the target's metric. Every point goes to
--results (CSV, its setup beside it in RESULTS.json); an interrupted run given the same --results
continues without redoing finished points.

knobs: TEMPLATE=VALUES, VALUES as A..B, A..B:STEP or V1,V2,...

examples:
  vtc tune --model shapes-vit --knobs "tome:r=0..40:2" --target "agreement>=0.98"
  vtc tune --model shapes-llava --knobs "holov:k=16..256:16" --target "accuracy>=0.6" --plot holov.png
  vtc tune --model shapes-llava --knobs "tome:r=0..8:4 holov:k=32,64,128" --results search.csv
"""


# How the fields of TuneOptions appear as options (names, help and defaults come from the dataclass).
FLAGS = {
    "model": Flag(example="--model shapes-llava"),
    "knobs": Flag(example='--knobs "holov:k=16..256:16"'),
    "target": Flag(example='--target "accuracy>=0.9"'),
    "split": Flag(example="--split test for a final report"),
    "examples": Flag(type=positive_int, metavar="N", example="--examples 500"),
    "qtypes": Flag(example="--qtypes digit,position"),
    "results": Flag(example="--results outputs/tome-tune.csv"),
    "coarse_step": Flag(type=positive_int, metavar="N", example="--coarse-step 8"),
    "trials": Flag(type=positive_int, metavar="N", example="--trials 40"),
    "batch_size": Flag(type=positive_int, metavar="N", example="--batch-size 100"),
    "repeats": Flag(metavar="N", example="--repeats 5"),
    "plot": Flag(example="--plot tune.png"),
    **DEVICE_FLAGS,
}


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("tune", help="find the smallest token budget meeting an accuracy or fidelity target",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, TuneOptions, FLAGS)
    parser.set_defaults(handler=run_tune)
    return parser


def run_tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options = from_options(TuneOptions, args)
    try:
        outcome = run(options)
    except TuneError as error:
        print(f"vtc tune: {error}")
        return 1
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))
    if isinstance(outcome, list):
        print("Pareto front (visual tokens against the target's metric):")
        metric = options.target.split(">=")[0].split("<=")[0].strip()
        for point in outcome:
            print(f"  {Point.describe(point, metric)}")
    else:
        print(outcome)
    print(f"points: {options.results}" + (f"; plot: {options.plot}" if options.plot else ""))
    return 0
