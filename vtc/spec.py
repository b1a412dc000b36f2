"""Spec strings: ``"tome:r=8"``, ``"evit:keep=0.7,layers=3;6;9"`` (docs/ARCHITECTURE.md "Reducers").

Grammar: ``name[:option=value[,option=value...]]``. The name is a declared reducer's
(:data:`vtc.sites.REDUCERS`, or one an installed package adds through the ``vtc.reducers``
entry-point group); each value is read as its option's type (:mod:`vtc.options`). The same strings
are used by the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib.metadata import entry_points
from typing import Any

from vtc.options import check_exclusive, parse_option, to_spec
from vtc.sites import REDUCERS, Reducer

ENTRY_POINT_GROUP = "vtc.reducers"

__all__ = ["ENTRY_POINT_GROUP", "REDUCERS", "known_reducers", "parse_reducer", "to_spec"]


@functools.cache
def _load_plugins() -> None:
    """Import every reducer installed packages declare in the ``vtc.reducers`` entry-point group
    (``name = "package.module:Class"``); defining the class registers it."""
    for point in entry_points(group=ENTRY_POINT_GROUP):
        loaded = point.load()
        if not (isinstance(loaded, type) and issubclass(loaded, Reducer)) or REDUCERS.get(point.name) is not loaded:
            raise TypeError(
                f"entry point {point.name!r} = {point.value!r} in group {ENTRY_POINT_GROUP!r} must name a vtc "
                f"Reducer subclass whose name is {point.name!r}"
            )


def known_reducers() -> dict[str, type[Reducer]]:
    """Every reducer class by spec name: vtc's own and those of installed plugin packages."""
    _load_plugins()
    return dict(REDUCERS)


def parse_reducer(spec: str | Reducer) -> Reducer:
    """A reducer from a spec string (reducer objects pass through)."""
    if isinstance(spec, Reducer):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a reducer is a vtc reducer object or a spec string like 'tome:r=8', got {type(spec).__name__}")
    name, _, options = spec.strip().partition(":")
    reducers = known_reducers()
    cls = reducers.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown reducer {name!r} in {spec!r}; known reducers: {', '.join(sorted(reducers))}")
    fields: set[str] = ({f.name for f in dataclasses.fields(cls) if f.metadata.get("spec", True)}
                        if dataclasses.is_dataclass(cls) else set())
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
        kwargs[key] = parse_option(cls, key, value)
    check_exclusive(cls, set(kwargs))
    return cls(**kwargs)
