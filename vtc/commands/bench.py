"""``vtc bench``: reducers measured side by side with the unreduced encoder (:func:`vtc.measure.compare`):
tokens, FLOPs, latency, throughput and fidelity, as a table, CSV and JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vtc.commands.common import add_device_options, positive_int, prepare_output, reducer_spec
from vtc.commands.models import FORMS, LoadedModel, ModelSpecError, add_model_options, load_model
from vtc.commands.options import Flag, add_parameters
from vtc.harness.folders import IMAGE_SUFFIXES, image_files
from vtc.harness.zero_shot import image_embeddings
from vtc.measure import compare
from vtc.records import environment, write_records

COLUMNS = ("model", "reducer", "tokens_out", "gflops", "flops_ratio", "latency_ms", "throughput_img_s", "speedup",
           "top1_agreement", "kl", "cosine", "batch", "warmup", "repeats", "device", "dtype")
DESCRIPTION = f"""\
Measure reducers on a vision encoder side by side with the unreduced model, timed in one
interleaved loop: tokens leaving the encoder, analytic GFLOPs per image, latency and throughput,
speedup, and fidelity (top-1 agreement and KL of logits, cosine of embeddings). Writes bench.csv
and bench.json (with the exact spec strings, model, versions and machine) under --out.

Models: {FORMS} (vision encoders; for LLaVA timing see vtc eval on shapes-llava and
scripts/bench_llava.py). Images: --images-dir, or the shapes test images for shapes models.

examples:
  vtc bench --model shapes-vit --reducer tome:r=16 --reducer dymu:preset=mid
  vtc bench --model timm:vit_base_patch16_224 --images-dir photos/ --reducer tome:r=13 --batch 32 --device cuda --dtype bfloat16
"""


# The options that are parameters of vtc.measure.compare: types and defaults from its signature.
COMPARE_FLAGS = {
    "warmup": Flag(type=int, metavar="N", help="untimed forwards of each model before timing", example="--warmup 5"),
    "repeats": Flag(type=positive_int, metavar="N", help="timed forwards per reducer, interleaved with the unreduced model",
                    example="--repeats 30"),
}


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("bench", help="tokens, FLOPs, latency and fidelity of reducers on a vision encoder",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, "the encoder")
    parser.add_argument("--reducer", dest="reducers", action="append", type=reducer_spec, required=True, metavar="SPEC",
                        help="a reducer spec (repeatable), e.g. --reducer tome:r=13")
    parser.add_argument("--images-dir", type=Path, metavar="DIR", help="image files to run (default: shapes test images), "
                                                                       "e.g. --images-dir photos/")
    parser.add_argument("--batch", type=positive_int, default=8, metavar="N", help="images per timed forward (default 8), e.g. --batch 32")
    add_parameters(parser, compare, COMPARE_FLAGS)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), metavar="DIR",
                        help="folder for bench.csv / bench.json (default outputs/bench); a non-empty one gets a new "
                             "run-<timestamp> subfolder unless --overwrite, e.g. --out outputs/bench-tome")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, e.g. --out outputs/bench --overwrite")
    add_device_options(parser)
    parser.set_defaults(handler=run_bench)
    return parser


def encoder_forward(model: nn.Module):
    """What fidelity compares: logits (timm, a classifier), the image embedding (open_clip, HF CLIP /
    SigLIP) or the pooled output (HF vision models)."""
    if hasattr(model, "encode_image") or hasattr(model, "get_image_features"):
        return image_embeddings
    if hasattr(model, "config") and hasattr(model, "vision_model"):
        return lambda m, x: m(pixel_values=x).pooler_output
    return lambda m, x: m(x)


def _images(parser: argparse.ArgumentParser, args: argparse.Namespace, loaded: LoadedModel) -> torch.Tensor:
    if args.images_dir is not None:
        if not args.images_dir.is_dir():
            parser.error(f"--images-dir {args.images_dir} is not a folder")
        files = list(image_files(args.images_dir))[: args.batch]
        if not files:
            parser.error(f"--images-dir {args.images_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        pictures = [Image.open(p).convert("RGB") for p in files]
    elif loaded.is_shapes:
        from vtc.data import shapes

        pictures = [Image.fromarray(e.image) for e in shapes.examples("test", args.batch)]
    else:
        parser.error("--images-dir is needed for models other than the shipped shapes checkpoints")
    batch = [loaded.preprocess(p) for p in pictures]
    return torch.stack([batch[i % len(batch)] for i in range(args.batch)])  # repeated up to --batch


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        loaded = load_model(args.model, args.pretrained)
    except ModelSpecError as error:
        parser.error(str(error))
    if loaded.processor is not None:
        parser.error(f"--model {args.model} is a vision-language model; vtc bench measures vision encoders "
                     "(LLaVA: vtc eval --models shapes-llava, or scripts/bench_llava.py)")
    model = loaded.model.to(args.device, args.dtype)
    images = _images(parser, args, loaded).to(args.device, args.dtype)
    out = prepare_output(parser, args.out, args.overwrite)
    records = []
    for spec in args.reducers:
        try:
            result = compare(model, spec, images, warmup=args.warmup, repeats=args.repeats, forward=encoder_forward(model))
        except (TypeError, ValueError) as error:
            parser.error(f"--reducer {spec}: {error}")
        records.append({
            "model": args.model, "reducer": spec, "tokens_out": result.token_counts[-1],
            "gflops": f"{result.flops / 1e9:.4f}", "flops_ratio": f"{result.flops_ratio:.4f}",
            "latency_ms": f"{result.latency.median * 1e3:.3f}", "throughput_img_s": f"{result.throughput:.2f}",
            "speedup": f"{result.speedup:.3f}", "top1_agreement": f"{result.fidelity.top1_agreement:.4f}",
            "kl": f"{result.fidelity.kl:.6f}", "cosine": f"{result.fidelity.cosine:.6f}", "batch": args.batch,
            "warmup": args.warmup, "repeats": args.repeats, "device": args.device, "dtype": str(args.dtype).removeprefix("torch.")})
        row = records[-1]
        print(f"{spec:28s} tokens {row['tokens_out']:>4}  FLOPs x{row['flops_ratio']}  {row['throughput_img_s']} img/s  "
              f"speedup {row['speedup']}x  agreement {row['top1_agreement']}  cosine {row['cosine']}")
    write_records(out / "bench.csv", COLUMNS, records)
    (out / "bench.json").write_text(json.dumps({
        "command": "vtc bench", "model": args.model, "pretrained": args.pretrained, "rows": records, **environment(),
    }, indent=2) + "\n")
    print(f"wrote {out / 'bench.csv'}\nwrote {out / 'bench.json'}")
    return 0
