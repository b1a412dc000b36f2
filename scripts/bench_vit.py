#!/usr/bin/env python
"""Sweep ToMe r and EViT keep on a timm ViT: tokens, FLOPs, interleaved throughput, fidelity.

Writes ``bench_vit.csv``, ``bench_vit_pareto.png`` (speedup / FLOPs ratio vs fidelity, both
reducers) and ``bench_vit_summary.json`` into ``--out``. Also reports, for the smallest ToMe r
that halves the FLOPs, the measured speedup relative to the FLOPs reduction (target >= 0.8) and
the time spent inside the reducer's ``reduce()`` as a fraction of the forward time.

With ``--tome-repo PATH`` (a local checkout of facebookresearch/ToMe, used from where it lies and
never copied: its licence is non-commercial) the official ``tome.patch.timm`` runs on a deep copy
of the same model, timed interleaved with vtc's ToMe at the same r. No shim is needed for timm
1.0.31 on standard ViTs (the official patch still imports ``Attention``/``Block`` from
``timm.models.vision_transformer``); features the official patch ignores (LayerScale, qk-norm,
registers, average pooling) are reported as caveats because outputs must then differ.

Example (short run):
    python scripts/bench_vit.py --tome-r 0,8,13 --evit-keep 1.0,0.7,0.5 --repeats 3 --tome-repo /tmp/ToMe
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

import vtc
from vtc.commands.common import OutputDirError, device, output_dir
from vtc.demo import load_samples, to_batch
from vtc.measure import analytic_flops, compare, fidelity, time_calls

DEFAULT_TOME_R = "0,2,4,6,8,10,12,13,14,16,18,20"
DEFAULT_EVIT_KEEP = "1.0,0.9,0.8,0.7,0.6,0.5,0.4"
CSV_COLUMNS = ("reducer", "spec", "tokens_out", "tokens_per_layer", "gflops", "flops_ratio", "latency_ms",
               "throughput_img_s", "baseline_throughput_img_s", "speedup", "top1_agreement", "kl", "cosine")


@dataclass
class Point:
    family: str
    knob: float
    spec: str
    token_counts: list[int]
    gflops: float
    flops_ratio: float
    latency_s: float
    baseline_latency_s: float
    batch: int
    top1_agreement: float
    kl: float
    cosine: float

    @property
    def speedup(self) -> float:
        return self.baseline_latency_s / self.latency_s

    def record(self) -> dict[str, str]:
        return {
            "reducer": self.family, "spec": self.spec, "tokens_out": str(self.token_counts[-1]),
            "tokens_per_layer": ">".join(map(str, self.token_counts)), "gflops": f"{self.gflops:.4f}",
            "flops_ratio": f"{self.flops_ratio:.4f}", "latency_ms": f"{self.latency_s * 1e3:.2f}",
            "throughput_img_s": f"{self.batch / self.latency_s:.2f}",
            "baseline_throughput_img_s": f"{self.batch / self.baseline_latency_s:.2f}",
            "speedup": f"{self.speedup:.3f}", "top1_agreement": f"{self.top1_agreement:.4f}",
            "kl": f"{self.kl:.6f}", "cosine": f"{self.cosine:.6f}",
        }


# ----- arguments -----------------------------------------------------------------------------------
def number_list(kind: Callable[[str], float], check: Callable[[float], bool], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
        bad = [v for v in values if not check(v)]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Results go to --out as CSV, PNG and JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python scripts/bench_vit.py --tome-r 0,8,13 --evit-keep 1.0,0.7,0.5 --repeats 3",
    )
    parser.add_argument("--model", metavar="NAME", default="vit_small_patch16_224",
                        help="timm model name (a standard VisionTransformer); default vit_small_patch16_224")
    parser.add_argument("--pretrained", action="store_true",
                        help="load the model's hub weights (needs internet once); default: random weights, so "
                             "fidelity shows the mechanics only")
    parser.add_argument("--batch", metavar="N", type=positive_int, default=16,
                        help="images per forward, from scikit-image's bundled samples (default 16)")
    parser.add_argument("--tome-r", metavar="R,R,...", type=number_list(int, lambda v: v >= 0, "integers >= 0"), default=DEFAULT_TOME_R,
                        help=f"ToMe r values to sweep (default {DEFAULT_TOME_R}); a layer merges at most half its "
                             f"mergeable tokens (the official cap), so a large r saturates in late layers; the r "
                             f"that halves the FLOPs is always added")
    parser.add_argument("--evit-keep", metavar="K,K,...", type=number_list(float, lambda v: 0 < v <= 1, "keep rates in (0, 1]"),
                        default=DEFAULT_EVIT_KEEP,
                        help=f"EViT keep rates to sweep, default drop layers (default {DEFAULT_EVIT_KEEP})")
    parser.add_argument("--repeats", metavar="N", type=positive_int, default=10,
                        help="timed forwards per point for reduced and unreduced model each, interleaved; the "
                             "median is reported (default 10)")
    parser.add_argument("--warmup", metavar="N", type=int, default=2, help="untimed forwards before timing (default 2)")
    parser.add_argument("--threads", metavar="N", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", type=device, metavar="DEV", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("outputs/bench_vit"),
                        help="output folder (default outputs/bench_vit); a non-empty one gets a new "
                             "run-<timestamp> subfolder unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing this script's files there")
    parser.add_argument("--tome-repo", metavar="PATH", type=Path, default=None,
                        help="local checkout of facebookresearch/ToMe: also time the official tome.patch.timm on a "
                             "deep copy of the model at the same r, interleaved with vtc's ToMe, and report the "
                             "time ratio and output agreement (the checkout is imported in place, never copied)")
    parser.add_argument("--official-r", metavar="R", type=positive_int, default=None,
                        help="r for the official comparison (default: the r that halves the FLOPs)")
    parser.add_argument("--seed", metavar="N", type=int, default=0, help="seed for the random weights (default 0)")
    return parser


# ----- measuring -----------------------------------------------------------------------------------
def flops_ratio(model: nn.Module, spec: str) -> float:
    with vtc.apply(model) as plain:
        base = analytic_flops(plain.adapter).total
    with vtc.apply(model, spec) as handle:
        return analytic_flops(handle.adapter).total / base


def halving_r(model: nn.Module, limit: int = 200) -> int | None:
    """Smallest ToMe r whose planned FLOPs are at most half of the unreduced model's."""
    for r in range(1, limit):
        if flops_ratio(model, f"tome:r={r}") <= 0.5:
            return r
    return None


def measure(model: nn.Module, family: str, knob: float, spec: str, images: torch.Tensor, args) -> Point:
    c = compare(model, spec, images, warmup=args.warmup, repeats=args.repeats)
    f = c.fidelity
    return Point(family, knob, spec, c.token_counts, c.flops / 1e9, c.flops_ratio, c.latency.median,
                 c.latency_reference.median, c.batch_size, f.top1_agreement, f.kl, f.cosine)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_overhead(model: nn.Module, spec: str, images: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Fraction of forward time spent inside the reducer's ``reduce()`` (matching + merge; the key
    mean computed beside attention is not included). Wraps ``reduce`` on this reducer instance only."""
    reducer = vtc.parse_reducer(spec)
    original = reducer.reduce
    spent = [0.0]
    device = images.device

    def timed_reduce(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        _sync(device)
        spent[0] += time.perf_counter() - start
        return out

    reducer.reduce = timed_reduce  # instance attribute: the class is untouched
    try:
        with vtc.apply(model, reducer), torch.inference_mode():
            for _ in range(warmup):
                model(images)
            spent[0], total = 0.0, 0.0
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                model(images)
                _sync(device)
                total += time.perf_counter() - start
    finally:
        del reducer.reduce
    return {"spec": spec, "reduce_s": spent[0], "forward_s": total, "fraction": spent[0] / total}


# ----- the official ToMe, for comparison -----------------------------------------------------------
def import_official_tome(repo: Path):
    """Import ``tome`` from a local checkout (the code stays where it is)."""
    if not (repo / "tome" / "patch" / "timm.py").is_file():
        raise SystemExit(f"--tome-repo {repo}: no tome/patch/timm.py there; give a checkout of facebookresearch/ToMe")
    sys.path.insert(0, str(repo.resolve()))
    try:
        import tome
    except ImportError as error:  # e.g. a future timm moving Attention/Block
        raise SystemExit(f"--tome-repo {repo}: importing the official tome failed with this timm: {error}") from error
    if not Path(tome.__file__).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"--tome-repo {repo}: 'tome' was imported from {tome.__file__}, not from the checkout")
    return tome


def official_caveats(model: nn.Module) -> list[str]:
    """Model features the official timm patch (written for timm 0.4.12) ignores (its
    ``tome/patch/timm.py`` copies timm 0.4.12's block and attention)."""
    caveats = []
    block = model.blocks[0]
    if not isinstance(block.ls1, nn.Identity):
        caveats.append("LayerScale (official ToMeBlock drops ls1/ls2)")
    if not (isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.norm, nn.Identity)):
        caveats.append("qk-norm / attention norm (official ToMeAttention skips them)")
    if model.num_prefix_tokens > 1:
        caveats.append("register tokens (official code protects only CLS/dist)")
    if model.global_pool in ("avg", "avgmax", "max", "map"):
        caveats.append(f"{model.global_pool} pooling (official timm patch does not weight it by size)")
    return caveats


def compare_official(tome, model: nn.Module, r: int, images: torch.Tensor, args) -> dict:
    official = copy.deepcopy(model)
    tome.patch.timm(official)  # the official patch swaps classes on this private copy only
    reference = copy.deepcopy(model)
    spec = f"tome:r={r}"
    with torch.inference_mode():
        official.r = 0
        r0_diff = (official(images) - reference(images)).abs().max().item()
        official.r = r
        with vtc.apply(model, spec) as handle:
            ours = model(images)
            theirs = official(images)
            base = reference(images)
            ours_tokens = handle.token_counts[-1]
            size = official._tome_info["size"]
            theirs_tokens = handle.token_counts[0] if size is None else size.shape[1]
            ours_t, theirs_t, base_t = time_calls(
                [lambda: model(images), lambda: official(images), lambda: reference(images)],
                args.warmup, args.repeats, images.device)
    agree = fidelity(theirs, ours)
    return {
        "r": r, "vtc_spec": spec, "caveats": official_caveats(model),
        "official_r0_max_abs_diff_vs_unpatched": r0_diff,
        "tokens_out_vtc": ours_tokens, "tokens_out_official": theirs_tokens,
        "latency_ms_vtc": ours_t.median * 1e3, "latency_ms_official": theirs_t.median * 1e3,
        "latency_ms_unreduced": base_t.median * 1e3,
        "official_time_over_vtc_time": theirs_t.median / ours_t.median,
        "speedup_vtc": base_t.median / ours_t.median, "speedup_official": base_t.median / theirs_t.median,
        "vtc_vs_official_top1_agreement": agree.top1_agreement, "vtc_vs_official_kl": agree.kl,
        "vtc_vs_official_cosine": agree.cosine,
        "vtc_vs_official_max_abs_diff": (ours - theirs).abs().max().item(),
        "vtc_top1_vs_unreduced": fidelity(base, ours).top1_agreement,
        "official_top1_vs_unreduced": fidelity(base, theirs).top1_agreement,
    }


# ----- outputs -------------------------------------------------------------------------------------
def pareto_front(points: Sequence[Point], x: Callable[[Point], float], higher_x_better: bool) -> list[Point]:
    """Points no other point beats on both x and top-1 agreement."""
    sign = 1 if higher_x_better else -1

    def dominated(p: Point) -> bool:
        return any(sign * x(q) >= sign * x(p) and q.top1_agreement >= p.top1_agreement
                   and (sign * x(q) > sign * x(p) or q.top1_agreement > p.top1_agreement) for q in points)

    return sorted((p for p in points if not dominated(p)), key=x)


def plot(points: Sequence[Point], title: str, path: Path) -> Path:
    figure = Figure(figsize=(12, 8.5), layout="constrained")
    axes = figure.subplots(2, 2)
    panels = [("speedup", lambda p: p.speedup, True, "measured speedup (x)"),
              ("flops", lambda p: p.flops_ratio, False, "FLOPs ratio (reduced / unreduced)")]
    styles = {"tome": ("tab:blue", "o"), "evit": ("tab:orange", "s")}
    for column, (_, x, higher, label) in enumerate(panels):
        for row, (metric, ylabel) in enumerate([("top1_agreement", "top-1 agreement with unreduced"),
                                                ("kl", "KL(unreduced || reduced)")]):
            ax = axes[row][column]
            for family, (colour, marker) in styles.items():
                series = sorted((p for p in points if p.family == family), key=x)
                if not series:
                    continue
                ax.plot([x(p) for p in series], [getattr(p, metric) for p in series], marker=marker, color=colour,
                        label=family)
                for p in series:
                    knob = f"r={int(p.knob)}" if family == "tome" else f"{p.knob:g}"
                    ax.annotate(knob, (x(p), getattr(p, metric)), textcoords="offset points", xytext=(3, 3),
                                fontsize=7, color=colour)
            if row == 0:
                front = pareto_front(points, x, higher)
                ax.plot([x(p) for p in front], [p.top1_agreement for p in front], ls="--", color="black", lw=1,
                        marker="o", markersize=11, markerfacecolor="none", label="Pareto front (both)")
            else:
                ax.set_yscale("symlog", linthresh=1e-4)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    return path


def write_csv(points: Sequence[Point], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(p.record() for p in points)
    return path


# ----- main ----------------------------------------------------------------------------------------
def build_model(args) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        try:
            model = timm.create_model(args.model, pretrained=args.pretrained)
        except Exception as error:  # unknown names and hub/network errors
            raise SystemExit(f"could not create timm model {args.model!r} (pretrained={args.pretrained}): "
                             f"{type(error).__name__}: {error}") from error
    try:
        vtc.apply(model).remove()
    except TypeError as error:
        raise SystemExit(f"{args.model}: {error}") from error
    return model.eval().to(args.device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    try:
        out, note = output_dir(args.out, args.overwrite)
    except OutputDirError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    official_tome = import_official_tome(args.tome_repo) if args.tome_repo is not None else None
    model = build_model(args)
    cfg = model.pretrained_cfg
    size = model.patch_embed.img_size[0]
    images = to_batch(load_samples(args.batch, size), cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3))
    images = images.to(args.device)

    r_half = halving_r(model)
    tome_rs = sorted(set(args.tome_r) | ({r_half} if r_half else set()))
    jobs = [("tome", r, f"tome:r={r}") for r in tome_rs]
    jobs += [("evit", keep, f"evit:keep={keep:g}") for keep in sorted(set(args.evit_keep), reverse=True)]
    weights = "pretrained" if args.pretrained else "RANDOM weights"
    if not args.pretrained:
        print("weights are RANDOM (no --pretrained): fidelity shows the mechanics only, not accuracy")
    print(f"{args.model}, {weights}, batch {args.batch}, {args.repeats} repeats, device {args.device}, "
          f"{torch.get_num_threads()} threads; ToMe r halving FLOPs: {r_half}")
    if note:
        print(note)
    points = [measure(model, family, knob, spec, images, args)
              for family, knob, spec in tqdm(jobs, desc="sweep", unit="point")]

    summary: dict = {"model": args.model, "pretrained": args.pretrained, "batch": args.batch,
                     "repeats": args.repeats, "device": args.device, "threads": torch.get_num_threads(),
                     "torch": torch.__version__}
    if r_half:
        half = next(p for p in points if p.family == "tome" and p.knob == r_half)
        reduction = 1 / half.flops_ratio
        summary["halving"] = {
            "spec": half.spec, "flops_ratio": half.flops_ratio, "speedup": half.speedup,
            "speedup_over_flops_reduction": half.speedup / reduction, "target": 0.8,
            "reduce_overhead": reduce_overhead(model, half.spec, images, args.warmup, args.repeats),
        }
    if args.tome_repo is not None:
        summary["official"] = compare_official(official_tome, model, args.official_r or r_half or 13, images, args)

    out.mkdir(parents=True, exist_ok=True)
    paths = [write_csv(points, out / "bench_vit.csv"),
             plot(points, f"{args.model}, {weights}, batch {args.batch}, {args.device}", out / "bench_vit_pareto.png")]
    summary_path = out / "bench_vit_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    paths.append(summary_path)

    print(f"{'spec':<22} {'tokens':>6} {'GFLOPs':>7} {'FLOPs':>6} {'img/s':>7} {'speedup':>7} {'top1':>5} {'KL':>8}")
    for p in points:
        print(f"{p.spec:<22} {p.token_counts[-1]:>6} {p.gflops:>7.3f} {p.flops_ratio:>6.3f} "
              f"{p.batch / p.latency_s:>7.1f} {p.speedup:>6.2f}x {p.top1_agreement:>5.2f} {max(p.kl, 0.0):>8.5f}")
    if "halving" in summary:
        h = summary["halving"]
        print(f"\nFLOPs halved by {h['spec']} (ratio {h['flops_ratio']:.3f}): speedup {h['speedup']:.2f}x = "
              f"{h['speedup_over_flops_reduction']:.2f} of the FLOPs reduction (target >= 0.8); reduce() takes "
              f"{100 * h['reduce_overhead']['fraction']:.1f}% of the forward time")
    if "official" in summary:
        o = summary["official"]
        print(f"official ToMe r={o['r']}: {o['latency_ms_official']:.1f} ms vs vtc {o['latency_ms_vtc']:.1f} ms "
              f"(official/vtc time {o['official_time_over_vtc_time']:.2f}); speedups official "
              f"{o['speedup_official']:.2f}x, vtc {o['speedup_vtc']:.2f}x; top-1 agreement vtc vs official "
              f"{o['vtc_vs_official_top1_agreement']:.3f}, max |diff| {o['vtc_vs_official_max_abs_diff']:.2e}; "
              f"tokens out {o['tokens_out_vtc']} vs {o['tokens_out_official']}")
        if o["caveats"]:
            print("  caveats (official patch ignores): " + "; ".join(o["caveats"]))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
