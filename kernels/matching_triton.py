"""Triton bipartite best-match: per-A-row max/argmax of the cosine similarity to set B, tile by tile.

Never materialises the N_A x N_B matrix: each program holds a block of A rows, walks over B in
tiles (dot products accumulated in float32 over channel chunks), scales by the inverse norms and
keeps the running row max and its index in registers. Same contract as
:func:`vtc.kernels.matching.bipartite_match_reference`: protected prefix rows/columns and padding
score ``-inf``; exact ties go to the lowest B index (tiles are visited in order and a later tile
must be strictly better; inside a tile ``argmax`` breaks ties to the left). Tile sizes are
autotuned per shape (:data:`MATCH_CONFIGS`); the interpreter gets one small configuration.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# (A rows, B columns, channels) per tile, warps, pipeline stages
MATCH_CONFIGS = [triton.Config({"BLOCK_A": 32, "BLOCK_B": 32, "BLOCK_D": 32}, num_warps=4)] if (
    os.environ.get("TRITON_INTERPRET") == "1") else [
    triton.Config({"BLOCK_A": a, "BLOCK_B": b, "BLOCK_D": d}, num_warps=warps, num_stages=stages)
    for a, b, d, warps, stages in ((64, 64, 64, 4, 2), (32, 64, 64, 4, 2), (64, 32, 64, 4, 2), (128, 64, 32, 8, 2),
                                   (64, 64, 32, 4, 3), (32, 32, 64, 2, 2))
]


@triton.autotune(configs=MATCH_CONFIGS, key=["N_A", "D", "HAS_VALID", "NATIVE_DOT"])
@triton.jit
def best_match_kernel(
    metric_ptr, inv_norm_ptr, valid_ptr, score_ptr, index_ptr,
    N, D, N_A, N_B, stride_b, stride_n, stride_d, PREFIX_A, PREFIX_B,
    HAS_VALID: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    row_ok = rows < N_A
    a_pos = 2 * rows
    base = metric_ptr + batch * stride_b
    inv_a = tl.load(inv_norm_ptr + batch * N + a_pos, mask=row_ok, other=0.0)
    row_live = row_ok & (rows >= PREFIX_A)
    if HAS_VALID:
        row_live = row_live & (tl.load(valid_ptr + batch * N + a_pos, mask=row_ok, other=0) != 0)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_A], tl.int64)
    for col0 in range(0, N_B, BLOCK_B):
        cols = col0 + tl.arange(0, BLOCK_B)
        col_ok = cols < N_B
        b_pos = 2 * cols + 1
        acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            a = tl.load(base + a_pos[:, None] * stride_n + ds[None, :] * stride_d,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(base + b_pos[:, None] * stride_n + ds[None, :] * stride_d,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if NATIVE_DOT:  # half-precision tensor cores, float32 accumulation
                acc += tl.dot(a, tl.trans(b))
            else:
                acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        inv_b = tl.load(inv_norm_ptr + batch * N + b_pos, mask=col_ok, other=0.0)
        col_live = col_ok & (cols >= PREFIX_B)
        if HAS_VALID:
            col_live = col_live & (tl.load(valid_ptr + batch * N + b_pos, mask=col_ok, other=0) != 0)
        score = tl.where(col_live[None, :], acc * inv_a[:, None] * inv_b[None, :], float("-inf"))
        tile_best = tl.max(score, axis=1)
        tile_index = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int64) + col0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    best = tl.where(row_live, best, float("-inf"))
    best_index = tl.where(row_live, best_index, 0)
    tl.store(score_ptr + batch * N_A + rows, best, mask=row_ok)
    tl.store(index_ptr + batch * N_A + rows, best_index, mask=row_ok)


def bipartite_match_triton(
    metric: torch.Tensor, n_prefix: int, valid: torch.Tensor | None, interpreted: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`best_match_kernel`; scores come back in float32."""
    batch, n, d = metric.shape
    n_a, n_b = (n + 1) // 2, n // 2
    inv_norm = metric.float().norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny).reciprocal().contiguous()
    score = torch.empty(batch, n_a, device=metric.device, dtype=torch.float32)
    index = torch.empty(batch, n_a, device=metric.device, dtype=torch.long)
    valid_arg = valid.to(torch.int8).contiguous() if valid is not None else inv_norm
    best_match_kernel[lambda meta: (batch, triton.cdiv(n_a, meta["BLOCK_A"]))](
        metric, inv_norm, valid_arg, score, index,
        n, d, n_a, n_b, metric.stride(0), metric.stride(1), metric.stride(2), (n_prefix + 1) // 2, n_prefix // 2,
        HAS_VALID=valid is not None,
        NATIVE_DOT=metric.dtype in (torch.float16, torch.bfloat16) and not interpreted,
    )
    return score, index
