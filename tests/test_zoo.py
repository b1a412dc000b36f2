"""The shipped shapes checkpoints: public loading paths, stated accuracy, clear errors."""

import json

import pytest
import timm
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

import vtc
from vtc.data import shapes
from vtc.data.evaluate import classifier_scores, exit_scores, vlm_scores
from vtc.models import zoo


def test_checkpoints_load_through_the_libraries_own_paths(shapes_vit, shapes_llava):
    folder = zoo.CHECKPOINTS / "shapes-vit"
    direct = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(direct(x), shapes_vit.model(x))
    assert json.loads((folder / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    folder = zoo.CHECKPOINTS / "shapes-llava"
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = LlavaProcessor.from_pretrained(folder)
    inputs = processor(images=[Image.fromarray(shapes.example("test", 0).image)], text=[shapes.example("test", 0).prompt],
                       return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in shapes_llava.model.parameters())


def test_shipped_files_are_safetensors_and_json_within_40_mb():
    """Tensors in safetensors, everything else JSON (and the processor's chat template, a Jinja text file): no pickle.
    Four checkpoints of about 8 MB (the LLaVAs) and 3 MB (the ViT) fit in 40 MB."""
    files = [p for p in zoo.CHECKPOINTS.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".jinja"}
    assert {p.name for p in files if p.suffix == ".jinja"} == {"chat_template.jinja"}
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20


def _same_as_card(scores, card) -> None:
    """A fresh evaluation reproduces the card on its subset, example by example."""
    differing = [i for i, (a, b) in enumerate(zip(scores.predicted, card["subset_predictions"])) if a != b]
    assert not differing, f"test examples {differing[:10]} are answered differently than the card records"
    assert len(scores.predicted) == len(card["subset_predictions"]) == card["subset_examples"]
    assert round(scores.accuracy, 4) == card["subset_accuracy"]


def test_classifier_reaches_its_stated_accuracy(shapes_vit):
    _same_as_card(classifier_scores(shapes_vit.model, shapes.examples("test", zoo.SUBSET)), shapes_vit.card)


def test_vlm_reaches_its_stated_accuracy(shapes_llava):
    scores = vlm_scores(shapes_llava.model, shapes_llava.processor, shapes.examples("test", zoo.SUBSET), batch_size=100)
    _same_as_card(scores, shapes_llava.card)


def test_cards_and_training_records_are_complete(shapes_vit, shapes_llava):
    for ckpt in (shapes_vit, shapes_llava):
        assert ckpt.card["test_examples"] == shapes.SPLITS["test"][1]
        assert set(ckpt.card["test_by_type"]) <= set(shapes.QUESTION_TYPES)
        assert ckpt.training["command"].startswith("python scripts/train_shapes_")
        assert ckpt.training["minutes"] > 0 and ckpt.training["threads"] == 2
        for earlier in ckpt.training.get("lineage", []):  # runs it continues (--init), oldest first
            assert earlier["command"].startswith("python scripts/train_shapes_") and earlier["minutes"] > 0


def test_unknown_name_missing_checkpoint_and_bad_folder_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown checkpoint name 'shapes-vitt'; known names: shapes-llava, shapes-llava-m3, shapes-llava-mqt, shapes-vit"):
        zoo.load("shapes-vitt")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="neither a timm checkpoint"):
        zoo.load(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        zoo.load(tmp_path / "nothing-here")
    monkeypatch.setattr(zoo, "CHECKPOINTS", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="train it with: python scripts/train_shapes_llava.py"):
        zoo.load("shapes-llava")


def test_a_folder_path_loads_like_a_name(shapes_vit):
    by_path = zoo.load(zoo.CHECKPOINTS / "shapes-vit")
    assert by_path.kind == "timm" and by_path.card == shapes_vit.card


@pytest.mark.parametrize("name", ["shapes-llava-m3", "shapes-llava-mqt"])
def test_a_trained_methods_checkpoint_reaches_its_card_with_its_reducer(name):
    """The card of a checkpoint trained for a connector method names the reducer it was measured
    with; applied, a fresh evaluation reproduces the card's subset example by example."""
    ckpt = zoo.load(name)
    assert ckpt.card["spec"] == ckpt.card["budgets"]["256"]["spec"]
    assert set(ckpt.card["budgets"]) == {"256", "64", "16", "4", "1"}
    assert ckpt.training["base"] == "shapes-llava" and ckpt.training["minutes"] > 0
    with vtc.apply(ckpt.model, ckpt.card["spec"]):
        scores = vlm_scores(ckpt.model, ckpt.processor, shapes.examples("test", zoo.SUBSET), batch_size=100)
    _same_as_card(scores, ckpt.card)


def test_shipped_dyvte_routers_reach_their_card(shapes_llava):
    """The routers shipped in shapes-llava's dyvte/ are found by the checkpoint's name, record the
    model they belong to, and reproduce their card's subset example by example."""
    folder = zoo.CHECKPOINTS / "shapes-llava" / "dyvte"
    card = json.loads((folder / "card.json").read_text())
    training = json.loads((folder / "training.json").read_text())
    assert card["spec"] == "dyvte:routers=shapes-llava" and card["model"] == training["base"] == "shapes-llava"
    assert json.loads((folder / "dyvte.json").read_text())["model"] == "shapes-llava"
    assert sum(card["exit_layers"].values()) == card["test_examples"] and training["minutes"] > 0
    with vtc.apply(shapes_llava.model, card["spec"]):
        result = exit_scores(shapes_llava.model, shapes_llava.processor, shapes.examples("test", zoo.SUBSET), batch_size=100)
    _same_as_card(result.scores, card)
