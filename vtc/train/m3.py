"""M3 training (Cai et al., 2024, Sec. 3.2): fine-tune a trained LLaVA so that it answers from every
nested scale of its visual tokens.

Each step forwards the batch once per scale (the grid pooled after the projector,
:class:`vtc.reducers.m3.M3`) and averages the answer losses over the scales before one backward
pass, as the paper does (its ablation: averaging beats sampling one scale per step). The projector
and the LLM are trained, the vision tower is frozen (the released LLaVA-1.5-M3 code gives the tower
no gradient although its script asks for a tower learning rate); the model starts from the trained
LLaVA, not from its LLM alone (the paper's better initialisation). One cosine schedule with
warm-up, AdamW without weight decay, as the official recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vtc.data.training import cosine_lr
from vtc.reducers.m3 import M3, check_scale, nested_scales
from vtc.train.finetune import ConnectorFinetuner, FinetuneRecipe
from vtc.train.trainer import RunOptions


@dataclass(frozen=True)
class M3Recipe(FinetuneRecipe):
    """Everything that changes the trained weights (checked when a run resumes)."""

    steps: int = 800  # optimizer steps
    lr: float = 3e-4  # peak learning rate of the projector and the LLM
    scales: str = ""  # comma-separated token counts trained together ("" = every nested scale of the grid)


def parse_scales(text: str, grid: tuple[int, int]) -> list[int]:
    """The scales of ``text`` (comma-separated counts, "" = all nested scales), largest first."""
    if not text.strip():
        return list(nested_scales(grid))
    try:
        scales = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--scales takes comma-separated token counts such as 256,64,16,4,1; got {text!r}") from None
    return sorted({check_scale(s, grid) for s in scales}, reverse=True)


class M3Trainer(ConnectorFinetuner):
    name = "m3"

    def __init__(self, recipe: M3Recipe, out: Path, options: RunOptions = RunOptions()) -> None:
        super().__init__(recipe, out, options)
        self.scales = parse_scales(recipe.scales, self.grid)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.modules = self.model
        self.optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.trained = trained

    @property
    def architecture(self) -> dict[str, Any]:
        return {"model": self.base_name, "method": "m3", "scales": self.scales}

    def budgets(self) -> list[tuple[str, M3]]:
        return [(str(s), M3(tokens=s)) for s in self.scales]

    def train_step(self, step: int) -> dict[str, float]:
        r = self.recipe
        lr = cosine_lr(step, r.steps, r.lr, warmup=min(r.warmup, max(1, r.steps // 10)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs, pixel_values = self.batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        record: dict[str, float] = {"lr": lr}
        total = 0.0
        for scale in self.scales:  # one backward per scale: the same gradient as averaging first, less memory
            loss = self.answer_loss(M3(tokens=scale), inputs, pixel_values) / len(self.scales)
            loss.backward()
            record[f"loss_{scale}"] = loss.item() * len(self.scales)
            total += loss.item()
        self.average_gradients(self.trained)
        torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
        self.optimizer.step()
        record["loss"] = total
        return record

    def write_checkpoint(self, command: str, minutes: float, **fields: Any) -> dict:
        return super().write_checkpoint(command, minutes, method={"name": "m3", **asdict(self.recipe), "scales": self.scales})
