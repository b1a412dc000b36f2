"""LLaVA-NeXT AnyRes layout as index maps (HF transformers' ``LlavaNextModel.pack_image_features``;
docs/ARCHITECTURE.md "LLaVA and LLaVA-NeXT").

HF's ``pack_image_features`` arranges an image's tiles into one feature map, unpads it to the
image's aspect ratio, appends ``image_newline`` after every row and puts the base view first.
Here the same layout is computed on indices instead of features, so reduced token sets can be
packed with the layout intact. Uses HF's own grid-shape and unpadding helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AnyResLayout:
    """One image's packed layout.

    ``hires`` (H', W') holds, for every position of the unpadded high-resolution map, the flat
    index ``tile * side**2 + patch`` into this image's tiles (tile 0 is the base view, so every
    entry is >= side**2). ``num_tiles`` counts the base view too; with one tile there is no map.
    """

    side: int
    num_tiles: int
    hires: torch.Tensor | None

    @property
    def base_tokens(self) -> int:
        return self.side * self.side

    @property
    def num_placeholders(self) -> int:
        """Tokens HF packs for this image: base view, map rows each followed by a newline (or one newline)."""
        if self.hires is None:
            return self.base_tokens + 1
        rows, cols = self.hires.shape
        return self.base_tokens + rows * (cols + 1)

    def hires_placeholder(self, slot: torch.Tensor) -> torch.Tensor:
        """Index within the image's placeholders of high-res map positions (flat ``row * W' + col``)."""
        cols = self.hires.shape[1]
        return self.base_tokens + slot // cols * (cols + 1) + slot % cols


def anyres_layout(image_size: tuple[int, int], grid_pinpoints: list, tile_size: int, side: int,
                  num_tiles: int) -> AnyResLayout:
    """The layout of an image of ``image_size`` (height, width) cut into ``num_tiles`` tiles."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    if num_tiles <= 1:
        return AnyResLayout(side, num_tiles, None)
    tiles_high, tiles_wide = get_anyres_image_grid_shape(list(image_size), grid_pinpoints, tile_size)
    if tiles_high * tiles_wide != num_tiles - 1:
        raise ValueError(
            f"image of size {tuple(image_size)} has {num_tiles - 1} high-resolution tiles but its best-fit grid "
            f"is {tiles_high}x{tiles_wide}; pass the image_sizes the processor returned"
        )
    index = torch.arange(side * side, (num_tiles) * side * side).view(tiles_high, tiles_wide, side, side)
    index = index.permute(0, 2, 1, 3).reshape(1, tiles_high * side, tiles_wide * side)
    return AnyResLayout(side, num_tiles, unpad_image(index, list(image_size))[0])
