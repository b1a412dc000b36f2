"""HoloV — holistic, crop-balanced visual token pruning at the connector (``shared/specs/holov.md``).

Pure tensor functions first (crops, the similarity-variance diversity, the holistic score, crop
quotas, the selection), then the connector reducer. Per image: the visual tokens are split into
C crops; every token scores its vision-tower CLS attention plus lambda times its crop's
similarity variance rescaled to the attention's magnitude (``gamma_c``); crops get shares of the
budget K in proportion to their mean score (sharpness tau); each crop keeps its best tokens.

Paper rules by default, departures and code variants named:
* quotas are the paper's capped allocation: a crop asked for more tokens than it has gives the
  surplus to crops with room, in proportion to ``w_c (M_c - q_c)``, and what rounding leaves goes to
  the highest-weight crops with room, so every image keeps exactly K real tokens. The official
  code's lost overflow and zero padding are not offered (they break "exactly K");
* ``lam`` defaults to the paper's 1; ``lam=0.09`` is the LLaVA code's value;
* ``rank=holistic`` (paper, Eq. 5) or ``rank=attention`` (code: raw CLS attention) inside a crop;
* ``crops=bands`` (contiguous runs in raster order, as paper and code) or ``crops=blocks`` (2-D
  tiles of the patch grid); the crop count defaults to the paper's ``floor(1024 / K)``, scaled by
  ``N / 576`` for other token counts (``floor(1024 N / (576 K))``, at least 1);
* the variance is the paper's off-diagonal variance (the code also counts the zeroed diagonal);
* kept tokens enter the LLM in raster order (``order=raster``; LLaVA-NeXT: per view) or, with
  ``order=code`` (LLaVA-1.5 only), as the official code feeds them: crop by crop, best first inside
  a crop; positions follow the adapter's position rule either way;
* on LLaVA-NeXT the budget is split between the base view and the high-resolution map in
  proportion to their sizes (vtc's connector rule) instead of pruning their concatenation at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.merge import keep_tokens, keep_top
from vtc.reducers.base import ConnectorInfo, ConnectorReducer, Signal, Signals, Site
from vtc.state import TokenState

EPS = 1e-6
CROP_SHAPES = ("bands", "blocks")
RANKS = ("holistic", "attention")
ORDERS = ("raster", "code")


def default_crops(num_tokens: int, k: int) -> int:
    """The paper's crop count ``floor(1024 / K)`` for 576 tokens, scaled to ``num_tokens``."""
    return max(1, min(num_tokens, (1024 * num_tokens) // (576 * k)))


def band_crops(real: torch.Tensor, crops: int) -> torch.Tensor:
    """(B, N) crop of every real token: ``crops`` contiguous runs of its row's real tokens in
    order, sizes differing by at most one (the first runs larger); -1 for padding."""
    count = real.sum(dim=1, keepdim=True)
    position = real.long().cumsum(dim=1) - 1
    base, extra = count // crops, count % crops
    boundary = extra * (base + 1)
    crop = torch.where(position < boundary, position // (base + 1), extra + (position - boundary) // base.clamp(min=1))
    return torch.where(real, crop, -1)


def block_crops(real: torch.Tensor, grid: tuple[int, int], crops: int) -> torch.Tensor:
    """(B, N) crop of every token of a raster patch grid: ``crops`` 2-D tiles (``a x b`` with
    ``a`` the largest divisor of ``crops`` up to its square root)."""
    rows, cols = grid
    if real.shape[1] != rows * cols or not bool(real.all()):
        raise ValueError("holov: crops=blocks needs every patch of the grid in raster order (no earlier reduction)")
    tall = max(d for d in range(1, int(math.isqrt(crops)) + 1) if crops % d == 0)
    wide = crops // tall
    if tall > rows or wide > cols:
        raise ValueError(f"holov: {crops} crops as {tall} x {wide} blocks do not fit a {rows} x {cols} grid")
    r = torch.arange(rows, device=real.device)[:, None] * tall // rows
    c = torch.arange(cols, device=real.device)[None, :] * wide // cols
    return (r * wide + c).reshape(1, -1).expand_as(real)


def _by_crop(crop: torch.Tensor, crops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (B, C, M) of each crop's tokens in order, -1 padded; (B, C) crop sizes)."""
    batch, n = crop.shape
    sizes = torch.zeros(batch, crops + 1, dtype=torch.long, device=crop.device)
    sizes.scatter_add_(1, crop.clamp(min=-1) + 1, torch.ones_like(crop))
    sizes = sizes[:, 1:]
    order = torch.where(crop >= 0, crop, crops).argsort(dim=1, stable=True)
    starts = sizes.cumsum(dim=1) - sizes
    width = max(int(sizes.max()), 1)
    slot = torch.arange(width, device=crop.device)
    index = (starts[..., None] + slot).clamp(max=n - 1)
    index = torch.where(slot < sizes[..., None], order.gather(1, index.view(batch, -1)).view(batch, crops, width), -1)
    return index, sizes


def similarity_variance(x: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, C, M) variance of each token's cosine similarities to the other tokens of its crop
    (holov.md b.4, the paper's off-diagonal form); 0 where a crop has one token."""
    batch, crops, width = index.shape
    present = index >= 0
    z = x.gather(1, index.clamp(min=0).view(batch, -1, 1).expand(-1, -1, x.shape[-1])).float()
    z = z / z.norm(dim=-1, keepdim=True).clamp(min=EPS)
    z = z.view(batch, crops, width, -1) * present[..., None]
    sim = z @ z.transpose(-1, -2)
    others = present[..., :, None] & present[..., None, :] & ~torch.eye(width, dtype=torch.bool, device=x.device)
    denominator = (sizes - 1).clamp(min=1)[..., None].float()
    mean = (sim * others).sum(-1) / denominator
    return (((sim - mean[..., None]) ** 2) * others).sum(-1) / denominator


def crop_quotas(weight: torch.Tensor, sizes: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, C) tokens each crop keeps: ``floor(w_c K)``, the remainder to the highest weights,
    then overflow (more than a crop holds) redistributed to crops with room in proportion to
    ``w_c (M_c - q_c)``, what rounding leaves filling the highest-weight crops with room
    (holov.md b.7, paper rule). Sums to ``k`` per row when the crops hold that many tokens."""
    k = k.view(-1, 1)
    quota = torch.floor(weight * k).long()
    priority = weight.masked_fill(sizes == 0, -1.0).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(priority).scatter_(1, priority, torch.arange(weight.shape[1], device=weight.device).expand_as(priority))
    quota = quota + (rank < (k - quota.sum(dim=1, keepdim=True))).long()
    surplus = (quota - sizes).clamp(min=0)
    quota = quota - surplus
    surplus = surplus.sum(dim=1, keepdim=True)
    room = sizes - quota
    share = weight * room
    share = torch.where(share.sum(dim=1, keepdim=True) > 0, share, room.float())
    add = torch.floor(surplus * share / share.sum(dim=1, keepdim=True).clamp(min=EPS)).long().clamp(min=0)
    add = torch.minimum(add, room)
    quota, room = quota + add, room - add
    left = surplus - add.sum(dim=1, keepdim=True)
    room_sorted = room.gather(1, priority)
    before = room_sorted.cumsum(dim=1) - room_sorted
    fill = torch.minimum((left - before).clamp(min=0), room_sorted)
    return quota + torch.zeros_like(quota).scatter_(1, priority, fill)


def holov_keep(
    x: torch.Tensor, attention: torch.Tensor, real: torch.Tensor, k: torch.Tensor, crop: torch.Tensor, crops: int,
    lam: float = 1.0, tau: float = 1.0, rank: str = "holistic",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, ranking)``: (B, N) bool of the tokens HoloV keeps, ``k[b]`` per row among ``real``,
    from features ``x`` (B, N, D), CLS attention (B, N) and each token's ``crop`` (B, N; -1
    padding); and (B, N) the score that ranked each token inside its crop."""
    index, sizes = _by_crop(crop, crops)
    present = index >= 0
    a = attention.float().gather(1, index.clamp(min=0).view(index.shape[0], -1)).view(index.shape) * present
    variance = similarity_variance(x, index, sizes)
    count = sizes.clamp(min=1).float()
    gamma = (a.abs().sum(-1) / count) / (variance.abs().sum(-1) / count + EPS)
    holistic = (a + lam * gamma[..., None] * variance) * present
    score = holistic.sum(-1) / count
    powered = score.clamp(min=0) ** tau * (sizes > 0)
    weight = powered / (powered.sum(dim=1, keepdim=True) + EPS)
    quota = crop_quotas(weight, sizes, k)
    ranking = holistic if rank == "holistic" else a
    order = ranking.masked_fill(~present, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    chosen = (place < quota[..., None]) & present
    keep = torch.zeros_like(real)
    batch = torch.arange(index.shape[0], device=index.device)[:, None, None].expand_as(index)
    keep[batch[chosen], index[chosen]] = True
    scores = torch.zeros(real.shape, dtype=ranking.dtype, device=real.device)
    scores[batch[present], index[present]] = ranking[present]
    return keep, scores


@dataclass
class HoloV(ConnectorReducer):
    """Keep ``k`` visual tokens per image, balanced over crops by holistic scores.

    Args:
        k: visual tokens kept per image (1..N).
        crops: number of crops C (default: the paper's rule, see module docstring).
        shape: ``bands`` (contiguous runs in raster order) or ``blocks`` (2-D tiles).
        lam: weight of the rescaled similarity variance (paper 1, LLaVA code 0.09).
        tau: crop-weight sharpness (1 in paper experiments and code).
        rank: ``holistic`` (paper) or ``attention`` (code) inside a crop.
        order: ``raster`` or ``code`` (crop by crop, best first), the order tokens enter the LLM.
    """

    name: ClassVar[str] = "holov"
    sites: ClassVar[tuple[Site, ...]] = (Site.CONNECTOR,)
    connector_needs: ClassVar[frozenset[Signal]] = frozenset({Signal.CLS_ATTN})
    before_projector: ClassVar[bool] = False

    k: int = 64
    crops: int | None = None
    shape: str = "bands"
    lam: float = 1.0
    tau: float = 1.0
    rank: str = "holistic"
    order: str = "raster"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"holov: k must be a positive number of tokens, got {self.k!r}")
        if self.crops is not None and (not isinstance(self.crops, int) or self.crops <= 0):
            raise ValueError(f"holov: crops must be a positive integer, got {self.crops!r}")
        if self.shape not in CROP_SHAPES:
            raise ValueError(f"holov: shape must be one of {', '.join(CROP_SHAPES)}, got {self.shape!r}")
        if self.rank not in RANKS:
            raise ValueError(f"holov: rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.order not in ORDERS:
            raise ValueError(f"holov: order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.lam < 0 or self.tau <= 0:
            raise ValueError(f"holov: lam must be >= 0 and tau > 0, got lam={self.lam}, tau={self.tau}")

    @property
    def ordered(self) -> bool:
        return self.order == "code"

    def check_connector(self, info: ConnectorInfo) -> None:
        if self.order == "code" and info.family == "llava-next":
            raise ValueError("holov: order=code is for LLaVA-1.5; LLaVA-NeXT packs each view's rows in raster order")
        if not info.has_cls:
            raise ValueError(
                "holov scores tokens by the vision tower's CLS attention, and this tower has no CLS token "
                "(SigLIP); use another connector reducer (pool, random) with it"
            )
        super().check_connector(info)

    def target(self, num_tokens: int) -> int:
        if self.k > num_tokens:
            raise ValueError(f"holov: k={self.k} is more than the {num_tokens} visual tokens of an image")
        self.crop_count(num_tokens, self.k)
        return self.k

    def crop_count(self, num_tokens: int, k: int) -> int:
        crops = default_crops(num_tokens, k) if self.crops is None else self.crops
        if crops > num_tokens:
            raise ValueError(f"holov: crops={crops} is more than the {num_tokens} visual tokens of an image")
        return crops

    def reduce_visual(self, state: TokenState, signals: Signals, targets: torch.Tensor) -> TokenState:
        if signals.cls_attn is None:
            raise ValueError("holov needs the vision tower's CLS attention at the feature layer")
        p = state.n_prefix
        x, attention = state.x[:, p:], signals.cls_attn[:, p:]
        real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if state.valid is None else state.valid[:, p:]
        counts = real.sum(dim=1)
        if bool((targets >= counts).all()):
            return state  # every token stays, in raster order
        crops = self.crop_count(int(counts.min()), int(targets.max()))
        if self.shape == "blocks":
            if state.grid is None:
                raise ValueError("holov: crops=blocks needs the patch grid (no encoder reducer before it)")
            crop = block_crops(real, state.grid, crops)
        else:
            crop = band_crops(real, crops)
        keep, ranking = holov_keep(x, attention, real, targets, crop, crops, self.lam, self.tau, self.rank)
        if self.order == "code":  # crop by crop, best first inside a crop
            if bool((targets != targets[0]).any()):
                raise ValueError("holov: order=code needs the same k for every image")
            best_first = ranking.argsort(dim=1, descending=True, stable=True)
            by_crop = crop.masked_fill(~keep, crops).gather(1, best_first).argsort(dim=1, stable=True)
            return keep_tokens(state, best_first.gather(1, by_crop)[:, : int(targets[0])] + p)
        score = torch.cat([torch.ones(keep.shape[0], p, device=x.device), keep.float()], dim=1)
        return keep_top(state, score, targets)
