"""Training recipe of the ``shapes-llava`` VLM (HF CLIP tower + projector + Llama decoder).

Two stages, one resumable run (:mod:`vtc.train.loop`):

1. **tower** (``tower_steps``): the CLIP tower alone learns dense per-patch targets
   (:func:`vtc.data.training.patch_targets`: shape kind, colour, grid cell, how many shapes share
   its colour, digit), so every visual token states what object it belongs to and where.
2. **vlm** (``vlm_steps``): the tower is frozen; the projector and the Llama decoder learn to
   answer. Each image carries a multi-turn conversation: its own question first (exactly the
   single-question prompt of evaluation), then up to ``per_type`` questions of every type in a
   random order, so one pass over the image serves about ten answers. Losses: the LLaVA answer
   loss (next-token cross-entropy on the answers and their ``</s>``, prompts masked) plus
   attention supervision pulling attention (mean over heads) onto the patches of the objects that
   answer the question (:func:`vtc.data.shapes.evidence`): at the question's last word (before
   "?") in decoder layer ``word_attention_layer``, so the retrieval is one hop from the words that
   name what to look for, and at the answer position in layer ``attention_layer``. With
   ``relay_weight > 0`` the answer position is also pulled, in layer ``relay_layer``, onto the
   question's last word, which by then holds what its own retrieval found (a relay for questions
   whose target is named by a phrase, such as a cell "top left", rather than one word). This stage
   runs eager attention (it reads attention weights); the model is saved for SDPA. With
   ``joint_tower_lr > 0`` the tower keeps training here, end to end under the answer loss and
   anchored by the dense per-patch loss of stage 1.

A run may start from the weights of another run's saved state (``init``: its model and dense
heads, not its optimizer), e.g. to continue a finished run under a new schedule; ``image_offset``
then moves it onto train images that run did not see. Its ``training.json`` then lists the runs it
continues (``lineage``: their commands and minutes), so the checkpoint can be rebuilt from scratch.

Every image comes from the train split in order (``step * batch + i``), every random choice from
one numpy generator and torch's generator, both saved with the state, so a resumed run is bit for
bit the uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model

from vtc.data import shapes
from vtc.data.evaluate import vlm_scores
from vtc.data.training import NO_DIGIT, TARGET_CLASSES, patch_targets, pixels, set_two_stage_lr
from vtc.models.zoo import write_card
from vtc.train.shapes_llava_model import ShapesLlavaShape, build
from vtc.train.trainer import STATE_DIR, RunOptions, Trainer

BOOST = {"kind": 3.0, "color": 3.0, "cell": 3.0, "count": 3.0, "digit": 9.0}  # weight of object patches


@dataclass(frozen=True)
class ShapesLlavaRecipe:
    """Everything that changes the trained weights (checked when a run resumes)."""

    tower_steps: int = 600  # stage 1: steps training the vision tower on per-patch targets
    tower_batch: int = 32  # images per stage-1 step
    tower_lr: float = 2e-3  # peak learning rate of stage 1
    vlm_steps: int = 2400  # stage 2: steps training projector and LLM on the conversations
    vlm_batch: int = 16  # images per stage-2 step (each with a multi-turn conversation)
    vlm_lr: float = 1.5e-3  # peak learning rate of stage 2
    warmup: int = 100  # warm-up steps of each stage's cosine schedule
    per_type: int = 2  # extra questions per type and image
    focus_type: str = ""  # a question type given more turns per image ("" = none)
    focus_questions: int = 0  # extra turns of focus_type per image (a question already asked is skipped)
    attention_weight: float = 1.0  # attention supervision at the answer position
    attention_layer: int = -2  # ... in this decoder layer
    word_attention_weight: float = 1.0  # attention supervision at the question's last word
    word_attention_layer: int = 1  # ... in this decoder layer
    relay_weight: float = 0.0  # attention supervision from the answer position onto the question's last word
    relay_layer: int = 2  # ... in this decoder layer (after word_attention_layer)
    weight_decay: float = 0.05  # AdamW weight decay
    seed: int = 0  # seeds the initialisation and the data order
    init: str = ""  # a saved training state (folder holding weights.safetensors) to start from; "" = fresh
    joint_tower_lr: float = 0.0  # peak tower learning rate in the vlm stage (0 = frozen tower)
    image_offset: int = 0  # index of the first train image used

    def __post_init__(self) -> None:
        if self.focus_type and self.focus_type not in shapes.QUESTION_TYPES:
            raise ValueError(f"focus_type {self.focus_type!r} is not a question type; allowed: "
                             f"{', '.join(shapes.QUESTION_TYPES)} (or empty for none)")
        if self.focus_questions < 0 or bool(self.focus_questions) != bool(self.focus_type):
            raise ValueError(f"focus_questions ({self.focus_questions}) must be > 0 exactly when focus_type "
                             f"({self.focus_type!r}) is set")

    @property
    def steps(self) -> int:
        return self.tower_steps + self.vlm_steps


def conversation(example: shapes.Example, tokenizer, image_tokens: int, rng: np.random.Generator,
                 per_type: int, focus: tuple[str, ...] = ()) -> tuple[list[int], list[int], list[tuple[int, int, list[int]]]]:
    """One image's multi-turn conversation, the example's own question first, then up to
    ``per_type`` questions of every type and one more per entry of ``focus`` (question types) in a
    random order; a question already asked is skipped. Returns input ids, labels (-100 on
    prompts), and per turn (the position whose logits give the answer, the position of the
    question's last word before "?", the objects answering it)."""
    turns = [(example.qtype, example.question, example.answer)]
    for qtype in rng.permutation(np.concatenate([np.repeat(shapes.QUESTION_TYPES, per_type), np.array(focus, dtype=str)])):
        qa = shapes.ask(example.scene, str(qtype), rng)
        if qa is not None and qa[0] not in {t[1] for t in turns}:
            turns.append((str(qtype), *qa))

    def words(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, labels, queries = [tokenizer.bos_token_id], [-100], []
    question_mark = tokenizer.convert_tokens_to_ids("?")
    for number, (qtype, question, reply) in enumerate(turns):
        image = "<image>" * image_tokens + "\n" if number == 0 else ""
        prompt = words(shapes.PROMPT.replace("<image>\n", image).format(question=question))
        target = words(reply) + [tokenizer.eos_token_id]
        last_word = len(ids) + len(prompt) - 1 - prompt[::-1].index(question_mark) - 1
        ids += prompt
        queries.append((len(ids) - 1, last_word, shapes.evidence(example.scene, qtype, question)))
        ids += target
        labels += [-100] * len(prompt) + target
    return ids, labels, queries


def collate(conversations, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, labels and attention mask of a batch of conversations."""
    length = max(len(ids) for ids, *_ in conversations)
    ids = torch.full((len(conversations), length), pad_id)
    labels = torch.full((len(conversations), length), -100)
    mask = torch.zeros((len(conversations), length), dtype=torch.long)
    for row, (row_ids, row_labels, _) in enumerate(conversations):
        ids[row, :len(row_ids)], labels[row, :len(row_labels)] = torch.tensor(row_ids), torch.tensor(row_labels)
        mask[row, :len(row_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def evidence_masks(batch, conversations, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, answer position, last-word position, patch mask) of every turn some object in the
    image answers."""
    rows, answers, words, masks = [], [], [], []
    grid = shapes.IMAGE_SIZE // patch
    for row, (example, (_, _, queries)) in enumerate(zip(batch, conversations)):
        blocks = example.objects.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
        for answer, word, objects in queries:
            if objects:
                rows.append(row)
                answers.append(answer)
                words.append(word)
                masks.append(np.isin(blocks, objects).any(1))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty, torch.zeros(0, grid * grid, dtype=torch.bool)
    return torch.tensor(rows), torch.tensor(answers), torch.tensor(words), torch.from_numpy(np.stack(masks))


def attention_loss(attention: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                   image_positions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean ``-log`` of the attention mass (mean over heads) that the queries at ``positions`` of
    ``rows`` put on their evidence patches. ``attention`` (B, H, T, T); ``image_positions`` (B, P)."""
    on_image = attention[rows, :, positions].mean(1).gather(1, image_positions[rows])  # (M, P)
    return -torch.log((on_image * masks).sum(-1) + 1e-6).mean()


def relay_loss(attention: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean ``-log`` of the attention (mean over heads) from ``positions`` of ``rows`` onto
    ``targets`` of the same rows (one token each). ``attention`` (B, H, T, T)."""
    return -torch.log(attention[rows, :, positions, targets].mean(1) + 1e-6).mean()


def dense_loss(heads: torch.nn.ModuleDict, patches: torch.Tensor, batch, patch: int) -> torch.Tensor:
    """Sum over targets of the per-patch cross-entropy, object patches weighted up by :data:`BOOST`."""
    targets = patch_targets(batch, patch)
    total = patches.new_zeros(())
    for name, head in heads.items():
        target = targets[name].flatten().to(patches.device)
        background = NO_DIGIT if name == "digit" else 0
        weight = 1.0 + BOOST[name] * (target != background).float()
        loss = F.cross_entropy(head(patches).flatten(0, 1), target, reduction="none")
        total = total + (loss * weight).sum() / weight.sum()
    return total


def init_weights(init: str) -> Path:
    """The ``weights.safetensors`` of a saved state, given the state folder or the run folder holding it."""
    folder = Path(init)
    for candidate in (folder / "weights.safetensors", folder / STATE_DIR / "weights.safetensors"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"init {init!r} holds no saved training state (weights.safetensors, or "
                            f"{STATE_DIR}/weights.safetensors); give a run folder or its state folder")


def init_lineage(init: str) -> list[dict[str, Any]]:
    """The runs a run started with ``init`` continues, oldest first: each one's command and minutes,
    read from the ``training.json`` beside the state (empty when there is none)."""
    state = init_weights(init).parent
    for folder in (state, state.parent):
        record = folder / "training.json"
        if record.is_file():
            earlier = json.loads(record.read_text())
            return [*earlier.get("lineage", []), {"command": earlier["command"], "minutes": earlier["minutes"]}]
    return []


class ShapesLlavaTrainer(Trainer):
    """Builds the model, runs both stages resumably and writes the checkpoint folder."""

    name = "shapes-llava"

    def __init__(self, recipe: ShapesLlavaRecipe, out: Path, options: RunOptions = RunOptions(),
                 shape: ShapesLlavaShape = ShapesLlavaShape()) -> None:
        super().__init__(recipe, out, options)
        self.shape = shape
        self.model, self.processor = build(shape)
        self.model.set_attn_implementation("eager")
        self.model.to(self.device).train()
        self.tower = self.model.model.vision_tower
        self.image_tokens = (shapes.IMAGE_SIZE // shape.patch) ** 2
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(shape.vision_width, TARGET_CLASSES[name])
                                          for name in ("kind", "color", "cell", "count", "digit")}).to(self.device)
        self.modules = torch.nn.ModuleDict({"model": self.model, "heads": self.heads})
        tower_params = list(self.tower.parameters()) + list(self.heads.parameters())
        tower_ids = {id(p) for p in tower_params}
        vlm_params = [p for p in self.model.parameters() if id(p) not in tower_ids]
        self.optimizer = torch.optim.AdamW([{"params": tower_params, "name": "tower"},
                                            {"params": vlm_params, "name": "vlm"}],
                                           lr=recipe.tower_lr, weight_decay=recipe.weight_decay)
        self.tower_params, self.vlm_params = tower_params, vlm_params

    def start_fresh(self) -> None:
        """Load ``init``'s weights (a resumed run has them in its own state, so ``init`` may be gone)."""
        if self.recipe.init:
            load_model(self.modules, str(init_weights(self.recipe.init)), strict=True)

    @property
    def architecture(self) -> dict[str, Any]:
        return {"model": "shapes-llava", **asdict(self.shape)}

    # ----- steps --------------------------------------------------------------------------------
    def _set_lr(self, step: int) -> None:
        r = self.recipe
        set_two_stage_lr(self.optimizer, step, r.tower_steps, r.vlm_steps, r.warmup, {"tower": r.tower_lr, "vlm": 0.0},
                         {"tower": r.joint_tower_lr, "vlm": r.vlm_lr})

    def _clip_and_step(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()

    def tower_step(self, step: int) -> dict[str, float]:
        r = self.recipe
        batch = [shapes.example("train", r.image_offset + step * r.tower_batch + i) for i in range(r.tower_batch)]
        features = self.tower(pixels([e.image for e in batch]).to(self.device)).last_hidden_state[:, 1:]
        loss = dense_loss(self.heads, features, batch, self.shape.patch)
        self._clip_and_step(self.tower_params, loss)
        return {"dense": loss.item()}

    def vlm_step(self, step: int) -> dict[str, float]:
        r = self.recipe
        first = r.image_offset + r.tower_steps * r.tower_batch  # images the tower stage did not see
        local = step - r.tower_steps
        batch = [shapes.example("train", first + local * r.vlm_batch + i) for i in range(r.vlm_batch)]
        tokenizer = self.processor.tokenizer
        focus = (r.focus_type,) * r.focus_questions
        conversations = [conversation(e, tokenizer, self.image_tokens, self.rng, r.per_type, focus) for e in batch]
        inputs = {k: v.to(self.device) for k, v in collate(conversations, tokenizer.pad_token_id).items()}
        supervised = r.attention_weight > 0 or r.word_attention_weight > 0 or r.relay_weight > 0
        joint = r.joint_tower_lr > 0
        features: list[torch.Tensor] = []
        hook = self.tower.register_forward_hook(lambda _m, _a, out: features.append(out.last_hidden_state)) if joint else None
        try:
            result = self.model(**inputs, pixel_values=pixels([e.image for e in batch]).to(self.device),
                                output_attentions=supervised)
        finally:
            if hook is not None:
                hook.remove()
        loss, record = result.loss, {"answer": result.loss.item()}
        if joint:
            dense = dense_loss(self.heads, features[0][:, 1:], batch, self.shape.patch)
            loss = loss + dense
            record["dense"] = dense.item()
        rows, answers, words, masks = (t.to(self.device) for t in evidence_masks(batch, conversations, self.shape.patch))
        if supervised and len(rows):
            image_positions = (inputs["input_ids"] == self.model.config.image_token_index).nonzero()[:, 1]
            image_positions = image_positions.view(len(batch), self.image_tokens)  # every row has one image
            for name, weight, layer, positions in (("attention", r.attention_weight, r.attention_layer, answers),
                                                    ("word_attention", r.word_attention_weight, r.word_attention_layer, words)):
                if weight > 0:
                    term = attention_loss(result.attentions[layer], rows, positions, image_positions, masks)
                    loss = loss + weight * term
                    record[name] = term.item()
            if r.relay_weight > 0:
                term = relay_loss(result.attentions[r.relay_layer], rows, answers, words)
                loss = loss + r.relay_weight * term
                record["relay"] = term.item()
        self._clip_and_step(self.vlm_params + (self.tower_params if joint else []), loss)
        return record

    def train_step(self, step: int) -> dict[str, float]:
        self._set_lr(step)
        if step < self.recipe.tower_steps:
            self.tower.train()
            record = self.tower_step(step)
        else:
            joint = self.recipe.joint_tower_lr > 0
            self.tower.train(joint)
            for p in self.tower_params:
                p.requires_grad_(joint)
            record = self.vlm_step(step)
        return {"lr": self.optimizer.param_groups[0 if step < self.recipe.tower_steps else 1]["lr"], **record}

    # ----- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def dense_accuracy(self, examples: list[shapes.Example]) -> dict[str, float]:
        """Per-target accuracy of the dense heads on object patches (digit patches for ``digit``)."""
        self.tower.eval()
        features = self.tower(pixels([e.image for e in examples]).to(self.device)).last_hidden_state[:, 1:]
        targets = patch_targets(examples, self.shape.patch)
        out = {}
        for name, head in self.heads.items():
            target = targets[name].to(self.device)
            on_object = target != (NO_DIGIT if name == "digit" else 0)
            out[name] = round((head(features).argmax(-1) == target)[on_object].float().mean().item(), 4)
        self.tower.train()
        return out

    def evaluate(self, step: int) -> dict[str, Any]:
        examples = shapes.examples("val", self.options.eval_examples)
        if step <= self.recipe.tower_steps:
            return {"dense": self.dense_accuracy(examples[:100])}
        self.model.eval()
        scores = vlm_scores(self.model, self.processor, examples)
        self.model.train()
        self.tower.train(self.recipe.joint_tower_lr > 0)
        return {"accuracy": round(scores.accuracy, 4), "by_type": {k: round(v, 4) for k, v in scores.by_type().items()}}

    # ----- the checkpoint ------------------------------------------------------------------------
    def write_checkpoint(self, command: str, minutes: float) -> dict:
        """Model + processor for SDPA (``save_pretrained``), ``training.json``, ``card.json``."""
        self.model.set_attn_implementation("sdpa")
        self.model.eval()
        self.model.save_pretrained(self.out)
        self.processor.save_pretrained(self.out)
        val = vlm_scores(self.model, self.processor, shapes.examples("val", self.options.val_examples))
        r = self.recipe
        lineage = {"lineage": init_lineage(r.init)} if r.init else {}
        self.record(command, minutes, **lineage, val_accuracy=val.accuracy, val_by_type=val.by_type(),
                    val_questions=self.options.val_examples,
                    data=(f"vtc.data.shapes train split: tower stage indices {r.image_offset} .. "
                          f"{r.image_offset + r.tower_steps * r.tower_batch - 1}, vlm stage the next "
                          f"{r.vlm_steps * r.vlm_batch}, all question types per image"
                          + (f"; weights initialised from {r.init}" if r.init else "")))
        return write_card(self.out, vlm_scores(self.model, self.processor,
                                               shapes.examples("test", self.options.test_examples)))


