"""Measurement of a LLaVA under vtc: stage FLOPs (counted = analytic), tokens, KV cache, fidelity; vtc.answer."""

from __future__ import annotations

import copy

import llava_models as lm
import pytest
import torch

import vtc
from vtc.measure_vlm import answer_fidelity, profile
from vtc.train.shapes_llava_model import CHAT_TEMPLATE

NEXT_SIZES = [(64, 32), (32, 32)]


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("spec", [(), ("pool:tokens=4",), ("tome:r=2", "random:tokens=4"), ("evit:keep=0.5", "exit:layer=1"),
                                  ("m3:tokens=4",), ("tome:r=2", "m3:tokens=1")])
def test_profile_counts_match_the_analytic_model(kind, spec, llava, llava_next):
    model, processor = llava if kind == "llava" else llava_next
    sizes = NEXT_SIZES if kind == "next" else None
    inputs = processor(images=lm.images(2, sizes=sizes), text=lm.prompts(2), padding=True, return_tensors="pt")
    with vtc.apply(model, *spec) as handle:
        report = profile(model, inputs, new_tokens=3, warmup=0, repeats=1)
        assert report.visual_tokens == handle.visual_tokens
    for stage in (report.vision, report.prefill, report.decode):
        assert stage.flops > 0 and stage.seconds >= 0
        assert stage.flops_ratio == pytest.approx(1.0, abs=1e-3)
    text = inputs["attention_mask"].sum(dim=1) - (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert report.prompt_tokens == (text + torch.tensor(report.visual_tokens)).tolist()
    assert report.kv_cache_bytes > 0 and report.peak_memory_bytes is None  # CPU: no CUDA peak


def test_fewer_visual_tokens_cost_fewer_prefill_flops(llava):
    model, processor = llava
    inputs = processor(images=lm.images(2), text=lm.prompts(2), padding=True, return_tensors="pt")
    reports = {}
    for spec in ((), ("pool:tokens=4",)):
        with vtc.apply(model, *spec):
            reports[spec] = profile(model, inputs, new_tokens=2, warmup=0, repeats=1)
    full, pooled = reports[()], reports[("pool:tokens=4",)]
    assert pooled.prefill.flops < 0.7 * full.prefill.flops
    assert pooled.kv_cache_bytes < full.kv_cache_bytes


def test_profile_needs_vtc_applied(llava):
    model, processor = llava
    inputs = processor(images=lm.images(1), text=lm.prompts(1), return_tensors="pt")
    with pytest.raises(ValueError, match="needs vtc applied"):
        profile(model, inputs)


def test_answer_fidelity():
    reference = torch.tensor([[5, 6, 7, 2, 0], [5, 6, 7, 8, 9]])
    same = answer_fidelity(reference, reference.clone(), eos=2)
    assert (same.exact_match, same.token_agreement) == (1.0, 1.0)
    reduced = torch.tensor([[5, 6, 7, 2, 4], [5, 1, 7, 8, 1]])  # after eos nothing counts
    report = answer_fidelity(reference, reduced, eos=2)
    assert report.exact_match == 0.5
    assert report.token_agreement == pytest.approx((1.0 + 3 / 5) / 2)
    with pytest.raises(ValueError, match="same prompts"):
        answer_fidelity(reference, reduced[:1])


def test_answer_helper_matches_generate_and_batches(llava):
    model, processor = llava
    images = lm.images(3, seed=5)
    questions = ["what is in the picture ?", "describe this image in detail please .", "how many objects are there ?"]
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    with vtc.apply(model, "pool:tokens=4"):
        together = vtc.answer(model, processor, images, prompts, max_new_tokens=4)
        one_by_one = vtc.answer(model, processor, images, prompts, max_new_tokens=4, batch_size=1)
        inputs = processor(images=images[:1], text=prompts[:1], return_tensors="pt")
        manual = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert together == one_by_one
    assert together[0] == processor.tokenizer.decode(manual[0], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="one image .* per prompt"):
        vtc.answer(model, processor, images[:2], prompts)


def test_answer_wraps_a_bare_question_in_the_chat_template(llava):
    """A bare question goes through the processor's chat template (LLaVA-1.5's "USER: <image>\\n...
    ASSISTANT:"), giving the same answers as the full prompt; without a template it is refused."""
    model, processor = llava
    images = lm.images(2, seed=3)
    questions = ["what is in the picture ?", "how many objects are there ?"]
    with pytest.raises(ValueError, match="no chat template"):
        vtc.answer(model, processor, images, questions)
    templated = copy.copy(processor)
    templated.chat_template = CHAT_TEMPLATE
    bare = vtc.answer(model, templated, images, questions, max_new_tokens=4)
    full = vtc.answer(model, processor, images, [f"USER: <image>\n{q} ASSISTANT:" for q in questions], max_new_tokens=4)
    assert bare == full
    with pytest.raises(ValueError, match="holds 1 <image> tokens for 2 images"):
        vtc.answer(model, templated, [images], ["USER: <image>\nboth ? ASSISTANT:"])
    assert vtc.answer(model, templated, [], []) == []
    with pytest.raises(TypeError, match="got None"):
        vtc.answer(model, templated, None, questions)


def test_time_stages_interleaves_configurations_and_leaves_the_model_clean(llava):
    from vtc.measure_vlm import time_stages

    model, processor = llava
    inputs = processor(images=lm.images(2), text=lm.prompts(2), padding=True, return_tensors="pt")
    results = time_stages(model, [(), ("pool:tokens=4",)], inputs, new_tokens=3, warmup=0, repeats=1)
    assert len(results) == 2
    assert all(set(r) == {"vision", "prefill", "decode", "vision_prefill_samples"} for r in results)
    assert all(r[stage] >= 0 for r in results for stage in ("vision", "prefill", "decode"))
    assert all(len(r["vision_prefill_samples"]) == 1 and r["vision_prefill_samples"][0] > 0 for r in results)
    assert "_vtc_handle" not in model.__dict__ and "generate" not in model.__dict__
    with vtc.apply(model, "pool:tokens=4"):
        report = profile(model, inputs, new_tokens=2, timed=False)
    assert report.prefill.seconds == 0 and report.prefill.flops > 0


def test_compare_answers_runs_both_sides(llava):
    from vtc.measure_vlm import compare_answers

    model, processor = llava
    inputs = processor(images=lm.images(3, seed=3), text=lm.prompts(3), padding=True, return_tensors="pt")
    same = compare_answers(model, [], inputs, max_new_tokens=4)
    assert (same.exact_match, same.token_agreement) == (1.0, 1.0)
    pooled = compare_answers(model, ["pool:tokens=1"], inputs, max_new_tokens=4)
    assert 0.0 <= pooled.token_agreement <= 1.0 and pooled.exact_match <= 1.0
    assert "_vtc_handle" not in model.__dict__
    with vtc.apply(model), pytest.raises(ValueError, match="applies the reducers itself"):
        compare_answers(model, [], inputs)


def test_time_generation_times_whole_calls_interleaved(llava):
    from vtc.measure_vlm import time_generation

    model, processor = llava
    inputs = processor(images=lm.images(2), text=lm.prompts(2), padding=True, return_tensors="pt")
    full, pooled = time_generation(model, [(), ("pool:tokens=4",)], inputs, new_tokens=3, warmup=0, repeats=2)
    for timing in (full, pooled):
        assert (timing.batch, timing.new_tokens) == (2, 3)
        assert len(timing.first_token) == len(timing.decode) == len(timing.total) == 2
        assert all(0 < first and 0 < decode and first + decode <= total
                   for first, decode, total in zip(timing.first_token, timing.decode, timing.total))
        assert timing.decode_tokens_per_second == pytest.approx(2 / timing.decode_seconds)
        assert timing.total_tokens_per_second == pytest.approx(2 * 3 / timing.total_seconds)
        assert timing.peak_memory_bytes is None and timing.start_memory_bytes is None  # CPU
    assert pooled.visual_tokens == [4, 4] and min(full.visual_tokens) > 4
    with vtc.apply(model, "pool:tokens=4"):  # the same cache as profile() measures
        assert profile(model, inputs, new_tokens=3, timed=False).kv_cache_bytes == pooled.kv_cache_bytes
    assert pooled.kv_cache_bytes < full.kv_cache_bytes
    assert "_vtc_handle" not in model.__dict__ and "generate" not in model.__dict__
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        time_generation(model, [()], inputs, new_tokens=1)
    with vtc.apply(model), pytest.raises(ValueError, match="applies the reducers itself"):
        time_generation(model, [()], inputs)
