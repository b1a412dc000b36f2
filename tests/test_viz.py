"""vtc.viz: group pictures from hand-made origin maps and from a real (tiny) reduced model."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vtc
from vtc.state import TokenState
from vtc.viz import draw_groups, group_map, save_groups

PATCH = 8
# 2 x 3 patch grid behind one CLS token: token 1 carries patches 0, 1, 5; token 2 carries 2 and 4;
# patch 3 was dropped.
ORIGIN = torch.tensor([0, 1, 1, 2, -1, 2, 1])
GROUPS = {1: [0, 1, 5], 2: [2, 4]}
DROPPED_PATCH = 3


def patch_interior(picture: np.ndarray, patch: int) -> np.ndarray:
    """Pixels of a patch away from its edges (borders are drawn on group edges)."""
    row, col = divmod(patch, 3)
    return picture[row * PATCH + 2:(row + 1) * PATCH - 2, col * PATCH + 2:(col + 1) * PATCH - 2].reshape(-1, 3)


def patch_pixels(picture: np.ndarray, patch: int) -> np.ndarray:
    row, col = divmod(patch, 3)
    return picture[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH].reshape(-1, 3)


def test_group_map_labels_patches_and_dropped():
    labels = group_map(ORIGIN, (2, 3), n_prefix=1)
    assert labels.tolist() == [[1, 1, 2], [-1, 2, 1]]


def test_each_group_shares_one_colour_and_dropped_patches_are_grey():
    image = np.zeros((2 * PATCH, 3 * PATCH, 3), dtype=np.uint8)
    image[...] = (200, 40, 30)  # a flat colour, so a group's blended colour is the same everywhere in it
    picture = np.asarray(draw_groups(image, ORIGIN, (2, 3), n_prefix=1, patch_size=PATCH))
    assert picture.shape == image.shape

    colours = {}
    for token, patches in GROUPS.items():
        interiors = np.concatenate([patch_interior(picture, p) for p in patches])
        assert (interiors == interiors[0]).all(), f"group {token} is not one colour"
        assert not (interiors[0] == image[0, 0]).all(), "a merged group must be tinted"
        colours[token] = tuple(interiors[0])
    assert colours[1] != colours[2]

    dropped = patch_pixels(picture, DROPPED_PATCH)
    assert (dropped[:, 0] == dropped[:, 1]).all() and (dropped[:, 1] == dropped[:, 2]).all()


def test_mean_fill_paints_each_group_with_its_mean_colour():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(2 * PATCH, 3 * PATCH, 3), dtype=np.uint8)
    picture = np.asarray(draw_groups(image, ORIGIN, (2, 3), n_prefix=1, patch_size=PATCH, fill="mean", borders=False))
    for patches in GROUPS.values():
        expected = np.concatenate([patch_pixels(image, p) for p in patches]).astype(float).mean(axis=0)
        pixels = np.concatenate([patch_pixels(picture, p) for p in patches]).astype(float)
        assert np.abs(pixels - expected).max() <= 0.5


def test_token_state_input_and_batch_index():
    other = torch.tensor([0, 1, 2, 3, 4, 5, 6])  # nothing reduced
    origin = torch.stack([other, ORIGIN])
    state = TokenState(x=torch.zeros(2, 4, 8), size=None, origin=origin, valid=None, n_prefix=1, grid=None)
    image = np.full((2 * PATCH, 3 * PATCH, 3), 128, dtype=np.uint8)
    from_state = np.asarray(draw_groups(image, state, (2, 3), image_index=1))
    from_tensor = np.asarray(draw_groups(image, ORIGIN, (2, 3), n_prefix=1))
    assert (from_state == from_tensor).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grid=(3, 3)), "grid 3x3"),
        (dict(grid=(2, 3), patch_size=16), "patch_size"),
        (dict(grid=(2, 3), image_index=5), "image_index"),
        (dict(grid=(2, 3), fill="sepia"), "fill"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    image = np.zeros((2 * PATCH, 3 * PATCH, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=message):
        draw_groups(image, ORIGIN[None], n_prefix=1, **kwargs)


def test_normalised_image_is_refused():
    image = torch.randn(3, 2 * PATCH, 3 * PATCH)
    with pytest.raises(ValueError, match="normalisation"):
        draw_groups(image, ORIGIN, (2, 3), n_prefix=1)


def test_save_groups_writes_a_png_that_reloads(tmp_path):
    image = np.full((2 * PATCH, 3 * PATCH, 3), 90, dtype=np.uint8)
    path = save_groups(tmp_path / "pics" / "groups.png", image, ORIGIN, (2, 3), n_prefix=1)
    with Image.open(path) as reloaded:
        assert reloaded.format == "PNG"
        assert reloaded.size == (3 * PATCH, 2 * PATCH)
        assert (np.asarray(reloaded.convert("RGB")) == np.asarray(draw_groups(image, ORIGIN, (2, 3), n_prefix=1))).all()
    with pytest.raises(ValueError, match=r"\.png"):
        save_groups(tmp_path / "groups.jpg", image, ORIGIN, (2, 3), n_prefix=1)


@pytest.mark.parametrize("spec", ["tome:r=4", "random:keep=0.5,layers=0"])
def test_end_to_end_on_a_tiny_timm_vit(spec):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    with vtc.apply(model, spec) as handle, torch.no_grad():
        model(x)
        state, grid = handle.state, handle.adapter.info.grid
        n_out = handle.token_counts[-1]
    labels = group_map(state)
    carried = np.unique(labels[labels >= 0])
    assert len(carried) == n_out - state.n_prefix  # every remaining patch token carries a group
    picture = np.asarray(draw_groups(image, state, grid, patch_size=8))
    assert picture.shape == (32, 32, 3)
    if spec.startswith("random"):
        grey = picture[np.repeat(np.repeat(labels == -1, 8, 0), 8, 1)]
        assert len(grey) == 8 * 8 * 8 and (grey.max(axis=1) == grey.min(axis=1)).all()
    else:
        assert (np.bincount(labels.ravel()) > 1).any(), "ToMe must have merged some patches"
