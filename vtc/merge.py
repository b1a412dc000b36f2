"""Pure token-reduction functions shared by every reducer (ToMe paper, Bolya et al., ICLR 2023, Sec. 3;
EViT, Liang et al., ICLR 2022, token reorganisation; docs/ARCHITECTURE.md "Shared reduction functions").

The shape follows ToMe's ``merge.py``: a metric goes in, a destination map comes out, and one
function applies any map to a :class:`~vtc.state.TokenState`. A destination map ``dest`` (B, N)
gives, for every current token, the index of the token that carries it afterwards (-1: dropped).
"""

from __future__ import annotations

import torch

from vtc.kernels import bipartite_match, merge_weighted
from vtc.state import TokenState


def merge_capacity(n_tokens: int, n_prefix: int) -> int:
    """Most tokens one bipartite step can remove: half of the mergeable tokens (ToMe paper,
    Sec. 3, "Bipartite Soft Matching": up to 50%; official code ``tome/merge.py``)."""
    return max(0, (n_tokens - n_prefix) // 2)


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, n_prefix: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """ToMe's bipartite soft matching as a destination map (ToMe paper, Sec. 3,
    "Bipartite Soft Matching"; official code ``tome/merge.py``).

    A = even, B = odd positions of the current order; each A token points to its most similar B
    token (cosine of ``metric``); the ``r`` best-scoring A tokens merge into their partners.
    The first ``n_prefix`` tokens are protected and stay first. Output order is ToMe's:
    ``[prefix, unmerged A (ascending), B (ascending)]``. Exact ties in score are broken toward
    the lower A index (a stable sort), so results are reproducible across runs and devices.

    Returns ``(dest, n_out)`` with ``n_out = N - r``.
    """
    n = metric.shape[1]
    if r < 0 or r > merge_capacity(n, n_prefix):
        raise ValueError(
            f"r={r} is outside what one bipartite step can remove from {n} tokens with "
            f"{n_prefix} protected: 0 <= r <= {merge_capacity(n, n_prefix)}"
        )
    score, partner = bipartite_match(metric, n_prefix, valid)
    rank = _rank(score)
    dest, _ = _destinations(rank < r, partner, n, n_prefix, valid)
    return dest, n - r


def bipartite_threshold_matching(
    metric: torch.Tensor, threshold: float, n_prefix: int, valid: torch.Tensor | None = None,
    cap: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DyMU's thresholded matching (DyMU paper, Sec. 3.1): in every image each A token whose
    best edge scores strictly above ``threshold`` merges into its partner, at most
    ``(valid tokens - n_prefix) // 2`` per image (the best edges first), so images keep
    different token counts. Real tokens come first in ToMe's order, padding after them.
    ``cap`` (int or (B,)) lowers the per-image maximum further (DyMU's optional per-image cap).
    The comparison is exact: scores are widened to float64 (exactly) and compared with the float64
    threshold, never with the threshold rounded to the scores' dtype.

    Returns ``(dest, real, n_out)``: the destination map, (B,) real tokens per image afterwards
    and the padded width ``n_out`` (pass ``real`` to :func:`merge_tokens`).
    """
    n = metric.shape[1]
    score, partner = bipartite_match(metric, n_prefix, valid)
    present = n if valid is None else valid.sum(dim=1, keepdim=True)
    limit = torch.clamp((torch.as_tensor(present, device=metric.device) - n_prefix) // 2, min=0)
    if cap is not None:
        limit = torch.minimum(limit, torch.as_tensor(cap, device=metric.device).reshape(-1, 1))
    return bipartite_merge_map(
        (score.to(torch.float64) > threshold) & (_rank(score) < limit), partner, n, n_prefix, valid
    )


def batch_top_edges(score: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
    """DyMU's batch-level selection (DyMU paper, Wang et al., 2025, Sec. 3.1): rank every image's
    A-token edges jointly across the batch and select the ``count`` best (ties: lower image, then
    lower A index).

    Returns ``(is_src, threshold)``: (B, N_A) selected sources and the score of the first
    rejected edge clamped at 0 (0 when every finite edge was selected).
    """
    flat = score.reshape(-1)
    order = flat.argsort(descending=True, stable=True)
    count = min(count, int(torch.isfinite(flat).sum()))
    is_src = torch.zeros_like(flat, dtype=torch.bool)
    is_src[order[:count]] = True
    rejected = flat[order[count]].item() if count < flat.numel() else float("-inf")
    return is_src.view_as(score), max(rejected, 0.0) if rejected > float("-inf") else 0.0


def bipartite_merge_map(
    is_src: torch.Tensor, partner: torch.Tensor, n: int, n_prefix: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The destination map merging the selected A tokens ``is_src`` (B, N_A) into their
    ``partner`` B tokens, with per-image counts: ``(dest, real, n_out)`` as
    :func:`bipartite_threshold_matching` returns them. An image without any source keeps its
    order (the identity map), as a single-image run that skips the step would.

    The padded width is the most real tokens any image keeps: padding that does not fit folds into
    the last slot (padding has size 0, so it adds nothing to the size-weighted merge)."""
    dest, real = _destinations(is_src, partner, n, n_prefix, valid)
    idle = ~is_src.any(dim=1, keepdim=True)
    dest = torch.where(idle, torch.arange(n, device=dest.device).expand_as(dest), dest)
    n_out = int(real.max()) if real.numel() else n
    return dest.clamp(max=max(n_out - 1, 0)), real, n_out


def _rank(score: torch.Tensor) -> torch.Tensor:
    """Position of every A row when sorted by decreasing score (ties: lower index first)."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


def _destinations(
    is_src: torch.Tensor, partner: torch.Tensor, n: int, n_prefix: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The destination map of a bipartite step: ``[prefix, kept A, B]`` for real tokens (ToMe's
    order), each padding token in its own slot after them, sources into their partners' slots.
    Returns it with the (B,) count of real output tokens."""
    batch, n_a = is_src.shape
    n_b, device = n // 2, is_src.device
    prefix_a, prefix_b = (n_prefix + 1) // 2, n_prefix // 2
    a_index = torch.arange(n_a, device=device)
    b_index = torch.arange(n_b, device=device)
    real = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid.bool()
    real_a = real[:, 0::2] & (a_index >= prefix_a)
    real_b = real[:, 1::2] & (b_index >= prefix_b)
    kept_a = real_a & ~is_src
    n_kept_a = kept_a.sum(dim=1, keepdim=True)
    n_real = n_prefix + n_kept_a + real_b.sum(dim=1, keepdim=True)
    padding = ~real
    padding[:, :n_prefix] = False
    pad_slot = n_real + padding.cumsum(dim=1) - 1
    dest_a = torch.where(a_index < prefix_a, 2 * a_index, n_prefix + kept_a.cumsum(dim=1) - 1)
    dest_b = torch.where(b_index < prefix_b, 2 * b_index + 1, n_prefix + n_kept_a + real_b.cumsum(dim=1) - 1)
    dest_a = torch.where(padding[:, 0::2], pad_slot[:, 0::2], dest_a)
    dest_b = torch.where(padding[:, 1::2], pad_slot[:, 1::2], dest_b)
    if n_b:  # one token and no prefix leaves B empty: nothing can merge, every A token stays
        dest_a = torch.where(is_src, dest_b.gather(1, partner), dest_a)
    dest = torch.empty(batch, n, dtype=torch.long, device=device)
    dest[:, 0::2] = dest_a
    dest[:, 1::2] = dest_b
    return dest, n_real[:, 0]


def remap_origin(origin: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Compose an origin map (B, N0) with a destination map (B, N); dropped stays -1."""
    mapped = dest.gather(1, origin.clamp_min(0))
    return torch.where(origin >= 0, mapped, torch.full_like(mapped, -1))


def merge_tokens(
    state: TokenState, dest: torch.Tensor, n_out: int, prop_attn: bool, real: torch.Tensor | None = None
) -> TokenState:
    """Size-weighted merge of every token into its destination (no token is dropped).

    Sizes add up, so ``sum(size)`` and ``sum(size * x)`` are conserved. Raster order is lost.
    ``real`` (B,): per-image counts of real output tokens (the first slots; the rest is padding,
    whose size is 0 and which may share a slot with a real token without changing it).
    """
    size = state.size
    if state.valid is not None:  # padding weighs nothing, wherever it lands
        size = state.sizes().masked_fill(~state.valid, 0)
    x, size = merge_weighted(state.x, size, dest, n_out)
    valid = None
    if real is not None:  # real tokens first, padding (possibly folded into one slot) after
        if bool((real < n_out).any()):
            valid = torch.arange(n_out, device=dest.device) < real[:, None]
    elif state.valid is not None:  # a slot is real when any real token lands in it (scatter_ would let
        # a padding token sharing the slot decide, in an unspecified order)
        valid = torch.zeros(dest.shape[0], n_out, device=dest.device).scatter_add_(1, dest, state.valid.float()) > 0
    return state.replace(
        x=x, size=size, origin=remap_origin(state.origin, dest), valid=valid, grid=None,
        prop_attn=state.prop_attn or prop_attn,
    )


def keep_tokens(
    state: TokenState, keep: torch.Tensor, fuse_weight: torch.Tensor | None = None
) -> TokenState:
    """Keep the prefix and the tokens at ``keep`` (B, k), in that order; drop the rest.

    With ``fuse_weight`` (B, N) the dropped non-prefix tokens are instead summed into one extra
    last token, ``sum_j w_j x_j`` with unnormalised weights (EViT's inattentive-token fusion, Liang
    et al., ICLR 2022); its size is the sum of theirs. Without it, dropped tokens leave ``origin``
    as -1.
    """
    batch, n = state.x.shape[:2]
    p, k = state.n_prefix, keep.shape[1]
    device = state.x.device
    rows = torch.cat([torch.arange(p, device=device).expand(batch, p), keep], dim=1)
    dest = torch.full((batch, n), -1, dtype=torch.long, device=device)
    dest.scatter_(1, rows, torch.arange(p + k, device=device).expand(batch, p + k))

    def take(t: torch.Tensor) -> torch.Tensor:
        index = rows if t.dim() == 2 else rows.unsqueeze(-1).expand(-1, -1, t.shape[-1])
        return t.gather(1, index)

    x, size = take(state.x), None if state.size is None else take(state.size)
    valid = None if state.valid is None else take(state.valid)
    if fuse_weight is not None:
        dropped = dest < 0
        weight = fuse_weight * dropped
        fused = (weight.to(state.x.dtype).unsqueeze(-1) * state.x).sum(dim=1, keepdim=True)
        x = torch.cat([x, fused], dim=1)
        fused_size = (state.sizes() * dropped).sum(dim=1, keepdim=True)
        size = torch.cat([state.sizes().gather(1, rows), fused_size], dim=1)
        if valid is not None and state.valid is not None:
            valid = torch.cat([valid, (dropped & state.valid).any(dim=1, keepdim=True)], dim=1)
        dest = torch.where(dropped, torch.full_like(dest, p + k), dest)
    return state.replace(x=x, size=size, origin=remap_origin(state.origin, dest), valid=valid, grid=None)


def keep_top(state: TokenState, score: torch.Tensor, counts: torch.Tensor) -> TokenState:
    """Keep the prefix and, in row ``b``, the ``counts[b]`` highest-scoring non-prefix tokens,
    in their current order. Rows keeping fewer tokens are padded: ``valid`` marks the real ones.
    Ties go to the lower index."""
    batch, n = score.shape
    p, device = state.n_prefix, score.device
    if bool((counts > n - p).any()) or bool((counts < 0).any()):
        raise ValueError(f"keep_top: counts {counts.tolist()} outside 0..{n - p} non-prefix tokens")
    score = score.float()
    if state.valid is not None:
        score = score.masked_fill(~state.valid, float("-inf"))
    width = int(counts.max()) if batch else 0
    ranked = score[:, p:].argsort(dim=1, descending=True, stable=True)[:, :width] + p
    chosen = torch.arange(width, device=device) < counts[:, None]
    ranked, order = torch.where(chosen, ranked, ranked + n).sort(dim=1)  # chosen first, in sequence order
    chosen = chosen.gather(1, order)
    kept = keep_tokens(state, ranked % n)
    real = torch.cat([torch.ones(batch, p, dtype=torch.bool, device=device), chosen], dim=1)
    if kept.valid is not None:
        real = real & kept.valid
    slot_real = real.gather(1, kept.origin.clamp_min(0))
    origin = torch.where((kept.origin >= 0) & slot_real, kept.origin, torch.full_like(kept.origin, -1))
    return kept.replace(valid=None if bool(real.all()) else real, origin=origin)


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens weighted by how many original tokens each stands for (as the official ToMe
    code's MAE patch pools, ``tome/patch/mae.py``)."""
    if size is None and valid is None:
        return x.mean(dim=1)
    weight = torch.ones(x.shape[:2], device=x.device) if size is None else size.float()
    if valid is not None:
        weight = weight * valid
    pooled = (weight.to(x.dtype).unsqueeze(-1) * x).sum(dim=1)
    return pooled / weight.sum(dim=1, keepdim=True).to(x.dtype)


def unmerge(state: TokenState) -> torch.Tensor:
    """(B, N0, C): every original token gets the feature of the token carrying it (zeros if dropped)."""
    index = state.origin.clamp_min(0).unsqueeze(-1).expand(-1, -1, state.x.shape[-1])
    full = state.x.gather(1, index)
    return full.masked_fill((state.origin < 0).unsqueeze(-1), 0)
