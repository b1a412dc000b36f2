"""The shapes benchmark as an lmms-eval task folder (for ``--include_path``): the examples saved with
``datasets``' ``save_to_disk``, a task YAML that reads them offline (``load_from_disk``) and scores
exact match overall and per question type, and its ``utils.py`` (:mod:`vtc.lmms.shapes_task`).

    export_lmms("outputs/lmms", examples=500)
    lmms-eval --model vtc --model_args pretrained=shapes-llava,reducers=pool:tokens=64 \\
        --tasks vtc_shapes --include_path outputs/lmms --batch_size 50
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from vtc.data import shapes
from vtc.data.evaluate import ANSWER_TOKENS
from vtc.lmms import shapes_task

DATA = "data"
UTILS = "utils.py"


def task_yaml(task: str, data: Path, split: str, count: int) -> str:
    """The task YAML: ``data`` (absolute) read with ``load_from_disk``, greedy answers of at most
    :data:`ANSWER_TOKENS` tokens, exact match overall and per question type."""
    per_type = "".join(f"  - metric: exact_match_{qtype}\n    aggregation: !function utils.mean_of_given\n"
                       f"    higher_is_better: true\n" for qtype in shapes_task.QUESTION_TYPES)
    return (f"# {count} examples of the vtc shapes {split} split for lmms-eval, written by vtc.lmms.export_lmms;\n"
            f"# the dataset is read from the absolute path below: export again after moving this folder\n"
            f"task: {task}\n"
            f"dataset_path: {json.dumps(str(data))}\n"
            f"dataset_kwargs:\n  load_from_disk: true\n"
            f"test_split: {split}\n"
            f"output_type: generate_until\n"
            f"doc_to_visual: !function utils.doc_to_visual\n"
            f"doc_to_text: !function utils.doc_to_text\n"
            f"doc_to_target: answer\n"
            f"generation_kwargs:\n  max_new_tokens: {ANSWER_TOKENS}\n  do_sample: false\n"
            f"process_results: !function utils.process_results\n"
            f"metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n{per_type}"
            f"metadata:\n  version: 1.0\n")


def export_lmms(out: Path | str, examples: int = 500, split: str = "test", task: str = "vtc_shapes",
                overwrite: bool = False) -> Path:
    """Write the first ``examples`` examples of shapes ``split`` as lmms-eval task ``task`` under
    ``out``: ``<task>.yaml``, ``utils.py`` and ``data/`` (a DatasetDict with the one split; columns
    image, question, answer, qtype, index). Existing files are replaced only with ``overwrite``.
    Returns the YAML's path. Needs the ``datasets`` library (``pip install 'vtc-vlm[lmms]'``)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("export_lmms needs the datasets library: pip install 'vtc-vlm[lmms]'") from None
    if not task.isidentifier():
        raise ValueError(f"task {task!r}: give a name of letters, digits and underscores, e.g. vtc_shapes")
    batch = shapes.examples(split, examples)
    out = Path(out).resolve()
    paths = out / f"{task}.yaml", out / UTILS, out / DATA
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass overwrite=True to replace them")
    if paths[2].exists():
        shutil.rmtree(paths[2])
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "qtype": datasets.Value("string"),
                                  "index": datasets.Value("int32")})
    rows = {"image": [Image.fromarray(e.image) for e in batch], "question": [e.question for e in batch],
            "answer": [e.answer for e in batch], "qtype": [e.qtype for e in batch], "index": [e.index for e in batch]}
    out.mkdir(parents=True, exist_ok=True)
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(paths[2]))
    shutil.copyfile(shapes_task.__file__, paths[1])
    paths[0].write_text(task_yaml(task, paths[2], split, len(batch)))
    return paths[0]
