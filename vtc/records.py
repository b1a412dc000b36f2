"""Result tables written by the demo and the benchmarks, and the environment recorded beside them."""

from __future__ import annotations

import csv
import platform
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

DISTRIBUTION = "vtc-vlm"
LIBRARIES = ("transformers", "timm", "open_clip_torch", "triton")  # versions recorded with results


def installed_version() -> str:
    """The installed vtc distribution's version (``vtc --version``, recorded with results)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed as a distribution)"


def device_description(device: str | torch.device) -> str:
    """The GPU's name for a CUDA device, else ``CPU (<torch threads> threads)``: the machine line of a result."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def environment() -> dict[str, dict[str, object]]:
    """``versions`` (vtc, torch, its CUDA, Python and the model libraries) and ``machine``
    (processor, torch threads, GPU name when CUDA is present) for a results file."""
    versions: dict[str, object] = {"vtc": installed_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                                   "python": platform.python_version()}
    for library in LIBRARIES:
        try:
            versions[library] = version(library)
        except PackageNotFoundError:
            versions[library] = None
    machine: dict[str, object] = {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return {"versions": versions, "machine": machine}


def write_records(path: Path, columns: Sequence[str], records: Iterable[dict[str, str]]) -> Path:
    """Write ``records`` (one dict per row) as a CSV with a header of ``columns``."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(records)
    return path
