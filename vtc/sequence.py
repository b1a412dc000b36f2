"""Rebuilding an LLM input sequence after each image got its own token count, inside the model,
from the full set of placeholders HF transformers' LLaVA processors expand ``<image>`` to
(docs/ARCHITECTURE.md "LLaVA and LLaVA-NeXT", Sequence).

Pure tensor functions, no model classes. The processor expanded every image to its full count of
placeholder tokens; after reduction image ``i`` carries ``K_i`` tokens. :func:`image_slots` finds
each image's placeholders from the image token id (never from fixed offsets), :func:`assemble`
writes the ``K_i`` features into the first ``K_i`` placeholders of each image, removes the surplus
placeholders and any padding, and re-pads every row on one side.

Position ids of the rebuilt sequence follow one of two rules:

- ``"contiguous"`` (default): positions count the tokens actually present, as if the prompt had
  been written with ``K_i`` placeholders;
- ``"original"``: every token keeps the position it had in the unreduced prompt (a kept visual
  token takes the position of its anchor placeholder), and generation continues after the full
  prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POSITION_RULES = ("contiguous", "original")
PADDING_SIDES = ("left", "right")


@dataclass(frozen=True)
class ImageSlots:
    """Where each image's placeholders are: image ``i`` lives in row ``rows[i]`` at the
    ascending sequence positions ``positions[i]``."""

    rows: list[int]
    positions: list[torch.Tensor]


def image_slots(input_ids: torch.Tensor, image_token_id: int, counts: list[int]) -> ImageSlots:
    """Assign the placeholders of ``input_ids`` (B, S) to images in reading order, image ``i``
    taking ``counts[i]`` of them. Raises ValueError when the placeholders and the images disagree."""
    found = (input_ids == image_token_id).nonzero()  # row-major: reading order over the batch
    needed = sum(counts)
    if found.shape[0] != needed:
        raise ValueError(
            f"the prompts hold {found.shape[0]} image placeholder tokens (id {image_token_id}) but the "
            f"{len(counts)} images need {needed} ({', '.join(map(str, counts))} per image); give one image per "
            f"<image> in the text, in order, and let the processor expand the placeholders"
        )
    rows, positions, start = [], [], 0
    for index, count in enumerate(counts):
        run = found[start : start + count]
        if count and (run[:, 0] != run[0, 0]).any():
            raise ValueError(
                f"the placeholders of image {index} span prompts {sorted(set(run[:, 0].tolist()))}; each image's "
                f"placeholders must lie in one prompt"
            )
        rows.append(int(run[0, 0]) if count else 0)
        positions.append(run[:, 1])
        start += count
    return ImageSlots(rows, positions)


def padding_side(attention_mask: torch.Tensor | None) -> str:
    """The side a processor padded on ("left" when nothing is padded)."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return "left"
    return "right" if bool(attention_mask[:, 0].bool().all()) else "left"


@dataclass(frozen=True)
class Assembled:
    """The rebuilt batch. ``source`` (B, L) gives each token's position in the original input
    (-1: padding); ``visual`` marks image tokens and ``image_index`` which image they belong to."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    visual: torch.Tensor
    image_index: torch.Tensor
    source: torch.Tensor
    visual_tokens: list[int]

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(dim=1)


def assemble(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    slots: ImageSlots,
    features: list[torch.Tensor],
    anchors: list[torch.Tensor] | None = None,
    side: str = "left",
    positions: str = "contiguous",
    pad_token_id: int = 0,
) -> Assembled:
    """Write ``features[i]`` (K_i, D) into image ``i``'s first K_i placeholders and drop the rest.

    ``anchors[i]`` (K_i,) gives, for the ``"original"`` position rule, the index within image
    ``i``'s placeholders whose position each kept token takes (default: the first K_i).
    """
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be one of {PADDING_SIDES}, got {side!r}")
    if positions not in POSITION_RULES:
        raise ValueError(f"position rule must be one of {POSITION_RULES}, got {positions!r}")
    batch, length = input_ids.shape
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    keep = real.clone()
    embeds = inputs_embeds.clone()
    image_index = torch.full_like(input_ids, -1)
    original = real.long().cumsum(dim=1) - 1  # position of each token in the unreduced prompt
    anchor_position = original.clone()
    for i, (row, where, feats) in enumerate(zip(slots.rows, slots.positions, features)):
        k = feats.shape[0]
        if k > where.numel():
            raise ValueError(f"image {i} has {k} reduced tokens but only {where.numel()} placeholders")
        kept = where[:k]
        keep[row, where[k:]] = False
        embeds[row, kept] = feats.to(embeds.dtype)
        image_index[row, kept] = i
        if anchors is not None:
            anchor_position[row, kept] = original[row, where[anchors[i].to(device)]]
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if batch else 0
    rank = keep.long().cumsum(dim=1) - 1
    offset = (width - lengths)[:, None] if side == "left" else torch.zeros_like(lengths)[:, None]
    target = torch.where(keep, rank + offset, width)  # surplus and padding go to a scratch column
    rows = torch.arange(batch, device=device)[:, None].expand(batch, length)

    def place(values: torch.Tensor, fill) -> torch.Tensor:
        out = values.new_full((batch, width + 1, *values.shape[2:]), fill)
        out[rows, target] = values
        return out[:, :width]

    new_mask = place(keep.long(), 0)
    source = place(torch.arange(length, device=device).expand(batch, length), -1)
    source = source.masked_fill(new_mask == 0, -1)
    new_ids = place(input_ids, pad_token_id).masked_fill(new_mask == 0, pad_token_id)
    new_images = place(image_index, -1).masked_fill(new_mask == 0, -1)
    new_embeds = place(embeds, 0.0) * new_mask[..., None].to(embeds.dtype)
    if positions == "contiguous":
        position_ids = (new_mask.cumsum(dim=1) - 1).clamp(min=0)
    else:
        position_ids = place(anchor_position, 0).masked_fill(new_mask == 0, 0)
    return Assembled(
        inputs_embeds=new_embeds,
        attention_mask=new_mask,
        input_ids=new_ids,
        position_ids=position_ids,
        visual=new_images >= 0,
        image_index=new_images,
        source=source,
        visual_tokens=[int(f.shape[0]) for f in features],
    )


def virtual_groups(layout: Assembled, groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The virtual map of a rebuilt sequence whose image ``i`` repeats merged tokens: ``groups[i]``
    (K_i,) gives, for each of its written tokens, the index of the first written token of the same
    merged token. Returns ``(pi, unique)`` as :func:`virtual_map` (text and padding are
    their own groups)."""
    batch, length = layout.input_ids.shape
    first = torch.arange(length, device=layout.input_ids.device).repeat(batch, 1)
    for i, group in enumerate(groups):
        where = (layout.image_index == i).nonzero()
        if where.shape[0] != group.numel():
            raise ValueError(f"image {i} has {where.shape[0]} tokens in the sequence but {group.numel()} group entries")
        if where.shape[0]:
            first[where[:, 0], where[:, 1]] = where[group.to(where.device), 1]
    return virtual_map(first)

def virtual_map(first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pi, unique)`` from ``first`` (B, T): for every position the position of the first copy
    of its group (itself for a group's first copy). Unique rows are numbered in order of first
    appearance; ``unique`` (B,) counts them per row."""
    position = torch.arange(first.shape[1], device=first.device)
    if bool((first > position).any()):
        raise ValueError("virtual_map: a position's group must start at or before it")
    leads = first == position
    row = leads.long().cumsum(dim=1) - 1
    return row.gather(1, first), leads.sum(dim=1)


def repeat_covered(features: torch.Tensor, cover: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's tokens written at every placeholder they cover.

    ``features`` (K, D) are the image's tokens, ``cover`` (P,) the token at each placeholder (-1:
    none). Returns the repeated features (P', D) for the P' covered placeholders, those
    placeholders' indices (P',), and for each the index (within P') of its token's first copy."""
    kept = (cover >= 0).nonzero().squeeze(1)
    token = cover[kept]
    first = torch.full((features.shape[0],), kept.numel(), dtype=torch.long, device=kept.device)
    first.scatter_reduce_(0, token, torch.arange(kept.numel(), device=kept.device), "amin")
    return features[token], kept, first[token]
