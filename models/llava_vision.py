"""The visual half of a LLaVA under vtc: tower (encoder site) -> per-image sequence (connector site).

Returns, per image, the features that enter the LLM and, for each, its *anchor*: the index among
that image's placeholders of the first patch it stands for. Kept tokens enter the LLM in anchor
order (raster order of their first patch), whatever order a reducer left them in.

LLaVA-1.5: every image is one view, its patch grid (plus the CLS token under the "full" strategy).

LLaVA-NeXT AnyRes (HF's tile packing): the tower reduces every tile on its own
(encoder site); the reduced tokens are then laid out on each tile's patch grid and packed with
HF's layout (base view, then the unpadded high-resolution map). A token covering several
positions appears once, at its first position; a map row left with no token loses its newline.
Connector reducers act per image *after* packing, on its two views: the base view and the
unpadded high-resolution map, each on its own grid. An image's budget (the reducer's ``target``
of all its visual tokens, newlines excluded) is split between the two views in proportion to
their token counts; ``image_newline`` then follows every remaining row of the map. Without
reducers the result equals HF's ``get_image_features`` exactly.

A connector that ``needs_grid`` (pooling) after an encoder reducer gets each image's (or view's)
tokens laid back on its patch grid through ``origin`` (``vtc.grid.lay_on_grid``): every position
holds the token carrying it, dropped positions are padding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from vtc.budget import split_total
from vtc.grid import lay_on_grid, lay_scores
from vtc.models.anyres import AnyResLayout, anyres_layout
from vtc.models.hf_vision import HFVisionAdapter
from vtc.sites import ConnectorReducer, EncoderReducer, Signals
from vtc.state import TokenState


class LlavaTowerAdapter(HFVisionAdapter):
    """A LLaVA's CLIP/SigLIP tower, run only up to its deepest vision feature layer."""

    family = "llava tower"

    def __init__(self, tower: nn.Module, reducer: EncoderReducer | None, num_run: int, model_id: str | None = None,
                 execution: str = "auto") -> None:
        self.num_run = num_run
        self.vlm_id = model_id
        super().__init__(tower, reducer, execution)

    def model_id(self) -> str | None:
        return self.vlm_id

    def find_blocks(self):
        return list(self.vision.encoder.layers)[: self.num_run]

    def patch_pooling(self) -> None:
        """LLaVA reads hidden states, never the tower's pooling head."""

    def head_flops(self, num_tokens: int) -> int:
        return 0

    def encode(self, pixel_values: torch.Tensor, layers: list[int]) -> tuple[TokenState, list[torch.Tensor]]:
        """Run the tower; the state after the last run block and the hidden states ``layers``
        (HF ``hidden_states`` indices, non-negative) in the given order."""
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        h = self.vision.embeddings(pixel_values.to(dtype))
        pre_norm = getattr(self.vision, "pre_layrnorm", None)
        if pre_norm is not None:
            h = pre_norm(h)
        hidden = {0: h}
        self.state, self.signals = None, {}
        for index, block in enumerate(self.blocks):
            h = block(h, None)
            hidden[index + 1] = h
        state = self.state if self.state is not None else TokenState.start(h, self.info.n_prefix, self.info.grid)
        return state.replace(x=h), [hidden[layer] for layer in layers]


@dataclass(frozen=True)
class VisualTokens:
    """What the LLM receives for a batch of images."""

    features: list[torch.Tensor]  # (K_i, D) per image, LLM width
    anchors: list[torch.Tensor]  # (K_i,) index of each token's first placeholder
    placeholders: list[int]  # placeholders the processor wrote per image (the unreduced count)
    covers: list[torch.Tensor]  # (placeholders_i,) index into features[i] of the token at each placeholder, -1: none


def anchors_of(origin: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N) for every token the first slot (column of ``origin`` (B, S)) it covers; S if none."""
    batch, slots = origin.shape
    position = torch.arange(slots, device=origin.device).expand(batch, slots)
    position = torch.where(origin >= 0, position, slots)
    first = torch.full((batch, num_tokens), slots, dtype=torch.long, device=origin.device)
    return first.scatter_reduce(1, origin.clamp_min(0), position, "amin")


def anchor_order(state: TokenState, x: torch.Tensor,
                 keep_order: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per row, the real tokens of ``x`` (the state's tokens, possibly projected) sorted by their
    anchor (first slot they cover) or, with ``keep_order``, in the state's order; those anchors,
    and for every slot the index of the ordered token covering it (-1: dropped)."""
    slots = state.origin.shape[1]
    anchors = anchors_of(state.origin, x.shape[1])
    real = anchors < slots
    if state.valid is not None:
        real &= state.valid
    order = (~real).long() if keep_order else anchors.masked_fill(~real, slots)
    order = order.argsort(dim=1, stable=True)
    x = x.gather(1, order[..., None].expand_as(x))
    anchors = anchors.gather(1, order)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    token = state.origin.clamp_min(0)
    covers = torch.where((state.origin >= 0) & real.gather(1, token), rank.gather(1, token), -1)
    counts = real.sum(dim=1).tolist()
    return ([x[row, :count] for row, count in enumerate(counts)], [anchors[row, :count] for row, count in enumerate(counts)],
            list(covers))


def drop_leading(state: TokenState, count: int, n_prefix: int) -> TokenState:
    """The state without its first ``count`` tokens and slots (the CLS token under "default")."""
    if count == 0:
        return state.replace(n_prefix=n_prefix)
    origin = state.origin[:, count:]
    origin = torch.where(origin >= count, origin - count, torch.full_like(origin, -1))
    return state.replace(
        x=state.x[:, count:],
        size=None if state.size is None else state.size[:, count:],
        valid=None if state.valid is None else state.valid[:, count:],
        origin=origin,
        n_prefix=n_prefix,
    )


def view_from_tiles(tiles: TokenState, slots: torch.Tensor, grid: tuple[int, int]) -> tuple[TokenState, torch.Tensor]:
    """One image view gathered from reduced tiles: ``slots`` (S,) are flat ``tile * P + patch``
    positions (P patches per tile); each token covering any of them appears once, tokens ordered
    by their first slot. The view keeps ``grid`` only while every slot has its own token.
    Also returns each view token's flat ``tile * N + token`` index into the tiles."""
    n_tiles, per_tile = tiles.origin.shape
    token = tiles.origin.reshape(-1)[slots]
    tile = slots // per_tile
    width = tiles.x.shape[1]
    key = torch.where(token >= 0, tile * width + token, torch.full_like(token, -1))
    present = key >= 0
    unique, inverse = torch.unique(key[present], return_inverse=True)
    first = anchors_of(torch.full_like(key, -1).masked_scatter(present, inverse)[None], unique.numel())[0]
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    origin = torch.full_like(key, -1)
    origin[present] = rank[inverse]
    chosen = unique[order]
    x = tiles.x.reshape(n_tiles * width, -1)[chosen][None]
    size = None if tiles.size is None else tiles.size.reshape(-1)[chosen][None]
    full = chosen.numel() == slots.numel()
    view = TokenState(x=x, size=size, origin=origin[None], valid=None, n_prefix=0, grid=grid if full else None)
    return view, chosen


class VisualPipeline:
    """Tower, feature selection, connector reducer and projector of one LLaVA model."""

    def __init__(self, inner: nn.Module, config, tower: LlavaTowerAdapter, feature_layers: list[int],
                 connector: ConnectorReducer | None, is_next: bool) -> None:
        self.inner, self.config, self.tower = inner, config, tower
        self.feature_layers, self.connector, self.is_next = feature_layers, connector, is_next
        has_cls = tower.info.has_cls
        self.drop = 1 if config.vision_feature_select_strategy == "default" else 0  # HF drops index 0, CLS or not
        self.n_prefix = 1 if has_cls and not self.drop else 0
        self.last_connector_state: TokenState | None = None
        self.projected_tokens = 0  # tokens through the projector in the last encode (for FLOP accounting)
        self.connector_flops = 0  # FLOPs of the connector reducer's own layers in the last encode

    @property
    def signal_layer(self) -> int:
        return self.tower.num_run - 1

    def _select(self, pixel_values: torch.Tensor) -> tuple[TokenState, Signals]:
        state, hidden = self.tower.encode(pixel_values, self.feature_layers)
        x = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
        if len(hidden) > 1:
            state = TokenState.start(x, state.n_prefix, state.grid)
        state = drop_leading(state.replace(x=x), self.drop, self.n_prefix)
        signals = self.tower.signals.get(self.signal_layer, Signals())
        if signals.cls_attn is not None:
            signals = Signals(cls_attn=signals.cls_attn[:, self.drop:])
        return state, signals

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        self.projected_tokens += x.shape[:-1].numel()
        return self.inner.multi_modal_projector(x)

    def _reduce(self, state: TokenState, signals: Signals, targets: list[int], grid: tuple[int, int]) -> TokenState:
        """The connector on ``state`` (whose positions are ``n_prefix`` + the patch ``grid``); a
        connector that ``needs_grid`` gets an encoder reducer's tokens laid back on the grid."""
        if self.connector.needs_grid and state.grid is None:
            if signals.cls_attn is not None:
                signals = Signals(cls_attn=lay_scores(signals.cls_attn, state.origin))
            state = lay_on_grid(state, grid)
        reduced = self.connector.reduce_visual(state, signals, torch.tensor(targets, device=state.x.device))
        self.last_connector_state = reduced
        return reduced

    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisualTokens:
        self.projected_tokens = self.connector_flops = 0
        if self.is_next:
            return self._encode_next(pixel_values, image_sizes)
        if pixel_values.dim() != 4:
            raise ValueError(f"LLaVA pixel_values must be (images, channels, height, width), got {tuple(pixel_values.shape)}")
        state, signals = self._select(pixel_values)
        if self.connector is not None:
            if not self.connector.before_projector:
                state = state.replace(x=self._project(state.x))
            counts = state.valid.sum(dim=1).tolist() if state.valid is not None else [state.x.shape[1]] * state.x.shape[0]
            targets = self.connector.image_targets(state, [n - state.n_prefix for n in counts])
            self.connector_flops = self.connector.flops(state.x.shape[0], state.x.shape[1] - state.n_prefix)
            state = self._reduce(state, signals, targets, self.tower.info.grid)
        projector_runs = self.connector is None or (self.connector.before_projector and not self.connector.replaces_projector)
        x = self._project(state.x) if projector_runs else state.x
        ordered = self.connector is not None and self.connector.ordered
        features, kept_anchors, covers = anchor_order(state, x, keep_order=ordered)
        return VisualTokens(features, kept_anchors, [state.origin.shape[1]] * x.shape[0], covers)

    # ----- LLaVA-NeXT ----------------------------------------------------------------------------
    def _encode_next(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> VisualTokens:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs the image_sizes the processor returns beside pixel_values")
        pinpoints, tile = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        sizes = [tuple(int(v) for v in size) for size in image_sizes]
        num_tiles = [image_size_to_num_patches(list(size), pinpoints, tile) for size in sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, num_tiles)], dim=0)
        state, signals = self._select(pixel_values)
        if self.connector is not None and self.connector.pools_tiles:
            return self._encode_next_pooled_tiles(state, sizes, num_tiles)
        project_first = self.connector is None or not self.connector.before_projector
        if project_first:
            state = state.replace(x=self._project(state.x))
        side = self.tower.info.grid[0]
        newline = self.inner.image_newline
        features, anchors, placeholders, covers, start = [], [], [], [], 0
        for size, n in zip(sizes, num_tiles):
            tiles = _take_tiles(state, start, n)
            layout = anyres_layout(size, pinpoints, tile, side, n)
            views = self._next_views(tiles, layout, signals, start)
            if not project_first:
                views = [view.replace(x=self._project(view.x)) for view in views]
            feats, anchor, cover = self._pack_next(views, layout, newline)
            features.append(feats)
            anchors.append(anchor)
            covers.append(cover)
            placeholders.append(layout.num_placeholders)
            start += n
        return VisualTokens(features, anchors, placeholders, covers)

    def _encode_next_pooled_tiles(self, state: TokenState, sizes: list[tuple[int, int]],
                                  num_tiles: list[int]) -> VisualTokens:
        """A connector that ``pools_tiles`` (M3): every tile of an image is reduced on its own patch
        grid to the image's target, then HF's packing runs on the reduced tiles as if their grid
        were the tower's (unpadding the map of pooled tiles, a newline per row). Anchors and
        covers index that packed layout; the prompt keeps the processor's placeholder count."""
        pinpoints, tile = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        if self.connector.before_projector:
            raise ValueError(f"{self.connector.name}: reducing tiles before the projector is not supported")
        state = state.replace(x=self._project(state.x))
        grid = self.tower.info.grid
        features, anchors, placeholders, covers = [], [], [], []
        per_image = [_take_tiles(state, start, n) for start, n in zip(itertools.accumulate([0, *num_tiles[:-1]]), num_tiles)]
        targets = self.connector.image_targets(
            _first_tiles(per_image), [grid[0] * grid[1]] * len(per_image))
        for size, n, tiles, target in zip(sizes, num_tiles, per_image, targets):
            if self.connector.needs_grid and tiles.grid is None:
                tiles = lay_on_grid(tiles, grid)
            reduced = self.connector.reduce_visual(tiles, Signals(), torch.full((n,), target, device=tiles.x.device))
            if reduced.grid is None or reduced.valid is not None:
                raise ValueError(f"{self.connector.name}: packing tiles needs every tile reduced to the same square grid")
            side = reduced.grid[0]
            pooled = TokenState.start(reduced.x, 0, reduced.grid)
            layout = anyres_layout(size, pinpoints, tile, side, n)
            views = [view_from_tiles(pooled, torch.arange(side * side, device=pooled.x.device), (side, side))[0]]
            if layout.hires is not None:
                hires = layout.hires.to(pooled.x.device)
                views.append(view_from_tiles(pooled, hires.reshape(-1), tuple(hires.shape))[0])
            feats, anchor, cover = self._pack_next(views, layout, self.inner.image_newline)
            features.append(feats)
            anchors.append(anchor)
            covers.append(cover)
            placeholders.append(anyres_layout(size, pinpoints, tile, grid[0], n).num_placeholders)
        self.last_connector_state = None
        return VisualTokens(features, anchors, placeholders, covers)

    def _next_views(self, tiles: TokenState, layout: AnyResLayout, signals: Signals, start: int) -> list[TokenState]:
        side = layout.side
        grids = [(side, side)]
        views = [view_from_tiles(tiles, torch.arange(side * side, device=tiles.x.device), grids[0])]
        if layout.hires is not None:
            hires = layout.hires.to(tiles.x.device)
            grids.append(tuple(hires.shape))
            views.append(view_from_tiles(tiles, hires.reshape(-1), grids[1]))
        if self.connector is None:
            return [view for view, _ in views]
        counts = [view.x.shape[1] for view, _ in views]
        total = self.connector.target(sum(counts))
        reduced = []
        for (view, chosen), grid, share in zip(views, grids, split_total(total, counts)):
            view_signals = Signals()
            if signals.cls_attn is not None:  # each tile's CLS attention, on the view's tokens
                view_signals = Signals(cls_attn=signals.cls_attn[start : start + layout.num_tiles].reshape(-1)[chosen][None])
            reduced.append(self._reduce(view, view_signals, [share], grid) if share < view.x.shape[1] else view)
        return reduced

    @staticmethod
    def _pack_next(views: list[TokenState], layout: AnyResLayout,
                   newline: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base-view tokens, then the map's tokens with ``newline`` after each row that keeps one;
        with the placeholder index (anchor) of every output token and, for every placeholder, the
        output token covering it (-1: none)."""
        (base,), (base_anchor,), (base_cover,) = anchor_order(views[0], views[0].x)
        newline = newline.to(base.dtype)
        n_base = base.shape[0]
        if layout.hires is None:
            end = torch.tensor([layout.base_tokens], device=base.device)
            cover = torch.cat([base_cover, torch.tensor([n_base], device=base.device)])
            return torch.cat([base, newline[None]]), torch.cat([base_anchor, end]), cover
        (x,), (slot,), (hires_cover,) = anchor_order(views[1], views[1].x)
        cols = layout.hires.shape[1]
        row = slot // cols
        row_end = torch.ones_like(row, dtype=torch.bool)
        row_end[:-1] = row[1:] != row[:-1]
        token_at = torch.arange(x.shape[0], device=x.device) + row_end.cumsum(0) - row_end.long()  # after earlier newlines
        newline_at = token_at[row_end] + 1
        packed = x.new_empty(x.shape[0] + newline_at.numel(), x.shape[1])
        packed[token_at], packed[newline_at] = x, newline
        anchor = slot.new_empty(packed.shape[0])
        anchor[token_at] = layout.hires_placeholder(slot)
        anchor[newline_at] = layout.base_tokens + row[row_end] * (cols + 1) + cols
        cover = torch.full((layout.num_placeholders,), -1, dtype=torch.long, device=x.device)
        cover[: layout.base_tokens] = base_cover
        every = torch.arange(hires_cover.numel(), device=x.device)
        cover[layout.hires_placeholder(every)] = torch.where(hires_cover >= 0, n_base + token_at[hires_cover.clamp_min(0)], -1)
        cover[anchor[newline_at]] = n_base + newline_at
        return torch.cat([base, packed]), torch.cat([base_anchor, anchor]), cover


def _first_tiles(images: list[TokenState]) -> TokenState:
    """The base tile (tile 0) of every image, as one batch."""
    return TokenState(x=torch.cat([t.x[:1] for t in images]), size=None, origin=torch.cat([t.origin[:1] for t in images]),
                      valid=None if images[0].valid is None else torch.cat([t.valid[:1] for t in images]),
                      n_prefix=images[0].n_prefix, grid=images[0].grid)


def _take_tiles(state: TokenState, start: int, count: int) -> TokenState:
    rows = slice(start, start + count)
    return state.replace(
        x=state.x[rows], origin=state.origin[rows],
        size=None if state.size is None else state.size[rows],
        valid=None if state.valid is None else state.valid[rows],
    )

