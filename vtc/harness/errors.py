"""The one error the harnesses raise for bad input, and how its messages list names."""

from __future__ import annotations

from collections.abc import Iterable


class HarnessError(ValueError):
    """A folder, class mapping, class-name file, template or reducer the harness cannot use as given."""


def listing(names: Iterable[object], limit: int = 8) -> str:
    """``a, b, c`` for a message; long lists are cut after ``limit`` names with the total count."""
    names = [str(name) for name in names]
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])}, ... ({len(names)} in all)"
