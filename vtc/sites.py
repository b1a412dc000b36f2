"""The site interfaces every reducer implements, and the reducer registry (docs/ARCHITECTURE.md
"Reducers"; the signals: "Adapters and apply").

A reducer knows tensors and :class:`~vtc.state.TokenState`, never a model class. There is one
interface per site:

- :class:`EncoderReducer`: :meth:`~EncoderReducer.plan` once when applied (one budget per layer,
  validated against the model's token counts), then :meth:`~EncoderReducer.reduce` between the
  attention and the MLP of each block that has a budget, with the signals it declared;
- :class:`ConnectorReducer`: :meth:`~ConnectorReducer.target` says how many visual tokens an image
  keeps, :meth:`~ConnectorReducer.reduce_visual` reduces a padded batch of per-image sequences;
- :class:`DecoderReducer`: after chosen LLM layers, :meth:`~DecoderReducer.select` says which
  tokens later layers keep.

A reducer that can act at several sites lists them in ``sites`` (preferred first) and may let the
user pick one with a ``site`` option; :meth:`Reducer.resolve_site` makes the choice per model.

A reducer class declares itself by its ``name``: defining the class registers it under that spec
name in :data:`REDUCERS` (a package outside vtc adds reducers the same way, found through the
``vtc.reducers`` entry-point group, :func:`vtc.spec.known_reducers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch

from vtc.merge import keep_top
from vtc.options import to_spec
from vtc.state import TokenState

REDUCERS: dict[str, type[Reducer]] = {}
"""Every declared reducer class by spec name."""


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
    model_id: str | None = None  # checkpoint name (hub id or folder name) when the adapter can tell
    shipped: Path | None = None  # folder of the checkpoints vtc ships, where shipped names (DyMU presets) resolve


@dataclass(frozen=True)
class Signals:
    key_mean: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None

    def need(self, signal: Signal) -> torch.Tensor:
        """The tensor of ``signal``; RuntimeError when the adapter did not compute it (a reducer
        reads only the signals it declared in ``needs`` / ``connector_needs``)."""
        value = getattr(self, signal.value)
        if value is None:
            raise RuntimeError(f"signal {signal.value} was not computed for this block; declare it in the reducer's needs")
        return value


class Reducer:
    """Base of every reducer. Subclasses are dataclasses whose fields are the spec-string options
    (:mod:`vtc.options`); a subclass defining ``name`` is registered under it."""

    sites: ClassVar[tuple[Site, ...]]
    name: ClassVar[str]
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = ()  # groups of options of which one may be given

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        """Register ``cls`` under its ``name`` (``register=False``: an internal reducer, no spec name)."""
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None or not register:
            return  # an abstract base sharing code between reducers, or an internal reducer
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum() or name != name.lower():
            raise ValueError(f"a reducer name is a lower-case word usable in a spec string, got {name!r} on {cls.__qualname__}")
        taken = REDUCERS.get(name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"reducer name {name!r} of {cls.__module__}.{cls.__qualname__} is taken by "
                             f"{taken.__module__}.{taken.__qualname__}")
        REDUCERS[name] = cls

    def resolve_site(self, available: tuple[Site, ...], family: str) -> Site:
        """The site this reducer acts at on a model offering ``available`` sites: an explicit
        ``site`` option if the reducer has one, else its first listed site the model has."""
        chosen = getattr(self, "site", None)
        wanted = (Site(chosen),) if chosen is not None else self.sites
        for site in wanted:
            if site in available:
                return site
        where = " or ".join(f"the {s.value}" for s in wanted)
        offered = ", ".join(s.value for s in available)
        raise ValueError(
            f"{self.name} acts at {where} site, but a {family} model only has the {offered} site"
            f"{'s' if len(available) > 1 else ''}"
        )

    def companions(self) -> tuple[Reducer, ...]:
        """Reducers this one brings to other sites when the model has them free (DyMU: virtual
        unmerging at the decoder site); :func:`vtc.apply` adds them."""
        return ()

    def describe(self) -> str:
        """The spec string that rebuilds this reducer."""
        return to_spec(self)


class EncoderReducer(Reducer):
    """A reducer acting inside vision-transformer blocks, after attention and before the MLP."""

    sites: ClassVar[tuple[Site, ...]] = (Site.ENCODER,)
    needs: ClassVar[frozenset[Signal]] = frozenset()
    dynamic: ClassVar[bool] = False  # token counts depend on the image (planned counts are upper bounds)
    takes_padding: ClassVar[bool] = False  # reduce() handles per-image counts (a padded batch, valid marks)

    def plan(self, info: EncoderInfo) -> list[Any]:
        """One budget per layer (None: the layer does not reduce). Raises ValueError when the
        budget is impossible for this model; the message says what is allowed."""
        raise NotImplementedError

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: Any) -> int:
        """Token count leaving a layer with ``budget`` that received ``num_tokens``."""
        raise NotImplementedError

    def reduce(self, state: TokenState, signals: Signals, budget: Any, layer: int) -> TokenState:
        raise NotImplementedError

    def needs_for(self, budget: Any) -> frozenset[Signal]:
        """The signals a block with ``budget`` computes for :meth:`reduce` (default: ``needs``)."""
        return self.needs

    def token_counts(self, info: EncoderInfo, plan: list[Any]) -> list[int]:
        """Tokens entering each block and leaving the last one (length L + 1)."""
        counts = [info.num_tokens]
        for budget in plan:
            n = counts[-1]
            counts.append(n if budget is None else self.tokens_after(n, info.n_prefix, budget))
        return counts


@dataclass(frozen=True)
class ConnectorInfo:
    """What a connector reducer may know about the visual sequence of one image."""

    family: str
    num_tokens: int | None  # reducible visual tokens per image (None: they vary per image, checked at run time)
    n_prefix: int  # leading tokens kept as they are (the CLS token under the "full" strategy)
    grid: tuple[int, int] | None  # patch grid the image's visual tokens come from
    has_cls: bool = True  # the tower has a CLS token (whose attention row signals can give)
    reordered: bool = False  # an encoder reducer runs first: tokens may be merged, dropped, out of raster order
    feature_width: int | None = None  # width of the vision features the connector receives (before the projector)
    llm_width: int | None = None  # width of the LLM's token embeddings (the projector's output)
    source: str | None = None  # the model's checkpoint (hub id or folder) where the adapter can tell


class ConnectorReducer(Reducer):
    """A reducer on the per-image visual sequence between the vision tower and the LLM.

    ``before_projector`` says whether it sees vision-tower features (True) or projected ones;
    ``replaces_projector`` that it turns vision features into LLM tokens itself (a query
    transformer), so the model's projector does not run.
    Signals in ``connector_needs`` are computed at the vision feature layer. ``needs_grid`` says
    that :meth:`reduce_visual` works on one token per patch in raster order: after an encoder
    reducer the adapter lays the reduced tokens back on the patch grid first
    (:func:`vtc.grid.lay_on_grid`; dropped patches come as padding, ``valid`` False).
    """

    connector_needs: ClassVar[frozenset[Signal]] = frozenset()
    before_projector: ClassVar[bool] = True
    replaces_projector: ClassVar[bool] = False  # reduce_visual returns LLM-width tokens; the projector is skipped
    pools_tiles: ClassVar[bool] = False  # LLaVA-NeXT: reduce each tile to the image's target, then pack the tiles
    needs_grid: ClassVar[bool] = False

    @property
    def ordered(self) -> bool:
        """True when the tokens :meth:`reduce_visual` returns enter the LLM in that order (instead
        of the raster order of the patches they cover)."""
        return False

    def check_connector(self, info: ConnectorInfo) -> None:
        """Raise ValueError when the reducer cannot act on this model's visual sequence."""
        if info.num_tokens is not None:
            self.target(info.num_tokens)

    def target(self, num_tokens: int) -> int:
        """Visual tokens kept (prefix excluded) for an image offering ``num_tokens``; ValueError
        when the budget asks for more than there are."""
        raise NotImplementedError

    def budget_cap(self) -> int | None:
        """The fixed number of tokens kept per image, for reducers whose budget is one."""
        return None

    def runtime_target(self, num_tokens: int) -> int:
        """Tokens kept of an image that reaches the connector with ``num_tokens``, fewer than
        :meth:`check_connector` saw when an encoder reducer with per-image counts ran first: a
        fixed budget (:meth:`budget_cap`) is a cap, so an image with no more tokens keeps them all;
        otherwise :meth:`target`."""
        cap = self.budget_cap()
        return num_tokens if cap is not None and cap >= num_tokens else self.target(num_tokens)

    def flops(self, images: int, tokens: int) -> int:
        """Multiply-add FLOPs (2 per product) of the reducer's own layers on ``images`` images of
        ``tokens`` tokens each (a query transformer; 0 for methods that only select or average)."""
        return 0

    def image_targets(self, state: TokenState, counts: list[int]) -> list[int]:
        """Tokens kept of each image of a batch: row ``b`` of ``state`` offers ``counts[b]``
        reducible tokens. Default: :meth:`runtime_target` of each count; a method whose budget
        may differ per image (a list, or a function of the image's tokens) overrides this."""
        return [self.runtime_target(n) for n in counts]

    def reduce_visual(self, state: TokenState, signals: Signals, targets: torch.Tensor) -> TokenState:
        """Reduce a (B, N, C) batch of per-image sequences (padded where ``state.valid`` says) so
        row ``b`` keeps ``targets[b]`` non-prefix tokens; ragged results come back padded, with
        ``valid`` marking the real tokens."""
        raise NotImplementedError


class ScoringConnectorReducer(ConnectorReducer):
    """A connector reducer that scores every visual token and keeps each image's ``targets[b]``
    best, in their current order (:func:`vtc.merge.keep_top`; ties to the lower index). A method
    of this kind writes :meth:`score` (and :meth:`target`); padding is never kept."""

    def score(self, state: TokenState, signals: Signals) -> torch.Tensor:
        """(B, N) scores of the tokens of ``state`` (higher is kept first)."""
        raise NotImplementedError

    def reduce_visual(self, state: TokenState, signals: Signals, targets: torch.Tensor) -> TokenState:
        return keep_top(state, self.score(state, signals), targets)


@dataclass(frozen=True)
class DecoderInfo:
    """What a decoder reducer may know about the LLM it acts in."""

    family: str
    num_layers: int
    hidden_size: int
    source: str | None = None  # the model's checkpoint (hub id or folder) where the adapter can tell
    shipped: Path | None = None  # folder of the checkpoints vtc ships, where shipped names (routers=shapes-llava) resolve


class DecoderReducer(Reducer):
    """A reducer inside the LLM: after each of :meth:`layers`, :meth:`select` marks the tokens
    later layers keep. ``mode`` "drop" removes the others from the sequence (and the KV cache of
    later layers); "mask" keeps them in the sequence but hides them from every other query."""

    sites: ClassVar[tuple[Site, ...]] = (Site.DECODER,)

    def layers(self, info: DecoderInfo) -> tuple[int, ...]:
        """LLM layers (0-based) after whose output :meth:`select` runs; ValueError when invalid."""
        raise NotImplementedError

    def removal(self) -> str:
        """How unselected tokens are removed: "drop" or "mask"."""
        return "drop"

    def select(self, layer: int, hidden: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, S) bool of the tokens layers after ``layer`` keep. ``hidden`` (B, S, D) is the
        layer's output, ``visual`` (B, S) marks image tokens, ``valid`` (B, S) real tokens."""
        raise NotImplementedError


class UnmergingReducer(Reducer):
    """A decoder-site reducer that lets the LLM consume merged visual tokens as if each stood at
    every position it covers (virtual unmerging). The adapter hands the LLM the full-length
    sequence and runs attention in ``mode``; subclasses are dataclasses with a ``mode`` option."""

    sites: ClassVar[tuple[Site, ...]] = (Site.DECODER,)
    mode: str


def check_layers(layers: tuple[int, ...], num_layers: int, what: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"{what}: layers {bad} do not exist; the model has layers 0..{num_layers - 1}")


def check_site(reducer, encoder_option: str | None, at_connector: bool = False) -> None:
    """Validate a dual-site reducer's ``site`` option; an encoder-only option given (``encoder_option``)
    is refused where the reducer acts at the connector."""
    allowed = [s.value for s in reducer.sites]
    if reducer.site is not None and reducer.site not in allowed:
        raise ValueError(f"{reducer.name}: site must be one of {', '.join(allowed)}, got {reducer.site!r}")
    if encoder_option is not None and (at_connector or reducer.site == Site.CONNECTOR.value):
        raise ValueError(
            f"{reducer.name}: {encoder_option} is an encoder-site option, but this reducer acts at the connector; "
            f"add site=encoder to reduce inside the vision tower"
        )
