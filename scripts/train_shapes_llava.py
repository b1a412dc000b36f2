#!/usr/bin/env python
"""Train the ``shapes-llava`` VLM: HF CLIP tower + projector + Llama decoder answering shapes questions.

The architecture is :mod:`vtc.models.shapes_llava` (256 visual tokens per image). Every training
image comes from the train split in order and carries several questions as a multi-turn
conversation: its own question first (exactly the single-question prompt of evaluation), then up
to ``--per-type`` questions of every type in a random order
(``USER: <image> q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...``), so one pass of the tower
serves about ten answers. Losses, summed:

- next-token cross-entropy on the answers and their ``</s>`` (the LLaVA loss);
- per-patch auxiliary heads on the tower's feature layer (shape kind, colour, digit fragment);
- attention supervision: at each answer position, the decoder's last-layer attention (mean over
  heads) is pulled onto the patches of the objects that answer the question
  (:func:`vtc.data.shapes.evidence`). Training therefore runs eager attention; the model is saved
  for SDPA.

Within the half-hour budget this recipe teaches the question-independent digit reading (about 90%)
but not yet the question-dependent retrieval (colour, count, presence and position stay near their
answer priors); see BENCHMARKS.md for the runs tried.

The auxiliary heads are dropped when saving. Saved with ``save_pretrained`` for model and
processor: ``LlavaForConditionalGeneration.from_pretrained`` and ``LlavaProcessor.from_pretrained``
load it, as does ``vtc.models.zoo.load("shapes-llava")``.

    python scripts/train_shapes_llava.py --out models/checkpoints/shapes-llava --overwrite
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vtc.cli import positive_int, prepare_output
from vtc.data import shapes
from vtc.data.evaluate import vlm_scores
from vtc.data.training import NO_DIGIT, cosine_lr, patch_targets, pixels
from vtc.models.shapes_llava import ShapesLlavaShape, build
from vtc.models.zoo import write_card


def conversation(example: shapes.Example, tokenizer, image_tokens: int, rng: np.random.Generator, per_type: int):
    """One image's multi-turn conversation, the example's own question first, then up to
    ``per_type`` questions of every type in a random order. Returns input ids, labels, and for each
    turn the position whose logits give the answer with the objects that answer it."""
    turns = [(example.qtype, example.question, example.answer)]
    for qtype in rng.permutation(np.repeat(shapes.QUESTION_TYPES, per_type)):
        qa = shapes.ask(example.scene, str(qtype), rng)
        if qa is not None and qa[0] not in {t[1] for t in turns}:
            turns.append((str(qtype), *qa))

    def words(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, labels, queries = [tokenizer.bos_token_id], [-100], []
    for number, (qtype, question, reply) in enumerate(turns):
        image = "<image>" * image_tokens + "\n" if number == 0 else ""
        prompt = words(shapes.PROMPT.replace("<image>\n", image).format(question=question))
        target = words(reply) + [tokenizer.eos_token_id]
        ids += prompt
        queries.append((len(ids) - 1, shapes.evidence(example.scene, qtype, question)))
        ids += target
        labels += [-100] * len(prompt) + target
    return ids, labels, queries


def evidence_masks(batch, conversations, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, query position, patch mask) of every turn whose answer some object in the image
    supports: the patches touching those objects."""
    rows, positions, masks = [], [], []
    grid = shapes.IMAGE_SIZE // patch
    for row, (example, (_, _, queries)) in enumerate(zip(batch, conversations)):
        blocks = example.objects.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
        for position, objects in queries:
            if objects:
                rows.append(row)
                positions.append(position)
                masks.append(np.isin(blocks, objects).any(1))
    return torch.tensor(rows), torch.tensor(positions), torch.from_numpy(np.stack(masks))


def collate(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(conv[0]) for conv in pairs)
    ids = torch.full((len(pairs), length), pad_id)
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (i, l, *_) in enumerate(pairs):
        ids[row, :len(i)], labels[row, :len(l)], mask[row, :len(i)] = torch.tensor(i), torch.tensor(l), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, rare: torch.Tensor, boost: float) -> torch.Tensor:
    weight = 1.0 + boost * rare.float()
    return (F.cross_entropy(logits, target, reduction="none") * weight).sum() / weight.sum()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/shapes-llava"))
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--steps", type=positive_int, default=560)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--aux-weight", type=float, default=0.5)
    parser.add_argument("--attention-weight", type=float, default=1.0,
                        help="weight of the loss pulling the answer position's last-layer attention onto the "
                             "patches of the objects that answer the question")
    parser.add_argument("--per-type", type=positive_int, default=2, help="extra questions per type and image")
    parser.add_argument("--val", type=positive_int, default=500, help="validation questions at the end")
    parser.add_argument("--test", type=positive_int, default=shapes.SPLITS["test"][1],
                        help="test examples for the card (default: the whole test split)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = prepare_output(parser, args.out, args.overwrite)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    shape = ShapesLlavaShape()
    model, processor = build(shape)
    model.set_attn_implementation("eager")  # training reads attention weights; saved for SDPA
    model.train()
    tokenizer = processor.tokenizer
    tower = model.model.vision_tower
    image_tokens = (shapes.IMAGE_SIZE // shape.patch) ** 2
    heads = torch.nn.ModuleDict({
        "kind": torch.nn.Linear(shape.vision_width, len(shapes.KINDS) + 1),
        "color": torch.nn.Linear(shape.vision_width, len(shapes.COLORS) + 1),
        "digit": torch.nn.Linear(shape.vision_width, NO_DIGIT + 1),
    })
    captured = {}
    tower.encoder.layers[-1].register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("x", output[0] if isinstance(output, tuple) else output))
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    started = time.time()
    bar = tqdm(range(args.steps), desc="shapes-llava", unit="step")
    for step in bar:
        batch = [shapes.example("train", step * args.batch + i) for i in range(args.batch)]
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=100)
        conversations = [conversation(e, tokenizer, image_tokens, rng, args.per_type) for e in batch]
        inputs = collate(conversations, tokenizer.pad_token_id)
        result = model(**inputs, pixel_values=pixels([e.image for e in batch]), output_attentions=True)
        loss = result.loss
        rows, positions, masks = evidence_masks(batch, conversations, shape.patch)
        start = 3  # <s> USER : then the image tokens
        attention = result.attentions[-1][rows, :, positions, start:start + image_tokens].mean(1)  # (M, 256)
        loss_attention = -torch.log((attention * masks).sum(-1) + 1e-6).mean()
        patches = captured.pop("x")[:, 1:]
        targets = patch_targets(batch, shape.patch)
        loss_aux = sum(weighted_ce(heads[name](patches).flatten(0, 1), targets[name].flatten(),
                                   targets[name].flatten() != background, boost)
                       for name, background, boost in (("kind", 0, 3.0), ("color", 0, 3.0), ("digit", NO_DIGIT, 9.0)))
        optimizer.zero_grad(set_to_none=True)
        (loss + args.aux_weight * loss_aux + args.attention_weight * loss_attention).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{loss_aux.item():.3f}", attn=f"{loss_attention.item():.3f}")
    minutes = (time.time() - started) / 60
    model.set_attn_implementation("sdpa")
    model.eval()
    scores = vlm_scores(model, processor, shapes.examples("val", args.val))
    print(f"trained {args.steps} steps in {minutes:.1f} min; val exact match {scores.accuracy:.4f} on {args.val} "
          f"questions; by type {json.dumps({k: round(v, 4) for k, v in scores.by_type().items()})}")

    model.save_pretrained(out)
    processor.save_pretrained(out)
    command = "python scripts/train_shapes_llava.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    (out / "training.json").write_text(json.dumps(dict(
        command=command, steps=args.steps, batch=args.batch, lr=args.lr, aux_weight=args.aux_weight, seed=args.seed,
        attention_weight=args.attention_weight, per_type=args.per_type,
        threads=args.threads, minutes=round(minutes, 1), val_accuracy=scores.accuracy, val_by_type=scores.by_type(),
        val_questions=args.val, train_images=args.steps * args.batch,
        data=f"vtc.data.shapes train split, indices 0 .. {args.steps * args.batch - 1}, all question types per image"),
        indent=2) + "\n")
    card = write_card(out, vlm_scores(model, processor, shapes.examples("test", args.test)))
    print(f"test exact match {card['test_accuracy']:.4f} ({card['test_examples']} questions); by type "
          f"{json.dumps(card['test_by_type'])}")
    print(f"saved to {out}\nreproduce with: {command}")


if __name__ == "__main__":
    main()
