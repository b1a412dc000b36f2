"""The loop both harnesses share: every batch of a folder through the unreduced model and through
each reducer spec in turn (applied and removed around the batch, so pictures are read once), then
each spec timed on one batch in an interleaved loop with an unreduced copy of the model."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vtc.apply import apply
from vtc.harness.errors import HarnessError
from vtc.harness.images import Transform, batches
from vtc.harness.rows import UNREDUCED, HarnessRow
from vtc.measure import image_flops, patch_tokens, time_calls

Predict = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, pixels) -> the predicted class of each image


@dataclass(frozen=True)
class HarnessConfig:
    """How a harness runs. Pixels go to the device and dtype of the model's parameters."""

    batch_size: int = 32  # images per forward
    repeats: int = 10  # timed forwards of the first batch per configuration (0: no timing)
    warmup: int = 1  # untimed forwards before them
    progress: bool = False  # a progress bar over the batches

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.repeats < 0 or self.warmup < 0:
            raise ValueError(f"batch_size must be >= 1, repeats and warmup >= 0; got {self.batch_size}, {self.repeats}, "
                             f"{self.warmup}")


def check_specs(model: nn.Module, specs: Sequence[str]) -> None:
    """Apply and remove each spec once: a spec the model cannot take fails here, before any image is read."""
    for spec in specs:
        try:
            apply(model, spec).remove()
        except (TypeError, ValueError) as error:
            raise HarnessError(f"reducer {spec!r}: {error}") from None


@dataclass
class _Tally:
    predictions: list[int] = field(default_factory=list)
    tokens: float = 0.0  # summed over images
    flops: float = 0.0  # summed over images

    def add(self, predicted: torch.Tensor, handle) -> None:
        self.predictions += predicted.tolist()
        self.tokens += sum(patch_tokens(handle))
        self.flops += image_flops(handle) * predicted.shape[0]


def _throughputs(model: nn.Module, x: torch.Tensor, specs: Sequence[str], predict: Predict,
                 config: HarnessConfig) -> tuple[float, list[tuple[float, float]]]:
    """Images/s of the unreduced model (median over every loop it ran in) and, per spec, (reduced,
    unreduced) images/s from one interleaved loop of the spec and an unreduced copy of the model."""
    if not specs:
        (alone,) = time_calls([lambda: predict(model, x)], config.warmup, config.repeats, x.device)
        return x.shape[0] / alone.median, []
    baseline, pairs, reference_samples = copy.deepcopy(model), [], []
    for spec in specs:
        with apply(model, spec):
            reduced, reference = time_calls([lambda: predict(model, x), lambda: predict(baseline, x)],
                                            config.warmup, config.repeats, x.device)
        pairs.append((x.shape[0] / reduced.median, x.shape[0] / reference.median))
        reference_samples += reference.samples
    return x.shape[0] / statistics.median(reference_samples), pairs


def side_by_side(model: nn.Module, samples: Sequence[tuple[Path, int]], transform: Transform, specs: Sequence[str],
                 predict: Predict, config: HarnessConfig) -> list[HarnessRow]:
    """One row for the unreduced model, then one per spec: accuracy on ``samples`` (image file,
    label), agreement with the unreduced predictions, tokens, FLOPs and throughput."""
    check_specs(model, specs)
    parameter = next(model.parameters())
    configurations = [(), *((spec,) for spec in specs)]
    tallies = [_Tally() for _ in configurations]
    labels: list[int] = []
    first = None
    total = -(-len(samples) // config.batch_size)
    with torch.inference_mode():
        for pixels, batch_labels in tqdm(batches(samples, transform, config.batch_size), total=total, unit="batch",
                                         desc="evaluating", disable=not config.progress):
            x = pixels.to(parameter.device, parameter.dtype)
            first = x if first is None else first
            labels += batch_labels.tolist()
            for reducers, tally in zip(configurations, tallies):
                with apply(model, *reducers) as handle:
                    tally.add(predict(model, x).cpu(), handle)
    if first is None:
        raise HarnessError("no images to evaluate")
    speeds: list[tuple[float | None, float | None]] = [(None, None)] * len(configurations)
    if config.repeats:
        unreduced, pairs = _throughputs(model, first, specs, predict, config)
        speeds = [(unreduced, unreduced), *pairs]
    reference, n = tallies[0], len(labels)
    return [HarnessRow(spec=spec, images=n, correct=sum(p == t for p, t in zip(tally.predictions, labels)),
                       agreeing=sum(p == r for p, r in zip(tally.predictions, reference.predictions)),
                       visual_tokens=tally.tokens / n, flops=tally.flops / n, reference_flops=reference.flops / n,
                       throughput=speed, reference_throughput=reference_speed, predictions=tally.predictions)
            for spec, tally, (speed, reference_speed) in zip([UNREDUCED, *specs], tallies, speeds)]
