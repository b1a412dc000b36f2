"""Where a trainer writes: refuse to replace a checkpoint or a run without being asked."""

from __future__ import annotations

import shutil
from pathlib import Path

CHECKPOINT_FILES = ("config.json", "model.safetensors", "dyvte.json")  # a model or routers (DyVTE)


class OutputError(ValueError):
    """``--out`` cannot be used as given."""


def training_output(out: Path, state_dir: str, overwrite: bool, resume: bool) -> Path:
    """Check and create ``out`` for a training run. A folder holding a checkpoint or a training
    state is only written into with ``resume`` (continue that run) or ``overwrite`` (start over:
    the old state is removed); a new or empty folder is always fine."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    state = out / state_dir
    if resume:
        if overwrite:
            raise OutputError("--resume continues the run in --out; --overwrite starts it over: pass one of them")
        if not (state / "state.json").is_file():
            raise OutputError(f"--resume: no training state in {state}; start without --resume")
        return out
    taken = [name for name in (*CHECKPOINT_FILES, state_dir) if (out / name).exists()]
    if taken and not overwrite:
        raise OutputError(f"--out {out} already holds {', '.join(taken)}; pass --resume to continue that run or "
                          f"--overwrite to replace it")
    if overwrite:
        shutil.rmtree(state, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out
