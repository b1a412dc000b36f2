"""The shared pure functions (vtc.merge, vtc.kernels, TokenState) against hand computations: ToMe's
matching, size-weighted merge, proportional attention and unmerge (ToMe paper, Bolya et al., ICLR
2023, Sec. 3), EViT's top-k and fusion (Liang et al., ICLR 2022)."""

from __future__ import annotations

import math

import pytest
import tolerance
import torch

from vtc.kernels import bipartite_match, merge_weighted
from vtc.merge import (
    bipartite_soft_matching,
    keep_tokens,
    merge_capacity,
    merge_tokens,
    remap_origin,
    size_weighted_mean,
    unmerge,
)
from vtc.models.attention import attend
from vtc.sites import Signal
from vtc.state import TokenState


def reference_matching(metric: torch.Tensor, r: int, n_prefix: int) -> torch.Tensor:
    """ToMe's bipartite soft matching written out with Python loops, one image at a time."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    batch, n = metric.shape[:2]
    out = torch.empty(batch, n, dtype=torch.long)
    for b in range(batch):
        a_tokens, b_tokens = list(range(0, n, 2)), list(range(1, n, 2))
        best, partner = [], []
        for a in a_tokens:
            cands = [j for j in b_tokens if j >= n_prefix]
            if a < n_prefix or not cands:
                best.append(-math.inf)
                partner.append(None)
                continue
            sims = [float(metric[b, a] @ metric[b, j]) for j in cands]
            top = max(sims)
            best.append(top)
            partner.append(cands[sims.index(top)])
        order = sorted(range(len(a_tokens)), key=lambda i: -best[i])  # stable: ties -> lower A index
        sources = {a_tokens[i] for i in order[:r]}
        kept = list(range(n_prefix))
        kept += [a for a in a_tokens if a >= n_prefix and a not in sources]
        kept += [j for j in b_tokens if j >= n_prefix]
        slot = {t: i for i, t in enumerate(kept)}
        for i, a in enumerate(a_tokens):
            out[b, a] = slot[partner[i]] if a in sources else slot[a]
        for j in b_tokens:
            out[b, j] = slot[j]
    return out


def random_state(batch=2, n=11, c=5, n_prefix=1, sizes=True, seed=0, dtype=torch.float64) -> TokenState:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=gen, dtype=dtype)
    state = TokenState.start(x, n_prefix, None)
    if sizes:
        size = torch.randint(1, 5, (batch, n), generator=gen).to(dtype)
        size[:, :n_prefix] = 1
        state = state.replace(size=size)
    return state


# ----- bipartite soft matching --------------------------------------------------------------------
@pytest.mark.parametrize("n,n_prefix", [(11, 1), (12, 1), (13, 5), (14, 5), (10, 0), (9, 4)])
def test_matching_equals_loop_reference(n, n_prefix):
    metric = torch.randn(3, n, 6, generator=torch.Generator().manual_seed(n))
    cap = merge_capacity(n, n_prefix)
    for r in range(cap + 1):
        dest, n_out = bipartite_soft_matching(metric, r, n_prefix)
        assert n_out == n - r
        assert torch.equal(dest, reference_matching(metric, r, n_prefix)), r


def test_matching_output_slots_all_filled_and_order():
    metric = torch.randn(2, 17, 4, generator=torch.Generator().manual_seed(1))
    dest, n_out = bipartite_soft_matching(metric, 6, n_prefix=1)
    for b in range(2):
        assert torch.bincount(dest[b], minlength=n_out).min() >= 1
        # B tokens (odd positions) keep their relative order at the end of the sequence
        b_dest = dest[b, 1::2]
        assert torch.equal(b_dest, torch.arange(n_out - len(b_dest), n_out))
        # unmerged A tokens keep their relative order right after the prefix
        a_dest = dest[b, 0::2]
        kept = a_dest[a_dest < n_out - len(b_dest)]
        assert torch.equal(kept, torch.arange(len(kept)))


def test_matching_ties_go_to_lower_a_index():
    # Every A token is identical to every B token: all scores tie at 1.
    metric = torch.ones(1, 9, 3)
    dest, _ = bipartite_soft_matching(metric, 2, n_prefix=1)
    # A tokens are 0 (CLS), 2, 4, 6, 8: the two lowest non-prefix ones (2, 4) merge
    merged_a = [a for a in range(2, 9, 2) if dest[0, a] >= 1 + 2]  # kept A slots are 1..2
    assert merged_a == [2, 4]
    assert (dest[0, [2, 4]] == dest[0, 1]).all()  # into B index 0 (token 1), the lowest tie


@pytest.mark.parametrize("n_prefix", [1, 2, 5])
def test_protected_tokens_never_move_even_when_identical_to_patches(n_prefix):
    """Prefix keys equal patch keys (adversarial), still never sources or targets."""
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 21, 8, generator=gen)
    for p in range(n_prefix):
        metric[:, p] = metric[:, n_prefix + p]  # each prefix token duplicates a patch token
    cap = merge_capacity(21, n_prefix)
    dest, _ = bipartite_soft_matching(metric, cap, n_prefix)
    assert torch.equal(dest[:, :n_prefix], torch.arange(n_prefix).expand(2, -1))
    assert bool((dest[:, n_prefix:] >= n_prefix).all())


def test_matching_rejects_r_out_of_range():
    metric = torch.randn(1, 11, 4)
    with pytest.raises(ValueError, match=r"r=6 is outside .* 0 <= r <= 5"):
        bipartite_soft_matching(metric, 6, n_prefix=1)
    with pytest.raises(ValueError, match=r"r=-1 is outside"):
        bipartite_soft_matching(metric, -1, n_prefix=1)


def test_merge_capacity():
    assert merge_capacity(197, 1) == 98
    assert merge_capacity(69, 5) == 32
    assert merge_capacity(3, 5) == 0


def test_bipartite_match_kernel_masks_padding():
    metric = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, 5] = False  # a B token
    valid[0, 6] = False  # an A token
    score, index = bipartite_match(metric, n_prefix=1, valid=valid)
    assert score.shape == index.shape == (1, 4)
    assert score[0, 0] == -math.inf and score[0, 3] == -math.inf
    assert not bool((index[0, 1:3] == 2).any())  # B index 2 is token 5, padded
    assert score.dtype == torch.float32


def test_bipartite_match_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"metric must be \(B, N, D\)"):
        bipartite_match(torch.randn(4, 3))


# ----- weighted merge ------------------------------------------------------------------------------
def test_weighted_average_identity_and_conservation():
    """ToMe's size-weighted average: x_j <- (s_j x_j + sum s_i x_i) / (s_j + sum s_i); sizes and
    size*x conserved."""
    state = random_state(batch=2, n=15, c=4, n_prefix=1)
    metric = torch.randn(2, 15, 6, generator=torch.Generator().manual_seed(3))
    dest, n_out = bipartite_soft_matching(metric, 5, n_prefix=1)
    merged = merge_tokens(state, dest, n_out, prop_attn=True)
    x, s = state.x, state.size
    assert merged.x.shape == (2, n_out, 4)
    for b in range(2):
        for j in range(n_out):
            group = (dest[b] == j).nonzero().flatten()
            expected = (s[b, group, None] * x[b, group]).sum(0) / s[b, group].sum()
            tolerance.assert_close(merged.x[b, j], expected, terms=len(group), scale=float(x[b, group].abs().max()))
            assert merged.size[b, j] == s[b, group].sum()
            if len(group) == 1 and s[b, group[0]] in (1, 2, 4):  # power-of-two sizes: exact copies
                assert torch.equal(merged.x[b, j], x[b, group[0]])
    torch.testing.assert_close(merged.size.sum(1), s.sum(1), rtol=0, atol=0)
    tolerance.assert_close((merged.size[..., None] * merged.x).sum(1), (s[..., None] * x).sum(1), terms=15,
                           scale=float((s[..., None] * x).abs().sum(1).max()))
    assert merged.prop_attn and merged.grid is None
    assert torch.equal(merged.origin, dest)  # origin started as the identity


def test_merge_tokens_keeps_prop_attn_once_set():
    state = random_state(n=9).replace(prop_attn=True)
    dest, n_out = bipartite_soft_matching(torch.randn(2, 9, 3), 2, 1)
    assert merge_tokens(state, dest, n_out, prop_attn=False).prop_attn


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_merge_weighted_low_precision_accumulates_in_float32(dtype):
    x = torch.randn(2, 8, 4).to(dtype)
    dest = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3]).expand(2, -1)
    out, size = merge_weighted(x, None, dest, 4)
    assert out.dtype == dtype and size.dtype == torch.float32
    torch.testing.assert_close(out[:, 2], x[:, 3:6].float().mean(1).to(dtype))
    assert torch.equal(size[0], torch.tensor([1.0, 2.0, 3.0, 2.0]))


def test_remap_origin_composes_and_keeps_dropped():
    origin = torch.tensor([[0, 2, -1, 1, 2]])
    dest = torch.tensor([[0, 0, 1]])
    assert torch.equal(remap_origin(origin, dest), torch.tensor([[0, 1, -1, 0, 1]]))


# ----- keep / fuse ---------------------------------------------------------------------------------
def test_keep_tokens_order_and_origin():
    state = random_state(batch=1, n=8, n_prefix=2, sizes=False)
    keep = torch.tensor([[5, 2, 7]])
    out = keep_tokens(state, keep)
    assert torch.equal(out.x[0], state.x[0, [0, 1, 5, 2, 7]])
    assert out.size is None
    assert torch.equal(out.origin[0], torch.tensor([0, 1, 3, -1, -1, 2, -1, 4]))


def test_keep_tokens_fusion_uses_unnormalised_weights():
    """EViT's fusion: fused = sum_{j dropped} w_j x_j, weights not renormalised; size = sum."""
    state = random_state(batch=1, n=7, n_prefix=1, sizes=True)
    weight = torch.tensor([[0.5, 0.05, 0.1, 0.02, 0.2, 0.03, 0.1]], dtype=torch.float64)
    keep = torch.tensor([[4, 2]])
    out = keep_tokens(state, keep, fuse_weight=weight)
    dropped = [1, 3, 5, 6]
    expected = (weight[0, dropped, None] * state.x[0, dropped]).sum(0)
    torch.testing.assert_close(out.x[0, -1], expected, rtol=1e-14, atol=1e-14)
    assert out.x.shape[1] == 1 + 2 + 1
    assert out.size[0, -1] == state.size[0, dropped].sum()
    assert torch.equal(out.size[0, :3], state.size[0, [0, 4, 2]])
    assert torch.equal(out.origin[0], torch.tensor([0, 3, 2, 3, 1, 3, 3]))


def test_keep_tokens_fusion_of_equal_tokens_is_scaled_copy():
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    v = torch.randn(3, dtype=torch.float64)
    x[0, [2, 3, 5]] = v
    state = TokenState.start(x, 1, None)
    weight = torch.tensor([[0.3, 0.2, 0.1, 0.15, 0.2, 0.05]], dtype=torch.float64)
    out = keep_tokens(state, torch.tensor([[4, 1]]), fuse_weight=weight)
    torch.testing.assert_close(out.x[0, -1], (0.1 + 0.15 + 0.05) * v, rtol=1e-14, atol=1e-14)


# ----- pooling, unmerge, attention bias -----------------------------------------------------------
def test_size_weighted_mean_matches_expanded_mean():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    size = torch.tensor([[1.0, 2.0, 3.0, 1.0], [4.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    expanded = [x[b].repeat_interleave(size[b].long(), dim=0).mean(0) for b in range(2)]
    torch.testing.assert_close(size_weighted_mean(x, size, None), torch.stack(expanded))
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    masked = size_weighted_mean(x, size, valid)
    torch.testing.assert_close(masked[0], (x[0, [0, 1, 1, 3]]).mean(0))
    assert torch.equal(size_weighted_mean(x, None, None), x.mean(1))


def test_unmerge_round_trip_on_exact_duplicates():
    """Merging exact duplicates then unmerging gives the input back."""
    x = torch.randn(1, 13, 4, dtype=torch.float64)
    x[0, 4], x[0, 8] = x[0, 3], x[0, 7]  # A tokens 4, 8 duplicate the B tokens 3, 7
    metric = x.clone()
    state = TokenState.start(x, 1, None)
    dest, n_out = bipartite_soft_matching(metric, 2, n_prefix=1)
    merged = merge_tokens(state, dest, n_out, prop_attn=True)
    assert dest[0, 4] == dest[0, 3] and dest[0, 8] == dest[0, 7]
    torch.testing.assert_close(unmerge(merged), x, rtol=0, atol=1e-15)


def test_unmerge_is_constant_within_groups_and_zero_when_dropped():
    state = random_state(batch=1, n=9, n_prefix=1, sizes=False)
    dest, n_out = bipartite_soft_matching(torch.randn(1, 9, 4), 3, 1)
    merged = merge_tokens(state, dest, n_out, True)
    full = unmerge(merged)
    assert full.shape == (1, 9, state.x.shape[-1])
    for j in range(n_out):
        group = (dest[0] == j).nonzero().flatten()
        assert all(torch.equal(full[0, g], merged.x[0, j]) for g in group)
    pruned = keep_tokens(state, torch.tensor([[3, 5]]))
    full = unmerge(pruned)
    assert bool((full[0, [1, 2, 4, 6, 7, 8]] == 0).all())
    assert torch.equal(full[0, 3], state.x[0, 3])


def test_attention_bias():
    x = torch.zeros(1, 3, 2)
    state = TokenState.start(x, 1, None)
    assert state.attention_bias(torch.float32) is None
    sized = state.replace(size=torch.tensor([[1.0, 2.0, 4.0]]))
    assert sized.attention_bias(torch.float32) is None  # no proportional attention asked for
    bias = sized.replace(prop_attn=True).attention_bias(torch.float16)
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == torch.float16
    tolerance.assert_close(bias.flatten().float(), torch.tensor([0.0, math.log(2), math.log(4)]), terms=1, dtype=torch.float16)
    padded = state.replace(valid=torch.tensor([[True, False, True]])).attention_bias(torch.float32)
    assert padded.flatten().tolist() == [0.0, -math.inf, 0.0]


def test_attention_bias_keeps_float64_precision():
    size = torch.tensor([[1.0, 3.0, 7.0]], dtype=torch.float64)
    state = TokenState.start(torch.zeros(1, 3, 2, dtype=torch.float64), 1, None).replace(size=size, prop_attn=True)
    torch.testing.assert_close(state.attention_bias(torch.float64).flatten(), size.log().flatten(), rtol=1e-15, atol=1e-15)


def test_attend_cls_row_keeps_float64_precision():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    _, signals = attend(q, k, v, None, frozenset({Signal.CLS_ATTN}))
    expected = ((q @ k.transpose(-1, -2)) * 8**-0.5).softmax(-1)[:, :, 0].mean(1)
    assert signals.cls_attn.dtype == torch.float64
    tolerance.assert_close(signals.cls_attn, expected, terms=8 + 9)  # float64: a float32 row would miss by ~1e-8


def test_proportional_attention_equals_duplication():
    """Proportional attention (ToMe paper, Sec. 3): attention over duplicated keys/values ==
    de-duplicated with +log(count) bias."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    counts = torch.tensor([1, 3, 1, 2, 4])
    k_dup, v_dup = k.repeat_interleave(counts, dim=2), v.repeat_interleave(counts, dim=2)
    full, _ = attend(q, k_dup, v_dup, None, frozenset())
    bias = counts.double().log()[None, None, None, :]
    dedup, _ = attend(q, k, v, bias, frozenset())
    tolerance.assert_close(dedup, full, terms=8 + int(counts.sum()))


def test_attend_cls_row_matches_eager_softmax():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=gen) for _ in range(3))
    bias = torch.randn(2, 1, 1, 7, generator=gen)
    out, signals = attend(q, k, v, bias, frozenset({Signal.CLS_ATTN, Signal.KEY_MEAN}), scale=0.3)
    probs = ((q @ k.transpose(-1, -2)) * 0.3 + bias).softmax(-1)
    tolerance.assert_close(signals.cls_attn, probs[:, :, 0].mean(1), terms=4 + 7)  # q.k over the head, softmax over keys
    tolerance.assert_close(out, probs @ v, terms=4 + 7 + 7)
    torch.testing.assert_close(signals.key_mean, k.mean(1))
    _, none = attend(q, k, v, None, frozenset())
    assert none.cls_attn is None and none.key_mean is None


def test_merge_tokens_slot_is_real_when_any_real_token_lands_in_it():
    """A padding token sharing a slot with a real one must not mark the slot as padding,
    whichever comes first (an index scatter of ``valid`` leaves the winner unspecified)."""
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4, 1)
    valid = torch.tensor([[True, False, False, True], [False, True, False, False]])
    state = TokenState(x=x, size=None, origin=torch.arange(4).expand(2, 4), n_prefix=0, grid=None, valid=valid)
    dest = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    merged = merge_tokens(state, dest, 2, prop_attn=False)
    assert merged.valid.tolist() == [[True, True], [True, False]]
    assert merged.x[:, :, 0].tolist()[0] == [0.0, 3.0] and merged.x[1, 0, 0] == 5.0
