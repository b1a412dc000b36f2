"""``vtc.apply``: attach reducers to one model instance, reversibly (docs/ARCHITECTURE.md
"Adapters and apply")."""

from __future__ import annotations

import torch
from torch import nn

from vtc.chain import ConnectorChain, EncoderChain
from vtc.models import find_adapter
from vtc.options import check_exclusive, given_options
from vtc.sites import Reducer, Site
from vtc.spec import parse_reducer
from vtc.state import TokenState

_HANDLE_ATTR = "_vtc_handle"


class Handle:
    """What :func:`apply` returns: inspect the last forward, or :meth:`remove` the reducers.

    Usable as a context manager: leaving the ``with`` block removes the reducers.
    """

    def __init__(self, model: nn.Module, adapter, reducers: list[Reducer]) -> None:
        self.model = model
        self.adapter = adapter
        self.reducers = reducers
        self.active = True

    @property
    def state(self) -> TokenState | None:
        """The :class:`TokenState` after the last block of the last forward (kept after :meth:`remove`)."""
        return self.adapter.state

    @property
    def token_counts(self) -> list[int]:
        """Tokens entering each vision block in the last forward, then the count leaving the last block."""
        return list(self.adapter.token_counts)

    def planned_token_counts(self) -> list[int]:
        """The same counts predicted from the plan at the model's default input size."""
        return self.adapter.planned_token_counts()

    @property
    def removed_per_layer(self) -> list[int]:
        """Tokens each vision block removed in the last forward (length L): for ToMe the ``r``
        each layer actually merged, after the per-layer cap of half its mergeable tokens. Under a
        dynamic reducer (DyMU) these are differences of the padded batch width; per-image counts
        are in ``image_token_counts``."""
        return _differences(self.token_counts)

    def planned_removed_per_layer(self) -> list[int]:
        """The same per-block removals predicted from the plan at the model's default input size."""
        return _differences(self.planned_token_counts())

    @property
    def image_token_counts(self) -> torch.Tensor | None:
        """(images, L + 1) real tokens of every image (LLaVA-NeXT: every tile) entering each vision
        block of the last forward, then leaving the last one: per-image counts under DyMU."""
        return self.adapter.image_token_counts

    @property
    def visual_tokens(self) -> list[int]:
        """Visual tokens each image of the last call brought into the LLM (vision-language models)."""
        return self._vlm_report("visual_tokens")

    @property
    def decoder_token_counts(self) -> list[int] | None:
        """Sequence length each LLM layer ran on in the last prefill, then the output (None without
        a decoder-site reducer; vision-language models)."""
        return self._vlm_report("decoder_token_counts")

    @property
    def exit_layers(self) -> list[int] | None:
        """Per prompt of the last prefill: the last LLM layer that saw its image tokens (a
        decoder-site exit such as ``exit`` or ``dyvte``; the LLM's last layer where none left;
        -1 for a prompt without an image). None without a decoder-site reducer."""
        return self._vlm_report("exit_layers")

    def _vlm_report(self, name: str):
        if not hasattr(type(self.adapter), name):
            raise AttributeError(f"{name} is a report of a vision-language model; this {self.adapter.family} model "
                                 f"has no LLM")
        return getattr(self.adapter, name)

    def remove(self) -> None:
        """Restore the model exactly as it was (idempotent)."""
        if self.active:
            self.adapter.remove()
            self.model.__dict__.pop(_HANDLE_ATTR, None)
            self.active = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(r.describe() for r in self.reducers) or "no reducer"
        return f"<vtc.Handle {self.adapter.family}: {names}{'' if self.active else ' (removed)'}>"


def _differences(counts: list[int]) -> list[int]:
    return [before - after for before, after in zip(counts, counts[1:])]


def apply(model: nn.Module, *reducers: Reducer | str, **options) -> Handle:
    """Patch ``model`` (this instance only) with ``reducers`` given as objects or spec strings.

    ``options`` go to the model's adapter: every adapter takes ``execution="auto"|"padded"|"split"|"nested"``
    (how a batch with per-image token counts runs, ``vtc.models.packing``: ``auto`` packs its real
    tokens), a LLaVA also ``positions="contiguous"|"original"``.

    Each reducer acts at the site it names (or its preferred site the model has). Several encoder
    reducers share the blocks at disjoint layers (:class:`vtc.chain.EncoderChain`); several
    connector reducers act one after the other in the order given
    (:class:`vtc.chain.ConnectorChain`); the decoder takes one. Raises TypeError for an
    unsupported model (naming the supported families) and ValueError for a reducer that cannot act
    on it (no such site, impossible budget, overlapping encoder layers, two decoder reducers).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vtc.apply needs a torch.nn.Module, got {type(model).__name__}")
    if active_handle(model) is not None:
        raise ValueError("this model already has vtc reducers applied; call handle.remove() first")
    parsed = [parse_reducer(r) for r in reducers]
    for reducer in parsed:
        check_exclusive(type(reducer), given_options(reducer))
    adapter_cls = find_adapter(model)
    allowed = adapter_cls.options
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        offered = ", ".join(f"{name}= ({values})" for name, values in allowed.items()) or "none"
        raise TypeError(f"vtc.apply: {', '.join(unknown)} {'is not an option' if len(unknown) == 1 else 'are not options'} "
                        f"of a {adapter_cls.family} model; its options: {offered}")
    by_site: dict[Site, Reducer] = {}
    chains: dict[Site, list] = {Site.ENCODER: [], Site.CONNECTOR: []}
    for reducer in parsed:
        site = reducer.resolve_site(adapter_cls.sites, adapter_cls.family)
        if site in chains:
            chains[site].append(reducer)  # several chain: disjoint encoder layers, connector in the order given
            continue
        if site in by_site:
            raise ValueError(
                f"one {site.value} reducer per model, got {by_site[site].name}, {reducer.name}; reducers compose "
                f"across sites; only encoder and connector reducers chain"
            )
        by_site[site] = reducer
    for site, chain in ((Site.ENCODER, EncoderChain), (Site.CONNECTOR, ConnectorChain)):
        if chains[site]:
            by_site[site] = chains[site][0] if len(chains[site]) == 1 else chain(tuple(chains[site]))
    for reducer in list(by_site.values()):
        for companion in reducer.companions():
            site = companion.sites[0]
            if site not in adapter_cls.sites:
                continue  # e.g. DyMU's virtual unmerging on a bare vision encoder
            if site in by_site and type(by_site[site]) is type(companion):
                continue  # the user's own, explicit choice wins
            if site in by_site:
                raise ValueError(
                    f"{reducer.name} adds {companion.describe()} at the {site.value} site, which "
                    f"{by_site[site].name} already takes; turn one off (for DyMU: vtu=off)"
                )
            by_site[site] = companion
            parsed.append(companion)
    adapter = adapter_cls.build(model, by_site, **options)
    adapter.install()
    handle = Handle(model, adapter, parsed)
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def active_handle(model: nn.Module) -> Handle | None:
    """The handle of the reducers applied to ``model`` now, or None."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    return handle if handle is not None and handle.active else None


def run_encoder(handle: Handle, pixels: torch.Tensor) -> TokenState:
    """Run the encoder of a model with vtc applied on ``pixels`` (a LLaVA: its tower up to the
    vision feature layer); the state after its last block."""
    parameter = next(handle.model.parameters())
    return handle.adapter.encode_pixels(pixels.to(parameter.device, parameter.dtype))
