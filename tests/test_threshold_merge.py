"""DyMU's thresholded bipartite merging on the shared kernels (DyMU paper, Sec. 3.1)."""

from __future__ import annotations

import pytest
import torch

from vtc.merge import bipartite_soft_matching, bipartite_threshold_matching, merge_tokens
from vtc.state import TokenState


def _state(x: torch.Tensor, n_prefix: int, valid: torch.Tensor | None = None) -> TokenState:
    return TokenState.start(x, n_prefix, None).replace(valid=valid)


def _merge(x, threshold, n_prefix, valid=None):
    dest, real, n_out = bipartite_threshold_matching(x, threshold, n_prefix, valid)
    return merge_tokens(_state(x, n_prefix, valid), dest, n_out, prop_attn=True, real=real), real


def test_threshold_one_is_the_identity():
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    out, real = _merge(x, 1.0, n_prefix=1)
    assert real.tolist() == [9, 9] and out.valid is None
    assert torch.equal(out.origin.sort(dim=1).values, torch.arange(9).expand(2, 9))  # a permutation, no merge
    torch.testing.assert_close(out.x.gather(1, out.origin[..., None].expand(-1, -1, 8)), x)


@pytest.mark.parametrize(("n", "n_prefix"), [(9, 1), (10, 0), (17, 1)])
def test_minus_infinity_merges_the_maximum(n, n_prefix):
    x = torch.randn(3, n, 4, dtype=torch.float64)
    _, real = _merge(x, float("-inf"), n_prefix)
    assert real.tolist() == [n - (n - n_prefix) // 2] * 3


def test_threshold_at_the_next_edge_reproduces_tome():
    x = torch.randn(1, 17, 6, dtype=torch.float64)
    from vtc.kernels import bipartite_match

    score, _ = bipartite_match(x, 1)
    r = 5
    tau = score.sort(descending=True).values[0, r].item()  # the (r+1)-th best edge
    dest, real, n_out = bipartite_threshold_matching(x, tau, 1)
    tome, tome_out = bipartite_soft_matching(x, r, 1)
    assert torch.equal(dest, tome) and real.item() == n_out == tome_out


def test_padded_batch_equals_single_images_over_several_steps():
    torch.manual_seed(3)
    lengths = [17, 11, 14]
    rows = [torch.randn(1, n, 8, dtype=torch.float64) for n in lengths]
    width = max(lengths)
    x = torch.zeros(3, width, 8, dtype=torch.float64)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for i, row in enumerate(rows):
        x[i, : lengths[i]] = row[0]
        valid[i, : lengths[i]] = True
    batch = _state(x, 1, valid)
    singles = [_state(row, 1) for row in rows]
    for step, tau in enumerate((0.2, 0.0, -0.3)):
        dest, real, n_out = bipartite_threshold_matching(batch.x, tau, 1, batch.valid)
        batch = merge_tokens(batch, dest, n_out, True, real)
        for i, single in enumerate(singles):
            d, r, w = bipartite_threshold_matching(single.x, tau, 1, single.valid)
            singles[i] = single = merge_tokens(single, d, w, True, r)
            count = int(batch.valid[i].sum())
            assert count == single.x.shape[1] == int(real[i]), f"step {step}, image {i}"
            assert bool(batch.valid[i, :count].all())  # real tokens first, padding after
            torch.testing.assert_close(batch.x[i, :count], single.x[0])
            torch.testing.assert_close(batch.size[i, :count], single.sizes()[0])
            assert torch.equal(batch.origin[i, : lengths[i]], single.origin[0])
    assert len(set(int(v) for v in batch.valid.sum(dim=1))) > 1  # the images kept different counts
