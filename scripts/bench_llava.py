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

Shapes (``--shape``):
- ``7b``: LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, width 1024) and a Llama-2-7B decoder
  (32 layers, width 4096, MLP 11008, vocab 32000). For a GPU.
- ``scaled`` (default): the same 336-pixel / 14-pixel-patch image (576 visual tokens) and prompt,
  with every width divided by 4 and depths by 4 (vision 6 x 256, decoder 8 x 1024, MLP 2752;
  heads as wide as the originals, 64 in the tower and 128 in the decoder): the same token counts
  and shape ratios, small enough for a CPU.

The prompt is LLaVA-1.5's template length: 35 text tokens around one image. Weights are random
(nothing is downloaded); dtype bf16 by default.

Example:
    python scripts/bench_llava.py --repeats 3
    python scripts/bench_llava.py --shape 7b --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import vtc
from vtc.commands.common import device, prepare_output
from vtc.measure_vlm import profile, time_stages

SHAPES = {
    "7b": dict(vision_layers=24, vision_width=1024, decoder_layers=32, decoder_width=4096, decoder_mlp=11008),
    "scaled": dict(vision_layers=6, vision_width=256, decoder_layers=8, decoder_width=1024, decoder_mlp=2752),
}
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="scaled", help="model shape (default scaled)")
    parser.add_argument("--tokens", type=parse_counts, default=[576, 288, 144, 64, 16],
                        help="visual-token counts to measure (default 576,288,144,64,16)")
    parser.add_argument("--reducers", nargs="+", choices=("pool", "holov", "random"), default=["pool"],
                        help="connector reducers setting K (default pool)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per batch (default 1)")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens generated for the decode stage (default 4)")
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
    args = parser.parse_args(argv)
    out = prepare_output(parser, args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.shape, getattr(torch, args.dtype), args.device, args.seed)
    inputs = build_inputs(args.batch, args.device, args.seed)
    option = {"pool": "tokens", "random": "tokens", "holov": "k"}
    cases = [("none", 576)] + [(name, count) for name in args.reducers for count in args.tokens
                               if not (name == "pool" and count == 576)]
    specs = [() if name == "none" else (f"{name}:{option[name]}={count}",) for name, count in cases]
    rows = []
    for (name, count), spec in zip(cases, specs):
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
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    header = (f"LLaVA-1.5-7B-shaped ({args.shape}), {args.dtype}, batch {args.batch}, {device}, "
              f"{args.warmup} warm-up + {args.repeats} interleaved repeats, torch {torch.__version__}")
    columns = ["reducer", "visual_tokens", "prompt_tokens", "prefill_gflops", "prefill_flops_measured_over_predicted", "prefill_ms",
               "prefill_speedup", "prefill_flops_reduction", "vision_ms", "decode_ms_per_token", "kv_cache_mib"]
    if rows[0]["peak_memory_mib"] is not None:
        columns.append("peak_memory_mib")
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        table.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    text = header + "\n\n" + "\n".join(table) + "\n"
    (out / "bench_llava.md").write_text(text)
    (out / "bench_llava.json").write_text(json.dumps({"setting": header, "rows": rows}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
