"""Trainers: resumable state, the step loop, options from dataclasses, output protection."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vtc.commands.options import add_options, from_options
from vtc.train.cli import train_main
from vtc.train.curve import plot_curve
from vtc.train.loop import JsonLog, LoopConfig, read_log, run_loop
from vtc.train.shapes_llava import ShapesLlavaRecipe, ShapesLlavaTrainer
from vtc.train.shapes_llava_model import ShapesLlavaShape
from vtc.train.state import StateMismatchError
from vtc.train.trainer import LOG, RunOptions

TINY = ShapesLlavaShape(vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=2,
                        text_heads=2, text_mlp=32)
RECIPE = ShapesLlavaRecipe(tower_steps=2, tower_batch=2, vlm_steps=3, vlm_batch=2, warmup=1, per_type=1)
OPTIONS = RunOptions(eval_every=2, eval_examples=5, save_every=100, val_examples=5, test_examples=5, threads=1)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    """Stop after every step (a time limit shorter than any step), resume each time, across the
    tower -> vlm stage boundary: the final weights and the log equal one uninterrupted run."""
    whole = ShapesLlavaTrainer(RECIPE, tmp_path / "whole", OPTIONS, TINY)
    assert whole.run(command="whole")
    stopped = replace(OPTIONS, max_minutes=1e-9)
    pieces = tmp_path / "pieces"
    assert not ShapesLlavaTrainer(RECIPE, pieces, stopped, TINY).run(command="pieces")
    resumed_steps = []
    for _ in range(RECIPE.steps):
        trainer = ShapesLlavaTrainer(RECIPE, pieces, stopped, TINY)
        if trainer.run(resume=True, command="pieces"):
            break
        resumed_steps.append(json.loads((pieces / "train-state" / "state.json").read_text())["step"])
    assert resumed_steps == list(range(2, RECIPE.steps))  # one step per piece, stage boundary included
    a, b = _weights(tmp_path / "whole"), _weights(pieces)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path / "whole" / LOG) == read_log(pieces / LOG)
    assert (pieces / "learning-curve.png").stat().st_size > 0


def test_a_run_started_from_another_runs_state_trains_the_tower_jointly(tmp_path):
    """``init`` starts from a saved state's weights; ``joint_tower_lr`` keeps the tower training
    in the vlm stage (frozen otherwise); ``image_offset`` moves the run onto other train images."""
    first = tmp_path / "first"
    assert ShapesLlavaTrainer(RECIPE, first, OPTIONS, TINY).run()
    start = load_file(str(first / "train-state" / "weights.safetensors"))
    tower = [k for k in start if ".vision_tower." in k]
    decoder = [k for k in start if ".language_model." in k]
    follow = replace(RECIPE, tower_steps=0, vlm_steps=2, init=str(first), image_offset=1000)
    frozen = ShapesLlavaTrainer(follow, tmp_path / "frozen", OPTIONS, TINY)
    frozen.start_fresh()  # what run() does first when it does not resume
    loaded = {f"model.{k}": v for k, v in frozen.model.state_dict().items()}
    assert all(torch.equal(loaded[k], start[k]) for k in tower + decoder)  # the weights it starts from
    assert frozen.run()
    joint = ShapesLlavaTrainer(replace(follow, joint_tower_lr=1e-3), tmp_path / "joint", OPTIONS, TINY)
    assert joint.run()
    after_frozen = load_file(str(tmp_path / "frozen" / "train-state" / "weights.safetensors"))
    after_joint = load_file(str(tmp_path / "joint" / "train-state" / "weights.safetensors"))
    assert all(torch.equal(after_frozen[k], start[k]) for k in tower)
    assert not all(torch.equal(after_joint[k], start[k]) for k in tower)
    assert not all(torch.equal(after_frozen[k], start[k]) for k in decoder)
    assert "dense" in read_log(tmp_path / "joint" / LOG)[0] and "dense" not in read_log(tmp_path / "frozen" / LOG)[0]
    record = json.loads((tmp_path / "joint" / "training.json").read_text())
    assert "initialised from" in record["data"]
    first_record = json.loads((first / "training.json").read_text())
    assert record["lineage"] == [{"command": first_record["command"], "minutes": first_record["minutes"]}]
    with pytest.raises(FileNotFoundError, match="holds no saved training state"):
        ShapesLlavaTrainer(replace(follow, init=str(tmp_path)), tmp_path / "x", OPTIONS, TINY).run()


def test_resume_refuses_another_architecture_or_recipe(tmp_path):
    out = tmp_path / "run"
    assert not ShapesLlavaTrainer(RECIPE, out, replace(OPTIONS, max_minutes=1e-9), TINY).run()
    before = {p.name: p.read_bytes() for p in (out / "train-state").iterdir()}
    wider = replace(TINY, text_width=32)
    with pytest.raises(StateMismatchError, match=r"architecture differs \(text_mlp|text_width: saved 16 vs now 32"):
        ShapesLlavaTrainer(RECIPE, out, OPTIONS, wider).run(resume=True)
    with pytest.raises(StateMismatchError, match=r"recipe differs \(vlm_lr: saved 0.0015 vs now 0.001\)"):
        ShapesLlavaTrainer(replace(RECIPE, vlm_lr=1e-3), out, OPTIONS, TINY).run(resume=True)
    assert {p.name: p.read_bytes() for p in (out / "train-state").iterdir()} == before


def test_script_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    def script(argv):
        train_main("scripts/train_shapes_llava.py", "", ShapesLlavaTrainer, ShapesLlavaRecipe, argv)

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(SystemExit):
        script(["--out", str(out), "--tower-steps", "1", "--vlm-steps", "1"])
    assert "already holds model.safetensors; pass --resume to continue that run or --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script(["--out", str(out), "--resume"])
    assert "--resume: no training state in" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_loop_stops_at_a_save_point_and_log_drops_unsaved_records(tmp_path):
    saved, ran = [], []

    def train_step(step):
        ran.append(step)
        return {"loss": float(step)}

    log = JsonLog(tmp_path / "log.jsonl")
    config = LoopConfig(steps=5, eval_every=2, save_every=2)
    assert run_loop(config, 0, train_step, saved.append, log, evaluate=lambda s: {"acc": s / 10})
    assert ran == [0, 1, 2, 3, 4] and saved == [2, 4, 5]
    # a run killed after its save at 2: resuming at 2 keeps steps 0, 1 and the validation at 2
    resumed = JsonLog(tmp_path / "log.jsonl", resume_step=2)
    assert [(r["step"], "val" in r) for r in read_log(resumed.path)] == [(0, False), (1, False), (2, True)]
    limited = LoopConfig(steps=5, save_every=100, max_minutes=1e-9)
    saved.clear()
    assert not run_loop(limited, 3, train_step, saved.append, resumed)
    assert saved == [4]  # stopped after one step, at a save it made
    assert plot_curve(tmp_path / "log.jsonl", tmp_path / "curve.png").stat().st_size > 0


def test_options_come_from_the_recipe_dataclass():
    parser = argparse.ArgumentParser()
    add_options(parser, ShapesLlavaRecipe)
    add_options(parser, RunOptions)
    args = parser.parse_args(["--vlm-steps", "7", "--vlm-lr", "0.01", "--max-minutes", "2.5"])
    assert from_options(ShapesLlavaRecipe, args) == replace(ShapesLlavaRecipe(), vlm_steps=7, vlm_lr=0.01)
    assert from_options(RunOptions, args).max_minutes == 2.5
    with pytest.raises(ValueError, match="max_minutes must be > 0"):
        LoopConfig(steps=1, max_minutes=0)


def test_conversation_masks_prompts_and_marks_answer_positions():
    from vtc.data import shapes
    from vtc.train.shapes_llava import conversation
    from vtc.train.shapes_llava_model import word_tokenizer

    tokenizer = word_tokenizer(shapes.vocabulary())
    example = shapes.example("train", 3)
    ids, labels, queries = conversation(example, tokenizer, 4, np.random.default_rng(0), per_type=1)
    assert len(ids) == len(labels) and ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 4
    first_position, word_position, _ = queries[0]
    assert tokenizer.convert_ids_to_tokens(ids[word_position]) == example.question.removesuffix(" ?").split()[-1]
    answer = tokenizer.convert_ids_to_tokens(ids[first_position + 1:first_position + 2])
    assert answer == [example.answer] and labels[first_position + 1] == ids[first_position + 1]
    assert all(label == -100 for label in labels[:first_position + 1])
    assert tokenizer.decode([t for t in labels if t != -100]).split()[0] == example.answer


def test_focus_type_adds_turns_of_that_type_only_and_is_checked():
    from vtc.data import shapes
    from vtc.train.shapes_llava import ShapesLlavaRecipe, conversation
    from vtc.train.shapes_llava_model import word_tokenizer

    tokenizer = word_tokenizer(shapes.vocabulary())
    example = next(e for e in shapes.examples("train", 20) if len(e.scene.shapes) >= 5)

    def position_turns(focus):
        ids, _, queries = conversation(example, tokenizer, 4, np.random.default_rng(0), 1, focus)
        return " ".join(tokenizer.convert_ids_to_tokens(ids)).count("what shape is at"), len(queries)

    plain, focused = position_turns(()), position_turns(("position",) * 3)
    assert plain == position_turns(())
    assert focused[0] >= plain[0] + 2 and focused[1] - plain[1] == focused[0] - plain[0]  # only position added
    with pytest.raises(ValueError, match="focus_type 'size' is not a question type"):
        ShapesLlavaRecipe(focus_type="size", focus_questions=2)
    with pytest.raises(ValueError, match="must be > 0 exactly when"):
        ShapesLlavaRecipe(focus_type="position")


def test_vit_trainer_resumes_bit_identically(tmp_path):
    from vtc.train.shapes_vit import MODEL_ARGS, ShapesVitRecipe, ShapesVitTrainer

    tiny = dict(MODEL_ARGS, embed_dim=16, depth=1, num_heads=2)
    recipe = ShapesVitRecipe(steps=3, batch=4, warmup=1)
    assert ShapesVitTrainer(recipe, tmp_path / "whole", OPTIONS, tiny).run()
    stopped = replace(OPTIONS, max_minutes=1e-9)
    assert not ShapesVitTrainer(recipe, tmp_path / "pieces", stopped, tiny).run()
    while not ShapesVitTrainer(recipe, tmp_path / "pieces", stopped, tiny).run(resume=True):
        pass
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "pieces")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "pieces" / "card.json").read_text())
    assert card["test_examples"] == OPTIONS.test_examples


def test_relay_loss_is_the_attention_onto_the_question_word_and_trains(tmp_path):
    from vtc.train.shapes_llava import relay_loss

    attention = torch.zeros(2, 2, 5, 5)
    attention[0, :, 4, 1] = torch.tensor([0.2, 0.6])  # mean over heads 0.4
    attention[1, :, 3, 2] = 1.0
    loss = relay_loss(attention, torch.tensor([0, 1]), torch.tensor([4, 3]), torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(-(np.log(0.4 + 1e-6) + np.log(1 + 1e-6)) / 2, rel=1e-5)
    recipe = replace(RECIPE, tower_steps=0, vlm_steps=2, relay_weight=1.0, relay_layer=1)
    assert ShapesLlavaTrainer(recipe, tmp_path / "relay", OPTIONS, TINY).run()
    assert all(record["relay"] > 0 for record in read_log(tmp_path / "relay" / LOG) if "relay" in record)
    assert sum("relay" in record for record in read_log(tmp_path / "relay" / LOG)) == 2
