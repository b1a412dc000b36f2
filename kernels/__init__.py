"""Tensor-only kernels behind vtc's merging reducers (installed as ``vtc.kernels``).

Each op has a PyTorch reference here; fused Triton versions and the dispatch rule between
them are added beside these references (DESIGN.md "Kernels"). Kernels know tensors only:
no TokenState, no reducer, no model.
"""

from .matching import bipartite_match
from .merge import merge_weighted

__all__ = ["bipartite_match", "merge_weighted"]
