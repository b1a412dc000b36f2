"""``vtc eval``: the shapes benchmark on the shipped checkpoints (:mod:`vtc.shapes_benchmark`), or
with ``--cards`` a check of their cards against a fresh evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtc.commands.common import add_device_options, positive_int, prepare_output, reducer_spec
from vtc.data import shapes
from vtc.data.evaluate import classifier_scores, vlm_scores
from vtc.models import zoo
from vtc.shapes_benchmark import BUDGETS, DYMU_PRESETS, REDUCERS, BenchmarkOptions, format_table, plot_pareto, run, write_csv

DESCRIPTION = """\
Every reducer at budgets of 256/128/64/32/16 visual tokens on the shipped shapes checkpoints.

For each model (shapes-vit, shapes-llava), reducer (tome, evit, random, pool; holov on the LLaVA)
and budget, and DyMU at its shipped presets (with and without virtual unmerging on LLaVA): test
accuracy overall and per question type with 95% intervals, agreement with the unreduced model's
predictions, FLOPs per image and latency measured side by side with the unreduced model. Writes
shapes.csv and pareto.png (accuracy against visual tokens and against FLOPs) under --out.

With --cards it instead evaluates each model unreduced on the whole test split and compares the
result with its shipped card.json (overall and per-type accuracy, and the subset's predictions
example by example); --write-cards rewrites the cards from that evaluation.

examples:
  vtc eval --examples 1000 --out outputs/shapes
  vtc eval --models shapes-llava --reducers holov pool --budgets 128 64
  vtc eval --models shapes-llava --spec "tome:r=16" --spec "dymu:preset=low|holov:k=64"
  vtc eval --cards                              # reproduce the shipped cards
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("eval", help="accuracy, fidelity, FLOPs and speed of every reducer on the shapes models",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/shapes"), metavar="DIR",
                        help="folder for shapes.csv and pareto.png (default outputs/shapes); a non-empty one gets a "
                             "new run-<timestamp> subfolder unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing its files")
    parser.add_argument("--models", nargs="+", default=["shapes-vit", "shapes-llava"], metavar="NAME",
                        help=f"shipped checkpoints ({', '.join(zoo.names())}; default both) or folders written by "
                             "the shapes training scripts, e.g. --models outputs/shapes-llava-r5")
    parser.add_argument("--reducers", nargs="*", default=list(REDUCERS), choices=REDUCERS, metavar="NAME",
                        help=f"reducers run at every budget: {', '.join(REDUCERS)} (default: all; holov acts only at "
                             f"the LLaVA connector; none: only --spec and DyMU)")
    parser.add_argument("--budgets", nargs="+", type=positive_int, default=list(BUDGETS), metavar="N",
                        help=f"visual tokens per image of 256 (default {' '.join(map(str, BUDGETS))})")
    parser.add_argument("--dymu-presets", nargs="*", default=list(DYMU_PRESETS), choices=DYMU_PRESETS, metavar="P",
                        help="shipped DyMU calibrations to run: low, mid, high (default all; none: skip DyMU)")
    parser.add_argument("--spec", action="append", default=[], type=reducer_spec, metavar="SPEC",
                        help="an extra reducer spec run on every model (repeatable), e.g. --spec tome:r=16")
    parser.add_argument("--examples", type=positive_int, default=1000, metavar="N",
                        help="test examples scored: the first N of the test split, every question type equally (default 1000)")
    parser.add_argument("--timing-batch", type=positive_int, default=16, metavar="N",
                        help="images per timed forward (default 16)")
    parser.add_argument("--repeats", type=positive_int, default=BenchmarkOptions.repeats, metavar="N",
                        help=f"timed repeats per configuration, interleaved with the unreduced model (default {BenchmarkOptions.repeats})")
    add_device_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    checks = parser.add_mutually_exclusive_group()
    checks.add_argument("--cards", action="store_true", help="check the shipped cards against a fresh evaluation (exit 1 if they differ)")
    checks.add_argument("--write-cards", action="store_true", help="rewrite the shipped cards from a fresh evaluation")
    parser.set_defaults(handler=run_eval)
    return parser


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.cards or args.write_cards:
        return 0 if all([check_card(name, args.write_cards, args.device) for name in args.models]) else 1
    options = BenchmarkOptions(examples=args.examples, budgets=args.budgets, reducers=args.reducers,
                               models=args.models, timing_batch=args.timing_batch, repeats=args.repeats,
                               progress=not args.no_progress, extra_specs=args.spec, dymu_presets=args.dymu_presets,
                               device=args.device, dtype=args.dtype)
    out = prepare_output(parser, args.out, args.overwrite)
    try:
        rows = run(options)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_table(rows))
    print(f"\nwrote {write_csv(rows, out / 'shapes.csv')}\nwrote {plot_pareto(rows, out / 'pareto.png')}")
    return 0


def check_card(name: str, write: bool, device: str = "cpu") -> bool:
    """Evaluate ``name`` unreduced on the whole test split; print it beside its card (or write the
    card); True when they agree to the example."""
    ckpt = zoo.load(name, device)
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
