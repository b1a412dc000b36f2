#!/usr/bin/env python
"""DyMU speed: ViT throughput against the tokens reached (vs ToMe at the same average count), and
LLaVA prefill latency with virtual unmerging exact vs expand vs none, at the low / mid / high presets.

Images are shapes-benchmark test images (calibration on train images), resized to each model's
input, so token counts follow their content. Models without shipped calibrations are calibrated
here first (``vtc.dymu.calibrate`` at each preset's target; random weights unless --pretrained).

Encoders (``--vit``, one or more: ``timm:<name>``, ``tower:<shape>`` = the CLIP tower of a
``bench_llava.py`` LLaVA run to its feature layer, or a shipped checkpoint): per preset, DyMU's
mean ± std patch tokens leaving the encoder; ToMe with a per-layer ``r`` giving the same mean
(constant, with the merges a late layer cannot make moved to earlier layers by
``merge_schedule(..., clamp=True)``); the FLOPs cut of each (DyMU: each image's analytic FLOPs at
its own counts); images/s of the unreduced model, DyMU padded (every image pays the batch's
widest sequence), DyMU packed (only real tokens: ``execution="auto"``) and ToMe, timed
interleaved on one batch (``--batch``); speedups, efficiencies (speedup / FLOPs cut) and DyMU
packed's efficiency over ToMe's. ``--singles N`` also times N images one at a time.

LLaVA (``--llava``): ``scaled`` or ``7b`` (the LLaVA-1.5-7B-shaped random-weight models of
``bench_llava.py``) or ``shapes-llava`` (shipped); vision + prefill latency of the unreduced model
and DyMU with ``vtu=off``, ``expand`` and ``exact``, all in one interleaved loop, with prefill FLOPs.

    python scripts/bench_dymu.py --out outputs/bench_dymu
    python scripts/bench_dymu.py --vit timm:vit_small_patch16_224 tower:scaled --skip llava --batch 32
    python scripts/bench_dymu.py --device cuda --vit timm:vit_base_patch16_224 --llava 7b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import vtc
from vtc.commands.common import device, non_negative_int, positive_int, prepare_output
from vtc.data import shapes
from vtc.data.training import pixels
from vtc.dymu import PRESETS, calibrate, load_calibration, merge_schedule
from vtc.measure import analytic_flops, time_calls
from vtc.measure_vlm import profile, time_stages
from vtc.records import device_description

sys.path.insert(0, str(Path(__file__).parent))
import bench_llava  # noqa: E402  (the 7B-shaped LLaVA builders, the Markdown table)


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


@dataclass
class Encoder:
    """A model whose encoder is timed: how to run it under a handle, and its adapter."""

    label: str
    model: torch.nn.Module
    shipped: str | None  # zoo name whose calibrations are shipped, else None (calibrated here)
    size: int  # input side in pixels
    llava: bool  # a LLaVA, timed through its tower (DyMU without virtual unmerging)

    def run(self, handle, images: torch.Tensor) -> None:
        if self.llava:
            handle.adapter.encode_pixels(images)
        else:
            self.model(images)

    def adapter(self, handle):
        """The encoder adapter of a handle (a LLaVA's tower)."""
        return handle.adapter.tower if self.llava else handle.adapter


def load_encoder(spec: str, args) -> Encoder:
    """``timm:<name>``, ``tower:<shape>`` (the tower of a bench_llava.py LLaVA) or a shipped checkpoint."""
    import timm

    from vtc.models import zoo

    if spec.startswith("tower:"):
        model = bench_llava.build_model(spec[6:], args.dtype, args.device, seed=0)
        return Encoder(spec, model, None, bench_llava.IMAGE_SIZE, llava=True)
    if spec.startswith("timm:"):
        model, shipped = timm.create_model(spec[5:], pretrained=args.pretrained), None
    else:
        ckpt = zoo.load(spec)
        model, shipped = ckpt.model, ckpt.name
    model = model.to(args.device, args.dtype).eval()
    return Encoder(spec, model, shipped, model.patch_embed.img_size[0], llava=False)


def bench_vit(args) -> list[dict]:
    rows = []
    for spec in args.vit:
        encoder = load_encoder(spec, args)
        rows += bench_encoder(encoder, args)
    return rows


def bench_encoder(encoder: Encoder, args) -> list[dict]:
    """Per preset: DyMU padded and packed against ToMe at the same mean count, one interleaved loop."""
    model = encoder.model
    thresholds = presets_for(model, encoder.shipped, encoder.size, args)
    images = shapes_pixels("test", args.batch, encoder.size).to(args.device, args.dtype)
    with vtc.apply(model) as plain:
        info = encoder.adapter(plain).info
        full_flops = analytic_flops(encoder.adapter(plain)).total
    rows = []
    for preset, taus in thresholds.items():
        dymu = vtc.DyMU(thresholds=taus, vtu="off")
        with vtc.apply(model, dymu) as handle, torch.inference_mode():
            encoder.run(handle, images)
            adapter = encoder.adapter(handle)
            per_image = adapter.image_token_counts
            dymu_flops = statistics.fmean(analytic_flops(adapter, row.tolist()).total for row in per_image)
        counts = (per_image[:, -1] - info.n_prefix).float()
        _, merges = merge_schedule(info, max(1.0, round(counts.mean().item())), "constant", clamp=True)
        tome = vtc.ToMe(r=tuple(merges))
        with vtc.apply(model, tome) as handle, torch.inference_mode():
            encoder.run(handle, images)
            tome_tokens = handle.state.num_tokens - info.n_prefix
            tome_flops = analytic_flops(encoder.adapter(handle), handle.token_counts).total

        def under(reducer, batches, execution="auto"):
            def call():
                with vtc.apply(model, *([reducer] if reducer else []), execution=execution) as handle, torch.inference_mode():
                    for batch in batches:
                        encoder.run(handle, batch)
            return call

        row = {"model": encoder.label, "preset": preset, "dymu_tokens_mean": counts.mean().item(),
               "dymu_tokens_std": counts.std().item(), "dymu_tokens_max": int(counts.max()), "tome_tokens": tome_tokens,
               "dymu_flops_cut": full_flops / dymu_flops, "tome_flops_cut": full_flops / tome_flops}
        calls = [under(None, [images]), under(dymu, [images], "padded"), under(dymu, [images], "auto"), under(tome, [images])]
        full_t, padded_t, packed_t, tome_t = time_calls(calls, warmup=1, repeats=args.repeats, device=images.device)
        for label, timing in (("full", full_t), ("dymu_padded", padded_t), ("dymu_packed", packed_t), ("tome", tome_t)):
            row[f"{label}_img_per_s"] = args.batch / timing.median
        for label, timing, cut in (("dymu_padded", padded_t, row["dymu_flops_cut"]),
                                   ("dymu_packed", packed_t, row["dymu_flops_cut"]), ("tome", tome_t, row["tome_flops_cut"])):
            row[f"{label}_speedup"] = full_t.median / timing.median
            row[f"{label}_efficiency"] = row[f"{label}_speedup"] / cut
        row["packed_over_tome_efficiency"] = row["dymu_packed_efficiency"] / row["tome_efficiency"]
        if args.singles:
            singles = list(images[:args.singles].split(1))
            timings = time_calls([under(None, singles), under(dymu, singles), under(tome, singles)], warmup=1,
                                 repeats=args.repeats, device=images.device)
            for label, timing in zip(("full", "dymu", "tome"), timings):
                row[f"single_{label}_img_per_s"] = len(singles) / timing.median
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit", nargs="+", default=["shapes-vit"], metavar="ENCODER",
                        help="timm:<name>, tower:<shape> (a bench_llava.py LLaVA's tower) or a shipped checkpoint; "
                             "several are run one after the other (default shapes-vit)")
    parser.add_argument("--llava", default="shapes-llava", help="scaled, 7b or a shipped checkpoint (default shapes-llava)")
    parser.add_argument("--skip", choices=("vit", "llava"), default=None)
    parser.add_argument("--pretrained", action="store_true", help="timm hub weights for --vit timm:<name>")
    parser.add_argument("--batch", type=positive_int, default=64, help="ViT images per batch")
    parser.add_argument("--singles", type=non_negative_int, default=0, help="ViT images also timed one at a time (default 0: none)")
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
        text += [f"\nEncoders, batch {args.batch}", bench_llava.markdown_table(result["vit"], list(result["vit"][0]))]
    if args.skip != "llava":
        result["llava"] = bench_llava_vtu(args)
        text += [f"\nLLaVA {args.llava}, batch {args.llava_batch}", bench_llava.markdown_table(result["llava"], list(result["llava"][0]))]
    (out / "bench_dymu.json").write_text(json.dumps(result, indent=2))
    (out / "bench_dymu.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
