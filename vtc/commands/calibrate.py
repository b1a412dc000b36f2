"""``vtc calibrate``: DyMU's per-layer merge thresholds for a model (DyMU paper, Sec. 3.1), over
the shapes images or a folder of the user's own, saved where ``vtc.DyMU(calibration=...)`` reads them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vtc.apply import apply
from vtc.commands.common import positive_int
from vtc.commands.models import FORMS, LoadedModel, ModelSpecError, add_model_options, load_model
from vtc.commands.options import Flag, add_parameters
from vtc.dymu import CONFIG, PRESETS, SCHEDULES, TENSORS, MergeScheduleError, calibrate, merge_schedule
from vtc.harness.folders import IMAGE_SUFFIXES, image_files

DESCRIPTION = f"""\
Calibrate DyMU's per-layer merge thresholds for a model (DyMU paper, Sec. 3.1).

Runs the frozen encoder over calibration images with batch-level bipartite matching, averages each
layer's batch thresholds, measures the average token count the thresholds give on the calibration
images and on held-out images, and saves the calibration (thresholds.safetensors + dymu.json) into
--out, loadable with vtc.DyMU(calibration=<out>) or the spec dymu:calibration=<out>.

Models: {FORMS}. Hub weights are only fetched with --pretrained; without it timm and open_clip
models have random weights and the calibration fits those weights only (it records no model id).
Images: the shapes train split (shipped shapes models, default) or every image file under
--images-dir, preprocessed as the model expects.

examples:
  vtc calibrate --model shapes-vit --preset mid --out models/checkpoints/shapes-vit/dymu-mid
  vtc calibrate --model timm:vit_base_patch16_224 --pretrained --images-dir photos/ --target 100 --out cal/
  accelerate launch --num_processes 2 -m vtc.cli calibrate --model hf:llava-hf/llava-1.5-7b-hf --pretrained \\
      --images-dir llava_sft_images/ --preset low --batch-size 64 --out cal/llava-low
"""


class Pixels(Dataset):
    """Preprocessed images, produced lazily: shapes examples or files through ``preprocess``."""

    def __init__(self, items: list, preprocess) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(self.items[index])


# The options that are parameters of vtc.dymu.calibrate: types and defaults from its signature.
CALIBRATE_FLAGS = {
    "schedule": Flag(choices=SCHEDULES, help="how the merges spread over the layers", example="--schedule linear"),
    "clamp": Flag(help="move merges a layer cannot make (more than half its tokens) to earlier layers; shallow "
                       "encoders need it for low targets", example="--preset low --clamp"),
    "cap": Flag(metavar="RATIO", help="per-image cap ratio on each layer's merges (the official "
                                      "max_r_per_instance_ratio)", example="--cap 2"),
    "batch_size": Flag(type=positive_int, metavar="N", help="images per batch and process", example="--batch-size 128"),
}


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("calibrate", help="DyMU merge thresholds for a model, on the shapes images or your own",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, "the model to calibrate")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--preset", choices=list(PRESETS),
                      help="target as a share of the patch tokens: " + ", ".join(f"{k} {v:.3g}" for k, v in PRESETS.items())
                           + ", e.g. --preset mid")
    goal.add_argument("--target", type=float, metavar="T", help="average patch tokens kept after the last layer, e.g. --target 100")
    add_parameters(parser, calibrate, CALIBRATE_FLAGS)
    parser.add_argument("--images-dir", type=Path, default=None, metavar="DIR",
                        help=f"calibrate on every image file under DIR ({', '.join(IMAGE_SUFFIXES)}); default: the shapes train split, "
                             "e.g. --images-dir photos/")
    parser.add_argument("--images", type=positive_int, default=4096, metavar="N", help="calibration images (default 4096), "
                                                                                       "e.g. --images 2048")
    parser.add_argument("--held-out", type=positive_int, default=500, metavar="N",
                        help="held-out images on which the realised token count is measured (default 500), e.g. --held-out 200")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder the calibration is written to, "
                                                                               "e.g. --out cal/vit-mid")
    parser.add_argument("--overwrite", action="store_true", help="replace a calibration already in --out, "
                                                                 "e.g. --out cal/vit-mid --overwrite")
    parser.set_defaults(handler=run_calibrate)
    return parser


def image_items(parser: argparse.ArgumentParser, args: argparse.Namespace, is_shapes: bool) -> tuple[list, list]:
    """(calibration items, held-out items): shapes images or image openers."""
    count, held = args.images, args.held_out
    if args.images_dir is None:
        if not is_shapes:
            parser.error("--images-dir is needed for models other than the shipped shapes checkpoints")
        from vtc.data import shapes

        return [e.image for e in shapes.examples("train", count)], [e.image for e in shapes.examples("val", held)]
    from PIL import Image

    if not args.images_dir.is_dir():
        parser.error(f"--images-dir {args.images_dir} is not a folder")
    files = list(image_files(args.images_dir))
    if len(files) < count + held:
        parser.error(f"--images-dir {args.images_dir} holds {len(files)} image files; --images {count} + --held-out "
                     f"{held} needs {count + held}")
    opened = [lambda path=path: Image.open(path).convert("RGB") for path in files[: count + held]]
    return opened[:count], opened[count:]


def check_schedule(parser: argparse.ArgumentParser, loaded: LoadedModel, args: argparse.Namespace) -> None:
    """Refuse a target the schedule cannot reach before any image is read."""
    with apply(loaded.model) as handle:
        info = handle.adapter.info
    try:
        merge_schedule(info, args.preset or args.target, args.schedule, args.clamp)
    except MergeScheduleError as error:
        parser.error(f"{error.problem}: raise --target, use --schedule linear, or pass --clamp")
    except ValueError as error:
        parser.error(str(error))


def run_calibrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.overwrite and any((args.out / name).exists() for name in (TENSORS, CONFIG)):
        parser.error(f"--out {args.out} already holds a DyMU calibration; pass --overwrite to replace it")
    try:
        from accelerate import Accelerator
    except ImportError:
        parser.error("vtc calibrate needs accelerate, which vtc's train extra installs: pip install 'vtc-vlm[train]'")
    try:
        loaded = load_model(args.model, args.pretrained)
    except ModelSpecError as error:
        parser.error(str(error))
    check_schedule(parser, loaded, args)
    calibration_items, held_items = image_items(parser, args, loaded.is_shapes)
    accelerator = Accelerator()
    model = loaded.model.to(accelerator.device)

    def loader(items: list) -> DataLoader:
        load = loaded.preprocess if loaded.is_shapes else (lambda item: loaded.preprocess(item()))
        return accelerator.prepare(DataLoader(Pixels(items, load), batch_size=args.batch_size, num_workers=0))

    try:
        result = calibrate(model, loader(calibration_items), args.preset or args.target, schedule=args.schedule,
                           batch_size=args.batch_size, cap=args.cap, clamp=args.clamp, held_out=loader(held_items),
                           progress=accelerator.is_main_process, accelerator=accelerator)
    except ValueError as error:
        parser.error(str(error))
    if loaded.random_weights:
        result.model_id = None  # random weights: no pretrained tag to claim
    if accelerator.is_main_process:
        folder = result.save(args.out, overwrite=args.overwrite)
        rounded = ", ".join(f"{t:.4f}" for t in result.thresholds)
        print(f"thresholds: {rounded}\nmerges per layer: {result.merges}")
        print(f"target {result.target:.1f} patch tokens; realised {result.realised:.1f} on the {result.images} "
              f"calibration images, {result.held_out:.1f} ± {result.held_out_std:.1f} on {args.held_out} held-out images")
        if loaded.random_weights:
            print("weights: random (no --pretrained): these thresholds fit this random initialisation only")
        print(f"wrote {folder}")
    return 0
