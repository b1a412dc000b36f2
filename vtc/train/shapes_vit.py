"""Training recipe of the ``shapes-vit`` classifier: a small timm ViT reading the printed digit.

The model is timm's ``vit_tiny_patch16_224`` architecture resized to the shapes images: 64 x 64
pixels, 4 x 4 patches (256 patch tokens + CLS), width 96, 6 blocks, 3 heads, 10 classes. Training
draws fresh examples from the train split in order (``step * batch + i``; no epochs, nothing
stored), AdamW with warm-up and cosine decay, and an auxiliary per-patch loss (a linear head on
the last patch tokens predicts the digit each digit patch belongs to, digit patches weighted up)
that is dropped when saving: the saved model is a plain timm classifier, written with
``timm.models.save_for_hf`` and loaded with ``timm.create_model("local-dir:<folder>")`` or
``vtc.models.zoo.load("shapes-vit")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf

from vtc.data import shapes
from vtc.data.evaluate import classifier_scores
from vtc.data.training import MEAN, NO_DIGIT, STD, cosine_lr, patch_targets, pixels
from vtc.models.zoo import write_card
from vtc.train.trainer import RunOptions, Trainer

ARCH = "vit_tiny_patch16_224"
MODEL_ARGS = dict(img_size=shapes.IMAGE_SIZE, patch_size=4, embed_dim=96, depth=6, num_heads=3, num_classes=10)
DIGIT_BOOST = 9.0  # weight of digit patches in the auxiliary loss (the few patches that carry the signal)


@dataclass(frozen=True)
class ShapesVitRecipe:
    """Everything that changes the trained weights (checked when a run resumes)."""

    steps: int = 3000  # optimizer steps
    batch: int = 64  # images per step
    lr: float = 1.5e-3  # peak learning rate (cosine schedule)
    warmup: int = 100  # warm-up steps
    aux_weight: float = 0.5  # weight of the per-patch auxiliary loss beside the digit loss
    weight_decay: float = 0.05  # AdamW weight decay
    seed: int = 0  # seeds the initialisation and the data order


def build_vit(model_args: dict[str, Any] = MODEL_ARGS) -> torch.nn.Module:
    """A freshly initialised shapes-vit (timm), with the shapes image statistics in its config."""
    model = timm.create_model(ARCH, pretrained=False, **model_args)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=MEAN, std=STD, input_size=(3, 64, 64),
                                crop_pct=1.0, interpolation="bilinear", num_classes=10)
    return model


class ShapesVitTrainer(Trainer):
    name = "shapes-vit"

    def __init__(self, recipe: ShapesVitRecipe, out: Path, options: RunOptions = RunOptions(),
                 model_args: dict[str, Any] = MODEL_ARGS) -> None:
        super().__init__(recipe, out, options)
        self.model_args = dict(model_args)
        self.model = build_vit(self.model_args).to(self.device).train()
        self.aux = torch.nn.Linear(self.model.embed_dim, NO_DIGIT + 1).to(self.device)
        self.modules = torch.nn.ModuleDict({"model": self.model, "aux": self.aux})
        self.optimizer = torch.optim.AdamW(self.modules.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    @property
    def architecture(self) -> dict[str, Any]:
        return {"model": ARCH, **self.model_args}

    def train_step(self, step: int) -> dict[str, float]:
        r = self.recipe
        lr = cosine_lr(step, r.steps, r.lr, warmup=min(r.warmup, max(1, r.steps // 10)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = [shapes.example("train", step * r.batch + i) for i in range(r.batch)]
        tokens = self.model.forward_features(pixels([e.image for e in batch]).to(self.device))
        loss = F.cross_entropy(self.model.forward_head(tokens), torch.tensor([e.label for e in batch], device=self.device))
        target = patch_targets(batch, self.model_args["patch_size"])["digit"].flatten().to(self.device)
        weight = 1.0 + DIGIT_BOOST * (target != NO_DIGIT).float()
        patch_logits = self.aux(tokens[:, self.model.num_prefix_tokens:]).flatten(0, 1)
        loss_aux = (F.cross_entropy(patch_logits, target, reduction="none") * weight).sum() / weight.sum()
        self.optimizer.zero_grad(set_to_none=True)
        (loss + r.aux_weight * loss_aux).backward()
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
        self.optimizer.step()
        return {"lr": lr, "loss": loss.item(), "aux": loss_aux.item()}

    def evaluate(self, step: int) -> dict[str, Any]:
        scores = classifier_scores(self.model.eval(), shapes.examples("val", self.options.eval_examples))
        self.model.train()
        return {"accuracy": round(scores.accuracy, 4)}

    def write_checkpoint(self, command: str, minutes: float) -> dict:
        """The plain timm classifier (``save_for_hf``), ``training.json`` and ``card.json``."""
        self.model.eval()
        save_for_hf(self.model, str(self.out), model_args=self.model_args, safe_serialization=True)
        val = classifier_scores(self.model, shapes.examples("val", self.options.val_examples))
        r = self.recipe
        self.record(command, minutes, val_accuracy=val.accuracy, val_images=self.options.val_examples,
                    data=f"vtc.data.shapes train split, indices 0 .. {r.steps * r.batch - 1}")
        return write_card(self.out, classifier_scores(self.model, shapes.examples("test", self.options.test_examples)))
