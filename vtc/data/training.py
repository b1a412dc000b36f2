"""Tensors for training and evaluating on :mod:`vtc.data.shapes`: pixels, per-patch targets, a
learning-rate schedule and a tokenizer. Shared by the training and evaluation scripts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vtc.data import shapes

MEAN = STD = (0.5, 0.5, 0.5)
NO_DIGIT = 10  # per-patch digit target of patches without digit pixels


def pixels(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float, normalised with :data:`MEAN` / :data:`STD`
    (what the shapes checkpoints' image processors do)."""
    x = torch.from_numpy(np.stack(list(images))).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def patch_targets(batch: Sequence[shapes.Example], patch: int) -> dict[str, torch.Tensor]:
    """Per-patch labels from each example's object map, (N, patches) long each: ``digit`` (the
    digit if the patch holds digit pixels, else :data:`NO_DIGIT`); for the shape covering most of
    the patch (0 where none, else 1 + ...): ``kind`` (index in KINDS), ``color`` (index in COLORS),
    ``cell`` (the shape's grid cell) and ``count`` (how many shapes of the scene share its colour,
    itself included). Auxiliary training targets."""
    names = ("digit", "kind", "color", "cell", "count")
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for ex in batch:
        n = len(ex.scene.shapes)
        g = shapes.IMAGE_SIZE // patch
        blocks = ex.objects.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
        counts = np.stack([(blocks == k).sum(1) for k in range(n + 2)], 1)  # (P, n + 2)
        out["digit"].append(np.where(counts[:, n + 1] > 0, ex.scene.digit, NO_DIGIT))
        top = counts[:, 1:n + 1].argmax(1) if n else np.zeros(len(blocks), int)
        has = counts[:, 1:n + 1].max(1) > 0
        colors = [s.color for s in ex.scene.shapes]
        per_shape = {
            "kind": [1 + shapes.KINDS.index(s.kind) for s in ex.scene.shapes],
            "color": [1 + list(shapes.COLORS).index(s.color) for s in ex.scene.shapes],
            "cell": [1 + s.cell for s in ex.scene.shapes],
            "count": [colors.count(s.color) for s in ex.scene.shapes],
        }
        for name, values in per_shape.items():
            out[name].append(np.where(has, np.asarray(values)[top], 0))
    return {name: torch.from_numpy(np.stack(v)).long() for name, v in out.items()}


TARGET_CLASSES = {"digit": NO_DIGIT + 1, "kind": len(shapes.KINDS) + 1, "color": len(shapes.COLORS) + 1,
                  "cell": shapes.GRID ** 2 + 1, "count": 7}  # a scene has at most 6 shapes
"""Number of classes of each :func:`patch_targets` target."""


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def set_two_stage_lr(optimizer: torch.optim.Optimizer, step: int, first_steps: int, second_steps: int, warmup: int,
                     first_peaks: dict[str, float], second_peaks: dict[str, float]) -> bool:
    """Set each named parameter group's learning rate for ``step`` of a two-stage run: each stage
    its own :func:`cosine_lr` (warm-up capped at a tenth of the stage) to the group's peak in that
    stage. Returns whether ``step`` is in the first stage."""
    first = step < first_steps
    local, total = (step, first_steps) if first else (step - first_steps, second_steps)
    peaks = first_peaks if first else second_peaks
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(local, total, peaks[group["name"]], warmup=min(warmup, max(1, total // 10)))
    return first
