"""Resumable training state on disk: model and optimizer tensors in safetensors, step, RNG states
and the run's recipe in JSON. Pure plumbing shared by every trainer in vtc.

A state folder holds ``weights.safetensors`` (every trained module, tied weights stored once),
``optimizer.safetensors`` (the optimizer's per-parameter tensors), ``rng.safetensors`` (torch's
generator states) and ``state.json`` (step, recipe, architecture, numpy generator state, optimizer
hyper-parameters). Writes go to a sibling folder that replaces the old one only when complete, so
a run killed while saving keeps its previous state.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

STATE_JSON = "state.json"


class StateMismatchError(ValueError):
    """A saved state belongs to another architecture or recipe than the run resuming it."""


@dataclass
class TrainState:
    """What a resumed run needs besides the code: where it stopped and everything random."""

    step: int
    recipe: dict[str, Any]  # options that change the result (checked on resume)
    architecture: dict[str, Any]  # the model's shape (checked on resume)
    extra: dict[str, Any] = field(default_factory=dict)  # free JSON (e.g. elapsed minutes)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def save_state(folder: Path, state: TrainState, modules: torch.nn.Module, optimizer: torch.optim.Optimizer,
               numpy_rng: np.random.Generator) -> Path:
    """Write ``state`` atomically into ``folder`` (replacing a previous state there)."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(modules, str(partial / "weights.safetensors"))
    tensors, optimizer_meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(partial / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(partial / "rng.safetensors"))
    (partial / STATE_JSON).write_text(json.dumps(dict(
        step=state.step, recipe=state.recipe, architecture=state.architecture, extra=state.extra,
        numpy_rng=numpy_rng.bit_generator.state, optimizer=optimizer_meta), indent=1) + "\n")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_state(folder: Path) -> TrainState:
    """The JSON part of a saved state (no tensors loaded)."""
    path = Path(folder) / STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no training state in {folder} (expected {STATE_JSON}); start without --resume")
    meta = json.loads(path.read_text())
    return TrainState(meta["step"], meta["recipe"], meta["architecture"], meta.get("extra", {}))


def check_compatible(saved: TrainState, recipe: dict[str, Any], architecture: dict[str, Any], folder: Path) -> None:
    """Refuse to resume a state of another architecture or recipe, naming what differs."""
    for what, theirs, ours in (("architecture", saved.architecture, architecture), ("recipe", saved.recipe, recipe)):
        ours = json.loads(json.dumps(ours))  # compare as saved (tuples become lists)
        if theirs != ours:
            keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            details = ", ".join(f"{k}: saved {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in keys)
            raise StateMismatchError(f"cannot resume from {folder}: its {what} differs ({details})")


def load_state(folder: Path, modules: torch.nn.Module, optimizer: torch.optim.Optimizer,
               numpy_rng: np.random.Generator, recipe: dict[str, Any], architecture: dict[str, Any]) -> TrainState:
    """Restore modules, optimizer and RNG states from ``folder`` after checking it belongs to this
    architecture and recipe; returns the saved :class:`TrainState` (its ``step`` is the next step)."""
    folder = Path(folder)
    saved = read_state(folder)
    check_compatible(saved, recipe, architecture, folder)
    meta = json.loads((folder / STATE_JSON).read_text())
    load_model(modules, str(folder / "weights.safetensors"), strict=True)
    _load_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), meta["optimizer"])
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    numpy_rng.bit_generator.state = meta["numpy_rng"]
    return saved
