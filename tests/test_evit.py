"""EViT (Liang et al., ICLR 2022; official code youweiliang/evit) on tiny timm ViTs and on hand-made
states: token counts, top-k selection, fusion, ties, gradients, explicit counts, permutations."""

from __future__ import annotations

import pytest
import tolerance
import torch

import vtc
from vtc.reducers import EViT
from vtc.sites import Signals
from vtc.state import TokenState

# non-CLS tokens after blocks 3, 6, 9 of a 196-patch, 12-block model (the official code's count formula)
TABLE = {
    (True, 0.9): (178, 162, 147), (True, 0.8): (158, 128, 104), (True, 0.7): (139, 99, 71),
    (True, 0.6): (119, 73, 45), (True, 0.5): (99, 51, 27),
    (False, 0.9): (177, 160, 144), (False, 0.8): (157, 126, 101), (False, 0.7): (138, 97, 68),
    (False, 0.6): (118, 71, 43), (False, 0.5): (98, 49, 25),
}


@pytest.fixture(scope="module")
def vit_197(timm_vit):
    """DeiT-S/16's token layout (14 x 14 patches + CLS, 12 blocks) at a tiny width."""
    return timm_vit("plain", img_size=56, depth=12, embed_dim=16, num_heads=2)


@pytest.mark.parametrize("fuse,keep", list(TABLE))
def test_token_count_table(vit_197, tools, fuse, keep):
    """1 + ceil(keep (N - 1)) (+1 fused) at blocks 3, 6, 9; planned == run."""
    with torch.no_grad(), vtc.apply(vit_197, EViT(keep=keep, fuse=fuse)) as handle:
        planned = handle.planned_token_counts()
        vit_197(tools.images(1, size=56))
        assert handle.token_counts == planned
    assert planned[:4] == [197] * 4
    assert tuple(planned[i] - 1 for i in (4, 7, 10)) == TABLE[fuse, keep]
    assert planned[4:7] == [planned[4]] * 3 and planned[10:] == [planned[10]] * 3


def test_keep_07_with_fusion_headline(vit_197):
    with vtc.apply(vit_197, "evit:keep=0.7,layers=3;6;9") as handle:
        counts = handle.planned_token_counts()
    assert [counts[0], counts[4], counts[7], counts[10]] == [197, 140, 100, 72]


# ----- reduce() on hand-made states -------------------------------------------------------------
def _state(n=9, c=4, n_prefix=1, seed=0):
    x = torch.randn(1, n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return TokenState.start(x, n_prefix, None)


def test_topk_keeps_rows_in_descending_attentiveness():
    """Kept rows are the residual rows of the k largest alpha, largest first."""
    state = _state(n=9)
    alpha = torch.tensor([[0.2, 0.05, 0.3, 0.01, 0.12, 0.07, 0.15, 0.02, 0.08]], dtype=torch.float64)
    out = EViT(keep=0.5, fuse=False).reduce(state, Signals(cls_attn=alpha), budget=-1, layer=0)
    # non-CLS alpha: [0.05, .3, .01, .12, .07, .15, .02, .08] -> k = ceil(0.5 * 8) = 4 -> tokens 2, 6, 4, 8
    assert torch.equal(out.x[0], state.x[0, [0, 2, 6, 4, 8]])
    assert torch.equal(out.origin[0], torch.tensor([0, -1, 1, -1, 3, -1, 2, -1, 4]))


def test_fused_token_is_unnormalised_attention_weighted_sum():
    """Fused = sum_{j not kept} alpha_j x_j (weights not renormalised), appended last."""
    state = _state(n=9)
    alpha = torch.tensor([[0.2, 0.05, 0.3, 0.01, 0.12, 0.07, 0.15, 0.02, 0.08]], dtype=torch.float64)
    out = EViT(keep=0.5).reduce(state, Signals(cls_attn=alpha), budget=-1, layer=0)
    dropped = [1, 3, 5, 7]
    expected = (alpha[0, dropped, None] * state.x[0, dropped]).sum(0)
    assert out.x.shape[1] == 1 + 4 + 1
    tolerance.assert_close(out.x[0, -1], expected, terms=len(dropped))
    assert out.size[0].tolist() == [1, 1, 1, 1, 1, 4]
    assert torch.equal(out.origin[0], torch.tensor([0, 5, 1, 5, 3, 5, 2, 5, 4]))


def test_fused_equal_tokens_give_scaled_copy_and_full_keep_is_noop():
    state = _state(n=7)
    v = torch.randn(4, dtype=torch.float64)
    x = state.x.clone()
    x[0, [1, 3, 5]] = v
    state = state.replace(x=x)
    alpha = torch.tensor([[0.4, 0.01, 0.2, 0.02, 0.2, 0.03, 0.14]], dtype=torch.float64)
    out = EViT(keep=0.5).reduce(state, Signals(cls_attn=alpha), budget=-1, layer=0)
    tolerance.assert_close(out.x[0, -1], 0.06 * v, terms=3)  # 0.01 v + 0.02 v + 0.03 v
    same = EViT(keep=1.0).reduce(state, Signals(cls_attn=alpha), budget=-1, layer=0)
    assert same is state
    same = EViT(tokens=6).reduce(state, Signals(cls_attn=alpha), budget=6, layer=0)
    assert same is state


def test_prefix_tokens_are_not_ranked():
    state = _state(n=8, n_prefix=3)
    alpha = torch.tensor([[0.3, 0.3, 0.3, 0.01, 0.04, 0.02, 0.02, 0.01]], dtype=torch.float64)
    out = EViT(keep=0.4, fuse=False).reduce(state, Signals(cls_attn=alpha), budget=-1, layer=0)
    assert torch.equal(out.x[0], state.x[0, [0, 1, 2, 4, 5]])  # ceil(0.4 * 5) = 2: tokens 4 then 5 (tie -> lower)


def test_ties_are_broken_toward_the_lower_index():
    """Identical attentiveness at the top-k boundary resolves deterministically."""
    state = _state(n=7)
    alpha = torch.tensor([[0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    out = EViT(tokens=3, fuse=False).reduce(state, Signals(cls_attn=alpha), budget=3, layer=0)
    assert torch.equal(out.x[0], state.x[0, [0, 1, 2, 3]])


def test_gradient_reaches_attentiveness_through_the_fused_token():
    """Alpha is not detached (as in the official code); only the fused (dropped) entries get a
    gradient."""
    state = _state(n=7)
    x = state.x.clone().requires_grad_(True)
    alpha = torch.tensor([[0.4, 0.01, 0.2, 0.02, 0.2, 0.03, 0.14]], dtype=torch.float64, requires_grad=True)
    out = EViT(keep=0.5).reduce(state.replace(x=x), Signals(cls_attn=alpha), budget=-1, layer=0)
    out.x[0, -1].sum().backward()
    dropped = [1, 3, 5]
    torch.testing.assert_close(alpha.grad[0, dropped], x[0, dropped].detach().sum(-1))
    assert bool((alpha.grad[0, [0, 2, 4, 6]] == 0).all())
    assert bool((x.grad[0, dropped] != 0).all())


# ----- on the model --------------------------------------------------------------------------------
def _recording_run(model, images, reducer_kwargs, layer):
    """Run EViT on ``model`` recording, at ``layer``: the block input, the state given to reduce,
    the CLS-attention signal and the reduced state."""
    seen = {}

    class Recording(EViT):
        def reduce(self, state, signals, budget, index):
            out = super().reduce(state, signals, budget, index)
            if index == layer:
                seen.update(state=state, alpha=signals.cls_attn, out=out)
            return out

    block = model.blocks[layer]
    hook = block.register_forward_pre_hook(lambda module, args: seen.__setitem__("input", args[0]))
    try:
        with torch.no_grad(), vtc.apply(model, Recording(**reducer_kwargs)):
            model(images)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("variant", ["plain", "qknorm", "reg", "eager", "layerscale", "map"])
def test_cls_attention_beside_sdpa_equals_eager_row(timm_vit, tools, variant):
    """The CLS row computed beside SDPA equals the eager softmax(q k^T) row averaged over heads,
    in a layer after an earlier reduction (with a fused token in the sequence)."""
    model = timm_vit(variant)
    seen = _recording_run(model, tools.images(2), dict(keep=0.5, layers=(1, 2)), layer=2)
    x, block = seen["input"], model.blocks[2]
    attn = block.attn
    with torch.no_grad():
        qkv = attn.qkv(block.norm1(x)).reshape(*x.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        eager = ((q * attn.scale) @ k.transpose(-1, -2)).softmax(-1)
        expected_after_attn = x + block.ls1(attn(block.norm1(x)))
    width, tokens = x.shape[-1], x.shape[1]
    # the logits (a q.k product over the head, after the norm and the projection), then the softmax sum
    tolerance.assert_close(seen["alpha"], eager[:, :, 0].mean(1), terms=3 * width + tokens)
    # the reducer sees the post-attention residual stream, not the normalised input (as the official
    # code gathers)
    tolerance.assert_close(seen["state"].x, expected_after_attn, terms=tolerance.transformer_terms(1, width, tokens))


def test_model_keeps_topk_in_order_and_fuses_the_rest(timm_vit, tools):
    model = timm_vit("reg")
    seen = _recording_run(model, tools.images(2), dict(keep=0.6, layers=(1,)), layer=1)
    p = model.num_prefix_tokens
    alpha, x_in, out = seen["alpha"][:, p:], seen["state"].x, seen["out"].x
    k = -(-6 * 64 // 10)  # ceil(0.6 * 64)
    assert out.shape[1] == p + k + 1
    for b in range(2):
        order = alpha[b].argsort(descending=True)
        assert torch.equal(out[b, :p], x_in[b, :p])
        assert torch.equal(out[b, p:p + k], x_in[b, p + order[:k]])
        rest = order[k:]
        fused = (alpha[b, rest, None] * x_in[b, p + rest]).sum(0)
        tolerance.assert_close(out[b, -1], fused, terms=len(rest), scale=float(x_in[b, p + rest].abs().max()))
        assert bool((alpha[b, order[:k]].diff() <= 0).all())


def test_tokens_override(timm_vit, tools):
    """Explicit kept counts per drop layer instead of keep (giving both is refused: test_registry)."""
    model = timm_vit("plain")
    with torch.no_grad(), vtc.apply(model, "evit:tokens=40;20;10") as handle:
        model(tools.images(2))
        assert handle.token_counts == handle.planned_token_counts() == [65, 65, 42, 22, 12]
    with torch.no_grad(), vtc.apply(model, "evit:tokens=30,fuse=false") as handle:
        model(tools.images(1))
        assert handle.token_counts == [65, 65, 31, 31, 31]


def test_state_maps_after_fusion_and_pruning(timm_vit, tools):
    model = timm_vit("reg")
    n0 = model.num_prefix_tokens + tools.grid**2
    with torch.no_grad(), vtc.apply(model, "evit:keep=0.5") as handle:
        model(tools.images(2))
        tools.check_state_maps(handle.state, n0)  # fusion: every patch is carried by some token
    with torch.no_grad(), vtc.apply(model, "evit:keep=0.5,fuse=false") as handle:
        model(tools.images(2))
        state = handle.state
        tools.check_state_maps(state, n0, dropped_allowed=True)
        assert int((state.origin[0] >= 0).sum()) == state.num_tokens


@pytest.mark.parametrize("variant", ["plain", "reg"])
def test_permutation_invariance_of_cls_output(timm_vit, tools, variant):
    """Permuting the patch tokens (positional embeddings zeroed) leaves logits unchanged."""
    model = timm_vit(variant).double()
    with torch.no_grad():
        model.pos_embed.zero_()
    image = tools.images(1, seed=7, dtype=torch.float64)
    perm = torch.randperm(tools.grid**2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vtc.apply(model, "evit:keep=0.5"):
        out = model(image)
        out_perm = model(tools.permute_patches(image, perm))
    tolerance.assert_close(out_perm, out, terms=tools.vit_terms)  # float64, sums over patches reordered


def test_gradient_flows_on_the_model(timm_vit, tools):
    model = timm_vit("plain")
    image = tools.images(2).requires_grad_(True)
    with vtc.apply(model, "evit:keep=0.5"):
        model(image).square().sum().backward()
    per_patch = image.grad.abs().reshape(2, 3, tools.grid, 4, tools.grid, 4).sum(dim=(1, 3, 5))
    assert bool((per_patch > 0).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def test_no_cls_token_is_refused(timm_vit):
    with pytest.raises(ValueError, match=r"evit: EViT ranks tokens by the CLS token's attention, and this timm model has no CLS token"):
        vtc.apply(timm_vit("nocls"), "evit:keep=0.7")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("evit:layers=1;4", r"evit: layers \[4\] do not exist; the model has layers 0..3"),
        ("evit:layers=-1", r"evit: layers \[-1\] do not exist"),
        ("evit:tokens=70", r"evit: layer 1 is asked to keep 70 tokens but has only 64 \(excluding 1 prefix tokens\)"),
        ("evit:tokens=30;40;10", r"evit: layer 2 is asked to keep 40 tokens but has only 31"),
        ("evit:tokens=3;4", r"evit: 2 token counts given for 3 drop layers \(1, 2, 3\)"),
        ("evit:keep=1.01", r"evit: keep rate must be in \(0, 1\], got 1.01"),
        ("evit:keep=0.0", r"evit: keep rate must be in \(0, 1\], got 0.0"),
    ],
)
def test_bad_budgets(timm_vit, spec, message):
    model = timm_vit("plain")
    with pytest.raises(ValueError, match=message):
        vtc.apply(model, spec)
    vtc.apply(model, "evit").remove()  # nothing was left applied
