"""Virtual token unmerging (DyMU paper, Wang et al., 2025, Sec. 3.2): the tensor algebra, a tiny
Llama LM with exact duplicate rows, the tiny LLaVA / LLaVA-NeXT, and the shipped shapes-llava with
DyMU."""

from __future__ import annotations

import pytest
import tolerance
import torch

import vtc
from vtc.models.patching import InstancePatcher
from vtc.models.vtu import VirtualMap, VirtualUnmergeSite
from vtc.reducers.dymu.unmerge import exact_attention, expand, group_mean, rope_logits
from vtc.sequence import virtual_map


def random_map(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random virtual map: each position joins an earlier group or starts its own."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.arange(length).repeat(batch, 1)
    for b in range(batch):
        for t in range(1, length):
            if torch.rand(1, generator=generator) < 0.5:
                first[b, t] = first[b, torch.randint(0, t, (1,), generator=generator)]
    return virtual_map(first)


def test_group_mean_is_the_pseudo_inverse_and_undoes_expand():
    """``group_mean`` is ``(M^T M)^-1 M^T`` and undoes ``expand``."""
    pi, unique = random_map(2, 12)
    width = int(unique.max())
    y = torch.randn(2, 12, 5, dtype=torch.float64)
    for b in range(2):
        m = torch.nn.functional.one_hot(pi[b], width).double()  # (T, U)
        ref = torch.linalg.pinv(m.T @ m) @ m.T @ y[b]
        rows = int(unique[b])
        torch.testing.assert_close(group_mean(y, pi, width)[b, :rows], ref[:rows])
    e = torch.randn(2, width, 5, dtype=torch.float64)
    restored = group_mean(expand(e, pi), pi, width)
    for b in range(2):
        rows = int(unique[b])
        torch.testing.assert_close(restored[b, :rows], e[b, :rows])


def _rope(q, cos, sin):
    half = q.shape[-1] // 2
    rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    return q * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def _tables(batch, length, dim, base=10000.0):
    theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    positions = torch.arange(length, dtype=torch.float64)[:, None] * theta
    angles = torch.cat([positions, positions], dim=-1).expand(batch, -1, -1)
    return angles.cos(), angles.sin()


def test_rope_decomposition_equals_rotated_dot_products():
    """The G/H/cos/sin logits (DyMU paper, Sec. 3.2, Eq. 10) equal rope(Q[pi]) rope(K[pi])^T."""
    pi, unique = random_map(2, 10, seed=1)
    width = int(unique.max())
    q = torch.randn(2, 3, width, 8, dtype=torch.float64)
    k = torch.randn(2, 3, width, 8, dtype=torch.float64)
    cos, sin = _tables(2, 10, 8)
    expected = _rope(expand(q, pi, 2), cos, sin) @ _rope(expand(k, pi, 2), cos, sin).transpose(-1, -2)
    torch.testing.assert_close(rope_logits(q, k, cos, sin, pi), expected)
    v = torch.randn(2, 3, width, 8, dtype=torch.float64)
    probs = (expected / 8**0.5 + torch.full((10, 10), float("-inf"), dtype=torch.float64).triu(1)).softmax(-1)
    torch.testing.assert_close(exact_attention(q, k, v, cos, sin, pi, None, 8**-0.5), probs @ expand(v, pi, 2))


def test_virtual_map_refuses_groups_that_start_later():
    with pytest.raises(ValueError, match="start at or before"):
        virtual_map(torch.tensor([[0, 2, 2]]))


# ----- a tiny Llama LM with exact duplicate rows ---------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="sdpa")
    built = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in built.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    folder = tmp_path_factory.mktemp("llama")
    built.save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval().double()


def duplicated_inputs(batch: int = 2, seed: int = 0):
    """Embeddings of text, 12 visual positions made of repeated rows (different groups per row),
    then text; with the virtual map of the repeats."""
    generator = torch.Generator().manual_seed(seed)
    length, start = 20, 4
    first = torch.arange(length).repeat(batch, 1)
    patterns = [[0, 0, 1, 1, 0, 2, 3, 3, 3, 1, 4, 5], [0, 1, 0, 1, 2, 2, 2, 3, 4, 4, 0, 5]]
    embeds = torch.randn(batch, length, 32, generator=generator, dtype=torch.float64)
    for b in range(batch):
        groups = torch.tensor(patterns[b % 2])
        firsts = torch.stack([(groups == g).nonzero()[0, 0] for g in groups]) + start
        first[b, start:start + 12] = firsts
        embeds[b, start:start + 12] = embeds[b, firsts]
    pi, unique = virtual_map(first)
    return embeds, pi, unique


def _site(model, mode):
    patcher = InstancePatcher()
    site = VirtualUnmergeSite(model.model, mode, patcher)
    site.install()
    return site, patcher


@pytest.mark.parametrize("mode", ["expand", "exact"])
def test_first_layer_attention_is_exact_on_duplicates(llama, mode):
    """Before the copies are averaged back, layer 1's attention output equals the stock
    model's on the explicit full sequence, with RoPE; after, each unique row is their mean."""
    embeds, pi, unique = duplicated_inputs()
    stock = {}
    hook = llama.model.layers[0].self_attn.register_forward_hook(lambda m, i, o: stock.setdefault("out", o[0]))
    with torch.no_grad():
        llama(inputs_embeds=embeds)
    hook.remove()
    site, patcher = _site(llama, mode)
    site.capture = {0}
    site.set_map(VirtualMap(pi, unique))
    try:
        with torch.no_grad():
            llama(inputs_embeds=embeds)
    finally:
        patcher.restore()
    torch.testing.assert_close(site.captured[0], stock["out"])
    assert unique.tolist() == [14, 14]


def _last_logit_errors(llama, embeds, pi, unique, mode):
    """|VTU - full| and |merged without VTU - full| of the last position's logits, per row."""
    with torch.no_grad():
        full = llama(inputs_embeds=embeds).logits[:, -1]
        site, patcher = _site(llama, mode)
        site.set_map(VirtualMap(pi, unique))
        try:
            virtual = llama(inputs_embeds=embeds).logits[:, -1]
        finally:
            patcher.restore()
        merged = []
        for b in range(embeds.shape[0]):
            rows = group_mean(embeds[b:b + 1], pi[b:b + 1], int(unique[b]))
            merged.append(llama(inputs_embeds=rows).logits[0, -1])
        merged = torch.stack(merged)
    return (virtual - full).abs().amax(-1), (merged - full).abs().amax(-1), virtual


def test_vtu_is_closer_to_the_full_model_than_the_merged_sequence(llama):
    """The re-merge is VTU's only approximation: over the whole LM it stays closer to the
    unreduced output than feeding the merged sequence with contiguous positions (measured)."""
    embeds, pi, unique = duplicated_inputs()
    errors = {}
    for mode in ("expand", "exact"):
        vtu_error, merged_error, errors[mode] = _last_logit_errors(llama, embeds, pi, unique, mode)
        print(f"tiny llama, {mode}: |VTU - full| {vtu_error.tolist()}, |merged - full| {merged_error.tolist()}")
        assert bool((vtu_error < merged_error).all())
    torch.testing.assert_close(errors["expand"], errors["exact"])


def test_identity_map_is_the_stock_model_and_cache_is_full_length(llama):
    """The identity map gives the stock model, and the KV cache holds the full length."""
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    pi, unique = virtual_map(torch.arange(9).repeat(2, 1))
    with torch.no_grad():
        stock = llama.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        reference = llama(ids).logits
        for mode in ("expand", "exact"):
            site, patcher = _site(llama, mode)
            site.set_map(VirtualMap(pi, unique))
            try:
                out = llama(ids, use_cache=True)
                assert out.cache.get_seq_length() == 9
                torch.testing.assert_close(out.logits, reference)
                generated = llama.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
            finally:
                patcher.restore()
            assert torch.equal(generated.sequences, stock.sequences)


# ----- LLaVA -------------------------------------------------------------------------------------
def _inputs(processor, count, seed=0, text="USER: <image>\nwhat is in the image ? ASSISTANT:"):
    import llava_models

    images = llava_models.images(count, seed=seed)
    prompts = [text.replace("what", w) for w in ("what", "describe", "where", "which")[:count]]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("mode", ["expand", "exact"])
def test_llava_without_merges_equals_the_stock_model(llava, mode):
    model, processor = llava
    inputs = _inputs(processor, 2)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**inputs).logits
        stock = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        beams = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=3)
        with vtc.apply(model, f"vtu:mode={mode}") as handle:
            out = model(**inputs).logits
            assert handle.adapter.vtu.unique_rows.tolist() == [real.shape[1]] * 2  # every position its own row
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=3), beams)
    import llava_models

    tolerance.assert_close(out[real], reference[real], terms=llava_models.llava_terms(model, real.shape[1]))
    assert torch.equal(generated, stock)


def test_llava_next_without_merges_equals_the_stock_model(llava_next):
    model, processor = llava_next
    inputs = _inputs(processor, 2)
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtc.apply(model, "vtu"):
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, stock)


@pytest.fixture(scope="module")
def tiny_dymu(llava):
    """DyMU-mid thresholds for the tiny LLaVA towers (calibrated on random 32 px images)."""
    from vtc.dymu import calibrate

    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    return vtc.DyMU(thresholds=tuple(calibrate(llava[0], images, "mid", batch_size=4, progress=False).thresholds))


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("merger", ["tome", "dymu"])
def test_merged_batch_equals_single_runs_in_generate(llava, llava_next, tiny_dymu, kind, merger):
    model, processor = llava if kind == "llava" else llava_next
    inputs = _inputs(processor, 3, seed=4)
    spec = "tome:r=3" if merger == "tome" else tiny_dymu
    with torch.no_grad(), vtc.apply(model, spec, "vtu") as handle:
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        rows = handle.adapter.vtu.unique_rows.clone()
        for i in range(3):
            one = {k: v[i:i + 1] for k, v in inputs.items() if k != "attention_mask"}
            keep = inputs["attention_mask"][i].bool()
            one["input_ids"] = inputs["input_ids"][i:i + 1, keep]
            single = model.generate(**one, max_new_tokens=4, do_sample=False)
            assert torch.equal(single[0, -4:], batched[i, -4:])
    assert bool((rows < inputs["attention_mask"].sum(1)).all())  # merged visual tokens: fewer unique rows


def test_exact_and_expand_agree_on_the_shapes_model(shapes_llava):
    from vtc.data import shapes

    model, processor = shapes_llava.model, shapes_llava.processor
    examples = shapes.examples("test", 4)
    inputs = processor(images=[e.image for e in examples], text=[shapes.PROMPT.format(question=e.question) for e in examples],
                       return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    outs = {}
    with torch.no_grad():
        for mode in ("expand", "exact"):
            with vtc.apply(model, f"dymu:preset=mid,vtu={mode}") as handle:
                outs[mode] = model(**inputs).logits
                counts = handle.image_token_counts[:, -1]
    assert len(set(counts.tolist())) > 1
    import llava_models

    # same model, attention in two formulations (N x N logits against gathered SDPA)
    tolerance.assert_close(outs["exact"][real], outs["expand"][real], terms=llava_models.llava_terms(model, real.shape[1]))


def test_vtu_is_closer_to_the_unreduced_shapes_model(shapes_llava):
    """On the shapes model with DyMU-mid: the answer-position logits with VTU are closer to the
    unreduced model's than without VTU (measured over 40 test questions, printed)."""
    from vtc.data import shapes

    model, processor = shapes_llava.model, shapes_llava.processor
    examples = shapes.examples("test", 40)
    inputs = processor(images=[e.image for e in examples], text=[shapes.PROMPT.format(question=e.question) for e in examples],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        errors = {}
        for vtu in ("expand", "off"):
            with vtc.apply(model, f"dymu:preset=mid,vtu={vtu}"):
                errors[vtu] = (model(**inputs).logits[:, -1] - reference).abs().amax(-1).mean().item()
    print(f"shapes-llava dymu mid: mean |logit error| with VTU {errors['expand']:.4f}, without {errors['off']:.4f}")
    assert errors["expand"] < errors["off"]


def test_vtu_bad_input_and_conflicts(llava):
    model, _ = llava
    with pytest.raises(ValueError, match="mode must be one of"):
        vtc.parse_reducer("vtu:mode=fast")
    with pytest.raises(ValueError, match="vtu=off"):
        vtc.apply(model, "dymu:thresholds=0.9", "exit:layer=0")
    with vtc.apply(model, "dymu:thresholds=0.9", "vtu:mode=exact") as handle:  # the explicit choice wins
        assert handle.adapter.vtu.mode == "exact"
    with pytest.raises(ValueError, match="acts at the decoder site"):
        import timm

        vtc.apply(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8), "vtu")


@pytest.mark.parametrize("mode", ["expand", "exact"])
def test_profile_counts_vtu_prefill_flops_exactly(llava, tiny_dymu, mode):
    from vtc.measure_vlm import profile

    model, processor = llava
    inputs = _inputs(processor, 2, seed=6)
    with vtc.apply(model, vtc.DyMU(thresholds=tiny_dymu.thresholds, vtu=mode)):
        report = profile(model, inputs, new_tokens=2, timed=False)
    assert report.prefill.flops_ratio == pytest.approx(1.0)
