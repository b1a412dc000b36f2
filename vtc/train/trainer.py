"""What every vtc trainer shares: run options, resumable save/load, the run to the end or the
time limit, and the training record. A recipe subclass supplies the model, the steps, the
validation and the checkpoint it writes."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vtc.data import shapes
from vtc.train.curve import plot_curve
from vtc.train.loop import JsonLog, LoopConfig, run_loop
from vtc.train.output import training_output
from vtc.train.state import TrainState, load_state, save_state

STATE_DIR = "train-state"
LOG = "training.jsonl"
CURVE = "learning-curve.png"


@dataclass(frozen=True)
class RunOptions:
    """What does not change the trained weights: validation, saving, time limit, device, threads."""

    eval_every: int = 100  # validate after every this many steps (and after the last)
    eval_examples: int = 250  # validation examples at each of those (types cycle)
    save_every: int = 50  # save a resumable state after every this many steps
    max_minutes: float | None = None  # stop at a save point after this much wall time
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | cuda:N; the CPU run is the reference
    threads: int | None = None  # torch CPU threads (default: torch's)
    val_examples: int = 500  # validation examples recorded in training.json at the end
    test_examples: int = shapes.SPLITS["test"][1]  # test examples of the card at the end


def launched_processes() -> int:
    """Processes ``accelerate launch`` (or torchrun) started for this run (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; anything else as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Trainer:
    """Subclasses set ``name``, build ``modules`` (everything trained, saved in the state),
    ``optimizer`` and ``rng`` (the one numpy generator of the recipe), and implement
    :meth:`train_step`, :meth:`evaluate` and :meth:`write_checkpoint`."""

    name: ClassVar[str]
    modules: torch.nn.Module
    optimizer: torch.optim.Optimizer

    data_parallel: ClassVar[bool] = False  # runs under ``accelerate launch`` with several processes

    def __init__(self, recipe: Any, out: Path, options: RunOptions) -> None:
        self.recipe, self.out, self.options = recipe, Path(out), options
        if options.threads:
            torch.set_num_threads(options.threads)
        torch.manual_seed(recipe.seed)
        self.rng = np.random.default_rng(recipe.seed)
        self.device = torch.device(resolve_device(options.device))
        self.accelerator = None
        if launched_processes() > 1:
            if not self.data_parallel:
                raise RuntimeError(f"the {self.name} trainer runs in one process; start it without accelerate launch")
            try:
                from accelerate import Accelerator
            except ImportError:
                raise RuntimeError("several processes need accelerate, which vtc's train extra installs: "
                                   "pip install 'vtc-vlm[train]'") from None
            self.accelerator = Accelerator(cpu=self.device.type == "cpu")
            self.device = self.accelerator.device

    # ----- several processes (accelerate launch) -------------------------------------------------
    @property
    def processes(self) -> tuple[int, int]:
        """(this process's index, the number of processes); (0, 1) without accelerate."""
        if self.accelerator is None:
            return 0, 1
        return self.accelerator.process_index, self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        """The process that writes the state, the log, the curve and the checkpoint."""
        return self.processes[0] == 0

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the processes (each saw its share of the batch)."""
        if self.accelerator is not None:
            for p in params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def any_process(self, flag: bool) -> bool:
        """True when ``flag`` holds on any process, so that all stop at the same step."""
        if self.accelerator is None:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum").item() > 0)

    @property
    def architecture(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def steps(self) -> int:
        return self.recipe.steps

    def start_fresh(self) -> None:
        """Prepare a run that starts at step 0 (not called when a run resumes from its state)."""

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, Any]:
        raise NotImplementedError

    def write_checkpoint(self, command: str, minutes: float) -> dict:
        raise NotImplementedError

    # ----- state --------------------------------------------------------------------------------
    def save(self, step: int, minutes: float) -> None:
        save_state(self.out / STATE_DIR, TrainState(step, asdict(self.recipe), self.architecture, {"minutes": minutes}),
                   self.modules, self.optimizer, self.rng)

    def resume(self) -> TrainState:
        return load_state(self.out / STATE_DIR, self.modules, self.optimizer, self.rng, asdict(self.recipe),
                          self.architecture)

    def record(self, command: str, minutes: float, **fields: Any) -> None:
        """``training.json``: the command, recipe, architecture, time and device, plus ``fields``."""
        (self.out / "training.json").write_text(json.dumps(dict(
            command=command, recipe=asdict(self.recipe), architecture=self.architecture, minutes=minutes,
            device=str(self.device), threads=self.options.threads or torch.get_num_threads(), **fields),
            indent=2) + "\n")

    # ----- the run ------------------------------------------------------------------------------
    def run(self, resume: bool = False, overwrite: bool = False, command: str = "") -> bool:
        """Train (or, with ``resume``, continue the run saved in ``out``) to the end or the time
        limit, logging to ``training.jsonl`` and drawing ``learning-curve.png``; on completion
        write the checkpoint. An ``out`` holding a checkpoint or another run is refused unless
        ``resume`` or ``overwrite`` (:func:`vtc.train.output.training_output`). Returns True when
        every step ran."""
        if self.is_main:
            training_output(self.out, STATE_DIR, overwrite, resume)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        start, minutes_before = 0, 0.0
        if resume:
            saved = self.resume()
            start, minutes_before = saved.step, float(saved.extra.get("minutes", 0.0))
        else:
            self.start_fresh()
        log = JsonLog(self.out / LOG, resume_step=start if resume else None) if self.is_main else None
        began = time.monotonic()

        def minutes() -> float:
            return round(minutes_before + (time.monotonic() - began) / 60, 2)

        def save(step: int) -> None:
            if self.is_main:
                self.save(step, minutes())

        options = self.options
        config = LoopConfig(self.steps, options.eval_every, options.save_every, options.max_minutes)
        finished = run_loop(config, start, self.train_step, save, log, self.evaluate if self.is_main else None,
                            description=self.name, agree=self.any_process, progress=self.is_main)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        if not self.is_main:
            return finished
        plot_curve(self.out / LOG, self.out / CURVE, title=self.name)
        if finished:
            self.write_checkpoint(command, minutes())
        return finished
