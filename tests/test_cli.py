"""`vtc demo` run in-process: the CSV and pictures, the no-overwrite rule, clear errors for bad input."""

import csv

import pytest
from PIL import Image

from vtc.cli import main
from vtc.commands.common import output_dir
from vtc.demo import QUICK_SPECS, compact_counts

FAMILIES = ("tome", "evit", "random", "pool")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    status = main(["demo", "--quick", "--models", "timm,open_clip", "--out", str(out), "--batch", "2", "--no-progress"])
    return status, out


def test_quick_demo_writes_a_sane_csv(quick_run):
    status, out = quick_run
    assert status == 0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for family in ("timm", "open_clip"):
        model_rows = [r for r in rows if r["model"].startswith(family)]
        assert [r["reducer"] for r in model_rows] == ["none"] + QUICK_SPECS[family]
        base = model_rows[0]
        assert float(base["flops_ratio"]) == 1.0 and float(base["speedup"]) == 1.0
        for row in model_rows:
            counts = [int(c) for c in row["tokens_per_layer"].split(">")]
            assert counts == sorted(counts, reverse=True) and int(row["tokens_out"]) == counts[-1]
            assert float(row["gflops"]) > 0 and float(row["throughput_img_s"]) > 0 and float(row["speedup"]) > 0
            assert 0.5 < float(row["cosine"]) <= 1.0 + 1e-6
            if family == "timm":
                assert 0.0 <= float(row["top1_agreement"]) <= 1.0 and float(row["kl"]) >= -1e-6
            else:
                assert row["top1_agreement"] == "" and row["kl"] == ""  # not defined for embeddings
        for row in model_rows[1:]:
            assert int(row["tokens_out"]) < counts[0] and 0.0 < float(row["flops_ratio"]) < 1.0


def test_quick_demo_writes_one_picture_per_family(quick_run):
    _, out = quick_run
    for family in FAMILIES:
        with Image.open(out / f"groups_{family}.png") as picture:
            assert picture.format == "PNG" and picture.size == (224, 224)


def test_output_dir_never_reuses_a_non_empty_folder(tmp_path):
    assert output_dir(tmp_path / "new", overwrite=False) == (tmp_path / "new", None)
    (tmp_path / "mine.txt").write_text("keep me")
    target, note = output_dir(tmp_path, overwrite=False)
    assert target.parent == tmp_path and target.name.startswith("run-") and not target.exists()
    assert "--overwrite" in note
    assert output_dir(tmp_path, overwrite=True) == (tmp_path, None)


def test_demo_into_a_non_empty_folder_leaves_the_users_files_alone(tmp_path, capsys):
    mine = tmp_path / "results.csv"
    mine.write_text("the user's own results")
    status = main(["demo", "--quick", "--models", "timm", "--reducer", "pool:kernel=2", "--batch", "1",
                   "--out", str(tmp_path), "--no-progress"])
    assert status == 0
    assert mine.read_text() == "the user's own results"
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert run.name.startswith("run-") and (run / "results.csv").exists() and (run / "groups_pool.png").exists()
    assert "not empty" in capsys.readouterr().out


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--out", str(target)])
    assert exit_info.value.code == 2 and "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, message",
    [
        (["--reducer", "tomee:r=3"], "unknown reducer 'tomee'"),
        (["--reducer", "tome:q=3"], "bad option 'q=3'"),
        (["--reducer", "evit:keep=1.5"], "keep rate must be in (0, 1]"),
        (["--reducer", "pool"], "exactly one of kernel"),
        (["--batch", "0"], "positive integer"),
        (["--repeats", "x"], "positive integer"),
        (["--models", "resnet"], "unknown model"),
        (["--pretrained"], "--quick"),
    ],
)
def test_bad_options_exit_with_a_clear_message(option, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--out", str(tmp_path / "out"), *option])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_budget_that_does_not_fit_the_model_is_an_error(tmp_path, capsys):
    status = main(["demo", "--quick", "--models", "timm", "--reducer", "tome:r=150,strict=true", "--out",
                   str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert "tome:r=150,strict=true" in err and "strict=true" in err
    assert not (tmp_path / "out").exists()


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_compact_counts():
    assert compact_counts([197, 197, 139, 139, 98]) == "197x2>139x2>98"
    assert compact_counts(list(range(20, 7, -1))) == "20>19>...>8"
