"""Short runs of the M3 and MQT trainers on the shipped shapes-llava: the multi-scale loss, MQT's
falling loss and prefix draws, resumption, the checkpoint they write."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import vtc
from vtc.models import zoo
from vtc.reducers.m3 import M3
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
