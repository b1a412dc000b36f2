"""Evaluate reducers on a vision model whose forward gives logits (timm) or embeddings (open_clip
``encode_image``, HF CLIP through ``forward=``): agreement of the top-1 output with the unreduced
model, KL and cosine of the outputs, accuracy against labels, analytic FLOPs per image."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vtc.apply import apply
from vtc.measure import image_flops, patch_tokens, time_calls
from vtc.tune.evaluator import ModelEvaluator, Outputs, check_examples, digest, weights_digest

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _model_call(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


class ClassifierEvaluator(ModelEvaluator):
    """Reducers on ``model`` (anything :func:`vtc.apply` supports) over ``images`` (N, 3, H, W).

    ``forward(model, images)`` gives the compared output (default ``model(images)``; e.g.
    ``lambda m, x: m.encode_image(x)`` for open_clip); its top-1 is the prediction (meaningful
    for logits; for embeddings rely on ``cosine``). ``labels`` (N class indices) add accuracy.
    ``repeats > 0`` times the first batch side by side with an unreduced copy of the model
    (:func:`vtc.measure.time_calls`). ``name`` describes the model in the results file's setup.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: Sequence[int] | torch.Tensor | None = None,
                 forward: Forward | None = None, batch_size: int = 64, repeats: int = 0, warmup: int = 1,
                 name: str | None = None) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise TypeError(f"images must be one (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
        check_examples(images.shape[0], "ClassifierEvaluator", labels=labels)
        self.model, self.images, self.forward = model, images, forward or _model_call
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._baseline: nn.Module | None = None
        setup = {"evaluator": "classifier", "model": name or type(model).__qualname__, "weights": weights_digest(model),
                 "images": digest([images.detach().float().cpu().contiguous().numpy().tobytes()]),
                 "forward": getattr(forward, "__qualname__", "model(images)") if forward else "model(images)",
                 "device": self.device.type, "dtype": str(self.dtype)}
        super().__init__(None if labels is None else [int(label) for label in labels], repeats, warmup, batch_size, setup)

    def _batches(self):
        for start in range(0, self.images.shape[0], self.batch_size):
            yield self.images[start:start + self.batch_size].to(self.device, self.dtype)

    def run(self, specs: tuple[str, ...]) -> Outputs:
        outputs, tokens, flops = [], [], 0.0
        with torch.inference_mode(), apply(self.model, *specs) as handle:
            for x in self._batches():
                outputs.append(self.forward(self.model, x).float().flatten(1).cpu())
                tokens += patch_tokens(handle)
                flops += image_flops(handle) * x.shape[0]
        logits = torch.cat(outputs)
        return Outputs(logits.argmax(-1).tolist(), tokens, flops / len(tokens), logits)

    def time(self, specs: tuple[str, ...]) -> tuple[float, float]:
        if self._baseline is None:
            self._baseline = copy.deepcopy(self.model)
        x, model, baseline = next(self._batches()), self.model, self._baseline
        with apply(model, *specs):
            reduced, reference = time_calls([lambda: self.forward(model, x), lambda: self.forward(baseline, x)],
                                            self.warmup, self.repeats, self.device)
        return reduced.median * 1e3, reference.median * 1e3
