"""Packed (variable-length) execution of a padded batch: only real tokens are computed.

A batch whose images keep different token counts (DyMU's thresholds, any reducer that leaves
``TokenState.valid``) is stored padded to its widest image. Token-wise layers (norms,
projections, MLPs) then pay for the padding, and so does attention (every image attends at the
batch's width). :class:`Packing` gathers the real tokens of every image into one (1, T, ...)
sequence (image after image, each in its own order) and scatters results back; attention on the
packed sequence is block-diagonal, one block per image (:func:`varlen_attention`).

Attention backends (``backend``):

- ``"split"``: one SDPA call per image. On a CPU this is the fastest exact form (measured in
  BENCHMARKS.md "Packed execution"): per-call overhead is small next to a ViT block's work.
- ``"nested"``: one SDPA call on nested jagged tensors, which CUDA runs with its variable-length
  fused kernels. Those take no mask, so an additive per-key bias (``log(size)`` of proportional
  attention) is folded into the dot product: queries get one extra component 1 and keys the
  bias divided by the softmax scale (padded to a multiple of 8 for the fused kernels), which
  adds exactly ``bias_j`` to every logit of key ``j``. On a CPU nested SDPA falls back to a slow
  reference path; it runs there only in tests.
- ``"auto"``: ``nested`` on CUDA, ``split`` elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtc.sites import Signals

BACKENDS = ("auto", "split", "nested")


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded (B, N) batch are, and how to move between layouts.

    Attributes:
        index: (T,) flat positions (``b * N + n``) of the real tokens, image by image.
        padding: flat positions of the padding.
        lengths: real tokens per image.
        width: N, the padded length.
        key_bias: (T,) additive attention bias of every real key (``log(size)`` under proportional
            attention), or None.
        backend: attention backend, one of :data:`BACKENDS`.
    """

    index: torch.Tensor
    padding: torch.Tensor
    lengths: tuple[int, ...]
    width: int
    key_bias: torch.Tensor | None = None
    backend: str = "auto"

    @classmethod
    def of(cls, valid: torch.Tensor, key_bias: torch.Tensor | None = None, backend: str = "auto") -> Packing:
        """The packing of a (B, N) ``valid`` mask; ``key_bias`` (B, N) is packed with it."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        flat = valid.reshape(-1)
        index, padding = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        lengths = tuple(valid.sum(dim=1).tolist())
        if min(lengths) < 1:
            raise ValueError("vtc: an image of a packed batch has no real token")
        bias = None if key_bias is None else key_bias.reshape(-1)[index]
        return cls(index=index, padding=padding, lengths=lengths, width=valid.shape[1], key_bias=bias, backend=backend)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) -> (1, T, ...): the real tokens, image after image."""
        return x.reshape(self.batch * self.width, *x.shape[2:])[self.index].unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(1, T, ...) -> (B, N, ...): real tokens back in place, zeros on the padding."""
        values = packed.squeeze(0)
        out = values.new_empty(self.batch * self.width, *values.shape[1:])
        out[self.index] = values
        out[self.padding] = 0  # only the padding is cleared: no second pass over the real tokens
        return out.reshape(self.batch, self.width, *values.shape[1:])

    def unpack_signals(self, signals: Signals) -> Signals:
        """Signals computed on the packed sequence, in the padded layout the reducers read."""
        return Signals(**{field.name: None if getattr(signals, field.name) is None else self.unpack(getattr(signals, field.name))
                          for field in dataclasses.fields(signals)})

    def segments(self, device: torch.device) -> torch.Tensor:
        """(T,) the image of every packed token."""
        return torch.repeat_interleave(torch.arange(self.batch, device=device),
                                       torch.tensor(self.lengths, device=device))

    def starts(self, device: torch.device) -> torch.Tensor:
        """(B,) the packed position of every image's first token."""
        lengths = torch.tensor(self.lengths, device=device)
        return lengths.cumsum(0) - lengths


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing,
                     scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Block-diagonal attention over packed (1, H, T, d) heads: every image attends to its own
    tokens only, with the packing's per-key bias. Equals SDPA on the padded batch with its
    padding masked, up to rounding."""
    backend = packing.backend
    if backend == "auto":
        backend = "nested" if q.is_cuda else "split"
    if backend == "nested":
        return _nested_attention(q, k, v, packing, scale, dropout_p)
    outputs = []
    bias = packing.key_bias
    start = 0
    for length in packing.lengths:
        part = slice(start, start + length)
        mask = None if bias is None else bias[part].to(q.dtype)[None, None, None, :]
        outputs.append(F.scaled_dot_product_attention(q[:, :, part], k[:, :, part], v[:, :, part], attn_mask=mask,
                                                      dropout_p=dropout_p, scale=scale))
        start += length
    return torch.cat(outputs, dim=2)


def _nested_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing,
                      scale: float | None, dropout_p: float) -> torch.Tensor:
    heads, total, dim = q.shape[1:]
    scale = dim**-0.5 if scale is None else scale
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (T, H, d); nested SDPA needs them contiguous
    if packing.key_bias is not None:  # q.k + 1 * bias / scale, times scale = q.k scale + bias
        extra = 8
        q = torch.cat([q, q.new_ones(total, heads, 1), q.new_zeros(total, heads, extra - 1)], dim=-1)
        column = (packing.key_bias.float() / scale).to(k.dtype)[:, None, None].expand(total, heads, 1)
        k = torch.cat([k, column, k.new_zeros(total, heads, extra - 1)], dim=-1)
        v = torch.cat([v, v.new_zeros(total, heads, extra)], dim=-1)
    offsets = torch.tensor((0, *packing.lengths), device=q.device).cumsum(0)
    nested = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*nested, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).values()[..., :dim].transpose(0, 1).unsqueeze(0)


def segment_softmax(logits: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    """Softmax of (..., T) logits within each segment (``segments`` (T,) in [0, count))."""
    index = segments.expand_as(logits)
    peak = logits.new_full((*logits.shape[:-1], count), float("-inf")).scatter_reduce(-1, index, logits, "amax")
    weights = (logits - peak.gather(-1, index)).exp()
    total = weights.new_zeros(peak.shape).scatter_add(-1, index, weights)
    return weights / total.gather(-1, index)
