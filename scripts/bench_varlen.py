#!/usr/bin/env python
"""Block-diagonal (variable-length) attention backends, timed side by side on one packed batch.

A batch whose images keep different token counts (DyMU) runs packed (``vtc.models.packing``); its
attention must let every image attend to its own tokens only. This script times, interleaved in
one loop, on random heads with the lengths below and a ``log(size)``-like key bias:

- ``padded``: SDPA on the batch padded to its widest image, padding masked (what packing replaces);
- ``split``: one SDPA call per image (vtc's CPU default);
- ``nested``: one SDPA call on nested jagged tensors, bias folded into the dot product (vtc's CUDA
  default);
- ``flex`` (``--flex``): ``torch.compile``d FlexAttention with a document block mask and the bias
  as a score modification; its compile time is reported apart.

Each row gives the median milliseconds, the speedup over ``padded`` and the largest difference from
``padded`` on real tokens.

Example:
    python scripts/bench_varlen.py --out outputs/bench_varlen
    python scripts/bench_varlen.py --device cuda --dtype bfloat16 --flex
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vtc.commands.common import device, positive_int, prepare_output
from vtc.measure import time_calls
from vtc.models.packing import Packing, varlen_attention
from vtc.records import device_description

sys.path.insert(0, str(Path(__file__).parent))
import bench_llava  # noqa: E402  (its Markdown table)


def spread_lengths(images: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Per-image token counts spread uniformly in [shortest, longest], one image at ``longest``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (images,), generator=generator).tolist()
    lengths[0] = longest
    return lengths


def measure(lengths: list[int], heads: int, dim: int, dtype: torch.dtype, dev: torch.device, warmup: int,
            repeats: int, flex: bool = False) -> list[dict]:
    """Time the backends on one packed batch; one row per backend."""
    generator = torch.Generator().manual_seed(len(lengths))
    total, width, batch = sum(lengths), max(lengths), len(lengths)
    q, k, v = (torch.randn(1, heads, total, dim, generator=generator).to(dev, dtype) for _ in range(3))
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    bias = torch.rand(batch, width, generator=generator).add(0.5).log()
    valid, bias = valid.to(dev), bias.to(dev)
    packings = {name: Packing.of(valid, bias, backend=name) for name in ("split", "nested")}

    def padded_layout(t: torch.Tensor) -> torch.Tensor:
        return Packing.of(valid).unpack(t[0].transpose(0, 1).unsqueeze(0)).permute(0, 2, 1, 3).contiguous()

    pq, pk, pv = (padded_layout(t) for t in (q, k, v))
    mask = bias.masked_fill(~valid, float("-inf")).to(dtype)[:, None, None, :]

    def padded() -> torch.Tensor:
        out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask)
        return packings["split"].pack(out.permute(0, 2, 1, 3))[0].transpose(0, 1).unsqueeze(0)

    calls = {"padded": padded, **{name: (lambda p=p: varlen_attention(q, k, v, p)) for name, p in packings.items()}}
    compile_s = None
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        image = packings["split"].segments(dev)
        packed_bias = packings["split"].key_bias.to(torch.float32)
        block_mask = create_block_mask(lambda b, h, qi, ki: image[qi] == image[ki], None, None, total, total, device=str(dev))
        compiled = torch.compile(flex_attention)

        def flex_call() -> torch.Tensor:
            return compiled(q, k, v, score_mod=lambda score, b, h, qi, ki: score + packed_bias[ki], block_mask=block_mask)

        start = time.perf_counter()
        with torch.inference_mode():
            flex_call()
        compile_s = time.perf_counter() - start
        calls["flex"] = flex_call
    with torch.inference_mode():
        reference = padded().float()
        differences = {name: (call().float() - reference).abs().max().item() for name, call in calls.items()}
        timings = dict(zip(calls, time_calls(list(calls.values()), warmup=warmup, repeats=repeats, device=dev)))
    base = timings["padded"].median
    return [{"backend": name, "images": batch, "tokens": total, "widest": width, "ms": timing.median * 1e3,
             "speedup_vs_padded": base / timing.median, "max_abs_diff_to_padded": differences[name],
             "compile_s": compile_s if name == "flex" else None} for name, timing in timings.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device, metavar="DEV", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--images", type=positive_int, default=32)
    parser.add_argument("--shortest", type=positive_int, default=25, help="fewest tokens an image keeps")
    parser.add_argument("--longest", type=positive_int, default=197, help="most tokens an image keeps (one image has them)")
    parser.add_argument("--heads", type=positive_int, default=6)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (compiles first)")
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_varlen"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.shortest > args.longest:
        parser.error(f"--shortest ({args.shortest}) is above --longest ({args.longest})")
    out = prepare_output(parser, args.out, args.overwrite)
    dtype = getattr(torch, args.dtype)
    lengths = spread_lengths(args.images, args.shortest, args.longest)
    rows = measure(lengths, args.heads, args.head_dim, dtype, torch.device(args.device), args.warmup, args.repeats, args.flex)
    setting = (f"{device_description(args.device)}, {args.dtype}, torch {torch.__version__}, {args.images} images "
               f"({args.shortest}-{args.longest} tokens), {args.heads} heads x {args.head_dim}, {args.repeats} interleaved repeats")
    (out / "bench_varlen.json").write_text(json.dumps({"setting": setting, "lengths": lengths, "rows": rows}, indent=2))
    text = f"{setting}\n\n{bench_llava.markdown_table(rows, list(rows[0]))}\n"
    (out / "bench_varlen.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
