"""``vtc demo``: the main job on the bundled default (:mod:`vtc.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vtc.commands.common import OutputDirError, add_device_options, output_dir, positive_int, reducer_spec
from vtc.demo import MODELS, DemoError, DemoOptions, run


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "demo",
        help="every reducer at several token budgets on the shipped shapes models (or on timm / open_clip ViTs)",
        description=(
            "Default (a few minutes on 2 CPU cores): the shapes benchmark on the checkpoints shipped with vtc "
            "(shapes-vit, a timm ViT classifier, and shapes-llava, an HF LLaVA), offline, on 200 test examples: "
            "ToMe, EViT, random drop, pooling and HoloV at budgets of 256/64/16/4/1 visual tokens (a budget a "
            "reducer cannot reach is skipped and listed), the trained M3 and MQT on their own checkpoints "
            "(shapes-llava-m3, shapes-llava-mqt) at the same counts with M3's oracle, and DyMU at its mid "
            "preset. It prints test accuracy per question type with 95%% intervals, agreement with the unreduced "
            "model, GFLOPs and speedup (timed interleaved with the unreduced model), and writes shapes.csv, "
            "shapes.json (with versions and options), pareto.png and per_type.png. --full runs the whole "
            "benchmark (500 examples, budgets 256/128/64/32/16/4/1, every DyMU preset; about 40 minutes on 2 cores). "
            "With --models timm,open_clip: a timm vit_small_patch16_224 and an open_clip ViT-B-32 over sample images "
            "bundled with scikit-image (tokens per layer, GFLOPs, throughput, fidelity: top-1 agreement and KL for "
            "timm logits, cosine for CLIP embeddings), results.csv and one merge picture per reducer family; their "
            "weights are random unless --pretrained is given, so fidelity then shows only the mechanics."
        ),
    )
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("outputs/demo"),
                        help="folder for shapes.csv / shapes.json / pareto.png / per_type.png or results.csv and the PNG "
                             "pictures (default: ./outputs/demo). If it exists and is not empty, a new run-<timestamp> "
                             "subfolder is used unless --overwrite.")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing shapes.csv / shapes.json / pareto.png / per_type.png / "
                             "results.csv / input.png / groups_*.png there (other files are left alone)")
    parser.add_argument("--pretrained", action="store_true",
                        help="load real weights (timm vit_small_patch16_224 augreg, open_clip ViT-B-32 "
                             "laion2b_s34b_b79k) from the Hugging Face hub; needs internet on first use")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the whole shapes benchmark: 500 examples, budgets 256/128/64/32/16/4/1, DyMU low/mid/high "
                           "(about 40 minutes on 2 CPU cores), e.g. vtc demo --full")
    size.add_argument("--quick", action="store_true",
                        help="smoke test, timings rough: shapes on 40 examples at budgets 256/64/16/4/1; timm / open_clip as tiny "
                             "6-block models with one budget per reducer family; batch 4, 1 repeat")
    parser.add_argument("--batch", metavar="N", type=positive_int, default=None,
                        help="images per timed forward (default 8, or 4 with --quick); beyond the 8 bundled sample "
                             "images mirrored copies are used")
    parser.add_argument("--repeats", metavar="N", type=positive_int, default=None,
                        help="timed forwards per model and budget, after one warm-up (default 3, or 1 with --quick)")
    parser.add_argument("--reducer", dest="reducers", action="append", type=reducer_spec, metavar="SPEC",
                        help="reducer spec to measure instead of the built-in budgets, e.g. 'tome:r=13' or "
                             "'evit:keep=0.7' (repeatable; each must fit every model in --models)")
    parser.add_argument("--models", metavar="LIST", default="shapes-vit,shapes-llava",
                        help="comma-separated models to run: shapes-vit, shapes-llava (the shipped trained "
                             "checkpoints, the default) and/or timm, open_clip (sample images)")
    parser.add_argument("--examples", metavar="N", type=positive_int, default=None,
                        help="shapes test examples to score (default 200, 500 with --full, 40 with --quick)")
    add_device_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        parser.error(f"argument --models: unknown model(s) {', '.join(bad) or '(none given)'}; "
                     f"choose from {', '.join(MODELS)}")
    if args.quick and args.pretrained:
        parser.error("--quick uses tiny models without pretrained weights; use one of --quick and --pretrained")
    if args.pretrained and any(m.startswith("shapes-") for m in models):
        parser.error("--pretrained loads hub weights for timm / open_clip; the shapes models are shipped trained "
                     "(pass --models timm,open_clip)")
    try:
        out_dir, note = output_dir(args.out, args.overwrite)
    except OutputDirError as error:
        parser.error(str(error))
    if note:
        print(note)
    options = DemoOptions(
        out_dir=out_dir, quick=args.quick, pretrained=args.pretrained,
        batch=args.batch or (4 if args.quick else 8), repeats=args.repeats or (1 if args.quick else 3),
        reducers=args.reducers, models=models, device=args.device, progress=not args.no_progress,
        examples=args.examples, full=args.full, dtype=args.dtype,
    )
    try:
        run(options)
    except DemoError as error:
        print(f"vtc demo: error: {error}", file=sys.stderr)
        return 1
    return 0


