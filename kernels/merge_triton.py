"""Triton size-weighted merge: one program per output slot, its sources summed in a fixed order.

No atomics: the wrapper sorts token indices by destination slot (a stable sort, so the sources of
a slot are visited in increasing index order), and each program reads its slot's sources, sums
``size * x`` and ``size`` in float32 and writes the average once. Results are therefore identical
between runs (whichever block size the autotuner picks: each channel's sum has the same order).
Same contract as :func:`vtc.kernels.merge.merge_weighted_reference`.

Block sizes are autotuned per channel count (:data:`MERGE_CONFIGS`); Triton's CPU interpreter gets
one small configuration, so tests never benchmark.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vtc.kernels.slots import slot_order

# (channels per program, warps): wide blocks for few, long rows; narrow ones keep more programs busy
MERGE_CONFIGS = [triton.Config({"BLOCK_C": 64}, num_warps=1)] if os.environ.get("TRITON_INTERPRET") == "1" else [
    triton.Config({"BLOCK_C": block}, num_warps=warps) for block, warps in ((128, 1), (128, 2), (256, 2), (256, 4), (512, 4))
]


@triton.autotune(configs=MERGE_CONFIGS, key=["C", "HAS_SIZE"])
@triton.jit
def merge_kernel(
    x_ptr, size_ptr, order_ptr, offsets_ptr, out_ptr, out_size_ptr,
    N, C, N_OUT, stride_xb, stride_xn, stride_ob, stride_on,
    HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    slot = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    batch = slot // N_OUT
    start = tl.load(offsets_ptr + slot)
    end = tl.load(offsets_ptr + slot + 1)
    acc = tl.zeros([BLOCK_C], tl.float32)
    total = tl.zeros([1], tl.float32)
    for i in range(start, end):
        token = tl.load(order_ptr + i) - batch * N
        weight = tl.full([1], 1.0, tl.float32)
        if HAS_SIZE:
            weight = tl.load(size_ptr + batch * N + token + tl.zeros([1], tl.int64)).to(tl.float32)
        value = tl.load(x_ptr + batch * stride_xb + token * stride_xn + channels, mask=c_ok, other=0.0)
        acc += value.to(tl.float32) * weight
        total += weight
    mean = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
    out = out_ptr + batch * stride_ob + (slot - batch * N_OUT) * stride_on + channels
    tl.store(out, mean.to(out_ptr.dtype.element_ty), mask=c_ok)
    if tl.program_id(1) == 0:
        tl.store(out_size_ptr + slot + tl.arange(0, 1), total)


def merge_weighted_triton(
    x: torch.Tensor, size: torch.Tensor | None, dest: torch.Tensor, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`merge_kernel`; sizes come back in float32."""
    batch, n, channels = x.shape
    x = x.contiguous() if x.stride(-1) != 1 else x
    order, offsets = slot_order(dest, n_out)
    out = torch.empty(batch, n_out, channels, device=x.device, dtype=x.dtype)
    out_size = torch.empty(batch, n_out, device=x.device, dtype=torch.float32)
    size_arg = size.contiguous() if size is not None else out_size
    merge_kernel[lambda meta: (batch * n_out, triton.cdiv(channels, meta["BLOCK_C"]))](
        x, size_arg, order, offsets, out, out_size,
        n, channels, n_out, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        HAS_SIZE=size is not None,
    )
    return out, out_size
