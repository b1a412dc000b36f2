"""Pruning reducers at fixed layers: EViT (Liang et al., "Not All Patches are What You Need",
ICLR 2022; official code github.com/youweiliang/evit) and the random baseline.

Both keep ``k = ceil(keep * (N - p))`` of the non-prefix tokens at each drop layer (or an explicit
``tokens`` count); they differ only in how tokens are ranked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.budget import default_drop_layers
from vtc.merge import keep_tokens
from vtc.sites import (
    ConnectorInfo,
    EncoderInfo,
    EncoderReducer,
    ScoringConnectorReducer,
    Signal,
    Signals,
    Site,
    check_layers,
    check_site,
)
from vtc.state import TokenState


@dataclass
class _DropAtLayers(EncoderReducer):
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("keep", "tokens"),)

    keep: float = 0.7
    layers: tuple[int, ...] | None = None
    tokens: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"{self.name}: keep rate must be in (0, 1], got {self.keep}")
        if isinstance(self.layers, int):
            self.layers = (self.layers,)
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if isinstance(self.tokens, (list, tuple)):
            self.tokens = tuple(self.tokens)
        counts = () if self.tokens is None else self.tokens if isinstance(self.tokens, tuple) else (self.tokens,)
        if any(int(t) != t or t < 1 for t in counts):
            raise ValueError(f"{self.name}: tokens must be positive integers, got {self.tokens!r}")

    def _fused(self) -> bool:
        return False

    def plan(self, info: EncoderInfo) -> list[int | None]:
        layers = self.layers if self.layers is not None else default_drop_layers(info.num_layers)
        check_layers(layers, info.num_layers, self.name)
        if isinstance(self.tokens, tuple) and len(self.tokens) != len(layers):
            raise ValueError(
                f"{self.name}: {len(self.tokens)} token counts given for {len(layers)} drop layers {layers}"
            )
        plan: list[int | None] = [None] * info.num_layers
        n = info.num_tokens
        for i, layer in enumerate(sorted(layers)):
            mergeable = n - info.n_prefix
            k = self._kept(mergeable, i)
            if k > mergeable:
                raise ValueError(
                    f"{self.name}: layer {layer} is asked to keep {k} tokens but has only {mergeable} "
                    f"(excluding {info.n_prefix} prefix tokens)"
                )
            if k < mergeable:
                budget = k if self.tokens is not None else -1
                plan[layer] = budget
                n = self.tokens_after(n, info.n_prefix, budget)
        return plan

    def _kept(self, mergeable: int, drop_index: int) -> int:
        if self.tokens is None:
            return math.ceil(self.keep * mergeable)
        return self.tokens[drop_index] if isinstance(self.tokens, tuple) else self.tokens

    def _count(self, mergeable: int, budget: int) -> int:
        """Kept tokens for a budget: an explicit count, or -1 for ``ceil(keep * mergeable)``."""
        return math.ceil(self.keep * mergeable) if budget < 0 else min(budget, mergeable)

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: int) -> int:
        mergeable = num_tokens - n_prefix
        k = self._count(mergeable, budget)
        return n_prefix + k + (1 if self._fused() and k < mergeable else 0)


@dataclass
class EViT(_DropAtLayers):
    """Keep the tokens the CLS token attends to most; fuse the rest into one token (EViT's token
    reorganisation: attentive-token selection, inattentive-token fusion).

    Args:
        keep: keep rate kappa in (0, 1]; ``k = ceil(kappa (N - p))`` counts a previous fused token.
        layers: drop locations (0-based); default (3, 6, 9) for 12 blocks, L/4, L/2, 3L/4 otherwise.
        fuse: fuse inattentive tokens into one token weighted by their (unnormalised) CLS attention
            (the paper's setting and the README recipes of the official code, whose command-line
            default is off).
        tokens: explicit kept count per drop layer instead of ``keep`` (give one of them), as the
            official ``tokens``.

    Inference-only use on pretrained weights (EViT adds no parameters; the paper trains with it).
    Departures: CLS attention is one softmax row computed beside SDPA instead of eager attention;
    every prefix token (not only CLS) is protected (the official code prunes a DeiT distillation
    token like a patch); ties in attentiveness are broken toward the lower index. Kept tokens are
    ordered by decreasing attentiveness, as the official code's sorted top-k leaves them.
    Towers without a CLS token (SigLIP) are refused: EViT is not defined there.
    The fused token's ``size`` is the number of original tokens it absorbed, so on an average-pooled
    CLS model (not a setting the paper covers) size-weighted pooling weights it by that count.
    """

    name: ClassVar[str] = "evit"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.CLS_ATTN})
    fuse: bool = True

    def _fused(self) -> bool:
        return self.fuse

    def plan(self, info: EncoderInfo) -> list[int | None]:
        if not info.has_cls:
            raise ValueError(
                f"evit: EViT ranks tokens by the CLS token's attention, and this {info.family} model has no "
                f"CLS token; use tome, random or pool on it instead"
            )
        return super().plan(info)

    def reduce(self, state: TokenState, signals: Signals, budget: int, layer: int) -> TokenState:
        p = state.n_prefix
        attentiveness = signals.need(Signal.CLS_ATTN)[:, p:]
        k = self._count(attentiveness.shape[1], budget)
        if k == attentiveness.shape[1]:
            return state
        keep = attentiveness.argsort(dim=1, descending=True, stable=True)[:, :k] + p
        fuse_weight = torch.nn.functional.pad(attentiveness, (p, 0)) if self.fuse else None
        return keep_tokens(state, keep, fuse_weight)


@dataclass
class RandomDrop(_DropAtLayers, ScoringConnectorReducer):
    """Random pruning baseline: keep a random subset of the non-prefix tokens.

    At the encoder site (the only one of a vision encoder, or ``site=encoder``) it drops at each
    drop layer; defaults mirror EViT's (keep 0.7 at L/4, L/2, 3L/4). The choice is drawn from
    ``seed`` and the layer index and is the same for every image of a batch.

    At the connector (the default on a vision-language model) each image keeps ``tokens`` (or
    ``ceil(keep * N)``) of its visual tokens before the projector (``tokens`` is a cap: an image
    arriving with no more, after an encoder reducer, keeps all): every token position gets a
    priority drawn from ``seed``, the same for every image, and the highest ones are kept, so an
    image keeps the same tokens alone or in a batch. Kept tokens stay in their current order.
    """

    name: ClassVar[str] = "random"
    sites: ClassVar[tuple[Site, ...]] = (Site.CONNECTOR, Site.ENCODER)
    seed: int = 0
    site: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_site(self, "layers" if self.layers is not None else None)

    def check_connector(self, info: ConnectorInfo) -> None:
        check_site(self, "layers" if self.layers is not None else None, at_connector=True)
        if isinstance(self.tokens, tuple):
            raise ValueError(f"random: one token count per image at the connector, got {self.tokens!r}")
        if info.num_tokens is not None:
            self.target(info.num_tokens)

    def target(self, num_tokens: int) -> int:
        if self.tokens is None:
            return math.ceil(self.keep * num_tokens)
        if isinstance(self.tokens, tuple):
            raise ValueError(f"random: one token count per image at the connector, got {self.tokens!r}")
        if self.tokens > num_tokens:
            raise ValueError(f"random: tokens={self.tokens} is more than the {num_tokens} visual tokens of an image")
        return self.tokens

    def budget_cap(self) -> int | None:
        return self.tokens if isinstance(self.tokens, int) else None

    def score(self, state: TokenState, signals: Signals) -> torch.Tensor:
        """A priority per token position drawn from ``seed`` (on the CPU, so a longer draw starts
        with a shorter one: an image keeps the same tokens in a wider padded batch)."""
        n = state.x.shape[1]
        priority = torch.rand(n, generator=torch.Generator().manual_seed(self.seed)).to(state.x.device)
        return priority.expand(state.x.shape[0], n)

    def reduce(self, state: TokenState, signals: Signals, budget: int, layer: int) -> TokenState:
        p, (batch, n) = state.n_prefix, state.x.shape[:2]
        k = self._count(n - p, budget)
        if k == n - p:
            return state
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        chosen = torch.randperm(n - p, generator=generator)[:k].sort().values + p
        return keep_tokens(state, chosen.to(state.x.device).expand(batch, k))
