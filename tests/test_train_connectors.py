"""Short runs of the M3, MQT and DyVTE trainers on the shipped shapes-llava: the multi-scale loss,
MQT's falling loss and prefix draws, DyVTE's features and labels, resumption, what they write."""

from __future__ import annotations

import json
from dataclasses import replace

import llava_models
import pytest
import tolerance
import torch
from PIL import Image
from safetensors.torch import load_file

import vtc
from vtc.data import shapes
from vtc.models import zoo
from vtc.reducers.dyvte import DyVTE, RouterConfig, Routers
from vtc.reducers.m3 import M3
from vtc.train.dyvte import DyVTERecipe, DyVTETrainer
from vtc.train.loop import read_log
from vtc.train.m3 import M3Recipe, M3Trainer, parse_scales
from vtc.train.mqt import MQTRecipe, MQTTrainer
from vtc.train.trainer import LOG, RunOptions

QUICK = RunOptions(eval_every=1000, eval_examples=4, save_every=2, val_examples=4, test_examples=4, threads=1)


def test_m3_gradient_is_the_average_of_the_scales_gradients(tmp_path):
    """One backward per scale (scaled by 1/M) accumulates the gradient of the averaged loss."""
    trainer = M3Trainer(M3Recipe(steps=1, batch=2, scales="64,4,1"), tmp_path / "run", QUICK)
    assert trainer.scales == [64, 4, 1]
    inputs, pixel_values = trainer.batch(0)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    losses = [trainer.answer_loss(M3(tokens=s), inputs, pixel_values) for s in trainer.scales]
    averaged = torch.autograd.grad(sum(losses) / len(losses), params)
    trainer.model.zero_grad()
    for s in trainer.scales:
        (trainer.answer_loss(M3(tokens=s), inputs, pixel_values) / len(trainer.scales)).backward()
    for p, expected in zip(params, averaged):
        scale = float(expected.abs().max()) or 1.0
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=64 * torch.finfo(torch.float32).eps * scale)
    assert not any(p.requires_grad for p in trainer.tower.parameters())  # the tower is frozen


def test_m3_scales_are_checked():
    assert parse_scales("", (16, 16)) == [256, 64, 16, 4, 1]
    assert parse_scales("1, 64", (16, 16)) == [64, 1]
    with pytest.raises(ValueError, match="not a nested scale of the 16x16 grid"):
        parse_scales("32", (16, 16))
    with pytest.raises(ValueError, match="comma-separated"):
        parse_scales("64;16", (16, 16))


def test_m3_run_writes_a_checkpoint_with_every_scale_on_its_card(tmp_path):
    out = tmp_path / "m3"
    assert M3Trainer(M3Recipe(steps=2, batch=2, scales="256,16"), out, QUICK).run()
    card = json.loads((out / "card.json").read_text())
    assert set(card["budgets"]) == {"256", "16"} and card["spec"] == card["budgets"]["256"]["spec"] == "m3:tokens=256"
    record = json.loads((out / "training.json").read_text())
    assert record["base"] == "shapes-llava" and record["method"]["scales"] == [256, 16]
    loaded = zoo.load(out)
    with vtc.apply(loaded.model, "m3:tokens=16"):
        pass


def test_mqt_alignment_loss_falls_and_the_prefix_is_drawn_in_stage_two(tmp_path):
    out = tmp_path / "mqt"
    recipe = MQTRecipe(stage1_steps=10, stage1_lr=5e-3, stage2_steps=4, batch=4, warmup=1)
    assert MQTTrainer(recipe, out, QUICK).run()
    log = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    first, last = steps[:3], steps[7:10]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)  # stage 1 aligns the transformer
    assert [r["tokens"] for r in steps[:10]] == [256] * 10
    assert all(r["tokens"] % 2 == 0 and 2 <= r["tokens"] <= 256 for r in steps[10:])
    # the checkpoint: the LLaVA folder with its query transformer in mqt/, found by the reducer
    loaded = zoo.load(out)
    with vtc.apply(loaded.model, "mqt:tokens=16") as handle:
        inputs = loaded.processor(images=[torch.zeros(3, 64, 64)], text=["USER: <image>\nhow many red shapes ? ASSISTANT:"],
                                  return_tensors="pt")
        with torch.no_grad():
            loaded.model(**inputs)
        assert handle.visual_tokens == [16]


def test_mqt_resumes_bit_identically(tmp_path):
    recipe = MQTRecipe(stage1_steps=2, stage2_steps=2, batch=2, warmup=1)
    whole, split = tmp_path / "whole", tmp_path / "split"
    MQTTrainer(recipe, whole, QUICK).run()
    stopped = replace(QUICK, max_minutes=1e-9)  # stops (and saves) after every step
    assert not MQTTrainer(recipe, split, stopped).run()
    resumed = []
    while not MQTTrainer(recipe, split, stopped).run(resume=True):  # across the stage boundary, one step at a time
        resumed.append(json.loads((split / "train-state" / "state.json").read_text())["step"])
    assert resumed == [2, 3]
    assert read_log(whole / LOG) == read_log(split / LOG)
    weights = [load_file(str(folder / "mqt" / "query-transformer.safetensors")) for folder in (whole, split)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_two_processes_under_accelerate_launch_share_each_batch(tmp_path):
    """``accelerate launch --num_processes 2 --cpu``: each process takes half of every batch, the
    gradients are averaged, one process writes the log and the checkpoint."""
    pytest.importorskip("accelerate")
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "mqt"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
               str(root / "scripts" / "train_mqt.py"), "--out", str(out), "--stage1-steps", "2", "--stage2-steps", "1",
               "--batch", "4", "--warmup", "1", "--eval-every", "1000", "--eval-examples", "4", "--val-examples", "4",
               "--test-examples", "4", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in read_log(out / LOG) if "loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]  # one log, written by one process
    record = json.loads((out / "training.json").read_text())
    assert record["minutes"] > 0 and (out / "mqt" / "query-transformer.safetensors").is_file()
    assert (out / "card.json").is_file()


class _Recording(Routers):
    """Routers that never exit and keep the features each layer's router saw."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.seen: dict[int, torch.Tensor] = {}

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        self.seen[layer] = features.detach().clone()
        return torch.stack([torch.ones(len(features)), torch.zeros(len(features))], dim=1)


def test_dyvte_trains_on_the_features_the_routers_see_at_inference(tmp_path):
    """The features of a right-padded teacher-forced batch (answers masked) equal those a router
    reads in a left-padded prefill of the prompts alone; labels follow the exit rule per layer."""
    trainer = DyVTETrainer(DyVTERecipe(steps=1, batch=3), tmp_path / "run", QUICK)
    inputs, pixel_values = trainer.batch(0)
    features, exits, decidable = trainer.exit_targets(inputs, pixel_values)
    layers = trainer.model.config.text_config.num_hidden_layers
    assert features.shape == (layers - 1, 3, 2 * trainer.model.config.text_config.hidden_size)
    assert exits.dtype == torch.bool and bool(decidable.all())
    recording = _Recording(trainer.routers.config)
    examples = [shapes.example("train", trainer.recipe.image_offset + i) for i in range(3)]
    processor = trainer.processor
    processor.tokenizer.padding_side = "left"
    prompts = processor(images=[Image.fromarray(e.image) for e in examples], text=[e.prompt for e in examples],
                        padding=True, return_tensors="pt")
    with vtc.apply(trainer.model, DyVTE(module=recording)), torch.no_grad():
        trainer.model(**prompts)
    terms = llava_models.llava_terms(trainer.model, prompts["input_ids"].shape[1])
    for k in range(layers - 1):
        tolerance.assert_close(recording.seen[k], features[k], terms=terms)
    assert not any(p.requires_grad for p in trainer.model.parameters())  # the LLaVA stays frozen


def test_dyvte_run_learns_resumes_and_writes_routers_for_its_model(tmp_path):
    recipe = DyVTERecipe(steps=4, batch=4, warmup=1, lr=3e-3)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert DyVTETrainer(recipe, whole, QUICK).run()
    stopped = replace(QUICK, max_minutes=1e-9)
    assert not DyVTETrainer(recipe, split, stopped).run()
    while not DyVTETrainer(recipe, split, stopped).run(resume=True):
        pass
    assert read_log(whole / LOG) == read_log(split / LOG)
    steps = [r for r in read_log(whole / LOG) if "loss" in r]
    assert all(0 <= r["exit_rate"] <= 1 and 0 <= r["router_accuracy"] <= 1 for r in steps)
    weights = [load_file(str(folder / "routers.safetensors")) for folder in (whole, split)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    config = json.loads((whole / "dyvte.json").read_text())
    assert config["model"] == "shapes-llava" and config["width"] == 256
    card = json.loads((whole / "card.json").read_text())
    assert card["spec"] == "dyvte:routers=shapes-llava" and sum(card["exit_layers"].values()) == card["test_examples"]
    assert json.loads((whole / "training.json").read_text())["base"] == "shapes-llava"
    base = zoo.load("shapes-llava")
    with vtc.apply(base.model, f"dyvte:routers={whole}") as handle, torch.no_grad():
        base.model(**base.processor(images=[Image.fromarray(shapes.example("test", 0).image)],
                                    text=[shapes.example("test", 0).prompt], return_tensors="pt"))
        assert len(handle.exit_layers) == 1
    with pytest.raises(ValueError, match="trained for 'shapes-llava', not for this model"):
        vtc.apply(zoo.load("shapes-llava-m3").model, f"dyvte:routers={whole}")


def test_dyvte_router_loss_falls_on_fixed_labels(tmp_path):
    """The routers fit the labels of a fixed batch (the training signal is learnable)."""
    trainer = DyVTETrainer(DyVTERecipe(steps=1, batch=8), tmp_path / "run", QUICK)
    features, exits, _ = trainer.exit_targets(*trainer.batch(0))
    optimizer = torch.optim.AdamW(trainer.routers.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = torch.stack([trainer.routers(k, features[k]) for k in range(len(features))])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), exits.flatten().long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
