"""DyMU on a model: threshold calibration (DyMU paper, Sec. 3.1) and token counts.

:func:`calibrate` runs a frozen encoder over calibration images with a per-layer merge budget
``r_l`` (from a target average token count and a schedule, :func:`merge_schedule`), applying
:class:`~vtc.reducers.dymu.calibration.CalibrationRecorder`; a layer's threshold is the mean over
batches (and over processes with ``accelerate``). The result, a :class:`Calibration`, is saved in a
folder and used by ``vtc.DyMU(calibration=folder)`` or, for shipped models, ``"dymu:preset=low"``.
The method itself (reducer, thresholds, calibration files, virtual unmerging) lives in
:mod:`vtc.reducers.dymu`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtc.apply import apply, run_encoder
from vtc.models.zoo import CHECKPOINTS
from vtc.reducers.dymu import DyMU
from vtc.reducers.dymu.calibration import (
    CONFIG,
    PRESETS,
    SCHEDULES,
    TENSORS,
    Calibration,
    CalibrationRecorder,
    MergeScheduleError,
    merge_schedule,
)
from vtc.reducers.dymu.calibration import load_calibration as _load

__all__ = ["CONFIG", "PRESETS", "SCHEDULES", "TENSORS", "Calibration", "MergeScheduleError", "calibrate",
           "load_calibration", "merge_schedule", "token_counts"]


def load_calibration(name_or_path: str | Path) -> Calibration:
    """A calibration from a folder, or by name ``<model>/<preset>`` among the shipped ones."""
    return _load(name_or_path, CHECKPOINTS)


def _batches(images: torch.Tensor | Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"calibration images must be (N, C, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    for batch in images:
        if isinstance(batch, dict):
            batch = batch["pixel_values"]
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        yield batch


def token_counts(model: nn.Module, reducer, images, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """(images,) patch tokens (prefix excluded) leaving the encoder's last block under ``reducer``."""
    counts = []
    with torch.inference_mode(), apply(model, reducer) as handle:
        n_prefix = handle.adapter.info.n_prefix
        for pixels in _progress(_batches(images, batch_size), progress, "dymu tokens"):
            counts.append(run_encoder(handle, pixels).real_counts().cpu() - n_prefix)
    return torch.cat(counts)


def _progress(batches: Iterable, enabled: bool, what: str) -> Iterable:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=what, unit="batch")


def calibrate(
    model: nn.Module,
    images: torch.Tensor | Iterable,
    target: float | str,
    *,
    schedule: str = "constant",
    batch_size: int = 64,
    cap: float | None = None,
    clamp: bool = False,
    held_out: torch.Tensor | Iterable | None = None,
    progress: bool = True,
    accelerator: Any = None,
) -> Calibration:
    """Find per-layer DyMU thresholds for ``model`` (DyMU paper, Sec. 3.1).

    Args:
        model: a timm / open_clip / HF CLIP or SigLIP encoder, or an HF LLaVA (its tower up to the
            vision feature layer), without vtc applied.
        images: (N, C, H, W) preprocessed pixels (split into ``batch_size`` batches), or an
            iterable of batches (tensors, ``(pixels, ...)`` tuples or processor outputs).
        target: average patch tokens (prefix excluded) kept after the last layer, or a preset
            (``low`` | ``mid`` | ``high``: 1/8, 1/3, 2/3 of the patch tokens).
        schedule: how the merges ``R = patches - target`` spread over layers (:func:`merge_schedule`).
        clamp: move merges a layer cannot make to earlier layers (:func:`merge_schedule`).
        cap: optional per-image cap ratio (edges beyond rank ``cap * r_l`` of their image masked).
        held_out: other images on which the realised average is measured and reported.
        accelerator: an ``accelerate.Accelerator`` whose processes each saw their share of the
            batches; thresholds and counts are summed over processes.
    """
    for given in (images, held_out):
        if given is not None and not isinstance(given, torch.Tensor) and iter(given) is given:
            raise TypeError("calibration images are read twice (calibration, then the realised count): give a "
                            "tensor, a list or a DataLoader, not a generator")
    calibrating = CalibrationRecorder(target=target, schedule=schedule, cap=cap, clamp=clamp)
    seen = 0
    with torch.inference_mode(), apply(model, calibrating) as handle:
        info = handle.adapter.info
        for pixels in _progress(_batches(images, batch_size), progress, "dymu calibration"):
            run_encoder(handle, pixels)
            seen += pixels.shape[0]
    sums, counts, seen_t = calibrating.sums, calibrating.counts, torch.tensor([float(seen)])
    if accelerator is not None:
        device = accelerator.device
        sums, counts, seen_t = (accelerator.reduce(t.to(device), reduction="sum").cpu() for t in (sums, counts, seen_t))
    if seen_t.item() == 0:
        raise ValueError("calibration needs at least one image")
    thresholds = torch.where(counts > 0, sums / counts.clamp(min=1), torch.ones_like(sums))
    result = Calibration(
        thresholds=[float(t) if r else 1.0 for t, r in zip(thresholds.tolist(), calibrating.merges)],
        merges=list(calibrating.merges), schedule=schedule + ("+clamp" if clamp else ""), target=calibrating.target_tokens,
        encoder={"family": info.family, "num_layers": info.num_layers, "num_tokens": info.num_tokens,
                 "n_prefix": info.n_prefix},
        model_id=info.model_id, preset=target if isinstance(target, str) else None,
        images=int(seen_t.item()), batch_size=batch_size, cap=cap,
    )
    reducer = DyMU(calibration=result, cap=cap, vtu="off")  # counted as the calibration will be used

    def realised(given) -> torch.Tensor:
        counts = token_counts(model, reducer, given, batch_size, progress)
        if accelerator is not None:
            counts = accelerator.gather(counts.to(accelerator.device)).cpu()
        return counts.float()

    result.realised = float(realised(images).mean())
    if held_out is not None:
        counts_held = realised(held_out)
        result.held_out = float(counts_held.mean())
        result.held_out_std = float(counts_held.std()) if counts_held.numel() > 1 else 0.0
    return result

