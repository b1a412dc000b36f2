"""DyMU's DToMe — dynamic token merging with per-layer similarity thresholds (Wang et al.,
"DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs", 2025, Sec. 3.1).

ToMe's bipartite matching (keys averaged over heads, cosine, A = even / B = odd positions,
size-weighted merge, proportional attention, prefix protected), but each block merges every A
token whose best edge scores strictly above the block's threshold tau_l, at most half of the
image's mergeable tokens. Token counts follow image content, so a batch carries per-image counts
as padding: later attention masks the padding and pooling ignores it. Thresholds come from
:func:`vtc.dymu.calibrate` (:mod:`vtc.reducers.dymu.calibration`), loaded by name or folder, or are given directly; they are float64
and scores (float32) are compared with them exactly. A block with nothing to merge (no edge above
tau, or one token left on a tower without CLS) passes the image through unchanged, as the
official code does.

Departures from the official code, all deliberate:
* a batch gives exactly the merges, order and features of single-image runs: exact division by
  sizes (the official batch path divides by ``size + 1e-4``), stable sorts (the official re-packing
  sort is unstable), the single-image path's limit of half the mergeable tokens per image in
  batches too (the official batch path has none; not the ``cap`` option); an image with no edge
  above tau in a block keeps its order;
* without a CLS token (SigLIP) the unmerged A tokens keep their index order; the official
  single-image path leaves them in descending-score order (ToMe's code re-sorts them by index only
  when there is a class token), which changes the next block's A/B split;
* average pooling is size-weighted over the real tokens (each merged token counts for the patches
  it holds); the official code takes a plain mean of the remaining tokens;
* similarities are float32 dot products (also in the Triton kernel: no half-precision tensor
  cores) of the keys averaged in the model's dtype, in calibration and inference alike (the
  official thresholds were found in bf16);
* a calibrated block merges when its schedule gives it merges (r_l > 0), whatever its threshold,
  so a threshold of exactly 1 (duplicate tokens; the official code reads 1.0 as "unset") still
  merges what scores above it; an explicit threshold of 1 turns its block off (above 1 is
  refused: a cosine never exceeds 1); mode never follows ``train()``/``eval()`` (the official blocks calibrate in train mode);
* in a LLaVA the tower runs only up to the vision feature layer, so the layers after it (the last
  CLIP-L block under layer -2) neither merge nor count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from vtc.merge import bipartite_threshold_matching, merge_tokens
from vtc.reducers.dymu.calibration import PRESETS, Calibration, find_calibration
from vtc.reducers.dymu.unmerge import VirtualUnmerge
from vtc.sites import EncoderInfo, EncoderReducer, Reducer, Signal, Signals
from vtc.state import TokenState

VTU_MODES = ("expand", "exact", "off")


class LayerThreshold(NamedTuple):
    """One block's budget: merge edges scoring above ``threshold``, at most ``cap`` per image."""

    threshold: float
    cap: int | None = None


@dataclass
class DyMU(EncoderReducer):
    """Merge every edge above a per-layer threshold; one of ``thresholds``, ``calibration`` or
    ``preset`` says which thresholds.

    Args:
        thresholds: one float in [-1, 1] for every block, or one per block (``1`` = the block
            never merges, ``-1`` = it merges the most it can).
        calibration: a :class:`~vtc.reducers.dymu.calibration.Calibration`, or the name or folder
            of a saved one (:func:`~vtc.reducers.dymu.calibration.load_calibration`).
        preset: ``low`` | ``mid`` | ``high``: the calibration shipped for this model at that
            preset (the paper's low / mid / high; :data:`~vtc.reducers.dymu.calibration.PRESETS`).
        cap: the optional per-image cap ``int(cap * r_l)`` merges per block, ``r_l`` being the
            calibration's per-layer average (``max_r_per_instance_ratio``); needs a calibration.
        prop_attn: proportional attention (``log(size)`` key bias), on in the paper.
        vtu: virtual token unmerging in a LLaVA's LLM: ``expand`` (the official default),
            ``exact`` (the paper's formulation) or ``off``; ignored by a bare vision encoder.
    """

    name: ClassVar[str] = "dymu"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.KEY_MEAN})
    dynamic: ClassVar[bool] = True
    takes_padding: ClassVar[bool] = True

    thresholds: float | tuple[float, ...] | None = None
    calibration: str | Calibration | None = None
    preset: str | None = None
    cap: float | None = None
    prop_attn: bool = True
    vtu: str = "expand"

    def __post_init__(self) -> None:
        given = [name for name in ("thresholds", "calibration", "preset") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"dymu: give exactly one of thresholds (one float or one per layer), calibration (a calibration "
                f"or a saved one's name or folder) or preset ({'|'.join(PRESETS)}); got {given or 'none'}"
            )
        if isinstance(self.thresholds, list):
            self.thresholds = tuple(self.thresholds)
        values = () if self.thresholds is None else self.thresholds if isinstance(self.thresholds, tuple) else (self.thresholds,)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"dymu: thresholds must be numbers, got {self.thresholds!r}")
        if not all(-1.0 <= v <= 1.0 for v in values):
            raise ValueError(f"dymu: thresholds are cosine similarities in [-1, 1] (1: the block never merges), "
                             f"got {self.thresholds!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"dymu: unknown preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        if self.cap is not None and (self.cap <= 0 or self.thresholds is not None):
            raise ValueError("dymu: cap is a positive ratio of the calibration's per-layer merges; it needs "
                             "calibration= or preset=, not explicit thresholds")
        if self.vtu not in VTU_MODES:
            raise ValueError(f"dymu: vtu must be one of {', '.join(VTU_MODES)}, got {self.vtu!r}")

    def plan(self, info: EncoderInfo) -> list[LayerThreshold | None]:
        taus: Sequence[float]
        merges: Sequence[int | None]
        if self.thresholds is not None:
            taus = self.thresholds if isinstance(self.thresholds, tuple) else (self.thresholds,) * info.num_layers
            if len(taus) != info.num_layers:
                raise ValueError(
                    f"dymu: got {len(taus)} thresholds but this {info.family} encoder has {info.num_layers} layers; "
                    f"give one per layer or a single value for all"
                )
            merges = [None] * info.num_layers
        else:
            calibration = find_calibration(info, self.calibration, self.preset)
            taus, merges = calibration.thresholds, calibration.merges
        plan: list[LayerThreshold | None] = []
        for tau, r in zip(taus, merges):
            gate = tau < 1.0 if r is None else r > 0  # a calibration gates by its schedule, as the official code does
            cap = None if self.cap is None or r is None else int(self.cap * r)
            plan.append(LayerThreshold(float(tau), cap) if gate else None)
        return plan

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: LayerThreshold) -> int:
        """Counts depend on the image: the planned count is the upper bound (no merge)."""
        return num_tokens

    def reduce(self, state: TokenState, signals: Signals, budget: LayerThreshold, layer: int) -> TokenState:
        dest, real, n_out = bipartite_threshold_matching(  # float32 scores whatever the model's dtype, so
            # borderline edges do not flip with the model's precision
            signals.need(Signal.KEY_MEAN).float(), budget.threshold, state.n_prefix, state.valid, budget.cap
        )
        if bool((real == state.real_counts()).all()):
            return state  # no image merged anything: every order stays
        return merge_tokens(state, dest, n_out, self.prop_attn, real)

    def companions(self) -> tuple[Reducer, ...]:
        return () if self.vtu == "off" else (VirtualUnmerge(mode=self.vtu),)
