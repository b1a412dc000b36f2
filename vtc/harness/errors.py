"""The one error the harnesses raise for bad input, and how its messages list names."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class HarnessError(ValueError):
    """A folder, class mapping, class-name file, template or reducer the harness cannot use as given."""


def listing(names: Iterable[object], limit: int = 8) -> str:
    """``a, b, c`` for a message; long lists are cut after ``limit`` names with the total count."""
    names = [str(name) for name in names]
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])}, ... ({len(names)} in all)"


def read_json(path: Path, what: str, hint: str = "") -> Any:
    """The JSON content of ``path``; a :class:`HarnessError` naming ``what`` when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise HarnessError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise HarnessError(f"{what} {path} is not JSON ({error})" + (f"; {hint}" if hint else "")) from None
