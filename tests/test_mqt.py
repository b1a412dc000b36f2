"""MQT: the query transformer (pure module), its weights (vtc's and the official names), the prefix
sampler, and MQT in place of the projector of an HF LLaVA."""

from __future__ import annotations

import collections

import llava_models as lm
import numpy as np
import pytest
import tolerance
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_llava import _answer, _generate, _inputs, _mixed_batch

import vtc
from vtc.reducers.mqt import MQT, QueryTransformer, QueryTransformerConfig, from_official, sincos_2d
from vtc.train.mqt import draw_prefix


def _transformer(width=32, llm=64, queries=16, heads=4, keys="positions", seed=0) -> QueryTransformer:
    torch.manual_seed(seed)
    module = QueryTransformer(QueryTransformerConfig(width, llm, queries, heads, keys)).eval()
    with torch.no_grad():  # LayerNorm affine away from 1/0 so the checks see them
        for ln in (module.ln_q, module.ln_k, module.ln_v):
            ln.weight.normal_(1.0, 0.2)
            ln.bias.normal_(0.0, 0.2)
    return module


def test_outputs_for_m_are_the_first_m_rows_of_the_outputs_for_all_queries():
    module = _transformer()
    x = torch.randn(3, 16, 32)
    with torch.no_grad():
        full = module(x, (4, 4), 16)
        for m in (1, 2, 7, 16):
            assert torch.equal(module(x, (4, 4), m), full[:, :m])
    assert full.shape == (3, 16, 64)


def test_released_keys_make_the_attention_independent_of_the_image():
    """keys = LN_k(P): nothing but LN_v(X) reads the image, so Y(cX) = Y(X) and Y is linear in the
    normalised values; keys=features (LN_k(X) + P) breaks that linearity."""
    def combined(module, a, b, c):
        with torch.no_grad():
            return module(a, (4, 4), 16) + module(b, (4, 4), 16) - module(c, (4, 4), 16)

    def linear(module, a, b, c):
        with torch.no_grad():
            q = module.ln_q(module.query + module.pos_embed)[None]
            k = module.ln_k(module.pos_embed)[None]
            v = module.ln_v(a) + module.ln_v(b) - module.ln_v(c)
            return module.attn(q, k, v, need_weights=False)[0] @ module.proj

    a, b, c = torch.randn(3, 1, 16, 32, dtype=torch.float64)
    module = _transformer().double()
    module.ln_v.eps = 0.0  # scale invariance is exact without the variance epsilon
    with torch.no_grad():
        tolerance.assert_close(module(3.0 * a, (4, 4), 16), module(a, (4, 4), 16), terms=32)
    tolerance.assert_close(combined(module, a, b, c), linear(module, a, b, c), terms=3 * 32 * 16)
    content = _transformer(keys="features").double()
    assert not torch.allclose(combined(content, a, b, c), linear(content, a, b, c), atol=1e-3)


def test_sincos_positions_follow_mae_and_resize_bicubically():
    pos = sincos_2d(16, 1024)
    assert pos.shape == (256, 1024)
    assert float(pos.abs().max()) <= 1.0
    q = 256
    expected = torch.cat([torch.zeros(q), torch.ones(q), torch.zeros(q), torch.ones(q)])
    assert torch.equal(pos[0], expected)  # grid (0, 0): sin 0 and cos 0 for both axes
    # position 1 is column 1 of row 0: the first half moves, the second half (rows) stays at row 0
    assert torch.equal(pos[1, 512:], expected[512:])
    assert not torch.equal(pos[1, :512], expected[:512])
    module = _transformer(width=32, queries=16)
    resized = module.key_positions((6, 6))
    reference = F.interpolate(module.pos_embed.reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic",
                              align_corners=False).permute(0, 2, 3, 1).reshape(36, 32)
    assert torch.equal(resized, reference)
    assert module.key_positions((4, 4)) is module.pos_embed


def test_official_shape_has_the_official_parameter_count():
    with torch.device("meta"):
        module = QueryTransformer(QueryTransformerConfig(1024, 4096, 256, 16))
    trainable = sum(p.numel() for p in module.parameters())
    assert trainable == 8_660_992
    assert trainable + module.pos_embed.numel() == 8_923_136


def test_prefix_sampler_draws_even_numbers_uniformly():
    rng = np.random.default_rng(0)
    draws = collections.Counter(draw_prefix(rng, 256, "even") for _ in range(100_000))
    assert set(draws) == set(range(2, 257, 2))
    expected = 100_000 / 128
    assert max(abs(n - expected) for n in draws.values()) < 5 * expected ** 0.5  # 5 sigma of a binomial count
    log = [draw_prefix(rng, 256, "log-uniform") for _ in range(20_000)]
    assert min(log) == 1 and max(log) == 256
    assert np.median(log) < 40  # log-uniform: half the draws below sqrt(256) = 16 give or take rounding


def test_official_weights_load_through_the_key_map(tmp_path):
    """A state dict with the official names and shapes (MQT-LLaVA's ``model.query_abstractor.*``,
    pos_embed stored in half precision) gives the module those weights."""
    source = _transformer(queries=16, width=32, llm=64, heads=4, seed=3)
    official = {f"model.query_abstractor.{k}": v.clone() for k, v in source.state_dict().items()}
    official["model.query_abstractor.pos_embed"] = source.pos_embed.half()
    official["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)  # other keys are ignored
    loaded = from_official(official, heads=4).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, (4, 4), 16), source(x, (4, 4), 16))
    save_file({k: v.contiguous() for k, v in official.items()}, str(tmp_path / "query_abstractor.safetensors"))
    assert MQT(tokens=4, weights=str(tmp_path / "query_abstractor.safetensors")).resolve(None).config.queries == 16
    with pytest.raises(ValueError, match="missing query"):
        from_official({"model.query_abstractor.proj": torch.zeros(32, 64)})
    bad = dict(official, **{"model.query_abstractor.pos_embed": torch.zeros(16, 32)})
    with pytest.raises(ValueError, match="not the fixed 2-D sin-cos grid"):
        from_official(bad, heads=4)


@pytest.fixture(scope="module")
def llava_mqt(llava, tmp_path_factory):
    """The tiny LLaVA and a query transformer for it (16 queries on its 4x4 grid), saved to a folder."""
    model, processor = llava
    config = model.config
    module = _transformer(config.vision_config.hidden_size, config.text_config.hidden_size, 16, 4, seed=1)
    with torch.no_grad():
        module.proj.mul_(8.0)  # a tiny random model: make the image matter to greedy answers
    folder = module.save(tmp_path_factory.mktemp("mqt") / "mqt")
    return model, processor, folder


def test_replaces_the_projector_and_reloads_identically(llava_mqt):
    model, processor, folder = llava_mqt
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with torch.no_grad(), vtc.apply(model, f"mqt:tokens=5,weights={folder}") as handle:
        logits = model(**inputs).logits
        tokens = _generate(model, inputs)
        assert handle.visual_tokens == [5, 5]
    with torch.no_grad(), vtc.apply(model, MQT(tokens=5, transformer=QueryTransformer.load(folder))):
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(_generate(model, inputs), tokens)
    called = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda *a: called.append(1))
    try:
        with torch.no_grad(), vtc.apply(model, f"mqt:tokens=5,weights={folder}"):
            model(**inputs)
    finally:
        hook.remove()
    assert not called  # the projector does not run
    assert MQT(tokens=3, weights=str(folder)).describe() == f"mqt:tokens=3,weights={folder}"
    assert MQT(tokens=3, transformer=QueryTransformer.load(folder)).describe() == "mqt:tokens=3"


def test_batch_equals_single_runs_with_per_image_prefixes(llava_mqt):
    model, processor, folder = llava_mqt
    images, texts, singles = _mixed_batch(processor)
    prefixes = [3, 16, 1]
    batch = _inputs(processor, images, texts)
    with torch.no_grad(), vtc.apply(model, f"mqt:tokens={';'.join(map(str, prefixes))},weights={folder}") as handle:
        out = _generate(model, batch)
        last = model(**batch).logits[:, -1]
        assert handle.visual_tokens == prefixes
    eos, first = model.generation_config.eos_token_id, 0
    for row, (imgs, text) in enumerate(singles):
        own = ";".join(map(str, prefixes[first : first + len(imgs)])) + ";"
        single_inputs = _inputs(processor, imgs, text)
        with torch.no_grad(), vtc.apply(model, f"mqt:tokens={own},weights={folder}"):
            single = _generate(model, single_inputs)
            single_last = model(**single_inputs).logits[:, -1]
        assert _answer(out[row], eos) == _answer(single[0], eos)
        tolerance.assert_close(single_last, last[row : row + 1], terms=lm.llava_terms(model, batch["input_ids"].shape[1]))
        first += len(imgs)


def test_bad_inputs_are_clear_errors(llava_mqt, llava_next, tmp_path):
    model, processor, folder = llava_mqt
    with pytest.raises(ValueError, match="tokens=17 is more than the 16 queries"):
        vtc.apply(model, f"mqt:tokens=17,weights={folder}")
    with pytest.raises(ValueError, match="positive integers"):
        MQT(tokens=0)
    with pytest.raises(ValueError, match="never drawn at random"):
        MQT()
    with pytest.raises(ValueError, match="no query transformer"):
        vtc.apply(model, "mqt:tokens=4")
    wide = _transformer(width=48, llm=model.config.text_config.hidden_size).save(tmp_path / "wide")
    with pytest.raises(ValueError, match="reads features of width 48, this model's vision features are 32"):
        vtc.apply(model, f"mqt:tokens=4,weights={wide}")
    narrow = _transformer(width=32, llm=16).save(tmp_path / "narrow")
    with pytest.raises(ValueError, match="writes tokens of width 16"):
        vtc.apply(model, f"mqt:tokens=4,weights={narrow}")
    with pytest.raises(ValueError, match="LLaVA-1.5-style models only"):
        vtc.apply(llava_next[0], f"mqt:tokens=4,weights={folder}")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        vtc.apply(model, f"mqt:tokens=4,weights={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="queries must be a square number"):
        QueryTransformerConfig(32, 64, 15, 4)


def test_profile_counts_the_query_transformer(llava_mqt):
    """The analytic vision FLOPs (tower + the query transformer's own layers, no projector) equal
    the FLOPs torch counts."""
    from vtc.measure_vlm import profile

    model, processor, folder = llava_mqt
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with vtc.apply(model, f"mqt:tokens=3;7,weights={folder}"):
        report = profile(model, inputs, new_tokens=2, warmup=0, repeats=1)
    assert report.visual_tokens == [3, 7]
    assert report.vision.flops_ratio == pytest.approx(1.0, abs=1e-3)


# the official MQT-LLaVA checkpoint's query_abstractor (gordonhu/MQT-LLaVA-7b, Resampler of
# llava/model/multimodal_projector/builder.py): names and shapes for CLIP-L/14-336 and Vicuna-7B
OFFICIAL_SHAPES = {
    "query": (256, 1024), "pos_embed": (256, 1024), "proj": (1024, 4096),
    "attn.in_proj_weight": (3072, 1024), "attn.in_proj_bias": (3072,),
    "attn.out_proj.weight": (1024, 1024), "attn.out_proj.bias": (1024,),
    **{f"{ln}.{p}": (1024,) for ln in ("ln_q", "ln_k", "ln_v") for p in ("weight", "bias")},
}


def test_the_official_names_and_shapes_load_into_the_official_configuration():
    generator = torch.Generator().manual_seed(0)
    state = {f"model.query_abstractor.{k}": torch.randn(shape, generator=generator) * 0.02 for k, shape in OFFICIAL_SHAPES.items()}
    state["model.query_abstractor.pos_embed"] = sincos_2d(16, 1024).half()
    module = from_official(state)
    assert module.config == QueryTransformerConfig(1024, 4096, 256, 16)
    loaded = module.state_dict()
    for key in OFFICIAL_SHAPES:
        if key != "pos_embed":
            assert torch.equal(loaded[key], state[f"model.query_abstractor.{key}"]), key
    x = torch.randn(1, 576, 1024, generator=generator)  # CLIP-L/14-336: a 24x24 grid, keys resized from 16x16
    with torch.no_grad():
        assert module.eval()(x, (24, 24), 16).shape == (1, 16, 4096)
