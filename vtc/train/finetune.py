"""Fine-tuning a trained LLaVA under a connector method (M3, MQT): what both trainers share.

The base model comes from the zoo or a checkpoint folder (``base``); its vision tower stays frozen
(M3's released training gives it no gradient; MQT freezes CLIP). Batches are the shapes-llava
recipe's multi-turn conversations (:func:`vtc.data.shapes` images in order from
``image_offset``, every question type per image; ``accelerate launch`` splits every batch between
its processes and averages their gradients), and the loss is the LLaVA answer loss (next-token
cross-entropy on the answers, prompts and padding masked) computed through ``vtc.apply`` with the
method's reducer, i.e. on exactly the sequence the method gives the LLM at inference. A batch
holds ``batch`` images of different conversation lengths (right padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vtc.apply import apply
from vtc.data import shapes
from vtc.data.evaluate import Scores, vlm_scores
from vtc.data.training import pixels
from vtc.models.zoo import SUBSET, load, write_card
from vtc.sites import Reducer
from vtc.train.shapes_llava import collate, conversation
from vtc.train.trainer import RunOptions, Trainer


@dataclass(frozen=True)
class FinetuneRecipe:
    """What every connector fine-tuning recipe has (a subclass adds the method's fields)."""

    base: str = "shapes-llava"  # the trained LLaVA to start from: a zoo name or a checkpoint folder
    batch: int = 16  # images per step (each with a multi-turn conversation)
    per_type: int = 2  # extra questions per type and image
    warmup: int = 30  # warm-up steps of each stage's cosine schedule
    weight_decay: float = 0.0  # AdamW weight decay (M3 and MQT use 0)
    image_offset: int = 140000  # index of the first train image (after those the shipped shapes-llava saw)
    seed: int = 0  # seeds the data order, the initialisation of new weights and the sampled choices


class ConnectorFinetuner(Trainer):
    """Loads ``recipe.base``, freezes its tower, and builds the shapes batches; a subclass sets
    ``modules`` / ``optimizer``, implements ``train_step`` with :meth:`answer_loss` (averaging the
    gradients over processes before its optimizer step), and names the reducers it validates
    (:meth:`budgets`). Under ``accelerate launch`` each process takes its share of every batch."""

    data_parallel = True

    def __init__(self, recipe: Any, out, options: RunOptions = RunOptions()) -> None:
        super().__init__(recipe, out, options)
        base = load(recipe.base)
        self.base_name = base.name
        self.model, self.processor = base.model.to(self.device), base.processor
        self.model.train()
        self.tower = self.model.model.vision_tower
        self.tower.eval()
        self.tower.requires_grad_(False)
        grid = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        self.grid = (grid, grid)
        self.image_tokens = grid * grid

    def batch(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Inputs (ids, labels, mask; the processor's full placeholder count) and pixels of
        ``step``: with several processes this process's share of the rows (every process draws
        the whole batch's conversations, so the random stream is the same for any process count)."""
        r = self.recipe
        examples = [shapes.example("train", r.image_offset + step * r.batch + i) for i in range(r.batch)]
        tokenizer = self.processor.tokenizer
        conversations = [conversation(e, tokenizer, self.image_tokens, self.rng, r.per_type) for e in examples]
        index, count = self.processes
        examples, conversations = examples[index::count], conversations[index::count]
        inputs = {k: v.to(self.device) for k, v in collate(conversations, tokenizer.pad_token_id).items()}
        return inputs, pixels([e.image for e in examples]).to(self.device)

    def answer_loss(self, reducer: Reducer, inputs: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
        """The LLaVA answer loss of ``inputs`` with ``reducer`` applied to the model."""
        with apply(self.model, reducer):
            return self.model(**inputs, pixel_values=pixel_values).loss

    def budgets(self) -> list[tuple[str, Reducer]]:
        """(label, reducer) of every budget validated and reported on the card."""
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, examples: list[shapes.Example]) -> dict[str, Scores]:
        self.model.eval()
        out = method_scores(self.model, self.processor, self.budgets(), examples)
        self.model.train()
        self.tower.eval()
        return out

    def evaluate(self, step: int) -> dict[str, Any]:
        scores = self.scores(shapes.examples("val", self.options.eval_examples))
        return {"accuracy": {label: round(s.accuracy, 4) for label, s in scores.items()}}

    def write_checkpoint(self, command: str, minutes: float, **fields: Any) -> dict:
        """Model + processor (``save_pretrained``), ``training.json`` (with the validation accuracy
        of every budget) and ``card.json``: the test split with the first budget's reducer applied
        (the method's largest; its ``spec`` recorded, which ``vtc eval --cards`` applies), and the
        accuracy at every budget."""
        self.model.eval()
        self.model.save_pretrained(self.out)
        self.processor.save_pretrained(self.out)
        val = self.scores(shapes.examples("val", self.options.val_examples))
        r = self.recipe
        self.record(command, minutes, base=self.base_name, **fields,
                    val_accuracy={label: s.accuracy for label, s in val.items()},
                    val_by_type={label: s.by_type() for label, s in val.items()},
                    val_questions=self.options.val_examples,
                    data=f"vtc.data.shapes train split indices {r.image_offset} .. "
                         f"{r.image_offset + self.steps * r.batch - 1}, all question types per image")
        return method_card(self.out, self.model, self.processor, self.budgets(), self.options.test_examples)


def method_scores(model, processor, budgets: list[tuple[str, Reducer]], examples: list[shapes.Example]) -> dict[str, Scores]:
    """Shapes scores of ``model`` with each budget's reducer applied."""
    out = {}
    for label, reducer in budgets:
        with apply(model, reducer):
            out[label] = vlm_scores(model, processor, examples)
    return out


@torch.no_grad()
def method_card(folder, model, processor, budgets: list[tuple[str, Reducer]], test_examples: int) -> dict:
    """``card.json`` of a checkpoint trained for a connector method: the test split with the first
    budget's reducer applied (its ``spec`` recorded; ``vtc eval --cards`` applies it) and the
    accuracy at every budget."""
    model.eval()
    scores = method_scores(model, processor, budgets, shapes.examples("test", test_examples))
    specs = {label: reducer.describe() for label, reducer in budgets}
    first = next(iter(specs))
    subset = min(SUBSET, len(scores[first].truth))
    summary = {label: {"spec": specs[label], "subset_accuracy": round(sum(s.correct[:subset]) / max(1, subset), 4),
                       "test_accuracy": round(s.accuracy, 4), "test_by_type": {k: round(v, 4) for k, v in s.by_type().items()}}
               for label, s in scores.items()}
    return write_card(folder, scores[first], spec=specs[first], budgets=summary)
