"""Which of a classifier's classes each class folder is: its position among the sorted folders
(torchvision's ImageFolder rule; ImageNet's 1000 sorted wnids are its 1000 class indices), or a
given mapping folder name -> class index for a subset of the classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from vtc.harness.errors import HarnessError, listing, read_json

SUBSET_HINT = ("for a subset of the model's classes give a class index: a JSON file mapping folder name -> class index "
               '(--class-index FILE), e.g. {"n01440764": 0, "n01443537": 1}')


def class_indices(classes: Sequence[str], num_classes: int, mapping: Mapping[str, int] | None = None) -> list[int]:
    """The model's class index of each folder in ``classes`` (sorted names), for a model predicting
    ``num_classes`` classes: the folder's position, or ``mapping[folder]``."""
    if mapping is None:
        if len(classes) != num_classes:
            raise HarnessError(
                f"{len(classes)} class folders but the model predicts {num_classes} classes: a folder's class index is its "
                f"position among the sorted folders, so all {num_classes} classes need a folder; {SUBSET_HINT}")
        return list(range(num_classes))
    unknown = sorted(set(mapping) - set(classes))
    if unknown:
        raise HarnessError(f"the class index names folders that do not exist: {listing(unknown)} "
                           f"(the class folders are {listing(classes)})")
    missing = [name for name in classes if name not in mapping]
    if missing:
        raise HarnessError(f"the class index gives no class for the folders {listing(missing)}; map every class folder")
    bad = [f"{name}: {mapping[name]!r}" for name in classes
           if not isinstance(mapping[name], int) or isinstance(mapping[name], bool) or not 0 <= mapping[name] < num_classes]
    if bad:
        raise HarnessError(f"class indices out of range 0..{num_classes - 1} (the model predicts {num_classes} classes): "
                           f"{listing(bad)}")
    seen: dict[int, str] = {}
    for name in classes:
        if mapping[name] in seen:
            raise HarnessError(f"the class index gives folders {seen[mapping[name]]} and {name} the same class {mapping[name]}")
        seen[mapping[name]] = name
    return [mapping[name] for name in classes]


def read_class_index(path: Path | str) -> dict[str, int]:
    """A class-index file: a JSON object mapping folder name -> class index."""
    path = Path(path)
    mapping = read_json(path, "the class index", SUBSET_HINT)
    if not isinstance(mapping, dict) or not mapping:
        raise HarnessError(f"the class index {path} must be a non-empty JSON object; {SUBSET_HINT}")
    return mapping
