"""Class folders on disk, ``DIR/<class>/<image files>`` (torchvision's ImageFolder layout, also
ImageNet's): the sorted class folder names and the image files under each."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vtc.harness.errors import HarnessError, listing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's, any case
LAYOUT = "DIR/<class>/<image files>, e.g. imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG"


@dataclass(frozen=True)
class ClassFolders:
    """A scanned folder: class folder names in sorted order and each class's image files (sorted)."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]

    @property
    def images(self) -> int:
        return sum(len(files) for files in self.files)

    def samples(self, labels: list[int] | range) -> list[tuple[Path, int]]:
        """(image file, label) of every image, ``labels`` giving one label per class folder."""
        if len(labels) != len(self.classes):
            raise ValueError(f"{len(labels)} labels for {len(self.classes)} class folders")
        return [(file, label) for files, label in zip(self.files, labels) for file in files]


def _raise(error: OSError) -> None:
    raise error


def image_files(folder: Path) -> tuple[Path, ...]:
    """Image files anywhere under ``folder`` (by suffix, :data:`IMAGE_SUFFIXES`), sorted."""
    found = []
    for parent, _, names in os.walk(folder, onerror=_raise):
        found += [Path(parent) / name for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return tuple(sorted(found))


def scan_folder(folder: Path | str) -> ClassFolders:
    """The class folders of ``folder`` in sorted order (hidden ones, starting with ``.``, skipped)
    with their image files; a clear :class:`HarnessError` when the folder is missing or unreadable,
    holds no class folders, or a class folder holds no image."""
    root = Path(folder)
    if not root.exists():
        raise HarnessError(f"folder {root} does not exist; expected {LAYOUT}")
    if not root.is_dir():
        raise HarnessError(f"{root} is not a folder; expected {LAYOUT}")
    try:
        classes = tuple(sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")))
        files = tuple(image_files(root / name) for name in classes)
    except OSError as error:
        raise HarnessError(f"cannot read {error.filename or root}: {error.strerror or error}") from None
    if not classes:
        raise HarnessError(f"{root} holds no class folders; expected {LAYOUT}")
    empty = [name for name, found in zip(classes, files) if not found]
    if empty:
        raise HarnessError(f"class folder(s) of {root} with no image files ({' '.join(IMAGE_SUFFIXES)}): {listing(empty)}; "
                           "remove them or add their images")
    return ClassFolders(root, classes, files)
