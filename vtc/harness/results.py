"""Harness results on disk: a CSV of the rows and a JSON of the setup (model, spec strings,
versions, options) with the same rows; existing files are replaced only when asked."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from vtc.harness.errors import HarnessError, listing
from vtc.harness.rows import COLUMNS, HarnessRow
from vtc.records import write_records


def write_results(out: Path | str, rows: Sequence[HarnessRow], setup: Mapping[str, object], overwrite: bool = False,
                  name: str = "accuracy") -> tuple[Path, Path]:
    """Write ``<name>.csv`` and ``<name>.json`` under ``out`` (created); ``setup`` (its ``model``
    is the CSV's model column; its ``versions`` gain torch's and Python's) heads the JSON."""
    out = Path(out)
    paths = out / f"{name}.csv", out / f"{name}.json"
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise HarnessError(f"{listing(existing)} already exist; pass overwrite=True (vtc eval: --overwrite) to replace them")
    out.mkdir(parents=True, exist_ok=True)
    records = [{"model": setup.get("model", ""), **row.record()} for row in rows]
    write_records(paths[0], COLUMNS, records)
    versions = {"torch": torch.__version__, "python": platform.python_version(), **dict(setup.get("versions") or {})}
    paths[1].write_text(json.dumps({**setup, "versions": versions, "rows": records}, indent=2) + "\n")
    return paths
