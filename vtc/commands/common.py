"""Option types and checks every ``vtc`` subcommand shares: positive integers, reducer specs,
devices and dtypes that exist on this machine, and output folders that never replace a user's
files without ``--overwrite``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vtc.commands.options import Flag
from vtc.spec import parse_reducer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class OutputDirError(ValueError):
    """``--out`` cannot be used as given."""


def reducer_spec(text: str) -> str:
    """argparse type: a reducer spec string, checked by the registry (clear message if bad)."""
    try:
        parse_reducer(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"bad reducer spec {text!r}: {error}") from None
    return text


def positive_int(text: str) -> int:
    return _int_from(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_from(text, 0, "a non-negative integer")


def _int_from(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N``, refused when this machine lacks it (never a
    silent fall-back to the CPU)."""
    name = text.strip().lower()
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available on this machine "
                                             "(torch.cuda.is_available() is False); use --device cpu")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has CUDA devices 0 .. {torch.cuda.device_count() - 1}")
        return name
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose cpu, cuda or cuda:N")


def dtype(text: str) -> torch.dtype:
    """argparse type: one of :data:`DTYPES` by name."""
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[text]


# How an options dataclass's ``device`` / ``dtype`` fields appear: checked against this machine.
DEVICE_FLAGS = {"device": Flag(type=device, metavar="DEV", example="--device cuda"),
                "dtype": Flag(type=dtype, metavar="DTYPE", example="--dtype bfloat16 on a GPU")}


def add_device_options(parser: argparse.ArgumentParser, dtypes: bool = True) -> None:
    """``--device`` (and ``--dtype``) with their help."""
    parser.add_argument("--device", type=device, default="cpu", metavar="DEV",
                        help="torch device: cpu (default), cuda or cuda:N; refused when absent, e.g. --device cuda")
    if dtypes:
        parser.add_argument("--dtype", type=dtype, default=torch.float32, metavar="DTYPE",
                            help=f"weights and inputs in this dtype: {', '.join(DTYPES)} (default float32), "
                                 "e.g. --dtype bfloat16 on a GPU")


def output_dir(path: Path, overwrite: bool) -> tuple[Path, str | None]:
    """Where to write: ``path`` itself when it is new, empty or ``overwrite`` is set; otherwise a
    new ``run-<timestamp>`` subfolder, so existing files are never replaced without asking.
    Returns the folder (not yet created) and a note for the user, or None."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--out {path} exists and is not a folder")
    if overwrite or not path.exists() or not any(path.iterdir()):
        return path, None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = path / f"run-{stamp}", 1
    while candidate.exists():
        candidate, n = path / f"run-{stamp}-{n}", n + 1
    return candidate, (f"{path} is not empty: writing into {candidate} instead "
                       f"(pass --overwrite to write into {path} itself)")


def prepare_output(parser: argparse.ArgumentParser, path: Path, overwrite: bool) -> Path:
    """:func:`output_dir` for a command: a bad ``--out`` is a usage error, the note goes to
    stderr, and the folder is created."""
    try:
        out, note = output_dir(path, overwrite)
    except OutputDirError as error:
        parser.error(str(error))
    if note:
        print(note, file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    return out
