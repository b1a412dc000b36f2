"""Accuracy on :mod:`vtc.data.shapes`: exact-match answers of a VLM, digit accuracy of a classifier,
both split by question type. Works with or without reducers applied (the model's own
``generate`` / forward does the work)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from vtc.answer import answer
from vtc.data import shapes
from vtc.data.training import pixels
from vtc.stats import wilson

ANSWER_TOKENS = 2  # tokens generated per shapes answer: the word and </s>


@dataclass
class Scores:
    """Predictions beside the truth; accuracy overall and per question type."""

    qtypes: list[str]
    truth: list[str]
    predicted: list[str]

    @property
    def correct(self) -> list[bool]:
        return [p == t for p, t in zip(self.predicted, self.truth)]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.truth))

    def by_type(self) -> dict[str, float]:
        out = {}
        for qtype in dict.fromkeys(self.qtypes):
            hits = self.correct_of(qtype)
            out[qtype] = sum(hits) / len(hits)
        return out

    def correct_of(self, qtype: str | None = None) -> list[bool]:
        """Per-example correctness, of one question type or of all."""
        return [c for c, q in zip(self.correct, self.qtypes) if qtype is None or q == qtype]

    def interval(self, qtype: str | None = None) -> tuple[float, float]:
        """95% Wilson interval of the accuracy, overall or of one question type."""
        hits = self.correct_of(qtype)
        return wilson(sum(hits), len(hits))

    def agreement(self, other: Scores) -> float:
        """Fraction of examples where both give the same prediction (fidelity to ``other``)."""
        if other.truth != self.truth:
            raise ValueError("agreement needs scores on the same examples")
        return sum(a == b for a, b in zip(self.predicted, other.predicted)) / max(1, len(self.truth))


def vlm_scores(model: nn.Module, processor, batch: Sequence[shapes.Example], batch_size: int = 50) -> Scores:
    """Greedy exact-match answers of a shapes VLM to each example's prompt."""
    predicted = answer(model, processor, [Image.fromarray(e.image) for e in batch], [e.prompt for e in batch],
                       max_new_tokens=ANSWER_TOKENS, batch_size=batch_size)
    return Scores([e.qtype for e in batch], [e.answer for e in batch], predicted)


@dataclass
class ExitScores:
    """Scores under a decoder-site exit, with what each example's prefill kept."""

    scores: Scores
    exit_layers: list[int]  # per example: the last LLM layer that saw its image tokens
    kept: torch.Tensor  # (examples, L + 1): real tokens entering each LLM layer, then leaving the last

    @property
    def mean_exit_layer(self) -> float:
        return sum(self.exit_layers) / max(1, len(self.exit_layers))


def exit_scores(model: nn.Module, processor, batch: Sequence[shapes.Example], batch_size: int = 50) -> ExitScores:
    """:func:`vlm_scores` of a LLaVA with a decoder-site reducer applied (``exit``, ``dyvte``), and
    per example its exit layer and the tokens each LLM layer ran on in its prefill."""
    from vtc.apply import active_handle

    handle = active_handle(model)
    if handle is None or handle.adapter.decoder is None:
        raise ValueError("exit_scores needs a model with a decoder-site reducer applied (exit, dyvte)")
    predicted, exits, kept = [], [], []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        predicted += answer(model, processor, [Image.fromarray(e.image) for e in chunk], [e.prompt for e in chunk],
                            max_new_tokens=ANSWER_TOKENS)
        exits += handle.exit_layers
        kept.append(handle.adapter.decoder.kept_per_row.cpu())
    scores = Scores([e.qtype for e in batch], [e.answer for e in batch], predicted)
    return ExitScores(scores, exits, torch.cat(kept))


@torch.inference_mode()
def classifier_scores(model: nn.Module, batch: Sequence[shapes.Example], batch_size: int = 100) -> Scores:
    """Digit predictions of a shapes classifier (the classification view)."""
    parameter = next(model.parameters())
    predicted = []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        predicted += model(pixels([e.image for e in chunk]).to(parameter.device, parameter.dtype)).argmax(-1).tolist()
    return Scores(["digit"] * len(batch), [str(e.label) for e in batch], [str(p) for p in predicted])
