"""Zero-shot prompts: class names (one per class folder, in sorted folder order, or a mapping folder
-> name) and prompt templates, where ``{}`` stands for the class name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from vtc.harness.errors import HarnessError, listing, read_json

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def check_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple (a single string is one template); each must hold ``{}``."""
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates:
        raise HarnessError(f"no prompt templates; give at least one, e.g. {DEFAULT_TEMPLATES[0]!r}")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise HarnessError(f"templates without {{}} where the class name goes: {listing(repr(t) for t in bad)}; "
                           f"e.g. {DEFAULT_TEMPLATES[0]!r}")
    return templates


def prompt(template: str, name: str) -> str:
    """``template`` with every ``{}`` replaced by ``name`` (other braces are left alone)."""
    return template.replace("{}", name)


def match_class_names(classes: Sequence[str], names: Sequence[str] | Mapping[str, str]) -> list[str]:
    """The class name of each folder in ``classes`` (sorted): ``names`` in the same order, or a
    mapping folder -> name; a mismatch is an error naming the differences."""
    if isinstance(names, str):
        raise HarnessError("class names are a list (one per class folder, in sorted folder order) or a mapping folder -> name")
    if isinstance(names, Mapping):
        unknown = sorted(set(names) - set(classes))
        missing = [c for c in classes if c not in names]
        if unknown or missing:
            parts = ([f"no name for the folders {listing(missing)}"] if missing else []) + \
                    ([f"names for folders that do not exist: {listing(unknown)}"] if unknown else [])
            raise HarnessError(f"class names do not match the class folders: {'; '.join(parts)}")
        names = [names[c] for c in classes]
    names = list(names)
    if len(names) != len(classes):
        extra = (f"no name for the last folders {listing(classes[len(names):])}" if len(names) < len(classes)
                 else f"names beyond the last folder: {listing(names[len(classes):])}")
        raise HarnessError(f"{len(names)} class names for {len(classes)} class folders ({extra}); give one name per folder "
                           f"in sorted folder order ({listing(classes)}), or a JSON mapping folder -> name")
    blank = [c for c, n in zip(classes, names) if not isinstance(n, str) or not n.strip()]
    if blank:
        raise HarnessError(f"empty class names for the folders {listing(blank)}")
    return [n.strip() for n in names]


def _lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text()
    except OSError as error:
        raise HarnessError(f"cannot read the {what} file {path}: {error.strerror or error}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise HarnessError(f"the {what} file {path} is empty")
    return lines


def read_class_names(path: Path | str) -> list[str] | dict[str, str]:
    """Class names from a file: a ``.json`` object folder -> name, otherwise one name per line
    (blank lines skipped) in sorted folder order."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return _lines(path, "class names")
    names = read_json(path, "the class names file")
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise HarnessError(f'the class names file {path} must be a JSON object folder -> name, e.g. {{"n01440764": "tench"}}')
    return names


def read_templates(path: Path | str) -> tuple[str, ...]:
    """Prompt templates from a file, one per line (blank lines skipped), each with ``{}``."""
    return check_templates(_lines(Path(path), "templates"))
