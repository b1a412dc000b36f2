"""The decoder site (vtc.models.decoder) on a tiny HF Llama: drop equals mask for text tokens,
batching with left padding, generate (cached, uncached, sampling) and bit-identical removal."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import tolerance
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vtc.models.decoder import DecoderSite, compact_index, layer_mask
from vtc.models.patching import InstancePatcher
from vtc.reducers.exit import VisualExit

PAD, IMAGE = 0, 90  # ids >= IMAGE are image tokens
PROMPTS = [[5, 90, 91, 92, 93, 17, 23, 42], [7, 12, 95, 33, 34, 35]]  # 4 and 1 image tokens
NEW = 5  # generated tokens
# accumulated products to a logit (tests/tolerance.py): 4 Llama layers of width 64 (MLP 128) over
# at most 8 + NEW positions, then the final norm and the LM head
LLM_TERMS = tolerance.transformer_terms(4, 64, 8 + NEW, hidden=128) + 2 * 64


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, initializer_range=0.2, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
        attn_implementation="sdpa",
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    loaded = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert loaded.config._attn_implementation == "sdpa"
    return loaded


def batch(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Left-padded input ids, attention mask and position ids."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def visual(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return (inputs["input_ids"] >= IMAGE) & inputs["attention_mask"].bool()


@contextlib.contextmanager
def exit_site(model: LlamaForCausalLM, mode: str, layer: int = 1) -> Iterator[DecoderSite]:
    patcher = InstancePatcher()
    site = DecoderSite(model.model, VisualExit(layer=layer, mode=mode), patcher)
    site.install()
    try:
        yield site
    finally:
        patcher.restore()


class Run(NamedTuple):
    logits: torch.Tensor  # (B, V) at the last prompt position of a plain forward
    lengths: list[int]  # per-layer KV cache length after that forward
    tokens: torch.Tensor  # (B, NEW) generated
    scores: tuple[torch.Tensor, ...]  # generate's per-step logits
    gen_lengths: list[int] | None  # per-layer KV cache length after generate


@torch.no_grad()
def run(model: LlamaForCausalLM, inputs: dict[str, torch.Tensor], **gen: object) -> Run:
    out = model(**inputs, use_cache=True)
    prompt = {k: v for k, v in inputs.items() if k != "position_ids"}  # generate makes its own
    result = model.generate(
        **prompt, max_new_tokens=NEW, pad_token_id=PAD, output_scores=True, return_dict_in_generate=True,
        **{"do_sample": False, **gen},
    )
    return Run(
        out.logits[:, -1],
        [layer.keys.shape[-2] for layer in out.cache.layers],
        result.sequences[:, inputs["input_ids"].shape[1]:],
        result.scores,
        None if result.cache is None else [layer.keys.shape[-2] for layer in result.cache.layers],
    )


def same(a: Run, b: Run) -> bool:
    return torch.equal(a.logits, b.logits) and a.lengths == b.lengths and torch.equal(a.tokens, b.tokens)


def test_tensor_helpers() -> None:
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]])
    assert compact_index(keep).tolist() == [[0, 2], [-1, 3]]
    rows = torch.tensor([[0, 1]])
    cols = torch.tensor([[-1, 0, 1]])  # a padding column, then this forward's two queries
    mask = layer_mask(None, rows, cols, torch.tensor([[True, False, True]]), past=0)
    assert mask[0, 0].tolist() == [[False, True, False], [False, False, True]]


@torch.no_grad()
def test_drop_matches_a_hand_written_exit(model: LlamaForCausalLM) -> None:
    """Layers 0..1 on the whole prompt, then layers 2..3 on its text tokens alone."""
    inputs = batch(PROMPTS[:1])
    lm, keep = model.model, ~visual(inputs)[0]
    h = lm.embed_tokens(inputs["input_ids"])
    pos = inputs["position_ids"]
    cos, sin = lm.rotary_emb(h, pos)
    for j, layer in enumerate(lm.layers):
        if j == 2:
            h, cos, sin, pos = h[:, keep], cos[:, keep], sin[:, keep], pos[:, keep]
        h = layer(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)
    expected = model.lm_head(lm.norm(h))
    with exit_site(model, "drop") as site:
        site.set_visual(visual(inputs))
        logits = model(**inputs).logits
    tolerance.assert_close(logits, expected, terms=LLM_TERMS)


def test_drop_equals_mask(model: LlamaForCausalLM) -> None:
    inputs = batch(PROMPTS)
    runs, counts, per_row = {}, {}, {}
    for mode in ("drop", "mask"):
        with exit_site(model, mode) as site:
            site.set_visual(visual(inputs))
            runs[mode] = run(model, inputs)
            counts[mode], per_row[mode] = site.token_counts, site.kept_per_row.tolist()
    drop, mask = runs["drop"], runs["mask"]
    tolerance.assert_close(drop.logits, mask.logits, terms=LLM_TERMS)
    assert torch.equal(drop.tokens, mask.tokens)
    for a, b in zip(drop.scores, mask.scores, strict=True):
        tolerance.assert_close(a, b, terms=LLM_TERMS)
    # after layer 1 the rows keep their 4 and 5 text tokens: 5 slots of 8, one padding slot in row 0
    kept = max(len(p) - sum(t >= IMAGE for t in p) for p in PROMPTS)
    assert kept == 5
    assert drop.lengths == [8, 8, kept, kept] and mask.lengths == [8] * 4
    assert counts["drop"] == [8, 8, kept, kept, kept] and counts["mask"] == [8] * 5
    assert per_row["drop"] == [[8, 8, 4, 4, 4], [6, 6, 5, 5, 5]] == per_row["mask"]
    grown = NEW - 1  # the decode steps append to every layer's cache
    assert drop.gen_lengths == [8 + grown] * 2 + [kept + grown] * 2
    assert mask.gen_lengths == [8 + grown] * 4


def test_batch_equals_single(model: LlamaForCausalLM) -> None:
    inputs = batch(PROMPTS)
    with exit_site(model, "drop") as site:
        site.set_visual(visual(inputs))
        together = run(model, inputs)
        for b, prompt in enumerate(PROMPTS):
            alone = batch([prompt])
            site.set_visual(visual(alone))
            single = run(model, alone)
            tolerance.assert_close(together.logits[b], single.logits[0], terms=LLM_TERMS)
            assert torch.equal(together.tokens[b], single.tokens[0])


def test_no_visual_and_restore_are_bit_identical(model: LlamaForCausalLM) -> None:
    inputs = batch(PROMPTS)
    patched = [model.model, *model.model.layers]
    reference = run(model, inputs)
    patcher = InstancePatcher()
    site = DecoderSite(model.model, VisualExit(layer=1, mode="drop"), patcher)
    site.install()
    assert all("forward" in module.__dict__ for module in patched)
    for mask in (None, torch.zeros_like(inputs["input_ids"], dtype=torch.bool)):
        site.set_visual(mask)
        assert same(run(model, inputs), reference)
    site.set_visual(visual(inputs))
    assert not torch.equal(run(model, inputs).logits, reference.logits)  # the exit does act
    copied = copy.deepcopy(model)  # partials of bound methods: the copy gets a site of its own
    assert copied.model.forward.func.__self__ is not site
    assert copied.model.forward.func.__self__.model is copied.model
    patcher.restore()
    assert not any("forward" in module.__dict__ for module in patched)
    assert same(run(model, inputs), reference)
    assert model.config._attn_implementation == "sdpa"


def test_generate_without_cache(model: LlamaForCausalLM) -> None:
    inputs = batch(PROMPTS)
    with exit_site(model, "drop") as site:
        site.set_visual(visual(inputs))
        cached = run(model, inputs)
        uncached = run(model, inputs, use_cache=False)
        assert site.token_counts[0] == inputs["input_ids"].shape[1] + NEW - 1  # the last full recompute
    assert uncached.gen_lengths is None
    assert torch.equal(cached.tokens, uncached.tokens)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        tolerance.assert_close(a, b, terms=LLM_TERMS)


def test_sampling_drop_equals_mask(model: LlamaForCausalLM) -> None:
    inputs = batch(PROMPTS)
    samples = {}
    for mode in ("drop", "mask"):
        with exit_site(model, mode) as site:
            site.set_visual(visual(inputs))
            torch.manual_seed(1234)
            samples[mode] = run(model, inputs, do_sample=True, top_k=0).tokens
    assert torch.equal(samples["drop"], samples["mask"])


@torch.no_grad()
def test_bad_visual_shape(model: LlamaForCausalLM) -> None:
    inputs = batch(PROMPTS)
    with exit_site(model, "drop") as site:
        site.set_visual(torch.zeros(2, 9, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"\(2, 9\).*\(2, 8\)"):
            model(**inputs)
        site.set_visual(torch.zeros(3, 8, dtype=torch.bool))  # (a batch that divides it is generate's expansion)
        with pytest.raises(ValueError, match="shape"):
            model(**inputs)
    with pytest.raises(ValueError, match="layer 3 is the last"):
        DecoderSite(model.model, VisualExit(layer=3), InstancePatcher())
