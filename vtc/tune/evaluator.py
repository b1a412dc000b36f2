"""The evaluator protocol and what the built-in evaluators share: the unreduced run computed once,
a point assembled from a run beside it, optional side-by-side timing, and fingerprints of the
model and data for the setup a results file is tied to."""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from vtc.measure import fidelity
from vtc.tune.points import Point


class Evaluator(Protocol):
    """Measures reducer specs (``[]``: the unreduced model; several: sites that compose, e.g.
    ``["tome:r=4", "holov:k=64"]``) against the unreduced model on fixed examples."""

    setup: dict[str, Any]  # JSON-able description of model, data and settings; a results file is tied to it

    def __call__(self, specs: Sequence[str]) -> Point: ...


@dataclass
class Outputs:
    """One run over an evaluator's examples, before it is compared with the unreduced run."""

    predictions: list  # per example: a class index or an answer text
    tokens: list[int]  # visual tokens per image
    flops: float  # per image
    logits: torch.Tensor | None = None  # (examples, outputs) float, for kl and cosine


def assemble(specs: tuple[str, ...], run: Outputs, reference: Outputs, labels: Sequence | None,
             latency: tuple[float, float] | None) -> Point:
    """The :class:`Point` of ``run`` beside the unreduced ``reference`` (and ``labels``);
    ``latency`` is (reduced, unreduced) milliseconds per batch timed side by side."""
    kl = cosine = None
    if run.logits is not None and reference.logits is not None:
        measured = fidelity(reference.logits, run.logits)
        kl, cosine = measured.kl, measured.cosine
    return Point(
        specs=specs,
        examples=len(run.predictions),
        visual_tokens=statistics.fmean(run.tokens),
        visual_tokens_std=statistics.pstdev(run.tokens),
        flops=run.flops,
        flops_ratio=run.flops / reference.flops,
        agreeing=sum(a == b for a, b in zip(run.predictions, reference.predictions)),
        correct=None if labels is None else sum(p == t for p, t in zip(run.predictions, labels)),
        kl=kl,
        cosine=cosine,
        latency_ms=None if latency is None else latency[0],
        reference_latency_ms=None if latency is None else latency[1],
    )


def digest(chunks: Iterable[bytes]) -> str:
    """A short sha256 of byte chunks."""
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """A fingerprint of a model's weights: every tensor's name, shape, dtype and first 256 values
    (cheap on a large model; a different checkpoint differs in them)."""
    return digest(f"{name}{tuple(t.shape)}{t.dtype}".encode() + t.detach().flatten()[:256].float().cpu().numpy().tobytes()
                  for name, t in model.state_dict().items())


def check_examples(count: int, what: str, **per_example: Sized | None) -> None:
    """ValueError for no examples or for per-example lists of another length."""
    if count == 0:
        raise ValueError(f"{what} needs at least one example; got an empty set of images")
    for name, values in per_example.items():
        if values is not None and len(values) != count:
            raise ValueError(f"{what}: {len(values)} {name} for {count} images; give one per image")


class ModelEvaluator:
    """Base of the built-in evaluators: ``run(specs)`` gives :class:`Outputs`, ``time(specs)`` the
    (reduced, unreduced) milliseconds of one batch timed side by side; the unreduced run is cached."""

    def __init__(self, labels: Sequence | None, repeats: int, warmup: int, batch_size: int, setup: dict[str, Any]) -> None:
        if batch_size < 1 or repeats < 0 or warmup < 0:
            raise ValueError(f"batch_size must be >= 1, repeats and warmup >= 0; got {batch_size}, {repeats}, {warmup}")
        self.labels = None if labels is None else list(labels)
        self.repeats, self.warmup, self.batch_size = repeats, warmup, batch_size
        self.setup = {**setup, "labels": None if labels is None else digest([repr(self.labels).encode()]),
                      "batch_size": batch_size, "repeats": repeats, "warmup": warmup if repeats else None}
        self._reference: Outputs | None = None

    def run(self, specs: tuple[str, ...]) -> Outputs:
        raise NotImplementedError

    def time(self, specs: tuple[str, ...]) -> tuple[float, float]:
        raise NotImplementedError

    def __call__(self, specs: Sequence[str]) -> Point:
        specs = tuple(specs)
        if self._reference is None:
            self._reference = self.run(())
        outputs = self.run(specs) if specs else self._reference
        return assemble(specs, outputs, self._reference, self.labels, self.time(specs) if self.repeats else None)
