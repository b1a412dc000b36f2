"""Command-line options built from the trainers' dataclasses, so a script never re-declares them."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import shlex
import sys
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _scalar_type(hint: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field annotation such as ``float | None``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return kinds[0], len(kinds) < len(args)
    return hint, False


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment ending its line in ``cls``'s source (the option's help text)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = (re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line) for line in source.splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def add_options(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str] | None = None) -> None:
    """One ``--name`` option per field of dataclass ``cls`` (underscores become dashes), typed from
    the annotation, defaulting to the field's default, explained by ``helps`` or else by the
    comment on the field's line."""
    hints = typing.get_type_hints(cls)
    helps = {**field_comments(cls), **(helps or {})}
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        kind, optional = _scalar_type(hints[f.name])
        default = f.default
        text = helps.get(f.name, "")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                           help=f"{text} (default: {default})".strip() + (" ; may be left unset" if optional else ""))


def from_options(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass ``cls`` from the parsed options :func:`add_options` declared."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def command(script: str, argv: list[str] | None) -> str:
    """The command line that ran ``script`` with ``argv`` (default: this process's arguments)."""
    return f"python {script} " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
