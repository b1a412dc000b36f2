"""The reducer interface (DESIGN.md "Where a reducer acts", "Signals without giving up fast attention").

A reducer knows tensors and :class:`~vtc.state.TokenState`, never a model class. An adapter
calls it through three methods: :meth:`EncoderReducer.plan` once when it is applied (one budget
per layer, validated against the model's token counts), then, in each block that has a budget,
:meth:`EncoderReducer.reduce` between the attention and the MLP with the signals it declared.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch

from vtc.state import TokenState


class Site(str, Enum):
    ENCODER = "encoder"
    CONNECTOR = "connector"
    DECODER = "decoder"


class Signal(str, Enum):
    KEY_MEAN = "key_mean"  # (B, N, d) attention keys averaged over heads (ToMe's metric)
    CLS_ATTN = "cls_attn"  # (B, N) head-mean softmax row of query 0, computed beside SDPA


@dataclass(frozen=True)
class EncoderInfo:
    """What a reducer may know about the encoder it is applied to."""

    family: str
    num_layers: int
    num_tokens: int  # tokens entering the first block at the model's default input size
    n_prefix: int
    has_cls: bool
    grid: tuple[int, int]


@dataclass(frozen=True)
class Signals:
    key_mean: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None


class Reducer:
    """Base of every reducer. Subclasses are dataclasses whose fields are the spec-string options."""

    site: ClassVar[Site]
    name: ClassVar[str]

    def describe(self) -> str:
        """The spec string that rebuilds this reducer."""
        from vtc.reducers.registry import to_spec

        return to_spec(self)


class EncoderReducer(Reducer):
    """A reducer acting inside vision-transformer blocks, after attention and before the MLP."""

    site: ClassVar[Site] = Site.ENCODER
    needs: ClassVar[frozenset[Signal]] = frozenset()

    def plan(self, info: EncoderInfo) -> list[Any]:
        """One budget per layer (None: the layer does not reduce). Raises ValueError when the
        budget is impossible for this model; the message says what is allowed."""
        raise NotImplementedError

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: Any) -> int:
        """Token count leaving a layer with ``budget`` that received ``num_tokens``."""
        raise NotImplementedError

    def reduce(self, state: TokenState, signals: Signals, budget: Any, layer: int) -> TokenState:
        raise NotImplementedError

    def token_counts(self, info: EncoderInfo, plan: list[Any]) -> list[int]:
        """Tokens entering each block and leaving the last one (length L + 1)."""
        counts = [info.num_tokens]
        for budget in plan:
            n = counts[-1]
            counts.append(n if budget is None else self.tokens_after(n, info.n_prefix, budget))
        return counts


def check_layers(layers: tuple[int, ...], num_layers: int, what: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"{what}: layers {bad} do not exist; the model has layers 0..{num_layers - 1}")
