"""The evaluator for a shipped shapes checkpoint (``shapes-vit``: digit classifier; ``shapes-llava``:
question answering), on the validation split by default so that the test split stays for the
final report (:mod:`vtc.shapes_benchmark` evaluates on test)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from vtc.data import shapes
from vtc.data.evaluate import ANSWER_TOKENS
from vtc.data.training import pixels
from vtc.models import zoo
from vtc.tune.classifier import ClassifierEvaluator
from vtc.tune.vlm import VLMEvaluator


def shapes_evaluator(name: str, split: str = "val", examples: int = 200, qtypes: Sequence[str] | None = None,
                     batch_size: int = 50, repeats: int = 0, device: str = "cpu") -> ClassifierEvaluator | VLMEvaluator:
    """An evaluator of checkpoint ``name`` (moved to ``device``) on the first ``examples`` examples
    of ``split`` (``qtypes``: only those question types, ``shapes-llava`` only), with accuracy
    against the truth: the digit for ``shapes-vit``, the exact answer for ``shapes-llava``. Tune on
    ``val`` (the default), report on ``test``."""
    ckpt = zoo.load(name)
    ckpt.model.to(device)
    where = f"{ckpt.name} on {split}[:{examples}]"
    if ckpt.kind != "llava":
        if qtypes is not None:
            raise ValueError(f"{ckpt.name} is a classifier of the digit; question types apply to shapes-llava")
        chosen = shapes.examples(split, examples)
        return ClassifierEvaluator(ckpt.model, pixels([e.image for e in chosen]), [e.label for e in chosen],
                                   batch_size=batch_size, repeats=repeats, name=where)
    types = tuple(qtypes) if qtypes is not None else shapes.QUESTION_TYPES
    chosen = shapes.examples(split, examples, qtypes=types)
    return VLMEvaluator(ckpt.model, ckpt.processor, [Image.fromarray(e.image) for e in chosen], [e.prompt for e in chosen],
                        [e.answer for e in chosen], max_new_tokens=ANSWER_TOKENS, batch_size=batch_size, repeats=repeats,
                        name=f"{where} ({', '.join(types)})")
