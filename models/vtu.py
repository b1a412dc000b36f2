"""Virtual token unmerging inside an HF decoder-only LM (DyMU paper, Wang et al., 2025, Sec. 3.2;
the official code's default path, ``llava_llama.py``: expand Q/K/V, then SDPA).

The LM is handed the *full-length* prompt (every placeholder filled with the merged token that
covers it), so HF's own code builds the causal/padding mask, the rotary tables for the original
positions and the cache positions, and ``generate`` keeps its bookkeeping. Instance patches then:

- layer 0 compresses the hidden states to one row per unique token (group mean; exact, copies
  are identical), every layer runs its norms and MLP on those rows;
- each attention projects Q/K/V for unique rows only, expands them to the full positions
  (``expand``) or forms the logits from unique rows (``exact``, :func:`vtc.reducers.dymu.unmerge.rope_logits`),
  writes full-length rotated K/V to the cache, attends with the model's mask, and averages the
  outputs of each token's copies back into its row;
- the last layer expands its rows back to full length, so the final norm and LM head see one row
  per position and ``forward`` logits line up with the input (the last position's logits are
  those of its own group, not of whichever group comes last).

Hidden states HF records between layers (``output_hidden_states``) have one row per unique token.
Only the prefill of a prompt with images is virtual; decode steps (and calls without a map) run
the stock code on the full-length cache. Attention modules must be Llama-like (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``head_dim``, rotate-half RoPE from their modeling module).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vtc.models.patching import InstancePatcher
from vtc.reducers.dymu.unmerge import exact_attention, expand, group_mean

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class VirtualMap:
    """One prefill's map: ``pi`` (B, T) unique row of every position, ``unique`` (B,) rows per sample."""

    pi: torch.Tensor
    unique: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.unique.max()) if self.unique.numel() else 0


@dataclass
class _Pass:
    map: VirtualMap
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


class VirtualUnmergeSite:
    """VTU in one LM. ``capture`` (a set of layer indices) keeps each such layer's attention
    output at full length, before the copies are averaged (``captured``), for inspection."""

    def __init__(self, language_model: nn.Module, mode: str, patcher: InstancePatcher) -> None:
        layers = getattr(language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"vtc: {type(language_model).__name__} is not an HF decoder-only model with .layers")
        for layer in layers:
            attention = getattr(layer, "self_attn", None)
            modeling = sys.modules.get(type(attention).__module__)
            missing = [name for name in (*_PROJECTIONS, "head_dim", "layer_idx", "scaling", "config") if not hasattr(attention, name)]
            missing += [name for name in ("apply_rotary_pos_emb", "rotate_half", "eager_attention_forward")
                        if not hasattr(modeling, name)]
            if attention is None or missing:
                raise TypeError(
                    f"vtc: virtual unmerging needs Llama-like attention (q/k/v/o projections, head_dim, rotate-half "
                    f"RoPE); {type(attention).__name__} lacks {', '.join(missing)}"
                )
        self.model, self.mode, self.patcher = language_model, mode, patcher
        self.capture: set[int] = set()
        self.captured: dict[int, torch.Tensor] = {}
        self.unique_rows: torch.Tensor | None = None  # (B,) unique rows of the last virtual prefill
        self._map: VirtualMap | None = None
        self._pass: _Pass | None = None

    def install(self) -> None:
        try:
            for j, layer in enumerate(self.model.layers):
                self.patcher.set(layer, "forward", functools.partial(self._layer_forward, j, layer.forward))
                attention = layer.self_attn
                self.patcher.set(attention, "forward", functools.partial(self._attention_forward, attention, attention.forward))
        except BaseException:
            self.patcher.restore()
            raise

    def set_map(self, virtual: VirtualMap | None) -> None:
        self._map = virtual

    # ----- patched forwards ------------------------------------------------------------------------
    def _begin(self, hidden: torch.Tensor, cache: Any) -> _Pass | None:
        virtual = self._map
        if virtual is None or (cache is not None and cache.get_seq_length() > 0):
            return None
        pi, unique = virtual.pi.to(hidden.device), virtual.unique.to(hidden.device)
        batch, length = hidden.shape[:2]
        if pi.shape[0] != batch and batch % pi.shape[0] == 0:  # generate expanded the batch (beams, samples)
            pi, unique = pi.repeat_interleave(batch // pi.shape[0], 0), unique.repeat_interleave(batch // pi.shape[0], 0)
        if pi.shape[0] != batch or pi.shape[1] > length:
            raise ValueError(f"vtc: the virtual map has shape {tuple(pi.shape)} but the prefill input is {(batch, length)}")
        if pi.shape[1] < length:  # a longer sequence recomputed without a cache: the new tokens are text
            extra = length - pi.shape[1]
            pi = torch.cat([pi, unique[:, None] + torch.arange(extra, device=pi.device)], 1)
            unique = unique + extra
        self.unique_rows = unique.cpu()
        return _Pass(VirtualMap(pi, unique))

    def _layer_forward(self, j: int, original: Callable, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if j == 0:
            self._pass = self._begin(hidden_states, kwargs.get("cache", kwargs.get("past_key_values")))
        p = self._pass
        if p is None:
            return original(hidden_states, *args, **kwargs)
        if j == 0:
            hidden_states = group_mean(hidden_states, p.map.pi, p.map.width)
        out = original(hidden_states, *args, **kwargs)
        if j == len(self.model.layers) - 1:
            self._pass, self.captured = None, p.captured
            h = out[0] if isinstance(out, tuple) else out
            h = expand(h, p.map.pi)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return out

    def _attention_forward(self, module: nn.Module, original: Callable, hidden_states: torch.Tensor,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                           attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs: Any) -> Any:
        p = self._pass
        if p is None:
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                            cache=cache, **kwargs)
        pi = p.map.pi
        batch, width = hidden_states.shape[:2]
        length = pi.shape[1]

        def heads(projection: nn.Module, norm: nn.Module | None = None) -> torch.Tensor:
            x = projection(hidden_states).view(batch, width, -1, module.head_dim)
            if norm is not None:  # qk-norm (Qwen3-style), per head before RoPE
                x = norm(x)
            return x.transpose(1, 2)

        q = heads(module.q_proj, getattr(module, "q_norm", None))
        k = heads(module.k_proj, getattr(module, "k_norm", None))
        v = heads(module.v_proj)
        cos, sin = position_embeddings
        modeling = sys.modules[type(module).__module__]
        rope = modeling.apply_rotary_pos_emb
        q_full, k_full = rope(expand(q, pi, 2), expand(k, pi, 2), cos, sin)
        v_full = expand(v, pi, 2)
        if cache is not None:  # what the full-length model would cache, so decoding is standard
            k_full, v_full = cache.update(k_full, v_full, module.layer_idx)
        if self.mode == "expand":
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, modeling.eager_attention_forward)
            out, _ = interface(module, q_full, k_full, v_full, attention_mask, dropout=0.0, scaling=module.scaling, **kwargs)
        else:
            if attention_mask is not None and attention_mask.dim() != 4:
                raise TypeError("vtc: exact virtual unmerging needs a 4-D attention mask (sdpa or eager attention)")
            groups = q.shape[1] // k.shape[1]
            k_un, v_un = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            out = exact_attention(q, k_un, v_un, cos, sin, pi, attention_mask, module.scaling).transpose(1, 2)
        out = out.reshape(batch, length, -1)
        if module.layer_idx in self.capture:
            p.captured[module.layer_idx] = module.o_proj(out)
        return module.o_proj(group_mean(out, pi, width)), None
