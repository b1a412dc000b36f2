"""HoloV — holistic, crop-balanced visual token pruning at the connector (Zou et al., "Don't Just
Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention", NeurIPS 2025,
arXiv 2510.02912; official code github.com/obananas/HoloV; see docs/ARCHITECTURE.md "HoloV").

Pure tensor functions first (crops, the similarity-variance diversity, the holistic score, crop
quotas, the selection, the code's emission order), then the connector reducer. Per image: the
visual tokens are split into C crops; every token scores its vision-tower CLS attention plus lambda
times its crop's similarity variance rescaled to the attention's magnitude (``gamma_c``); crops get
shares of the budget K in proportion to their mean score (sharpness tau); each crop keeps its best
tokens.

As in the official code, the attention is multiplied by 1000 before it is scored (``ATTENTION_SCALE``),
so the epsilon of the crop weights ``w_c = s_c / (sum s + 1e-6)`` acts on the same magnitudes as
there (1e-9 against raw attention); the scale cancels everywhere else. Ranking by attention uses the
raw values.

Paper rules by default, departures and code variants named:
* quotas are the paper's capped allocation: a crop asked for more tokens than it has gives the
  surplus to crops with room, in proportion to ``w_c (M_c - q_c)``, and what rounding leaves goes to
  the highest-weight crops with room, so every image keeps exactly K real tokens. The official
  code's lost overflow and zero padding are not offered (they break "exactly K"); where no crop
  overflows, the quotas are the code's (floor, then one each to the highest weights);
* ``lam`` defaults to the paper's 1; ``lam=0.09`` is the LLaVA code's value;
* ``rank=holistic`` (paper, Eq. 5) or ``rank=attention`` (code: raw CLS attention) inside a crop;
* ``shape=bands`` (contiguous runs in raster order, as paper and code) or ``shape=blocks`` (2-D
  tiles of the patch grid); the crop count defaults to the paper's ``floor(1024 / K)`` (App. A.3),
  scaled by ``N / 576`` for other token counts (``floor(1024 N / (576 K))``, at least 1);
* ``variance=paper`` is the paper's off-diagonal variance; ``variance=code`` also counts the zeroed
  diagonal (one more ``(0 - mean)^2`` term over the same ``M - 1``), as the code does. Under
  ``rank=attention`` the variance reaches the selection only through the epsilon of ``gamma_c`` (a
  crop's mean holistic score is ``mean a (1 + lam m / (m + eps))``, ``m`` its mean variance), which
  still moves quotas where features are near-duplicates (``m`` within a few orders of eps), so
  matching the code's selections needs ``variance=code``;
* kept tokens enter the LLM in raster order (``order=raster``; LLaVA-NeXT: per view) or, with
  ``order=code`` (LLaVA-1.5 only), as the official code emits them: crop by crop, a crop kept whole
  in raster order, any other crop best first; positions follow the adapter's position rule either
  way;
* a crop of one token is scored like any other (its attention, scaled); the code scores it by its
  raw, unscaled attention, which only happens when crops outnumber half the tokens (never with the
  code's 16 crops of 576 tokens);
* the cosine statistics are computed in float32 from ``x / max(|x|, eps)``; the code uses the
  features' own dtype (half precision under LLaVA's fp16 inference) and ``x / (|x| + eps)``, and
  breaks exact ties by ``topk``'s order where vtc takes the lower index;
* on LLaVA-NeXT the budget is split between the base view and the high-resolution map in
  proportion to their sizes (vtc's connector rule) instead of pruning their concatenation at once,
  and the ``image_newline`` tokens stay (the code drops them);
* the default crop count follows each image's own token count (after DyMU images differ), so a
  padded batch keeps what each image keeps alone;
* the paper's visual-context refetching (App. D) is not implemented.

With ``crops=16, lam=0.09, rank=attention, order=code, variance=code`` (the LLaVA code's settings)
vtc keeps the code's tokens in the code's order on every image where the code neither loses
overflow nor pads, up to float rounding when ``w_c K`` lies within rounding error of an integer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.merge import keep_tokens, keep_top
from vtc.sites import ConnectorInfo, ConnectorReducer, Signal, Signals, Site
from vtc.state import TokenState

EPS = 1e-6
ATTENTION_SCALE = 1000.0  # the official code's factor on the CLS attention before scoring
CROP_SHAPES = ("bands", "blocks")
RANKS = ("holistic", "attention")
ORDERS = ("raster", "code")
VARIANCES = ("paper", "code")


def default_crops(num_tokens: int, k: int) -> int:
    """The paper's crop count ``floor(1024 / K)`` for 576 tokens, scaled to ``num_tokens``."""
    return max(1, min(num_tokens, (1024 * num_tokens) // (576 * k)))


def band_crops(real: torch.Tensor, crops: int | torch.Tensor) -> torch.Tensor:
    """(B, N) crop of every real token: ``crops`` (or ``crops[b]``, a (B, 1) tensor) contiguous
    runs of its row's real tokens in order, sizes differing by at most one (the first runs
    larger); -1 for padding."""
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
        raise ValueError("holov: shape=blocks needs every patch of the grid in raster order (no earlier reduction)")
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


def similarity_variance(
    x: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor, diagonal: bool = False
) -> torch.Tensor:
    """(B, C, M) variance of each token's cosine similarities to the other tokens of its crop,
    around their mean, divided by ``M - 1`` (the paper's off-diagonal form); with ``diagonal`` the
    zeroed self-similarity counts too (one more ``mean^2`` term, the official code's form). 0 where
    a crop has one token."""
    batch, crops, width = index.shape
    present = index >= 0
    z = x.gather(1, index.clamp(min=0).view(batch, -1, 1).expand(-1, -1, x.shape[-1])).float()
    z = z / z.norm(dim=-1, keepdim=True).clamp(min=EPS)
    z = z.view(batch, crops, width, -1) * present[..., None]
    sim = z @ z.transpose(-1, -2)
    others = present[..., :, None] & present[..., None, :] & ~torch.eye(width, dtype=torch.bool, device=x.device)
    denominator = (sizes - 1).clamp(min=1)[..., None].float()
    mean = (sim * others).sum(-1) / denominator
    spread = ((sim * others - mean[..., None]) ** 2) * (present[..., :, None] & present[..., None, :] if diagonal else others)
    return spread.sum(-1) / denominator


def crop_quotas(weight: torch.Tensor, sizes: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, C) tokens each crop keeps: ``floor(w_c K)``, the remainder to the highest weights,
    then overflow (more than a crop holds) redistributed to crops with room in proportion to
    ``w_c (M_c - q_c)``, what rounding leaves filling the highest-weight crops with room
    (the paper's capped allocation). Sums to ``k`` per row when the crops hold that many tokens;
    equals the official code's quotas when no crop is asked for more than it holds."""
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
    lam: float = 1.0, tau: float = 1.0, rank: str = "holistic", variance: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, ranking)``: (B, N) bool of the tokens HoloV keeps, ``k[b]`` per row among ``real``,
    from features ``x`` (B, N, D), CLS attention (B, N) and each token's ``crop`` (B, N; -1
    padding); and (B, N) the score that ranked each token inside its crop (the holistic score in
    units of ``ATTENTION_SCALE`` times attention, or the raw attention)."""
    index, sizes = _by_crop(crop, crops)
    present = index >= 0
    raw = attention.float().gather(1, index.clamp(min=0).view(index.shape[0], -1)).view(index.shape) * present
    a = raw * ATTENTION_SCALE
    spread = similarity_variance(x, index, sizes, diagonal=variance == "code")
    count = sizes.clamp(min=1).float()
    gamma = (a.abs().sum(-1) / count) / (spread.abs().sum(-1) / count + EPS)
    holistic = (a + lam * (spread * gamma[..., None])) * present
    score = holistic.sum(-1) / count
    powered = score.clamp(min=0) ** tau * (sizes > 0)
    weight = powered / (powered.sum(dim=1, keepdim=True) + EPS)
    quota = crop_quotas(weight, sizes, k)
    ranking = holistic if rank == "holistic" else raw
    order = ranking.masked_fill(~present, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    chosen = (place < quota[..., None]) & present
    keep = torch.zeros_like(real)
    batch = torch.arange(index.shape[0], device=index.device)[:, None, None].expand_as(index)
    keep[batch[chosen], index[chosen]] = True
    scores = torch.zeros(real.shape, dtype=ranking.dtype, device=real.device)
    scores[batch[present], index[present]] = ranking[present]
    return keep, scores


def code_order(keep: torch.Tensor, ranking: torch.Tensor, crop: torch.Tensor, crops: int) -> torch.Tensor:
    """(B, K) indices of the kept tokens in the order the official code emits them: crop by crop;
    a crop kept whole in its own (raster) order, any other crop best first by ``ranking`` (ties to
    the lower index). Every row must keep the same number K of tokens."""
    batch, n = keep.shape
    counts = keep.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"holov: order=code needs the same number of kept tokens in every row, got {counts.tolist()}")
    slot = crop.clamp(min=0)
    member = crop >= 0
    sizes = torch.zeros(batch, crops, dtype=torch.long, device=keep.device).scatter_add_(1, slot, member.long())
    kept = torch.zeros_like(sizes).scatter_add_(1, slot, (keep & member).long())
    whole = (kept == sizes).gather(1, slot)
    position = torch.arange(n, device=keep.device).expand(batch, n)
    best_first = ranking.float().masked_fill(~keep, float("-inf")).argsort(dim=1, descending=True, stable=True)
    place = torch.empty_like(best_first).scatter_(1, best_first, position)
    key = torch.where(keep, slot * n + torch.where(whole, position, place), crops * n + position)
    return key.argsort(dim=1)[:, : int(counts[0])].contiguous()


@dataclass
class HoloV(ConnectorReducer):
    """Keep ``k`` visual tokens per image, balanced over crops by holistic scores.

    Args:
        k: visual tokens kept per image (1..N); an image that reaches the connector with no more
            (after an encoder reducer with per-image counts, e.g. DyMU) keeps all of its tokens.
        crops: number of crops C (default: the paper's rule, see module docstring).
        shape: ``bands`` (contiguous runs in raster order) or ``blocks`` (2-D tiles).
        lam: weight of the rescaled similarity variance (paper 1, LLaVA code 0.09).
        tau: crop-weight sharpness (1 in paper experiments and code).
        rank: ``holistic`` (paper) or ``attention`` (code) inside a crop.
        order: ``raster`` or ``code`` (crop by crop; a crop kept whole in raster order, any other
            best first), the order tokens enter the LLM.
        variance: ``paper`` (off-diagonal) or ``code`` (the zeroed diagonal counted too).

    ``crops=16, lam=0.09, rank=attention, order=code, variance=code`` is the official LLaVA code's
    configuration (its K is 64).
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
    variance: str = "paper"

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
        if self.variance not in VARIANCES:
            raise ValueError(f"holov: variance must be one of {', '.join(VARIANCES)}, got {self.variance!r}")
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

    def budget_cap(self) -> int:
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
        per_image = [self.crop_count(int(n), int(k)) for n, k in zip(counts.tolist(), targets.tolist())]
        crops = max(per_image)  # each image its own crop count, as alone: fewer crops leave the last ones empty
        if self.shape == "blocks":
            if state.grid is None:
                raise ValueError("holov: shape=blocks needs the patch grid (no encoder reducer before it)")
            if min(per_image) != crops:
                raise ValueError(f"holov: shape=blocks needs one crop count for the batch, got {per_image}")
            crop = block_crops(real, state.grid, crops)
        else:
            crop = band_crops(real, torch.tensor(per_image, device=x.device)[:, None])
        if self.order == "code" and bool((targets != targets[0]).any()):
            raise ValueError("holov: order=code needs the same k for every image")
        keep, ranking = holov_keep(x, attention, real, targets, crop, crops, self.lam, self.tau, self.rank, self.variance)
        if self.order == "code":
            return keep_tokens(state, code_order(keep, ranking, crop, crops) + p)
        score = torch.cat([torch.ones(keep.shape[0], p, device=x.device), keep.float()], dim=1)
        return keep_top(state, score, targets)
