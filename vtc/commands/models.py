"""Models named on the command line: a shipped checkpoint (``shapes-vit``, ``shapes-llava``) or a
folder the shapes trainers wrote, ``timm:<name>``, ``open_clip:<name>[@<pretrained tag>]`` or
``hf:<hub id or folder>`` (CLIP / SigLIP vision models and LLaVA). Hub weights are fetched only
with ``pretrained``; otherwise timm and open_clip models get random weights and HF ids must be
local folders or already cached."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FORMS = "shapes-vit, shapes-llava (or a trained folder), timm:<name>, open_clip:<name>[@<tag>], hf:<hub id or folder>"


def add_model_options(parser: argparse.ArgumentParser, what: str = "the model") -> None:
    """``--model`` (any of :data:`FORMS`) and ``--pretrained``."""
    parser.add_argument("--model", required=True, metavar="MODEL", help=f"{what}: {FORMS}, e.g. --model timm:vit_small_patch16_224")
    parser.add_argument("--pretrained", action="store_true",
                        help="allow downloading hub weights (needs internet once); without it timm and open_clip models get "
                             "random weights, e.g. --model open_clip:ViT-B-32@laion2b_s34b_b79k --pretrained")


class ModelSpecError(ValueError):
    """A model named on the command line that cannot be loaded as given."""


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image or (H, W, 3) uint8 array -> (C, H, W) pixels
    is_shapes: bool  # a shipped shapes checkpoint (the shapes data fits it)
    random_weights: bool  # timm / open_clip without pretrained weights
    processor: Any = None  # the HF processor of a VLM


def _to_pil(image: Any) -> Any:
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def load_model(spec: str, pretrained: bool = False) -> LoadedModel:
    """Load the model ``spec`` names (forms: :data:`FORMS`), in eval mode on the CPU."""
    if not pretrained:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kind, _, name = spec.partition(":")
    if kind in ("timm", "open_clip", "hf") and not name:
        raise ModelSpecError(f"--model {spec!r} names no model after '{kind}:'; forms: {FORMS}")
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=pretrained).eval()
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        return LoadedModel(model, lambda image: transform(_to_pil(image)), False, not pretrained)
    if kind == "open_clip":
        import open_clip

        name, _, tag = name.partition("@")
        if pretrained and not tag:
            raise ModelSpecError(f"--model {spec!r} with --pretrained needs a weights tag: open_clip:{name}@<tag>, "
                                 f"e.g. open_clip:ViT-B-32@laion2b_s34b_b79k")
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=tag if pretrained else None)
        return LoadedModel(model.eval(), lambda image: transform(_to_pil(image)), False, not pretrained)
    if kind == "hf":
        import transformers as tf

        config = tf.AutoConfig.from_pretrained(name)
        if "llava" in config.model_type:
            model = tf.AutoModelForImageTextToText.from_pretrained(name).eval()
            processor = tf.AutoProcessor.from_pretrained(name)
            images = processor.image_processor
        else:
            model, processor = tf.AutoModel.from_pretrained(name).eval(), None
            images = tf.AutoImageProcessor.from_pretrained(name)
        return LoadedModel(model, lambda image: images(_to_pil(image), return_tensors="pt")["pixel_values"][0],
                           False, False, processor)
    from vtc.data.training import pixels
    from vtc.models import zoo

    try:
        checkpoint = zoo.load(spec)
    except (FileNotFoundError, ValueError) as error:
        raise ModelSpecError(f"--model {spec!r}: {error}; other forms: {FORMS}") from None
    return LoadedModel(checkpoint.model, lambda image: pixels([image])[0], True, False, checkpoint.processor)
