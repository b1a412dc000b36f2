"""The decoder site: a :class:`~vtc.sites.DecoderReducer` inside an HF decoder-only LM.

After each layer the reducer names, ``select`` marks the tokens later layers keep. "drop" compacts
every row to its kept tokens (left-padded to the longest row with padding slots), so later layers
run on shorter hidden states and keep a shorter KV cache; "mask" keeps the length and hides the
unselected tokens from every other query. Later layers get gathered rotary embeddings, position ids
and a boolean mask gathered from the model's own causal/padding mask at each token's absolute
position, so text tokens see exactly the same keys in both modes. Per-layer column maps persist
across the forwards of one generation, keyed by the cache object.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vtc.models.patching import InstancePatcher
from vtc.models.zoo import CHECKPOINTS
from vtc.sites import DecoderInfo, DecoderReducer

_ATTENTION = ("sdpa", "eager")  # implementations that take a 4-D mask


def compact_index(keep: torch.Tensor) -> torch.Tensor:
    """(B, K) positions of each row's kept tokens in order, left-padded with -1 to the longest
    row (K >= 1), so the last slot of every row holds its last kept token."""
    batch, length = keep.shape
    counts = keep.sum(1, keepdim=True)
    width = max(int(counts.max()), 1)
    dest = torch.where(keep, width - counts + keep.cumsum(1) - 1, width)
    src = torch.arange(length, device=keep.device).expand(batch, length)
    out = torch.full((batch, width + 1), -1, dtype=torch.long, device=keep.device)
    return out.scatter_(1, dest, src)[:, :width]


def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B or 1, S, ...) gathered on dim 1 at ``index`` (B, K); -1 reads position 0."""
    x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.clamp(min=0).view(*index.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, idx.expand(*index.shape, *x.shape[2:]))


def layer_mask(
    full: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor, alive: torch.Tensor, past: int
) -> torch.Tensor:
    """(B, 1, q, S) mask for queries ``rows`` (index into this forward's queries, -1 = padding
    slot) over key columns ``cols`` (absolute positions, -1 = padding): ``full`` (the model's
    (B|1, 1, Q, past+Q) mask, None = causal) gathered there, columns not ``alive`` hidden, and
    every query seeing its own column (the last q columns are this forward's queries)."""
    q, length = rows.shape[1], cols.shape[1]
    r, c = rows.clamp(min=0), cols.clamp(min=0)
    if full is None:
        seen = c[:, None, :] <= (r + past)[:, :, None]
    else:
        allowed = (full if full.dtype == torch.bool else full == 0)[:, 0].expand(rows.shape[0], -1, -1)
        seen = allowed.gather(1, r[:, :, None].expand(-1, -1, allowed.shape[2]))
        seen = seen.gather(2, c[:, None, :].expand(-1, q, -1))
    seen = seen & (rows >= 0)[:, :, None] & ((cols >= 0) & alive)[:, None, :]
    own = torch.arange(length, device=cols.device) == torch.arange(length - q, length, device=cols.device)[:, None]
    seen = (seen | own)[:, None]
    if full is None or full.dtype == torch.bool:
        return seen
    return torch.zeros(seen.shape, dtype=full.dtype, device=full.device).masked_fill(~seen, torch.finfo(full.dtype).min)


@dataclass
class _Pass:
    """State of one LM forward: the current query rows and what the layers recorded."""

    past: int  # absolute position of this forward's first query (layer-0 cache length)
    visual: torch.Tensor | None  # (B, q) image tokens of this forward; None when there are none
    valid: torch.Tensor  # (B, q) real tokens (2-D attention mask)
    rows: torch.Tensor  # (B, q_cur) index into this forward's queries, -1 = padding slot
    alive: torch.Tensor  # (B, q_cur) False: hidden from other queries
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (cols, alive) of its KV columns
    reduced: bool = False  # a selection ran in this forward
    counts: list[int] = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)
    kept_visual: list[torch.Tensor] = field(default_factory=list)


class DecoderSite:
    """Runs a DecoderReducer inside an HF decoder-only LM (docs/ARCHITECTURE.md
    "LLaVA and LLaVA-NeXT", Decoder site: inside LLM decoder layers).

    ``token_counts``: sequence length entering each layer in the last forward with image tokens,
    then leaving the last one; ``kept_per_row`` (B, L + 1): real tokens not hidden, per row, and
    ``visual_per_row`` the image tokens among them (:attr:`exit_layers` derives from it). A
    selection that removes nothing leaves the layers running exactly as unpatched. In
    "drop" mode the LM's output has the compacted length (left-padded; the last position is each
    row's last token, kept as a query even when unselected but then hidden from other tokens).
    """

    def __init__(self, language_model: nn.Module, reducer: DecoderReducer, patcher: InstancePatcher,
                 source: str | None = None) -> None:
        layers = getattr(language_model, "layers", None)
        config = getattr(language_model, "config", None)
        if not isinstance(layers, nn.ModuleList) or config is None:
            raise TypeError(f"vtc: {type(language_model).__name__} is not an HF decoder-only model with .layers")
        implementation = getattr(config, "_attn_implementation", None)
        if implementation not in _ATTENTION:
            wanted = ", ".join(_ATTENTION)
            raise TypeError(f"vtc: the decoder site needs attention with a 4-D mask ({wanted}), got {implementation!r}")
        self.model = language_model
        self.reducer = reducer
        self.patcher = patcher
        self.info = DecoderInfo(type(language_model).__name__, len(layers), int(config.hidden_size), source, CHECKPOINTS)
        self.select_layers = frozenset(reducer.layers(self.info))
        self.mode = reducer.removal()
        self.token_counts: list[int] = []
        self.kept_per_row: torch.Tensor | None = None
        self.visual_per_row: torch.Tensor | None = None
        self._visual: torch.Tensor | None = None
        self._mask2d: Any = None
        self._pass: _Pass | None = None
        self._maps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> per-layer maps

    def install(self) -> None:
        """Patch the LM's and each layer's ``forward`` on the instances; nothing stays on failure."""
        try:
            self.patcher.set(self.model, "forward", functools.partial(self._lm_forward, self.model.forward))
            for j, layer in enumerate(self.model.layers):
                self.patcher.set(layer, "forward", functools.partial(self._layer_forward, j, layer.forward))
        except BaseException:
            self.patcher.restore()
            raise

    def set_visual(self, visual: torch.Tensor | None) -> None:
        """(B, S) bool marking the image tokens of the next prefill's inputs (None: no image)."""
        if visual is not None and visual.dim() != 2:
            raise ValueError(f"vtc: the visual mask must be (B, S), got shape {tuple(visual.shape)}")
        self._visual = None if visual is None else visual.bool()

    def _lm_forward(self, original: Callable, *args: Any, **kwargs: Any) -> Any:
        self._mask2d = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        try:
            out = original(*args, **kwargs)
            p = self._pass
            if p is not None and p.visual is not None:
                self.token_counts, self.kept_per_row = p.counts, torch.stack(p.kept, 1)
                self.visual_per_row = torch.stack(p.kept_visual, 1)
            return out
        finally:
            self._pass, self._mask2d = None, None

    def _begin(self, hidden: torch.Tensor, cache: Any) -> _Pass:
        """The state of a forward, set up at layer 0 (before it writes the cache)."""
        batch, q = hidden.shape[:2]
        device = hidden.device
        past = cache.get_seq_length() if cache is not None else 0
        visual = self._visual_for(batch, q, past, device)
        m = self._mask2d
        valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        if isinstance(m, torch.Tensor) and m.dim() == 2 and m.shape[0] == batch and m.shape[1] >= q:
            valid = m[:, -q:].to(device).bool()
        if cache is None:
            maps: dict = {}
        elif past == 0 or cache not in self._maps:
            maps = self._maps[cache] = {}
        else:
            maps = self._maps[cache]
        if cache is not None and getattr(cache, "is_compileable", False) and (visual is not None or maps):
            raise TypeError("vtc: the decoder site needs a DynamicCache (per-layer lengths), not a static cache")
        rows = torch.arange(q, device=device).expand(batch, q)
        return _Pass(past, visual, valid, rows, torch.ones_like(valid), maps)

    def _visual_for(self, batch: int, q: int, past: int, device: torch.device) -> torch.Tensor | None:
        v = self._visual
        if v is None or past > 0:  # tokens after a cached past are text
            return None
        if v.shape[0] != batch and batch % v.shape[0] == 0:  # generate expanded the batch (num_return_sequences)
            v = v.repeat_interleave(batch // v.shape[0], dim=0)
        if v.shape[0] != batch or v.shape[1] > q:
            raise ValueError(f"vtc: the visual mask has shape {tuple(v.shape)} but the prefill input is {(batch, q)}")
        v = v.to(device)
        if v.shape[1] < q:  # a recomputed longer sequence (no cache): the new tokens are text
            v = torch.cat([v, v.new_zeros(batch, q - v.shape[1])], 1)
        return v if bool(v.any()) else None

    def _layer_forward(
        self, j: int, original: Callable, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        if j == 0:
            self._pass = self._begin(hidden_states, kwargs.get("cache"))
        p = self._pass
        if p is None or not (p.reduced or j in p.maps):
            out = original(hidden_states, *args, **kwargs)
        else:
            if args:
                raise TypeError("vtc: decoder layers must get their arguments (mask, positions, cache) by keyword")
            out = original(hidden_states, **self._reduced_kwargs(j, p, kwargs))
        if p is None or p.visual is None:
            return out
        h = out[0] if isinstance(out, tuple) else out
        self._count(p, hidden_states.shape[1])
        if j in self.select_layers:
            h = self._select(j, p, h)
        if j == self.info.num_layers - 1:
            self._count(p, h.shape[1])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    @property
    def exit_layers(self) -> torch.Tensor | None:
        """(B,) per row of the last prefill with image tokens: the last layer that saw any of
        them (``num_layers - 1`` when none left; -1 for a row without an image)."""
        if self.visual_per_row is None:
            return None
        return (self.visual_per_row[:, :-1] > 0).sum(1) - 1

    def _count(self, p: _Pass, length: int) -> None:
        """Record the tokens entering a layer (or leaving the last): length, real and image ones."""
        real = self._real(p)
        p.counts.append(length)
        p.kept.append(real.sum(1))
        p.kept_visual.append((p.visual.gather(1, p.rows.clamp(min=0)) & real).sum(1))

    @staticmethod
    def _real(p: _Pass) -> torch.Tensor:
        """(B, q_cur) real, not hidden tokens among the current rows."""
        return (p.rows >= 0) & p.valid.gather(1, p.rows.clamp(min=0)) & p.alive

    def _reduced_kwargs(self, j: int, p: _Pass, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Layer ``j``'s keyword arguments for the current rows; records its KV column map."""
        cache = kwargs.get("cache")
        rows, batch = p.rows, p.rows.shape[0]
        device = rows.device
        if j in p.maps:
            cols, alive = p.maps[j]
            if cache is not None and cols.shape[1] != cache.get_seq_length(j):
                raise RuntimeError(
                    f"vtc: layer {j}'s cache holds {cache.get_seq_length(j)} tokens but vtc tracked {cols.shape[1]}; "
                    "the cache was cropped or reordered (sliding windows, beam search, assisted decoding: unsupported)"
                )
        else:
            cols = torch.arange(p.past, device=device).expand(batch, p.past)
            alive = torch.ones(batch, p.past, dtype=torch.bool, device=device)
        cols = torch.cat([cols, torch.where(rows >= 0, rows + p.past, -1)], 1)
        alive = torch.cat([alive, p.alive & (rows >= 0)], 1)
        if cache is not None:
            p.maps[j] = (cols, alive)
        kwargs = dict(kwargs, attention_mask=layer_mask(kwargs.get("attention_mask"), rows, cols, alive, p.past))
        if p.reduced and self.mode == "drop":
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (gather_seq(cos, rows), gather_seq(sin, rows))
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = gather_seq(kwargs["position_ids"], rows)
        return kwargs

    def _select(self, j: int, p: _Pass, h: torch.Tensor) -> torch.Tensor:
        """Run the reducer after layer ``j``: compact (drop) or hide (mask) the unselected rows."""
        real = self._real(p)
        visual = p.visual.gather(1, p.rows.clamp(min=0)) & real
        keep = self.reducer.select(j, h, visual, real)
        if keep.shape != real.shape:
            got, wanted = tuple(keep.shape), tuple(real.shape)
            raise ValueError(f"vtc: {self.reducer.name}.select returned shape {got}, expected {wanted}")
        keep = keep.bool() & real
        if torch.equal(keep, real):  # nothing leaves: the layers run on as unpatched
            return h
        p.reduced = True
        if self.mode == "mask":
            p.alive = p.alive & keep
            return h
        # the last query always stays (its logits are read), hidden from others when unselected
        last = torch.zeros_like(keep)
        last[:, -1] = True
        idx = compact_index(keep | last)
        p.alive = keep.gather(1, idx.clamp(min=0)) & (idx >= 0)
        p.rows = torch.where(idx >= 0, p.rows.gather(1, idx.clamp(min=0)), -1)
        return gather_seq(h, idx)
