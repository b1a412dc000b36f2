"""Image files read and preprocessed into batches of pixels with their labels."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from vtc.harness.errors import HarnessError

Transform = Callable[[Any], torch.Tensor]  # a PIL image -> (C, H, W) pixels, e.g. the model's own preprocessing


def read_image(path: Path) -> Image.Image:
    """An RGB picture; a :class:`HarnessError` naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise HarnessError(f"cannot read the image {path}: {error}") from None


def batches(samples: Sequence[tuple[Path, int]], transform: Transform, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels (B, C, H, W), labels (B,)) of ``samples`` in order, ``batch_size`` at a time."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels = torch.stack([transform(read_image(path)) for path, _ in chunk])
        yield pixels, torch.tensor([label for _, label in chunk])
