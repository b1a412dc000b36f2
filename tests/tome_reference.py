"""An independent, deliberately plain reference of ToMe's forward pass on a timm ViT.

Written from the ToMe paper (Bolya et al., ICLR 2023, Sec. 3) and the official code's documented
behaviour, not from vtc: explicit softmax attention with ``log(size)`` added to every key column
(proportional attention), the keys averaged over heads as the similarity metric, cosine
similarity, the alternating A (even) / B (odd) split of the current order, the class token never a
source, ``r = min(r_l, (N - 1) // 2)`` per block (the official silent cap), the ``r`` A tokens with
the best edges folded into their B partners by a size-weighted average, and the official output
order ``[unmerged A (ascending, class token first), all B]``.

Everything runs one image at a time with Python loops over tokens, so it shares no indexing code
with ``vtc.merge``. Only plain timm ViTs with one class token and no LayerScale, qk-norm, gating or
registers are accepted (the official timm patch ignores those features).
"""

from __future__ import annotations

import torch
from torch import nn


def _check_plain(model: nn.Module) -> None:
    if model.num_prefix_tokens != 1 or model.cls_token is None:
        raise ValueError("the ToMe reference handles ViTs with exactly one class token and no registers")
    for block in model.blocks:
        attn = block.attn
        plain = [block.ls1, block.ls2, block.drop_path1, block.drop_path2, attn.q_norm, attn.k_norm, attn.norm]
        if not all(isinstance(m, nn.Identity) for m in plain) or getattr(attn, "gate", None) is not None:
            raise ValueError("the ToMe reference handles plain timm blocks only (no LayerScale, qk-norm, gating)")


def _attention(block: nn.Module, x: torch.Tensor, size: torch.Tensor, prop_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's attention branch (N, C) -> (output before the residual, keys averaged over heads)."""
    attn = block.attn
    n, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    qkv = attn.qkv(block.norm1(x)).reshape(n, 3, heads, head_dim)
    q, k, v = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)  # (H, N, d)
    logits = (q @ k.transpose(1, 2)) * head_dim**-0.5
    if prop_attn:
        logits = logits + size.log()[None, None, :]  # a bias per key column
    out = (logits.softmax(dim=-1) @ v).transpose(0, 1).reshape(n, width)
    return attn.proj(out), k.mean(dim=0)


def _merge(x: torch.Tensor, size: torch.Tensor, groups: list[list[int]], metric: torch.Tensor, r: int):
    """One bipartite soft matching step on one image, token by token."""
    n = x.shape[0]
    a_tokens, b_tokens = list(range(0, n, 2)), list(range(1, n, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best, partner = [], []
    for i in a_tokens:
        if i == 0:  # the class token is never merged away
            best.append(float("-inf"))
            partner.append(None)
            continue
        sims = [float(unit[i] @ unit[j]) for j in b_tokens]
        top = max(range(len(sims)), key=lambda j: sims[j])  # first maximum on ties
        best.append(sims[top])
        partner.append(b_tokens[top])
    ranked = sorted(range(len(a_tokens)), key=lambda i: -best[i])  # stable: lower A index first on ties
    sources = {a_tokens[i]: partner[i] for i in ranked[:r]}
    order = [i for i in a_tokens if i not in sources] + b_tokens
    new_x, new_size, new_groups = [], [], []
    for token in order:
        members = [token] + [s for s, d in sources.items() if d == token]
        weights = size[members]
        new_x.append((weights[:, None] * x[members]).sum(dim=0) / weights.sum())
        new_size.append(weights.sum())
        new_groups.append(sorted(g for m in members for g in groups[m]))
    return torch.stack(new_x), torch.stack(new_size), new_groups


def tome_forward(model: nn.Module, images: torch.Tensor, r: list[int], prop_attn: bool = True):
    """ToMe on ``model`` (a plain timm VisionTransformer), ``r[l]`` requested in block ``l``.

    Returns ``(logits, tokens, size, origin, counts)`` per batch: logits (B, classes); the final
    normed tokens (B, N, C); sizes (B, N); for every original token the index of the final token
    holding it (B, N0); and the tokens entering each block then leaving the last (L + 1).
    """
    _check_plain(model)
    if len(r) != len(model.blocks):
        raise ValueError(f"give one r per block: {len(model.blocks)}, got {len(r)}")
    with torch.no_grad():
        embedded = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        logits, tokens, sizes, origins, counts = [], [], [], [], None
        for x in embedded:
            n0 = x.shape[0]
            size = torch.ones(n0, dtype=x.dtype)
            groups = [[i] for i in range(n0)]
            seen = []
            for block, r_l in zip(model.blocks, r):
                seen.append(x.shape[0])
                out, metric = _attention(block, x, size, prop_attn)
                x = x + out
                r_eff = min(r_l, (x.shape[0] - 1) // 2)
                if r_eff > 0:
                    x, size, groups = _merge(x, size, groups, metric, r_eff)
                x = x + block.mlp(block.norm2(x))
            seen.append(x.shape[0])
            if counts is not None and counts != seen:
                raise AssertionError("fixed r must give every image the same counts")
            counts = seen
            x = model.norm(x)
            origin = torch.empty(n0, dtype=torch.long)
            for slot, members in enumerate(groups):
                origin[members] = slot
            tokens.append(x)
            sizes.append(size)
            origins.append(origin)
            logits.append(model.forward_head(x[None])[0])
        return torch.stack(logits), torch.stack(tokens), torch.stack(sizes), torch.stack(origins), counts
