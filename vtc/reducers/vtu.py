"""VTU — virtual token unmerging at the decoder site (DyMU paper, Wang et al., 2025, Sec. 3.2).

Not a reducer of its own: it lets the LLM consume merged visual tokens (DyMU, ToMe, pool) as if
each stood at every position it covers. Position-wise layers run once per unique token; attention
runs on the virtual full-length sequence with the original positions (RoPE); the outputs of a
token's copies are averaged back (the one approximation). ``vtc.apply(llava, "dymu:preset=low")``
adds it (``vtu=`` option of DyMU); ``vtc.apply(llava, "tome:r=4", "vtu")`` pairs it with another
merger. The runtime is :mod:`vtc.models.vtu`; the tensor algebra :mod:`vtc.vtu`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtc.reducers.base import Reducer, Site

MODES = ("expand", "exact")


@dataclass
class VirtualUnmerge(Reducer):
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
