"""Measurement: FLOPs, latency, throughput and fidelity (docs/ARCHITECTURE.md "Measurement").

FLOPs follow ``torch.utils.flop_counter``'s convention (2 per multiply-accumulate, matrix products
and convolutions only; norms, softmax and elementwise ops are not counted). The analytic count
sums, per block, the attention projections at the tokens entering the block, the two attention
products (``4 N^2 d``), the reducer's own matrix products and the MLP at the tokens leaving it.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vtc.apply import apply
from vtc.flops import per_token_params
from vtc.models.base import EncoderAdapter
from vtc.sites import Signal


@dataclass
class FlopReport:
    """Analytic FLOPs of one image's forward pass."""

    token_counts: list[int]
    stem: int
    blocks: list[int]
    head: int

    @property
    def total(self) -> int:
        return self.stem + sum(self.blocks) + self.head


def analytic_flops(adapter: EncoderAdapter, token_counts: Sequence[int] | None = None) -> FlopReport:
    """FLOPs per image from per-layer token counts (default: the plan at the default input size).

    ``token_counts`` has L + 1 entries: tokens entering each block, then tokens leaving the last.
    """
    if token_counts is None:
        reducer = adapter.reducer
        n0, n_layers = adapter.info.num_tokens, adapter.info.num_layers
        token_counts = reducer.token_counts(adapter.info, adapter.plan) if reducer else [n0] * (n_layers + 1)
    if len(token_counts) != len(adapter.blocks) + 1:
        raise ValueError(f"token_counts needs {len(adapter.blocks) + 1} entries, got {len(token_counts)}")
    blocks = []
    for index, block in enumerate(adapter.blocks):
        n_in, n_out = token_counts[index], token_counts[index + 1]
        heads, head_dim = adapter.attention_heads(block)
        attention, mlp = adapter.branches(block)
        flops = 2 * n_in * per_token_params(attention) + 4 * n_in * n_in * heads * head_dim
        flops += 2 * n_out * per_token_params(mlp)
        if adapter.plan[index] is not None:
            needs = adapter.reducer.needs_for(adapter.plan[index])
            if Signal.KEY_MEAN in needs:
                flops += 2 * math.ceil(n_in / 2) * (n_in // 2) * head_dim
            if Signal.CLS_ATTN in needs:
                flops += 2 * n_in * heads * head_dim
        blocks.append(flops)
    return FlopReport(list(token_counts), adapter.stem_flops(), blocks, adapter.head_flops(token_counts[-1]))


def patch_tokens(handle) -> list[int]:
    """Patch tokens (prefix tokens not counted) each image of the handle's last forward had leaving
    the encoder: its own count under a reducer with per-image counts, else the batch's."""
    n_prefix = handle.adapter.info.n_prefix
    per_image = handle.image_token_counts
    if per_image is not None:
        return (per_image[:, -1] - n_prefix).tolist()
    return [handle.token_counts[-1] - n_prefix] * handle.state.x.shape[0]


def image_flops(handle) -> float:
    """Analytic FLOPs per image of the last forward of a model with vtc applied (``handle``): under a
    dynamic reducer (DyMU) the mean of each image's FLOPs at its own counts, not the padded batch width."""
    per_image = handle.adapter.image_token_counts
    if handle.adapter.reducer is not None and handle.adapter.reducer.dynamic and per_image is not None:
        return statistics.fmean(analytic_flops(handle.adapter, row.tolist()).total for row in per_image)
    return analytic_flops(handle.adapter, handle.token_counts).total


@dataclass
class Timing:
    """Wall-clock seconds per call: median of ``repeats`` after ``warmup`` calls."""

    median: float
    samples: list[float] = field(repr=False)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fns: Sequence[Callable[[], object]], warmup: int = 2, repeats: int = 10,
               device: torch.device | None = None) -> list[Timing]:
    """Time several callables interleaved (call 1 of each, then call 2 of each, ...), so slow
    drifts of a noisy machine hit all of them alike; synchronises CUDA around each call."""
    samples: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
        _sync(device)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                _sync(device)
                samples[i].append(time.perf_counter() - start)
    return [Timing(statistics.median(s), s) for s in samples]


def latency(fn: Callable[[], object], warmup: int = 2, repeats: int = 10, device: torch.device | None = None) -> Timing:
    """Median latency of one callable."""
    return time_calls([fn], warmup, repeats, device)[0]


@dataclass
class Fidelity:
    """Agreement of a reduced model's outputs with the unreduced model's (no labels needed).

    ``top1_agreement`` and ``kl`` (KL(reference || reduced), mean over images) apply to logits;
    ``cosine`` (mean over images) applies to any output vector, e.g. CLIP embeddings.
    """

    top1_agreement: float
    kl: float
    cosine: float


def fidelity(reference: torch.Tensor, reduced: torch.Tensor) -> Fidelity:
    if reference.shape != reduced.shape:
        raise ValueError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(reduced.shape)}")
    ref, red = reference.float().flatten(1), reduced.float().flatten(1)
    agreement = (ref.argmax(-1) == red.argmax(-1)).float().mean().item()
    kl = F.kl_div(red.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    cosine = F.cosine_similarity(ref, red, dim=-1).mean().item()
    return Fidelity(agreement, kl, cosine)


@dataclass
class Comparison:
    """A reducer measured side by side with the unreduced model on the same inputs."""

    reducer: str
    token_counts: list[int]
    flops: int
    flops_reference: int
    latency: Timing
    latency_reference: Timing
    fidelity: Fidelity
    batch_size: int

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_reference

    @property
    def speedup(self) -> float:
        return self.latency_reference.median / self.latency.median

    @property
    def throughput(self) -> float:
        return self.batch_size / self.latency.median


def compare(model: nn.Module, reducer, images: torch.Tensor, warmup: int = 2, repeats: int = 10,
            forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Comparison:
    """Run ``model`` on ``images`` without and with ``reducer``: FLOPs, latency (interleaved), fidelity.

    The unreduced reference runs on a deep copy of ``model``, so both are timed in one loop.

    ``forward(model, images)`` produces the output compared for fidelity (default ``model(images)``;
    pass e.g. ``lambda m, x: m.encode_image(x)`` for a CLIP model).
    """
    run = forward or (lambda m, x: m(x))
    baseline = copy.deepcopy(model)
    with torch.inference_mode():
        reference = run(baseline, images)
        with apply(baseline) as plain:
            flops_reference = analytic_flops(plain.adapter).total
        handle = apply(model, reducer)
        try:
            reduced = run(model, images)
            counts = handle.token_counts
            flops = round(image_flops(handle))
            spec = handle.reducers[0].describe() if handle.reducers else "none"
            timing, timing_reference = time_calls(
                [lambda: run(model, images), lambda: run(baseline, images)], warmup, repeats, images.device
            )
        finally:
            handle.remove()
    return Comparison(spec, counts, flops, flops_reference, timing, timing_reference,
                      fidelity(reference, reduced), images.shape[0])
