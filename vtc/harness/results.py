"""Harness results on disk: a CSV of the rows and a JSON of the setup (model, spec strings,
versions, options) with the same rows; existing files are replaced only when asked."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from vtc.harness.errors import HarnessError, listing
from vtc.harness.rows import COLUMNS, HarnessRow
from vtc.records import environment, write_records


def write_results(out: Path | str, rows: Sequence[HarnessRow], setup: Mapping[str, object], overwrite: bool = False,
                  name: str = "accuracy") -> tuple[Path, Path]:
    """Write ``<name>.csv`` and ``<name>.json`` under ``out`` (created); ``setup`` (its ``model``
    is the CSV's model column) heads the JSON, after the versions and machine (:func:`vtc.records.environment`)."""
    out = Path(out)
    paths = out / f"{name}.csv", out / f"{name}.json"
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise HarnessError(f"{listing(existing)} already exist; pass overwrite=True (vtc eval: --overwrite) to replace them")
    out.mkdir(parents=True, exist_ok=True)
    records = [{"model": setup.get("model", ""), **row.record()} for row in rows]
    write_records(paths[0], COLUMNS, records)
    recorded = environment()
    versions = {**recorded["versions"], **dict(setup.get("versions") or {})}  # the caller's add to or correct ours
    paths[1].write_text(json.dumps({**recorded, **setup, "versions": versions, "rows": records}, indent=2) + "\n")
    return paths
