"""An independent, loop-by-loop model of the official HoloV code's token selection (LLaVA path), for
the HoloV tests to compare against. Written from reading the released code's algorithm; the
arithmetic follows it step by step, one image and one crop at a time, with plain tensor operations.

What the official selection does with one image of N tokens, C crops and a budget of K:
1. crops are C contiguous runs of the token order, the first ``N mod C`` one token longer;
2. a crop of one token scores its raw CLS attention; a longer crop normalises its features
   (``x / (|x| + eps)``), takes their cosine matrix with the diagonal set to zero, and gives every
   token the variance of its row around the row's off-diagonal mean, summed over all M columns (the
   zeroed diagonal included) and divided by M - 1; the attention is multiplied by 1000, the variance
   rescaled by ``mean |1000 a| / (mean |V| + eps)``, and the crop scores the mean of
   ``1000 a + 0.09 * rescaled V``;
3. crop weights are ``score / (sum of scores + eps)``; a crop's quota is ``floor(weight * K)``, and
   the tokens left over go one each to the highest-weight crops;
4. a crop with a quota of at least its size is emitted whole, in token order (more than its size
   is lost); a smaller positive quota emits that many tokens by raw attention, highest first;
5. crops are emitted in order; fewer than K tokens are padded with zero vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-6
CODE_LAMBDA = 0.09
ATTENTION_SCALE = 1000.0


@dataclass
class OfficialSelection:
    kept: list[int]  # token indices in the order the code emits them
    quotas: list[int]  # quota per crop after the remainder (before any capping)
    sizes: list[int]
    lost_overflow: bool  # some crop was asked for more tokens than it has
    padded: bool  # fewer than K real tokens came out (the code appends zero vectors)
    single_token_crop: bool  # a crop of one token (scored by raw, unscaled attention)


def official_selection(features: torch.Tensor, attention: torch.Tensor, crops: int, k: int) -> OfficialSelection:
    """The official code's selection for one image: ``features`` (N, D), ``attention`` (N,)."""
    n = features.shape[0]
    base, extra = divmod(n, crops)
    spans, start = [], 0
    for c in range(crops):
        size = base + (1 if c < extra else 0)
        if size > 0:  # the code skips empty crops
            spans.append((start, size))
        start += size
    attention = attention.float()
    features = features.float()

    scores = []
    for start, size in spans:
        a = attention[start:start + size]
        if size == 1:
            scores.append(a.mean())
            continue
        z = features[start:start + size]
        z = z / (z.norm(dim=1, keepdim=True) + EPS)
        similarity = (z @ z.T) * (1 - torch.eye(size))
        row_mean = similarity.sum(dim=1) / (size - 1)
        variance = ((similarity - row_mean[:, None]) ** 2).sum(dim=1) / (size - 1)
        scaled = a * ATTENTION_SCALE
        rescale = scaled.abs().mean() / (variance.abs().mean() + EPS)
        scores.append((scaled + CODE_LAMBDA * rescale * variance).mean())
    scores = torch.stack(scores)

    weights = scores / (scores.sum() + EPS)
    quotas = [int(math.floor(float(v))) for v in (weights * k)]
    left = k - sum(quotas)
    by_weight = sorted(range(len(spans)), key=lambda c: (-float(weights[c]), c))
    for c in by_weight[:max(left, 0)]:
        quotas[c] += 1

    kept: list[int] = []
    for (start, size), quota in zip(spans, quotas):
        if quota <= 0:
            continue
        if quota >= size:
            kept.extend(range(start, start + size))
            continue
        a = attention[start:start + size].tolist()
        best = sorted(range(size), key=lambda i: (-a[i], i))[:quota]
        kept.extend(start + i for i in best)
    sizes = [size for _, size in spans]
    return OfficialSelection(
        kept=kept[:k], quotas=quotas, sizes=sizes,
        lost_overflow=any(q > s for q, s in zip(quotas, sizes)), padded=len(kept) < k,
        single_token_crop=any(s == 1 for s in sizes),
    )
