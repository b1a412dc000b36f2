"""Several reducers at one site (docs/ARCHITECTURE.md "Reducers").

Encoder: reducers acting at disjoint layers share the blocks, each reducing at its own layers:
``vtc.apply(vit, "evit:keep=0.7,layers=3;", "tome:r=0;0;0;0;8;8;8;8;8;8;8;8")``.

Connector: ``vtc.apply(llava, "pool:tokens=144", "random:tokens=64")`` pools each image to 144
tokens, then keeps 64 of them at random: the reducers act in the order given, each on what the one
before left. They must all act on the same side of the projector. Only the first may ask for
signals (the vision tower's CLS attention belongs to its tokens, not to the ones a reducer leaves)
or for the patch grid (after a reduction the tokens are no longer one per patch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from vtc.sites import ConnectorInfo, ConnectorReducer, EncoderInfo, EncoderReducer, Reducer, Signal, Signals
from vtc.state import TokenState


class _Owned(NamedTuple):
    """A chained encoder layer's budget: which reducer acts there, with its own budget."""

    owner: EncoderReducer
    budget: Any


class EncoderChain(EncoderReducer, register=False):
    """Encoder reducers at disjoint layers, each reducing at the layers its plan gives it.

    After a reducer whose counts follow the image (DyMU) only reducers that take a padded batch
    (``takes_padding``: ToMe, DyMU) may act, so a batch still equals single images. Every reducer
    plans (and checks its budget) against the encoder as applied alone; at run time
    each meets the tokens earlier layers left as it would its own: keep rates and thresholds follow
    the count, ToMe caps ``r`` at half the mergeable tokens (``strict`` refuses), EViT keeps at most
    what is there, and pooling refuses tokens no longer on the patch grid."""

    name = "encoder-chain"

    def __init__(self, reducers: tuple[EncoderReducer, ...]) -> None:
        if len(reducers) < 2:
            raise ValueError(f"a chain of encoder reducers needs at least two, got {len(reducers)}")
        self.reducers = reducers

    @property
    def dynamic(self) -> bool:  # type: ignore[override]
        return any(r.dynamic for r in self.reducers)

    def describe(self) -> str:
        return " + ".join(r.describe() for r in self.reducers)

    def companions(self) -> tuple[Reducer, ...]:
        return tuple(c for r in self.reducers for c in r.companions())

    def plan(self, info: EncoderInfo) -> list[Any]:
        plans = [r.plan(info) for r in self.reducers]
        plan: list[Any] = [None] * info.num_layers
        for reducer, own in zip(self.reducers, plans):
            for layer, budget in enumerate(own):
                if budget is None:
                    continue
                if plan[layer] is not None:
                    raise ValueError(
                        f"{plan[layer].owner.name} and {reducer.name} both reduce at layer {layer}; chained encoder "
                        f"reducers need disjoint layers (give each its layers, e.g. tome:r=0;0;8;8 or evit:layers=1;)"
                    )
                plan[layer] = _Owned(reducer, budget)
        dynamic = None  # the first reducer whose counts follow the image, once it has acted
        for layer, owned in enumerate(plan):
            if owned is None:
                continue
            if dynamic is not None and not owned.owner.takes_padding:
                raise ValueError(
                    f"{owned.owner.name} at layer {layer} would meet {dynamic.name}'s per-image token counts as one "
                    f"padded width, so a batch would differ from single images; give it layers before {dynamic.name}'s"
                )
            if owned.owner.dynamic and dynamic is None:
                dynamic = owned.owner
        return plan

    def needs_for(self, budget: _Owned) -> frozenset[Signal]:
        return budget.owner.needs_for(budget.budget)

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: _Owned) -> int:
        return budget.owner.tokens_after(num_tokens, n_prefix, budget.budget)

    def reduce(self, state: TokenState, signals: Signals, budget: _Owned, layer: int) -> TokenState:
        return budget.owner.reduce(state, signals, budget.budget, layer)


class ConnectorChain(ConnectorReducer, register=False):
    """Connector reducers applied one after the other; itself a connector reducer."""

    name = "chain"

    def __init__(self, reducers: tuple[ConnectorReducer, ...]) -> None:
        names = ", ".join(r.name for r in reducers)
        if len(reducers) < 2:
            raise ValueError(f"a chain of connector reducers needs at least two, got {names or 'none'}")
        if len({r.before_projector for r in reducers}) > 1:
            raise ValueError(f"connector reducers {names} act on different sides of the projector "
                             f"({', '.join(f'{r.name}: ' + ('before' if r.before_projector else 'after') for r in reducers)}); "
                             f"chain reducers of one side only")
        for reducer in reducers:
            if reducer.replaces_projector or reducer.pools_tiles or type(reducer).image_targets is not ConnectorReducer.image_targets:
                raise ValueError(f"{reducer.name} chooses per-image counts or replaces the projector, which a chain of "
                                 f"connector reducers ({names}) cannot follow; use it alone at the connector")
        for later in reducers[1:]:
            if later.connector_needs or later.needs_grid:
                raise ValueError(f"{later.name} needs the vision tower's {'signals' if later.connector_needs else 'patch grid'}, "
                                 f"which only the first connector reducer of a chain gets; put it first")
        self.reducers = reducers

    @property
    def before_projector(self) -> bool:  # type: ignore[override]
        return self.reducers[0].before_projector

    @property
    def connector_needs(self) -> frozenset[Signal]:  # type: ignore[override]
        return self.reducers[0].connector_needs

    @property
    def needs_grid(self) -> bool:  # type: ignore[override]
        return self.reducers[0].needs_grid

    @property
    def ordered(self) -> bool:
        return any(r.ordered for r in self.reducers)

    def describe(self) -> str:
        return " -> ".join(r.describe() for r in self.reducers)

    def check_connector(self, info: ConnectorInfo) -> None:
        for reducer in self.reducers:
            reducer.check_connector(info)
            count = None if info.num_tokens is None else reducer.target(info.num_tokens)
            info = dataclasses.replace(info, num_tokens=count, reordered=True)

    def target(self, num_tokens: int) -> int:
        for reducer in self.reducers:
            num_tokens = reducer.target(num_tokens)
        return num_tokens

    def runtime_target(self, num_tokens: int) -> int:
        for reducer in self.reducers:
            num_tokens = reducer.runtime_target(num_tokens)
        return num_tokens

    def reduce_visual(self, state: TokenState, signals: Signals, targets: torch.Tensor) -> TokenState:
        counts = [int(n) - state.n_prefix for n in state.real_counts().tolist()]
        for index, reducer in enumerate(self.reducers):
            last = index == len(self.reducers) - 1
            counts = [reducer.runtime_target(n) for n in counts]
            stage = targets if last else torch.tensor(counts, device=targets.device)
            state = reducer.reduce_visual(state, signals if index == 0 else Signals(), stage)
        return state
