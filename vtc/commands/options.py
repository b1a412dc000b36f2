"""Command-line options built from the library's dataclasses, so no face re-declares them.

Each field of an options dataclass becomes ``--field-name``: its type from the annotation
(``int``, ``float``, ``str``, ``Path``, ``bool``, a sequence of those, each possibly ``| None``),
its default from the field, its help from the comment ending the field's line. Where the library
takes keyword arguments instead, :func:`add_parameters` reads type and default from the function's
signature. What a command adds (another flag name, a checking parser, an example, choices) it
says in a :class:`Flag`.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import re
import shlex
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
SEQUENCES = (collections.abc.Sequence, list, tuple)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a command shows one dataclass field, beyond its type, default and comment."""

    name: str | None = None  # the flag, when not --field-name
    type: Callable[[str], Any] | None = None  # parses (and checks) one value; default: the annotation's type
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    help: str | None = None  # replaces the field's comment
    example: str = ""  # shown as "e.g. ..."
    repeat: bool = False  # a sequence given by repeating the flag (--spec A --spec B), not as one list
    whole: bool = False  # a sequence given as one argument that ``type`` parses whole (e.g. comma-separated)
    empty: bool = False  # a sequence may be given with no values (nargs "*")
    required: bool = False


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the annotation without ``None``, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        return kinds[0], len(kinds) < len(typing.get_args(hint))
    return hint, False


def _element(hint: Any) -> Any | None:
    """The element type of a sequence annotation (``Sequence[int]``, ``tuple[str, ...]``), else None."""
    if typing.get_origin(hint) in SEQUENCES:
        return typing.get_args(hint)[0] if typing.get_args(hint) else str
    return None


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment ending its line (and the comment lines right below it) in the
    source of ``cls`` or the base class that declares it: the option's help text."""
    comments: dict[str, str] = {}
    for owner in reversed(cls.__mro__):
        try:
            source = inspect.getsource(owner)
        except (OSError, TypeError):
            continue
        current = None
        for line in source.splitlines():
            field = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            more = re.match(r"\s+#\s*(.+)$", line)
            if field:
                current = field.group(1)
                comments[current] = field.group(2).strip()
            elif more and current:  # a comment line right below continues the field's help
                comments[current] += " " + more.group(1).strip()
            else:
                current = None
    return comments


def show(value: Any) -> str:
    """A default as a user would type it."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(show, value)) if value else "none"
    text = str(value)
    return text.removeprefix("torch.")


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                flags: dict[str, Flag] | None = None, *, only: Iterable[str] | None = None, skip: Iterable[str] = (),
                unset: bool = False, title: str | None = None) -> None:
    """One option per field of dataclass ``cls`` (those in ``only`` if given, less ``skip``), in a
    group titled ``title`` (default: the class name and its docstring's first line).

    A ``bool`` field defaulting to False is a switch ``--name``; one defaulting to True is
    ``--no-name``. A sequence takes its values as one list (or, with ``Flag.repeat``, one per
    repetition). With ``unset``, every option defaults to None, so that the command can tell what
    was given; :func:`from_options` then keeps the dataclass defaults for the others.
    """
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    if isinstance(parser, argparse.ArgumentParser):
        doc = (cls.__doc__ or "").strip().splitlines()
        parser = parser.add_argument_group(title or cls.__name__, None if title else (doc[0] if doc else None))
    skipped = set(skip)
    wanted = list(only) if only is not None else [f.name for f in dataclasses.fields(cls)]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in wanted:
        if name in skipped:
            continue
        field, flag = fields[name], flags.get(name, Flag())
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        text = flag.help or comments.get(name, "")
        if not text:
            raise ValueError(f"{cls.__name__}.{name} has no help: give it a comment on its line or a Flag(help=...)")
        _add_option(parser, name, hints[name], default, text, flag, unset)


def add_parameters(parser: argparse.ArgumentParser | argparse._ArgumentGroup, function: Callable[..., Any],
                   flags: dict[str, Flag]) -> None:
    """One option per keyword parameter of a library ``function`` named in ``flags``, its type and
    default read from the signature (so they cannot drift from the library's), its help from the
    :class:`Flag`."""
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    for name, flag in flags.items():
        if name not in signature.parameters or signature.parameters[name].default is inspect.Parameter.empty:
            raise ValueError(f"{function.__qualname__} has no keyword parameter {name!r} with a default")
        if not flag.help:
            raise ValueError(f"the option for {function.__qualname__}({name}=...) needs a Flag(help=...)")
        _add_option(parser, name, hints[name], signature.parameters[name].default, flag.help, flag, unset=False)


def _add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, hint: Any, default: Any, text: str,
                flag: Flag, unset: bool) -> None:
    """``--name`` for a value of annotation ``hint`` (see :func:`add_options`)."""
    kind, optional = _unwrap(hint)
    element = _element(kind)
    kwargs: dict[str, Any] = {"dest": name, "default": None if unset else default, "required": flag.required}
    option = flag.name or f"--{name.replace('_', '-')}"
    if kind is bool:
        if default:
            option = flag.name or f"--no-{name.replace('_', '-')}"
            kwargs.update(action="store_false")
        else:
            kwargs.update(action="store_true")
        described = f"{text} (on unless this is given)" if default and not flag.help else text
    else:
        kwargs.update(type=flag.type or (element if element is not None else kind), metavar=flag.metavar)
        if flag.choices is not None:
            kwargs.update(choices=list(flag.choices), metavar=flag.metavar or "{" + ",".join(map(str, flag.choices)) + "}")
        if element is not None and flag.repeat:
            kwargs.update(action="append")
        elif element is not None and not flag.whole:
            kwargs.update(nargs="*" if flag.empty else "+")
        shown = "unset" if default is None else ",".join(map(show, default)) if flag.whole else show(default)
        described = text if "default" in text else (
            f"{text} (default: {shown}{'; may be left unset' if optional and default is not None else ''})")
    example = f", e.g. {flag.example}" if flag.example else ""
    parser.add_argument(option, help=(described + example).replace("%", "%%"), **kwargs)


def from_options(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """The dataclass ``cls`` from the options :func:`add_options` declared (and ``given``): a
    field whose option is absent or None keeps its default."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**values, **given})


def command(script: str, argv: list[str] | None) -> str:
    """The command line that ran ``script`` with ``argv`` (default: this process's arguments)."""
    return f"python {script} " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))

