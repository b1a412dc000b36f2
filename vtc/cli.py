"""The ``vtc`` command line. Subcommands: ``demo``.

    vtc demo                                   # shapes benchmark on the shipped trained models (offline)
    vtc demo --quick --out tmp                 # the same on 40 examples and 3 budgets
    vtc demo --models timm,open_clip           # ViTs on sample images, random weights
    vtc demo --models timm --pretrained        # real weights from the hub (needs internet once)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vtc.demo import MODELS, DemoError, DemoOptions, run
from vtc.spec import parse_reducer


class OutputDirError(ValueError):
    """``--out`` cannot be used as given."""


def reducer_spec(text: str) -> str:
    """argparse type: a reducer spec string, checked by the registry (clear message if bad)."""
    try:
        parse_reducer(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"bad reducer spec {text!r}: {error}") from None
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def output_dir(path: Path, overwrite: bool) -> tuple[Path, str | None]:
    """Where to write: ``path`` itself when it is new, empty or ``overwrite`` is set; otherwise a
    new ``run-<timestamp>`` subfolder, so existing files are never replaced without asking.
    Returns the folder (not yet created) and a note for the user, or None."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--out {path} exists and is not a folder")
    if overwrite or not path.exists() or not any(path.iterdir()):
        return path, None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = path / f"run-{stamp}", 1
    while candidate.exists():
        candidate, n = path / f"run-{stamp}-{n}", n + 1
    return candidate, (f"{path} is not empty: writing into {candidate} instead "
                       f"(pass --overwrite to write into {path} itself)")


def prepare_output(parser: argparse.ArgumentParser, path: Path, overwrite: bool) -> Path:
    """:func:`output_dir` for a script: a bad ``--out`` is a usage error, the note goes to stderr,
    and the folder is created."""
    try:
        out, note = output_dir(path, overwrite)
    except OutputDirError as error:
        parser.error(str(error))
    if note:
        print(note, file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    return out


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="every reducer at several token budgets on the shipped shapes models (or on timm / open_clip ViTs)",
        description=(
            "Default: the shapes benchmark on the checkpoints shipped with vtc (shapes-vit, a timm ViT classifier, "
            "and shapes-llava, an HF LLaVA), offline. For ToMe, EViT, random drop and pooling at budgets of 256/128/"
            "64/32/16 visual tokens it prints test accuracy per question type, agreement with the unreduced model, "
            "GFLOPs and speedup (timed interleaved with the unreduced model), and writes shapes.csv and pareto.png. "
            "With --models timm,open_clip: a timm vit_small_patch16_224 and an open_clip ViT-B-32 over sample images "
            "bundled with scikit-image (tokens per layer, GFLOPs, throughput, fidelity: top-1 agreement and KL for "
            "timm logits, cosine for CLIP embeddings), results.csv and one merge picture per reducer family; their "
            "weights are random unless --pretrained is given, so fidelity then shows only the mechanics."
        ),
    )
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("outputs/demo"),
                        help="folder for shapes.csv / pareto.png or results.csv and the PNG pictures (default: ./outputs/demo). "
                             "If it exists and is not empty, a new run-<timestamp> subfolder is used unless --overwrite.")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing shapes.csv / pareto.png / results.csv / input.png / "
                             "groups_*.png there (other files are left alone)")
    parser.add_argument("--pretrained", action="store_true",
                        help="load real weights (timm vit_small_patch16_224 augreg, open_clip ViT-B-32 "
                             "laion2b_s34b_b79k) from the Hugging Face hub; needs internet on first use")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test, timings rough: shapes on 40 examples at budgets 256/64/16; timm / open_clip as tiny "
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
                        help="shapes test examples to score (default 500, or 40 with --quick)")
    parser.add_argument("--device", metavar="DEV", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtc", description="vtc: visual-token compression for vision transformers")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_parser(commands)
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
        examples=args.examples,
    )
    try:
        run(options)
    except DemoError as error:
        print(f"vtc demo: error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vtc`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args, parser)


if __name__ == "__main__":
    sys.exit(main())
