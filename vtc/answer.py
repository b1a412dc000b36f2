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


def answer(model: nn.Module, processor, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32,
           batch_size: int | None = None, **generate_kwargs) -> list[str]:
    """Greedy (or ``generate_kwargs``) answers of ``model`` to ``prompts`` about ``images``.

    ``images[i]`` is the image (or list of images) of ``prompts[i]``. A prompt holding fewer
    image tokens than its images gets the missing ones prepended (``"<image>\\n"`` each). Prompts
    run in batches of ``batch_size`` (default: all at once) with left padding; works with or
    without vtc reducers applied, since the model's own ``generate`` does the work.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, one per image entry")
    per_prompt = _image_lists(images, len(prompts))
    token = getattr(processor, "image_token", None) or "<image>"
    texts = []
    for prompt, imgs in zip(prompts, per_prompt):
        missing = len(imgs) - prompt.count(token)
        if missing < 0:
            raise ValueError(f"prompt {prompt!r} holds {prompt.count(token)} {token} tokens for {len(imgs)} images")
        texts.append(f"{token}\n" * missing + prompt)
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
