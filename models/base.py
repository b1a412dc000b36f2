"""The block runner every encoder adapter shares.

A patched block runs the model's own forward whenever it has nothing to do (no budget at this
layer and no attention bias yet), so unreduced layers stay bit-identical. Otherwise it runs
``x + attn(norm1(x), bias)``, hands the residual stream and the requested signals to the reducer,
then ``x + mlp(norm2(x))`` on the shorter sequence. The first block starts a fresh
:class:`~vtc.state.TokenState` on every forward; the last one is kept for inspection.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from vtc.flops import counted_flops
from vtc.models.packing import Packing
from vtc.models.patching import InstancePatcher
from vtc.models.zoo import CHECKPOINTS
from vtc.sites import EncoderInfo, EncoderReducer, Reducer, Signal, Signals, Site
from vtc.state import TokenState

# How a batch with per-image token counts runs: "auto" packs its real tokens (attention "nested" on
# CUDA, "split" elsewhere), "padded" runs every image at the batch's widest count, "split" and
# "nested" pack with that attention backend (vtc.models.packing).
EXECUTIONS = ("auto", "padded", "split", "nested")


def checkpoint_name(source: str | None) -> str | None:
    """A model id as calibration files record it: a hub id as it is, a local folder by its name."""
    if not source:
        return None
    source = str(source).rstrip("/\\")
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return source.replace("\\", "/").rsplit("/", 1)[-1]
    return source


def carry_scores(score: torch.Tensor, before: torch.Tensor, after: torch.Tensor, n_after: int) -> torch.Tensor:
    """A per-token score (B, N) of the tokens entering a reduction, carried to the ``n_after``
    tokens leaving it: each gets the sum over the tokens it absorbed (attention mass is additive);
    a dropped token's score leaves with it. ``before`` and ``after`` are the states' ``origin``
    maps (B, N0) on either side of the reduction."""
    batch, n = score.shape
    carried = before >= 0
    dest = torch.full((batch, n + 1), -1, dtype=torch.long, device=score.device)  # column n: uncarried positions
    dest.scatter_(1, torch.where(carried, before, n), torch.where(carried, after, -1))  # a token's positions agree
    dest = dest[:, :n]
    out = score.new_zeros(batch, n_after + 1).scatter_add_(1, torch.where(dest >= 0, dest, n_after), score)
    return out[:, :n_after]


class EncoderAdapter:
    """Base of the encoder adapters; subclasses implement the family-specific pieces."""

    family: ClassVar[str]
    options: ClassVar[dict[str, str]] = {"execution": " or ".join(EXECUTIONS)}  # what vtc.apply(..., **options) takes
    sites: ClassVar[tuple[Site, ...]] = (Site.ENCODER,)

    @classmethod
    def build(cls, model: nn.Module, reducers: dict[Site, Reducer], execution: str = "auto") -> EncoderAdapter:
        return cls(model, reducers.get(Site.ENCODER), execution=execution)

    def __init__(self, model: nn.Module, reducer: EncoderReducer | None, execution: str = "auto") -> None:
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
        self.model = model
        self.reducer = reducer
        self.execution = execution
        self.blocks: list[nn.Module] = list(self.find_blocks())
        for block in self.blocks:
            self.check_block(block)
        self.info = dataclasses.replace(self.encoder_info(), model_id=checkpoint_name(self.model_id()),
                                        shipped=CHECKPOINTS)
        self.plan: list[Any] = reducer.plan(self.info) if reducer else [None] * self.info.num_layers
        self.state: TokenState | None = None
        self.token_counts: list[int] = []
        self._image_counts: list[torch.Tensor] = []
        self.extra_needs: dict[int, frozenset[Signal]] = {}  # signals another site asks of a block
        self.signals: dict[int, Signals] = {}  # those signals from the last forward
        self._patcher = InstancePatcher()

    def planned_token_counts(self) -> list[int]:
        """Tokens entering each block and leaving the last, predicted at the default input size."""
        if self.reducer is None:
            return [self.info.num_tokens] * (self.info.num_layers + 1)
        return self.reducer.token_counts(self.info, self.plan)

    # ----- family-specific pieces -------------------------------------------------------------
    @classmethod
    def accepts(cls, model: object) -> bool:
        raise NotImplementedError

    def find_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def model_id(self) -> str | None:
        """The checkpoint this model was loaded from (hub id or local folder), when known."""
        return None

    def check_block(self, block: nn.Module) -> None:
        """Raise TypeError if a block is not of the structure this adapter re-implements."""
        raise NotImplementedError

    def encoder_info(self) -> EncoderInfo:
        raise NotImplementedError

    def attention(
        self, block: nn.Module, h: torch.Tensor, bias: torch.Tensor | None, needs: frozenset[Signal]
    ) -> tuple[torch.Tensor, Signals]:
        """The block's attention on normalised batch-first tokens, before its residual scaling."""
        raise NotImplementedError

    def attention_residual(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The attention branch's output scaling (LayerScale, drop-path) before it joins the residual."""
        raise NotImplementedError

    def mlp_branch(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pre_attention_norm(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_forward(self, index: int, block: nn.Module, original: Callable, *args, **kwargs) -> torch.Tensor:
        """The block's patched forward (same signature as its own): checks the arguments, handles
        the family's layout and calls :meth:`run_block`."""
        raise NotImplementedError

    def patch_pooling(self) -> None:
        """Make pooling after the blocks size-aware (average and attention pooling)."""

    def grid_feature_methods(self) -> list[tuple[nn.Module, str]]:
        """Methods that reshape block outputs to the full patch grid (refused while reducing)."""
        return []

    def attention_heads(self, block: nn.Module) -> tuple[int, int]:
        """(heads, head_dim) of a block's attention."""
        raise NotImplementedError

    def branches(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(attention module, MLP module) of a block, for per-token FLOP counting."""
        raise NotImplementedError

    def stem_conv(self) -> nn.Conv2d:
        """The patch-embedding convolution (its output width is the token width)."""
        raise NotImplementedError

    def stem_flops(self) -> int:
        """FLOPs of the patch embedding for one image (one MAC per weight per patch, x2)."""
        conv = self.stem_conv()
        rows, cols = self.info.grid
        return 2 * rows * cols * conv.weight.numel()

    def encode_pixels(self, pixels: torch.Tensor) -> TokenState:
        """Run the patched encoder on ``pixels`` the way its library does; the state after its
        last block."""
        model = self.model
        if hasattr(model, "encode_image"):
            model.encode_image(pixels)
        elif hasattr(model, "get_image_features"):
            model.get_image_features(pixel_values=pixels)
        elif type(model).__module__.startswith("transformers."):
            model(pixel_values=pixels)
        else:
            model(pixels)
        if self.state is None:
            raise RuntimeError(f"the {self.family} encoder ran no patched block on these pixels")
        return self.state

    def run_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the model does after its blocks (final norm excluded where it is per token)."""
        raise NotImplementedError

    def head_flops(self, num_tokens: int) -> int:
        """FLOPs after the blocks for one image with ``num_tokens`` unit-size tokens, counted by
        ``torch.utils.flop_counter`` on a dummy input (pooling heads are small and varied)."""
        parameter = next(self.model.parameters())
        dummy = torch.zeros(1, num_tokens, self.stem_conv().out_channels, device=parameter.device, dtype=parameter.dtype)
        saved, self.state = self.state, None
        try:
            with torch.no_grad():
                return counted_flops(lambda: self.run_head(dummy))
        finally:
            self.state = saved

    # ----- shared machinery ---------------------------------------------------------------------
    def install(self) -> None:
        """Patch every block and the pooling; on any failure nothing stays patched."""
        try:
            for index, block in enumerate(self.blocks):
                self._patcher.set(block, "forward", functools.partial(self.block_forward, index, block, block.forward))
            self.patch_pooling()
            for owner, name in self.grid_feature_methods():
                self._patcher.set(owner, name, functools.partial(self._refuse_grid_features, name, getattr(owner, name)))
        except BaseException:
            self._patcher.restore()
            raise

    def _refuse_grid_features(self, name: str, original: Callable, *args, **kwargs):
        if any(budget is not None for budget in self.plan):
            raise ValueError(
                f"vtc: {name}() reshapes block outputs to the full patch grid, which a reduced sequence no "
                f"longer fills; read handle.state (vtc.merge.unmerge gives full-length features) or remove the reducer"
            )
        return original(*args, **kwargs)

    def remove(self) -> None:
        """Undo every patch; the last forward's state and counts stay readable."""
        self._patcher.restore()

    def runtime_grid(self, num_tokens: int) -> tuple[int, int] | None:
        patches = num_tokens - self.info.n_prefix
        rows, cols = self.info.grid
        if patches == rows * cols:
            return self.info.grid
        side = int(round(patches**0.5))
        return (side, side) if side * side == patches else None

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor, original: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run block ``index`` on batch-first ``x`` with the reducer's budget for that layer."""
        if index == 0 or self.state is None:
            self.state = TokenState.start(x, self.info.n_prefix, self.runtime_grid(x.shape[1]))
            self.token_counts, self._image_counts = [], []
        elif self.state.x.shape[:2] != x.shape[:2]:
            raise RuntimeError(
                f"vtc: block {index} received {tuple(x.shape[:2])} tokens but the previous block produced "
                f"{tuple(self.state.x.shape[:2])}; the reduced blocks must run in order within one forward"
            )
        state = self.state.replace(x=x)
        self.token_counts.append(x.shape[1])
        self._image_counts.append(state.real_counts())
        budget = self.plan[index]
        extra = self.extra_needs.get(index, frozenset())
        if budget is None and not state.needs_attention_bias() and not extra:
            out = original(x)
        else:
            needs = (self.reducer.needs_for(budget) if budget is not None else frozenset()) | extra
            packing = self.packing(state)  # the batch's real tokens as one sequence, or None: as it is
            h = x if packing is None else packing.pack(x)
            keys = state.attention_bias(x.dtype) if packing is None else packing
            attn_out, signals = self.attention(block, self.pre_attention_norm(block, h), keys, needs)
            h = h + self.attention_residual(block, attn_out)
            if packing is not None:
                signals = packing.unpack_signals(signals)
            if extra:
                self.signals[index] = signals
            if budget is not None:
                before = state
                state = self.reducer.reduce(state.replace(x=h if packing is None else packing.unpack(h)), signals, budget, index)
                if extra:
                    self.signals[index] = self.carry_signals(signals, extra, before, state)
                packing = self.packing(state)
                h = state.x if packing is None else packing.pack(state.x)
            h = h + self.mlp_branch(block, h)
            out = h if packing is None else packing.unpack(h)
        self.state = state.replace(x=out)
        if index == len(self.blocks) - 1:
            self.token_counts.append(out.shape[1])
            self._image_counts.append(self.state.real_counts())
        return out

    def packing(self, state: TokenState) -> Packing | None:
        """How to run the real tokens of a batch with padding packed (None: run it as it is)."""
        if state.valid is None or self.execution == "padded":
            return None
        bias = None
        if state.prop_attn and state.size is not None:
            bias = state.size.to(torch.promote_types(state.x.dtype, torch.float32)).log()
        return Packing.of(state.valid, bias, backend=self.execution)

    @staticmethod
    def carry_signals(signals: Signals, extra: frozenset[Signal], before: TokenState, after: TokenState) -> Signals:
        """The signals another site asked of a block that also reduces, for the tokens leaving it
        (the CLS attention row summed over each token's sources, :func:`carry_scores`)."""
        if extra - {Signal.CLS_ATTN}:
            raise ValueError(f"vtc: signals {sorted(s.value for s in extra - {Signal.CLS_ATTN})} cannot follow a "
                             f"reduction in the same block; only the CLS attention row can")
        return Signals(cls_attn=carry_scores(signals.cls_attn, before.origin, after.origin, after.num_tokens))

    @property
    def image_token_counts(self) -> torch.Tensor | None:
        """(B, L + 1) real tokens of every image entering each block of the last forward, then
        leaving the last one (padding excluded: per-image counts under DyMU)."""
        if len(self._image_counts) != len(self.blocks) + 1:
            return None
        return torch.stack(self._image_counts, dim=1).cpu()

    def current_state(self, x: torch.Tensor) -> TokenState | None:
        """The state matching tokens ``x`` after the blocks, or None if they do not belong to it."""
        state = self.state
        if state is None or state.x.shape[:2] != x.shape[:2]:
            return None
        return state
