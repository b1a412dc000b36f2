"""MQT training (Hu et al., 2024, Sec. 3 and the official recipe): a query transformer replaces the
projector of a trained LLaVA, in two stages.

1. **alignment** (``stage1_steps``): the query transformer alone learns, with all M queries, while
   the LLM (and the vision tower) stay frozen.
2. **Matryoshka** (``stage2_steps``): the query transformer and the LLM learn together; every step
   keeps only the first m queries, m drawn per step: uniform over the even numbers 2..M as the
   official code draws it (``prefix=even``; odd m and m = 1 are never trained), or log-uniform
   over 1..M (``prefix=log-uniform``, an option that trains small prefixes more often).

The vision tower stays frozen throughout (CLIP is frozen in MQT); the LLaVA projector is not used.
The official runs start the LLM from Vicuna (text only); here it starts from the shipped
shapes-llava's decoder, the nearest thing to "a pretrained LLM" for the shapes data. AdamW without
weight decay, cosine schedule with warm-up per stage. The official rates (1e-3, then 2e-5) go with
batches of 256 / 128 over 558K / 665K examples; the defaults here are those of the shipped
shapes-llava-mqt (batches of 16, about an hour on one CPU thread): at 1e-3 the alignment stage
left the attention of every query spread over most of the grid and the model at 45% (run r1,
BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtc.data.training import set_two_stage_lr
from vtc.reducers.mqt import MQT, SHIPPED_FOLDER, QueryTransformer, QueryTransformerConfig
from vtc.train.finetune import ConnectorFinetuner, FinetuneRecipe
from vtc.train.trainer import RunOptions

PREFIX_RULES = ("even", "log-uniform")


@dataclass(frozen=True)
class MQTRecipe(FinetuneRecipe):
    """Everything that changes the trained weights (checked when a run resumes)."""

    stage1_steps: int = 600  # alignment: query transformer alone, all queries
    stage1_lr: float = 5e-3  # its peak learning rate
    stage2_steps: int = 2800  # Matryoshka stage: query transformer + LLM, a random prefix per step
    lr: float = 5e-4  # peak learning rate of the second stage
    queries: int = 256  # M (a square number)
    heads: int = 0  # attention heads (0 = the vision tower's)
    keys: str = "positions"  # positions (the released model) | features (keys from the image)
    prefix: str = "even"  # how m is drawn in stage 2: even (official: 2, 4, .., M) | log-uniform (1..M)

    def __post_init__(self) -> None:
        if self.prefix not in PREFIX_RULES:
            raise ValueError(f"prefix must be one of {', '.join(PREFIX_RULES)}, got {self.prefix!r}")

    @property
    def steps(self) -> int:
        return self.stage1_steps + self.stage2_steps


def draw_prefix(rng: np.random.Generator, queries: int, rule: str) -> int:
    """One m for a stage-2 step: uniform over the even numbers 2..M (``even``; M // 2 values) or
    ``round(exp(u))``, u uniform in [0, log M] (``log-uniform``)."""
    if rule == "even":
        return 2 * int(rng.integers(1, queries // 2 + 1))
    if rule == "log-uniform":
        return int(min(queries, max(1, round(math.exp(rng.uniform(0.0, math.log(queries)))))))
    raise ValueError(f"prefix must be one of {', '.join(PREFIX_RULES)}, got {rule!r}")


class MQTTrainer(ConnectorFinetuner):
    name = "mqt"

    def __init__(self, recipe: MQTRecipe, out: Path, options: RunOptions = RunOptions()) -> None:
        super().__init__(recipe, out, options)
        config = self.model.config
        heads = recipe.heads or config.vision_config.num_attention_heads
        self.transformer = QueryTransformer(QueryTransformerConfig(
            config.vision_config.hidden_size, config.text_config.hidden_size, recipe.queries, heads, recipe.keys))
        self.transformer.to(self.device)
        self.llm = [p for p in self.model.model.language_model.parameters()] + list(self.model.lm_head.parameters())
        self.model.model.multi_modal_projector.requires_grad_(False)
        self.modules = torch.nn.ModuleDict({"model": self.model, "transformer": self.transformer})
        self.optimizer = torch.optim.AdamW([{"params": list(self.transformer.parameters()), "name": "transformer"},
                                            {"params": self.llm, "name": "llm"}], lr=recipe.lr,
                                           weight_decay=recipe.weight_decay)

    @property
    def architecture(self) -> dict[str, Any]:
        return {"model": self.base_name, "method": "mqt", **asdict(self.transformer.config)}

    def budgets(self) -> list[tuple[str, MQT]]:
        counts = sorted({self.recipe.queries, 64, 16, 4, 1} & set(range(1, self.recipe.queries + 1)), reverse=True)
        return [(str(m), MQT(tokens=m, transformer=self.transformer)) for m in counts]

    def train_step(self, step: int) -> dict[str, float]:
        r = self.recipe
        first = set_two_stage_lr(self.optimizer, step, r.stage1_steps, r.stage2_steps, r.warmup,
                                 {"transformer": r.stage1_lr, "llm": 0.0}, {"transformer": r.lr, "llm": r.lr})
        for p in self.llm:
            p.requires_grad_(not first)
        tokens = r.queries if first else draw_prefix(self.rng, r.queries, r.prefix)
        inputs, pixel_values = self.batch(step)
        loss = self.answer_loss(MQT(tokens=tokens, transformer=self.transformer), inputs, pixel_values)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trained = list(self.transformer.parameters()) + ([] if first else self.llm)
        self.average_gradients(trained)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        self.optimizer.step()
        return {"lr": self.optimizer.param_groups[0]["lr"], "tokens": tokens, "loss": loss.item()}

    def write_checkpoint(self, command: str, minutes: float, **fields: Any) -> dict:
        """The LLaVA folder (its projector unused) with the query transformer in ``mqt/``."""
        self.transformer.save(self.out / SHIPPED_FOLDER)
        return super().write_checkpoint(command, minutes, method={"name": "mqt", **asdict(self.recipe)})
