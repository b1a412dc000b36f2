#!/usr/bin/env python
"""Every reducer at budgets of 256/128/64/32/16 visual tokens on the shipped shapes checkpoints.

For each model (``shapes-vit``, ``shapes-llava``), reducer (tome, evit, random, pool) and budget,
and DyMU at its shipped presets (with and without virtual unmerging on LLaVA):
test accuracy overall and per question type, agreement with the unreduced model's predictions,
FLOPs per image and latency measured side by side with the unreduced model. Writes
``results.csv`` and ``pareto.png`` (accuracy vs visual tokens and vs FLOPs) under ``--out``.
See :mod:`vtc.shapes_benchmark` for how each reducer reaches a budget.

    python scripts/eval_shapes.py --examples 1000 --out outputs/shapes
    python scripts/eval_shapes.py --models shapes-llava --spec "tome:r=16" --budgets 128 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vtc.cli import positive_int, prepare_output, reducer_spec
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
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
