#!/usr/bin/env python
"""Prefill cost against visual-token count on a LLaVA-1.5-7B-shaped model with random weights.

The visual-token count K (default 576, 288, 144, 64, 16) is set at the connector by each of
``--reducers`` (default ``pool``: ``pool:tokens=K``; ``holov``: ``holov:k=K``; ``random``), all in
one interleaved loop beside the unreduced model (the first row); HoloV and random also run at
K=576 when asked (their own overhead shows there). Pooling averages the 24x24 CLIP grid at the
connector (2-D average pooling); K=576 runs with no reducer. For each K the
script counts FLOPs per stage with :func:`vtc.measure_vlm.profile` (``torch.utils.flop_counter``
beside the analytic count), then times vision, prefill and decode for every K in one interleaved
loop (:func:`vtc.measure_vlm.time_stages`) and reports them relative to K=576.

``--e2e`` measures whole greedy ``generate()`` calls instead (:func:`vtc.measure_vlm.time_generation`):
exactly ``--new-tokens`` tokens (default 32 here; ``min_new_tokens`` too) at each of ``--batches``
(default 1 8), for the unreduced model and each reducer at ``--tokens`` (default 64,144,192 here).
All configurations of one batch size run in one interleaved loop (repeat r: configuration 1, 2, ...).
Reported per configuration: time to first token (vision, connector, prefill and the first token),
decode tokens/s after the first token (per sequence and for the batch), generated tokens/s of the
whole call, the KV-cache bytes ``generate`` returns and, on CUDA, the peak allocated memory
(``torch.cuda.max_memory_allocated``, reset before every call; not measured on the CPU). Ratios to
the unreduced model are medians of per-repeat paired ratios, with their interquartile range.
Writes ``bench_llava_e2e.json`` and ``bench_llava_e2e.md``.

Shapes (``--shape``):
- ``7b``: LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, width 1024) and a Llama-2-7B decoder
  (32 layers, width 4096, MLP 11008, vocab 32000). For a GPU.
- ``scaled`` (default): the same 336-pixel / 14-pixel-patch image (576 visual tokens) and prompt,
  with every width divided by 4 and depths by 4 (vision 6 x 256, decoder 8 x 1024, MLP 2752;
  heads as wide as the originals, 64 in the tower and 128 in the decoder): the same token counts
  and shape ratios, small enough for a CPU.
- ``tiny``: the same image and prompt with a 2 x 64 tower and a 2 x 128 decoder (MLP 256), for tests.

The prompt is LLaVA-1.5's template length: 35 text tokens around one image. Weights are random
(nothing is downloaded); dtype bf16 by default.

Example:
    python scripts/bench_llava.py --repeats 3
    python scripts/bench_llava.py --shape 7b --device cuda --batch 8
    python scripts/bench_llava.py --e2e --repeats 5 --out outputs/bench_llava_e2e
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import vtc
from vtc.commands.common import device, positive_int, prepare_output
from vtc.measure_vlm import profile, time_generation, time_stages
from vtc.records import device_description, environment
from vtc.stats import speedup_spread

SHAPES = {
    "7b": dict(vision_layers=24, vision_width=1024, decoder_layers=32, decoder_width=4096, decoder_mlp=11008),
    "scaled": dict(vision_layers=6, vision_width=256, decoder_layers=8, decoder_width=1024, decoder_mlp=2752),
    "tiny": dict(vision_layers=2, vision_width=64, decoder_layers=2, decoder_width=128, decoder_mlp=256),
}
STAGE_TOKENS, E2E_TOKENS = [576, 288, 144, 64, 16], [64, 144, 192]
OPTION = {"pool": "tokens", "random": "tokens", "holov": "k"}  # the option setting K in each reducer's spec
IMAGE_SIZE, PATCH = 336, 14
PROMPT_BEFORE, PROMPT_AFTER = 5, 30  # "USER: <image>\n ... ASSISTANT:" around the image
VOCAB, IMAGE_TOKEN = 32000, 31999


def build_model(shape: str, dtype: torch.dtype, device: str, seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    dims = SHAPES[shape]
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH, num_hidden_layers=dims["vision_layers"],
        hidden_size=dims["vision_width"], intermediate_size=4 * dims["vision_width"],
        num_attention_heads=dims["vision_width"] // 64,
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=dims["decoder_width"], intermediate_size=dims["decoder_mlp"],
        num_hidden_layers=dims["decoder_layers"], num_attention_heads=dims["decoder_width"] // 128,
        num_key_value_heads=dims["decoder_width"] // 128, max_position_embeddings=4096, pad_token_id=0,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval()


def build_inputs(batch: int, device: str, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    visual = (IMAGE_SIZE // PATCH) ** 2
    text = torch.randint(3, IMAGE_TOKEN, (batch, PROMPT_BEFORE + PROMPT_AFTER), generator=generator)
    image = torch.full((batch, visual), IMAGE_TOKEN)
    input_ids = torch.cat([text[:, :PROMPT_BEFORE], image, text[:, PROMPT_BEFORE:]], dim=1)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device),
    }


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not counts or any(not 1 <= c <= 576 for c in counts):
        raise argparse.ArgumentTypeError(f"token counts must lie in 1..576, got {text!r}")
    return counts


def cases_for(reducers: list[str], tokens: list[int]) -> list[tuple[str, int, tuple[str, ...]]]:
    """(reducer, K, specs) per configuration: the unreduced model first (576 tokens, no reducer),
    then every reducer at every K (pool at 576 would be the unreduced model and is left out)."""
    cases = [("none", 576, ())]
    cases += [(name, count, (f"{name}:{OPTION[name]}={count}",)) for name in reducers for count in tokens
              if not (name == "pool" and count == 576)]
    return cases


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"{value[0]:.3g}-{value[1]:.3g}"
    return "-" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


E2E_COLUMNS = ["batch", "reducer", "visual_tokens", "new_tokens", "first_token_ms", "first_token_speedup", "first_token_speedup_iqr",
               "decode_tok_s_per_seq", "decode_tok_s", "decode_speedup", "decode_speedup_iqr", "total_tok_s", "total_speedup",
               "total_speedup_iqr", "kv_cache_mib", "kv_cache_ratio", "peak_memory_mib", "peak_above_start_mib", "peak_above_start_ratio"]
E2E_NOTES = [
    "first_token_ms: median time from the generate() call to the first new token (vision, connector, prefill, first token); "
    "first_token_speedup: unreduced time / this time.",
    "decode_tok_s_per_seq: decode steps after the first token per second of one sequence; decode_tok_s: the same for the "
    "whole batch; decode_speedup: this rate / the unreduced rate.",
    "total_tok_s: generated tokens of the batch per second of the whole generate() call; total_speedup: this / unreduced.",
    "Speedups are medians of per-repeat paired ratios (repeat r of every configuration run back to back); *_iqr: their "
    "interquartile range.",
    "kv_cache_mib: the KV cache generate() returns (prompt + new_tokens - 1 positions).",
]
CUDA_MEMORY_NOTE = ("peak_memory_mib: torch.cuda.max_memory_allocated during the call (reset before each call; weights "
                    "included); peak_above_start_mib: that peak less what was allocated when the call began (KV cache, "
                    "activations, logits); peak_above_start_ratio: this / the unreduced model's.")
CPU_MEMORY_NOTE = ("peak_memory_mib: not measured on the CPU (no per-call allocator peak; the process's maximum RSS is "
                   "one high-water mark over every configuration and the weights), hence '-'.")


def e2e_rows(model, cases: list[tuple[str, int, tuple[str, ...]]], batches: list[int], new_tokens: int, warmup: int,
             repeats: int, device_name: str, seed: int) -> list[dict]:
    """One row per (batch, configuration) from :func:`vtc.measure_vlm.time_generation`; every
    configuration of one batch size timed in one interleaved loop, the first case the reference."""
    rows = []
    for batch in batches:
        inputs = build_inputs(batch, device_name, seed)
        timings = time_generation(model, [specs for *_, specs in cases], inputs, new_tokens=new_tokens, warmup=warmup,
                                  repeats=repeats)
        base = timings[0]
        for (name, count, _), timing in zip(cases, timings):
            spreads = {key: speedup_spread(getattr(base, key), getattr(timing, key)) for key in ("first_token", "decode", "total")}
            mib = None if timing.peak_memory_bytes is None else timing.peak_memory_bytes / 2**20
            rows.append({
                "batch": batch, "reducer": name, "visual_tokens": count, "seen": timing.visual_tokens[0],
                "new_tokens": timing.new_tokens, "repeats": len(timing.total),
                "first_token_ms": timing.first_token_seconds * 1e3,
                "decode_ms_per_step": timing.decode_seconds * 1e3 / (new_tokens - 1),
                "decode_tok_s_per_seq": timing.decode_tokens_per_second,
                "decode_tok_s": batch * timing.decode_tokens_per_second,
                "total_ms": timing.total_seconds * 1e3, "total_tok_s": timing.total_tokens_per_second,
                **{f"{key}_speedup": spread.median for key, spread in spreads.items()},
                **{f"{key}_speedup_iqr": [spread.q1, spread.q3] for key, spread in spreads.items()},
                "kv_cache_mib": timing.kv_cache_bytes / 2**20, "kv_cache_ratio": timing.kv_cache_bytes / base.kv_cache_bytes,
                "peak_memory_mib": mib,
                "peak_above_start_mib": None if mib is None else (timing.peak_memory_bytes - timing.start_memory_bytes) / 2**20,
                "peak_above_start_ratio": None if mib is None else ((timing.peak_memory_bytes - timing.start_memory_bytes)
                                                                   / (base.peak_memory_bytes - base.start_memory_bytes)),
                "samples_s": {"first_token": timing.first_token, "decode": timing.decode, "total": timing.total},
            })
            print(f"batch {batch} {name} K={count}: first token {rows[-1]['first_token_ms']:.1f} ms "
                  f"({rows[-1]['first_token_speedup']:.2f}x), decode {rows[-1]['decode_tok_s']:.1f} tok/s "
                  f"({rows[-1]['decode_speedup']:.2f}x), total {rows[-1]['total_tok_s']:.1f} tok/s", flush=True)
    return rows


def main_e2e(args, out: Path, argv: list[str]) -> int:
    model = build_model(args.shape, getattr(torch, args.dtype), args.device, args.seed)
    rows = e2e_rows(model, cases_for(args.reducers, args.tokens), args.batches, args.new_tokens, args.warmup, args.repeats,
                    args.device, args.seed)
    header = (f"LLaVA-1.5-7B-shaped ({args.shape}), {args.dtype}, {device_description(args.device)}, torch {torch.__version__}: greedy "
              f"generate() of exactly {args.new_tokens} new tokens, batches {' '.join(map(str, args.batches))}, "
              f"{args.warmup} warm-up + {args.repeats} interleaved repeats")
    notes = E2E_NOTES + [CUDA_MEMORY_NOTE if args.device.startswith("cuda") else CPU_MEMORY_NOTE]
    columns = [c for c in E2E_COLUMNS if not (c.startswith("peak_") and rows[0]["peak_memory_mib"] is None)]
    text = header + "\n\n" + markdown_table(rows, columns) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "bench_llava_e2e.md").write_text(text)
    record = {"setting": header, "command": "python scripts/bench_llava.py " + " ".join(argv), "environment": environment(),
              "notes": notes, "rows": rows}
    (out / "bench_llava_e2e.json").write_text(json.dumps(record, indent=2) + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="scaled", help="model shape (default scaled)")
    parser.add_argument("--tokens", type=parse_counts, default=None,
                        help="visual-token counts to measure (default 576,288,144,64,16; with --e2e 64,144,192)")
    parser.add_argument("--reducers", nargs="+", choices=("pool", "holov", "random"), default=["pool"],
                        help="connector reducers setting K (default pool)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per batch (default 1)")
    parser.add_argument("--new-tokens", type=positive_int, default=None,
                        help="tokens generated for the decode stage (default 4; with --e2e 32, exactly this many)")
    parser.add_argument("--e2e", action="store_true",
                        help="time whole generate() calls (first token, decode, total, KV cache, peak memory) instead of stages")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8],
                        help="with --e2e: batch sizes, each its own interleaved loop (default 1 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per stage (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--device", type=device, metavar="DEV", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_llava"), help="folder for the results")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = E2E_TOKENS if args.e2e else STAGE_TOKENS
    if args.new_tokens is None:
        args.new_tokens = 32 if args.e2e else 4
    if args.e2e and args.new_tokens < 2:
        parser.error("--e2e needs --new-tokens >= 2 (a first token and at least one decode step)")
    out = prepare_output(parser, args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e:
        return main_e2e(args, out, argv)
    model = build_model(args.shape, getattr(torch, args.dtype), args.device, args.seed)
    inputs = build_inputs(args.batch, args.device, args.seed)
    cases = cases_for(args.reducers, args.tokens)
    specs = [spec for *_, spec in cases]
    rows = []
    for (name, count, _), spec in zip(cases, specs):
        with vtc.apply(model, *spec):
            report = profile(model, inputs, new_tokens=args.new_tokens, timed=False)
        rows.append({
            "reducer": name, "visual_tokens": count, "seen": report.visual_tokens[0], "prompt_tokens": report.prompt_tokens[0],
            "prefill_gflops": report.prefill.flops / 1e9, "prefill_flops_measured_over_predicted": report.prefill.flops_ratio,
            "vision_gflops": report.vision.flops / 1e9, "decode_gflops": report.decode.flops / 1e9,
            "kv_cache_mib": report.kv_cache_bytes / 2**20,
            "peak_memory_mib": None if report.peak_memory_bytes is None else report.peak_memory_bytes / 2**20,
        })
        print(f"K={count}: {rows[-1]['prefill_gflops']:.2f} prefill GFLOPs "
              f"(measured/predicted {rows[-1]['prefill_flops_measured_over_predicted']:.4f})", flush=True)
    seconds = time_stages(model, specs, inputs, new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats)
    for row, stage in zip(rows, seconds):
        row["prefill_ms"] = stage["prefill"] * 1e3
        row["vision_ms"] = stage["vision"] * 1e3
        row["decode_ms_per_token"] = stage["decode"] * 1e3 / max(1, args.new_tokens - 1)
    base = rows[0]  # the unreduced model
    for row in rows:
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["prefill_flops_reduction"] = base["prefill_gflops"] / row["prefill_gflops"]
    header = (f"LLaVA-1.5-7B-shaped ({args.shape}), {args.dtype}, batch {args.batch}, {device_description(args.device)}, "
              f"{args.warmup} warm-up + {args.repeats} interleaved repeats, torch {torch.__version__}")
    columns = ["reducer", "visual_tokens", "prompt_tokens", "prefill_gflops", "prefill_flops_measured_over_predicted", "prefill_ms",
               "prefill_speedup", "prefill_flops_reduction", "vision_ms", "decode_ms_per_token", "kv_cache_mib"]
    if rows[0]["peak_memory_mib"] is not None:
        columns.append("peak_memory_mib")
    text = header + "\n\n" + markdown_table(rows, columns) + "\n"
    (out / "bench_llava.md").write_text(text)
    (out / "bench_llava.json").write_text(json.dumps({"setting": header, "rows": rows}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
