"""Instance-level, reversible attribute patching (never a class, never global)."""

from __future__ import annotations

from typing import Any

_MISSING = object()


class InstancePatcher:
    """Sets attributes on object instances and puts every one back on :meth:`restore`."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self._saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
        obj.__dict__[name] = value

    def restore(self) -> None:
        while self._saved:
            obj, name, old = self._saved.pop()
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old
