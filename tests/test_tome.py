"""ToMe on tiny timm ViTs (ToMe paper, Bolya et al., ICLR 2023, Sec. 3; official code
facebookresearch/ToMe): exactness on duplicates, invariants, official token counts and parity."""

from __future__ import annotations

import copy

import pytest
import tolerance
import torch
from tome_reference import tome_forward

import vtc
from vtc.merge import bipartite_soft_matching, size_weighted_mean
from vtc.reducers import ToMe
from vtc.sites import Signals
from vtc.state import TokenState

N_PAIRS = 5


def _exact_run(model, image, prop_attn):
    spec = f"tome:r={N_PAIRS};0;0;0,prop_attn={str(prop_attn).lower()}"
    with torch.no_grad(), vtc.apply(model, spec) as handle:
        return model(image), model.forward_features(image), handle.state, handle.token_counts


def test_lossless_merging_of_exact_duplicates(timm_vit, tools, vit_variant):
    """With positional embeddings zeroed, merging exact duplicate (A, B) pairs under proportional
    attention (ToMe paper, Sec. 3) leaves the output unchanged; without it the output changes."""
    model = timm_vit(vit_variant).double()
    with torch.no_grad():
        model.pos_embed.zero_()
        p = model.num_prefix_tokens
        image, pairs = tools.duplicate_pair_image(p, N_PAIRS)
        reference = model(image)
        ref_features = model.forward_features(image)

    out, features, state, counts = _exact_run(model, image, prop_attn=True)
    n0 = p + tools.grid**2
    assert counts == [n0, n0 - N_PAIRS, n0 - N_PAIRS, n0 - N_PAIRS, n0 - N_PAIRS]
    # only the duplicate pairs were merged
    for a, b in pairs:
        assert state.origin[0, p + a] == state.origin[0, p + b]
    assert sorted(state.size[0].tolist()) == [1.0] * (n0 - 2 * N_PAIRS) + [2.0] * N_PAIRS
    # float64: each merged pair enters the sums once with weight 2 instead of twice (another order)
    tolerance.assert_close(out, reference, terms=tools.vit_terms)
    # the size-weighted patch mean is preserved too (what avg pooling uses)
    tolerance.assert_close(
        size_weighted_mean(features[:, p:], state.size[:, p:], None), ref_features[:, p:].mean(1), terms=tools.vit_terms
    )

    out_plain, _, _, _ = _exact_run(model, image, prop_attn=False)
    assert (out_plain - reference).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["avg", "nocls"])
def test_avg_pooling_is_size_weighted(timm_vit, tools, variant):
    """The same exactness through timm's own head with global_pool='avg' (the
    official timm patch leaves timm's average pooling unweighted; vtc weights it by size)."""
    model = timm_vit(variant).double()
    with torch.no_grad():
        model.pos_embed.zero_()
        image, _ = tools.duplicate_pair_image(model.num_prefix_tokens, N_PAIRS)
        reference = model.forward_head(model.forward_features(image), pre_logits=True)
        with vtc.apply(model, f"tome:r={N_PAIRS};0;0;0"):
            pooled = model.forward_head(model.forward_features(image), pre_logits=True)
            # a plain (unweighted) mean over the merged tokens is measurably different
            unweighted = model.fc_norm(model.forward_features(image)[:, model.num_prefix_tokens:].mean(1))
    tolerance.assert_close(pooled, reference, terms=tools.vit_terms)  # float64, merged sums in other orders
    assert (unweighted - reference).abs().max() > 1e-6


def test_sizes_and_origin_are_conserved(timm_vit, tools, vit_variant):
    """Sizes sum to N0 per image, origin points at existing tokens, counts == sizes."""
    model = timm_vit(vit_variant)
    with torch.no_grad(), vtc.apply(model, "tome:r=6") as handle:
        model(tools.images(3))
        state = handle.state
    n0 = model.num_prefix_tokens + tools.grid**2
    assert state.num_tokens == n0 - 4 * 6
    tools.check_state_maps(state, n0)
    assert state.size.dtype.is_floating_point
    assert bool((state.size == state.size.round()).all()) and bool((state.size >= 1).all())


@pytest.mark.parametrize("variant", ["plain", "reg", "reg_noembed"])
def test_protected_tokens_stay_first_with_size_one(timm_vit, tools, variant):
    """CLS and register tokens are never merged and stay in front (the official code protects only
    CLS and a distillation token)."""
    model = timm_vit(variant)
    p = model.num_prefix_tokens
    with torch.no_grad(), vtc.apply(model, "tome:r=16") as handle:
        model(tools.images(2))
        state = handle.state
    assert state.n_prefix == p
    assert torch.equal(state.origin[:, :p], torch.arange(p).expand(2, p))
    assert bool((state.size[:, :p] == 1).all())
    assert bool((state.origin[:, p:] >= p).all())  # no patch was folded into a prefix token


@pytest.fixture(scope="module")
def vit_197(timm_vit):
    """ViT-B/16@224's token layout (14 x 14 patches + CLS, 12 blocks) at a tiny width."""
    return timm_vit("plain", img_size=56, depth=12, embed_dim=16, num_heads=2)


@pytest.fixture(scope="module")
def vit_577(timm_vit):
    """ViT-L/16@384's token layout (24 x 24 patches + CLS, 24 blocks) at a tiny width."""
    return timm_vit("plain", img_size=96, depth=24, embed_dim=16, num_heads=2)


@pytest.fixture(scope="module")
def vit_s16(timm_vit):
    """ViT-S/16@224's token layout (14 x 14 patches + CLS, 12 blocks) at a tiny width, other heads than vit_197."""
    return timm_vit("plain", img_size=56, depth=12, embed_dim=24, num_heads=3, seed=1)


@pytest.mark.parametrize("spec,final", [("tome:r=16", 11), ("tome:r=13", 41), ("tome:r=16,inflect=-1", 10)])
def test_official_counts_197_tokens(vit_197, tools, spec, final):
    """The official code's token counts on ViT-B/16@224 (197 tokens, 12 blocks), planned and run."""
    with torch.no_grad(), vtc.apply(vit_197, spec) as handle:
        planned = handle.planned_token_counts()
        vit_197(tools.images(1, size=56))
        assert handle.token_counts == planned
    assert planned[0] == 197 and planned[-1] == final


def test_decreasing_schedule_counts(vit_197):
    with vtc.apply(vit_197, "tome:r=16,inflect=-1") as handle:
        counts = handle.planned_token_counts()
    removed = [a - b for a, b in zip(counts, counts[1:])]
    assert removed == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]


@pytest.mark.parametrize(
    "r,after_23,after_24",
    [
        ("25", None, 8),
        (";".join(["25"] * 8), None, 377),
        (";".join(["25"] * 16), None, 177),
        (";".join(["25"] * 22), None, 27),
        ("21", 94, 73),
        ("16", 209, 193),
        ("8", 393, 385),
    ],
)
def test_official_counts_577_tokens(vit_577, r, after_23, after_24):
    """Planned counts on 577 tokens, 24 blocks: ViT-L/16@384 as printed in the official visualisation
    notebook, CLIP-L/14-336 as in DyMU's ToMe baseline (DyMU paper, Wang et al., 2025, Table 2)."""
    with vtc.apply(vit_577, f"tome:r={r}") as handle:
        counts = handle.planned_token_counts()
    assert counts[0] == 577 and len(counts) == 25
    assert counts[-1] == after_24
    if after_23 is not None:
        assert counts[-2] == after_23


def test_cap_binds_silently_by_default_and_the_handle_reports_the_realised_r(vit_577, tools):
    """r=25 on 577 tokens exceeds the 50% cap at layer 22 (27 tokens left); as in the
    official code each layer then merges half its mergeable tokens, and the handle says how many."""
    with torch.no_grad(), vtc.apply(vit_577, "tome:r=25") as handle:
        assert handle.planned_removed_per_layer() == [25] * 22 + [13, 6]
        vit_577(tools.images(1, size=96))
        assert handle.removed_per_layer == [25] * 22 + [13, 6]
        assert handle.token_counts[-1] == 8


def test_strict_refuses_r_above_the_cap(vit_577):
    """strict=true keeps the refusal: layer 22 cannot remove 25 of its 27 tokens."""
    with pytest.raises(
        ValueError,
        match=r"tome: layer 22 is asked to remove r=25 tokens but only 13 of its 27 tokens can be merged "
              r"\(half of the 26 unprotected ones\); lower r, use schedule=linear, or drop strict=true",
    ):
        vtc.apply(vit_577, "tome:r=25,strict=true")
    assert "_vtc_handle" not in vit_577.__dict__  # a failed apply leaves the model untouched
    vtc.apply(vit_577, "tome:r=21,strict=true").remove()  # within the cap everywhere


def test_strict_refuses_at_run_time_too():
    """A layer planned within the cap that receives fewer tokens at run time is refused under
    strict=true and capped silently otherwise."""
    reducer = ToMe(r=8, strict=True)
    state = TokenState.start(torch.randn(2, 9, 6), 1, None)
    signals = Signals(key_mean=torch.randn(2, 9, 4))
    with pytest.raises(ValueError, match=r"tome: layer 3 is asked to remove r=8 tokens but only 4 of its 9 .*strict=true"):
        reducer.reduce(state, signals, 8, 3)
    capped = ToMe(r=8).reduce(state, signals, 8, 3)
    assert capped.num_tokens == 9 - 4


def test_schedule_longer_than_model_is_an_error(timm_vit):
    with pytest.raises(ValueError, match="explicit schedule has 5 entries but the model has 4 layers"):
        vtc.apply(timm_vit("plain"), "tome:r=1;1;1;1;1")


def test_pair_permutation_invariance(timm_vit, tools):
    """Permuting patches in whole (A, B) pairs leaves the CLS output unchanged
    (one merging layer, so the scrambled order after merging does not feed another split)."""
    model = timm_vit("plain").double()
    with torch.no_grad():
        model.pos_embed.zero_()
    image = tools.images(1, seed=3, dtype=torch.float64)
    n_patches = tools.grid**2
    # with one prefix token, tokens (2i, 2i+1) are patches (2i-1, 2i); patches 0 and 63 are unpaired
    pairs = torch.arange(1, n_patches - 1).reshape(-1, 2)
    shuffled = pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))]
    perm = torch.cat([torch.tensor([0]), shuffled.flatten(), torch.tensor([n_patches - 1])])
    assert not torch.equal(perm, torch.arange(n_patches))
    with torch.no_grad(), vtc.apply(model, "tome:r=12;0;0;0"):
        out = model(image)
        out_perm = model(tools.permute_patches(image, perm))
    tolerance.assert_close(out_perm, out, terms=tools.vit_terms)  # float64, sums over patches reordered


def test_gradient_flows_through_merged_tokens(timm_vit, tools):
    """Every input patch and every block gets a gradient under merging."""
    model = timm_vit("plain")
    image = tools.images(2).requires_grad_(True)
    with vtc.apply(model, "tome:r=8") as handle:
        model(image).square().sum().backward()
    assert handle.token_counts[-1] == 65 - 4 * 8
    per_patch = image.grad.abs().reshape(2, 3, tools.grid, 4, tools.grid, 4).sum(dim=(1, 3, 5))
    assert bool((per_patch > 0).all())
    for block in model.blocks:
        grad = block.attn.qkv.weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["plain", "qknorm", "reg"])
def test_metric_is_head_mean_of_the_keys_attention_uses(timm_vit, tools, variant):
    """The similarity metric is k averaged over heads, after qk-norm (ToMe paper, Sec. 3;
    module doc)."""
    model = timm_vit(variant)
    seen = {}

    class Recording(ToMe):
        def reduce(self, state, signals, budget, layer):
            seen[layer] = signals.key_mean
            return super().reduce(state, signals, budget, layer)

    block = model.blocks[1]
    inputs = {}
    hook = block.register_forward_pre_hook(lambda module, args: inputs.__setitem__("x", args[0]))
    with torch.no_grad(), vtc.apply(model, Recording(r=(0, 4))):
        model(tools.images(2))
    hook.remove()
    x = inputs["x"]
    attn = block.attn
    with torch.no_grad():
        qkv = attn.qkv(block.norm1(x)).reshape(*x.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        keys = attn.k_norm(qkv[1])
    assert list(seen) == [1]
    assert torch.equal(seen[1], keys.mean(1))  # the same ops on the same inputs, in the same order


@pytest.mark.parametrize(
    "layout,r,final",
    [("ViT-B/16", 16, 11), ("ViT-S/16", 13, 41)],
)
def test_default_options_at_the_paper_settings_equal_the_official_algorithm(vit_197, vit_s16, tools, layout, r, final):
    """The README's headline settings with default options: the official token counts, and the
    same tokens, sizes, groups and logits as an independent reference of the official algorithm
    (tests/tome_reference.py) on the same weights."""
    model = copy.deepcopy(vit_197 if layout == "ViT-B/16" else vit_s16).double()
    images = tools.images(2, seed=5, size=56, dtype=torch.float64)
    ref_logits, ref_tokens, ref_size, ref_origin, ref_counts = tome_forward(model, images, [r] * 12)
    with torch.no_grad(), vtc.apply(model, f"tome:r={r}") as handle:
        planned = handle.planned_token_counts()
        tokens = model.forward_features(images)
        logits = model.forward_head(tokens)
        state = handle.state
    assert ref_counts[0] == 197 and ref_counts[-1] == final
    assert handle.token_counts == planned == ref_counts
    assert handle.removed_per_layer == [a - b for a, b in zip(ref_counts, ref_counts[1:])]
    # the same merges, in the official output order: integer-valued sizes and token indices
    assert torch.equal(state.origin, ref_origin)
    assert torch.equal(state.size, ref_size)
    # the same arithmetic in other orders (SDPA with an additive mask vs an explicit softmax, one
    # scatter vs per-token sums): patch embedding, 12 blocks over 197 tokens, the head
    width = model.embed_dim
    terms = 3 * 4 * 4 + tolerance.transformer_terms(len(model.blocks), width, 197) + width
    tolerance.assert_close(tokens, ref_tokens, terms=terms)
    tolerance.assert_close(logits, ref_logits, terms=terms)


def test_reference_differs_when_the_merges_differ(vit_197, tools):
    """The reference comparison above has teeth: another r gives other tokens and logits."""
    model = copy.deepcopy(vit_197).double()
    images = tools.images(1, seed=5, size=56, dtype=torch.float64)
    ref_logits, *_ = tome_forward(model, images, [13] * 12)
    with torch.no_grad(), vtc.apply(model, "tome:r=12"):
        logits = model(images)
    assert (logits - ref_logits).abs().max() > 1e-6


def test_no_prefix_tower_merges_down_to_one_token_and_then_passes_through(timm_vit, tools):
    """Without a CLS token the cap reaches 0 at one token: later blocks leave it alone."""
    model = timm_vit("nocls", depth=8)
    with torch.no_grad(), vtc.apply(model, "tome:r=32") as handle:
        out = model(tools.images(2))
    assert handle.token_counts == [64, 32, 16, 8, 4, 2, 1, 1, 1]
    assert handle.removed_per_layer == [32, 16, 8, 4, 2, 1, 0, 0]
    assert bool(torch.isfinite(out).all()) and bool((handle.state.size == 64).all())


@pytest.mark.parametrize("n,n_prefix", [(1, 0), (2, 1), (3, 2), (1, 1)])
def test_a_block_with_nothing_to_merge_passes_tokens_through(n, n_prefix):
    """A layer whose cap is 0 at run time (tiny token counts, with or without prefix tokens) keeps
    the state unchanged, token order included, as the official code skips such a block."""
    x = torch.randn(2, n, 6)
    state = TokenState.start(x, n_prefix, None)
    out = ToMe(r=4).reduce(state, Signals(key_mean=torch.randn(2, n, 4)), 4, 5)
    assert out is state
    dest, n_out = bipartite_soft_matching(torch.randn(2, n, 4), 0, n_prefix)
    assert n_out == n and torch.equal(dest, torch.arange(n).expand(2, n))
