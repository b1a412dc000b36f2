"""HoloV (holov.md): exact budgets, crops, the holistic property, CLS attention beside SDPA, LLaVA and
LLaVA-NeXT through generate(), the bare-tower path, bad input."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.reducers.holov import _by_crop, band_crops, block_crops, crop_quotas, default_crops, holov_keep, similarity_variance


def _keep(x, attention, k, crops, real=None, **options):
    real = torch.ones(x.shape[:2], dtype=torch.bool) if real is None else real
    return holov_keep(x, attention, real, torch.full((x.shape[0],), k), band_crops(real, crops), crops, **options)[0]


def test_exactly_k_tokens_for_every_k_and_crop_count():
    generator = torch.Generator().manual_seed(0)
    n = 24
    x = torch.randn(2, n, 8, generator=generator)
    attention = torch.rand(2, n, generator=generator)
    attention[1, :5] += 50.0  # all the mass in one crop: its quota overflows
    for crops in (1, 3, 5, 7, n):
        for k in range(1, n + 1):
            keep = _keep(x, attention, k, crops)
            assert keep.sum(dim=1).tolist() == [k, k], (crops, k)


def test_exactly_k_with_padded_rows_of_different_lengths():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 8, generator=generator)
    attention = torch.rand(3, 20, generator=generator)
    real = torch.arange(20) < torch.tensor([[20], [13], [7]])
    for k in (1, 4, 7):
        keep, _ = holov_keep(x, attention, real, torch.full((3,), k), band_crops(real, 3), 3)
        assert keep.sum(1).tolist() == [k] * 3 and not bool((keep & ~real).any())


def test_quotas_redistribute_overflow_to_the_heaviest_crops_with_room():
    weight = torch.tensor([[0.9, 0.05, 0.05]])
    sizes = torch.tensor([[4, 10, 10]])
    quota = crop_quotas(weight, sizes, torch.tensor([12]))
    # floor 10/0/0, remainder to crops 0 and 1, crop 0's 7 extra split 3/3 by w(M - q), the last to crop 1
    assert quota.tolist() == [[4, 5, 3]]
    full = crop_quotas(weight, sizes, torch.tensor([24]))
    assert full.tolist() == [[4, 10, 10]]


def test_crops_bands_and_blocks():
    real = torch.ones(1, 576, dtype=torch.bool)
    crop = band_crops(real, 16)  # check 7: 36 contiguous tokens each
    assert torch.equal(crop[0], torch.arange(576) // 36)
    sizes = torch.bincount(band_crops(real, 5)[0]).tolist()
    assert sizes == [116, 115, 115, 115, 115]
    blocks = block_crops(torch.ones(1, 16, dtype=torch.bool), (4, 4), 4)[0].view(4, 4)
    assert blocks.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert [default_crops(576, k) for k in (64, 128, 192, 320)] == [16, 8, 5, 3]


def test_variance_matches_an_explicit_loop():
    x = torch.randn(1, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    crop = band_crops(torch.ones(1, 7, dtype=torch.bool), 2)
    index, sizes = _by_crop(crop, 2)
    variance = similarity_variance(x, index, sizes)
    z = torch.nn.functional.normalize(x[0], dim=-1)
    for c in range(2):
        members = index[0, c][index[0, c] >= 0].tolist()
        m = len(members)
        for slot, i in enumerate(members):
            sims = [float(z[i] @ z[j]) for j in members if j != i]
            mean = sum(sims) / (m - 1)
            expected = sum((s - mean) ** 2 for s in sims) / (m - 1)
            assert variance[0, c, slot].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_scale_invariance():
    generator = torch.Generator().manual_seed(3)
    x, attention = torch.randn(2, 30, 6, generator=generator), torch.rand(2, 30, generator=generator)
    keep = _keep(x, attention, 9, 4)
    assert torch.equal(_keep(3.0 * x, 7.0 * attention, 9, 4), keep)


def test_holistic_property_covers_a_uniform_half():
    """A 6 x 6 grid whose right half is one repeated feature with little CLS attention and whose
    left half is detailed and attended: top-K attention keeps only the left; HoloV keeps both."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 6, 6, 16, generator=generator)
    x[:, :, 3:] = torch.randn(16, generator=generator)
    attention = torch.rand(1, 6, 6, generator=generator) * 0.1
    attention[:, :, :3] += 1.0
    x, attention = x.view(1, 36, 16), attention.view(1, 36)
    right = (torch.arange(36) % 6) >= 3
    top = attention.topk(8).indices[0]
    assert not bool(right[top].any())
    keep = _keep(x, attention, 8, 4)[0]  # bands: each crop mixes both halves; the uniform tokens' variance is high
    assert bool(keep[right].any()) and bool(keep[~right].any())


def test_cls_attention_beside_sdpa_equals_eager(llava):
    import copy

    model, processor = llava
    import llava_models

    inputs = processor(images=llava_models.images(2, seed=5), text=llava_models.prompts(2), return_tensors="pt", padding=True)
    with torch.no_grad(), vtc.apply(model, "holov:k=4") as handle:
        model(**inputs)
        layer = handle.adapter.pipeline.signal_layer
        ours = handle.adapter.tower.signals[layer].cls_attn
    tower = copy.deepcopy(model.model.vision_tower)
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        eager = tower(inputs["pixel_values"], output_attentions=True).attentions[layer]
    torch.testing.assert_close(ours, eager[:, :, 0].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_k_equal_n_is_the_unreduced_llava(llava):
    model, processor = llava
    import llava_models

    inputs = processor(images=llava_models.images(2, seed=6), text=llava_models.prompts(2), return_tensors="pt", padding=True)
    n = model.config.image_seq_length if hasattr(model.config, "image_seq_length") else 16
    with torch.no_grad():
        reference = model(**inputs).logits
        stock = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtc.apply(model, f"holov:k={n}") as handle:
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert handle.visual_tokens == [n, n]
    assert torch.equal(logits, reference) and torch.equal(generated, stock)


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_batch_equals_single_runs(llava, llava_next, kind):
    import llava_models

    model, processor = llava if kind == "llava" else llava_next
    images = llava_models.images(3, seed=7)
    prompts = llava_models.prompts(3)
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), vtc.apply(model, "holov:k=5,crops=2"):
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for i in range(3):
            one = processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")
            single = model.generate(**one, max_new_tokens=4, do_sample=False)
            assert torch.equal(single[0, -4:], batched[i, -4:])


def test_bare_tower_returns_kept_features_and_indices(timm_vit):
    from vtc.holov import prune

    model = timm_vit("plain")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    features, indices = prune(model, images, 10, crops=4)
    assert features.shape[:2] == (2, 10) and indices.shape == (2, 10)
    assert bool((indices.diff(dim=1) > 0).all())  # raster order
    with torch.no_grad():
        full = model.forward_features(images)
    p = model.num_prefix_tokens
    # the features are the last block's outputs at those patches (timm's final norm aside)
    torch.testing.assert_close(model.norm(features), full[:, p:].gather(1, indices[..., None].expand(-1, -1, full.shape[-1])))


def test_bad_input_gives_clear_errors(llava):
    model, _ = llava
    for spec, message in (("holov:k=0", "k must be a positive"), ("holov:k=4,crops=0", "crops must be a positive"),
                          ("holov:k=4,shape=rings", "shape must be one of"), ("holov:k=4,rank=random", "rank must be")):
        with pytest.raises(ValueError, match=message):
            vtc.parse_reducer(spec)
    with pytest.raises(ValueError, match="more than the 16 visual tokens"):
        vtc.apply(model, "holov:k=17")
    with pytest.raises(ValueError, match="crops=17 is more than the 16"):
        vtc.apply(model, "holov:k=4,crops=17")


def test_siglip_tower_is_refused(tmp_path):
    import llava_models

    model, _ = llava_models.build_llava(tmp_path, vision="siglip", strategy="full")
    with pytest.raises(ValueError, match="no CLS token"):
        vtc.apply(model, "holov:k=4")


def test_code_order_feeds_crops_in_turn_best_first(llava, llava_next):
    import llava_models

    model, processor = llava
    inputs = processor(images=llava_models.images(2, seed=9), text=llava_models.prompts(2), return_tensors="pt", padding=True)
    with torch.no_grad(), vtc.apply(model, "holov:k=6,crops=2,order=code,rank=attention") as handle:
        model(**inputs)
        anchors = handle.adapter.visual.anchors
        attention = handle.adapter.tower.signals[handle.adapter.pipeline.signal_layer].cls_attn[:, 1:]
    for row, anchor in enumerate(anchors):  # 16 patches in 2 bands of 8: crop = anchor // 8
        crop = (anchor // 8).tolist()
        assert crop == sorted(crop)
        for c in set(crop):
            scores = attention[row, anchor[(anchor // 8) == c]]
            assert bool((scores.diff() <= 0).all())
    with pytest.raises(ValueError, match="order=code is for LLaVA-1.5"):
        vtc.apply(llava_next[0], "holov:k=6,order=code")
