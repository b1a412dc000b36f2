#!/usr/bin/env python
"""One ToMe merge step three ways: vtc's PyTorch reference, vtc's Triton kernels, ToMe's formulation.

A merge step is what a merging reducer does in every block: cosine similarity of set A (even
tokens) to set B (odd tokens), the best partner per A token, the top-r edges, and the
size-weighted merge of ``x``. For each (B, N, C) the script times, interleaved in one loop:

- ``reference``: ``vtc.merge.bipartite_soft_matching`` + ``merge_weighted`` on the PyTorch references;
- ``triton``: the same calls on the Triton kernels (CUDA only);
- ``tome``: ToMe's published PyTorch formulation (full A x B score matrix, max, argsort, gather,
  ``scatter_reduce``), written here from the paper's description (ToMe paper, Bolya et al.,
  ICLR 2023, Sec. 3, "Bipartite Soft Matching").

For the fastest path (Triton on a GPU, else the reference) it also times the merge call alone
and the slot sort + bincount the Triton merge runs before its kernel (``slot_order``), and
reports that step's share of the whole merge step: what folding it into the kernel could save.

It prints milliseconds, the memory traffic each step needs at the least (read the metric and
``x`` and sizes once, write the merged tokens once) divided by the time, and on a GPU that rate as
a fraction of the device's peak bandwidth (``--peak-gbs``, or a table of known devices).

Example:
    python scripts/bench_kernels.py --device cuda
    python scripts/bench_kernels.py --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vtc.commands.common import prepare_output
from vtc.kernels import merge_weighted, triton_available, use_backend
from vtc.kernels.slots import slot_order
from vtc.measure import time_calls
from vtc.merge import bipartite_soft_matching
from vtc.records import device_description
from vtc.stats import speedup_spread

SHAPES = ((64, 197, 768), (64, 577, 1024), (8, 2305, 1152))
PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100-SXM4-80GB": 2039,
            "A100-SXM4-40GB": 1555, "A100": 1555}


def tome_step(x: torch.Tensor, size: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's formulation of one merge step with a protected first token (ToMe paper,
    Sec. 3, "Bipartite Soft Matching")."""
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[:, 0::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = float("-inf")  # the class token never merges
    best, partner = scores.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True)[..., None]
    kept, merged = edges[:, r:], edges[:, :r]
    targets = partner[..., None].gather(1, merged)
    channels = x.shape[-1]
    weighted = torch.cat([x * size[..., None], size[..., None]], dim=-1)
    src_a, dst_b = weighted[:, 0::2], weighted[:, 1::2]
    unmerged = src_a.gather(1, kept.expand(-1, -1, channels + 1))
    moving = src_a.gather(1, merged.expand(-1, -1, channels + 1))
    dst_b = dst_b.scatter_reduce(1, targets.expand(-1, -1, channels + 1), moving, reduce="sum")
    out = torch.cat([unmerged, dst_b], dim=1)
    return (out[..., :channels] / out[..., channels:]).to(x.dtype), out[..., channels]


def vtc_step(x: torch.Tensor, size: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    dest, n_out = bipartite_soft_matching(x, r, n_prefix=1)
    return merge_weighted(x, size, dest, n_out)


def least_bytes(batch: int, n: int, channels: int, r: int, element: int) -> int:
    """Bytes a fused step must move: read x (also the metric) and sizes, write the merged x and sizes."""
    return batch * (n * channels * element + 4 * n + (n - r) * channels * element + 4 * (n - r))


def peak_gbs(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_GBS.items() if key in name), None)


def measure_shape(shape: tuple[int, int, int], r_fraction: float, dtype: torch.dtype, device: torch.device,
                  warmup: int, repeats: int, peak: float | None) -> list[dict]:
    """One merge step (r = ``r_fraction`` N) on random (B, N, C) ``shape`` tokens: ToMe's
    formulation, vtc's reference and (CUDA with Triton) vtc's fused kernels, timed interleaved.
    One row per path: median ms, GB/s of the least bytes a fused step moves, that as a fraction of
    ``peak``, speedups against ToMe's and the reference (medians of per-repeat ratios), and the
    fused output's largest difference from the reference."""
    batch, n, channels = shape
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(batch, n, channels, generator=generator).to(device, dtype)
    size = (torch.rand(batch, n, generator=generator) + 0.5).to(device)
    r = int(n * r_fraction)

    def with_backend(name: str, fn=lambda: vtc_step(x, size, r)):
        def run():
            with use_backend(name):
                return fn()
        return run

    calls = {"tome": lambda: tome_step(x, size, r), "reference": with_backend("reference")}
    difference = None
    fused = device.type == "cuda" and triton_available()
    if fused:
        calls["triton"] = with_backend("triton")
        with torch.inference_mode():
            difference = (calls["triton"]()[0].float() - calls["reference"]()[0].float()).abs().max().item()
    best = "triton" if fused else "reference"
    dest, n_out = bipartite_soft_matching(x, r, n_prefix=1)
    # the fused merge's parts: the slot sort + bincount its wrapper runs first, and the whole merge call
    calls["slot_order"] = lambda: slot_order(dest, n_out)
    calls["merge"] = with_backend(best, lambda: merge_weighted(x, size, dest, n_out))
    timings = dict(zip(calls, time_calls(list(calls.values()), warmup=warmup, repeats=repeats, device=device)))
    parts = {name: timings.pop(name) for name in ("slot_order", "merge")}
    moved = least_bytes(batch, n, channels, r, x.element_size())
    rows = []
    for name, timing in timings.items():
        gbs = moved / timing.median / 1e9
        rows.append({"shape": f"{batch}x{n}x{channels}", "r": r, "path": name, "ms": timing.median * 1e3, "gb_per_s": gbs,
                     "fraction_of_peak": None if peak is None else gbs / peak,
                     "speedup_vs_tome": speedup_spread(timings["tome"].samples, timing.samples).median,
                     "speedup_vs_reference": speedup_spread(timings["reference"].samples, timing.samples).median,
                     "max_abs_diff_to_reference": difference if name == "triton" else None,
                     "merge_ms": parts["merge"].median * 1e3 if name == best else None,
                     "slot_order_ms": parts["slot_order"].median * 1e3 if name == best else None,
                     "slot_order_share_of_step": parts["slot_order"].median / timing.median if name == best else None})
    return rows



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--r-fraction", type=float, default=0.125, help="tokens merged per step, as a fraction of N")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-gbs", type=float, default=None, help="the device's peak memory bandwidth in GB/s")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_kernels"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = prepare_output(parser, args.out, args.overwrite)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = peak_gbs(device, args.peak_gbs)
    rows = []
    for batch, n, channels in SHAPES:
        for row in measure_shape((batch, n, channels), args.r_fraction, dtype, device, args.warmup, args.repeats, peak):
            rows.append(row)
            fraction = "" if peak is None else f", {row['fraction_of_peak']:.0%} of peak"
            print(f"{(batch, n, channels)} r={row['r']} {row['path']:9s} {row['ms']:9.3f} ms  {row['gb_per_s']:8.1f} GB/s{fraction}",
                  flush=True)
    setting = (f"{device_description(device)}, {args.dtype}, r = {args.r_fraction} N, {args.warmup} warm-up + "
               f"{args.repeats} interleaved repeats")
    (out / "bench_kernels.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=2))
    print(setting)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
