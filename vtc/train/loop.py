"""The step loop every vtc trainer runs: progress bar, JSON-lines log, periodic validation and
saves, a wall-clock limit that stops at a save point, and resumption from the last save.

The loop knows nothing of models: it calls ``train_step(step)`` (returns the numbers to log),
``evaluate(step)`` (returns validation numbers) and ``save(step)`` (writes a resumable state in
which ``step`` is the next step to run). A run resumed from a save therefore repeats exactly the
calls an uninterrupted run makes from that step on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm


@dataclass(frozen=True)
class LoopConfig:
    """When the loop validates, saves and stops."""

    steps: int
    eval_every: int = 100  # validate after every this many steps (and after the last)
    save_every: int = 100  # save a resumable state after every this many steps (and at the end)
    max_minutes: float | None = None  # stop at a save point once this much wall time has passed

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


class JsonLog:
    """An append-only JSON-lines log. Opening it to resume at ``step`` drops the records a killed
    run wrote after its last save, so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in read_log(self.path)
                    if line["step"] < resume_step or ("val" in line and line["step"] == resume_step)]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines log (an empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_loop(config: LoopConfig, start: int, train_step: Callable[[int], dict[str, float]],
             save: Callable[[int], None], log: JsonLog | None, evaluate: Callable[[int], dict[str, Any]] | None = None,
             description: str = "train", agree: Callable[[bool], bool] = bool, progress: bool = True) -> bool:
    """Run steps ``start .. config.steps - 1``. Training records carry ``step`` (the step just
    run), validation records ``step`` = steps done and ``val``. Returns True when every step ran,
    False when the time limit stopped the run (after saving). With several processes only one
    logs (the others pass ``log`` None) and ``agree`` makes every process stop at the same step
    (true when the limit is reached on any)."""
    began = time.monotonic()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=description, unit="step",
               disable=not progress)
    for step in bar:
        record = train_step(step)
        if log is not None:
            log.write({"step": step, **record})
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if isinstance(v, float)})
        done = step + 1
        if evaluate is not None and (done % config.eval_every == 0 or done == config.steps):
            result = evaluate(done)
            if log is not None:
                log.write({"step": done, "val": result})
            bar.write(f"step {done}: {json.dumps(result)}")
        out_of_time = agree(config.max_minutes is not None and time.monotonic() - began >= 60 * config.max_minutes)
        if done % config.save_every == 0 or done == config.steps or out_of_time:
            save(done)
        if out_of_time and done < config.steps:
            bar.close()
            print(f"stopped at the time limit ({config.max_minutes} min) after step {done}; "
                  f"continue with --resume")
            return False
    bar.close()
    return True
