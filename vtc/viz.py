"""Pictures of what a reducer did to the patches, computed from ``TokenState.origin`` alone.

Every original patch is labelled with the token that now carries it (the official ToMe code's
``make_visualization``, ``tome/vis.py``, labels patches through its source map the same way). Patches that
share a token form a *group*; :func:`draw_groups` paints each merged group in its own colour over
the image with a border in that colour, greys out dropped patches (``origin == -1``) and leaves
patches that are still a token of their own as they were (thin neutral border).

Pure: it takes arrays/tensors (or a :class:`~vtc.state.TokenState`) and knows no model class.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from vtc.state import TokenState

ImageLike = Image.Image | np.ndarray | torch.Tensor
OriginLike = TokenState | torch.Tensor | np.ndarray

DROPPED = -1
_GOLDEN = 0.618033988749895
_SINGLETON_BORDER = np.array([225.0, 225.0, 225.0])


def _origin_array(origin: OriginLike, n_prefix: int | None, image_index: int) -> tuple[np.ndarray, int]:
    """(N0,) long origin of one image and the number of prefix tokens."""
    if isinstance(origin, TokenState):
        n_prefix = origin.n_prefix if n_prefix is None else n_prefix
        origin = origin.origin
    if n_prefix is None:
        raise ValueError("n_prefix is needed when origin is a tensor/array (1 for a CLS token, 0 for none)")
    array = origin.detach().cpu().numpy() if isinstance(origin, torch.Tensor) else np.asarray(origin)
    if array.ndim == 2:
        if not -array.shape[0] <= image_index < array.shape[0]:
            raise ValueError(f"image_index {image_index} is out of range for a batch of {array.shape[0]}")
        array = array[image_index]
    elif array.ndim != 1:
        raise ValueError(f"origin must be (N0,) or (B, N0), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"origin must hold integer token indices, got dtype {array.dtype}")
    if n_prefix < 0 or n_prefix >= array.shape[0]:
        raise ValueError(f"n_prefix={n_prefix} does not fit an origin of {array.shape[0]} tokens")
    return array.astype(np.int64), n_prefix


def group_map(origin: OriginLike, grid: tuple[int, int] | None = None, *, n_prefix: int | None = None,
              image_index: int = 0) -> np.ndarray:
    """(rows, cols) map: for every patch the index of the token carrying it, -1 if dropped.

    ``origin`` is a TokenState (its ``n_prefix`` is used) or an (N0,) / (B, N0) integer origin
    including the prefix tokens; ``grid`` is the patch grid at the input (default: square).
    """
    array, n_prefix = _origin_array(origin, n_prefix, image_index)
    patches = array[n_prefix:]
    if grid is None:
        side = int(round(patches.size**0.5))
        if side * side != patches.size:
            raise ValueError(f"{patches.size} patches do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != patches.size:
        raise ValueError(
            f"grid {rows}x{cols} has {rows * cols} patches but origin has {patches.size} after "
            f"{n_prefix} prefix tokens"
        )
    if (patches < DROPPED).any():
        raise ValueError("origin values must be token indices >= 0, or -1 for a dropped patch")
    return patches.reshape(rows, cols)


def _image_array(image: ImageLike) -> np.ndarray:
    """(H, W, 3) float64 RGB in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().float().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3/4) or a (3, H, W) tensor, got shape {array.shape}")
    array = array[..., :3]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == bool:
        return array.astype(np.float64) * 255.0
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError("an integer image must hold 8-bit values in 0..255")
        return array.astype(np.float64)
    array = array.astype(np.float64)
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError("a float image must lie in [0, 1]; undo the model's mean/std normalisation first")
    return array * 255.0


def group_colours(labels: np.ndarray) -> dict[int, np.ndarray]:
    """A distinct RGB colour (0..255) per group, ranked by the group's first patch in raster order
    (so colours do not depend on the arbitrary token order), hues spread by the golden ratio."""
    flat = labels.ravel()
    kept = flat[flat >= 0]
    _, first = np.unique(kept, return_index=True)
    ordered = kept[np.sort(first)]
    colours = {}
    for rank, label in enumerate(ordered):
        hue = (rank * _GOLDEN) % 1.0
        saturation = 0.85 if rank % 2 == 0 else 0.6
        colours[int(label)] = np.array(colorsys.hsv_to_rgb(hue, saturation, 0.95)) * 255.0
    return colours


def _pixel_labels(labels: np.ndarray, height: int, width: int, patch_size: int | None) -> np.ndarray:
    rows, cols = labels.shape
    if patch_size is not None:
        if (height, width) != (rows * patch_size, cols * patch_size):
            raise ValueError(
                f"image is {width}x{height} pixels but a {rows}x{cols} grid of {patch_size}-pixel patches covers "
                f"{cols * patch_size}x{rows * patch_size}; resize the image to the model input, or leave "
                f"patch_size out to stretch the patch map over the image"
            )
    row_index = np.arange(height) * rows // height
    col_index = np.arange(width) * cols // width
    return labels[row_index[:, None], col_index[None, :]]


def _edges(pixels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (each group's inner edge)."""
    edge = np.zeros(pixels.shape, dtype=bool)
    vertical = pixels[1:] != pixels[:-1]
    horizontal = pixels[:, 1:] != pixels[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def draw_groups(
    image: ImageLike,
    origin: OriginLike,
    grid: tuple[int, int] | None = None,
    *,
    n_prefix: int | None = None,
    image_index: int = 0,
    patch_size: int | None = None,
    fill: Literal["blend", "mean"] = "blend",
    alpha: float = 0.5,
    borders: bool = True,
) -> Image.Image:
    """The image with every merged group in its own colour and dropped patches greyed out.

    Args:
        image: the model input as PIL image, (H, W, 3) uint8/[0, 1] float array, or (3, H, W)
            tensor in [0, 1] (not mean/std normalised).
        origin: a TokenState (e.g. ``handle.state``) or its ``origin`` (N0,) / (B, N0).
        grid: (rows, cols) of patches at the input; default square.
        n_prefix: prefix tokens at the start of ``origin`` (taken from a TokenState by default).
        image_index: which image of a batch.
        patch_size: pixels per patch; when given the image must be exactly ``grid * patch_size``,
            otherwise the patch map is stretched over the image.
        fill: ``blend`` mixes each group's colour into the image with ``alpha``; ``mean`` paints
            each group with its mean image colour (ToMe's ``make_visualization`` look).
        borders: draw each group's edge in its colour (a light grey edge for unmerged patches).
    """
    if fill not in ("blend", "mean"):
        raise ValueError(f"fill must be 'blend' or 'mean', got {fill!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = group_map(origin, grid, n_prefix=n_prefix, image_index=image_index)
    pixels_rgb = _image_array(image)
    height, width = pixels_rgb.shape[:2]
    pixels = _pixel_labels(labels, height, width, patch_size)

    counts = dict(zip(*np.unique(labels[labels >= 0], return_counts=True)))
    colours = group_colours(labels)
    out = pixels_rgb.copy()
    edge = _edges(pixels) if borders else np.zeros(pixels.shape, dtype=bool)
    for label, colour in colours.items():
        mask = pixels == label
        if fill == "mean":
            out[mask] = pixels_rgb[mask].mean(axis=0)
        elif counts[label] > 1:
            out[mask] = (1.0 - alpha) * pixels_rgb[mask] + alpha * colour
        if borders:
            out[mask & edge] = colour if counts[label] > 1 else _SINGLETON_BORDER
    dropped = pixels == DROPPED
    if dropped.any():
        luminance = pixels_rgb[dropped] @ np.array([0.299, 0.587, 0.114])
        out[dropped] = (0.35 * luminance + 0.65 * 150.0)[:, None]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def save_groups(path: str | Path, image: ImageLike, origin: OriginLike, grid: tuple[int, int] | None = None,
                **options) -> Path:
    """Write :func:`draw_groups` as a PNG at ``path`` (parent folders are created); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_groups writes PNG files; give a path ending in .png, got {str(path)!r}")
    picture = draw_groups(image, origin, grid, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


__all__ = ["DROPPED", "draw_groups", "group_colours", "group_map", "save_groups"]
