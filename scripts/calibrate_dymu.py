#!/usr/bin/env python
"""Calibrate DyMU's per-layer merge thresholds for a model (DyMU paper, Sec. 3.1).

Runs the frozen encoder over calibration images with batch-level bipartite matching, averages
each layer's batch thresholds, measures the average token count the thresholds give on the
calibration images and on held-out images, and saves the calibration (thresholds.safetensors +
dymu.json) into --out, loadable with ``vtc.DyMU(calibration=<out>)``.

    python scripts/calibrate_dymu.py --model shapes-vit --preset mid --out models/checkpoints/shapes-vit/dymu-mid
    python scripts/calibrate_dymu.py --model timm:vit_base_patch16_224 --pretrained --images-dir photos/ --target 100 --out cal/
    accelerate launch --num_processes 2 scripts/calibrate_dymu.py --model hf:llava-hf/llava-1.5-7b-hf --pretrained \\
        --images-dir llava_sft_images/ --preset low --batch-size 64 --out cal/llava-low

Models: a shipped checkpoint name or folder (``shapes-vit``, ``shapes-llava``), ``timm:<name>``,
``open_clip:<name>[@<pretrained tag>]``, or ``hf:<hub id or folder>`` (CLIP / SigLIP vision models and LLaVA).
Hub weights are only fetched with --pretrained. Images: the shapes train split (shipped models,
default) or every image file under --images-dir, preprocessed as the model expects.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vtc.cli import positive_int
from vtc.dymu import PRESETS, SCHEDULES, calibrate

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Pixels(Dataset):
    """Preprocessed images, produced lazily: shapes examples or files through ``preprocess``."""

    def __init__(self, items: list, preprocess) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(self.items[index])


def load_model(spec: str, pretrained: bool):
    """(model, preprocess: PIL image or numpy array -> (C, H, W) tensor, is_shapes_model)."""
    from PIL import Image

    if not pretrained:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kind, _, name = spec.partition(":")
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=pretrained).eval()
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        return model, lambda image: transform(Image.fromarray(image) if not isinstance(image, Image.Image) else image), False
    if kind == "open_clip":
        import open_clip

        name, _, tag = name.partition("@")  # open_clip:ViT-B-32@openai
        if pretrained and not tag:
            raise SystemExit("open_clip weights need a tag: --model open_clip:<name>@<pretrained tag>")
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=tag if pretrained else None)
        return model.eval(), lambda image: transform(Image.fromarray(image) if not isinstance(image, Image.Image) else image), False
    if kind == "hf":
        import transformers as tf

        config = tf.AutoConfig.from_pretrained(name)
        if "llava" in config.model_type:
            model = tf.AutoModelForImageTextToText.from_pretrained(name).eval()
        else:
            model = tf.AutoModel.from_pretrained(name).eval()
        processor = tf.AutoImageProcessor.from_pretrained(name)
        return model, lambda image: processor(image, return_tensors="pt")["pixel_values"][0], False
    from vtc.data.training import pixels
    from vtc.models import zoo

    checkpoint = zoo.load(spec)
    return checkpoint.model, lambda image: pixels([image])[0], True


def image_items(args: argparse.Namespace, is_shapes: bool) -> tuple[list, list]:
    """(calibration items, held-out items): shapes images or image paths."""
    count, held = args.images, args.held_out
    if args.images_dir is None:
        if not is_shapes:
            raise SystemExit("--images-dir is needed for models other than the shipped shapes checkpoints")
        from vtc.data import shapes

        return ([e.image for e in shapes.examples("train", count)],
                [e.image for e in shapes.examples("val", held)])
    from PIL import Image

    files = sorted(p for p in Path(args.images_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < count + held:
        raise SystemExit(f"{args.images_dir} holds {len(files)} images; --images {count} + --held-out {held} needs more")
    opened = [lambda path=path: Image.open(path).convert("RGB") for path in files[: count + held]]
    return opened[:count], opened[count:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pretrained", action="store_true", help="allow downloading hub weights")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--preset", choices=list(PRESETS))
    goal.add_argument("--target", type=float, help="average patch tokens kept after the last layer")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant")
    parser.add_argument("--clamp", action="store_true", help="move merges a layer cannot make to earlier layers")
    parser.add_argument("--cap", type=float, default=None, help="per-image cap ratio (max_r_per_instance_ratio)")
    parser.add_argument("--images-dir", type=Path, default=None)
    parser.add_argument("--images", type=positive_int, default=4096, help="calibration images")
    parser.add_argument("--held-out", type=positive_int, default=500, help="held-out images for the realised count")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace a calibration already in --out")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    accelerator = Accelerator()
    model, preprocess, is_shapes = load_model(args.model, args.pretrained)
    model = model.to(accelerator.device)
    calibration_items, held_items = image_items(args, is_shapes)

    def loader(items: list) -> DataLoader:
        load = preprocess if is_shapes else (lambda item: preprocess(item()))
        return accelerator.prepare(DataLoader(Pixels(items, load), batch_size=args.batch_size, num_workers=0))

    try:
        result = calibrate(model, loader(calibration_items), args.preset or args.target, schedule=args.schedule,
                           batch_size=args.batch_size, cap=args.cap, clamp=args.clamp, held_out=loader(held_items),
                           progress=accelerator.is_main_process, accelerator=accelerator)
    except ValueError as error:
        parser.error(str(error))
    if accelerator.is_main_process:
        try:
            folder = result.save(args.out, overwrite=args.overwrite)
        except FileExistsError as error:
            parser.error(str(error))
        rounded = ", ".join(f"{t:.4f}" for t in result.thresholds)
        print(f"thresholds: {rounded}\nmerges per layer: {result.merges}")
        print(f"target {result.target:.1f} patch tokens; realised {result.realised:.1f} on the {result.images} "
              f"calibration images, {result.held_out:.1f} ± {result.held_out_std:.1f} on {args.held_out} held-out images")
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
