"""The ``vtc`` subcommands as a user runs them: version, devices, eval, calibrate and tune faces."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vtc.cli import main
from vtc.models import zoo
from vtc.records import installed_version


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == f"vtc {installed_version()}" and out.split()[1][0].isdigit()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["demo"], ["eval"], ["tune"]])
def test_an_absent_gpu_is_refused_not_replaced_by_the_cpu(command, tmp_path, capsys):
    err = _fails([*command, "--device", "cuda", *([] if command == ["tune"] else ["--out", str(tmp_path / "o")])], capsys)
    assert "no CUDA GPU is available" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()


def test_demo_sizes_are_exclusive(tmp_path, capsys):
    assert "not allowed with argument --quick" in _fails(["demo", "--quick", "--full", "--out", str(tmp_path)], capsys)


def test_eval_refuses_connector_reducers_on_a_classifier(tmp_path, capsys):
    err = _fails(["eval", "--models", "shapes-vit", "--reducers", "holov", "--dymu-presets", "--out", str(tmp_path / "o")], capsys)
    assert "holov act only in a LLaVA (its connector or LLM)" in err and "tome, evit, random, pool" in err


def test_eval_writes_shapes_csv(tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--models", "shapes-vit", "--reducers", "pool", "--budgets", "64", "--dymu-presets",
                 "--examples", "10", "--repeats", "1", "--timing-batch", "2", "--out", str(out), "--no-progress"]) == 0
    with (out / "shapes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["reducer"], r["budget"]) for r in rows] == [("none", "256"), ("pool", "64")]
    saved = json.loads((out / "shapes.json").read_text())
    assert [r["spec"] for r in saved["rows"]] == ["none", "pool:tokens=64"] and saved["command"] == "vtc eval"
    assert saved["options"]["models"] == ["shapes-vit"] and saved["versions"]["vtc"] == installed_version()
    assert saved["checkpoints"] == {"shapes-vit": str(zoo.locate("shapes-vit")[2])}
    for picture in ("pareto.png", "per_type.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG"


def test_calibrate_checks_out_and_the_schedule_before_computing(tmp_path, capsys):
    held = tmp_path / "cal"
    held.mkdir()
    (held / "dymu.json").write_text("{}")
    err = _fails(["calibrate", "--model", "shapes-vit", "--preset", "mid", "--out", str(held)], capsys)
    assert "already holds a DyMU calibration" in err and "--overwrite" in err and "overwrite=True" not in err
    err = _fails(["calibrate", "--model", "shapes-vit", "--target", "4", "--out", str(tmp_path / "new")], capsys)
    assert "--clamp" in err and "--schedule linear" in err and "clamp=True" not in err
    assert not (tmp_path / "new").exists()
    err = _fails(["calibrate", "--model", "timm:", "--preset", "mid", "--out", str(tmp_path / "new")], capsys)
    assert "names no model" in err


def test_calibrating_random_weights_records_no_model_id(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", "timm:test_vit", "--images-dir", str(images), "--images", "2", "--held-out", "1",
                 "--target", "40", "--clamp", "--batch-size", "2", "--out", str(out)]) == 0
    assert "weights: random" in capsys.readouterr().out
    assert json.loads((out / "dymu.json").read_text())["model_id"] is None
    err = _fails(["calibrate", "--model", "timm:test_vit", "--images-dir", str(images), "--images", "3", "--held-out", "1",
                  "--preset", "mid", "--out", str(tmp_path / "more")], capsys)
    assert "holds 3 image files" in err and "needs 4" in err


def test_tune_finds_a_budget_and_resumes(tmp_path, capsys):
    results = tmp_path / "tune.csv"
    argv = ["tune", "--model", "shapes-vit", "--knobs", "tome:r=0..40:8", "--target", "agreement>=0.9",
            "--examples", "20", "--results", str(results)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "smallest budget meeting agreement>=0.9" in out
    rows = results.read_text().splitlines()
    assert main(argv) == 0  # a rerun resumes: every point is read back, none added
    assert results.read_text().splitlines() == rows
    assert "smallest budget" in capsys.readouterr().out


def test_bench_writes_csv_and_json_with_the_specs(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "shapes-vit", "--reducer", "tome:r=16", "--reducer", "evit:keep=0.5",
                 "--batch", "2", "--repeats", "1", "--out", str(out)]) == 0
    with (out / "bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["reducer"] for r in rows] == ["tome:r=16", "evit:keep=0.5"]
    assert all(float(r["flops_ratio"]) < 1 and 0 <= float(r["top1_agreement"]) <= 1 for r in rows)
    record = json.loads((out / "bench.json").read_text())
    assert record["model"] == "shapes-vit" and record["versions"]["torch"] == torch.__version__
    err = _fails(["bench", "--model", "shapes-llava", "--reducer", "tome:r=2", "--out", str(tmp_path / "o")], capsys)
    assert "vision-language model" in err
    err = _fails(["bench", "--model", "timm:test_vit", "--reducer", "tome:r=2", "--images-dir", str(tmp_path / "none"),
                  "--out", str(tmp_path / "o")], capsys)
    assert "is not a folder" in err


def test_viz_draws_one_map_per_image_and_reducer(tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["viz", "--model", "shapes-vit", "--reducer", "tome:r=16", "--reducer", "evit:keep=0.5", "--out", str(out)]) == 0
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 8
    with Image.open(pictures[0]) as picture:
        assert picture.size == (256, 256)  # the 64-pixel input drawn 4x
    err = _fails(["viz", "--model", "timm:test_vit", "--reducer", "tome:r=2", "--out", str(tmp_path / "o")], capsys)
    assert "--image is needed" in err


def test_export_lmms_without_its_extra_says_how_to_install(tmp_path, capsys):
    pytest.importorskip("vtc.lmms")
    try:
        import datasets  # noqa: F401
    except ImportError:
        err = _fails(["eval", "--export-lmms", str(tmp_path / "task"), "--examples", "5"], capsys)
        assert "pip install 'vtc-vlm[lmms]'" in err
        assert not (tmp_path / "task" / "vtc_shapes.yaml").exists()
    else:
        assert main(["eval", "--export-lmms", str(tmp_path / "task"), "--examples", "5"]) == 0
        assert (tmp_path / "task" / "vtc_shapes.yaml").is_file()


def _options(parser):
    """Every option of ``parser`` (not --help), with its help text."""
    return [(action.option_strings[0], action.help or "") for action in parser._actions
            if action.option_strings and action.option_strings[0] != "-h"]


def test_every_option_of_every_command_has_help_with_an_example():
    from vtc.cli import build_parser
    from vtc.commands import COMMANDS

    commands = next(a for a in build_parser()._actions if a.choices and set(COMMANDS) <= set(a.choices)).choices
    lacking = [f"vtc {name} {flag}" for name in COMMANDS for flag, text in _options(commands[name])
               if "e.g." not in text]
    assert not lacking, f"options without an example in their help: {lacking}"


def test_options_come_from_the_library_dataclasses_and_signatures():
    """The defaults --help shows are the library's own: change a field's default and the option follows."""
    import argparse
    import dataclasses

    from vtc.commands.options import add_options, add_parameters, from_options
    from vtc.demo import DemoOptions
    from vtc.dymu import calibrate
    from vtc.shapes_benchmark import BenchmarkOptions

    parser = argparse.ArgumentParser()
    add_options(parser, BenchmarkOptions, only=("examples", "budgets", "progress"))
    assert from_options(BenchmarkOptions, parser.parse_args([])) == BenchmarkOptions()
    parsed = from_options(BenchmarkOptions, parser.parse_args(["--budgets", "64", "16", "--no-progress"]))
    assert parsed == dataclasses.replace(BenchmarkOptions(), budgets=[64, 16], progress=False)
    unset = argparse.ArgumentParser()
    add_options(unset, DemoOptions, only=("batch", "quick"), unset=True)
    assert from_options(DemoOptions, unset.parse_args(["--quick"]), out_dir="x").batch == 4  # the quick default
    signature = argparse.ArgumentParser()
    from vtc.commands.calibrate import CALIBRATE_FLAGS

    add_parameters(signature, calibrate, CALIBRATE_FLAGS)
    assert vars(signature.parse_args([])) == {"schedule": "constant", "clamp": False, "cap": None, "batch_size": 64}
    with pytest.raises(ValueError, match="has no help"):
        add_options(argparse.ArgumentParser(), dataclasses.make_dataclass("Bare", [("n", int, 1)]))
