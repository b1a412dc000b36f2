#!/usr/bin/env python
"""Every reducer at budgets of 256/128/64/32/16 visual tokens on the shipped shapes checkpoints.

For each model (``shapes-vit``, ``shapes-llava``), reducer (tome, evit, random, pool) and budget,
and DyMU at its shipped presets (with and without virtual unmerging on LLaVA):
test accuracy overall and per question type, agreement with the unreduced model's predictions,
FLOPs per image and latency measured side by side with the unreduced model. Writes
``results.csv`` and ``pareto.png`` (accuracy vs visual tokens and vs FLOPs) under ``--out``.
See :mod:`vtc.shapes_benchmark` for how each reducer reaches a budget.

With ``--cards`` it instead evaluates each model unreduced on the whole test split and compares
the result with its shipped ``card.json`` (overall and per-type accuracy, and the subset's
predictions example by example); ``--write-cards`` rewrites the cards from that evaluation.

    python scripts/eval_shapes.py --examples 1000 --out outputs/shapes
    python scripts/eval_shapes.py --models shapes-llava --spec "tome:r=16" --budgets 128 64
    python scripts/eval_shapes.py --cards                   # reproduce the shipped cards
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vtc.cli import positive_int, prepare_output, reducer_spec
from vtc.data import shapes
from vtc.data.evaluate import classifier_scores, vlm_scores
from vtc.models import zoo
from vtc.shapes_benchmark import BUDGETS, DYMU_PRESETS, REDUCERS, BenchmarkOptions, format_table, plot_pareto, run, write_csv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/shapes"))
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--models", nargs="+", default=["shapes-vit", "shapes-llava"])
    parser.add_argument("--reducers", nargs="+", default=list(REDUCERS), choices=REDUCERS)
    parser.add_argument("--budgets", nargs="+", type=positive_int, default=list(BUDGETS))
    parser.add_argument("--dymu-presets", nargs="*", default=list(DYMU_PRESETS), choices=DYMU_PRESETS,
                        help="shipped DyMU calibrations to run (none: skip DyMU)")
    parser.add_argument("--spec", action="append", default=[], type=reducer_spec,
                        help="an extra reducer spec to run on every model (repeatable)")
    parser.add_argument("--examples", type=positive_int, default=1000, help="test examples (the first ones)")
    parser.add_argument("--timing-batch", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=BenchmarkOptions.repeats)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--cards", action="store_true", help="check the shipped cards against a fresh evaluation")
    parser.add_argument("--write-cards", action="store_true", help="rewrite the shipped cards from a fresh evaluation")
    args = parser.parse_args(argv)
    if args.cards or args.write_cards:
        sys.exit(0 if all(check_card(name, args.write_cards) for name in args.models) else 1)
    out = prepare_output(parser, args.out, args.overwrite)
    options = BenchmarkOptions(examples=args.examples, budgets=args.budgets, reducers=args.reducers,
                               models=args.models, timing_batch=args.timing_batch, repeats=args.repeats,
                               progress=not args.no_progress, extra_specs=args.spec, dymu_presets=args.dymu_presets)
    try:
        rows = run(options)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_table(rows))
    print(f"\nwrote {write_csv(rows, out / 'results.csv')}\nwrote {plot_pareto(rows, out / 'pareto.png')}")


def check_card(name: str, write: bool) -> bool:
    """Evaluate ``name`` unreduced on the whole test split; print it beside its card (or write the
    card); True when they agree to the example."""
    ckpt = zoo.load(name)
    examples = shapes.examples("test", shapes.SPLITS["test"][1])
    scores = (vlm_scores(ckpt.model, ckpt.processor, examples, batch_size=100) if ckpt.kind == "llava"
              else classifier_scores(ckpt.model, examples))
    if write:
        card = zoo.write_card(ckpt.path, scores)
        print(f"{name}: wrote {ckpt.path / zoo.CARD}: {json.dumps(card['test_by_type'])}")
        return True
    fresh = {"test_accuracy": round(scores.accuracy, 4), "test_by_type": {k: round(v, 4) for k, v in scores.by_type().items()},
             "subset_predictions": scores.predicted[:zoo.SUBSET]}
    differing = [key for key, value in fresh.items() if ckpt.card.get(key) != value]
    print(f"{name}: test accuracy {fresh['test_accuracy']} (card {ckpt.card.get('test_accuracy')}), by type "
          f"{json.dumps(fresh['test_by_type'])}: " + (f"DIFFERS in {', '.join(differing)}" if differing else "matches the card"))
    return not differing


if __name__ == "__main__":
    main()
