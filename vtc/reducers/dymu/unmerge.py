"""VTU — virtual token unmerging at the decoder site (DyMU paper, Wang et al., 2025, Sec. 3.2).

Not a reducer of its own: it lets the LLM consume merged visual tokens (DyMU, ToMe, pool) as if
each stood at every position it covers. Position-wise layers run once per unique token; attention
runs on the virtual full-length sequence with the original positions (RoPE); the outputs of a
token's copies are averaged back (the one approximation). ``vtc.apply(llava, "dymu:preset=low")``
adds it (``vtu=`` option of DyMU); ``vtc.apply(llava, "tome:r=4", "vtu")`` pairs it with another
merger. The LLaVA adapter runs it (:mod:`vtc.models.vtu`); this module holds the option and the
tensor algebra, no model classes.

A *virtual map* ``pi`` (B, T) gives, for every position of the full-length sequence, the row of
the unique (merged) token standing there (:func:`vtc.sequence.virtual_map`); ``width`` is the
number of unique rows (padded across the batch). Text tokens are their own groups; a merged
visual token covers all its positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.sites import Site, UnmergingReducer

MODES = ("expand", "exact")


@dataclass
class VirtualUnmerge(UnmergingReducer):
    """Virtual token unmerging in the LLM of a LLaVA.

    Args:
        mode: ``expand`` (official default: Q/K/V of unique tokens gathered to full length, fast
            attention on it; O(N^2 d) attention, savings in projections and MLPs) or ``exact``
            (the paper's Eq. 10: per-frequency dot and cross products of unique tokens, N x N
            logits formed explicitly; O(N_un^2 d) products but O(N^2 d / 2) elementwise work and
            N^2 memory, and no fused attention kernel).
    """

    name: ClassVar[str] = "vtu"
    sites: ClassVar[tuple[Site, ...]] = (Site.DECODER,)

    mode: str = "expand"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"vtu: mode must be one of {', '.join(MODES)}, got {self.mode!r}")


def group_mean(x: torch.Tensor, pi: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width, ...) mean of the rows of ``x`` (B, T, ...) in each group: ``(M^T M)^-1 M^T x``
    (DyMU paper, Sec. 3.2, the re-merge); a unique row no position maps to comes out as zeros."""
    shape = (x.shape[0], width, *x.shape[2:])
    index = pi.view(*pi.shape, *([1] * (x.dim() - 2))).expand_as(x)
    total = torch.zeros(shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    total.scatter_add_(1, index, x.to(total.dtype))
    count = torch.zeros(x.shape[0], width, dtype=total.dtype, device=x.device)
    count.scatter_add_(1, pi, torch.ones_like(pi, dtype=total.dtype))
    count = count.clamp(min=1).view(*count.shape, *([1] * (x.dim() - 2)))
    return (total / count).to(x.dtype)


def expand(x: torch.Tensor, pi: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``M x``: the unique rows of ``x`` gathered to full length along ``dim`` (the virtual
    full-length sequence of DyMU paper, Sec. 3.2)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = pi.shape
    index = pi.view(shape).expand(*x.shape[:dim], pi.shape[1], *x.shape[dim + 1 :])
    return x.gather(dim, index)


def rope_logits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """RoPE attention logits of the virtual sequence from unique rows (DyMU paper,
    Wang et al., 2025, Sec. 3.2, Eq. 10).

    ``q`` (B, H, U, d) and ``k`` (B, H, U, d) are un-rotated unique queries and keys (rotate-half
    pairing: coordinate f with f + d/2), ``cos``/``sin`` (B, T, d) the rotary tables at the full
    positions. Per frequency f, the dot part ``G_f = q_a k_a^T + q_b k_b^T`` and the cross part
    ``H_f = q_a k_b^T - q_b k_a^T`` are formed on unique rows and weighted at full positions by
    ``cos((m-n) theta_f)`` and ``sin((m-n) theta_f)`` (as products of the tables, so attention
    scaling folded into them carries over). Returns (B, H, T, T) ``rope(Q[pi]) rope(K[pi])^T``.
    Memory: one (B, H, T, T) accumulator and one frequency's terms at a time.
    """
    half = q.shape[-1] // 2
    qa, qb, ka, kb = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
    c, s = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)  # (B, 1, T, d/2)
    rows = pi[:, None, :, None]
    cols = pi[:, None, None, :]
    logits: torch.Tensor | None = None
    for f in range(half):
        dot = qa[..., f : f + 1] @ ka[..., f : f + 1].transpose(-1, -2) + qb[..., f : f + 1] @ kb[..., f : f + 1].transpose(-1, -2)
        cross = qa[..., f : f + 1] @ kb[..., f : f + 1].transpose(-1, -2) - qb[..., f : f + 1] @ ka[..., f : f + 1].transpose(-1, -2)
        dot, cross = _expand2(dot, rows, cols), _expand2(cross, rows, cols)
        cm, sm = c[..., f, None], s[..., f, None]  # (B, 1, T, 1): position m
        cn, sn = cm.transpose(-1, -2), sm.transpose(-1, -2)  # position n
        term = dot * (cm * cn + sm * sn) + cross * (sm * cn - cm * sn)
        logits = term if logits is None else logits + term
    if logits is None:
        raise ValueError(f"rope_logits: heads of width {q.shape[-1]} have no rotary frequency pair")
    return logits


def _expand2(unique: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, H, U, U) -> (B, H, T, T) at ``[pi(m), pi(n)]``."""
    batch, heads = unique.shape[:2]
    t = rows.shape[2]
    out = unique.gather(2, rows.expand(batch, heads, t, unique.shape[3]))
    return out.gather(3, cols.expand(batch, heads, t, t))


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pi: torch.Tensor,
    mask: torch.Tensor | None, scaling: float,
) -> torch.Tensor:
    """Attention of the virtual sequence from unique rows (DyMU paper, Sec. 3.2): softmax of
    :func:`rope_logits` with the (B|1, 1, T, T) ``mask`` (bool: True = attend; float: added; None:
    causal), then ``(P M) V_un``: probabilities summed over each group's columns before the value
    product. Returns (B, H, T, d), one output per position (before the copies are averaged)."""
    logits = rope_logits(q, k, cos, sin, pi)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scaling
    t = logits.shape[-1]
    if mask is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask.to(logits.dtype)
    probs = logits.softmax(dim=-1).nan_to_num(0.0)  # a fully masked row attends to nothing
    grouped = torch.zeros(*probs.shape[:3], v.shape[2], dtype=probs.dtype, device=probs.device)
    grouped.scatter_add_(3, pi[:, None, None, :].expand_as(probs), probs)
    return (grouped.to(v.dtype) @ v)
