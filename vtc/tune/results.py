"""The results file of a tuning run: one CSV row per measured point, appended as soon as it is
measured, and a JSON sidecar (``<results>.json``) describing the evaluator's setup. Reopening the
file for the same setup gives back the finished points, so an interrupted run resumes without
redoing them; a file made for another setup is refused, never overwritten."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from vtc.tune.points import Point

FORMAT = 1  # version of the columns below, stored in the sidecar
FIELDS = [f.name for f in dataclasses.fields(Point)]
DERIVED = ("agreement", "agreement_low", "agreement_high", "accuracy", "accuracy_low", "accuracy_high", "speedup")
COLUMNS = (*FIELDS, *DERIVED)
_INTEGERS = ("examples", "agreeing", "correct")


class TuneError(ValueError):
    """A tuning run cannot go on: its target is out of reach, or its results file belongs to another setup."""


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _cell(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _row(point: Point) -> dict[str, str]:
    row = {name: _cell(getattr(point, name)) for name in FIELDS}
    row["specs"] = point.label  # the key: specs joined with " | ", "none" for the unreduced model
    for name in ("agreement", "accuracy"):
        interval = point.interval(name)
        row[name] = _cell(getattr(point, name))
        row[f"{name}_low"], row[f"{name}_high"] = (_cell(interval[0]), _cell(interval[1])) if interval else ("", "")
    row["speedup"] = _cell(point.speedup)
    return row


def _point(row: dict[str, str]) -> Point:
    values: dict[str, Any] = {}
    for name in FIELDS:
        text = row[name]
        if name == "specs":
            values[name] = () if text == "none" else tuple(text.split(" | "))
        elif text == "":
            values[name] = None
        else:
            values[name] = int(text) if name in _INTEGERS else float(text)
    return Point(**values)


class Results:
    """Measured points by their exact spec list, backed by a CSV and its setup sidecar."""

    def __init__(self, path: str | Path, setup: dict[str, Any]) -> None:
        self.path = Path(path)
        self.setup = json.loads(json.dumps(setup))  # as it reads back from JSON
        self.points: dict[tuple[str, ...], Point] = {}
        stored = sidecar(self.path)
        if stored.exists():
            self._check(json.loads(stored.read_text()))
        elif self.path.exists():
            raise TuneError(f"{self.path} exists without its setup file {stored.name}, so it cannot be told to belong to "
                            f"this setup; give another results path or move it away")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps({"format": FORMAT, "setup": self.setup}, indent=2) + "\n")
        if self.path.exists():
            self._read()

    def _check(self, stored: dict[str, Any]) -> None:
        theirs = stored.get("setup", {})
        if stored.get("format") == FORMAT and theirs == self.setup:
            return
        keys = sorted(set(theirs) | set(self.setup))
        differ = [f"{k}: {theirs.get(k)!r} there, {self.setup.get(k)!r} here" for k in keys if theirs.get(k) != self.setup.get(k)]
        if stored.get("format") != FORMAT:
            differ.insert(0, f"file format {stored.get('format')!r} there, {FORMAT} here")
        raise TuneError(f"{self.path} holds results of another setup ({'; '.join(differ)}); it is left as it is: "
                        f"give another results path, or delete it and {sidecar(self.path).name} to start over")

    def _read(self) -> None:
        text = self.path.read_text()
        complete = text[: text.rfind("\n") + 1]  # a row cut short by an interruption is dropped
        if complete != text:
            self.path.write_text(complete)
        if not complete:
            return
        reader = csv.DictReader(io.StringIO(complete))
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise TuneError(f"{self.path} does not have the columns of a vtc.tune results file")
        for line, row in enumerate(reader, start=2):
            try:
                point = _point(row)
            except (ValueError, TypeError) as error:
                raise TuneError(f"{self.path} line {line} is not a measured point: {error}") from None
            self.points[point.specs] = point

    def get(self, specs: tuple[str, ...]) -> Point | None:
        return self.points.get(specs)

    def add(self, point: Point) -> None:
        """Record ``point`` and append it to the file at once."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
            if new:
                writer.writeheader()
            writer.writerow(_row(point))
        self.points[point.specs] = point
