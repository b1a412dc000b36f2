"""Top-1 of an image classifier (logits from ``model(pixels)``, e.g. a timm model) on class
folders, unreduced and under each reducer spec side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from vtc.harness.errors import HarnessError
from vtc.harness.folders import ClassFolders, scan_folder
from vtc.harness.images import Transform
from vtc.harness.labels import class_indices
from vtc.harness.rows import HarnessRow
from vtc.harness.side_by_side import HarnessConfig, side_by_side


def model_classes(model: nn.Module, num_classes: int | None = None) -> int:
    """The number of classes ``model`` predicts: ``num_classes`` when given, else ``model.num_classes`` (timm)."""
    count = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    if not isinstance(count, int):
        raise HarnessError(f"cannot tell how many classes a {type(model).__name__} predicts (it has no num_classes); "
                           "pass num_classes=")
    if count < 1:
        raise HarnessError(f"the {type(model).__name__} predicts no classes (num_classes {count}: no classifier head)")
    return count


def _top1(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixels).argmax(-1)


def folder_classification(model: nn.Module, folder: Path | str | ClassFolders, specs: Sequence[str] = (), *,
                          transform: Transform, class_index: Mapping[str, int] | None = None, num_classes: int | None = None,
                          config: HarnessConfig | None = None) -> list[HarnessRow]:
    """Rows for the unreduced ``model`` and each spec on ``folder`` (``DIR/<class>/<images>``, or a
    :func:`~vtc.harness.folders.scan_folder` result), images preprocessed by ``transform``.

    A folder's class is its position among the sorted folders, which must then number the model's
    classes, or ``class_index[folder]`` for a subset; predictions are the argmax over all classes.
    """
    scan = folder if isinstance(folder, ClassFolders) else scan_folder(folder)
    labels = class_indices(scan.classes, model_classes(model, num_classes), class_index)
    return side_by_side(model, scan.samples(labels), transform, specs, _top1, config or HarnessConfig())
