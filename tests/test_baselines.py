"""The baselines every comparison needs: random pruning (RandomDrop) and spatial pooling (Pool)."""

from __future__ import annotations

import pytest
import tolerance
import torch

import vtc
from vtc.reducers import Pool, RandomDrop

# ----- RandomDrop ----------------------------------------------------------------------------------


def test_random_counts_follow_keep(timm_vit, tools):
    model = timm_vit("plain")
    with torch.no_grad(), vtc.apply(model, "random:keep=0.5") as handle:
        model(tools.images(2))
        assert handle.token_counts == handle.planned_token_counts() == [65, 65, 33, 17, 9]
    with torch.no_grad(), vtc.apply(model, "random:tokens=10;5,layers=0;3") as handle:
        model(tools.images(1))
        assert handle.token_counts == [65, 11, 11, 11, 6]


def test_random_keeps_current_order_and_same_choice_per_image(timm_vit, tools):
    model = timm_vit("reg")
    p = model.num_prefix_tokens
    with torch.no_grad(), vtc.apply(model, "random:keep=0.4,seed=5") as handle:
        model(tools.images(3))
        state = handle.state
    tools.check_state_maps(state, p + tools.grid**2, dropped_allowed=True)
    assert torch.equal(state.origin[0], state.origin[1]) and torch.equal(state.origin[0], state.origin[2])
    kept = state.origin[0, p:][state.origin[0, p:] >= 0]
    assert len(kept) == state.num_tokens - p
    assert bool((kept.diff() > 0).all())  # survivors stay in raster order


def test_random_seed_reproducible_and_changes_the_draw(timm_vit, tools):
    model = timm_vit("plain")
    origins = []
    for seed in (0, 0, 1):
        with torch.no_grad(), vtc.apply(model, RandomDrop(keep=0.5, seed=seed)) as handle:
            model(tools.images(1))
            origins.append(handle.state.origin)
    assert torch.equal(origins[0], origins[1])
    assert not torch.equal(origins[0], origins[2])


def test_random_works_without_cls(timm_vit, tools):
    model = timm_vit("nocls")
    with torch.no_grad(), vtc.apply(model, "random:keep=0.5,layers=1") as handle:
        out = model(tools.images(2))
        assert handle.token_counts == [64, 64, 32, 32, 32]
    assert out.shape == (2, 10) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    "spec,message",
    [
        ("random:keep=0", r"random: keep rate must be in \(0, 1\], got 0"),
        ("random:layers=0;9", r"random: layers \[9\] do not exist; the model has layers 0..3"),
        ("random:tokens=65", r"random: layer 1 is asked to keep 65 tokens but has only 64"),
    ],
)
def test_random_bad_budgets(timm_vit, spec, message):
    with pytest.raises(ValueError, match=message):
        vtc.apply(timm_vit("plain"), spec)


# ----- Pool ----------------------------------------------------------------------------------------


def _cells(rows_of, cols_of, grid):
    """Expected cell index of every patch in raster order."""
    r = torch.arange(grid)
    return (rows_of(r)[:, None] * int(cols_of(r).max() + 1) + cols_of(r)[None, :]).flatten()


@pytest.mark.parametrize("variant", ["plain", "reg", "nocls"])
def test_pool_kernel_2_cells_sizes_and_origin(timm_vit, tools, variant):
    model = timm_vit(variant)
    p = model.num_prefix_tokens
    with torch.no_grad(), vtc.apply(model, "pool:kernel=2") as handle:
        model(tools.images(2))
        state = handle.state
        assert handle.token_counts == handle.planned_token_counts() == [p + 64] + [p + 16] * 4
    expected = _cells(lambda r: r // 2, lambda c: c // 2, tools.grid) + p
    assert torch.equal(state.origin[:, p:], expected.expand(2, -1))
    assert torch.equal(state.size[:, p:], torch.full((2, 16), 4.0))
    assert state.grid == (4, 4)
    tools.check_state_maps(state, p + 64)


def test_pool_kernel_3_uneven_cells(timm_vit, tools):
    model = timm_vit("plain")
    with torch.no_grad(), vtc.apply(model, "pool:kernel=3") as handle:
        model(tools.images(1))
        state = handle.state
    assert state.num_tokens == 1 + 9
    assert state.size[0, 1:].reshape(3, 3).tolist() == [[9, 9, 6], [9, 9, 6], [6, 6, 4]]
    tools.check_state_maps(state, 65)


@pytest.mark.parametrize("tokens,grid", [(16, (4, 4)), (8, (2, 4)), (4, (2, 2)), (1, (1, 1)), (6, (2, 3))])
def test_pool_tokens_target(timm_vit, tools, tokens, grid):
    model = timm_vit("plain")
    with torch.no_grad(), vtc.apply(model, f"pool:tokens={tokens}") as handle:
        model(tools.images(1))
        state = handle.state
    assert state.num_tokens == 1 + tokens
    assert sorted(state.grid) == sorted(grid)  # 2x3 vs 3x2 on a square grid is a tie
    tools.check_state_maps(state, 65)
    sizes = state.size[0, 1:]
    assert sizes.max() - sizes.min() <= 8 // grid[0] + 8 // grid[1] + 1  # balanced cells


def test_pool_at_a_later_layer(timm_vit, tools):
    model = timm_vit("plain")
    with torch.no_grad(), vtc.apply(model, Pool(kernel=4, layer=2)) as handle:
        model(tools.images(1))
        assert handle.token_counts == [65, 65, 65, 5, 5]


def test_pool_window_of_one_is_the_identity(timm_vit, tools):
    model = timm_vit("plain")
    images = tools.images(2)
    with torch.no_grad():
        reference = model(images)
        with vtc.apply(model, "pool:kernel=1") as handle:
            assert torch.equal(model(images), reference)
            assert handle.token_counts == [65] * 5


@pytest.mark.parametrize("variant", ["plain", "reg", "avg", "map", "nocls"])
def test_pool_of_identical_cells_is_lossless(timm_vit, tools, variant):
    """With positional embeddings zeroed and every 2x2 cell made of one repeated patch, pooling
    with proportional attention gives the unreduced output (as ToMe's f.7); without, it differs."""
    model = timm_vit(variant).double()
    with torch.no_grad():
        model.pos_embed.zero_()
    small = tools.images(1, seed=2, dtype=torch.float64, size=16).reshape(1, 3, 4, 4, 4, 4)
    image = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=4).reshape(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(image)
        with vtc.apply(model, "pool:kernel=2"):
            pooled = model(image)
        with vtc.apply(model, "pool:kernel=2,prop_attn=false"):
            plain = model(image)
    tolerance.assert_close(pooled, reference, terms=tools.vit_terms)  # float64
    if model.num_prefix_tokens:  # without prefix every key has multiplicity 4: the bias cancels
        assert (plain - reference).abs().max() > 1e-4


def test_pool_conserves_weighted_sum_at_the_merge(timm_vit, tools):
    """The pooled tokens are the size-weighted averages of their cells (captured at the merge)."""
    model = timm_vit("plain")
    seen = {}

    class Recording(Pool):
        def reduce(self, state, signals, budget, layer):
            out = super().reduce(state, signals, budget, layer)
            seen.update(state=state, out=out)
            return out

    with torch.no_grad(), vtc.apply(model, Recording(kernel=2)):
        model(tools.images(2))
    before, after = seen["state"], seen["out"]
    tolerance.assert_close((after.size[..., None] * after.x).sum(1), before.x.sum(1), terms=65,  # cells of <= 4, then 17 sums
                           scale=float(before.x.abs().sum(1).max()))  # a sum of 65 terms: their magnitude
    assert torch.equal(after.size.sum(1), torch.full((2,), 65.0))
    assert after.prop_attn


@pytest.mark.parametrize(
    "spec,message",
    [
        ("pool:tokens=67", r"pool: tokens=67 cannot be laid out as rows x cols within the 8x8 patch grid"),
        ("pool:tokens=65", r"pool: tokens=65 cannot be laid out"),
        ("pool:tokens=22", r"pool: tokens=22 cannot be laid out"),  # 2 x 11 and 11 x 2 do not fit 8 x 8
        ("pool:kernel=2,layer=4", r"pool: layers \[4\] do not exist; the model has layers 0..3"),
    ],
)
def test_pool_bad_budgets(timm_vit, spec, message):
    with pytest.raises(ValueError, match=message):
        vtc.apply(timm_vit("plain"), spec)


def test_random_at_the_connector_keeps_an_image_s_tokens_in_a_wider_batch():
    """A per-image width (after DyMU) pads the batch: the padded image keeps what it keeps alone."""
    torch.manual_seed(0)
    wide, narrow = torch.randn(1, 12, 4), torch.randn(1, 7, 4)
    origin = torch.arange(12).expand(2, 12).clone()
    batch = vtc.TokenState(x=torch.cat([wide, torch.nn.functional.pad(narrow, (0, 0, 0, 5))]), size=None, origin=origin,
                           valid=torch.arange(12).expand(2, 12) < torch.tensor([[12], [7]]), n_prefix=0, grid=None)
    alone = vtc.TokenState(x=narrow, size=None, origin=torch.arange(7)[None], valid=None, n_prefix=0, grid=None)
    reducer = RandomDrop(tokens=3, seed=5)
    together = reducer.reduce_visual(batch, None, torch.tensor([3, 3]))
    single = reducer.reduce_visual(alone, None, torch.tensor([3]))
    assert torch.equal(together.x[1, :3], single.x[0])
