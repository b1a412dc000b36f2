"""MQT, the Matryoshka Query Transformer (Hu et al., 2024, arXiv 2405.19315, NeurIPS 2024): M learned
queries cross-attend once to the vision features and replace the LLaVA projector; any prefix of
m <= M queries is a usable visual representation of m tokens.

The query transformer as released (the official ``Resampler``): M queries ``Q`` carrying fixed 2-D
sin-cos positions ``P`` of a ``sqrt(M) x sqrt(M)`` grid (MAE's construction), one multi-head
cross-attention with LayerNorms on its three inputs, and an output projection to the LLM width:

    q = LN_q(Q[:m] + P[:m]);  k = LN_k(P_k);  v = LN_v(X);  Y = MHA(q, k, v) W_proj

``P_k`` is ``P`` resized (bicubic) to the tower's patch grid. In the released code the keys are
the positions only (``keys="positions"``, the default, needed to load its weights): the attention
maps then do not depend on the image, a learned spatial weighting of the normalised features.
``keys="features"`` uses ``LN_k(X) + P_k`` as keys instead (the Qwen-VL resampler MQT adapts,
content-dependent attention as the paper's text describes cross-attention). Queries never
attend to each other, so the output for m is exactly the first m rows of the output for M.

Training draws m per step (:mod:`vtc.train.mqt`; the official rule: uniform over the even numbers
2..M). ``tokens`` is always explicit: the official model silently samples a random m when it is
not given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vtc.budget import per_image_counts
from vtc.options import expects
from vtc.saved_module import SavedModule
from vtc.sites import ConnectorInfo, ConnectorReducer, Signals, Site
from vtc.state import TokenState

CONFIG_FILE = "mqt.json"
WEIGHTS_FILE = "query-transformer.safetensors"
SHIPPED_FOLDER = "mqt"  # a checkpoint trained for MQT keeps its query transformer here


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """(side * side, width) fixed 2-D sin-cos positions of a ``side x side`` grid in raster order,
    as MAE builds them: the first half of the channels encodes a position's column, the second
    half its row, each as ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 1 / 10000^(i / (width / 4))``."""
    if width % 4:
        raise ValueError(f"mqt: 2-D sin-cos positions need a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(side, dtype=torch.float64)
    columns, rows = torch.meshgrid(coords, coords, indexing="xy")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(columns), encode(rows)], dim=1).float()


@dataclass(frozen=True)
class QueryTransformerConfig:
    """The shape of a query transformer (saved as ``mqt.json`` beside its weights)."""

    feature_width: int  # width of the vision features (keys, values and queries)
    llm_width: int  # width of the LLM tokens it produces
    queries: int = 256  # M, a square number (queries sit on a sqrt(M) x sqrt(M) grid)
    heads: int = 16
    keys: Literal["positions", "features"] = "positions"

    def __post_init__(self) -> None:
        side = math.isqrt(self.queries)
        if self.queries < 1 or side * side != self.queries:
            raise ValueError(f"mqt: queries must be a square number (they sit on a square grid), got {self.queries}")
        if self.feature_width % self.heads:
            raise ValueError(f"mqt: feature width {self.feature_width} is not divisible by {self.heads} heads")
        if self.keys not in ("positions", "features"):
            raise ValueError(f"mqt: keys must be positions or features, got {self.keys!r}")


class QueryTransformer(SavedModule):
    """The MQT compressor (module docstring): vision features (B, N, C) on a patch grid -> (B, m, D)."""

    config_file, weights_file, config_class, method = CONFIG_FILE, WEIGHTS_FILE, QueryTransformerConfig, "mqt"
    pos_embed: torch.Tensor

    def __init__(self, config: QueryTransformerConfig) -> None:
        super().__init__()
        self.config = config
        width, side = config.feature_width, math.isqrt(config.queries)
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(config.queries, width), std=0.02))
        self.register_buffer("pos_embed", sincos_2d(side, width), persistent=False)
        self.attn = nn.MultiheadAttention(width, config.heads, batch_first=True)
        self.ln_q = nn.LayerNorm(width, eps=1e-6)
        self.ln_k = nn.LayerNorm(width, eps=1e-6)
        self.ln_v = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(width, config.llm_width) * width ** -0.5)

    def key_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """``P`` resized to the patch ``grid`` (bicubic, align_corners False, in float32), (N, C)."""
        side = math.isqrt(self.config.queries)
        if tuple(grid) == (side, side):
            return self.pos_embed
        pos = self.pos_embed.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=tuple(grid), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(self.pos_embed.dtype)

    def forward(self, features: torch.Tensor, grid: tuple[int, int], tokens: int,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """The first ``tokens`` outputs (B, tokens, D) for ``features`` (B, rows * cols, C) in raster
        order of ``grid``; ``valid`` (B, N) hides padding / dropped patches from the attention."""
        if not 1 <= tokens <= self.config.queries:
            raise ValueError(f"mqt: tokens={tokens} outside 1..{self.config.queries} (the queries of this transformer)")
        if features.shape[-1] != self.config.feature_width:
            raise ValueError(f"mqt: features of width {features.shape[-1]}, but this transformer reads "
                             f"{self.config.feature_width}")
        batch = features.shape[0]
        dtype = self.query.dtype
        values = self.ln_v(features.to(dtype))
        positions = self.key_positions(grid).to(dtype)
        if self.config.keys == "features":
            keys = self.ln_k(features.to(dtype)) + positions
        else:
            keys = self.ln_k(positions).expand(batch, -1, -1)
        # every query runs and the prefix is sliced off, so the outputs for m are bit for bit the
        # first m rows of those for M (products of another row count may round differently)
        queries = self.ln_q(self.query + self.pos_embed.to(dtype)).expand(batch, -1, -1)
        mask = None if valid is None else ~valid[:, None, :].expand(-1, self.config.queries, -1).repeat_interleave(self.config.heads, 0)
        out, _ = self.attn(queries, keys, values, attn_mask=mask, need_weights=False)
        return (out @ self.proj)[:, :tokens]


OFFICIAL_PREFIXES = ("model.query_abstractor.", "query_abstractor.")


def from_official(state_dict: dict[str, torch.Tensor], heads: int = 16) -> QueryTransformer:
    """A :class:`QueryTransformer` from the official MQT-LLaVA ``query_abstractor`` weights
    (``query``, ``pos_embed``, ``attn.in_proj_*``, ``attn.out_proj.*``, ``ln_q/ln_k/ln_v.*``,
    ``proj``; with or without the ``model.query_abstractor.`` prefix; other keys ignored). The shape
    comes from the tensors; ``pos_embed`` must be the fixed sin-cos grid (it is not learned)."""
    stripped = {}
    for key, value in state_dict.items():
        for prefix in OFFICIAL_PREFIXES:
            if key.startswith(prefix):
                stripped[key[len(prefix):]] = value
                break
    missing = [k for k in ("query", "proj", "attn.in_proj_weight", "ln_v.weight") if k not in stripped]
    if missing:
        raise ValueError(f"mqt: not an MQT-LLaVA query_abstractor state dict (missing {', '.join(missing)})")
    queries, width = stripped["query"].shape
    config = QueryTransformerConfig(width, stripped["proj"].shape[1], queries, heads)
    module = QueryTransformer(config)
    pos = stripped.pop("pos_embed", None)
    if pos is not None:
        if tuple(pos.shape) != tuple(module.pos_embed.shape):
            raise ValueError(f"mqt: pos_embed of shape {tuple(pos.shape)}, expected {tuple(module.pos_embed.shape)}")
        scale = torch.finfo(pos.dtype).eps * 4  # stored in half precision: compare at its rounding
        if not torch.allclose(pos.float(), module.pos_embed, atol=scale, rtol=scale):
            raise ValueError("mqt: the checkpoint's pos_embed is not the fixed 2-D sin-cos grid this module uses")
    module.load_state_dict({k: v.float() for k, v in stripped.items()})
    return module


def load_transformer(weights: str | Path) -> QueryTransformer:
    """A query transformer from a folder written by :meth:`QueryTransformer.save`, or a
    ``.safetensors`` file holding the official ``query_abstractor`` weights."""
    path = Path(weights)
    if path.is_dir():
        return QueryTransformer.load(path)
    if path.is_file() and path.suffix == ".safetensors":
        return from_official(load_file(str(path)))
    raise FileNotFoundError(f"mqt: weights={weights!r} is neither a folder holding {CONFIG_FILE} nor an official "
                            f"query_abstractor .safetensors file")


@dataclass
class MQT(ConnectorReducer):
    """The query transformer in place of the projector (see the module docstring).

    Args:
        tokens: the prefix m (1..M): one for every image, or a ``;``-list with one per image.
        weights: a folder written by :meth:`QueryTransformer.save` (or an official
            ``query_abstractor`` ``.safetensors``); default: the ``mqt/`` folder of the model's own
            checkpoint (a model trained for MQT, such as ``zoo.load("shapes-llava-mqt")``).
        transformer: (Python only) a :class:`QueryTransformer` module to use as it is (training).
    """

    name: ClassVar[str] = "mqt"
    sites: ClassVar[tuple[Site, ...]] = (Site.CONNECTOR,)
    before_projector: ClassVar[bool] = True
    replaces_projector: ClassVar[bool] = True
    needs_grid: ClassVar[bool] = True

    tokens: int | tuple[int, ...] | None = expects("a positive integer or a ;-list of them (one per image)", default=None)
    weights: str | None = None
    transformer: QueryTransformer | None = field(default=None, repr=False, compare=False, metadata={"spec": False})

    def __post_init__(self) -> None:
        counts = (self.tokens,) if isinstance(self.tokens, int) else self.tokens or ()
        if self.tokens is None:
            raise ValueError("mqt: give tokens=<m>, the number of queries kept (1..M); it is never drawn at random")
        if not counts or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in counts):
            raise ValueError(f"mqt: tokens must be positive integers, got {self.tokens!r}")

    @property
    def ordered(self) -> bool:
        return True  # query order, whatever the patches

    def resolve(self, source: str | None) -> QueryTransformer:
        """The module: ``transformer``, else ``weights``, else ``<source>/mqt``."""
        if self.transformer is None:
            if self.weights is not None:
                self.transformer = load_transformer(self.weights)
            elif source is not None and (Path(source) / SHIPPED_FOLDER / CONFIG_FILE).is_file():
                self.transformer = QueryTransformer.load(Path(source) / SHIPPED_FOLDER)
            else:
                raise ValueError(f"mqt: no query transformer: give weights=<folder>, or apply it to a model trained for "
                                 f"MQT (whose checkpoint holds {SHIPPED_FOLDER}/{CONFIG_FILE}); model: {source!r}")
        return self.transformer

    def check_connector(self, info: ConnectorInfo) -> None:
        if info.family != "llava":
            raise ValueError(f"mqt: supported on LLaVA-1.5-style models only (the official MQT has no AnyRes "
                             f"packing), not on {info.family}")
        if info.n_prefix:
            raise ValueError("mqt: reads the patch features only; use vision_feature_select_strategy='default'")
        if info.grid is None:
            raise ValueError("mqt: the connector needs the patch grid the visual tokens come from")
        config = self.resolve(info.source).config
        if info.feature_width is not None and info.feature_width != config.feature_width:
            raise ValueError(f"mqt: the query transformer reads features of width {config.feature_width}, this model's "
                             f"vision features are {info.feature_width} wide")
        if info.llm_width is not None and info.llm_width != config.llm_width:
            raise ValueError(f"mqt: the query transformer writes tokens of width {config.llm_width}, this model's "
                             f"LLM takes {info.llm_width}")
        for tokens in self.counts():
            if tokens > config.queries:
                raise ValueError(f"mqt: tokens={tokens} is more than the {config.queries} queries of the transformer")

    def target(self, num_tokens: int) -> int:
        if not isinstance(self.tokens, int):
            raise ValueError("mqt: per-image prefixes are chosen per batch (image_targets), not from a count")
        return self.tokens

    def counts(self) -> tuple[int, ...]:
        """The prefix (or the per-image prefixes) as a tuple."""
        return (self.tokens,) if isinstance(self.tokens, int) else tuple(self.tokens or ())

    def image_targets(self, state: TokenState, counts: list[int]) -> list[int]:
        return per_image_counts(self.name, self.tokens if isinstance(self.tokens, int) else self.counts(), len(counts))

    def flops(self, images: int, tokens: int) -> int:
        """Per image: the query, key and value projections (all M queries run, see
        :meth:`QueryTransformer.forward`), scores and weighted sum, the output projection and
        ``W_proj``."""
        config = self.resolve(None).config
        c, m = config.feature_width, config.queries
        projections = 2 * c * c * (m + 2 * tokens + m) + 2 * m * c * config.llm_width
        return images * (projections + 4 * m * tokens * c)

    def reduce_visual(self, state: TokenState, signals: Signals, targets: torch.Tensor) -> TokenState:
        """Row ``b`` becomes the first ``targets[b]`` query outputs (LLM width); query ``i`` stands
        at the image's placeholder ``i`` (``origin``), padding after a shorter prefix."""
        if state.grid is None:
            raise ValueError("mqt: the features are not on their patch grid")
        module = self.resolve(None).to(state.x.device)
        counts = targets.to(state.x.device)
        width = int(counts.max())
        out = module(state.x, state.grid, width, state.valid).to(state.x.dtype)
        slots = torch.arange(state.origin.shape[1], device=state.x.device)
        origin = torch.where(slots < counts[:, None], slots, -1)
        real = torch.arange(width, device=state.x.device) < counts[:, None]
        return TokenState(x=out, size=None, origin=origin, valid=None if bool(real.all()) else real, n_prefix=0, grid=None)
