#!/usr/bin/env python
"""DyMU speed: ViT throughput against the tokens reached (vs ToMe at the same average count), and
LLaVA prefill latency with virtual unmerging exact vs expand vs none, at the low / mid / high presets.

Images are shapes-benchmark test images (calibration on train images), resized to each model's
input, so token counts follow their content. Models without shipped calibrations are calibrated
here first (``vtc.dymu.calibrate`` at each preset's target; random weights unless --pretrained).

ViT (``--vit``): per preset, DyMU's mean ± std patch tokens leaving the encoder; ToMe with a
per-layer ``r`` giving the same mean (constant, with the merges a late layer cannot make moved to
earlier layers by ``merge_schedule(..., clamp=True)``); images/s of the unreduced model, DyMU (a
padded batch: every image pays the batch's widest sequence) and ToMe, timed interleaved.

Both as one padded batch (``--batch``) and one image at a time (``--singles`` images), where each
image runs at its own count.

LLaVA (``--llava``): ``scaled`` or ``7b`` (the LLaVA-1.5-7B-shaped random-weight models of
``bench_llava.py``) or ``shapes-llava`` (shipped); vision + prefill latency of the unreduced model
and DyMU with ``vtu=off``, ``expand`` and ``exact``, all in one interleaved loop, with prefill FLOPs.

    python scripts/bench_dymu.py --out outputs/bench_dymu
    python scripts/bench_dymu.py --device cuda --vit timm:vit_base_patch16_224 --llava 7b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import vtc
from vtc.commands.common import device, positive_int, prepare_output
from vtc.data import shapes
from vtc.data.training import pixels
from vtc.dymu import PRESETS, calibrate, load_calibration, merge_schedule, token_counts
from vtc.measure import time_calls
from vtc.measure_vlm import profile, time_stages
from vtc.records import device_description

sys.path.insert(0, str(Path(__file__).parent))
import bench_llava  # noqa: E402  (the 7B-shaped LLaVA builders)


def shapes_pixels(split: str, count: int, size: int, start: int = 0) -> torch.Tensor:
    """Shapes images in [-1, 1], resized to ``size``."""
    x = pixels([e.image for e in shapes.examples(split, count, start=start)])
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def presets_for(model, name: str | None, size: int, args) -> dict[str, tuple[float, ...]]:
    """Thresholds per preset: the shipped calibration of a zoo model, else calibrated here."""
    found = {}
    for preset in PRESETS:
        if name is not None:
            found[preset] = tuple(load_calibration(f"{name}/{preset}").thresholds)
            continue
        images = shapes_pixels("train", args.calibration_images, size).to(args.device, args.dtype)
        result = calibrate(model, images, preset, batch_size=32, clamp=True, progress=False)
        print(f"calibrated {preset}: target {result.target:.0f}, realised {result.realised:.1f}", flush=True)
        found[preset] = tuple(result.thresholds)
    return found


def bench_vit(args) -> list[dict]:
    import timm

    from vtc.models import zoo

    if args.vit.startswith("timm:"):
        model, name = timm.create_model(args.vit[5:], pretrained=args.pretrained), None
    else:
        ckpt = zoo.load(args.vit)
        model, name = ckpt.model, ckpt.name
    model = model.to(args.device, args.dtype).eval()
    size = model.patch_embed.img_size[0]
    thresholds = presets_for(model, name, size, args)
    images = shapes_pixels("test", args.batch, size).to(args.device, args.dtype)
    rows = []
    with vtc.apply(model) as plain:
        info = plain.adapter.info
    for preset, taus in thresholds.items():
        dymu = vtc.DyMU(thresholds=taus)
        counts = token_counts(model, dymu, images, batch_size=args.batch).float()
        mean = counts.mean().item()
        _, merges = merge_schedule(info, max(1.0, round(mean)), "constant", clamp=True)
        tome = vtc.ToMe(r=tuple(merges))
        with vtc.apply(model, tome) as handle, torch.inference_mode():
            model(images)
            tome_tokens = handle.state.num_tokens - info.n_prefix

        def under(reducer, batches):
            def call():
                with vtc.apply(model, *([reducer] if reducer else [])):
                    return [model(batch) for batch in batches]
            return call

        row = {"preset": preset, "dymu_tokens_mean": mean, "dymu_tokens_std": counts.std().item(), "tome_tokens": tome_tokens}
        for label, batches in (("batch", [images]), ("single", list(images[:args.singles].split(1)))):
            full_t, dymu_t, tome_t = time_calls([under(None, batches), under(dymu, batches), under(tome, batches)],
                                                warmup=1, repeats=args.repeats, device=images.device)
            seen = sum(batch.shape[0] for batch in batches)
            row.update({f"{label}_full_img_per_s": seen / full_t.median, f"{label}_dymu_img_per_s": seen / dymu_t.median,
                        f"{label}_tome_img_per_s": seen / tome_t.median})
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def llava_model(args):
    from vtc.models import zoo

    if args.llava in bench_llava.SHAPES:
        model = bench_llava.build_model(args.llava, args.dtype, args.device, seed=0)
        inputs = bench_llava.build_inputs(args.llava_batch, args.device, seed=0)
        inputs["pixel_values"] = shapes_pixels("test", args.llava_batch, bench_llava.IMAGE_SIZE).to(args.device, args.dtype)
        return model, inputs, None, bench_llava.IMAGE_SIZE
    ckpt = zoo.load(args.llava)
    examples = shapes.examples("test", args.llava_batch)
    inputs = ckpt.processor(images=[e.image for e in examples], text=[e.prompt for e in examples], padding=True,
                            return_tensors="pt")
    model = ckpt.model.to(args.device, args.dtype)
    inputs = {k: (v.to(args.device, args.dtype) if v.is_floating_point() else v.to(args.device)) for k, v in inputs.items()}
    return model, inputs, ckpt.name, shapes.IMAGE_SIZE


def bench_llava_vtu(args) -> list[dict]:
    model, inputs, name, size = llava_model(args)
    thresholds = presets_for(model, name, size, args)
    sets = [[]]
    labels = [("none", "-")]
    for preset, taus in thresholds.items():
        for vtu in ("off", "expand", "exact"):
            sets.append([vtc.DyMU(thresholds=taus, vtu=vtu)])
            labels.append((preset, vtu))
    reports = []
    for reducers in sets:
        with vtc.apply(model, *reducers):
            reports.append(profile(model, inputs, new_tokens=2, timed=False))
    seconds = time_stages(model, sets, inputs, new_tokens=2, warmup=1, repeats=args.repeats)
    base = seconds[0]["vision"] + seconds[0]["prefill"]
    rows = []
    for (preset, vtu), report, stage in zip(labels, reports, seconds):
        latency = stage["vision"] + stage["prefill"]
        rows.append({
            "preset": preset, "vtu": vtu, "visual_tokens_mean": statistics.fmean(report.visual_tokens),
            "prompt_tokens": statistics.fmean(report.prompt_tokens), "prefill_gflops": report.prefill.flops / 1e9,
            "prefill_flops_measured_over_predicted": report.prefill.flops_ratio,
            "vision_ms": stage["vision"] * 1e3, "prefill_ms": stage["prefill"] * 1e3,
            "vision_plus_prefill_speedup": base / latency,
        })
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit", default="shapes-vit", help="timm:<name> or a shipped checkpoint (default shapes-vit)")
    parser.add_argument("--llava", default="shapes-llava", help="scaled, 7b or a shipped checkpoint (default shapes-llava)")
    parser.add_argument("--skip", choices=("vit", "llava"), default=None)
    parser.add_argument("--pretrained", action="store_true", help="timm hub weights for --vit timm:<name>")
    parser.add_argument("--batch", type=positive_int, default=64, help="ViT images per batch")
    parser.add_argument("--singles", type=positive_int, default=8, help="ViT images also timed one at a time")
    parser.add_argument("--llava-batch", type=positive_int, default=1, help="LLaVA prompts per batch")
    parser.add_argument("--calibration-images", type=positive_int, default=512)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--device", type=device, metavar="DEV", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_dymu"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    out = prepare_output(parser, args.out, args.overwrite)
    setting = f"{device_description(args.device)}, {args.dtype}, torch {torch.__version__}, {args.repeats} interleaved repeats"
    result = {"setting": setting}
    text = [setting]
    if args.skip != "vit":
        result["vit"] = bench_vit(args)
        text += [f"\nViT {args.vit}, batch {args.batch}", table(result["vit"])]
    if args.skip != "llava":
        result["llava"] = bench_llava_vtu(args)
        text += [f"\nLLaVA {args.llava}, batch {args.llava_batch}", table(result["llava"])]
    (out / "bench_dymu.json").write_text(json.dumps(result, indent=2))
    (out / "bench_dymu.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
