"""Visual-token exit at a fixed LLM layer: the decoder-site baseline.

After layer ``layer`` of the language model every image token leaves the sequence; text tokens
go on alone. This is the fixed-layer exit that DyVTE (Wu et al., "Accelerating Multimodal
Large Language Models via Dynamic Visual-Token Exit", NeurIPS 2025, arXiv 2411.19628) learns to
place per input, and FastV at a 100% drop ratio. ``mode="mask"`` keeps the image tokens in the
sequence but hides them from every other query: the same result for text tokens, without the
savings, which makes it the reference the drop path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.sites import DecoderInfo, DecoderReducer, check_layers

_MODES = ("drop", "mask")


@dataclass
class VisualExit(DecoderReducer):
    """Remove all image tokens after LLM layer ``layer`` (0-based).

    Args:
        layer: the last LLM layer that sees image tokens.
        mode: "drop" shortens the sequence and the KV cache of later layers; "mask" hides the
            image tokens from attention instead.
    """

    name: ClassVar[str] = "exit"

    layer: int = 1
    mode: str = "drop"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"exit: mode must be one of {', '.join(_MODES)}, got {self.mode!r}")

    def layers(self, info: DecoderInfo) -> tuple[int, ...]:
        check_layers((self.layer,), info.num_layers, self.name)
        if self.layer == info.num_layers - 1:
            raise ValueError(
                f"exit: layer {self.layer} is the last of {info.num_layers} LLM layers, so no layer would run "
                f"without image tokens; allowed: 0..{info.num_layers - 2}"
            )
        return (self.layer,)

    def removal(self) -> str:
        return self.mode

    def select(self, layer: int, hidden: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return valid & ~visual
