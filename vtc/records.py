"""Result tables written by the demo and the benchmarks."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path


def write_records(path: Path, columns: Sequence[str], records: Iterable[dict[str, str]]) -> Path:
    """Write ``records`` (one dict per row) as a CSV with a header of ``columns``."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(records)
    return path
