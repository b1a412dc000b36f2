"""The shapes benchmark: budgets reached exactly, all tokens = the unreduced model, every reducer at
half the tokens at least as accurate as random pruning, clear errors, and `vtc demo` on it."""

import csv
import json

import llava_models
import pytest
import tolerance
import torch
from PIL import Image

import vtc
from vtc.cli import main
from vtc.data import shapes
from vtc.data.evaluate import Scores, classifier_scores, vlm_scores
from vtc.data.training import pixels
from vtc.measure_vlm import profile
from vtc.models import zoo
from vtc.shapes_benchmark import (
    BUDGETS,
    CONNECTOR_ONLY,
    DECODER,
    DYVTE_THRESHOLDS,
    MATRYOSHKA_BUDGETS,
    REDUCERS,
    SIGNIFICANCE,
    TRAINED,
    BenchmarkOptions,
    Row,
    budget_spec,
    decoder_specs,
    exit_costs,
    format_exits,
    geometric_counts,
    oracle,
    plan_specs,
    ranking,
    run,
    trained_checkpoint,
)
from vtc.stats import Spread, mcnemar_exact, wilson

HALF_BUDGET_EXAMPLES = 300
# Reducers below random pruning at 128 of 256 tokens, with what was measured on the first 300 test
# examples; the test checks that each stays below random (so this list is kept true). Every other
# reducer must not be worse than random by an exact paired test on the same examples.
BELOW_RANDOM = {  # numbers: the shapes benchmark at 128 tokens, 500 test examples (BENCHMARKS.md)
    ("shapes-llava", "holov"): "HoloV and EViT rank tokens by the tower's CLS attention, but this tower's CLS output is "
                               "never a training target (its dense targets are per patch and LLaVA drops CLS), so "
                               "what it attends to is not chosen to find the answer: 0.612 vs random 0.846",
    ("shapes-llava", "evit"): "the same untrained CLS attention, EViT dropping inside the tower: 0.628 vs random 0.846",
    ("shapes-vit", "pool"): "pool acts after block 0 and averages pairs of 4-px patches before attention has "
                            "read the 6x10-px digit: 0.374 vs random 0.698 (random drops after blocks 1, 3, 4)",
}


def _llava_inputs(ckpt, batch):
    return ckpt.processor(images=[Image.fromarray(e.image) for e in batch], text=[e.prompt for e in batch],
                          padding=True, return_tensors="pt")


def test_geometric_counts():
    assert geometric_counts(256, 16, 2) == [64, 16]
    assert geometric_counts(256, 256, 3) == [256, 256, 256]
    counts = geometric_counts(256, 16, 6)
    assert counts[-1] == 16 and all(a > b for a, b in zip([256, *counts], counts))
    assert all(b >= a / 2 for a, b in zip([256, *counts], counts))  # within ToMe's 50% cap per layer


BUDGETED = [r for r in REDUCERS if r not in DECODER]
TRAINING_FREE = [r for r in BUDGETED if r not in TRAINED]


@pytest.mark.parametrize("reducer", BUDGETED)
def test_every_budget_is_reached_exactly(reducer, shapes_vit, shapes_llava):
    """Every budget a reducer can reach gives exactly that many tokens (a trained method on its own
    checkpoint); the others are the ones :func:`plan_specs` skips with a reason."""
    batch = shapes.examples("test", 3)
    x = pixels([e.image for e in batch])
    llava = zoo.load(trained_checkpoint("shapes-llava", reducer)) if reducer in TRAINED else shapes_llava
    inputs = _llava_inputs(llava, batch)
    reachable, skipped = plan_specs([reducer], BUDGETS, "llava", 6)
    expected_skips = {"tome": [1], "evit": [1], "m3": [128, 32]}.get(reducer, [])
    assert [budget for _, budget, _ in reachable] == [b for b in BUDGETS if b not in expected_skips]
    assert len(skipped) == len(expected_skips)
    for _, budget, spec in reachable:
        if reducer not in CONNECTOR_ONLY:
            with vtc.apply(shapes_vit.model, budget_spec(reducer, budget, "timm")) as handle, torch.inference_mode():
                shapes_vit.model(x)
                assert handle.state.num_tokens - handle.state.n_prefix == budget
        with vtc.apply(llava.model, spec) as handle, torch.inference_mode():
            llava.model(**inputs)
            assert handle.visual_tokens == [budget] * 3


def _vit_terms(model) -> int:
    """Accumulated products from pixels to logits of a timm ViT (tests/tolerance.py)."""
    patch = model.patch_embed.patch_size[0]
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    blocks = tolerance.transformer_terms(len(model.blocks), model.embed_dim, tokens, model.blocks[0].mlp.fc1.out_features)
    return 3 * patch * patch + blocks + model.embed_dim


@pytest.mark.parametrize("reducer", [*TRAINING_FREE, "m3"])
def test_a_budget_of_all_tokens_is_the_unreduced_model(reducer, shapes_vit, shapes_llava):
    batch = shapes.examples("test", 6)
    x = pixels([e.image for e in batch])
    if reducer not in CONNECTOR_ONLY:
        with torch.inference_mode():
            reference = shapes_vit.model(x)
            with vtc.apply(shapes_vit.model, budget_spec(reducer, 256, "timm")):
                reduced = shapes_vit.model(x)
        tolerance.assert_close(reduced, reference, terms=_vit_terms(shapes_vit.model))
        assert torch.equal(reduced.argmax(-1), reference.argmax(-1))
    llava = zoo.load(trained_checkpoint("shapes-llava", reducer)) if reducer in TRAINED else shapes_llava  # M3: its own
    inputs = _llava_inputs(llava, batch)
    settings = dict(max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        reference = llava.model.generate(**inputs, **settings)
        with vtc.apply(llava.model, budget_spec(reducer, 256, "llava")):
            reduced = llava.model.generate(**inputs, **settings)
    assert torch.equal(reduced.sequences, reference.sequences)
    tolerance.assert_close(reduced.scores[0], reference.scores[0],
                           terms=llava_models.llava_terms(llava.model, inputs["input_ids"].shape[1]))


@pytest.fixture(scope="module")
def half_budget_accuracy(shapes_vit, shapes_llava):
    """Scores of every reducer at 128 of 256 visual tokens on the first test examples."""
    batch = shapes.examples("test", HALF_BUDGET_EXAMPLES)
    out = {}
    for reducer in TRAINING_FREE:
        if reducer not in CONNECTOR_ONLY:
            with vtc.apply(shapes_vit.model, budget_spec(reducer, 128, "timm")):
                out["shapes-vit", reducer] = classifier_scores(shapes_vit.model, batch)
        with vtc.apply(shapes_llava.model, budget_spec(reducer, 128, "llava")):
            out["shapes-llava", reducer] = vlm_scores(shapes_llava.model, shapes_llava.processor, batch, batch_size=100)
    return out


@pytest.mark.parametrize("model", ["shapes-vit", "shapes-llava"])
@pytest.mark.parametrize("reducer", [r for r in TRAINING_FREE if r != "random"])
def test_half_the_tokens_keeps_at_least_random_pruning_accuracy(model, reducer, half_budget_accuracy):
    if model == "shapes-vit" and reducer in CONNECTOR_ONLY:
        pytest.skip(f"{reducer} acts at a VLM's connector; the classifier has none")
    scores, random = half_budget_accuracy[model, reducer], half_budget_accuracy[model, "random"]
    summary = {key: round(s.accuracy, 3) for key, s in half_budget_accuracy.items()}
    if (model, reducer) in BELOW_RANDOM:
        assert scores.accuracy < random.accuracy, f"no longer an exception, update BELOW_RANDOM: {summary}"
    else:
        worse = scores.accuracy < random.accuracy and mcnemar_exact(scores.correct, random.correct) < SIGNIFICANCE
        assert not worse, f"{model} {reducer} is significantly below random pruning: {summary}"


@pytest.mark.parametrize("call, message", [
    (lambda: budget_spec("tome", 300, "timm"), "budget 300 is not between 1 and the 256 visual tokens"),
    (lambda: budget_spec("tome", 0, "llava"), "budget 0"),
    (lambda: budget_spec("fastv", 64, "llava"), "unknown reducer 'fastv'"),
    (lambda: budget_spec("holov", 64, "timm"), "holov acts at a VLM's connector; a timm classifier has none"),
    (lambda: run(BenchmarkOptions(budgets=(512,), models=("shapes-vit",))), r"budget\(s\) \[512\] outside 1..256"),
    (lambda: run(BenchmarkOptions(models=("shapes-vitt",))), "unknown checkpoint name 'shapes-vitt'"),
])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_quick_demo_runs_the_shapes_benchmark(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--examples", "10", "--out", str(out), "--no-progress"]) == 0
    with (out / "shapes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for model in ("shapes-vit", "shapes-llava"):
        group = [r for r in rows if r["model"] == model]
        dymu = [("dymu", "85")] + ([("dymu-novtu", "85")] if model == "shapes-llava" else [])  # the mid preset
        kind = "llava" if model == "shapes-llava" else "timm"
        reducers = [r for r in REDUCERS if kind == "llava" or r not in CONNECTOR_ONLY]
        specs, _ = plan_specs(reducers, MATRYOSHKA_BUDGETS, kind, 6)
        configs = [(reducer, str(budget)) for reducer, budget, _ in specs]
        trained = [config for config in configs if config[0] in TRAINED]  # run after the base's rows
        inside = [("exit", "-1")] * 5 + [("dyvte", "-1")] * len(DYVTE_THRESHOLDS) if kind == "llava" else []
        assert [(r["reducer"], r["budget"]) for r in group] == [("none", "256")] + [
            config for config in configs if config not in trained] + inside + dymu + trained
        assert {r["checkpoint"] for r in group if r["reducer"] in TRAINED} == {"shapes-llava-m3", "shapes-llava-mqt"} or kind == "timm"
        for row in group:
            if row["reducer"].startswith("dymu"):  # per-image counts around the calibration's target
                assert float(row["visual_tokens_std"]) > 0 and float(row["flops_ratio"]) < 1.0
                continue
            if row["reducer"] in DECODER:  # every visual token enters; the LLM drops them after a layer
                assert float(row["visual_tokens"]) == 256 and 0 <= float(row["exit_layer"]) <= 5
                assert float(row["flops_ratio"]) < 1.0 and float(row["kv_cache_ratio"]) < 1.0 or float(row["exit_layer"]) == 5
                continue
            assert row["exit_layer"] == row["kv_cache_ratio"] == ""
            assert float(row["visual_tokens"]) == int(row["budget"])
            assert 0 <= float(row["accuracy"]) <= 1 and float(row["gflops_per_image"]) > 0
            hits = round(float(row["accuracy"]) * int(row["examples"]))
            assert (float(row["accuracy_low"]), float(row["accuracy_high"])) == pytest.approx(
                wilson(hits, int(row["examples"])), abs=1e-4)
            assert float(row["speedup_q1"]) <= float(row["speedup"]) <= float(row["speedup_q3"])
            if row["reducer"] in TRAINED:  # another checkpoint: agreement and FLOPs against the base differ
                continue
            if row["budget"] == "256":  # connector reducers still compute their signal (HoloV: one CLS row)
                tolerance = 0.01 if row["reducer"] in CONNECTOR_ONLY else 1e-6
                assert float(row["agreement"]) == 1.0 and float(row["flops_ratio"]) == pytest.approx(1.0, abs=tolerance)
            else:
                assert float(row["flops_ratio"]) < 1.0
    for name in ("pareto.png", "per_type.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG"
    assert len(json.loads((out / "shapes.json").read_text())["rows"]) == len(rows)


def _row(reducer: str, correct: list[bool], qtypes: list[str]) -> Row:
    truth = ["a"] * len(correct)
    scores = Scores(qtypes, truth, ["a" if c else "b" for c in correct])
    return Row("m", reducer, 64, reducer, 64, 0.0, scores, 1.0, 1.0, 0.5, 1.0, Spread(1.0, 1.0, 1.0))


def test_ranking_claims_an_order_only_where_the_paired_test_separates():
    qtypes = ["x", "y"] * 20
    strong = _row("strong", [True] * 40, qtypes)
    weak = _row("weak", [True] * 24 + [False] * 16, qtypes)  # 16 discordant pairs, all one way
    twin = _row("twin", [True] * 23 + [False] + [True] + [False] * 15, qtypes)  # 2 discordant with weak
    text = ranking([weak, twin, strong], "m", 64)
    assert text == "strong 1.000 > weak 0.600 ~ twin 0.600"
    assert ranking([weak, strong], "m", 64, "x") == "strong 1.000 > weak 0.600"
    assert ranking([strong], "m", 32) == ""


def test_oracle_takes_the_cheapest_budget_answering_each_example():
    qtypes = ["x"] * 4
    rows = [Row("m", "m3", budget, f"m3:tokens={budget}", budget, 0.0,
                Scores(qtypes, ["a"] * 4, ["a" if c else "b" for c in correct]), 1.0, 1.0, 1.0, 1.0, Spread(1.0, 1.0, 1.0))
            for budget, correct in ((256, [True, True, False, False]), (16, [True, False, True, False]),
                                    (1, [False, False, True, False]))]
    found = oracle(rows, "m", "m3")
    assert found.budgets == (1, 16, 256) and found.chosen == (16, 256, 1, None)
    assert found.accuracy == 0.75
    assert found.mean_tokens == (16 + 256 + 1 + 256) / 4  # an example no budget answers counts at the largest
    assert oracle(rows, "m", "mqt") is None


def test_decoder_rows_count_each_example_alone(shapes_llava):
    """The exits' analytic prefill per example equals the profiler's analytic count of that example
    run alone, and the KV ratio the cache the prefill leaves."""
    specs, skipped = decoder_specs(shapes_llava, ["exit", "pool"])
    assert [spec for _, _, spec in specs] == [f"exit:layer={k}" for k in range(5)] and not skipped
    example = shapes.examples("test", 1)
    inputs = _llava_inputs(shapes_llava, example)
    model = shapes_llava.model
    with vtc.apply(model, "exit:layer=2") as handle, torch.inference_mode():
        report = profile(model, inputs, new_tokens=1, timed=False)
        out = model.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True)
        kept = handle.adapter.decoder.kept_per_row
    with vtc.apply(model) as handle, torch.inference_mode():
        full_report = profile(model, inputs, new_tokens=1, timed=False)
    prefill, unreduced, kv = exit_costs(model, kept)
    assert prefill == report.prefill.predicted_flops and unreduced == full_report.prefill.predicted_flops
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert kv == sum(lengths) / (lengths[0] * len(lengths)) and lengths[3] < lengths[2]
    assert report.prefill.flops == pytest.approx(report.prefill.predicted_flops, rel=0.02)  # counted vs analytic


def test_format_exits_compares_dyvte_with_the_full_model_and_the_fixed_exits_around_it():
    qtypes = ["x", "y"] * 20
    full = _row("none", [True] * 40, qtypes)
    fixed = [_row("exit", [k >= 4] * 40, qtypes) for k in range(5)]
    for k, row in enumerate(fixed):
        row.spec, row.exit_layer, row.kv_ratio = f"exit:layer={k}", float(k), 0.2 * (k + 1)
    learned = _row("dyvte", [True] * 38 + [False] * 2, qtypes)
    learned.spec, learned.exit_layer, learned.kv_ratio = "dyvte:routers=m", 3.5, 0.7
    text = format_exits([full, *fixed, learned])
    assert "exit:layer=3" in text and "3.50" in text
    assert "vs none 1.000: p = 0.5; vs exit:layer=3 0.000: p = " in text and "vs exit:layer=4 1.000: p = 0.5" in text
    assert format_exits([full]) == ""
