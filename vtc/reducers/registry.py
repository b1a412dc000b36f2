"""Spec strings: ``"tome:r=8"``, ``"evit:keep=0.7,layers=3;6;9"`` (docs/ARCHITECTURE.md "Reducers").

Grammar: ``name[:option=value[,option=value...]]``. A value is an int, a float, ``true``/``false``,
``none``, a ``;``-separated list (``5;`` is a one-entry list), or a word. The same strings are used by the CLI.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vtc.reducers.base import Reducer
from vtc.reducers.drop import EViT, RandomDrop
from vtc.reducers.dymu import DyMU
from vtc.reducers.exit import VisualExit
from vtc.reducers.holov import HoloV
from vtc.reducers.pool import Pool
from vtc.reducers.tome import ToMe
from vtc.reducers.vtu import VirtualUnmerge

REDUCERS: dict[str, type[Reducer]] = {cls.name: cls for cls in (ToMe, EViT, DyMU, HoloV, RandomDrop, Pool, VisualExit, VirtualUnmerge)}


def _value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if ";" in text:
        return tuple(_value(part) for part in text.split(";") if part.strip())
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_reducer(spec: str | Reducer) -> Reducer:
    """A reducer from a spec string (reducer objects pass through)."""
    if isinstance(spec, Reducer):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a reducer is a vtc reducer object or a spec string like 'tome:r=8', got {type(spec).__name__}")
    name, _, options = spec.strip().partition(":")
    cls = REDUCERS.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown reducer {name!r} in {spec!r}; known reducers: {', '.join(sorted(REDUCERS))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(
                f"{cls.name}: bad option {item!r} in {spec!r}; options are "
                f"{', '.join(sorted(fields))}, written as option=value"
            )
        if key in kwargs:
            raise ValueError(f"{cls.name}: option {key!r} is given twice in {spec!r}")
        kwargs[key] = _value(value)
    return cls(**kwargs)


def to_spec(reducer: Reducer) -> str:
    """The spec string of a reducer, listing the options that differ from their defaults."""
    parts = []
    for field in dataclasses.fields(reducer):
        value = getattr(reducer, field.name)
        if value == field.default:
            continue
        if isinstance(value, tuple):
            text = ";".join(str(v) for v in value) + (";" if len(value) == 1 else "")
        else:
            text = str(value).lower() if isinstance(value, bool) or value is None else str(value)
        parts.append(f"{field.name}={text}")
    return reducer.name + (":" + ",".join(parts) if parts else "")
