"""vtc's lmms-eval plugin (vtc.lmms): the model_args it reads, the shapes task it exports and, where
lmms-eval is installed, lmms-eval's real command line (offline, on an exported task) giving the
same per-example answers and scores as vtc.data.evaluate.vlm_scores with the same reducers.

The parsing and task-function tests need neither lmms-eval nor datasets; the export tests need
datasets, the command-line tests lmms-eval (both skipped cleanly without them).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vtc
from vtc.data import shapes
from vtc.lmms import ModelArgs, ModelArgsError, export_lmms, parse_model_args, shapes_task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 20
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---- model_args ------------------------------------------------------------------------------------

def test_model_args_read_as_lmms_eval_passes_them():
    args = parse_model_args({"pretrained": "shapes-llava", "reducers": "dymu:preset=low|holov:k=16", "batch_size": "4"})
    assert args == ModelArgs("shapes-llava", ("dymu:preset=low", "holov:k=16"), batch_size=4)
    assert parse_model_args({"pretrained": "shapes-llava", "batch_size": 1}) == ModelArgs("shapes-llava")
    args = parse_model_args({"pretrained": "shapes-llava", "reducers": "'tome:r=8,prop_attn=false | pool:tokens=64'",
                             "device": "CPU", "dtype": "bfloat16", "flops": False, "max_batch_size": 64})
    assert args == ModelArgs("shapes-llava", ("tome:r=8,prop_attn=false", "pool:tokens=64"), device="cpu",
                             dtype="bfloat16", flops=False)


LLAVA = {"pretrained": "shapes-llava"}


@pytest.mark.parametrize("given, message", [
    ({}, "model_args need pretrained=NAME: a vtc zoo name (shapes-llava) or an HF LLaVA / LLaVA-NeXT id or folder, "
         "e.g. --model_args pretrained=shapes-llava,reducers=dymu:preset=low|holov:k=16"),
    ({"pretrained": 7}, "model_args need pretrained=NAME"),
    ({**LLAVA, "reducers": "pool:tokens=64||tome:r=2"}, "reducers='pool:tokens=64||tome:r=2' has an empty reducer spec: "
                                                        "separate specs by a single '|'"),
    ({**LLAVA, "reducers": "pool:tokens=64|"}, "has an empty reducer spec"),
    ({**LLAVA, "reducers": "nosuch:k=1"}, "bad reducer spec 'nosuch:k=1' in reducers='nosuch:k=1': unknown reducer 'nosuch' "
                                          "in 'nosuch:k=1'; known reducers: dymu, dyvte, evit, exit, holov, m3, mqt, pool, random, tome, vtu"),
    ({**LLAVA, "reducers": "pool:tokens=abc"}, "bad reducer spec 'pool:tokens=abc' in reducers='pool:tokens=abc': pool: "
                                               "tokens must be an integer or none, got 'abc'"),
    ({**LLAVA, "reducers": True}, "reducers=True: give reducer spec strings separated by '|'"),
    ({**LLAVA, "reducers": "tome:r=8", "prop_attn": False},
     "unknown model_args prop_attn: the vtc model takes pretrained, reducers, batch_size, device, dtype, flops; a reducer "
     "option after a comma is read by lmms-eval as a model_arg of its own: quote the reducers value"),
    ({"pretraind": "x"}, "unknown model_args pretraind: the vtc model takes pretrained, reducers, batch_size, device, dtype, flops"),
    ({**LLAVA, "batch_size": "auto"}, "batch_size='auto': the vtc model takes a fixed batch size, e.g. --batch_size 4"),
    ({**LLAVA, "batch_size": "0"}, "batch_size='0': give a positive integer"),
    ({**LLAVA, "batch_size": 2.5}, "batch_size=2.5: give a positive integer"),
    ({**LLAVA, "dtype": "float8"}, "dtype='float8': choose one of float32, bfloat16, float16"),
    ({**LLAVA, "flops": "yes"}, "flops='yes': give true or false"),
    ({**LLAVA, "device": "gpu"}, "device='gpu': choose cpu, cuda or cuda:N"),
])
def test_bad_model_args_say_what_is_wrong_and_what_is_allowed(given, message):
    with pytest.raises(ModelArgsError) as caught:
        parse_model_args(given)
    assert message in str(caught.value)


# ---- task functions and export ---------------------------------------------------------------------

def test_task_functions_score_exact_match_per_question_type():
    assert shapes_task.QUESTION_TYPES == shapes.QUESTION_TYPES
    scores = shapes_task.process_results({"answer": "red", "qtype": "color"}, [" red "])
    assert scores == {"exact_match": 1.0, "exact_match_color": 1.0, "exact_match_count": None, "exact_match_presence": None,
                      "exact_match_position": None, "exact_match_digit": None}
    assert shapes_task.process_results({"answer": "3", "qtype": "count"}, ["2"])["exact_match_count"] == 0.0
    assert shapes_task.mean_of_given([1.0, None, 0.0, 1.0]) == pytest.approx(2 / 3)
    assert math.isnan(shapes_task.mean_of_given([None, None]))


def test_export_writes_the_examples_a_task_and_its_functions(tmp_path):
    datasets = pytest.importorskip("datasets")
    yaml_path = export_lmms(tmp_path / "task", examples=7, split="val", task="shapes_val")
    folder = (tmp_path / "task").resolve()
    assert yaml_path == folder / "shapes_val.yaml"
    assert (folder / "utils.py").read_text() == Path(shapes_task.__file__).read_text()
    text = yaml_path.read_text()
    for line in ("task: shapes_val", f'dataset_path: "{folder / "data"}"', "  load_from_disk: true", "test_split: val",
                 "  max_new_tokens: 2", "process_results: !function utils.process_results",
                 "  - metric: exact_match_digit\n    aggregation: !function utils.mean_of_given"):
        assert line in text
    rows = datasets.load_from_disk(str(folder / "data"))["val"]
    expected = shapes.examples("val", 7)
    assert rows["question"] == [e.question for e in expected] and rows["answer"] == [e.answer for e in expected]
    assert rows["qtype"] == [e.qtype for e in expected] and rows["index"] == [e.index for e in expected]
    assert all(np.array_equal(np.asarray(row["image"]), e.image) for row, e in zip(rows, expected))


def test_export_refuses_to_replace_files_unless_asked(tmp_path):
    pytest.importorskip("datasets")
    export_lmms(tmp_path, examples=5)
    with pytest.raises(FileExistsError, match="already exist; pass overwrite=True"):
        export_lmms(tmp_path, examples=5)
    export_lmms(tmp_path, examples=6, overwrite=True)
    assert "# 6 examples of the vtc shapes test split" in (tmp_path / "vtc_shapes.yaml").read_text()
    with pytest.raises(ValueError, match="task 'vtc-shapes': give a name of letters, digits and underscores"):
        export_lmms(tmp_path / "other", task="vtc-shapes")


def test_entry_point_names_the_manifest():
    section = (ROOT / "pyproject.toml").read_text().split('[project.entry-points."lmms_eval.models"]')[1].split("\n[")[0]
    assert [line for line in section.split("\n")[1:] if line] == ['vtc = "vtc.lmms.registration:MANIFEST"']


# ---- lmms-eval itself ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lmms_task(tmp_path_factory) -> Path:
    """The first EXAMPLES shapes test examples exported as task vtc_shapes (lmms-eval installed)."""
    pytest.importorskip("lmms_eval")
    folder = tmp_path_factory.mktemp("lmms-task")
    export_lmms(folder, examples=EXAMPLES)
    return folder


def lmms_eval(*args: str, cwd: Path, launcher: tuple[str, ...] = ()) -> str:
    """Run lmms-eval's command line offline; its output (it exits 0 even when the run fails)."""
    command = [sys.executable, "-m", *launcher, "lmms_eval", *args]  # a launcher ends with its own "-m"
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900)
    return done.stdout + done.stderr


def run_task(task: Path, out: Path, model_args: str, launcher: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
    """(results JSON, samples by doc_id) of vtc_shapes under ``model_args`` with batch size 4."""
    output = lmms_eval("--model", "vtc", "--model_args", model_args, "--tasks", "vtc_shapes", "--include_path", str(task),
                       "--batch_size", "4", "--limit", str(EXAMPLES), "--output_path", str(out), "--log_samples",
                       cwd=out.parent, launcher=launcher)
    results, samples = list(out.rglob("*_results.json")), list(out.rglob("*_samples_vtc_shapes.jsonl"))
    assert len(results) == 1 and len(samples) == 1, output[-3000:]
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    return json.loads(results[0].read_text()), sorted(rows, key=lambda row: row["doc_id"])


def expected_scores(checkpoint, specs: tuple[str, ...]):
    from vtc.data.evaluate import vlm_scores

    with vtc.apply(checkpoint.model, *specs):
        return vlm_scores(checkpoint.model, checkpoint.processor, shapes.examples("test", EXAMPLES))


@pytest.mark.parametrize("reducers", ["pool:tokens=64", "dymu:preset=low|holov:k=16"])
def test_command_line_answers_as_vtc_eval(lmms_task, tmp_path, shapes_llava, reducers):
    from vtc.measure_vlm import profile

    results, rows = run_task(lmms_task, tmp_path / "out", f"pretrained=shapes-llava,reducers={reducers}")
    scores = expected_scores(shapes_llava, tuple(reducers.split("|")))
    assert [row["doc_id"] for row in rows] == list(range(EXAMPLES))
    assert [row["filtered_resps"] for row in rows] == scores.predicted
    assert [row["target"] for row in rows] == scores.truth
    metrics = results["results"]["vtc_shapes"]
    assert metrics["exact_match,none"] == pytest.approx(scores.accuracy)
    for qtype, accuracy in scores.by_type().items():
        assert metrics[f"exact_match_{qtype},none"] == pytest.approx(accuracy)
    throughput = results["throughput"]
    examples = shapes.examples("test", EXAMPLES)
    model, processor = shapes_llava.model, shapes_llava.processor
    visual, prefill, vision = [], 0, 0
    saved, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
    try:
        with vtc.apply(model, *reducers.split("|")) as handle:  # the same batches of 4, profiled by vtc.measure_vlm
            for start in range(0, EXAMPLES, 4):
                batch = examples[start:start + 4]
                inputs = processor(images=[Image.fromarray(e.image) for e in batch], text=[e.prompt for e in batch],
                                   padding=True, return_tensors="pt")
                report = profile(model, inputs, new_tokens=1, timed=False)
                visual += handle.visual_tokens
                prefill, vision = prefill + report.prefill.flops, vision + report.vision.flops
    finally:
        processor.tokenizer.padding_side = saved
    assert throughput["avg_visual_tokens_per_image"] == pytest.approx(sum(visual) / len(visual))
    assert throughput["avg_prefill_flops_per_example"] == pytest.approx(prefill / EXAMPLES)
    assert throughput["avg_vision_flops_per_example"] == pytest.approx(vision / EXAMPLES)
    assert throughput["avg_latency"] > 0
    if reducers == "pool:tokens=64":
        assert visual == [64] * EXAMPLES


def test_command_line_runs_an_hf_llava_next_folder_with_a_quoted_spec(lmms_task, tmp_path):
    import llava_models

    from vtc.data.evaluate import vlm_scores
    from vtc.train.shapes_llava_model import CHAT_TEMPLATE

    folder = tmp_path / "next"
    model, processor = llava_models.build_llava(folder, kind="next", chat_template=CHAT_TEMPLATE)
    specs = ("tome:r=2,prop_attn=false", "pool:tokens=4")  # a comma inside a spec: the value is quoted
    _, rows = run_task(lmms_task, tmp_path / "out", f"pretrained={folder},reducers='{'|'.join(specs)}',flops=false")
    with vtc.apply(model, *specs):
        scores = vlm_scores(model, processor, shapes.examples("test", EXAMPLES))
    assert [row["filtered_resps"] for row in rows] == scores.predicted


def test_data_parallel_run_gives_the_same_answers(lmms_task, tmp_path, shapes_llava):
    launcher = ("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m")
    results, rows = run_task(lmms_task, tmp_path / "out", "pretrained=shapes-llava,reducers=pool:tokens=64,flops=false",
                             launcher=launcher)
    assert [row["filtered_resps"] for row in rows] == expected_scores(shapes_llava, ("pool:tokens=64",)).predicted
    assert results["throughput"]["avg_visual_tokens_per_image"] == 64
    assert results["throughput"]["total_gen_tokens"] >= EXAMPLES  # both processes' answers, summed


def test_generation_settings_follow_the_task():
    pytest.importorskip("lmms_eval")
    from vtc.lmms.model import DEFAULT_MAX_NEW_TOKENS, generation

    assert generation({"max_new_tokens": 2, "do_sample": False, "until": ["\n\n"]}) == (2, {}, ["\n\n"])
    assert generation({"temperature": 0.7, "top_p": None, "num_beams": 3, "until": "."}) == (
        DEFAULT_MAX_NEW_TOKENS, {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "num_beams": 3}, ["."])


def test_manifest_is_registered():
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model

    from vtc.lmms.model import VtcModel

    assert get_model("vtc") is VtcModel


@pytest.mark.parametrize("args, message", [
    (("--model", "vtc", "--model_args", "pretrained=shapes-llava,reducers=pool:tokens=64||tome:r=2", "--tasks", "vtc_shapes"),
     "reducers='pool:tokens=64||tome:r=2' has an empty reducer spec"),
    (("--model", "vtc", "--model_args", "pretrained=shapes-llava,reducers=tome:r=8,prop_attn=false", "--tasks", "vtc_shapes"),
     "unknown model_args prop_attn"),
    (("--model", "vtc", "--model_args", "pretrained=shapes-vit", "--tasks", "vtc_shapes"),
     "pretrained='shapes-vit' is a timm image classifier"),
    (("--model", "vtcx", "--tasks", "vtc_shapes"), "Model 'vtcx' not found in available models"),
    (("--model", "vtc", "--model_args", "pretrained=shapes-llava", "--tasks", "no_such_task"), "Tasks not found: no_such_task"),
])
def test_command_line_errors_are_clear(lmms_task, tmp_path, args, message):
    output = lmms_eval(*args, "--include_path", str(lmms_task), "--output_path", str(tmp_path / "out"), cwd=tmp_path)
    assert message in output, output[-3000:]
    assert not list(tmp_path.rglob("*_results.json"))


def test_model_errors_name_what_cannot_load(tmp_path):
    pytest.importorskip("lmms_eval")
    from vtc.lmms.model import VtcModel
    from vtc.models import zoo

    names = re.escape(", ".join(zoo.names()))
    with pytest.raises(ModelArgsError, match=rf"is neither a vtc zoo name \({names}\) nor an HF LLaVA"):
        VtcModel(pretrained=str(tmp_path))
    with pytest.raises(ModelArgsError, match=r"reducers=exit:layer=99 cannot act on shapes-llava: exit: layers \[99\] do not exist"):
        VtcModel(pretrained="shapes-llava", reducers="exit:layer=99")
