"""ToMe on tiny timm ViTs: the conformance checks of tome.md section f."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.merge import size_weighted_mean
from vtc.reducers import ToMe

N_PAIRS = 5


def _exact_run(model, image, prop_attn):
    spec = f"tome:r={N_PAIRS};0;0;0,prop_attn={str(prop_attn).lower()}"
    with torch.no_grad(), vtc.apply(model, spec) as handle:
        return model(image), model.forward_features(image), handle.state, handle.token_counts


def test_lossless_merging_of_exact_duplicates(timm_vit, tools, vit_variant):
    """tome.md f.7: with positional embeddings zeroed, merging exact duplicate (A, B) pairs under
    proportional attention leaves the output unchanged; without it the output changes."""
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
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    # the size-weighted patch mean is preserved too (what avg pooling uses)
    torch.testing.assert_close(
        size_weighted_mean(features[:, p:], state.size[:, p:], None), ref_features[:, p:].mean(1), rtol=1e-12, atol=1e-12
    )

    out_plain, _, _, _ = _exact_run(model, image, prop_attn=False)
    assert (out_plain - reference).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["avg", "nocls"])
def test_avg_pooling_is_size_weighted(timm_vit, tools, variant):
    """The same exactness through timm's own head with global_pool='avg' (tome.md g.5)."""
    model = timm_vit(variant).double()
    with torch.no_grad():
        model.pos_embed.zero_()
        image, _ = tools.duplicate_pair_image(model.num_prefix_tokens, N_PAIRS)
        reference = model.forward_head(model.forward_features(image), pre_logits=True)
        with vtc.apply(model, f"tome:r={N_PAIRS};0;0;0"):
            pooled = model.forward_head(model.forward_features(image), pre_logits=True)
            # a plain (unweighted) mean over the merged tokens is measurably different
            unweighted = model.fc_norm(model.forward_features(image)[:, model.num_prefix_tokens:].mean(1))
    torch.testing.assert_close(pooled, reference, rtol=1e-12, atol=1e-12)
    assert (unweighted - reference).abs().max() > 1e-6


def test_sizes_and_origin_are_conserved(timm_vit, tools, vit_variant):
    """tome.md f.4: sizes sum to N0 per image, origin points at existing tokens, counts == sizes."""
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
    """tome.md f.11 / g.13: CLS and register tokens are never merged and stay in front."""
    model = timm_vit(variant)
    p = model.num_prefix_tokens
    with torch.no_grad(), vtc.apply(model, "tome:r=16,clamp=true") as handle:
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


@pytest.mark.parametrize("spec,final", [("tome:r=16,clamp=true", 11), ("tome:r=13", 41), ("tome:r=16,inflect=-1", 10)])
def test_official_counts_197_tokens(vit_197, tools, spec, final):
    """tome.md f.2 on ViT-B/16@224 (197 tokens, 12 blocks), planned and actually run."""
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
        ("25,clamp=true", None, 8),
        (";".join(["25"] * 8), None, 377),
        (";".join(["25"] * 16), None, 177),
        (";".join(["25"] * 22), None, 27),
        ("21", 94, 73),
        ("16", 209, 193),
        ("8", 393, 385),
    ],
)
def test_official_counts_577_tokens(vit_577, r, after_23, after_24):
    """tome.md f.2 on ViT-L/16@384 and CLIP-L/14-336 (577 tokens, 24 blocks), planned counts."""
    with vtc.apply(vit_577, f"tome:r={r}") as handle:
        counts = handle.planned_token_counts()
    assert counts[0] == 577 and len(counts) == 25
    assert counts[-1] == after_24
    if after_23 is not None:
        assert counts[-2] == after_23


def test_cap_binds_without_clamp_is_an_error(vit_577):
    """tome.md g.9: r=25 on 577 tokens exceeds the 50% cap at layer 22 (27 tokens left)."""
    with pytest.raises(ValueError, match=r"tome: layer 22 is asked to remove r=25 tokens but only 13 of its 27 tokens"):
        vtc.apply(vit_577, "tome:r=25")
    assert "_vtc_handle" not in vit_577.__dict__  # a failed apply leaves the model untouched
    vtc.apply(vit_577, "tome:r=25,clamp=true").remove()


def test_token_count_law_in_a_real_forward(timm_vit, tools):
    """N_{l+1} = N_l - min(r_l, floor((N_l - p) / 2)) with clamping, for an irregular schedule."""
    model = timm_vit("reg")
    schedule = [7, 30, 2, 40]
    with torch.no_grad(), vtc.apply(model, ToMe(r=tuple(schedule), clamp=True)) as handle:
        model(tools.images(2))
    expected = [model.num_prefix_tokens + tools.grid**2]
    for r in schedule:
        n = expected[-1]
        expected.append(n - min(r, (n - model.num_prefix_tokens) // 2))
    assert handle.token_counts == expected == handle.planned_token_counts()


def test_r_above_cap_in_first_layer_names_the_limit(timm_vit):
    model = timm_vit("plain")
    with pytest.raises(ValueError, match=r"layer 0 is asked to remove r=33 tokens but only 32 of its 65 tokens .*clamp=true"):
        vtc.apply(model, "tome:r=33")


def test_schedule_longer_than_model_is_an_error(timm_vit):
    with pytest.raises(ValueError, match="explicit schedule has 5 entries but the model has 4 layers"):
        vtc.apply(timm_vit("plain"), "tome:r=1;1;1;1;1")


def test_pair_permutation_invariance(timm_vit, tools):
    """tome.md f.8: permuting patches in whole (A, B) pairs leaves the CLS output unchanged
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
    torch.testing.assert_close(out_perm, out, rtol=1e-10, atol=1e-10)


def test_gradient_flows_through_merged_tokens(timm_vit, tools):
    """tome.md f.12: every input patch and every block gets a gradient under merging."""
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
    """The similarity metric is k averaged over heads, after qk-norm (tome.md b.1.5, module doc)."""
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
    torch.testing.assert_close(seen[1], keys.mean(1))
