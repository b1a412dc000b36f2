"""The ``vtc`` model of lmms-eval: an HF LLaVA / LLaVA-NeXT (or a vtc zoo name such as
``shapes-llava``) with vtc reducers applied, answering lmms-eval's chat requests through
:func:`vtc.answer` (the model's own ``generate``, batched, left padding).

    lmms-eval --model vtc --model_args pretrained=shapes-llava,reducers=dymu:preset=low|holov:k=16 \\
        --tasks vtc_shapes --include_path DIR --batch_size 4
    accelerate launch --num_processes 2 -m lmms_eval --model vtc ...   # data parallel, one GPU per process
    torchrun --standalone --nproc_per_node 2 -m lmms_eval --model vtc ...   # the same, also on the CPU

Beside the scores, each ``generate_until`` call logs (lmms-eval's ``log_metrics``, in the results
JSON under ``throughput``, summed over all processes): visual tokens per image that reached the
LLM (``avg_visual_tokens_per_image``), seconds of :func:`vtc.answer` per example (processor,
``generate`` and decoding: ``avg_latency``) and, unless ``flops=false``, the vision and prefill
FLOPs per example counted by torch's flop counter on each padded batch
(``avg_vision_flops_per_example``, ``avg_prefill_flops_per_example``; prefill: the LLM up to the
first token's logits, as :func:`vtc.measure_vlm.profile` counts it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import torch
import torch.distributed as dist
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from torch import nn
from tqdm import tqdm

from vtc.answer import answer
from vtc.apply import Handle, apply
from vtc.flops import counted_flops
from vtc.lmms.args import ModelArgs, ModelArgsError, parse_model_args
from vtc.measure_vlm import stage_calls
from vtc.models import zoo

DEFAULT_MAX_NEW_TOKENS = 1024  # when a task sets none (lmms-eval's llava_hf default)
VLM_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


@dataclass
class Cost:
    """What the answered batches cost, summed."""

    examples: int = 0
    images: int = 0
    visual_tokens: int = 0
    seconds: float = 0.0
    answer_tokens: int = 0
    vision_flops: int = 0
    prefill_flops: int = 0


def load_vlm(pretrained: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """(model in eval mode, processor) of a vtc zoo name or an HF LLaVA / LLaVA-NeXT id or folder."""
    if pretrained in zoo.names():
        if zoo.ZOO[pretrained].kind != "llava":
            raise ModelArgsError(f"pretrained={pretrained!r} is a {zoo.ZOO[pretrained].kind} image classifier; the vtc model "
                                 f"needs a vision-language model: shapes-llava, or an HF LLaVA / LLaVA-NeXT id or folder")
        checkpoint = zoo.load(pretrained)
        return checkpoint.model.to(device, dtype), checkpoint.processor
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        raise ModelArgsError(f"pretrained={pretrained!r} is neither a vtc zoo name ({', '.join(zoo.names())}) nor an HF "
                             f"LLaVA / LLaVA-NeXT id or folder that loads here: {error}") from None
    if config.model_type not in VLM_CLASSES:
        raise ModelArgsError(f"pretrained={pretrained!r} is a {config.model_type!r} model; the vtc model runs HF "
                             f"{' and '.join(VLM_CLASSES)} models")
    model_class = getattr(transformers, VLM_CLASSES[config.model_type])
    model = model_class.from_pretrained(pretrained, dtype=dtype)
    return model.to(device).eval(), transformers.AutoProcessor.from_pretrained(pretrained)


def _device(args: ModelArgs, accelerator: Accelerator) -> torch.device:
    """``device=`` when given (refused when absent), else this process's accelerate device; under
    data parallelism every process runs on its own device."""
    if accelerator.num_processes > 1 or args.device is None:
        if args.device is not None and torch.device(args.device).type != accelerator.device.type:
            raise ModelArgsError(f"device={args.device} under accelerate launch: each process runs on its own "
                                 f"{accelerator.device.type} device; leave device= out")
        return accelerator.device
    device = torch.device(args.device)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ModelArgsError(f"device={args.device}: this machine has {torch.cuda.device_count()} CUDA devices; "
                             f"use device=cpu")
    return device


def _stop(text: str, until: Sequence[str]) -> str:
    """``text`` cut at the first of the ``until`` strings it holds."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def generation(gen_kwargs: dict) -> tuple[int, dict, list[str]]:
    """(max_new_tokens, ``generate`` settings, stop strings) of a task's generation_kwargs: greedy
    unless temperature > 0 (then sampling with temperature and top_p), beams when num_beams > 1."""
    settings: dict = {}
    temperature = float(gen_kwargs.get("temperature") or 0)
    if temperature > 0:
        settings.update(do_sample=True, temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0))
    beams = int(gen_kwargs.get("num_beams") or 1)
    if beams > 1:
        settings["num_beams"] = beams
    until = gen_kwargs.get("until") or []
    return int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), settings, [until] if isinstance(until, str) else list(until)


class VtcModel(lmms):
    """lmms-eval chat model: a LLaVA under vtc reducers (``--model vtc``; model_args in :mod:`vtc.lmms.args`)."""

    is_simple = False

    def __init__(self, **model_args) -> None:
        super().__init__()
        self.args = parse_model_args(model_args)
        self.accelerator = Accelerator()
        distributed = dist.is_available() and dist.is_initialized()
        self._rank = dist.get_rank() if distributed else self.accelerator.process_index
        self._world_size = dist.get_world_size() if distributed else self.accelerator.num_processes
        self._device = _device(self.args, self.accelerator)
        self.model, self.processor = load_vlm(self.args.pretrained, self._device, getattr(torch, self.args.dtype))
        self.processor.tokenizer.padding_side = "left"  # batched generation, as vtc.answer does
        if not getattr(self.processor, "chat_template", None):
            raise ModelArgsError(f"the processor of pretrained={self.args.pretrained!r} has no chat template; lmms-eval "
                                 f"gives chat messages, which the vtc model turns into prompts with it")
        try:
            self.handle: Handle = apply(self.model, *self.args.reducers)
        except (TypeError, ValueError) as error:
            raise ModelArgsError(f"reducers={'|'.join(self.args.reducers)} cannot act on {self.args.pretrained}: {error}") from None

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to ``requests`` in their order, ``batch_size`` at a time among requests of the
        same task, split and generation settings."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            _, _, gen_kwargs, _, task, split = request.args
            groups.setdefault(json.dumps([task, split, gen_kwargs], sort_keys=True, default=str), []).append(index)
        answers = [""] * len(requests)
        cost = Cost()
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="vtc answering")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for index, text in zip(chunk, self._answer([requests[i] for i in chunk], cost)):
                    answers[index] = text
                progress.update(len(chunk))
        progress.close()
        self._log(cost)
        return answers

    def _answer(self, batch: list[Instance], cost: Cost) -> list[str]:
        images, prompts = [], []
        for request in batch:
            _, doc_to_messages, _, doc_id, task, split = request.args
            messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            pictures, videos, audios = messages.extract_media()
            if videos or audios:
                raise ValueError(f"task {task}: the vtc model reads images and text, not video or audio")
            images.append(pictures)
            prompts.append(self.processor.apply_chat_template(messages.to_hf_messages(), add_generation_prompt=True,
                                                              tokenize=False))
        max_new_tokens, settings, until = generation(batch[0].args[2])
        start = time.perf_counter()
        texts = answer(self.model, self.processor, images, prompts, max_new_tokens=max_new_tokens, **settings)
        cost.seconds += time.perf_counter() - start
        visual = self.handle.visual_tokens
        cost.examples += len(batch)
        cost.images += len(visual)
        cost.visual_tokens += sum(visual)
        cost.answer_tokens += sum(len(self.processor.tokenizer(text, add_special_tokens=False).input_ids) for text in texts)
        if self.args.flops:
            inputs = self.processor(images=[image for pictures in images for image in pictures], text=prompts, padding=True,
                                    return_tensors="pt").to(self._device)
            calls = stage_calls(self.model, inputs, new_tokens=1)
            with torch.inference_mode():
                vision = counted_flops(calls.vision)
                cost.vision_flops += vision
                cost.prefill_flops += counted_flops(calls.prefill) - vision
        return [_stop(text, until) for text in texts]

    def _log(self, cost: Cost) -> None:
        """Log ``cost``, summed over the processes, with lmms-eval's ``log_metrics``."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            totals = torch.tensor(astuple(cost), dtype=torch.float64, device=self._device if self._device.type == "cuda" else "cpu")
            dist.all_reduce(totals)  # accelerate launch on GPUs (NCCL) or torchrun (gloo on the CPU)
            cost = Cost(*(type(value)(total) for value, total in zip(astuple(cost), totals.tolist())))
        if not cost.examples:
            return
        metrics = {"total_requests": cost.examples, "visual_tokens_per_image": cost.visual_tokens / max(1, cost.images)}
        if self.args.flops:
            metrics.update(vision_flops_per_example=cost.vision_flops / cost.examples,
                           prefill_flops_per_example=cost.prefill_flops / cost.examples)
        log_metrics(total_elapsed_time=cost.seconds, total_gen_tokens=cost.answer_tokens,
                    avg_speed=cost.answer_tokens / cost.seconds if cost.seconds > 0 else 0.0, additional_metrics=metrics)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the vtc model answers generate_until tasks; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vtc model answers single-round generate_until tasks; multi-round tasks are not supported")
