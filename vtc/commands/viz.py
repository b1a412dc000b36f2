"""``vtc viz``: merge / prune maps of encoder reducers (:func:`vtc.viz.save_groups`) on the user's
images: every merged group in its own colour, dropped patches greyed out."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from vtc.apply import apply, run_encoder
from vtc.commands.common import add_device_options, prepare_output, reducer_spec
from vtc.commands.models import FORMS, ModelSpecError, add_model_options, load_model
from vtc.viz import save_groups

DESCRIPTION = f"""\
Draw what encoder reducers (ToMe, EViT, DyMU, random, pool inside the encoder) do to each image:
one PNG per image and reducer, every merged group in its own colour, dropped patches greyed out.
The picture is the model's own input (after its resize and crop), contrast-stretched.

Models: {FORMS}.

examples:
  vtc viz --model shapes-vit --reducer tome:r=16 --reducer dymu:preset=mid --out maps/
  vtc viz --model timm:vit_small_patch16_224 --pretrained --image cat.jpg --reducer evit:keep=0.5 --out maps/
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("viz", help="merge / prune maps of encoder reducers on your images",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, "the model")
    parser.add_argument("--reducer", dest="reducers", action="append", type=reducer_spec, required=True, metavar="SPEC",
                        help="an encoder reducer spec (repeatable), e.g. --reducer tome:r=16")
    parser.add_argument("--image", dest="images", action="append", type=Path, metavar="FILE",
                        help="an image file (repeatable); default: the first 4 shapes test images (shapes models only), "
                             "e.g. --image cat.jpg --image dog.png")
    parser.add_argument("--out", type=Path, default=Path("outputs/viz"), metavar="DIR",
                        help="folder for <image>_<reducer>.png (default outputs/viz); a non-empty one gets a new "
                             "run-<timestamp> subfolder unless --overwrite, e.g. --out maps/")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, e.g. --out maps/ --overwrite")
    add_device_options(parser, dtypes=False)
    parser.set_defaults(handler=run_viz)
    return parser


MIN_SIDE = 256  # smaller inputs are drawn enlarged (nearest neighbour), so the groups are visible


def _display(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) model input stretched to [0, 1] for drawing (normalisation undone up to contrast),
    enlarged by a whole factor to at least :data:`MIN_SIDE` pixels."""
    low, high = pixels.min(), pixels.max()
    picture = ((pixels - low) / (high - low).clamp(min=1e-6)).float()
    factor = -(-MIN_SIDE // min(picture.shape[-2:]))
    return torch.nn.functional.interpolate(picture[None], scale_factor=factor, mode="nearest")[0] if factor > 1 else picture


def run_viz(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        loaded = load_model(args.model, args.pretrained)
    except ModelSpecError as error:
        parser.error(str(error))
    if args.images:
        missing = [str(p) for p in args.images if not p.is_file()]
        if missing:
            parser.error(f"--image: no such file: {', '.join(missing)}")
        named = [(p.stem, Image.open(p).convert("RGB")) for p in args.images]
    elif loaded.is_shapes:
        from vtc.data import shapes

        named = [(f"shapes-test-{e.index}", Image.fromarray(e.image)) for e in shapes.examples("test", 4)]
    else:
        parser.error("--image is needed for models other than the shipped shapes checkpoints")
    model = loaded.model.to(args.device)
    pixels = torch.stack([loaded.preprocess(image) for _, image in named])
    out = prepare_output(parser, args.out, args.overwrite)
    for spec in args.reducers:
        try:
            with torch.inference_mode(), apply(model, spec) as handle:
                state, grid = run_encoder(handle, pixels), handle.adapter.info.grid
        except (TypeError, ValueError) as error:
            parser.error(f"--reducer {spec}: {error}")
        label = spec.replace(":", "_").replace(",", "_").replace("=", "-")
        for index, (name, _) in enumerate(named):
            path = save_groups(out / f"{name}_{label}.png", _display(pixels[index]), state, grid, image_index=index)
            print(f"wrote {path}")
    return 0
