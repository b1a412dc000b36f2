"""FLOP counting helpers, tensors and modules only (docs/ARCHITECTURE.md "Measurement").

``torch.utils.flop_counter``'s convention: 2 per multiply-accumulate, matrix products and
convolutions only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# CPU SDPA kernels the stock flop counter does not know; counted like the CUDA ones.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: None}


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running ``fn`` as counted by ``torch.utils.flop_counter`` (CPU SDPA included)."""
    mapping = {op: _sdpa_flops for op in _CPU_SDPA}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def per_token_params(module: nn.Module) -> int:
    """Weights a token meets in ``module``'s linear layers (and ``nn.MultiheadAttention`` input
    projections): half its matrix-product FLOPs per token."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += sub.weight.numel()
        elif isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None:
            total += sub.in_proj_weight.numel()
    return total
