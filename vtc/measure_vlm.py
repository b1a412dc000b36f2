"""Measurement for a LLaVA under vtc: vision, prefill and decode separately (docs/ARCHITECTURE.md
"Measurement").

:func:`profile` runs one batch through the three stages a generation has:

- **vision**: tower, connector reducer and projector (``handle.encode_images``);
- **prefill**: the language model on the rebuilt sequence, up to the first new token's logits;
- **decode**: every further token, one step at a time with the KV cache.

For each stage it reports FLOPs counted by ``torch.utils.flop_counter`` beside the analytic count
from token numbers (:func:`llm_flops`, ``vtc.measure.analytic_flops``) and the median latency; also
the visual tokens per image, the peak CUDA memory and the KV-cache size; :func:`time_stages` times
several reducer sets in one interleaved loop, and :func:`time_generation` times whole ``generate()``
calls of several reducer sets the same way (time to first token, decode steps, the whole call).
:func:`answer_fidelity` compares greedy answers with the unreduced model's (exact match and token
agreement); :func:`compare_answers` runs both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from vtc.apply import active_handle, apply
from vtc.flops import counted_flops, per_token_params
from vtc.measure import _sync, analytic_flops, time_calls


def llm_flops(language_model: nn.Module, queries: Sequence[int], keys: Sequence[int], batch: int) -> int:
    """Analytic FLOPs of the decoder layers: layer ``j`` runs ``queries[j]`` tokens per row against
    ``keys[j]`` cached + new keys (flop-counter convention: 2 per MAC, products only)."""
    total = 0
    config = language_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer, q, k in zip(language_model.layers, queries, keys):
        params = per_token_params(layer.self_attn) + per_token_params(layer.mlp)
        total += batch * (2 * q * params + 4 * q * k * config.num_attention_heads * head_dim)
    return total


def vtu_llm_flops(language_model: nn.Module, unique: int, length: int, mode: str, batch: int) -> int:
    """Analytic prefill FLOPs of the decoder layers under virtual unmerging (DyMU paper,
    Sec. 3.2, complexity): projections and MLP on ``unique`` rows; attention on the ``length``
    virtual positions: ``expand`` runs full attention (``4 T^2 d``), ``exact`` forms the dot and cross products of
    unique rows (``4 U^2 d``) and the grouped value product (``2 T U d``)."""
    config = language_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_attention_heads
    if mode == "expand":
        attention = 4 * length * length * heads * head_dim
    else:
        attention = 4 * unique * unique * heads * head_dim + 2 * length * unique * heads * head_dim
    total = 0
    for layer in language_model.layers:
        params = per_token_params(layer.self_attn) + per_token_params(layer.mlp)
        total += batch * (2 * unique * params + attention)
    return total


@dataclass
class StageReport:
    """One stage: FLOPs for the whole batch (counted and analytic) and median seconds per call."""

    flops: int
    predicted_flops: int
    seconds: float

    @property
    def flops_ratio(self) -> float:
        """Counted over analytic FLOPs (1.0 when the analytic model is exact)."""
        return self.flops / self.predicted_flops if self.predicted_flops else float("nan")


@dataclass
class VLMProfile:
    visual_tokens: list[int]  # per image, entering the LLM
    prompt_tokens: list[int]  # per prompt, after rebuilding
    vision: StageReport
    prefill: StageReport
    decode: StageReport  # all ``new_tokens - 1`` steps after the first token (timed inside generate)
    new_tokens: int
    kv_cache_bytes: int
    peak_memory_bytes: int | None  # CUDA only

    @property
    def decode_seconds_per_token(self) -> float:
        return self.decode.seconds / max(1, self.new_tokens - 1)


def _cache_layers(cache) -> list:
    return list(getattr(cache, "layers", []))


def _kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in _cache_layers(cache) for t in (layer.keys, layer.values))


def _adapter(model: nn.Module):
    handle = active_handle(model)
    if handle is None:
        raise ValueError("profile() needs vtc applied to the model: vtc.apply(model, ...) (no reducer: the baseline)")
    return handle.adapter


class _StepClock(StoppingCriteria):
    """Stamps the time after every generated token (never stops generation)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class StageCalls:
    """``vision``; ``prefill`` (vision, rebuild and the LLM up to the first token's logits);
    ``first`` and ``all`` (generate 1 and ``new_tokens`` tokens). ``all`` appends to
    ``decode_seconds`` the time from its first to its last token (the decode steps alone). Each
    call uses the reducers applied to the model when it runs."""

    vision: Callable[[], object]
    prefill: Callable[[], object]
    first: Callable[[], object]
    all: Callable[[], object]
    decode_seconds: list[float]


def stage_calls(model: nn.Module, inputs: dict, new_tokens: int) -> StageCalls:
    pixel_values, image_sizes = inputs["pixel_values"], inputs.get("image_sizes")
    generate = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    device = next(model.parameters()).device
    decode_seconds: list[float] = []

    def vision():
        return _adapter(model).encode_images(pixel_values, image_sizes)

    def prefill():
        adapter = _adapter(model)
        layout = adapter.build_inputs(inputs["input_ids"], inputs.get("attention_mask"), vision(), "left")
        position_ids = layout.position_ids if adapter.positions == "original" else None
        with adapter.decoder_visual(layout):
            return model(inputs_embeds=layout.inputs_embeds, attention_mask=layout.attention_mask,
                         position_ids=position_ids, use_cache=True, logits_to_keep=1)

    def first():
        return model.generate(**inputs, **{**generate, "min_new_tokens": 1, "max_new_tokens": 1})

    def every():
        clock = _StepClock(device)
        out = model.generate(**inputs, **generate, return_dict_in_generate=True,
                             stopping_criteria=StoppingCriteriaList([clock]))
        decode_seconds.append(clock.stamps[-1] - clock.stamps[0])
        return out

    return StageCalls(vision, prefill, first, every, decode_seconds)


def _timed(calls: StageCalls) -> list[Callable[[], object]]:
    return [calls.vision, calls.prefill, calls.all]


def _stage_seconds(vision: float, prefill: float, calls: StageCalls, repeats: int) -> dict[str, float]:
    return {"vision": vision, "prefill": max(0.0, prefill - vision),
            "decode": statistics.median(calls.decode_seconds[-repeats:])}


def time_stages(model: nn.Module, reducer_sets: Sequence[Sequence], inputs: dict, new_tokens: int = 8,
                warmup: int = 1, repeats: int = 5) -> list[dict[str, float]]:
    """Median seconds of vision, prefill and decode (all ``new_tokens - 1`` steps) for each set of
    reducers, all timed in one interleaved loop (each call applies its reducers and removes them),
    so slow drifts of the machine hit every configuration alike. ``model`` must be unpatched.
    Each result also holds ``vision_prefill_samples``: the seconds of vision + prefill in each
    repeat (one call, repeat ``i`` of every set run back to back), for spreads of paired ratios."""
    def under(reducers: Sequence, call: Callable[[], object]) -> Callable[[], object]:
        def run():
            with apply(model, *reducers):
                return call()
        return run

    per_set = [stage_calls(model, inputs, new_tokens) for _ in reducer_sets]
    fns = [under(reducers, call) for reducers, calls in zip(reducer_sets, per_set) for call in _timed(calls)]
    timings = iter(time_calls(fns, warmup=warmup, repeats=repeats, device=next(model.parameters()).device))
    results = []
    for calls in per_set:
        vision, prefill, _ = next(timings), next(timings), next(timings)
        results.append({**_stage_seconds(vision.median, prefill.median, calls, repeats),
                        "vision_prefill_samples": list(prefill.samples)})
    return results


@dataclass
class GenerationTiming:
    """End-to-end greedy ``generate()`` of one reducer set, one sample per interleaved repeat.

    ``first_token``: seconds from the call to the first new token (vision, connector, prefill and
    the first token); ``decode``: from the first to the last new token (the ``new_tokens - 1``
    decode steps); ``total``: the whole call. ``kv_cache_bytes``: the cache ``generate`` returns
    (prompt + ``new_tokens - 1`` positions). ``peak_memory_bytes``: the largest
    ``torch.cuda.max_memory_allocated`` over the calls (weights included; the peak is reset before
    each call) and ``start_memory_bytes`` what was allocated when that call began; both None on
    the CPU, which has no per-call allocator peak."""

    batch: int
    new_tokens: int
    visual_tokens: list[int]
    first_token: list[float]
    decode: list[float]
    total: list[float]
    kv_cache_bytes: int
    peak_memory_bytes: int | None
    start_memory_bytes: int | None

    @property
    def first_token_seconds(self) -> float:
        return statistics.median(self.first_token)

    @property
    def decode_seconds(self) -> float:
        return statistics.median(self.decode)

    @property
    def total_seconds(self) -> float:
        return statistics.median(self.total)

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second of one sequence (the batch makes ``batch`` times as many tokens)."""
        return (self.new_tokens - 1) / self.decode_seconds

    @property
    def total_tokens_per_second(self) -> float:
        """New tokens of the whole batch per second of the whole call."""
        return self.batch * self.new_tokens / self.total_seconds


def time_generation(model: nn.Module, reducer_sets: Sequence[Sequence], inputs: dict, new_tokens: int = 32,
                    warmup: int = 1, repeats: int = 5) -> list[GenerationTiming]:
    """Time greedy ``generate()`` of exactly ``new_tokens`` tokens (``min_new_tokens`` too) under
    each set of reducers, all in one interleaved loop (repeat ``i`` of every set back to back), on
    the unpatched ``model``. Each call applies its reducers, synchronises CUDA, and is timed from
    just before ``generate`` to its return; the applying and removing are not timed. Every call
    is checked to return and to step through exactly ``new_tokens`` new tokens (RuntimeError
    otherwise)."""
    if new_tokens < 2:
        raise ValueError(f"time_generation needs new_tokens >= 2 (a first token and a decode step), got {new_tokens}")
    if active_handle(model) is not None:
        raise ValueError("time_generation() applies the reducers itself; call handle.remove() first")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    settings = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, return_dict_in_generate=True)
    batch, prompt = (int(n) for n in inputs["input_ids"].shape)
    samples: list[dict] = [{"first_token": [], "decode": [], "total": [], "peak": None, "start": None,
                            "kv": 0, "visual": []} for _ in reducer_sets]

    def once(reducers: Sequence, record: dict | None) -> None:
        with apply(model, *reducers) as handle:
            clock = _StepClock(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                start_memory = torch.cuda.memory_allocated(device)
            _sync(device)
            start = time.perf_counter()
            out = model.generate(**inputs, **settings, stopping_criteria=StoppingCriteriaList([clock]))
            _sync(device)
            end = time.perf_counter()
            visual = list(handle.visual_tokens)
        made = out.sequences.shape[1] - prompt  # the returned sequences start with the prompt
        if len(clock.stamps) != new_tokens or made != new_tokens:
            raise RuntimeError(f"generate() made {made} new tokens in {len(clock.stamps)} steps, not the {new_tokens} asked for")
        if record is None:
            return
        record["first_token"].append(clock.stamps[0] - start)
        record["decode"].append(clock.stamps[-1] - clock.stamps[0])
        record["total"].append(end - start)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        record["kv"], record["visual"] = _kv_bytes(cache), visual
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            if record["peak"] is None or peak > record["peak"]:
                record["peak"], record["start"] = peak, start_memory

    with torch.inference_mode():
        for _ in range(warmup):
            for reducers in reducer_sets:
                once(reducers, None)
        for _ in range(repeats):
            for reducers, record in zip(reducer_sets, samples):
                once(reducers, record)
    return [GenerationTiming(batch, new_tokens, s["visual"], s["first_token"], s["decode"], s["total"], s["kv"],
                             s["peak"], s["start"]) for s in samples]


def profile(model: nn.Module, inputs: dict, new_tokens: int = 8, warmup: int = 1, repeats: int = 5,
            timed: bool = True) -> VLMProfile:
    """Profile one batch of processor ``inputs`` on a LLaVA with vtc applied (``vtc.apply(model)``
    with no reducer profiles the unreduced model). Greedy decoding, ``new_tokens`` tokens;
    ``timed=False`` skips the latency runs (seconds are then 0)."""
    adapter = _adapter(model)
    device = next(model.parameters()).device
    pixel_values, image_sizes = inputs["pixel_values"], inputs.get("image_sizes")
    calls = stage_calls(model, inputs, new_tokens)
    vision, prefill, generate_first, generate_all = calls.vision, calls.prefill, calls.first, calls.all

    with torch.inference_mode():
        vision_flops = counted_flops(vision)
        visual = adapter.visual
        prefill_flops = counted_flops(prefill) - vision_flops
        decode_flops = counted_flops(generate_all) - counted_flops(generate_first)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = generate_all()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    layout = adapter.layout
    rows = layout.input_ids.shape[0]
    width = layout.input_ids.shape[1]
    language_model = model.model.language_model
    num_layers = len(language_model.layers)
    counts = adapter.decoder_token_counts or [width] * (num_layers + 1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cached = [layer.keys.shape[2] for layer in _cache_layers(cache)] or [width + new_tokens - 1] * num_layers
    head = 2 * language_model.config.hidden_size * model.lm_head.out_features * rows
    if adapter.vtu is not None:
        unique = int(adapter.vtu.unique_rows.max())
        predicted_prefill = vtu_llm_flops(language_model, unique, width, adapter.vtu.mode, rows) + head
    else:
        predicted_prefill = llm_flops(language_model, counts[:-1], counts[:-1], rows) + head
    decode_steps = new_tokens - 1
    predicted_decode = sum(
        llm_flops(language_model, [1] * num_layers, [c - decode_steps + step + 1 for c in cached], rows) + head
        for step in range(decode_steps)
    )
    tower = adapter.tower
    per_image = analytic_flops(tower, tower.token_counts).total if tower.token_counts else 0
    images = pixel_values.shape[0] if pixel_values.dim() == 4 else sum(_tiles(adapter, image_sizes))
    projected = adapter.pipeline.projected_tokens
    projector = per_token_params(model.model.multi_modal_projector)
    predicted_vision = images * per_image + 2 * projected * projector + adapter.pipeline.connector_flops
    seconds = {"vision": 0.0, "prefill": 0.0, "decode": 0.0}
    if timed:
        vision_t, prefill_t, _ = time_calls(_timed(calls), warmup=warmup, repeats=repeats, device=device)
        seconds = _stage_seconds(vision_t.median, prefill_t.median, calls, repeats)
    return VLMProfile(
        visual_tokens=[f.shape[0] for f in visual.features],
        prompt_tokens=layout.attention_mask.sum(dim=1).tolist(),
        vision=StageReport(vision_flops, predicted_vision, seconds["vision"]),
        prefill=StageReport(prefill_flops, predicted_prefill, seconds["prefill"]),
        decode=StageReport(decode_flops, predicted_decode, seconds["decode"]),
        new_tokens=new_tokens,
        kv_cache_bytes=_kv_bytes(cache),
        peak_memory_bytes=peak,
    )


def _tiles(adapter, image_sizes) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = adapter.config
    return [image_size_to_num_patches([int(v) for v in size], config.image_grid_pinpoints,
                                      config.vision_config.image_size) for size in image_sizes]


@dataclass
class AnswerFidelity:
    """Greedy answers of a reduced model against the unreduced model's (no labels needed)."""

    exact_match: float  # fraction of prompts whose answer is identical
    token_agreement: float  # mean fraction of reference answer positions with the same token


def _trim(ids: Sequence[int], eos: int | Sequence[int] | None) -> list[int]:
    stops = set([eos] if isinstance(eos, int) else (eos or []))
    out = []
    for token in ids:
        out.append(int(token))
        if token in stops:
            break
    return out


def answer_fidelity(reference: torch.Tensor, reduced: torch.Tensor, eos: int | Sequence[int] | None = None) -> AnswerFidelity:
    """Compare (B, T) generated ids (new tokens only), each answer cut after its first ``eos``."""
    if reference.shape[0] != reduced.shape[0]:
        raise ValueError(f"need the same prompts: {reference.shape[0]} reference answers, {reduced.shape[0]} reduced")
    exact, agreement = [], []
    for ref_row, red_row in zip(reference.tolist(), reduced.tolist()):
        ref, red = _trim(ref_row, eos), _trim(red_row, eos)
        exact.append(float(ref == red))
        same = sum(1 for i, token in enumerate(ref) if i < len(red) and red[i] == token)
        agreement.append(same / len(ref) if ref else float(not red))
    return AnswerFidelity(sum(exact) / len(exact), sum(agreement) / len(agreement))


def compare_answers(model: nn.Module, reducers: Sequence, inputs: dict, max_new_tokens: int = 32) -> AnswerFidelity:
    """Greedy answers to processor ``inputs`` without and with ``reducers`` (applied to the
    unpatched ``model`` for the call, then removed), compared by :func:`answer_fidelity`."""
    if active_handle(model) is not None:
        raise ValueError("compare_answers() applies the reducers itself; call handle.remove() first")
    settings = dict(do_sample=False, max_new_tokens=max_new_tokens)
    prompt = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        reference = model.generate(**inputs, **settings)[:, prompt:]
        with apply(model, *reducers):
            reduced = model.generate(**inputs, **settings)[:, prompt:]
    eos = model.generation_config.eos_token_id
    return answer_fidelity(reference, reduced, eos)
