"""HoloV (the HoloV paper, Zou et al., NeurIPS 2025; docs/ARCHITECTURE.md "HoloV"): exact budgets,
crops, the holistic property, CLS attention beside SDPA, LLaVA and LLaVA-NeXT through generate(),
the bare-tower path, bad input, and parity with the official code's selection
(``tests/holov_reference.py``)."""

from __future__ import annotations

import pytest
import tolerance
import torch

import vtc
from vtc.reducers import HoloV
from vtc.reducers.holov import _by_crop, band_crops, block_crops, crop_quotas, default_crops, holov_keep, similarity_variance
from vtc.sites import Signals
from vtc.state import TokenState


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
    crop = band_crops(real, 16)  # 36 contiguous tokens each
    assert torch.equal(crop[0], torch.arange(576) // 36)
    sizes = torch.bincount(band_crops(real, 5)[0]).tolist()
    assert sizes == [116, 115, 115, 115, 115]
    blocks = block_crops(torch.ones(1, 16, dtype=torch.bool), (4, 4), 4)[0].view(4, 4)
    assert blocks.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert [default_crops(576, k) for k in (64, 128, 192, 320)] == [16, 8, 5, 3]


def test_variance_matches_an_explicit_loop():
    """The paper's off-diagonal variance, and the code's, whose sum also takes the zeroed diagonal
    (one more ``mean^2`` over the same ``M - 1``). The matrix form works in float32: a cosine of
    5-dim unit vectors (a normalisation and a dot product, 5 terms each) is off by the rounding of
    10 float32 products, a squared deviation (|deviation| <= 2) by up to 4 times that, and the
    averages keep that bound (tests/tolerance.py)."""
    bound = tolerance.tolerance(torch.float32, terms=2 * 5, scale=4.0)
    x = torch.randn(1, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    crop = band_crops(torch.ones(1, 7, dtype=torch.bool), 2)
    index, sizes = _by_crop(crop, 2)
    variance = similarity_variance(x, index, sizes)
    code = similarity_variance(x, index, sizes, diagonal=True)
    z = torch.nn.functional.normalize(x[0], dim=-1)
    for c in range(2):
        members = index[0, c][index[0, c] >= 0].tolist()
        m = len(members)
        for slot, i in enumerate(members):
            sims = [float(z[i] @ z[j]) for j in members if j != i]
            mean = sum(sims) / (m - 1)
            expected = sum((s - mean) ** 2 for s in sims) / (m - 1)
            assert variance[0, c, slot].item() == pytest.approx(expected, rel=0, abs=bound)
            assert code[0, c, slot].item() == pytest.approx(expected + mean**2 / (m - 1), rel=0, abs=bound)


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
    # SDPA and eager towers sum in other orders: patch embedding, the blocks before ``layer``, then
    # the q/k projections and logits of block ``layer`` (counted as one more block)
    vision = model.config.vision_config
    terms = 3 * vision.patch_size**2 + tolerance.transformer_terms(
        layer + 1, vision.hidden_size, eager.shape[-1], vision.intermediate_size)
    tolerance.assert_close(ours, eager[:, :, 0].mean(dim=1), terms=terms)


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
    # (the unreduced forward through vtc's blocks is timm's, op for op: bit-identical)
    assert torch.equal(model.norm(features), full[:, p:].gather(1, indices[..., None].expand(-1, -1, full.shape[-1])))
    # the code's order: the same tokens, crop by crop (4 bands of 16 patches), a crop best first
    # unless it is kept whole
    options = dict(crops=4, rank="attention", lam=0.09)
    kept, raster = prune(model, images, 10, **options)
    coded, order = prune(model, images, 10, order="code", **options)
    assert torch.equal(order.sort(dim=1).values, raster)
    at = torch.searchsorted(raster, order)  # where each token in the code's order sits in raster order
    assert torch.equal(coded, kept.gather(1, at[..., None].expand(-1, -1, kept.shape[-1])))
    for row in order.tolist():
        crops_seen = [i // 16 for i in row]
        assert crops_seen == sorted(crops_seen)
    with pytest.raises(ValueError, match="k=65 is more than the 64 visual tokens"):
        prune(model, images, 65)


def test_bad_input_gives_clear_errors(llava):
    model, _ = llava
    for spec, message in (("holov:k=0", "k must be a positive"), ("holov:k=4,crops=0", "crops must be a positive"),
                          ("holov:k=4,shape=rings", "shape must be one of"), ("holov:k=4,rank=random", "rank must be"),
                          ("holov:k=4,order=best", "order must be one of"),
                          ("holov:k=4,variance=sample", "variance must be one of")):
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


# --- parity with the official code's selection (tests/holov_reference.py) --------------------------

CODE_OPTIONS = dict(lam=0.09, rank="attention", order="code")  # the LLaVA code's configuration


def _emitted(reducer, x, attention, k):
    """Per row, the token indices ``reducer`` keeps, in the order they leave the connector."""

    batch, n, _ = x.shape
    state = TokenState.start(torch.cat([torch.zeros_like(x[:, :1]), x], dim=1), 1, None)
    signals = Signals(cls_attn=torch.cat([torch.zeros_like(attention[:, :1]), attention], dim=1))
    out = reducer.reduce_visual(state, signals, torch.full((batch,), k))
    assert out.valid is None and out.num_tokens == 1 + k
    slot = out.origin[:, 1:]
    return [sorted((i for i in range(n) if slot[b, i] >= 0), key=lambda i: int(slot[b, i])) for b in range(batch)]


def _crop_counts(kept, size, crops):
    return [sum(1 for i in kept if i // size == c) for c in range(crops)]


def test_crop_weight_epsilon_acts_on_attention_scaled_by_1000_as_in_the_code():
    """Three crops of 10 tokens with the same features, K = 10, crop mean attentions 0.0055,
    0.002 (1 + 1e-5) and the rest of 0.01, so ``w K`` is 5.5, 2.00002 and 2.49998. The code's eps
    (1e-6 against attention x 1000, i.e. 1e-9 against raw attention) leaves crop 1 at floor 2 and
    the one token left over goes to crop 0: quotas 6, 2, 2. An eps of 1e-6 against raw attention
    (weights 5e-5 to 1e-4 smaller) would drop crop 1 to floor 1 and give 6, 1, 3."""
    from holov_reference import official_selection

    size, crops, k = 10, 3, 10
    block = torch.randn(size, 8, generator=torch.Generator().manual_seed(20))
    x = block.repeat(crops, 1)[None]  # the same features in every crop: equal variance terms
    means = torch.tensor([0.0055, 0.002 * (1 + 1e-5), 0.01 - 0.0055 - 0.002 * (1 + 1e-5)], dtype=torch.float64)
    spread = 1 + 0.1 * (torch.arange(size, dtype=torch.float64) - 4.5) / 4.5  # distinct values, same mean
    attention = (means[:, None] * spread).reshape(1, -1).float()
    reference = official_selection(x[0], attention[0], crops, k)
    assert reference.quotas == [6, 2, 2] and not reference.lost_overflow and not reference.padded
    for options in ({}, CODE_OPTIONS):
        keep = holov_keep(x, attention, torch.ones(1, crops * size, dtype=torch.bool), torch.tensor([k]),
                          band_crops(torch.ones(1, crops * size, dtype=torch.bool), crops), crops,
                          **{key: v for key, v in options.items() if key != "order"})[0]
        assert _crop_counts(keep[0].nonzero()[:, 0].tolist(), size, crops) == [6, 2, 2], options
    assert _emitted(vtc.HoloV(k=k, crops=crops, **CODE_OPTIONS), x, attention, k)[0] == reference.kept


def test_code_order_emits_a_wholly_kept_crop_in_raster_order():
    """Three crops of 4, K = 6, weights 0.65 / 0.2 / 0.15: floors 3, 1, 0 and the two left over go
    to crops 0 and 1, so crop 0 keeps all 4 of its tokens. The code emits a whole crop as it stands
    (raster order) and a partial one by attention, highest first; crop 0's attention rises along the
    raster order, so best-first would reverse it."""
    from holov_reference import official_selection

    size, crops, k = 4, 3, 6
    x = torch.randn(1, crops * size, 8, generator=torch.Generator().manual_seed(21))
    rise = torch.tensor([0.7, 0.9, 1.1, 1.3])
    attention = torch.cat([0.65 * rise, 0.2 * rise.flip(0), 0.15 * rise])[None] * 1e-2
    reference = official_selection(x[0], attention[0], crops, k)
    assert reference.quotas == [4, 2, 0] and reference.kept == [0, 1, 2, 3, 4, 5]
    assert _emitted(vtc.HoloV(k=k, crops=crops, **CODE_OPTIONS), x, attention, k) == [reference.kept]


def _random_image(generator, n, d):
    """Features with a shared direction of random strength (mean cosine from ~0 to ~0.9) and CLS
    attention like a softmax row's share (positive, summing to 0.2-1, random sharpness)."""
    common = torch.randn(d, generator=generator) * float(torch.rand((), generator=generator)) * 3
    x = torch.randn(n, d, generator=generator) + common
    sharp = float(torch.rand((), generator=generator)) * 4
    attention = torch.softmax(torch.randn(n, generator=generator) * sharp, dim=0)
    return x, attention * (0.2 + 0.8 * float(torch.rand((), generator=generator)))


def test_code_configuration_keeps_the_official_sets_and_order():
    """Random images, crop counts and budgets, four images per batch: under the code's options
    (lam 0.09, attention ranking, code order, the code's variance) every image where the code
    neither loses overflow nor pads, nor has a one-token crop, keeps exactly the official code's
    tokens in the official order."""
    from holov_reference import official_selection

    generator = torch.Generator().manual_seed(22)
    compared = whole = 0
    for _ in range(150):
        n = int(torch.randint(6, 48, (), generator=generator))
        crops = int(torch.randint(1, n // 2 + 1, (), generator=generator))
        k = int(torch.randint(1, n, (), generator=generator))
        images = [_random_image(generator, n, 12) for _ in range(4)]
        x = torch.stack([image[0] for image in images])
        attention = torch.stack([image[1] for image in images])
        ours = _emitted(vtc.HoloV(k=k, crops=crops, variance="code", **CODE_OPTIONS), x, attention, k)
        for row in range(4):
            reference = official_selection(x[row], attention[row], crops, k)
            assert not reference.single_token_crop
            if reference.lost_overflow or reference.padded:
                continue
            assert ours[row] == reference.kept, (n, crops, k, row)
            compared += 1
            whole += any(q == s for q, s in zip(reference.quotas, reference.sizes))
    assert compared >= 300 and whole >= 50, (compared, whole)


def test_each_image_of_a_padded_batch_gets_its_own_crop_count():
    """After DyMU images bring different counts; the default crop count follows each image's own
    count (16 and 10 tokens at k=4: 7 and 4 crops), so every image keeps what it keeps alone."""
    torch.manual_seed(0)
    rows = [torch.randn(1, 17, 8), torch.randn(1, 11, 8)]  # CLS + 16, CLS + 10
    attention = [torch.rand(1, 17), torch.rand(1, 11)]
    padded = torch.cat([rows[0], torch.nn.functional.pad(rows[1], (0, 0, 0, 6))])
    valid = torch.arange(17).expand(2, 17) < torch.tensor([[17], [11]])
    batch = TokenState(x=padded, size=None, origin=torch.arange(17).expand(2, 17).clone(), valid=valid, n_prefix=1, grid=None)
    reducer = HoloV(k=4)
    together = reducer.reduce_visual(batch, Signals(cls_attn=torch.cat([attention[0], torch.nn.functional.pad(attention[1], (0, 6))])),
                                     torch.tensor([4, 4]))
    for row, (x, cls_attn) in enumerate(zip(rows, attention)):
        single = TokenState(x=x, size=None, origin=torch.arange(x.shape[1])[None], valid=None, n_prefix=1, grid=None)
        alone = reducer.reduce_visual(single, Signals(cls_attn=cls_attn), torch.tensor([4]))
        assert torch.equal(together.x[row, :5], alone.x[0])


@pytest.mark.parametrize("connector", ["holov", "random"])
def test_a_fixed_budget_after_dymu_caps_each_image_and_keeps_smaller_ones_whole(shapes_llava, connector):
    """DyMU leaves each image its own count; a connector budget k is a cap: images with fewer
    tokens keep them all, the others exactly k, and the batch equals single runs."""
    from PIL import Image

    from vtc.data import shapes

    model, processor = shapes_llava.model, shapes_llava.processor
    batch = shapes.examples("test", 8)
    inputs = processor(images=[Image.fromarray(e.image) for e in batch], text=[e.prompt for e in batch],
                       padding=True, return_tensors="pt")
    with torch.no_grad(), vtc.apply(model, "dymu:preset=low,vtu=off") as handle:
        model(**inputs)
        merged = handle.visual_tokens
    k = sorted(merged)[len(merged) // 2]
    assert min(merged) < k <= max(merged)  # some images below the budget, some above
    spec = f"holov:k={k}" if connector == "holov" else f"random:tokens={k}"
    with torch.no_grad(), vtc.apply(model, "dymu:preset=low,vtu=off", spec) as handle:
        model(**inputs)
        assert handle.visual_tokens == [min(n, k) for n in merged]
        batched = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        for i, example in enumerate(batch):
            one = processor(images=[Image.fromarray(example.image)], text=[example.prompt], return_tensors="pt")
            single = model.generate(**one, max_new_tokens=2, do_sample=False)
            assert torch.equal(single[0, -2:], batched[i, -2:])
