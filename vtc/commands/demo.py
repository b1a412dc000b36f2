"""``vtc demo``: the main job on the bundled default (:mod:`vtc.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vtc.commands.common import DEVICE_FLAGS, OutputDirError, output_dir, positive_int, reducer_spec
from vtc.commands.options import Flag, add_options, from_options
from vtc.demo import MODELS, DemoError, DemoOptions, run


def model_list(text: str) -> list[str]:
    """argparse type: comma-separated model names."""
    return [m.strip() for m in text.split(",") if m.strip()]


# How the fields of DemoOptions appear as options (names, help and defaults come from the dataclass).
FLAGS = {
    "pretrained": Flag(example="--models timm,open_clip --pretrained"),
    "batch": Flag(type=positive_int, metavar="N", example="--batch 16"),
    "repeats": Flag(type=positive_int, metavar="N", example="--repeats 5"),
    "reducers": Flag(name="--reducer", type=reducer_spec, repeat=True, metavar="SPEC",
                     example="--reducer tome:r=13 --reducer evit:keep=0.7 (repeatable)"),
    "models": Flag(type=model_list, whole=True, metavar="LIST", example="--models timm,open_clip"),
    "examples": Flag(type=positive_int, metavar="N", example="--examples 100"),
    **DEVICE_FLAGS,
    "seed": Flag(metavar="N", example="--seed 1"),
    "progress": Flag(example="--no-progress for a log file"),
    "full": Flag(example="vtc demo --full"),
    "quick": Flag(example="vtc demo --quick"),
}


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "demo",
        help="every reducer at several token budgets on the shipped shapes models (or on timm / open_clip ViTs)",
        description=(
            "Default (a few minutes on 2 CPU cores): the shapes benchmark on the checkpoints shipped with vtc "
            "(shapes-vit, a timm ViT classifier, and shapes-llava, an HF LLaVA), offline, on 200 test examples: "
            "ToMe, EViT, random drop, pooling and HoloV at budgets of 256/64/16/4/1 visual tokens (a budget a "
            "reducer cannot reach is skipped and listed), the trained M3 and MQT on their own checkpoints "
            "(shapes-llava-m3, shapes-llava-mqt) at the same counts with M3's oracle, the visual exit after every "
            "LLM layer and DyVTE with the routers shipped for shapes-llava (mean exit layer, KV-cache ratio), and "
            "DyMU at its mid preset. It prints test accuracy per question type with 95%% intervals, agreement with the unreduced "
            "model, GFLOPs and speedup (timed interleaved with the unreduced model), and writes shapes.csv, "
            "shapes.json (with versions and options), pareto.png and per_type.png. --full runs the whole "
            "benchmark (500 examples, budgets 256/128/64/32/16/4/1, every DyMU preset; about 9 minutes on 2 cores). "
            "With --models timm,open_clip: a timm vit_small_patch16_224 and an open_clip ViT-B-32 over sample images "
            "bundled with scikit-image (tokens per layer, GFLOPs, throughput, fidelity: top-1 agreement and KL for "
            "timm logits, cosine for CLIP embeddings), results.csv and one merge picture per reducer family; their "
            "weights are random unless --pretrained is given, so fidelity then shows only the mechanics."
        ),
    )
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("outputs/demo"),
                        help="folder for shapes.csv / shapes.json / pareto.png / per_type.png or results.csv and the PNG "
                             "pictures (default: ./outputs/demo). If it exists and is not empty, a new run-<timestamp> "
                             "subfolder is used unless --overwrite, e.g. --out outputs/demo-2")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing shapes.csv / shapes.json / pareto.png / per_type.png / "
                             "results.csv / input.png / groups_*.png there (other files are left alone), "
                             "e.g. --out outputs/demo --overwrite")
    add_options(parser, DemoOptions, FLAGS, only=FLAGS, skip=("full", "quick"), unset=True, title="what the demo runs")
    size = parser.add_mutually_exclusive_group()
    add_options(size, DemoOptions, FLAGS, only=("full", "quick"), unset=True)
    parser.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    models = args.models if args.models is not None else list(DemoOptions.models)
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
    options = from_options(DemoOptions, args, out_dir=out_dir)
    try:
        run(options)
    except DemoError as error:
        print(f"vtc demo: error: {error}", file=sys.stderr)
        return 1
    return 0


