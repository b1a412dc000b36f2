"""Checkpoints shipped with vtc, loaded by name: ``vtc.models.zoo.load("shapes-llava")``.

Each checkpoint is a folder under ``models/checkpoints/`` holding what its library saves
(timm: ``config.json`` + ``model.safetensors``; HF: ``save_pretrained`` of model and processor),
``training.json`` (the command that reproduces it, after the runs it continues: ``lineage``) and
``card.json`` (its accuracy on the shapes test split, written by :func:`write_card`). Loading goes through the libraries' own paths:
``timm.create_model("local-dir:...")`` and ``from_pretrained``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

CHECKPOINTS = Path(__file__).parent / "checkpoints"
CARD = "card.json"
SUBSET = 500  # the fixed test subset a card reports (the first SUBSET test examples)


@dataclass(frozen=True)
class Entry:
    kind: str  # "timm" | "llava"
    description: str
    train: str  # the command(s) that write the shipped folder


ZOO = {
    "shapes-vit": Entry("timm", "timm ViT (6 x 96, 4 px patches on 64 px: 256 patch tokens + CLS) reading the "
                        "printed digit of vtc.data.shapes images",
                        "python scripts/train_shapes_vit.py --out models/checkpoints/shapes-vit --overwrite"),
    "shapes-llava": Entry("llava", "LLaVA-1.5-style VLM (CLIP 6 x 96 tower, 256 visual tokens, Llama 6 x 128 "
                          "decoder) answering vtc.data.shapes questions; DyVTE routers for it in dyvte/",
                          "python scripts/train_shapes_llava.py --out outputs/shapes-llava-r3 --threads 2, then the runs "
                          "r5, r6 and r7, each with --init from the one before (their commands: BENCHMARKS.md, training "
                          "runs; the shipped training.json lists them as lineage), and copy r7's folder here; its "
                          "dyvte/: python scripts/train_dyvte.py --out outputs/shapes-llava-dyvte --eval-every 100 "
                          "--eval-examples 100 --max-minutes 55 --threads 1, copied without train-state/"),
    "shapes-llava-m3": Entry("llava", "shapes-llava fine-tuned with M3's nested scales (apply m3:tokens=256|64|16|4|1)",
                             "python scripts/train_m3.py --out outputs/shapes-llava-m3 --steps 800 --eval-every 200 "
                             "--eval-examples 100 --max-minutes 90 --threads 1, then copy its folder here (without "
                             "train-state/)"),
    "shapes-llava-mqt": Entry("llava", "shapes-llava with MQT's query transformer in place of its projector (apply "
                              "mqt:tokens=m, 1 <= m <= 256; the transformer is in its mqt/ folder)",
                              "python scripts/train_mqt.py --out outputs/shapes-llava-mqt --eval-every 400 "
                              "--eval-examples 100 --max-minutes 85 --threads 1 (65.7 minutes), then copy its folder "
                              "here (without train-state/, training.jsonl and learning-curve.png)"),
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its processor (None for a classifier), where it
    came from and what its card and training record say."""

    name: str
    kind: str
    path: Path
    model: nn.Module
    processor: Any = None
    card: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)


def names() -> list[str]:
    return sorted(ZOO)


def locate(name_or_path: str | Path) -> tuple[str, str, Path]:
    """(name, kind, folder) of a zoo name or of a folder holding a shapes checkpoint."""
    if isinstance(name_or_path, str) and name_or_path in ZOO:
        entry = ZOO[name_or_path]
        folder = CHECKPOINTS / name_or_path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {name_or_path!r} is not installed (no {folder / 'config.json'}); "
                                    f"train it with: {entry.train}")
        return name_or_path, entry.kind, folder
    folder = Path(name_or_path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        looks_like_name = isinstance(name_or_path, str) and "/" not in name_or_path and not folder.exists()
        what = f"unknown checkpoint name {name_or_path!r}" if looks_like_name else f"no config.json in {folder}"
        raise ValueError(f"{what}; known names: {', '.join(names())}, or a folder holding a checkpoint")
    config = json.loads(config_file.read_text())
    if "architecture" in config:
        return folder.name, "timm", folder
    if config.get("model_type") == "llava":
        return folder.name, "llava", folder
    raise ValueError(f"{config_file} is neither a timm checkpoint (no 'architecture') nor an HF LLaVA "
                     f"(model_type {config.get('model_type')!r})")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load(name_or_path: str | Path, device: str = "cpu") -> Checkpoint:
    """Load a shipped checkpoint by name (see :func:`names`) or a folder written by the training scripts."""
    name, kind, folder = locate(name_or_path)
    processor = None
    if kind == "timm":
        import timm

        model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)
    else:
        from transformers import LlavaForConditionalGeneration, LlavaProcessor

        model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
        processor = LlavaProcessor.from_pretrained(folder)
    return Checkpoint(name, kind, folder, model.to(device).eval(), processor, _read(folder / CARD),
                      _read(folder / "training.json"))


def write_card(folder: Path, scores: Any, **extra: Any) -> dict:
    """Write ``card.json`` from :class:`vtc.data.evaluate.Scores` of the unreduced model on the test
    split in order: accuracy on all of it, overall and per type with 95% Wilson intervals, and on
    its first :data:`SUBSET` examples, whose predictions are stored so that a fresh evaluation can
    be checked against the card example by example. ``extra`` fields are stored as given (a trained
    method's ``spec``, under which ``scores`` were measured, and its ``budgets``)."""
    subset = min(SUBSET, len(scores.truth))
    card = {
        "test_examples": len(scores.truth), "test_accuracy": round(scores.accuracy, 4),
        "test_interval95": [round(v, 4) for v in scores.interval()],
        "test_by_type": {k: round(v, 4) for k, v in scores.by_type().items()},
        "test_by_type_interval95": {k: [round(v, 4) for v in scores.interval(k)] for k in scores.by_type()},
        "subset_examples": subset, "subset_accuracy": round(sum(scores.correct[:subset]) / max(1, subset), 4),
        "subset_predictions": list(scores.predicted[:subset]),
        **extra,
    }
    (Path(folder) / CARD).write_text(json.dumps(card, indent=1) + "\n")
    return card
