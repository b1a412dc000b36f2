#!/usr/bin/env python
"""Train the ``shapes-vit`` classifier: a small timm ViT reading the printed digit of a shapes image.

The model is timm's ``vit_tiny_patch16_224`` architecture resized to the shapes images: 64 x 64
pixels, 4 x 4 patches (256 patch tokens + CLS), width 96, 6 blocks, 3 heads, 10 classes. Training
draws fresh examples from the train split in order (no epochs, nothing stored), AdamW with warm-up
and cosine decay, and an auxiliary per-patch loss (a linear head on the last patch tokens predicts
the digit fragment each patch holds) that is dropped when saving: the saved model is a plain timm
classifier, written with ``timm.models.save_for_hf`` (config.json + model.safetensors) and loaded
with ``timm.create_model("local-dir:<folder>")`` or ``vtc.models.zoo.load("shapes-vit")``.

    python scripts/train_shapes_vit.py --out models/checkpoints/shapes-vit --overwrite
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vtc.cli import positive_int, prepare_output
from vtc.data import shapes
from vtc.data.evaluate import classifier_scores
from vtc.data.training import MEAN, NO_DIGIT, STD, cosine_lr, patch_targets, pixels
from vtc.models.zoo import write_card

ARCH = "vit_tiny_patch16_224"
MODEL_ARGS = dict(img_size=shapes.IMAGE_SIZE, patch_size=4, embed_dim=96, depth=6, num_heads=3, num_classes=10)


def build(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, **MODEL_ARGS)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=MEAN, std=STD, input_size=(3, 64, 64),
                                crop_pct=1.0, interpolation="bilinear", num_classes=10)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/shapes-vit"))
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--steps", type=positive_int, default=1300)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--aux-weight", type=float, default=0.5)
    parser.add_argument("--val", type=positive_int, default=1000, help="validation images at the end")
    parser.add_argument("--test", type=positive_int, default=shapes.SPLITS["test"][1],
                        help="test examples for the card (default: the whole test split)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = prepare_output(parser, args.out, args.overwrite)
    torch.set_num_threads(args.threads)

    model = build(args.seed).train()
    aux = torch.nn.Linear(model.embed_dim, NO_DIGIT + 1)
    params = list(model.parameters()) + list(aux.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    started = time.time()
    bar = tqdm(range(args.steps), desc="shapes-vit", unit="step")
    for step in bar:
        batch = [shapes.example("train", step * args.batch + i) for i in range(args.batch)]
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=100)
        tokens = model.forward_features(pixels([e.image for e in batch]))
        logits = model.forward_head(tokens)
        loss = F.cross_entropy(logits, torch.tensor([e.label for e in batch]))
        patch_logits = aux(tokens[:, model.num_prefix_tokens:])
        target = patch_targets(batch, 4)["digit"].flatten()
        weight = 1.0 + 9.0 * (target != NO_DIGIT)  # the few digit patches carry the signal
        loss_aux = (F.cross_entropy(patch_logits.flatten(0, 1), target, reduction="none") * weight).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        (loss + args.aux_weight * loss_aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{loss_aux.item():.3f}")
    minutes = (time.time() - started) / 60
    val = classifier_scores(model.eval(), shapes.examples("val", args.val)).accuracy
    print(f"trained {args.steps} steps in {minutes:.1f} min; val accuracy {val:.4f} on {args.val} images")

    from timm.models import save_for_hf

    save_for_hf(model.eval(), str(out), model_args=MODEL_ARGS, safe_serialization=True)
    command = "python scripts/train_shapes_vit.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    (out / "training.json").write_text(json.dumps(dict(
        command=command, steps=args.steps, batch=args.batch, lr=args.lr, aux_weight=args.aux_weight,
        seed=args.seed, threads=args.threads, minutes=round(minutes, 1), val_accuracy=val, val_images=args.val,
        train_examples=args.steps * args.batch, data="vtc.data.shapes train split, indices 0 .."
        f" {args.steps * args.batch - 1}"), indent=2) + "\n")
    card = write_card(out, classifier_scores(model, shapes.examples("test", args.test)))
    print(f"test accuracy {card['test_accuracy']:.4f} ({card['test_examples']} images)")
    print(f"saved to {out}\nreproduce with: {command}")


if __name__ == "__main__":
    main()
