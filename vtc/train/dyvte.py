"""Training DyVTE's routers on a frozen trained LLaVA (Wu et al., 2025, Sec. 3.3; :mod:`vtc.reducers.dyvte`).

Each step takes a batch of single-turn shapes questions (the official data is single-turn image
QA), teacher-forces the frozen model on the answers once unreduced and once with the image
hidden after each layer k (``exit:layer=k,mode=mask``, the official masking), labels every
(sample, k) with :func:`~vtc.reducers.dyvte.exit_labels` (greedy answer tokens agree on more than
99%, answer cross-entropy below 1.03x), and trains router k on the features of layer k's output
with the cross-entropy of those labels. Only the routers learn; their input is detached.

Departure from the official code, as the spec's recipe allows: every step labels all layers for
every sample (the official one samples one k per step, so each of 32 routers sees a handful of
batches); on a 6-layer LLM this costs six forwards per step, no backward through the LLM. The
router width defaults to 256 (the official 2048 is sized for a 4096-wide LLM).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vtc.apply import apply
from vtc.data import shapes
from vtc.data.evaluate import ExitScores, exit_scores
from vtc.data.training import cosine_lr
from vtc.models.zoo import write_card
from vtc.reducers.dyvte import DyVTE, RouterConfig, Routers, exit_labels, router_features
from vtc.reducers.exit import VisualExit
from vtc.train.finetune import ConnectorFinetuner, FinetuneRecipe
from vtc.train.trainer import RunOptions


@dataclass(frozen=True)
class DyVTERecipe(FinetuneRecipe):
    """Everything that changes the trained routers (checked when a run resumes)."""

    per_type: int = 0  # single-turn questions (the image's own question only)
    steps: int = 500  # optimizer steps
    lr: float = 1e-3  # peak learning rate of the routers
    width: int = 256  # hidden units of each router
    agreement: float = 0.99  # label "exit" only where more of the answer's greedy tokens agree
    loss_ratio: float = 1.03  # ... and the answer cross-entropy with the exit stays below this times the full


class DyVTETrainer(ConnectorFinetuner):
    """Routers for ``recipe.base``; the run's folder becomes the routers' folder (``dyvte.json``,
    ``routers.safetensors``, ``card.json`` with the test accuracy and exit layers)."""

    name = "dyvte"

    def __init__(self, recipe: DyVTERecipe, out: Path, options: RunOptions = RunOptions()) -> None:
        super().__init__(recipe, out, options)
        self.model.eval()
        self.model.requires_grad_(False)
        text = self.model.config.text_config
        config = RouterConfig(text.num_hidden_layers, text.hidden_size, recipe.width, self.base_name)
        self.routers = Routers(config).to(self.device)
        self.modules = torch.nn.ModuleDict({"routers": self.routers})
        self.optimizer = torch.optim.AdamW(self.routers.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    @property
    def architecture(self) -> dict[str, Any]:
        return {"model": self.base_name, "method": "dyvte", **asdict(self.routers.config)}

    def budgets(self) -> list[tuple[str, DyVTE]]:
        return [("argmax", DyVTE(module=self.routers))]

    @torch.no_grad()
    def exit_targets(self, inputs: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per layer k but the last: router features (K, B, 2D), labels (K, B) and which rows
        can decide (K, B), from one unreduced and K masked teacher-forced forwards."""
        labels = inputs["labels"]
        plain = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "pixel_values": pixel_values}
        visual = inputs["input_ids"] == self.model.config.image_token_id
        prompt = inputs["attention_mask"].bool() & (labels == -100)
        layers = self.model.model.language_model.layers
        outputs: dict[int, torch.Tensor] = {}

        def keep(k: int, _module: Any, _args: Any, out: Any) -> None:
            outputs[k] = out[0] if isinstance(out, tuple) else out

        hooks = [layer.register_forward_hook(partial(keep, k)) for k, layer in enumerate(layers[:-1])]
        try:
            full = self.model(**plain).logits[:, :-1]
        finally:
            for hook in hooks:
                hook.remove()
        targets = labels[:, 1:]
        features, decidable, exits = [], [], []
        for k in range(len(layers) - 1):
            f, d = router_features(outputs[k], visual, prompt)
            with apply(self.model, VisualExit(layer=k, mode="mask")):
                exited = self.model(**plain).logits[:, :-1]
            if exited.shape != full.shape:
                raise RuntimeError(f"dyvte: the masked forward returned logits {tuple(exited.shape)}, "
                                   f"expected {tuple(full.shape)}")
            features.append(f)
            decidable.append(d)
            exits.append(exit_labels(full, exited, targets, self.recipe.agreement, self.recipe.loss_ratio))
        return torch.stack(features), torch.stack(exits), torch.stack(decidable)

    def train_step(self, step: int) -> dict[str, float]:
        r = self.recipe
        lr = cosine_lr(step, r.steps, r.lr, warmup=min(r.warmup, max(1, r.steps // 10)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        features, exits, decidable = self.exit_targets(*self.batch(step))
        logits = torch.stack([self.routers(k, features[k]) for k in range(features.shape[0])])
        losses = F.cross_entropy(logits.flatten(0, 1), exits.flatten().long(), reduction="none")
        weight = decidable.flatten().float()
        loss = (losses * weight).sum() / weight.sum().clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.routers.parameters())
        self.average_gradients(params)
        self.optimizer.step()
        right = ((logits.argmax(-1) == exits.long()).float() * decidable).sum() / decidable.sum().clamp(min=1)
        return {"lr": lr, "loss": loss.item(), "exit_rate": exits.float().mean().item(),
                "router_accuracy": right.item()}

    @torch.no_grad()
    def exit_scores(self, examples: list[shapes.Example]) -> ExitScores:
        with apply(self.model, DyVTE(module=self.routers)):
            return exit_scores(self.model, self.processor, examples)

    def evaluate(self, step: int) -> dict[str, Any]:
        result = self.exit_scores(shapes.examples("val", self.options.eval_examples))
        return {"accuracy": round(result.scores.accuracy, 4), "mean_exit_layer": round(result.mean_exit_layer, 3)}

    def write_checkpoint(self, command: str, minutes: float, **fields: Any) -> dict:
        """The routers (``dyvte.json`` + ``routers.safetensors``), ``training.json`` (validation)
        and ``card.json``: the test split under DyVTE with the exit layer of every example."""
        self.routers.save(self.out)
        val = self.exit_scores(shapes.examples("val", self.options.val_examples))
        r = self.recipe
        self.record(command, minutes, base=self.base_name, method={"name": "dyvte", **asdict(r)},
                    val_accuracy=val.scores.accuracy, val_by_type=val.scores.by_type(),
                    val_mean_exit_layer=val.mean_exit_layer, val_questions=self.options.val_examples,
                    data=f"vtc.data.shapes train split indices {r.image_offset} .. "
                         f"{r.image_offset + self.steps * r.batch - 1}, one question per image")
        test = self.exit_scores(shapes.examples("test", self.options.test_examples))
        layers = self.routers.config.num_layers
        histogram = {str(k): test.exit_layers.count(k) for k in range(layers)}
        return write_card(self.out, test.scores, spec=f"dyvte:routers={self.base_name}", model=self.base_name,
                          mean_exit_layer=round(test.mean_exit_layer, 4), exit_layers=histogram)
