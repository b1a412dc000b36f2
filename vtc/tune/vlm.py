"""Evaluate reducers on an HF LLaVA: greedy answers through the model's own ``generate``,
agreement = the same answer as the unreduced model, accuracy against reference answers, visual
tokens from ``handle.visual_tokens``, vision + prefill FLOPs from :func:`vtc.measure_vlm.profile`."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from torch import nn

from vtc.answer import answer
from vtc.apply import apply
from vtc.measure_vlm import profile, time_stages
from vtc.tune.evaluator import ModelEvaluator, Outputs, check_examples, digest, weights_digest

NEW_TOKENS = 2  # tokens generated in the FLOP count and the timing (only vision and prefill are used)


class VLMEvaluator(ModelEvaluator):
    """Reducers on a LLaVA ``model`` answering ``prompts[i]`` about ``images[i]`` (one PIL image
    each; a prompt without the image placeholder gets ``"<image>\\n"`` in front, as
    :func:`vtc.answer` does).

    ``answers`` (reference texts) add accuracy (exact match). FLOPs per image are counted on the
    first batch (vision + prefill); ``repeats > 0`` times that batch side by side with the
    unreduced model (:func:`vtc.measure_vlm.time_stages`). No logits are compared: ``kl`` and
    ``cosine`` stay empty. ``name`` describes the model in the results file's setup.
    """

    def __init__(self, model: nn.Module, processor, images: Sequence[Image.Image], prompts: Sequence[str],
                 answers: Sequence[str] | None = None, max_new_tokens: int = 8, batch_size: int = 16, repeats: int = 0,
                 warmup: int = 1, name: str | None = None) -> None:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image")
        check_examples(len(images), "VLMEvaluator", prompts=prompts, answers=answers)
        if not all(isinstance(image, Image.Image) for image in images):
            raise TypeError("images must be PIL images, one per prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        token = getattr(processor, "image_token", None) or "<image>"
        several = [p for p in prompts if p.count(token) > 1]
        if several:
            raise ValueError(f"one image per prompt: {several[0]!r} holds {several[0].count(token)} {token} placeholders")
        self.model, self.processor, self.images = model, processor, list(images)
        self.prompts = [p if token in p else f"{token}\n{p}" for p in prompts]
        self.max_new_tokens = max_new_tokens
        self._inputs: dict | None = None
        parameter = next(model.parameters())
        setup = {"evaluator": "vlm", "model": name or type(model).__qualname__, "weights": weights_digest(model),
                 "images": digest(f"{i.mode}{i.size}".encode() + i.tobytes() for i in self.images),
                 "prompts": digest([repr(self.prompts).encode()]), "max_new_tokens": max_new_tokens,
                 "device": parameter.device.type, "dtype": str(parameter.dtype)}
        super().__init__(answers, repeats, warmup, batch_size, setup)

    def first_batch(self) -> dict:
        """Processor inputs of the first batch (left padding), for the FLOP count and the timing."""
        if self._inputs is None:
            tokenizer = self.processor.tokenizer
            saved, tokenizer.padding_side = tokenizer.padding_side, "left"
            try:
                inputs = self.processor(images=self.images[:self.batch_size], text=self.prompts[:self.batch_size],
                                        padding=True, return_tensors="pt")
            finally:
                tokenizer.padding_side = saved
            self._inputs = inputs.to(next(self.model.parameters()).device)
        return self._inputs

    def run(self, specs: tuple[str, ...]) -> Outputs:
        predicted: list[str] = []
        tokens: list[int] = []
        with apply(self.model, *specs) as handle:
            for start in range(0, len(self.images), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                predicted += answer(self.model, self.processor, self.images[chunk], self.prompts[chunk],
                                    max_new_tokens=self.max_new_tokens)
                tokens += handle.visual_tokens
            inputs = self.first_batch()
            report = profile(self.model, inputs, new_tokens=NEW_TOKENS, timed=False)
        flops = (report.vision.flops + report.prefill.flops) / inputs["input_ids"].shape[0]
        return Outputs(predicted, tokens, flops)

    def time(self, specs: tuple[str, ...]) -> tuple[float, float]:
        reduced, reference = time_stages(self.model, [list(specs), []], self.first_batch(), new_tokens=NEW_TOKENS,
                                         warmup=self.warmup, repeats=self.repeats)
        return ((reduced["vision"] + reduced["prefill"]) * 1e3, (reference["vision"] + reference["prefill"]) * 1e3)
