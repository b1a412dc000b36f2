"""Zero-shot classification by a CLIP-style model (open_clip, HF CLIP / SigLIP) on class folders:
each class's text embedding is the normalised mean of its normalised prompt embeddings (CLIP's
protocol), computed once; an image's prediction is the class of highest cosine similarity."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vtc.harness.errors import HarnessError
from vtc.harness.folders import ClassFolders, scan_folder
from vtc.harness.images import Transform
from vtc.harness.prompts import DEFAULT_TEMPLATES, check_templates, match_class_names, prompt
from vtc.harness.rows import HarnessRow
from vtc.harness.side_by_side import HarnessConfig, side_by_side

TextEncoder = Callable[[list[str]], torch.Tensor]  # prompts -> (prompts, D) embeddings
FAMILIES = "an open_clip model (encode_image / encode_text) or an HF CLIP / SigLIP model (get_image_features / get_text_features)"


def embedding_tensor(output: Any) -> torch.Tensor:
    """An embedding tensor from an HF ``get_*_features`` result (a tensor, or an output with ``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_embeddings(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, D) image embeddings of a CLIP-style model."""
    if hasattr(model, "encode_image"):
        return model.encode_image(pixels)
    return embedding_tensor(model.get_image_features(pixel_values=pixels))


def _hf_text(model: nn.Module, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    text = model.config.text_config
    siglip = "siglip" in model.config.model_type  # SigLIP was trained on text padded to its full length
    inputs = tokenizer(text=prompts, padding="max_length" if siglip else True, truncation=True,
                       max_length=text.max_position_embeddings, return_tensors="pt")
    device = next(model.parameters()).device
    return embedding_tensor(model.get_text_features(**{k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}))


def _open_clip_text(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], prompts: list[str]) -> torch.Tensor:
    return model.encode_text(tokenizer(prompts).to(next(model.parameters()).device))


def text_encoder(model: nn.Module, tokenizer: Any) -> TextEncoder:
    """Prompts -> text embeddings: open_clip ``encode_text`` on ``tokenizer(prompts)`` (e.g.
    ``open_clip.get_tokenizer(name)``), or HF ``get_text_features`` on the ids of ``tokenizer`` (the
    model's tokenizer or processor)."""
    if hasattr(model, "encode_text") and hasattr(model, "encode_image"):
        return partial(_open_clip_text, model, tokenizer)
    if hasattr(model, "get_text_features") and hasattr(model, "get_image_features"):
        return partial(_hf_text, model, tokenizer)
    raise HarnessError(f"zero-shot classification needs {FAMILIES}; got a {type(model).__name__}")


def class_embeddings(encode: TextEncoder, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(classes, D) float32: per class the normalised mean of its normalised prompt embeddings."""
    with torch.inference_mode():
        rows = [F.normalize(encode([prompt(t, name) for t in templates]).float(), dim=-1).mean(0) for name in class_names]
    return F.normalize(torch.stack(rows), dim=-1)


def _nearest_class(weights: torch.Tensor, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return (F.normalize(image_embeddings(model, pixels).float(), dim=-1) @ weights.T).argmax(-1)


def zero_shot_classification(model: nn.Module, tokenizer: Any, folder: Path | str | ClassFolders,
                             class_names: Sequence[str] | Mapping[str, str], specs: Sequence[str] = (), *,
                             transform: Transform, templates: str | Sequence[str] = DEFAULT_TEMPLATES,
                             config: HarnessConfig | None = None) -> list[HarnessRow]:
    """Rows for the unreduced ``model`` and each spec on ``folder`` (``DIR/<class>/<images>``, or a
    :func:`~vtc.harness.folders.scan_folder` result), images preprocessed by ``transform``.

    ``class_names`` name the sorted class folders in order (or map folder -> name); each prompt is a
    template with ``{}`` replaced by the name. Labels are folder positions. Text embeddings are
    computed once, before any reducer is applied (reducers act on the image side only).
    """
    scan = folder if isinstance(folder, ClassFolders) else scan_folder(folder)
    names = match_class_names(scan.classes, class_names)
    weights = class_embeddings(text_encoder(model, tokenizer), names, check_templates(templates))
    predict = partial(_nearest_class, weights.to(next(model.parameters()).device))
    return side_by_side(model, scan.samples(range(len(scan.classes))), transform, specs, predict, config or HarnessConfig())
