"""HoloV on a bare vision encoder (the HoloV paper, Zou et al., NeurIPS 2025; docs/ARCHITECTURE.md
"HoloV"): the kept features and their indices.

In a LLaVA, ``vtc.apply(model, "holov:k=64")`` prunes at the connector. On a timm, open_clip or HF
CLIP tower, :func:`prune` runs the encoder (SDPA kept: the CLS attention row of the last block is
computed beside it), then keeps ``k`` of the patch tokens leaving the last block with the same
scores, crops and quotas (:func:`vtc.reducers.holov.holov_keep`), in raster order or, with
``order=code``, in the official code's order (:func:`vtc.reducers.holov.code_order`).
"""

from __future__ import annotations

import torch
from torch import nn

from vtc.apply import apply, run_encoder
from vtc.reducers.holov import HoloV, band_crops, block_crops, code_order, holov_keep
from vtc.sites import ConnectorInfo, Signal, Site


def prune(model: nn.Module, pixels: torch.Tensor, k: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (B, k, C), indices (B, k))``: the patch tokens HoloV keeps from the output of
    ``model``'s last block (before any final norm or pooling), indices into the patch grid in
    raster order (``order=code``: crop by crop as the official code emits them). ``options`` are
    :class:`~vtc.reducers.holov.HoloV`'s (``crops``, ``shape``, ``lam``, ``tau``, ``rank``,
    ``variance``, ``order``)."""
    reducer = HoloV(k=k, **options)
    with torch.inference_mode(), apply(model) as handle:
        adapter = handle.adapter
        if Site.CONNECTOR in adapter.sites:
            raise TypeError("vtc.holov.prune takes a bare vision encoder; on a LLaVA apply 'holov:k=...' instead")
        info = adapter.info
        last = len(adapter.blocks) - 1
        adapter.extra_needs[last] = frozenset({Signal.CLS_ATTN})
        state = run_encoder(handle, pixels)
        attention = adapter.signals[last].cls_attn
    p = info.n_prefix
    reducer.check_connector(ConnectorInfo(info.family, info.num_tokens - p, 0, info.grid, info.has_cls))
    x, attention = state.x[:, p:], attention[:, p:]
    real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    reducer.target(x.shape[1])  # clear errors for k or crops above the patch count
    crops = reducer.crop_count(x.shape[1], k)
    crop = block_crops(real, info.grid, crops) if reducer.shape == "blocks" else band_crops(real, crops)
    keep, ranking = holov_keep(x, attention, real, torch.full((x.shape[0],), k, device=x.device), crop, crops,
                               reducer.lam, reducer.tau, reducer.rank, reducer.variance)
    if reducer.order == "code":
        indices = code_order(keep, ranking, crop, crops)
    else:
        indices = keep.nonzero()[:, 1].view(x.shape[0], k)
    return x.gather(1, indices[..., None].expand(-1, -1, x.shape[-1])), indices
