"""Backbone adapters (installed as ``vtc.models``): one file per family.

An adapter knows one backbone family and calls reducers only through the reducer interface.
"""

from __future__ import annotations

from vtc.models.base import EncoderAdapter
from vtc.models.hf_vision import HFVisionAdapter
from vtc.models.llava import LlavaAdapter
from vtc.models.open_clip import OpenCLIPAdapter
from vtc.models.timm import TimmViTAdapter

ADAPTERS: tuple[type, ...] = (TimmViTAdapter, OpenCLIPAdapter, HFVisionAdapter, LlavaAdapter)
SUPPORTED = (
    "timm VisionTransformer; open_clip VisionTransformer (or a CLIP model's .visual); "
    "HF CLIPVisionModel / CLIPModel and SiglipVisionModel / SiglipModel; "
    "HF LlavaForConditionalGeneration and LlavaNextForConditionalGeneration"
)


def find_adapter(model: object) -> type:
    """The adapter class for ``model``, or TypeError naming the supported families."""
    for adapter in ADAPTERS:
        if adapter.accepts(model):
            return adapter
    raise TypeError(f"vtc cannot reduce tokens in a {type(model).__module__}.{type(model).__name__}; supported: {SUPPORTED}")


__all__ = ["ADAPTERS", "EncoderAdapter", "SUPPORTED", "find_adapter"]
