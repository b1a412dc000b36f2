"""Tensor-only kernels behind vtc's merging reducers (installed as ``vtc.kernels``).

Each op has a PyTorch reference and a Triton kernel side by side, and one dispatch rule between
them (``dispatch.py``; docs/ARCHITECTURE.md "Shared reduction functions"). Kernels know tensors
only: no TokenState, no reducer, no model.
"""

from .dispatch import BACKENDS, triton_available, use_backend
from .matching import bipartite_match, bipartite_match_reference
from .merge import merge_weighted, merge_weighted_reference

__all__ = [
    "BACKENDS", "bipartite_match", "bipartite_match_reference", "merge_weighted", "merge_weighted_reference",
    "triton_available", "use_backend",
]
