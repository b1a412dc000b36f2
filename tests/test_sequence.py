"""Pure functions behind per-image token counts: placeholder slots, sequence rebuilding, ragged keeps, budget split."""

from __future__ import annotations

import pytest
import torch

from vtc.budget import split_total
from vtc.merge import keep_top
from vtc.sequence import assemble, image_slots, padding_side
from vtc.state import TokenState

IMG = 9


def _batch():
    # row 0: left-padded, one image of 3 placeholders; row 1: two images of 3
    ids = torch.tensor([[0, 0, 0, 5, IMG, IMG, IMG, 6, 7], [5, IMG, IMG, IMG, 6, IMG, IMG, IMG, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    return ids, mask


def test_image_slots_follow_reading_order_and_refuse_mismatches():
    ids, _ = _batch()
    slots = image_slots(ids, IMG, [3, 3, 3])
    assert slots.rows == [0, 1, 1]
    assert [p.tolist() for p in slots.positions] == [[4, 5, 6], [1, 2, 3], [5, 6, 7]]
    with pytest.raises(ValueError, match="hold 9 image placeholder tokens .* but the 2 images need 6"):
        image_slots(ids, IMG, [3, 3])
    with pytest.raises(ValueError, match="placeholders of image 0 span prompts \\[0, 1\\]"):
        image_slots(ids, IMG, [4, 5])


def test_assemble_keeps_k_tokens_per_image_and_repads():
    ids, mask = _batch()
    embeds = ids[..., None].float().expand(2, 9, 4).clone()
    features = [torch.full((1, 4), 100.0), torch.full((2, 4), 200.0), torch.full((3, 4), 300.0)]
    out = assemble(embeds, ids, mask, image_slots(ids, IMG, [3, 3, 3]), features, side="left")
    assert out.visual_tokens == [1, 2, 3]
    assert out.lengths.tolist() == [4, 8]
    assert out.attention_mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [1] * 8]
    assert out.input_ids.tolist() == [[0, 0, 0, 0, 5, IMG, 6, 7], [5, IMG, IMG, 6, IMG, IMG, IMG, 7]]
    assert out.inputs_embeds[0, 5, 0] == 100 and out.inputs_embeds[1, 4:7, 0].tolist() == [300.0] * 3
    assert out.source.tolist() == [[-1, -1, -1, -1, 3, 4, 7, 8], [0, 1, 2, 4, 5, 6, 7, 8]]
    assert out.image_index.tolist()[1] == [-1, 1, 1, -1, 2, 2, 2, -1]
    assert out.position_ids.tolist() == [[0, 0, 0, 0, 0, 1, 2, 3], list(range(8))]
    right = assemble(embeds, ids, mask, image_slots(ids, IMG, [3, 3, 3]), features, side="right")
    assert right.attention_mask.tolist()[0] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert right.input_ids.tolist()[0][:4] == [5, IMG, 6, 7]


def test_original_positions_use_anchors_and_keep_the_full_length():
    ids, mask = _batch()
    embeds = torch.zeros(2, 9, 4)
    features = [torch.zeros(2, 4), torch.zeros(1, 4), torch.zeros(3, 4)]
    anchors = [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([0, 1, 2])]
    out = assemble(embeds, ids, mask, image_slots(ids, IMG, [3, 3, 3]), features, anchors, positions="original")
    row0 = out.position_ids[0][out.attention_mask[0].bool()].tolist()
    row1 = out.position_ids[1][out.attention_mask[1].bool()].tolist()
    assert row0 == [0, 1, 3, 4, 5]  # text 0, image anchors 0 and 2 -> 1 and 3, text 4 and 5
    assert row1 == [0, 2, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="position rule must be one of"):
        assemble(embeds, ids, mask, image_slots(ids, IMG, [3, 3, 3]), features, positions="random")


def test_padding_side_detection():
    assert padding_side(None) == "left"
    assert padding_side(torch.tensor([[0, 1], [1, 1]])) == "left"
    assert padding_side(torch.tensor([[1, 0], [1, 1]])) == "right"


def test_keep_top_is_ragged_and_keeps_order():
    x = torch.arange(2 * 6, dtype=torch.float).view(2, 6, 1)
    state = TokenState.start(x, n_prefix=1, grid=None)
    score = torch.tensor([[9.0, 1, 5, 3, 4, 2], [9.0, 6, 5, 4, 3, 2]])
    out = keep_top(state, score, torch.tensor([2, 4]))
    assert out.valid.tolist() == [[True, True, True, False, False], [True] * 5]
    assert out.x[0, :3, 0].tolist() == [0, 2, 4] and out.x[1, :, 0].tolist() == [6, 7, 8, 9, 10]
    assert out.origin.tolist() == [[0, -1, 1, -1, 2, -1], [0, 1, 2, 3, 4, -1]]
    with pytest.raises(ValueError, match="outside 0..5"):
        keep_top(state, score, torch.tensor([6, 1]))


def test_split_total_is_proportional_and_exact():
    assert split_total(10, [16, 32]) == [3, 7]
    assert split_total(4, [16, 16]) == [2, 2]
    assert split_total(5, [1, 100]) == [0, 5]
    assert sum(split_total(37, [576, 1200, 3])) == 37
    with pytest.raises(ValueError, match="cannot keep 50 of 48"):
        split_total(50, [16, 32])
