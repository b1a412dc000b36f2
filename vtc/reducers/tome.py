"""ToMe — bipartite soft token merging (Bolya et al., "Token Merging: Your ViT but Faster",
ICLR 2023, Sec. 3).

Faithful to the paper/official code: keys averaged over heads as the metric, cosine similarity,
alternating A/B split on the current order, size-weighted average merge, proportional attention
(``log(size)`` key bias), prefix tokens protected, ToMe's output order ``[unmerged A, B]``, and
each layer merging at most half of its mergeable tokens: a per-layer ``r`` above that cap is
lowered to it silently, as the official code does (``handle.removed_per_layer`` reports the ``r``
each layer realised; ``strict=true`` refuses such an ``r`` instead). A layer left with nothing to
merge passes its tokens through unchanged.

Departures, all deliberate:
* proportional attention is an additive mask to SDPA instead of an explicit softmax (same math,
  fast attention kept); LayerScale, qk-norm and register tokens are honoured (the official timm
  patch drops LayerScale and qk-norm); with qk-norm the metric uses the normalised keys the
  attention actually sees;
* every prefix token (CLS, distillation, registers) is protected, not only CLS/dist;
* exact score ties go to the lower A index (stable sort) instead of an unspecified order;
* without a prefix token (SigLIP, towers without CLS) the unmerged A tokens keep their index
  order; the official code leaves them in descending-score order (it re-sorts them by index only
  when there is a class token);
* average and attention pooling are size-weighted (the official timm patch leaves them alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtc.budget import SCHEDULES, per_layer
from vtc.merge import bipartite_soft_matching, merge_capacity, merge_tokens
from vtc.options import expects
from vtc.sites import EncoderInfo, EncoderReducer, Signal, Signals
from vtc.state import TokenState


@dataclass
class ToMe(EncoderReducer):
    """Merge ``r`` tokens per block. The default ``r=0`` merges nothing: plain ``tome`` is a no-op
    (a baseline with ToMe's bookkeeping); give ``r``.

    Args:
        r: tokens removed per layer (int), or an explicit per-layer list. Under ``schedule``
            ``linear``/``reverse-linear`` the int is the per-layer average (total ``r * L``,
            spread as DyMU's schedules, :func:`vtc.budget.linear_total`). Each layer removes at
            most half of its mergeable tokens (prefix excluded); a larger ``r`` is lowered to that
            cap, and ``handle.removed_per_layer`` gives the ``r`` each layer realised.
        schedule: ``constant`` | ``linear`` (more merging early) | ``reverse-linear``.
        inflect: ToMe's ``(r, inflect)`` schedule in [-1, 1]; -1 is the paper's decreasing schedule.
            Only with an int ``r`` and ``schedule=constant`` (ignored otherwise); a per-layer list
            ``r`` also ignores ``schedule``.
        prop_attn: proportional attention (True for supervised models, False for MAE off the shelf).
        strict: refuse (ValueError, at apply and at run time) a per-layer ``r`` above the cap
            instead of lowering it as the official code does.
    """

    name: ClassVar[str] = "tome"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.KEY_MEAN})
    takes_padding: ClassVar[bool] = True

    r: int | tuple[int, ...] = expects("a non-negative integer (or a ;-separated list of them)", default=0)
    schedule: str = "constant"
    inflect: float | None = None
    prop_attn: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        values = self.r if isinstance(self.r, (tuple, list)) else (self.r,)
        if any(int(v) != v or v < 0 for v in values):
            raise ValueError(f"tome: r must be a non-negative integer (or a list of them), got {self.r!r}")
        if isinstance(self.r, list):
            self.r = tuple(self.r)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"tome: unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.inflect is not None and not -1.0 <= self.inflect <= 1.0:
            raise ValueError(f"tome: inflect must be in [-1, 1], got {self.inflect}")

    def plan(self, info: EncoderInfo) -> list[int | None]:
        n_layers = info.num_layers
        if isinstance(self.r, tuple):
            rs = per_layer(self.r, n_layers)
        elif self.schedule != "constant":
            rs = per_layer(self.r * n_layers, n_layers, self.schedule)
        else:
            rs = per_layer(self.r, n_layers, inflect=self.inflect)
        plan: list[int | None] = []
        n = info.num_tokens
        for layer, r in enumerate(rs):
            r = self._checked(r, n, info.n_prefix, layer)
            plan.append(r or None)
            n -= r
        return plan

    def _checked(self, r: int, n: int, n_prefix: int, layer: int) -> int:
        cap = merge_capacity(n, n_prefix)
        if r <= cap or not self.strict:
            return min(r, cap)
        raise ValueError(
            f"tome: layer {layer} is asked to remove r={r} tokens but only {cap} of its {n} tokens can be "
            f"merged (half of the {n - n_prefix} unprotected ones); lower r, use schedule=linear, "
            f"or drop strict=true to cap r per layer as the official code does"
        )

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: int) -> int:
        return num_tokens - min(budget, merge_capacity(num_tokens, n_prefix))

    def reduce(self, state: TokenState, signals: Signals, budget: int, layer: int) -> TokenState:
        r = self._checked(budget, state.num_tokens, state.n_prefix, layer)
        if r == 0:  # nothing to merge (e.g. one token left without a prefix): the block skips merging
            return state
        dest, n_out = bipartite_soft_matching(signals.need(Signal.KEY_MEAN), r, state.n_prefix, state.valid)
        return merge_tokens(state, dest, n_out, self.prop_attn)
