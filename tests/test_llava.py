"""vtc on HF LLaVA and LLaVA-NeXT: all three sites, per-image token counts, batch = single runs, generate()."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import llava_models as lm
import pytest
import tolerance
import torch

import vtc
from vtc.merge import keep_top
from vtc.sites import ConnectorReducer, Signal, Site

NEXT_SIZES = [(64, 32), (32, 32), (32, 64)]  # (width, height): 52, 36 and 56 placeholders
LLAVA_SPECS = [(), ("pool:tokens=4",), ("random:tokens=5",), ("tome:r=2",), ("evit:keep=0.5",),
               ("tome:r=2", "random:keep=0.5"), ("pool:tokens=8", "exit:layer=1"), ("random:tokens=3,seed=4",),
               ("pool:site=encoder,tokens=4", "random:tokens=2"), ("tome:r=2", "pool:tokens=4"),
               ("evit:keep=0.5,fuse=false", "pool:tokens=4", "exit:layer=1"),  # pooling laid-back tokens
               ("pool:tokens=4", "random:tokens=2"),  # a connector chain
               ("dymu:thresholds=0.3,vtu=off", "holov:k=4"),  # per-image counts: each image its own crop count
               ("m3:tokens=4",), ("tome:r=2", "m3:tokens=1")]  # M3's nested pooling, also of merged tokens
NEXT_SPECS = [(), ("pool:tokens=9",), ("random:tokens=11",), ("tome:r=3",), ("evit:keep=0.6", "random:site=connector,tokens=4"),
              ("tome:r=2", "random:keep=0.3", "exit:layer=2"), ("tome:r=3", "pool:tokens=9"),
              ("evit:keep=0.5,fuse=false", "pool:kernel=2"), ("pool:tokens=9", "random:tokens=5"),
              ("tome:r=3", "m3:tokens=4")]


def _inputs(processor, images, texts):
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _generate(model, inputs, n=5, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def _answer(tokens: torch.Tensor, eos: int) -> list[int]:
    """Generated ids up to and including the first end-of-sequence (a batch pads after it)."""
    ids = tokens.tolist()
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _mixed_batch(processor):
    """Two prompts of different lengths; the first holds two images, the second one."""
    images = lm.images(3, seed=1)
    texts = [lm.two_image_prompt(), lm.prompts(4)[3]]
    return images, texts, [(images[:2], texts[:1]), (images[2:], texts[1:])]


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_no_reducer_is_bit_identical_to_hf(kind, llava, llava_next):
    model, processor = llava if kind == "llava" else llava_next
    sizes = NEXT_SIZES[:2] if kind == "next" else None
    inputs = _inputs(processor, lm.images(2, sizes=sizes), lm.prompts(2))
    with torch.no_grad():
        reference_tokens = _generate(model, inputs)
        reference_logits = model(**inputs).logits
        with vtc.apply(model) as handle:
            assert torch.equal(_generate(model, inputs), reference_tokens)
            assert torch.equal(model(**inputs).logits, reference_logits)
            assert handle.visual_tokens == (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


def _assert_batch_equals_singles(model, processor, images, texts, singles) -> list[int]:
    """The batch's greedy answers, last-position logits and per-image token counts equal those of
    each prompt run alone (``singles``: (images, [text]) per row); returns the batch's counts."""
    handle = model.__dict__["_vtc_handle"]
    batch = _inputs(processor, images, texts)
    tokens = _generate(model, batch)
    counts = handle.visual_tokens
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
    eos, first_image = model.generation_config.eos_token_id, 0
    for row, (imgs, text) in enumerate(singles):
        single = _inputs(processor, imgs, text)
        assert _answer(_generate(model, single)[0], eos) == _answer(tokens[row], eos)
        assert handle.visual_tokens == counts[first_image : first_image + len(imgs)]
        first_image += len(imgs)
        with torch.no_grad():
            tolerance.assert_close(model(**single).logits[:, -1], last[row : row + 1],
                                   terms=lm.llava_terms(model, batch["input_ids"].shape[1]))
    return counts


@pytest.mark.parametrize("spec", LLAVA_SPECS, ids=lambda s: "+".join(s) or "none")
def test_llava_batch_equals_single_runs(llava, spec):
    model, processor = llava
    images, texts, singles = _mixed_batch(processor)
    with vtc.apply(model, *spec):
        assert len(_assert_batch_equals_singles(model, processor, images, texts, singles)) == 3


@pytest.mark.parametrize("spec", NEXT_SPECS, ids=lambda s: "+".join(s) or "none")
def test_next_batch_equals_single_runs_with_different_counts(llava_next, spec):
    model, processor = llava_next
    images = lm.images(3, seed=2, sizes=NEXT_SIZES)
    texts = lm.prompts(3)
    singles = [(images[row : row + 1], texts[row : row + 1]) for row in range(3)]
    with vtc.apply(model, *spec):
        counts = _assert_batch_equals_singles(model, processor, images, texts, singles)
    fixed_total = any(s.startswith(("pool", "random")) for s in spec)  # a per-image budget may equalise them
    assert len(set(counts)) > 1 or fixed_total  # the images really carry different token counts


@pytest.mark.parametrize(("spec", "expected"), [("pool:tokens=4", 4), ("random:tokens=5", 5), ("random:keep=0.5", 8),
                                                ("pool:kernel=2", 4), ("tome:r=2", 12), ("evit:keep=0.5,layers=1", 9),
                                                ("random:site=encoder,keep=0.5,layers=1;", 8),
                                                ("pool:site=encoder,tokens=4,layer=1", 4)])
def test_llava_reports_the_tokens_the_llm_saw(llava, spec, expected):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with vtc.apply(model, spec) as handle:
        _generate(model, inputs, n=2)
        assert handle.visual_tokens == [expected, expected]
        assert int(handle.adapter.layout.visual.sum()) == 2 * expected  # what the LLM input actually holds
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert placeholders == 2 * 16


def test_connector_reducers_chain_in_the_order_given(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with vtc.apply(model, "pool:tokens=4", "random:tokens=2,seed=1") as handle:
        _generate(model, inputs, n=1)
        chained = [f.clone() for f in handle.adapter.visual.features]
        assert handle.visual_tokens == [2, 2]
        assert handle.adapter.reducers[Site.CONNECTOR].describe() == "pool:tokens=4 -> random:tokens=2,seed=1"
    with vtc.apply(model, "pool:tokens=4") as handle:  # the same pooled cells, then the same random pick
        _generate(model, inputs, n=1)
        pooled = handle.adapter.visual.features
    priority = torch.rand(4, generator=torch.Generator().manual_seed(1))
    pick = priority.argsort(descending=True, stable=True)[:2].sort().values
    for mine, cells in zip(chained, pooled):
        torch.testing.assert_close(mine, cells[pick])


def test_next_budget_is_per_image_and_keeps_the_newline_layout(llava_next):
    model, processor = llava_next
    inputs = _inputs(processor, lm.images(3, sizes=NEXT_SIZES), lm.prompts(3))
    newline = model.model.image_newline
    with vtc.apply(model, "random:tokens=10") as handle:
        _generate(model, inputs, n=1)
        for features in handle.adapter.visual.features:
            is_newline = (features == newline.to(features.dtype)).all(dim=1)
            assert int((~is_newline).sum()) == 10
            assert bool(is_newline[-1])  # the last map row still ends with a newline
            assert not bool(is_newline[0])  # the base view comes first


def test_decoder_drop_matches_masking_and_shortens_the_cache(llava):
    model, processor = llava
    images, texts, _ = _mixed_batch(processor)
    inputs = _inputs(processor, images, texts)
    results = {}
    for mode in ("drop", "mask"):
        with vtc.apply(model, "pool:tokens=4", f"exit:layer=1,mode={mode}") as handle:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
            cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
            results[mode] = (out.sequences, torch.stack(out.logits), [cache.layers[i].keys.shape[2] for i in range(4)],
                             handle.decoder_token_counts)
            layout = handle.adapter.layout
    drop, mask = results["drop"], results["mask"]
    assert torch.equal(drop[0], mask[0])
    tolerance.assert_close(drop[1], mask[1], terms=lm.llava_terms(model, drop[0].shape[1]))
    text_per_row = layout.attention_mask.sum(dim=1) - layout.visual.sum(dim=1)
    shorter = layout.input_ids.shape[1] - int(text_per_row.max())  # rows re-padded to the longest text
    assert drop[2][:2] == mask[2][:2]
    assert [m - d for d, m in zip(drop[2][2:], mask[2][2:])] == [shorter, shorter] and shorter > 0
    assert drop[3][2] < drop[3][1] and mask[3][2] == mask[3][1]


def test_sdpa_stays_and_no_attention_weights_are_requested(llava, monkeypatch):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with vtc.apply(model, "evit:keep=0.5", "random:tokens=4", "exit:layer=1"):
        out = model(**inputs, output_attentions=False)
    assert out.attentions is None
    assert calls  # both towers ran through SDPA
    for config in (model.config, model.config.text_config, model.config.vision_config):
        assert config._attn_implementation == "sdpa"


def test_remove_restores_bit_identical_behaviour(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    before = _generate(model, inputs)
    handle = vtc.apply(model, "tome:r=2", "random:tokens=4", "exit:layer=1")
    assert not torch.equal(_generate(model, inputs), before)
    handle.remove()
    assert torch.equal(_generate(model, inputs), before)
    for module in model.modules():
        assert "forward" not in module.__dict__
    assert "generate" not in model.__dict__ and "_vtc_handle" not in model.__dict__


def test_original_positions_continue_after_the_full_prompt(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with vtc.apply(model, positions="original") as handle:
        same = _generate(model, inputs)
    assert torch.equal(same, _generate(model, inputs))  # nothing removed: the two rules agree
    with vtc.apply(model, "pool:tokens=4", positions="original") as handle:
        _generate(model, inputs, n=1)
        layout = handle.adapter.layout
        full_length = inputs["attention_mask"].sum(dim=1)
        assert torch.equal(layout.position_ids.max(dim=1).values, full_length - 1)
        image_positions = layout.position_ids[layout.visual].view(2, 4)
        assert bool((image_positions.diff(dim=1) > 1).all())  # pooled cells keep their spread-out anchors


def test_labels_follow_the_rebuilt_sequence(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        reference = model(**inputs, labels=labels).loss
        with vtc.apply(model, "pool:tokens=4") as handle:
            out = model(**inputs, labels=labels)
            assert out.logits.shape[1] == handle.adapter.layout.input_ids.shape[1] < inputs["input_ids"].shape[1]
    assert torch.isfinite(out.loss) and not torch.isclose(out.loss, reference)
    with torch.no_grad(), vtc.apply(model):
        terms = lm.llava_terms(model, inputs["input_ids"].shape[1]) + model.config.text_config.vocab_size  # + log-softmax
        tolerance.assert_close(model(**inputs, labels=labels).loss, reference, terms=terms)


def test_bad_inputs_are_clear_errors(llava, timm_vit):
    model, processor = llava
    for spec, message in [("pool:tokens=17", "more than the 16 visual tokens"),
                          ("random:tokens=20", "more than the 16 visual tokens"),
                          ("exit:layer=3", "no layer would run without image tokens"),
                          ("exit:layer=9", r"layers \[9\] do not exist"),
                          ("pool:tokens=4,layer=1", "encoder-site option")]:
        with pytest.raises(ValueError, match=message):
            vtc.apply(model, spec)
        assert "_vtc_handle" not in model.__dict__
    with pytest.raises(ValueError, match="pool needs the vision tower's patch grid, which only the first connector reducer"):
        vtc.apply(model, "random:tokens=8", "pool:tokens=4")
    with pytest.raises(ValueError, match="act on different sides of the projector"):
        vtc.apply(model, "pool:tokens=9", "holov:k=4")
    with pytest.raises(ValueError, match="positions must be one of"):
        vtc.apply(model, positions="shifted")
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with vtc.apply(model, "pool:tokens=4"):
        extra = processor.image_processor(lm.images(3), return_tensors="pt")["pixel_values"]
        with pytest.raises(ValueError, match=r"hold 32 image placeholder tokens .* but the 3 images need 48"):
            model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=extra)
        with pytest.raises(ValueError, match="pass input_ids with pixel_values"):
            model(inputs_embeds=torch.zeros(2, 5, 64), pixel_values=inputs["pixel_values"])
    with vtc.apply(model, "exit:layer=1"), pytest.raises(ValueError, match="beam search and assisted decoding"):
        model.generate(**inputs, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="exit acts at the decoder site, but a timm model only has the encoder site"):
        vtc.apply(timm_vit("plain"), "exit:layer=1")


def test_non_llava_language_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(TypeError, match="LlamaForCausalLM; supported: .*HF LlavaForConditionalGeneration"):
        vtc.apply(model, "pool:tokens=4")


def test_sampling_and_uncached_generation(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    settings = dict(max_new_tokens=5, do_sample=True, top_k=20, temperature=1.5)
    torch.manual_seed(0)
    reference = model.generate(**inputs, **settings)
    beams = model.generate(**inputs, num_beams=2, max_new_tokens=4, do_sample=False)
    with vtc.apply(model):
        torch.manual_seed(0)
        assert torch.equal(model.generate(**inputs, **settings), reference)  # no reducer: HF's samples
        assert torch.equal(model.generate(**inputs, num_beams=2, max_new_tokens=4, do_sample=False), beams)
    with vtc.apply(model, "tome:r=2", "random:tokens=6", "exit:layer=2"):
        torch.manual_seed(1)
        sampled = model.generate(**inputs, **settings)
        assert sampled.shape == (2, inputs["input_ids"].shape[1] + 5)
        several = model.generate(**inputs, **settings, num_return_sequences=3)
        assert several.shape == (6, inputs["input_ids"].shape[1] + 5)
        assert torch.equal(several[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat_interleave(3, dim=0))
        cached = _generate(model, inputs)
        assert torch.equal(_generate(model, inputs, use_cache=False), cached)


def test_max_length_keeps_counting_from_the_callers_prompt(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    length = inputs["input_ids"].shape[1]
    with vtc.apply(model, "pool:tokens=4"), torch.no_grad():
        out = model.generate(**inputs, max_length=length + 3, do_sample=False, min_new_tokens=3)
    assert out.shape[1] == length + 3


@dataclass
class KeepByClsAttention(ConnectorReducer, register=False):  # passed as an object; no spec name
    """A connector reducer asking for the CLS attention at the feature layer (a FasterVLM-like test double)."""

    name: ClassVar[str] = "cls-keep"
    sites: ClassVar[tuple[Site, ...]] = (Site.CONNECTOR,)
    connector_needs: ClassVar[frozenset[Signal]] = frozenset({Signal.CLS_ATTN})
    tokens: int = 5
    seen: list = field(default_factory=list)

    def target(self, num_tokens: int) -> int:
        return min(self.tokens, num_tokens)

    def reduce_visual(self, state, signals, targets):
        self.seen.append(signals.cls_attn)
        return keep_top(state, signals.cls_attn, targets)


def _cls_attention_by_hand(tower, pixel_values, layer):
    """Head-mean softmax row of the CLS query at ``layer``, from HF's own hidden states."""
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    attn = tower.encoder.layers[layer].self_attn
    h = tower.encoder.layers[layer].layer_norm1(hidden)
    shape = (h.shape[0], h.shape[1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    return ((q[:, :, :1] @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)[:, 0]


def test_connector_gets_cls_attention_at_the_feature_layer(llava, llava_next):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    reducer = KeepByClsAttention(tokens=5)
    with vtc.apply(model, reducer) as handle, torch.no_grad():
        _generate(model, inputs, n=1)
        expected = _cls_attention_by_hand(model.model.vision_tower, inputs["pixel_values"], layer=1)
        width = model.config.vision_config.hidden_size  # feature layer -2 of 3; CLS dropped
        tolerance.assert_close(reducer.seen[-1], expected[:, 1:], terms=tolerance.transformer_terms(1, width, 17))
        assert handle.visual_tokens == [5, 5]
        top = expected[:, 1:].argsort(dim=1, descending=True)[:, :5].sort(dim=1).values
        assert torch.equal(handle.adapter.pipeline.last_connector_state.origin.ge(0).nonzero()[:, 1].view(2, 5), top)
    model, processor = llava_next  # per view on NeXT: each tile's CLS attention on its tokens
    inputs = _inputs(processor, lm.images(2, sizes=NEXT_SIZES[:2]), lm.prompts(2))
    reducer = KeepByClsAttention(tokens=6)
    with vtc.apply(model, reducer) as handle, torch.no_grad():
        _generate(model, inputs, n=1)
        assert all(signal.shape[0] == 1 and bool((signal > 0).all()) for signal in reducer.seen)
        newline = model.model.image_newline
        kept = [int((~(f == newline).all(dim=1)).sum()) for f in handle.adapter.visual.features]
        assert kept == [6, 6]


@pytest.mark.parametrize(("vision", "strategy", "layers", "spec", "expected"), [
    ("siglip", "full", -2, ("tome:r=2", "random:tokens=5"), 5),   # no CLS: every token is a patch
    ("clip", "full", -2, ("pool:tokens=4",), 5),                   # CLS kept in front of 4 cells
    ("clip", "full", -2, ("evit:keep=0.5", "random:tokens=3"), 4),
    ("clip", "default", [-3, -1], ("pool:tokens=4",), 4),          # two layers concatenated
])
def test_towers_strategies_and_feature_layers(tmp_path_factory, vision, strategy, layers, spec, expected):
    model, processor = lm.build_llava(tmp_path_factory.mktemp("tower"), vision=vision, strategy=strategy,
                                      feature_layer=layers)
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    reference = _generate(model, inputs)
    with vtc.apply(model):
        assert torch.equal(_generate(model, inputs), reference)
    with vtc.apply(model, *spec) as handle:
        tokens = _generate(model, inputs)
        assert handle.visual_tokens == [expected, expected]
        single = _generate(model, _inputs(processor, lm.images(1), lm.prompts(1)))
        eos = model.generation_config.eos_token_id
        assert _answer(single[0], eos) == _answer(tokens[0], eos)


def test_encoder_reducers_refused_where_tokens_cannot_follow(tmp_path_factory):
    model, _ = lm.build_llava(tmp_path_factory.mktemp("layers"), feature_layer=[-3, -1])
    with pytest.raises(ValueError, match=r"concatenates vision layers \[-3, -1\]"):
        vtc.apply(model, "tome:r=2")
    model, _ = lm.build_llava(tmp_path_factory.mktemp("siglip"), vision="siglip", strategy="default")
    with pytest.raises(ValueError, match="'default' feature strategy drops the first token"):
        vtc.apply(model, "tome:r=2")
    model, _ = lm.build_llava(tmp_path_factory.mktemp("next_full"), kind="next", strategy="full")
    with pytest.raises(ValueError, match="LLaVA-NeXT with vision_feature_select_strategy='default' only"):
        vtc.apply(model)


def test_right_padded_inputs_generate_as_left_padded(llava):
    model, processor = llava
    images, texts = lm.images(2, seed=7), lm.prompts(2)
    left = _inputs(processor, images, texts)
    processor.tokenizer.padding_side = "right"
    try:
        right = _inputs(processor, images, texts)
    finally:
        processor.tokenizer.padding_side = "left"
    assert not torch.equal(right["attention_mask"], left["attention_mask"])
    with vtc.apply(model, "random:tokens=6") as handle:
        assert torch.equal(_generate(model, right), _generate(model, left))  # generate always re-pads left
        with torch.no_grad():
            logits = model(**right).logits
        assert handle.adapter.layout.attention_mask[:, 0].all()  # forward keeps the caller's (right) padding
        ends = handle.adapter.layout.attention_mask.sum(dim=1) - 1
        with torch.no_grad():
            left_last = model(**left).logits[:, -1]
        tolerance.assert_close(logits[torch.arange(2), ends], left_last, terms=lm.llava_terms(model, left["input_ids"].shape[1]))


@pytest.mark.parametrize("encoder", ["tome:r=0;2", "evit:keep=0.5,layers=1"])
def test_connector_signal_follows_an_encoder_reduction_in_the_feature_layer(llava, encoder):
    """When the encoder reduces in the feature layer itself, the connector gets the CLS attention
    of the tokens leaving it: each token's is the sum over the tokens it absorbed (dropped ones leave)."""
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    reducer = KeepByClsAttention(tokens=3)
    with vtc.apply(model, encoder, reducer) as handle, torch.no_grad():
        _generate(model, inputs, n=1)
        tower = model.model.vision_tower
        before = _cls_attention_by_hand(tower, inputs["pixel_values"], layer=1)  # layer 0 left the tokens as they were
        origin = handle.state.origin
        assert handle.token_counts[1] == 17 > handle.token_counts[2]
    expected = torch.zeros(2, handle.token_counts[2]).scatter_add_(1, origin.clamp_min(0), before * (origin >= 0))
    width = model.config.vision_config.hidden_size  # the row at layer 1, then sums of at most 17 entries
    tolerance.assert_close(reducer.seen[-1], expected[:, 1:], terms=tolerance.transformer_terms(1, width, 17) + 17)
