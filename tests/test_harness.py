"""The accuracy harnesses (vtc.harness) and their ``vtc eval --folder`` face: top-1 of a timm
classifier and zero-shot classification by open_clip and HF CLIP on small folders of random
pictures, checked against hand computations; every bad input is a clear error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import families as fam
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vtc import harness
from vtc.cli import main
from vtc.records import installed_version
from vtc.stats import wilson

TOME_REAL = "tome:r=8"  # a real reduction at the tiny models' 8 x 8 patch grid
TEMPLATES = ("a photo of a {}.", "a sketch of a {}.")


def write_folder(root: Path, classes, per_class: int = 2, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: random pictures of uneven sizes."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (36 + 4 * i, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def pictures(root: Path) -> list[Image.Image]:
    """The folder's pictures in the harness's order: sorted classes, sorted files."""
    return [Image.open(path).convert("RGB") for folder in sorted(root.iterdir()) for path in sorted(folder.iterdir())]


def resize_transform(size: int = fam.IMAGE):
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])


def check_side_by_side(rows, specs) -> None:
    """The unreduced row first; the no-op spec equals it; the real reduction costs less."""
    by_spec = {row.spec: row for row in rows}
    assert [row.spec for row in rows] == [harness.UNREDUCED, *specs]
    none, noop, real = by_spec["none"], by_spec["tome:r=0"], by_spec[TOME_REAL]
    assert noop.predictions == none.predictions and noop.correct == none.correct and noop.agreement == 1.0
    assert noop.flops_ratio == 1.0 and noop.visual_tokens == none.visual_tokens == 64
    assert real.flops_ratio < 1 and real.visual_tokens < 64 and len(real.predictions) == none.images
    assert all(row.throughput > 0 and row.reference_throughput > 0 for row in rows)


# ----- classifier ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier(timm_vit):
    return timm_vit(num_classes=3), resize_transform()


def test_classification_matches_a_hand_argmax(classifier, tmp_path):
    model, transform = classifier
    folder = write_folder(tmp_path / "data", ["b", "a", "c"])  # class index: sorted position
    specs = ["tome:r=0", TOME_REAL]
    rows = harness.folder_classification(model, folder, specs, transform=transform,
                                         config=harness.HarnessConfig(batch_size=4, repeats=1, warmup=0))
    with torch.no_grad():
        hand = [model(transform(p)[None]).argmax(-1).item() for p in pictures(folder)]
    labels = [0, 0, 1, 1, 2, 2]
    none = rows[0]
    assert none.predictions == hand and none.images == 6
    assert none.correct == sum(p == t for p, t in zip(hand, labels)) and none.accuracy == none.correct / 6
    assert none.interval == wilson(none.correct, 6)
    check_side_by_side(rows, specs)
    assert fam.no_instance_patches(model) == []  # every reducer removed after the run


def test_a_class_index_labels_a_subset(timm_vit, tmp_path):
    model, transform = timm_vit(num_classes=5), resize_transform()
    folder = write_folder(tmp_path / "data", ["x", "y"], per_class=1)
    rows = harness.folder_classification(model, folder, transform=transform, class_index={"x": 4, "y": 1},
                                         config=harness.HarnessConfig(repeats=0))
    with torch.no_grad():
        hand = [model(transform(p)[None]).argmax(-1).item() for p in pictures(folder)]
    assert rows[0].predictions == hand and rows[0].correct == (hand[0] == 4) + (hand[1] == 1)
    assert rows[0].throughput is None and rows[0].speedup is None  # repeats=0: not timed


# ----- zero-shot ----------------------------------------------------------------------------------
def toy_tokenizer(texts: list[str]) -> torch.Tensor:
    """open_clip-style ids for the tiny text tower (vocabulary 100, context 8): words hashed into
    2..98, the end token 99 (the highest id: open_clip pools at the argmax), zero padding."""
    rows = []
    for text in texts:
        ids = [sum(map(ord, word)) % 97 + 2 for word in text.split()][:7] + [99]
        rows.append(ids + [0] * (8 - len(ids)))
    return torch.tensor(rows)


def hand_zero_shot(encode_image, encode_text, images: torch.Tensor, names: list[str]) -> list[int]:
    """CLIP's protocol, written out: normalised image embeddings @ normalised means of normalised prompts."""
    with torch.no_grad():
        image = F.normalize(encode_image(images).float(), dim=-1)
        classes = [F.normalize(encode_text([t.replace("{}", n) for t in TEMPLATES]).float(), dim=-1).mean(0) for n in names]
        return (image @ F.normalize(torch.stack(classes), dim=-1).T).argmax(-1).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fam.ModelCache(tmp_path_factory)


@pytest.fixture
def animals(tmp_path) -> Path:
    return write_folder(tmp_path / "animals", ["bird", "cat", "dog"])


def test_zero_shot_open_clip_matches_a_hand_computation(models, animals):
    model, transform = models.get("open_clip"), resize_transform()
    names = {"bird": "small bird", "cat": "cat", "dog": "big dog"}  # a mapping folder -> name
    specs = ["tome:r=0", TOME_REAL]
    rows = harness.zero_shot_classification(model, toy_tokenizer, animals, names, specs, transform=transform, templates=TEMPLATES,
                                            config=harness.HarnessConfig(batch_size=4, repeats=1, warmup=0))
    images = torch.stack([transform(p) for p in pictures(animals)])
    hand = hand_zero_shot(model.encode_image, lambda texts: model.encode_text(toy_tokenizer(texts)), images,
                          ["small bird", "cat", "big dog"])
    assert rows[0].predictions == hand and rows[0].correct == sum(p == t for p, t in zip(hand, [0, 0, 1, 1, 2, 2]))
    check_side_by_side(rows, specs)


def test_zero_shot_hf_clip_matches_a_hand_computation(models, animals):
    from vtc.train.shapes_llava_model import word_tokenizer

    model, transform = models.get("hf-clip-model"), resize_transform()
    tokenizer = word_tokenizer(["a", "photo", "sketch", "of", ".", "bird", "cat", "dog"])
    specs = ["tome:r=0", TOME_REAL]
    rows = harness.zero_shot_classification(model, tokenizer, animals, ["bird", "cat", "dog"], specs, transform=transform,
                                            templates=TEMPLATES, config=harness.HarnessConfig(batch_size=4, repeats=1, warmup=0))

    def encode_text(texts):
        ids = tokenizer(text=texts, padding=True, return_tensors="pt")
        return model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output

    images = torch.stack([transform(p) for p in pictures(animals)])
    hand = hand_zero_shot(lambda x: model.get_image_features(pixel_values=x).pooler_output, encode_text, images,
                          ["bird", "cat", "dog"])
    assert rows[0].predictions == hand
    check_side_by_side(rows, specs)


def test_zero_shot_needs_a_clip_style_model(classifier, animals):
    with pytest.raises(harness.HarnessError, match=r"needs an open_clip model \(.*\) or an HF CLIP / SigLIP model \(.*\); got a VisionTransformer"):
        harness.zero_shot_classification(classifier[0], toy_tokenizer, animals, ["b", "c", "d"], transform=resize_transform())


# ----- bad input ----------------------------------------------------------------------------------
def test_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(harness.HarnessError, match=r"folder .*nowhere does not exist; expected DIR/<class>/<image files>"):
        harness.scan_folder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(harness.HarnessError, match="file.png is not a folder"):
        harness.scan_folder(tmp_path / "file.png")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / ".hidden").mkdir()  # hidden folders are not classes
    with pytest.raises(harness.HarnessError, match="flat holds no class folders"):
        harness.scan_folder(tmp_path / "flat")
    write_folder(tmp_path / "some", ["a", "c"], per_class=1)
    (tmp_path / "some" / "b").mkdir()
    (tmp_path / "some" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(harness.HarnessError, match=r"class folder\(s\) of .*some with no image files .*\.jpeg.*: b; remove"):
        harness.scan_folder(tmp_path / "some")

    def unreadable(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", unreadable)
    with pytest.raises(harness.HarnessError, match=r"cannot read .*some: Permission denied"):
        harness.scan_folder(tmp_path / "some")


def test_a_nested_class_folder_and_any_suffix_case_count(tmp_path):
    write_folder(tmp_path / "d", ["a"], per_class=1)
    (tmp_path / "d" / "a" / "deeper").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a" / "deeper" / "x.JPEG", format="JPEG")
    scan = harness.scan_folder(tmp_path / "d")
    assert scan.classes == ("a",) and [p.name for p in scan.files[0]] == ["0.png", "x.JPEG"] and scan.images == 2


@pytest.mark.parametrize(("mapping", "message"), [
    (None, r"3 class folders but the model predicts 5 classes: .*all 5 classes need a folder; .*\(--class-index FILE\)"),
    ({"a": 0, "b": 1, "c": 2, "zz": 3}, "names folders that do not exist: zz"),
    ({"a": 0, "b": 1}, "gives no class for the folders c"),
    ({"a": 0, "b": 5, "c": -1}, r"out of range 0..4 \(the model predicts 5 classes\): b: 5, c: -1"),
    ({"a": 0, "b": "1", "c": True}, r"out of range 0..4 .*: b: '1', c: True"),
    ({"a": 0, "b": 2, "c": 2}, "gives folders b and c the same class 2"),
])
def test_class_index_errors(mapping, message):
    with pytest.raises(harness.HarnessError, match=message):
        harness.class_indices(["a", "b", "c"], 5, mapping)


def test_class_index_file_errors(tmp_path):
    assert harness.class_indices(["a", "b"], 3, {"b": 0, "a": 2}) == [2, 0]
    bad = tmp_path / "index.json"
    bad.write_text("{not json")
    with pytest.raises(harness.HarnessError, match="is not JSON .* folder name -> class index"):
        harness.read_class_index(bad)
    bad.write_text("[0, 1]")
    with pytest.raises(harness.HarnessError, match="must be a non-empty JSON object"):
        harness.read_class_index(bad)
    with pytest.raises(harness.HarnessError, match="cannot read the class index"):
        harness.read_class_index(tmp_path / "missing.json")


@pytest.mark.parametrize(("names", "message"), [
    (["x", "y"], r"2 class names for 3 class folders \(no name for the last folders c\); .* sorted folder order \(a, b, c\)"),
    (["x", "y", "z", "w"], r"4 class names for 3 class folders \(names beyond the last folder: w\)"),
    ({"a": "x", "b": "y", "d": "w"}, "no name for the folders c; names for folders that do not exist: d"),
    (["x", " ", "z"], "empty class names for the folders b"),
])
def test_class_name_errors(names, message):
    with pytest.raises(harness.HarnessError, match=message):
        harness.match_class_names(["a", "b", "c"], names)


def test_class_name_and_template_files(tmp_path):
    lines = tmp_path / "names.txt"
    lines.write_text("tench\n\ngoldfish \n")
    assert harness.match_class_names(["n1", "n2"], harness.read_class_names(lines)) == ["tench", "goldfish"]
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n2": "goldfish", "n1": "tench"}))
    assert harness.match_class_names(["n1", "n2"], harness.read_class_names(mapping)) == ["tench", "goldfish"]
    mapping.write_text("[1]")
    with pytest.raises(harness.HarnessError, match="must be a JSON object folder -> name"):
        harness.read_class_names(mapping)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na {} in {braces}\n")
    assert harness.read_templates(templates) == ("a photo of a {}.", "a {} in {braces}")
    templates.write_text("a photo.\n")
    with pytest.raises(harness.HarnessError, match=r"templates without \{\} where the class name goes: 'a photo.'"):
        harness.read_templates(templates)
    templates.write_text("\n")
    with pytest.raises(harness.HarnessError, match="templates file .* is empty"):
        harness.read_templates(templates)
    with pytest.raises(harness.HarnessError, match="no prompt templates"):
        harness.check_templates([])


def test_unusable_images_specs_and_models(classifier, tmp_path):
    model, transform = classifier
    folder = write_folder(tmp_path / "data", ["a", "b", "c"], per_class=1)
    (folder / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(harness.HarnessError, match=r"cannot read the image .*broken.png"):
        harness.folder_classification(model, folder, transform=transform, config=harness.HarnessConfig(repeats=0))
    with pytest.raises(harness.HarnessError, match="reducer 'holov:k=4': .*connector"):
        harness.folder_classification(model, folder, ["holov:k=4"], transform=transform)
    with pytest.raises(harness.HarnessError, match="cannot tell how many classes a Linear predicts .* num_classes="):
        harness.model_classes(torch.nn.Linear(2, 2))


def test_results_are_written_and_never_replaced_unasked(tmp_path):
    row = harness.HarnessRow("tome:r=8", images=4, correct=3, agreeing=2, visual_tokens=40.0, flops=1e9, reference_flops=2e9,
                             throughput=20.0, reference_throughput=10.0)
    csv_path, json_path = harness.write_results(tmp_path, [row], {"model": "timm:x", "versions": {"vtc": "1"}})
    (record,) = csv.DictReader(csv_path.open())
    assert record["model"] == "timm:x" and record["spec"] == "tome:r=8" and float(record["top1"]) == 0.75
    assert float(record["flops_ratio"]) == 0.5 and float(record["speedup"]) == 2.0 and float(record["agreement"]) == 0.5
    saved = json.loads(json_path.read_text())
    assert saved["versions"]["vtc"] == "1" and saved["versions"]["torch"] == torch.__version__
    with pytest.raises(harness.HarnessError, match=r"accuracy.csv, .*accuracy.json already exist; pass overwrite=True"):
        harness.write_results(tmp_path, [row], {"model": "timm:y"})
    assert json.loads(json_path.read_text())["model"] == "timm:x"
    harness.write_results(tmp_path, [row], {"model": "timm:y"}, overwrite=True)
    assert json.loads(json_path.read_text())["model"] == "timm:y"


# ----- vtc eval --folder ---------------------------------------------------------------------------
def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_vtc_eval_folder_end_to_end(tmp_path, capsys):
    """timm's test_vit (random weights, 1000 classes) on two class folders mapped by --class-index."""
    folder = write_folder(tmp_path / "data", ["cat", "dog"])
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"cat": 281, "dog": 207}))
    out = tmp_path / "out"
    argv = ["eval", "--model", "timm:test_vit", "--folder", str(folder), "--class-index", str(index), "--reducer", "tome:r=4",
            "--reducer", "tome:r=0", "--batch-size", "3", "--repeats", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "accuracy.csv").open()))
    assert [(r["model"], r["spec"], r["images"]) for r in rows] == [("timm:test_vit", s, "4") for s in ("none", "tome:r=4", "tome:r=0")]
    assert float(rows[1]["flops_ratio"]) < 1 and float(rows[2]["agreement"]) == 1.0 and rows[2]["top1"] == rows[0]["top1"]
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved["specs"] == ["tome:r=4", "tome:r=0"] and saved["model"] == "timm:test_vit" and saved["task"] == "classification"
    assert saved["class_index"] == {"cat": 281, "dog": 207} and saved["images"] == 4 and saved["classes"] == 2
    assert saved["versions"]["vtc"] == installed_version() and saved["versions"]["torch"] == torch.__version__
    assert "top-1 (95% interval)" in capsys.readouterr().out
    before = (out / "accuracy.json").read_text()
    assert main(argv[:-2] + ["--reducer", "tome:r=2", "--out", str(out)]) == 0  # not empty: a run-<timestamp> subfolder
    assert "is not empty: writing into" in capsys.readouterr().err and (out / "accuracy.json").read_text() == before
    (run,) = out.glob("run-*")
    assert json.loads((run / "accuracy.json").read_text())["specs"][-1] == "tome:r=2"
    assert main(argv[:-2] + ["--reducer", "tome:r=2", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "accuracy.json").read_text())["specs"][-1] == "tome:r=2"


def test_vtc_eval_zero_shot_end_to_end(tmp_path):
    """An open_clip model registered by config (random weights) with its own BPE tokenizer."""
    import open_clip

    config = fam.open_clip_config()
    config["text_cfg"].update(vocab_size=49408, context_length=16)
    (tmp_path / "vtc-harness-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "vtc-harness-clip.json")
    folder = write_folder(tmp_path / "animals", ["cat", "dog"], per_class=1)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    out = tmp_path / "out"
    assert main(["eval", "--model", "open_clip:vtc-harness-clip", "--folder", str(folder), "--class-names", str(names),
                 "--template", TEMPLATES[0], "--template", TEMPLATES[1], "--reducer", TOME_REAL, "--repeats", "1",
                 "--no-progress", "--out", str(out)]) == 0
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved["task"] == "zero-shot" and saved["templates"] == list(TEMPLATES) and saved["class_names"] == {"cat": "cat", "dog": "dog"}
    assert [row["spec"] for row in saved["rows"]] == ["none", TOME_REAL] and saved["rows"][1]["flops_ratio"] < 1


def test_vtc_eval_refuses_options_of_the_other_mode(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", ["a", "b"], per_class=1)
    err = _fails(["eval", "--folder", str(folder), "--model", "timm:test_vit", "--models", "shapes-vit", "--budgets", "64"], capsys)
    assert "--models, --budgets apply only to the shapes benchmark, not with --folder" in err
    err = _fails(["eval", "--model", "timm:test_vit", "--reducer", "tome:r=4"], capsys)
    assert "--model, --reducer apply only with --folder DIR" in err
    assert "--folder needs --model" in _fails(["eval", "--folder", str(folder)], capsys)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    err = _fails(["eval", "--folder", str(folder), "--model", "timm:test_vit", "--class-names", str(names)], capsys)
    assert "--class-names applies only to CLIP-style models (zero-shot); timm:test_vit is a classifier" in err


def test_vtc_eval_folder_errors_exit_2_before_writing(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", ["a", "b"], per_class=1)
    out = tmp_path / "out"
    err = _fails(["eval", "--folder", str(folder), "--model", "timm:test_vit", "--out", str(out)], capsys)
    assert "2 class folders but the model predicts 1000 classes" in err and "--class-index FILE" in err
    err = _fails(["eval", "--folder", str(tmp_path / "missing"), "--model", "timm:test_vit", "--out", str(out)], capsys)
    assert "missing does not exist" in err
    err = _fails(["eval", "--folder", str(folder), "--model", "timm:test_vit", "--reducer", "holov:k=4", "--out", str(out)], capsys)
    assert "reducer 'holov:k=4'" in err
    assert not out.exists()
