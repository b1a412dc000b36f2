"""Typed reducer options: spec-string values coerced from the dataclass field types, and the
spec string written back from a reducer (docs/ARCHITECTURE.md "Reducers").

A reducer is a dataclass whose fields are its options. A value in a spec string is read as the
field's annotated type, never guessed: ``bool`` takes ``true``/``false``; ``int`` an integer;
``float`` a number; ``Literal["a", "b"]`` one of its values; ``str`` a word; ``tuple[X, ...]`` a
``;``-separated list of ``X`` (``5;`` is a one-entry list); ``None`` (in an optional field)
``none``. A union tries none, true/false, integer, number, then the words, then a one-entry list.
A value that fits none is refused with the option, what it takes (a Literal's allowed values) and
what was given.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

_NONE = type(None)


def expects(description: str, **field_options: Any) -> Any:
    """A dataclass field whose refusal message says ``description`` (e.g. "a positive integer")
    instead of the description derived from its type; ``field_options`` go to ``dataclasses.field``."""
    return dataclasses.field(metadata={"expects": description}, **field_options)


@functools.cache
def option_types(cls: type) -> dict[str, Any]:
    """Resolved type of every option (dataclass field) of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def describe_type(hint: Any) -> str:
    """``int | None`` -> "an integer or none"."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a word", _NONE: "none"}
    plurals = {bool: "true/false values", int: "integers", float: "numbers", str: "words"}
    parts = []
    for member in _members(hint):
        if typing.get_origin(member) is tuple:
            item = typing.get_args(member)[0]
            parts.append(f"a ;-separated list of {plurals.get(item, describe_type(item))}")
        elif typing.get_origin(member) is typing.Literal:
            parts.append("one of " + ", ".join(str(v) for v in typing.get_args(member)))
        else:
            parts.append(words.get(member, getattr(member, "__name__", str(member))))
    return " or ".join(parts)


def _scalar(text: str, kind: Any) -> Any:
    """``text`` read as ``kind``; ValueError when it is not one."""
    word = text.strip()
    if kind is _NONE and word.lower() == "none":
        return None
    if kind is bool and word.lower() in ("true", "false"):
        return word.lower() == "true"
    if kind is int and word.lstrip("+-").isdigit():
        return int(word)
    if kind is float and word.lower() not in ("nan", "inf", "-inf", "+inf", "infinity"):
        return float(word)  # raises ValueError for a non-number
    if typing.get_origin(kind) is typing.Literal and word in typing.get_args(kind):
        return word
    if kind is str and word and word.lower() not in ("none", "true", "false"):
        return word
    raise ValueError(word)


def coerce(text: str, hint: Any) -> Any:
    """``text`` read as a value of type ``hint`` (module docstring); ValueError when none fits."""
    members = _members(hint)
    lists = [m for m in members if typing.get_origin(m) is tuple]
    if ";" in text and lists:
        item = typing.get_args(lists[0])[0]
        return tuple(coerce(part, item) for part in text.split(";") if part.strip())
    order = (_NONE, bool, int, float)
    ranked = sorted((m for m in members if typing.get_origin(m) is not tuple), key=lambda m: order.index(m) if m in order else len(order))
    for member in ranked:
        try:
            return _scalar(text, member)
        except ValueError:
            continue
    for member in lists:  # a single value where only a list is allowed: a one-entry list
        return (coerce(text, typing.get_args(member)[0]),)
    raise ValueError(text)


def parse_option(cls: type, key: str, text: str) -> Any:
    """The value of option ``key`` of reducer class ``cls`` written ``text`` in a spec string."""
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    hint = option_types(cls)[key]
    try:
        return coerce(text, hint)
    except ValueError:
        wanted = field.metadata.get("expects") or describe_type(hint)
        raise ValueError(f"{getattr(cls, 'name', cls.__name__)}: {key} must be {wanted}, got {text.strip()!r}") from None


def given_options(reducer: Any) -> set[str]:
    """Options of ``reducer`` set to something other than their defaults (none for a reducer
    that is not a dataclass, i.e. has no options). A field marked ``metadata={"spec": False}`` (a
    Python object such as a module) is not an option."""
    if not dataclasses.is_dataclass(reducer):
        return set()
    return {f.name for f in dataclasses.fields(reducer)
            if f.metadata.get("spec", True) and getattr(reducer, f.name) != f.default}


def check_exclusive(cls: type, given: set[str]) -> None:
    """ValueError when ``given`` holds two options of one of ``cls.exclusive``'s groups (options
    that answer the same question, such as a keep rate and a token count)."""
    for group in getattr(cls, "exclusive", ()):
        both = [name for name in group if name in given]
        if len(both) > 1:
            raise ValueError(f"{getattr(cls, 'name', cls.__name__)}: give one of {' or '.join(group)}, not {' and '.join(both)}")


def format_value(value: Any) -> str:
    """A value written as a spec string reads it back."""
    if isinstance(value, tuple):
        return ";".join(format_value(v) for v in value) + (";" if len(value) == 1 else "")
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def to_spec(reducer: Any) -> str:
    """The spec string of a reducer, listing the options that differ from their defaults."""
    given = given_options(reducer)
    parts = [f"{f.name}={format_value(getattr(reducer, f.name))}" for f in dataclasses.fields(reducer) if f.name in given]
    return reducer.name + (":" + ",".join(parts) if parts else "")
