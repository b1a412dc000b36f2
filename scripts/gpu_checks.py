#!/usr/bin/env python
"""One prepared GPU run: every GPU measurement issue 19 asks for, on one H100 / H200 in under 8 minutes.

Sections (``--sections``, all by default), each under its own time budget; a section that fails or
runs past its budget is recorded with its error and the others still run:

- ``kernels``: one ToMe merge step (r = N/8) at (64, 577, 1024) and (64, 197, 768) in bf16:
  vtc's PyTorch reference, vtc's Triton kernels (autotuned) and ToMe's formulation, timed
  interleaved, with the least bytes a fused step moves over the time as a fraction of the GPU's
  peak HBM bandwidth, the Triton output's largest difference from the reference, and the share of
  the step spent in the merge's slot sort + bincount (``scripts/bench_kernels.py``'s steps).
- ``varlen``: block-diagonal attention of a packed batch (64 images of 25-197 tokens, ViT-B heads,
  bf16): padded SDPA, one SDPA per image, nested-tensor SDPA and compiled FlexAttention
  (``scripts/bench_varlen.py``), which says whether packed execution's CUDA default is the right one.
- ``vit``: timm ``vit_base_patch16_224`` (random weights, bf16) at batch 64 on shapes-benchmark
  test images: images/s unreduced, ToMe r=13 and DyMU calibrated (on shapes train images) to the
  patch tokens ToMe r=13 leaves (so both merge ~13 tokens a layer on average), DyMU both padded
  and packed (nested-tensor attention), each on its own copy of the model, timed interleaved;
  tokens per layer, analytic FLOPs per image (each at its own counts) and efficiency (speedup
  over FLOPs cut).
- ``llava_prefill``: the LLaVA-1.5-7B-shaped model of ``scripts/bench_llava.py`` (random weights,
  bf16), batch 8, at 576 / 192 / 64 visual tokens (``pool`` at the connector): prefill FLOPs
  (counted and analytic), vision and prefill milliseconds, achieved prefill TFLOP/s, the speedup of
  vision + prefill (median of per-repeat paired ratios), KV cache and peak memory.
- ``llava_e2e``: greedy ``generate()`` of exactly 32 tokens on the same model at batch 1 and 8,
  unreduced and ``pool`` at 64 / 144 / 192 tokens (``bench_llava.py --e2e``'s rows).

Writes ``gpu_checks.json`` (environment, command, plan, per-section results, errors and seconds;
rewritten after every section) and ``gpu_checks.md`` into ``--out``. ``--dry-run`` runs the same code
on the CPU at tiny shapes in seconds (a test of the script, not a measurement); without it the
script refuses to run when no CUDA GPU is present. Exit status 1 when a section failed.

Example:
    python scripts/gpu_checks.py --out outputs/gpu_checks
    python scripts/gpu_checks.py --dry-run --out /tmp/gpu_checks_dry
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import vtc
from vtc.commands.common import device as device_type
from vtc.commands.common import prepare_output
from vtc.dymu import calibrate
from vtc.kernels import triton_available
from vtc.measure import image_flops, patch_tokens, time_calls
from vtc.measure_vlm import profile, time_stages
from vtc.records import device_description, environment
from vtc.stats import speedup_spread

sys.path.insert(0, str(Path(__file__).parent))
import bench_dymu  # noqa: E402  (shapes images for the ViT)
import bench_kernels  # noqa: E402  (the merge steps and the bandwidth arithmetic)
import bench_llava  # noqa: E402  (the 7B-shaped LLaVA and the end-to-end rows)
import bench_varlen  # noqa: E402  (the block-diagonal attention backends)

SECTIONS = ("kernels", "varlen", "vit", "llava_prefill", "llava_e2e")
DTYPE = torch.bfloat16
R_FRACTION = 0.125  # merges per kernel step, as in bench_kernels.py
TOME_R = 13
VIT = "vit_base_patch16_224"


@dataclass
class Plan:
    """Shapes, repeats and per-section budgets (seconds) of one run."""

    kernel_shapes: list[tuple[int, int, int]]
    kernel_warmup: int
    kernel_repeats: int
    varlen_images: int
    varlen_longest: int
    varlen_heads: int
    varlen_flex: bool
    vit_overrides: dict  # timm.create_model keyword arguments (the dry run's tiny ViT)
    vit_batch: int
    calibration_images: int
    vit_warmup: int
    vit_repeats: int
    llava_shape: str
    prefill_batch: int
    prefill_tokens: list[int]
    prefill_warmup: int
    prefill_repeats: int
    e2e_batches: list[int]
    e2e_tokens: list[int]
    new_tokens: int
    e2e_warmup: int
    e2e_repeats: int
    budgets: dict = field(default_factory=dict)


FULL = Plan(
    kernel_shapes=[(64, 577, 1024), (64, 197, 768)], kernel_warmup=3, kernel_repeats=20,
    varlen_images=64, varlen_longest=197, varlen_heads=12, varlen_flex=True,
    vit_overrides={}, vit_batch=64, calibration_images=256, vit_warmup=3, vit_repeats=20,
    llava_shape="7b", prefill_batch=8, prefill_tokens=[576, 192, 64], prefill_warmup=1, prefill_repeats=5,
    e2e_batches=[1, 8], e2e_tokens=[64, 144, 192], new_tokens=32, e2e_warmup=1, e2e_repeats=5,
    budgets={"kernels": 50, "varlen": 30, "vit": 90, "llava_prefill": 150, "llava_e2e": 150},  # 470 s at most
)
DRY = Plan(
    kernel_shapes=[(2, 33, 16), (2, 17, 8)], kernel_warmup=1, kernel_repeats=2,
    varlen_images=4, varlen_longest=9, varlen_heads=2, varlen_flex=False,
    vit_overrides=dict(img_size=64, depth=2, embed_dim=32, num_heads=2, num_classes=10), vit_batch=4,
    calibration_images=8, vit_warmup=1, vit_repeats=2,
    llava_shape="tiny", prefill_batch=2, prefill_tokens=[576, 192, 64], prefill_warmup=0, prefill_repeats=1,
    e2e_batches=[1, 2], e2e_tokens=[64, 144, 192], new_tokens=4, e2e_warmup=0, e2e_repeats=1,
    # seconds of work; loose for a busy CPU
    budgets={"kernels": 1800, "varlen": 1800, "vit": 1800, "llava_prefill": 1800, "llava_e2e": 1800},
)


class SectionTimeout(Exception):
    """A section ran past its budget."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (SIGALRM; no limit where
    that is unavailable). A CUDA call in flight finishes first."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"ran past its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----- sections ------------------------------------------------------------------------------------
def check_kernels(plan: Plan, device: torch.device, shared: dict) -> dict:
    fused = device.type == "cuda" and triton_available()
    peak = bench_kernels.peak_gbs(device, None)
    rows = [row for shape in plan.kernel_shapes
            for row in bench_kernels.measure_shape(shape, R_FRACTION, DTYPE, device, plan.kernel_warmup, plan.kernel_repeats, peak)]
    best = "triton" if fused else "reference"
    parts = [f"{row['shape']} {best} {row['ms']:.3g} ms" + ("" if row["fraction_of_peak"] is None else
                                                             f" ({row['fraction_of_peak']:.0%} of peak HBM)")
             + f", {row['speedup_vs_tome']:.2f}x ToMe's, slot sort {row['slot_order_share_of_step']:.0%} of it"
             for row in rows if row["path"] == best]
    return {"rows": rows, "peak_gbs": peak, "triton": fused, "headline": "; ".join(parts)}


def check_varlen(plan: Plan, device: torch.device, shared: dict) -> dict:
    lengths = bench_varlen.spread_lengths(plan.varlen_images, min(25, plan.varlen_longest), plan.varlen_longest)
    rows = bench_varlen.measure(lengths, plan.varlen_heads, 64, DTYPE, device, plan.kernel_warmup, plan.kernel_repeats,
                                flex=plan.varlen_flex)
    headline = ", ".join(f"{row['backend']} {row['ms']:.3g} ms ({row['speedup_vs_padded']:.2f}x padded)" for row in rows)
    return {"rows": rows, "model": f"{len(lengths)} images of {min(lengths)}-{max(lengths)} tokens, {plan.varlen_heads} heads x 64",
            "headline": headline}


def check_vit(plan: Plan, device: torch.device, shared: dict) -> dict:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(VIT, pretrained=False, **plan.vit_overrides)
    model = model.to(device, DTYPE).eval()
    size = model.patch_embed.img_size[0]
    images = bench_dymu.shapes_pixels("test", plan.vit_batch, size).to(device, DTYPE)
    train = bench_dymu.shapes_pixels("train", plan.calibration_images, size).to(device, DTYPE)
    with vtc.apply(model, f"tome:r={TOME_R}") as handle, torch.inference_mode():
        model(images)
        tome_tokens = patch_tokens(handle)[0]
    calibration = calibrate(model, train, float(tome_tokens), batch_size=plan.vit_batch, clamp=True, progress=False)
    dymu = vtc.DyMU(calibration=calibration)
    configs = {"unreduced": (None, "auto"), f"tome r={TOME_R}": (f"tome:r={TOME_R}", "auto"), "dymu padded": (dymu, "padded"),
               "dymu packed": (dymu, "auto")}  # auto: nested-tensor attention on CUDA
    copies, handles, rows = {}, {}, []
    try:
        for label, (reducer, execution) in configs.items():
            copies[label] = copy.deepcopy(model)
            handles[label] = vtc.apply(copies[label], *([reducer] if reducer is not None else []), execution=execution)
        counts = {}
        with torch.inference_mode():
            for label, handle in handles.items():
                copies[label](images)
                per_image = handle.image_token_counts
                layers = per_image.float() if per_image is not None else torch.tensor([handle.token_counts], dtype=torch.float)
                tokens = patch_tokens(handle)
                counts[label] = {"patch_tokens_out": statistics.fmean(tokens), "patch_tokens_out_std": statistics.pstdev(tokens),
                                 "mean_tokens_per_layer": layers[:, :-1].mean().item(),
                                 "padded_tokens_out": handle.token_counts[-1] - handle.adapter.info.n_prefix,
                                 "gflops_per_image": image_flops(handle) / 1e9}
        timings = time_calls([lambda m=m: m(images) for m in copies.values()], warmup=plan.vit_warmup,
                             repeats=plan.vit_repeats, device=device)
    finally:
        for handle in handles.values():
            handle.remove()
    base = timings[0]
    for label, timing in zip(configs, timings):
        spread = speedup_spread(base.samples, timing.samples)
        reduction = counts["unreduced"]["gflops_per_image"] / counts[label]["gflops_per_image"]
        rows.append({"reducer": label, **counts[label], "ms": timing.median * 1e3, "img_per_s": plan.vit_batch / timing.median,
                     "speedup": spread.median, "speedup_iqr": [spread.q1, spread.q3], "flops_reduction": reduction,
                     "efficiency": spread.median / reduction})  # speedup per FLOPs cut (each image counted alone)
    headline = ", ".join(f"{row['reducer']} {row['img_per_s']:.4g} img/s ({row['speedup']:.2f}x, efficiency "
                         f"{row['efficiency']:.2f}, {row['patch_tokens_out']:.1f} tokens out)" for row in rows)
    shrunk = ", ".join(f"{key}={value}" for key, value in plan.vit_overrides.items())
    return {"rows": rows, "model": f"timm {VIT} (random weights{', ' + shrunk if shrunk else ''})",
            "batch": plan.vit_batch, "dymu_target": tome_tokens, "dymu_realised_on_train": calibration.realised,
            "headline": headline}


def llava(plan: Plan, device: torch.device, shared: dict):
    """The LLaVA-1.5-7B-shaped model, built once for both LLaVA sections."""
    if "llava" not in shared:
        shared["llava"] = bench_llava.build_model(plan.llava_shape, DTYPE, str(device), seed=0)
    return shared["llava"]


def check_llava_prefill(plan: Plan, device: torch.device, shared: dict) -> dict:
    model = llava(plan, device, shared)
    inputs = bench_llava.build_inputs(plan.prefill_batch, str(device), seed=0)
    cases = bench_llava.cases_for(["pool"], plan.prefill_tokens)
    reports = []
    for *_, specs in cases:
        with vtc.apply(model, *specs):
            reports.append(profile(model, inputs, new_tokens=2, timed=False))
    seconds = time_stages(model, [specs for *_, specs in cases], inputs, new_tokens=2, warmup=plan.prefill_warmup,
                          repeats=plan.prefill_repeats)
    base_samples, base_flops = seconds[0]["vision_prefill_samples"], reports[0].prefill.flops
    rows = []
    for (name, count, _), report, stage in zip(cases, reports, seconds):
        spread = speedup_spread(base_samples, stage["vision_prefill_samples"])
        rows.append({
            "reducer": name, "visual_tokens": count, "seen": report.visual_tokens[0], "prompt_tokens": report.prompt_tokens[0],
            "prefill_gflops": report.prefill.flops / 1e9, "prefill_flops_measured_over_predicted": report.prefill.flops_ratio,
            "vision_ms": stage["vision"] * 1e3, "prefill_ms": stage["prefill"] * 1e3,
            "prefill_tflop_s": report.prefill.flops / stage["prefill"] / 1e12 if stage["prefill"] > 0 else None,
            "vision_prefill_speedup": spread.median, "vision_prefill_speedup_iqr": [spread.q1, spread.q3],
            "prefill_flops_reduction": base_flops / report.prefill.flops,
            "kv_cache_mib": report.kv_cache_bytes / 2**20,
            "peak_memory_mib": None if report.peak_memory_bytes is None else report.peak_memory_bytes / 2**20,
        })
    headline = ", ".join(f"{row['visual_tokens']} tokens {row['vision_ms'] + row['prefill_ms']:.4g} ms "
                         f"({row['vision_prefill_speedup']:.2f}x)" for row in rows)
    return {"rows": rows, "model": f"LLaVA-1.5-7B-shaped ({plan.llava_shape})", "batch": plan.prefill_batch, "headline": headline}


def check_llava_e2e(plan: Plan, device: torch.device, shared: dict) -> dict:
    model = llava(plan, device, shared)
    rows = bench_llava.e2e_rows(model, bench_llava.cases_for(["pool"], plan.e2e_tokens), plan.e2e_batches, plan.new_tokens,
                                plan.e2e_warmup, plan.e2e_repeats, str(device), seed=0)
    largest = max(plan.e2e_batches)
    headline = ", ".join(f"K={row['visual_tokens']} {row['total_tok_s']:.4g} tok/s ({row['total_speedup']:.2f}x), first token "
                         f"{row['first_token_ms']:.4g} ms" for row in rows if row["batch"] == largest)
    return {"rows": rows, "model": f"LLaVA-1.5-7B-shaped ({plan.llava_shape})", "new_tokens": plan.new_tokens,
            "headline": f"batch {largest}: {headline}"}


CHECKS: dict[str, Callable[[Plan, torch.device, dict], dict]] = {
    "kernels": check_kernels, "varlen": check_varlen, "vit": check_vit, "llava_prefill": check_llava_prefill, "llava_e2e": check_llava_e2e,
}


def run_section(name: str, plan: Plan, device: torch.device, shared: dict) -> dict:
    budget = plan.budgets[name]
    print(f"== {name} (budget {budget} s)", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        with time_limit(budget):
            entry = {"status": "ok", **CHECKS[name](plan, device, shared)}
    except Exception as error:  # recorded; the other sections still run
        entry = {"status": "error", "error": f"{type(error).__name__}: {error}",
                 "traceback": traceback.format_exc(limit=-6)}
        print(entry["traceback"], file=sys.stderr, flush=True)
    entry["seconds"], entry["cpu_seconds"], entry["budget_s"] = time.perf_counter() - start, time.process_time() - cpu, budget
    if name == "llava_e2e":  # the last section using the LLaVA
        shared.pop("llava", None)
    free(device)
    print(f"   {entry['status']} in {entry['seconds']:.1f} s: {entry.get('headline', entry.get('error'))}", flush=True)
    return entry


# ----- outputs -------------------------------------------------------------------------------------
TABLE_COLUMNS = {
    "kernels": ["shape", "r", "path", "ms", "gb_per_s", "fraction_of_peak", "speedup_vs_tome", "speedup_vs_reference",
                "max_abs_diff_to_reference", "merge_ms", "slot_order_ms", "slot_order_share_of_step"],
    "varlen": ["backend", "images", "tokens", "widest", "ms", "speedup_vs_padded", "max_abs_diff_to_padded", "compile_s"],
    "vit": ["reducer", "patch_tokens_out", "patch_tokens_out_std", "mean_tokens_per_layer", "padded_tokens_out", "gflops_per_image",
            "flops_reduction", "ms", "img_per_s", "speedup", "speedup_iqr", "efficiency"],
    "llava_prefill": ["reducer", "visual_tokens", "prompt_tokens", "prefill_gflops", "prefill_flops_measured_over_predicted",
                      "vision_ms", "prefill_ms", "prefill_tflop_s", "vision_prefill_speedup", "vision_prefill_speedup_iqr",
                      "prefill_flops_reduction", "kv_cache_mib", "peak_memory_mib"],
    "llava_e2e": bench_llava.E2E_COLUMNS,
}


def markdown(record: dict) -> str:
    versions = record["environment"]["versions"]
    lines = [f"# GPU checks ({record['device']})", "", f"- command: `{record['command']}`",
             f"- torch {versions['torch']} (CUDA {versions['cuda']}, Triton {versions['triton']}), "
             f"dtype bfloat16, total {record['seconds']:.1f} s"
             + (" (DRY RUN: tiny shapes on the CPU, not a measurement)" if record["dry_run"] else ""), "",
             "| section | status | seconds | budget_s | result |", "|---|---|---|---|---|"]
    for name, entry in record["sections"].items():
        summary = entry.get("headline") if entry["status"] == "ok" else entry["error"]
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {entry['budget_s']} | {summary} |")
    for name, entry in record["sections"].items():
        if entry["status"] != "ok":
            continue
        rows = entry["rows"]
        columns = [c for c in TABLE_COLUMNS[name] if any(row.get(c) is not None for row in rows)]
        title = " ".join(str(part) for part in (entry.get("model"), f"batch {entry['batch']}" if "batch" in entry else None) if part)
        lines += ["", f"## {name}" + (f": {title}" if title else ""), "", bench_llava.markdown_table(rows, columns)]
    if "llava_e2e" in record["sections"] and record["sections"]["llava_e2e"]["status"] == "ok":
        memory = bench_llava.CPU_MEMORY_NOTE if record["dry_run"] else bench_llava.CUDA_MEMORY_NOTE
        lines += ["", "llava_e2e columns:"] + [f"- {note}" for note in [*bench_llava.E2E_NOTES, memory]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (tests the script; measures nothing)")
    parser.add_argument("--device", default="cuda", metavar="DEV", help="the GPU: cuda (default) or cuda:N")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help=f"sections to run (default all: {' '.join(SECTIONS)})")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_checks"), help="folder for gpu_checks.json and .md")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.dry_run:
        name = "cpu"
    else:
        try:
            name = device_type(args.device)
        except argparse.ArgumentTypeError as error:
            parser.error(f"{error}. gpu_checks.py measures on a CUDA GPU; --dry-run runs it at tiny shapes on the CPU")
        if not name.startswith("cuda"):
            parser.error(f"--device {args.device}: gpu_checks.py measures on a CUDA GPU; --dry-run runs it on the CPU")
    out = prepare_output(parser, args.out, args.overwrite)
    device = torch.device(name)
    if device.type == "cuda":  # "cuda" alone means the current GPU; set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    plan = DRY if args.dry_run else FULL
    record = {"command": "python scripts/gpu_checks.py " + " ".join(argv), "dry_run": args.dry_run,
              "device": device_description(device), "environment": environment(), "plan": asdict(plan),
              "sections": {}, "seconds": 0.0}
    start, shared = time.perf_counter(), {}
    for section in [s for s in SECTIONS if s in args.sections]:
        record["sections"][section] = run_section(section, plan, device, shared)
        record["seconds"] = time.perf_counter() - start
        (out / "gpu_checks.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "gpu_checks.md").write_text(markdown(record))
    failed = [s for s, entry in record["sections"].items() if entry["status"] != "ok"]
    print(f"wrote {out / 'gpu_checks.json'} and {out / 'gpu_checks.md'} in {record['seconds']:.1f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
