"""The lmms-eval task functions of an exported shapes benchmark (:func:`vtc.lmms.export_lmms`
copies this file beside the task YAML as ``utils.py``, so the task runs without vtc installed,
with any lmms-eval model).

A document is one example: ``image``, ``question``, ``answer``, ``qtype``, ``index``. The prompt
is the bare question (the model's chat template places the image); the score is exact match of
the stripped answer, as :func:`vtc.data.evaluate.vlm_scores`, overall and per question type.
"""

from __future__ import annotations

import math

QUESTION_TYPES = ("color", "count", "presence", "position", "digit")  # vtc.data.shapes.QUESTION_TYPES


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float | None]:
    """``exact_match`` of the answer, and ``exact_match_<qtype>`` for each question type: the same
    score for the document's own type, None (left out of the mean) for the others."""
    score = float(results[0].strip() == doc["answer"])
    return {"exact_match": score, **{f"exact_match_{qtype}": score if qtype == doc["qtype"] else None for qtype in QUESTION_TYPES}}


def mean_of_given(items: list[float | None]) -> float:
    """Mean of the scores that are not None (NaN when none is)."""
    given = [item for item in items if item is not None]
    return sum(given) / len(given) if given else math.nan
