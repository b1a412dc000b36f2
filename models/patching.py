"""Instance-level, reversible attribute patching (never a class, never global)."""

from __future__ import annotations

from typing import Any


class _Missing:
    """Marks an attribute that did not exist before patching; survives ``copy.deepcopy``."""

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self


_MISSING = _Missing()


class InstancePatcher:
    """Sets attributes on object instances and puts every one back on :meth:`restore`.

    Patches should be bound methods or ``functools.partial`` of them (not closures), so that
    ``copy.deepcopy`` of a patched model rebinds them to the copy's own modules.
    """

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
