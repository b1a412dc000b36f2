"""M3 (nested pooling at the connector): the pure pooling, the scale rules, and M3 on HF LLaVA / NeXT."""

from __future__ import annotations

import llava_models as lm
import pytest
import tolerance
import torch
import torch.nn.functional as F
from test_llava import NEXT_SIZES, _answer, _assert_batch_equals_singles, _generate, _inputs, _mixed_batch

import vtc
from vtc.reducers.m3 import M3, nested_scales, nested_sides, pool_nested
from vtc.state import TokenState


def _grid_state(x: torch.Tensor, side: int) -> TokenState:
    return TokenState.start(x, 0, (side, side))


def test_nested_scales_follow_the_smallest_prime_factor():
    assert nested_sides(24) == [24, 12, 6, 3, 1]
    assert nested_scales((24, 24)) == (576, 144, 36, 9, 1)  # the paper's LLaVA-1.5 scales
    assert nested_scales((16, 16)) == (256, 64, 16, 4, 1)
    assert nested_scales((27, 27)) == (729, 81, 9, 1)
    assert nested_scales((7, 7)) == (49, 1)
    with pytest.raises(ValueError, match="square patch grid, this model's is 4x6"):
        nested_scales((4, 6))


def test_pooling_equals_avg_pool2d_in_raster_order_and_composes():
    torch.manual_seed(0)
    side, channels = 24, 5
    z = torch.randn(3, side * side, channels, dtype=torch.float64)
    image = z.view(3, side, side, channels).permute(0, 3, 1, 2)
    for tokens in (144, 36, 9, 1):
        s = side // int(tokens ** 0.5)
        reference = F.avg_pool2d(image, s).flatten(2).transpose(1, 2)
        pooled = pool_nested(_grid_state(z, side), (side, side), [tokens] * 3)
        tolerance.assert_close(pooled.x, reference, terms=s * s)
        # raster order, one token by hand: token r * (side / s) + c is the mean of its window
        out = side // s
        r, c = min(1, out - 1), out - 1
        rows = [(s * r + i) * side + s * c + j for i in range(s) for j in range(s)]
        tolerance.assert_close(pooled.x[:, r * out + c], z[:, rows].mean(1), terms=s * s)
        # mean preservation: the pooled tokens average to the mean of all tokens
        tolerance.assert_close(pooled.x.mean(1), z.mean(1), terms=side * side)
    # nesting: pooling 144 -> 9 (by 4) equals pooling 576 -> 9 (by 8); 2 then 2 equals 4
    by_two = pool_nested(_grid_state(z, side), (side, side), [144] * 3)
    twice = pool_nested(_grid_state(by_two.x, 12), (12, 12), [36] * 3)
    once = pool_nested(_grid_state(z, side), (side, side), [36] * 3)
    tolerance.assert_close(twice.x, once.x, terms=16)
    nested = pool_nested(_grid_state(by_two.x, 12), (12, 12), [9] * 3)
    tolerance.assert_close(nested.x, pool_nested(_grid_state(z, side), (side, side), [9] * 3).x, terms=64)


def test_full_scale_is_the_identity_and_rows_take_their_own_scales():
    z = torch.randn(3, 16, 4)
    state = _grid_state(z, 4)
    assert pool_nested(state, (4, 4), [16, 16, 16]) is state
    mixed = pool_nested(state, (4, 4), [16, 4, 1])
    assert mixed.valid.sum(1).tolist() == [16, 4, 1]
    assert torch.equal(mixed.x[0], z[0])
    for row, tokens in ((1, 4), (2, 1)):
        alone = pool_nested(_grid_state(z[row : row + 1], 4), (4, 4), [tokens])
        assert torch.equal(mixed.x[row, :tokens], alone.x[0])
    with pytest.raises(ValueError, match="tokens=8 is not a nested scale of the 4x4 grid; allowed: 16, 4, 1"):
        pool_nested(state, (4, 4), [8, 4, 1])


def test_spec_strings_and_bad_options():
    assert vtc.parse_reducer("m3:tokens=36") == M3(tokens=36)
    assert vtc.parse_reducer("m3:tokens=4;1;16").tokens == (4, 1, 16)
    assert M3(tokens=(4, 1)).describe() == "m3:tokens=4;1"
    with pytest.raises(ValueError, match="give tokens=<scale>"):
        M3()
    with pytest.raises(ValueError, match="positive integers"):
        M3(tokens=0)
    with pytest.raises(ValueError, match="no spec string"):
        M3(tokens=lambda x: 4).describe()


def test_full_scale_equals_the_unreduced_model(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with torch.no_grad():
        reference = model(**inputs).logits
        tokens = _generate(model, inputs)
        with vtc.apply(model, "m3:tokens=16") as handle:
            assert torch.equal(model(**inputs).logits, reference)
            assert torch.equal(_generate(model, inputs), tokens)
            assert handle.visual_tokens == [16, 16]


@pytest.mark.parametrize("tokens", ["4", "1", "1;4;16"])
def test_llava_batch_equals_single_runs_with_per_image_scales(llava, tokens):
    model, processor = llava
    images, texts, singles = _mixed_batch(processor)  # three images over two prompts
    scales = [int(t) for t in tokens.split(";")] * (3 if ";" not in tokens else 1)
    if len(set(scales)) == 1:
        with vtc.apply(model, f"m3:tokens={tokens}"):
            assert _assert_batch_equals_singles(model, processor, images, texts, singles) == scales
    if len(set(scales)) > 1:  # a per-image list follows the batch; each single run gets its own image's scale
        batch = _inputs(processor, images, texts)
        with vtc.apply(model, f"m3:tokens={tokens}") as handle:
            out = _generate(model, batch)
            assert handle.visual_tokens == scales
        eos, first = model.generation_config.eos_token_id, 0
        for row, (imgs, text) in enumerate(singles):
            own = ";".join(map(str, scales[first : first + len(imgs)])) + ";"
            with vtc.apply(model, f"m3:tokens={own}"):
                single = _generate(model, _inputs(processor, imgs, text))
            assert _answer(out[row], eos) == _answer(single[0], eos)
            first += len(imgs)


def test_a_scale_function_chooses_per_image(llava):
    model, processor = llava
    images = lm.images(3, seed=4)
    inputs = _inputs(processor, images, lm.prompts(3))
    seen = []

    def by_norm(tokens: torch.Tensor) -> int:
        seen.append(tokens.shape)
        return 1 if len(seen) % 2 else 4

    with torch.no_grad(), vtc.apply(model, M3(tokens=by_norm)) as handle:
        model(**inputs)
    assert handle.visual_tokens == [1, 4, 1]
    assert seen == [torch.Size([16, model.config.text_config.hidden_size])] * 3


def test_bad_inputs(llava):
    model, processor = llava
    with pytest.raises(ValueError, match="allowed: 16, 4, 1"):
        vtc.apply(model, "m3:tokens=8")
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with vtc.apply(model, "m3:tokens=4;1;16"), pytest.raises(ValueError, match="lists 3 counts, one per image, but the batch has 2"):
        model(**inputs)


def test_next_pools_every_tile_then_packs(llava_next):
    """Each tile pooled to the scale, then HF's packing on the pooled tiles."""
    model, processor = llava_next
    images = lm.images(3, seed=2, sizes=NEXT_SIZES)
    texts = lm.prompts(3)
    singles = [(images[row : row + 1], texts[row : row + 1]) for row in range(3)]
    with vtc.apply(model, "m3:tokens=4"):
        counts = _assert_batch_equals_singles(model, processor, images, texts, singles)
    # (width, height) 64x32: 1x2 tiles of 2x2 pooled tokens -> a 2x4 map + 2 newlines; 32x32: 1x1 -> 2x2 + 2;
    # 32x64: 2x1 -> 4x2 + 4 (each after the base view's 4)
    assert counts == [4 + 2 * 5, 4 + 2 * 3, 4 + 4 * 3]
    with vtc.apply(model, "m3:tokens=16") as handle:
        inputs = _inputs(processor, images, texts)
        with torch.no_grad():
            model(**inputs)
        assert handle.visual_tokens == (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
