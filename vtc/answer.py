"""Ask a vision-language model about images without assembling placeholders by hand."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _image_lists(images: Sequence, count: int) -> list[list]:
    lists = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
    if len(lists) != count:
        raise ValueError(f"give one image (or one list of images) per prompt: {count} prompts, {len(lists)} image entries")
    return lists


def _full_prompt(processor, prompt: str, images: int, token: str) -> str:
    """``prompt`` as the model reads it: a full prompt (one image token per image) as given, a bare
    question (no image token) through the processor's chat template with one image per image."""
    held = prompt.count(token)
    if held == images:
        return prompt
    if held:
        raise ValueError(f"prompt {prompt!r} holds {held} {token} tokens for {images} images: give one per image, "
                         f"or none to have the chat template place them")
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"prompt {prompt!r} holds no {token} token and the processor has no chat template to "
                         f"wrap a bare question: give the full prompt, e.g. 'USER: {token}\\n{prompt} ASSISTANT:'")
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def answer(model: nn.Module, processor, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32,
           batch_size: int | None = None, **generate_kwargs) -> list[str]:
    """Greedy (or ``generate_kwargs``) answers of ``model`` to ``prompts`` about ``images``.

    ``images[i]`` is the image (or list of images) of ``prompts[i]``. A prompt is either a bare
    question (``"What is shown?"``: the processor's chat template wraps it and places the image
    tokens) or the full prompt holding one image token per image
    (``"USER: <image>\\nWhat is shown? ASSISTANT:"``). Prompts run in batches of ``batch_size``
    (default: all at once) with left padding; works with or without vtc reducers applied, since
    the model's own ``generate`` does the work.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, one per image entry")
    if images is None:
        raise TypeError("images must be a list with one image (or one list of images) per prompt, got None")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_prompt = _image_lists(images, len(prompts))
    if not prompts:
        return []
    token = getattr(processor, "image_token", None) or "<image>"
    texts = [_full_prompt(processor, prompt, len(imgs), token) for prompt, imgs in zip(prompts, per_prompt)]
    tokenizer = processor.tokenizer
    saved_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    step = batch_size or len(texts)
    answers: list[str] = []
    try:
        for start in range(0, len(texts), step):
            chunk_images = [image for imgs in per_prompt[start : start + step] for image in imgs]
            inputs = processor(images=chunk_images, text=texts[start : start + step], padding=True, return_tensors="pt")
            inputs = inputs.to(next(model.parameters()).device)
            settings = {"do_sample": False, **generate_kwargs, "max_new_tokens": max_new_tokens}
            with torch.inference_mode():
                out = model.generate(**inputs, **settings)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = saved_side
    return answers
