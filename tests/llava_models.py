"""Offline builders of tiny HF LLaVA / LLaVA-NeXT models and processors for CPU tests.

Nothing is downloaded: the tokenizer is built with the ``tokenizers`` library, the
weights are random (with a large ``initializer_range`` so greedy outputs depend on
the image), and everything goes through ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 32
PATCH_SIZE = 8
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]  # (height, width)
_BUILD_FILE = "vtc_build.json"

WORDS = (
    "USER ASSISTANT : ? . , ! what is in the picture image photo describe this that a an "
    "of on at to and or it its there are how many color colors red green blue yellow black "
    "white cat dog car tree house sky person people man woman child sun water road left right "
    "top bottom middle center small large big one two three four five yes no please tell me "
    "about detail details scene show shows see can you where who which object objects animal "
    "background foreground bright dark light shape square circle line text number compare "
    "first second both between same different"
).split()


def build_tokenizer() -> Any:
    """WordLevel tokenizer (special tokens + ~100 words), wrapped in PreTrainedTokenizerFast."""
    from vtc.train.shapes_llava_model import word_tokenizer

    return word_tokenizer(WORDS)


def _vision_config(vision: str, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, layers: int = 3) -> Any:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    shape = dict(
        image_size=image_size, patch_size=patch_size, num_hidden_layers=layers, hidden_size=32,
        num_attention_heads=4, intermediate_size=64,
    )
    if vision == "clip":
        return CLIPVisionConfig(**shape, initializer_range=0.2, initializer_factor=4.0)
    if vision == "siglip":
        return SiglipVisionConfig(**shape, vision_use_head=False)
    raise ValueError(f"unknown vision tower {vision!r}")


def _image_processor(kind: str, image_size: int = IMAGE_SIZE) -> Any:
    from transformers import LlavaImageProcessor, LlavaNextImageProcessor

    common = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if kind == "next":
        return LlavaNextImageProcessor(**common, image_grid_pinpoints=GRID_PINPOINTS)
    return LlavaImageProcessor(**common)


def build_llava(
    directory: pathlib.Path,
    kind: str = "llava",
    vision: str = "clip",
    strategy: str = "default",
    feature_layer: int | list[int] = -2,
    dtype: torch.dtype = torch.float32,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    vision_layers: int = 3,
    text_layers: int = 4,
    chat_template: str | None = None,
) -> tuple[Any, Any]:
    """Build (or reuse) a tiny LLaVA ("llava") or LLaVA-NeXT ("next") under ``directory``.

    ``image_size``, ``patch_size``, ``vision_layers`` and ``text_layers`` give a stand-in the token
    grid and depths of a real checkpoint (widths stay tiny), ``chat_template`` its processor's
    template. Returns ``(model, processor)`` freshly loaded with ``from_pretrained`` (model in eval mode).
    """
    import transformers as tf

    if kind not in ("llava", "next"):
        raise ValueError(f"unknown kind {kind!r}")
    model_cls = tf.LlavaNextForConditionalGeneration if kind == "next" else tf.LlavaForConditionalGeneration
    proc_cls = tf.LlavaNextProcessor if kind == "next" else tf.LlavaProcessor
    directory = pathlib.Path(directory)
    params = dict(kind=kind, vision=vision, strategy=strategy, feature_layer=feature_layer)
    shape = dict(image_size=image_size, patch_size=patch_size, vision_layers=vision_layers, text_layers=text_layers)
    if shape != dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_layers=3, text_layers=4):
        params.update(shape)
    if chat_template is not None:
        params["chat_template"] = chat_template
    seq_length = (image_size // patch_size) ** 2
    stamp = directory / _BUILD_FILE
    if not (stamp.exists() and json.loads(stamp.read_text()) == params):
        tokenizer = build_tokenizer()
        text = tf.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(512, 2 * seq_length),
            initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        config_cls = tf.LlavaNextConfig if kind == "next" else tf.LlavaConfig
        extra = {"image_grid_pinpoints": GRID_PINPOINTS} if kind == "next" else {}
        config = config_cls(
            vision_config=_vision_config(vision, image_size, patch_size, vision_layers), text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
            image_seq_length=seq_length, **extra,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = model_cls(config)
            if vision == "siglip":  # SigLIP ignores initializer_range: widen its weights by hand
                with torch.no_grad():
                    for p in model.model.vision_tower.parameters():
                        if p.dim() > 1:
                            p.normal_(0.0, 0.2)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        processor = proc_cls(
            image_processor=_image_processor(kind, image_size), tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=strategy, image_token="<image>",
            num_additional_image_tokens=1 if vision == "clip" else 0, chat_template=chat_template,
        )
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        stamp.write_text(json.dumps(params))
    model = model_cls.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").eval()
    return model, proc_cls.from_pretrained(directory)


def images(n: int, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Image.Image]:
    """``n`` deterministic random RGB images; ``sizes`` gives (width, height) per image (default 32x32)."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [(IMAGE_SIZE, IMAGE_SIZE)] * n
    if len(sizes) != n:
        raise ValueError("need one size per image")
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


_QUESTIONS = [  # 6, 7, 9, 13 and 5 words
    "what is in the picture ?",
    "describe this image in detail please .",
    "how many objects are there in the picture ?",
    "what color is the large object in the middle of the scene ?",
    "tell me about the picture",
]


def prompts(n: int) -> list[str]:
    """``n`` prompts of pairwise different token lengths, each with exactly one ``<image>``."""
    return [f"USER: <image>\n{_QUESTIONS[i % len(_QUESTIONS)]}" + " please" * (9 * (i // len(_QUESTIONS)))
            + " ASSISTANT:" for i in range(n)]


def two_image_prompt(question: str = "compare the first and second image .") -> str:
    """A prompt with two ``<image>`` placeholders."""
    return f"USER: <image>\n<image>\n{question} ASSISTANT:"


def llava_terms(model: Any, sequence: int) -> int:
    """Accumulated products from pixels to a logit of a LLaVA (tests/tolerance.py): patch
    embedding, the tower's layers, the two-layer projector, the LLM's layers over ``sequence``
    positions, the final norm and the LM head."""
    import tolerance

    vision, text = model.config.vision_config, model.config.text_config
    grid = (vision.image_size // vision.patch_size) ** 2 + 1
    return (3 * vision.patch_size**2
            + tolerance.transformer_terms(vision.num_hidden_layers, vision.hidden_size, grid, vision.intermediate_size)
            + vision.hidden_size + text.hidden_size
            + tolerance.transformer_terms(text.num_hidden_layers, text.hidden_size, sequence, text.intermediate_size)
            + 2 * text.hidden_size)
