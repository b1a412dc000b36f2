"""Encoder reducers compose with grid pooling at the connector: reduced tokens are laid back on the
patch grid through ``origin`` (``vtc.grid``) before ``Pool`` averages its windows."""

from __future__ import annotations

import llava_models as lm
import pytest
import tolerance
import torch

import vtc
from vtc.grid import lay_on_grid, lay_scores
from vtc.merge import bipartite_soft_matching, keep_tokens, merge_tokens, unmerge
from vtc.reducers import Pool
from vtc.sites import Signals
from vtc.state import TokenState


def _hand_state() -> TokenState:
    """One CLS token and a 2 x 3 grid (7 positions) carried by 4 tokens in two different ways."""
    x = torch.arange(2 * 4 * 2, dtype=torch.float64).view(2, 4, 2) + 1
    origin = torch.tensor([[0, 1, 1, 2, -1, 3, 2],    # token 1 covers patches 0, 1; patch 3 dropped
                           [0, 3, 2, 1, 1, 2, 3]])
    size = torch.tensor([[1.0, 2, 2, 1], [1.0, 2, 2, 2]], dtype=torch.float64)
    return TokenState(x=x, size=size, origin=origin, valid=None, n_prefix=1, grid=None)


def test_lay_on_grid_puts_every_token_on_the_positions_it_carries():
    state = _hand_state()
    laid = lay_on_grid(state, (2, 3))
    assert laid.grid == (2, 3) and laid.n_prefix == 1 and laid.size is None and not laid.prop_attn
    for b in range(2):
        for j, token in enumerate(state.origin[b].tolist()):
            expected = torch.zeros(2, dtype=torch.float64) if token < 0 else state.x[b, token]
            assert torch.equal(laid.x[b, j], expected)
    assert torch.equal(laid.valid, state.origin >= 0)
    assert torch.equal(laid.origin, torch.tensor([[0, 1, 2, 3, -1, 5, 6], list(range(7))]))
    full = lay_on_grid(state.replace(origin=state.origin[1:], x=state.x[1:], size=state.size[1:]), (2, 3))
    assert full.valid is None  # nothing dropped: no padding


def test_lay_on_grid_refuses_a_grid_that_does_not_match_origin():
    with pytest.raises(ValueError, match=r"origin spans 7 positions, but 1 prefix tokens and a 3x3 grid make 10"):
        lay_on_grid(_hand_state(), (3, 3))


def test_lay_scores_follows_the_carrying_token():
    state = _hand_state()
    score = torch.tensor([[0.5, 0.1, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1]])
    laid = lay_scores(score, state.origin)
    assert torch.equal(laid, torch.tensor([[0.5, 0.1, 0.1, 0.2, 0.0, 0.3, 0.2], [0.4, 0.1, 0.2, 0.3, 0.3, 0.2, 0.1]]))


def _reduced_state(batch: int = 3, rows: int = 6, cols: int = 6, prefix: int = 1, seed: int = 0) -> TokenState:
    """A float64 state after a ToMe merge and a per-image pruning of its tokens (ragged survivors)."""
    generator = torch.Generator().manual_seed(seed)
    n = prefix + rows * cols
    x = torch.randn(batch, n, 5, generator=generator, dtype=torch.float64)
    state = TokenState.start(x, prefix, (rows, cols))
    dest, n_out = bipartite_soft_matching(x, 12, prefix)
    state = merge_tokens(state, dest, n_out, prop_attn=True)
    score = torch.rand(batch, state.num_tokens - prefix, generator=generator)
    keep = score.argsort(dim=1, descending=True)[:, : (state.num_tokens - prefix) // 3] + prefix
    return keep_tokens(state, keep)


def _pool_by_hand(state: TokenState, grid: tuple[int, int], cells: tuple[int, int]) -> tuple[list, list]:
    """Per row, the mean of the carried positions of every balanced window (None: all dropped) and its count."""
    rows, cols = grid
    p = state.n_prefix
    full = unmerge(state)
    means, counts = [], []
    for b in range(state.x.shape[0]):
        row_means, row_counts = [], []
        for i in range(cells[0]):
            for j in range(cells[1]):
                positions = [p + r * cols + c for r in range(rows) for c in range(cols)
                             if r * cells[0] // rows == i and c * cells[1] // cols == j]
                carried = [q for q in positions if state.origin[b, q] >= 0]
                row_counts.append(len(carried))
                row_means.append(full[b, carried].mean(0) if carried else None)
        means.append(row_means)
        counts.append(row_counts)
    return means, counts


@pytest.mark.parametrize("prefix", [0, 1])
def test_pool_after_lay_on_grid_is_the_mean_of_each_windows_surviving_positions(prefix):
    state = _reduced_state(prefix=prefix)
    assert bool((state.origin < 0).any()) and bool((state.size > 1).any())  # merged and dropped tokens
    laid = lay_on_grid(state, (6, 6))
    pooled = Pool(tokens=9).reduce_visual(laid, Signals(), torch.tensor([9, 9, 9]))
    means, counts = _pool_by_hand(state, (6, 6), (3, 3))
    assert pooled.x.shape[1] == prefix + 9 and pooled.grid == (3, 3)
    assert torch.equal(pooled.x[:, :prefix], state.x[:, :prefix])
    empty = 0
    for b in range(3):
        for cell, (mean, count) in enumerate(zip(means[b], counts[b])):
            slot = prefix + cell
            assert float(pooled.size[b, slot]) == count  # surviving positions, not tokens
            if mean is None:  # every position dropped: padding, no invented features
                empty += 1
                assert not bool(pooled.valid[b, slot]) and bool((pooled.x[b, slot] == 0).all())
            else:
                assert bool(pooled.valid[b, slot])
                tolerance.assert_close(pooled.x[b, slot], mean, terms=count)
    assert empty > 0  # the case this test is about occurs
    assert bool((pooled.origin[state.origin < 0] == -1).all())


def test_merged_tokens_count_once_per_covered_position():
    """Pooling spreads a merged token over the windows it covers: the pooled cells' size-weighted
    sum is the reduced tokens' size-weighted sum (nothing counted twice or lost)."""
    state = _reduced_state(seed=3)
    pooled = Pool(kernel=4).reduce_visual(lay_on_grid(state, (6, 6)), Signals(), torch.tensor([4, 4, 4]))
    weighted = (pooled.sizes()[..., None] * pooled.x).sum(1)
    expected = (state.sizes()[..., None] * state.x).sum(1)
    tolerance.assert_close(weighted, expected, terms=37)
    assert torch.equal(pooled.sizes().sum(1), state.sizes().sum(1))


def test_lay_on_grid_of_an_unreduced_state_is_plain_pooling():
    x = torch.randn(2, 1 + 36, 4, generator=torch.Generator().manual_seed(1))
    start = TokenState.start(x, 1, (6, 6))
    laid = lay_on_grid(start.replace(grid=None), (6, 6))
    assert torch.equal(laid.x, start.x) and laid.valid is None
    targets = torch.tensor([9, 9])
    plain, relaid = (Pool(tokens=9).reduce_visual(s, Signals(), targets) for s in (start, laid))
    assert torch.equal(relaid.x, plain.x) and torch.equal(relaid.origin, plain.origin)


def test_batch_rows_equal_single_rows():
    state = _reduced_state(seed=5)
    pooled = Pool(tokens=4).reduce_visual(lay_on_grid(state, (6, 6)), Signals(), torch.tensor([4, 4, 4]))
    for b in range(3):
        one = state.replace(x=state.x[b:b + 1], size=state.size[b:b + 1], origin=state.origin[b:b + 1])
        single = Pool(tokens=4).reduce_visual(lay_on_grid(one, (6, 6)), Signals(), torch.tensor([4]))
        assert torch.equal(single.x[0], pooled.x[b]) and torch.equal(single.origin[0], pooled.origin[b])


def test_pool_off_the_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="not on their patch grid; lay an encoder reducer's tokens back"):
        Pool(tokens=4).reduce_visual(_hand_state(), Signals(), torch.tensor([4, 4]))


# ----- on a LLaVA ---------------------------------------------------------------------------------

ENCODER_SPECS = ["tome:r=2", "evit:keep=0.5", "evit:keep=0.5,fuse=false", "random:site=encoder,keep=0.25,layers=0"]


def _inputs(processor, n=3, seed=4):
    return processor(images=lm.images(n, seed=seed), text=lm.prompts(n), padding=True, return_tensors="pt")


@pytest.mark.parametrize("encoder", ENCODER_SPECS)
def test_llava_encoder_reducer_then_pool(llava, encoder):
    """The connector pools the tower's reduced features laid back on the 4 x 4 patch grid."""
    model, processor = llava
    inputs = _inputs(processor)
    with torch.no_grad(), vtc.apply(model, encoder, "pool:tokens=4") as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        tower = handle.state  # after the last tower block: CLS + 16 patches in origin
        pooled = handle.adapter.pipeline.last_connector_state
    patches = tower.replace(origin=torch.where(tower.origin[:, 1:] > 0, tower.origin[:, 1:], -1))  # CLS dropped
    means, counts = _pool_by_hand(patches.replace(n_prefix=0), (4, 4), (2, 2))
    for b in range(3):
        real = [mean for mean in means[b] if mean is not None]
        assert handle.visual_tokens[b] == len(real)
        kept = pooled.x[b] if pooled.valid is None else pooled.x[b][pooled.valid[b]]
        for got, mean, count in zip(kept, real, [c for c in counts[b] if c]):
            tolerance.assert_close(got, mean, terms=count)
    if encoder.startswith("random"):  # 4 surviving patches: some windows lose all of theirs
        assert all(count < 4 for count in handle.visual_tokens)


def test_llava_identity_encoder_reducer_then_pool_is_plain_pooling(llava):
    model, processor = llava
    inputs = _inputs(processor)
    with torch.no_grad():
        with vtc.apply(model, "pool:tokens=4") as handle:
            plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            features = handle.adapter.visual.features
        with vtc.apply(model, "tome:r=0", "pool:tokens=4") as handle:
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), plain)
            assert all(torch.equal(a, b) for a, b in zip(handle.adapter.visual.features, features))


def test_llava_pool_asking_for_more_tokens_than_the_encoder_leaves_is_refused(llava):
    model, processor = llava
    with pytest.raises(ValueError, match="tokens=13 is more than the 12 visual tokens"):
        vtc.apply(model, "tome:r=2", "pool:tokens=13")
    with pytest.raises(ValueError, match=r"kernel=1 pools the 4x4 patch grid into 16 tokens, more than the 12"):
        vtc.apply(model, "tome:r=2", "pool:kernel=1")
    assert "_vtc_handle" not in model.__dict__
    with vtc.apply(model, "tome:r=2", "pool:kernel=2") as handle:
        model.generate(**_inputs(processor, n=1), max_new_tokens=1, do_sample=False)
        assert handle.visual_tokens == [4]
