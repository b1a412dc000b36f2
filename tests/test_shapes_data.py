"""vtc.data.shapes: determinism, disjoint splits, answers that match the scene, clear errors."""

import hashlib

import numpy as np
import pytest

from vtc.data import shapes
from vtc.data.training import NO_DIGIT, patch_targets, pixels
from vtc.train.shapes_llava_model import word_tokenizer


def _digest(example):
    return hashlib.sha256(example.image.tobytes()).hexdigest()


def test_same_seed_same_data():
    for split in shapes.SPLITS:
        a, b = shapes.examples(split, 12), shapes.examples(split, 12)
        for x, y in zip(a, b):
            assert np.array_equal(x.image, y.image) and np.array_equal(x.objects, y.objects)
            assert (x.scene, x.question, x.answer) == (y.scene, y.question, y.answer)
    assert _digest(shapes.example("train", 3)) != _digest(shapes.example("train", 4))


def test_splits_are_disjoint():
    digests = {split: {_digest(e) for e in shapes.examples(split, 300)} for split in shapes.SPLITS}
    assert all(len(d) == 300 for d in digests.values())
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_question_types_cycle_and_answers_are_balanced():
    batch = shapes.examples("train", 1000)
    assert [e.qtype for e in batch[:5]] == list(shapes.QUESTION_TYPES)
    presence = [e.answer for e in batch if e.qtype == "presence"]
    assert 0.4 < presence.count("yes") / len(presence) < 0.6
    counts = [e.answer for e in batch if e.qtype == "count"]
    assert {c for c in counts} == {str(k) for k in range(shapes.MAX_COUNT + 1)}
    digits = [e.answer for e in batch if e.qtype == "digit"]
    assert len(set(digits)) == 10


def test_answers_follow_the_scene():
    for e in shapes.examples("val", 250):
        kinds = [s.kind for s in e.scene.shapes]
        colors = [s.color for s in e.scene.shapes]
        assert 2 <= len(kinds) <= 6
        if e.qtype == "color":
            kind = e.question.split()[-2]
            assert kinds.count(kind) == 1 and colors[kinds.index(kind)] == e.answer
        elif e.qtype == "count":
            assert colors.count(e.question.split()[2]) == int(e.answer)
        elif e.qtype == "presence":
            color, kind = e.question.split()[3:5]
            assert ((color, kind) in zip(colors, kinds)) == (e.answer == "yes")
        elif e.qtype == "position":
            cell = shapes.CELLS.index(e.question.removeprefix("what shape is at the ").removesuffix(" ?"))
            assert [s.kind for s in e.scene.shapes if s.cell == cell] == [e.answer]
        else:
            assert e.answer == str(e.scene.digit) == str(e.label)
        # every shape and the digit are visible; a shape's centre is in its cell and its pixels
        # reach at most 2 px past it (diamonds and triangles are wider than their radius)
        for number, shape in enumerate(e.scene.shapes, start=1):
            ys, xs = np.nonzero(e.objects == number)
            assert len(xs) > 0
            row, col = divmod(shape.cell, shapes.GRID)
            (x0, x1), (y0, y1) = shapes._EDGES[col:col + 2], shapes._EDGES[row:row + 2]
            assert x0 <= shape.center[0] < x1 and y0 <= shape.center[1] < y1
            assert x0 - 2 <= xs.min() and xs.max() < x1 + 2 and y0 - 2 <= ys.min() and ys.max() < y1 + 2
        assert (e.objects == len(e.scene.shapes) + 1).sum() > 0


def test_every_word_is_in_the_vocabulary():
    tokenizer = word_tokenizer(shapes.vocabulary())
    for e in shapes.examples("train", 200):
        ids = tokenizer(e.prompt.replace("<image>", "") + " " + e.answer)["input_ids"]
        assert tokenizer.unk_token_id not in ids


def test_classification_view_and_patch_targets():
    images, labels = shapes.classification("test", 20)
    assert images.shape == (20, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [e.scene.digit for e in shapes.examples("test", 20)]
    x = pixels(images)
    assert x.shape == (20, 3, 64, 64) and -1.0 <= x.min() and x.max() <= 1.0
    targets = patch_targets(shapes.examples("test", 20), 4)
    for row, e in zip(targets["digit"], shapes.examples("test", 20)):
        assert set(row.unique().tolist()) == {NO_DIGIT, e.scene.digit}
    assert (targets["kind"] > 0).any(dim=1).all() and (targets["color"] > 0).any(dim=1).all()


def test_subsets_of_question_types_are_subsets_of_the_split():
    digits = shapes.examples("test", 10, qtypes=["digit"])
    assert [e.index for e in digits] == list(range(4, 50, 5))


@pytest.mark.parametrize("call, message", [
    (lambda: shapes.examples("test", 5, qtypes=["colour"]), "unknown question type"),
    (lambda: shapes.examples("dev", 5), "unknown split 'dev'"),
    (lambda: shapes.example("test", shapes.SPLITS["test"][1]), "outside the test split"),
    (lambda: shapes.examples("val", shapes.SPLITS["val"][1] + 1), "asked for"),
    (lambda: shapes.ask(shapes.example("test", 0).scene, "size", np.random.default_rng(0)), "unknown question type"),
])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_evidence_names_the_objects_that_answer():
    for e in shapes.examples("val", 100):
        found = shapes.evidence(e.scene, e.qtype, e.question)
        picked = [e.scene.shapes[i - 1] for i in found if i <= len(e.scene.shapes)]
        if e.qtype == "color":
            assert [s.color for s in picked] == [e.answer]
        elif e.qtype == "count":
            assert len(found) == int(e.answer)
        elif e.qtype == "presence":
            assert bool(found) == (e.answer == "yes")
        elif e.qtype == "position":
            assert [s.kind for s in picked] == [e.answer]
        else:
            assert found == [len(e.scene.shapes) + 1]
