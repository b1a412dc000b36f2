"""vtc.tune: knob and target parsing, the Pareto front, the coarse + refine search on a
non-monotone metric, resuming from the results file, refusing another setup's file, and real runs
on a tiny timm ViT, a tiny LLaVA and the shipped shapes-vit."""

from __future__ import annotations

import csv
import struct
import sys
from pathlib import Path

import layers
import llava_models
import pytest
import torch

import vtc
from vtc.stats import wilson
from vtc.tune import (
    ClassifierEvaluator,
    Knob,
    Point,
    Target,
    TuneError,
    TuneOptions,
    TuneResult,
    VLMEvaluator,
    pareto,
    parse_knob,
    parse_target,
    plot_pareto,
    run,
    search,
    smallest_budget,
    sweep,
)
from vtc.tune.plan import coarse_indices, refine_indices
from vtc.tune.results import COLUMNS


def test_tune_sits_below_the_commands_only():
    """tune imports no command module, and only the commands (vtc.cli, vtc.demo, vtc.commands) import it."""
    found = layers.modules(Path(__file__).resolve().parents[1])
    graph = {name: layers.imports(name, path, found) for name, path in found.items()}
    tune = {name for name in found if name.split(".")[:2] == ["vtc", "tune"]}
    commands = ("vtc.cli", "vtc.demo", "vtc.commands")
    assert "vtc.tune.search" in tune and not [t for name in tune for t in graph[name] if t.startswith(commands)]
    assert not [name for name, targets in graph.items() if name not in tune and targets & tune and not name.startswith(commands)]


# ----- knobs and targets ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, template, values", [
    ("tome:r=0..16:4", "tome:r={}", (0, 4, 8, 12, 16)),
    ("tome:r=3..0", "tome:r={}", (0, 1, 2, 3)),
    ("evit:keep=0.7,0.3,0.5", "evit:keep={}", (0.3, 0.5, 0.7)),
    ("evit:keep=0.3..0.6:0.1", "evit:keep={}", (0.3, 0.4, 0.5, 0.6)),
    ("dymu:preset=low,mid,high", "dymu:preset={}", ("low", "mid", "high")),
    ("holov:k=16..48:16,crops=4", "holov:k={},crops=4", (16, 32, 48)),
    ("evit:layers=1;2,keep=0.5,0.9", "evit:layers=1;2,keep={}", (0.5, 0.9)),
])
def test_parse_knob_forms(text, template, values):
    knob = parse_knob(text)
    assert (knob.template, knob.values) == (template, values)
    assert knob.specs == [template.format(v) for v in values]
    assert parse_knob(str(knob)) == knob  # the text form reads back
    for spec in knob.specs:
        vtc.parse_reducer(spec)


@pytest.mark.parametrize("text, wrong", [
    ("tome", "bad knob 'tome': it needs a reducer name, a colon and its options"),
    ("tome:r={}", "braces are not part of the text form"),
    ("tome:r=8", "no option takes several values"),
    ("tome:r=0..8,prop_attn=true,false", "2 options take several values"),
    ("tome:r=0..15:2", "in '0..15:2', 15 is not 0 plus a whole number of steps of 2"),
    ("tome:r=0..8:0", "the step of '0..8:0' must be positive"),
    ("tome:r=a..b", "the range 'a..b' takes numbers, A..B or A..B:STEP"),
    ("tome:,r=1,2", "'' is not option=value"),
    ("evit:keep=0.5,1.5", "value 1.5 gives 'evit:keep=1.5', which is not a valid reducer spec: evit: keep rate must be in (0, 1]"),
    ("tome:depth=1,2", "value 1 gives 'tome:depth=1', which is not a valid reducer spec"),
    ("evit:keep=0.5,0.5", "gives the same spec twice: evit:keep=0.5"),
])
def test_parse_knob_errors_say_what_and_which_forms(text, wrong):
    with pytest.raises(ValueError) as error:
        parse_knob(text)
    assert wrong in str(error.value)
    if "reducer spec" not in wrong and "twice" not in wrong:
        assert "'tome:r=0..16:2', 'evit:keep=0.3,0.5,0.7', 'dymu:preset=low,mid,high'" in str(error.value)


def test_knob_checks_its_template_and_values():
    with pytest.raises(ValueError, match="exactly one {} placeholder"):
        Knob("tome:r=4", (1, 2))
    with pytest.raises(ValueError, match="has no values"):
        Knob("tome:r={}", ())
    with pytest.raises(ValueError, match="value 'mid' gives 'tome:r=mid'"):
        Knob("tome:r={}", ("mid",))


def test_parse_target():
    assert parse_target("agreement>=0.98") == Target("agreement", 0.98)
    assert parse_target(" kl <= 0.05 ") == Target("kl", 0.05)
    assert str(parse_target("cosine>=0.99")) == "cosine>=0.99" and Target("kl", 0.1).comparison == "<="
    for text, wrong in [("kl>=0.1", "kl is better when lower, so its target is kl<=VALUE"),
                        ("accuracy>0.9", "accuracy is better when higher"),
                        ("speed>=2", "unknown metric 'speed'; choose from agreement, accuracy, cosine, kl"),
                        ("agreement>=1.5", "takes a number from 0 to 1, got 1.5"),
                        ("agreement>=x", "'x' is not a number"),
                        ("agreement", "write METRIC>=VALUE")]:
        with pytest.raises(ValueError, match=wrong.replace("(", r"\(")):
            parse_target(text)


# ----- points, front, plan ---------------------------------------------------------------------------
def _point(specs, tokens, agreeing, examples=100, kl=None, correct=None):
    return Point(tuple(specs), examples, float(tokens), 0.0, tokens * 1e6, tokens / 64, agreeing, correct, kl)


def test_pareto_on_hand_made_points_with_ties():
    a, b, c = _point(["a"], 10, 80), _point(["b"], 20, 90), _point(["c"], 30, 99)
    twin = _point(["twin"], 20, 90)  # ties b exactly: both stay
    dominated = _point(["d"], 25, 85)  # b has fewer tokens and more agreement
    same_tokens_worse = _point(["e"], 10, 70)  # ties a on tokens, worse agreement
    same_agreement_more = _point(["f"], 35, 99)  # ties c on agreement, more tokens
    unreduced = _point([], 64, 100)
    points = [c, same_tokens_worse, b, dominated, a, twin, same_agreement_more, unreduced]
    assert pareto(points) == [a, b, twin, c, unreduced]
    by_kl = [_point(["x"], 10, 0, kl=0.5), _point(["y"], 20, 0, kl=0.1), _point(["z"], 30, 0, kl=0.2)]
    assert [p.specs for p in pareto(by_kl, y="kl")] == [("x",), ("y",)]  # lower kl is better
    with pytest.raises(ValueError, match="x must be a cost"):
        pareto(points, x="agreement")
    with pytest.raises(ValueError, match="has no accuracy: no labels were given"):
        pareto(points, y="accuracy")


def test_coarse_and_refine_plan():
    assert coarse_indices(17, 4) == [0, 4, 8, 12, 16]
    assert coarse_indices(10, 4) == [0, 4, 8, 9] and coarse_indices(1, 4) == [0]
    # tokens fall with the index (ToMe r): passing coarse point with fewest tokens is index 8
    falling = {0: (64, True), 4: (52, True), 8: (40, True), 12: (28, False), 16: (16, False)}
    assert refine_indices(falling) == [9, 10, 11]
    # tokens rise with the index (EViT keep): the same budgets mirrored
    rising = {0: (16, False), 4: (28, False), 8: (40, True), 12: (52, True), 16: (64, True)}
    assert refine_indices(rising) == [5, 6, 7]
    assert refine_indices({0: (64, False), 4: (40, False)}) == []  # nothing passes
    assert refine_indices({0: (64, True), 4: (40, True)}) == []  # the smallest budget passes


# ----- search on fake evaluators ------------------------------------------------------------------
FAILING_TOKENS = {34} | set(range(0, 29))  # non-monotone: 31 passes, 34 fails, 37 and up pass


class Fake:
    """Tokens from each spec's value by ``tokens``; agreement 100/100 where the tokens pass, 90/100
    elsewhere; raises after ``fail_after`` calls (an interruption)."""

    def __init__(self, tokens, setup=None, fail_after=None):
        self.tokens, self.fail_after, self.calls = tokens, fail_after, []
        self.setup = setup or {"evaluator": "fake"}

    def __call__(self, specs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls.append(tuple(specs))
        tokens = 64 - sum(64 - self.tokens(s) for s in specs)
        agreeing = 90 if tokens in FAILING_TOKENS else 100
        return Point(tuple(specs), 100, float(tokens), tokens / 7, tokens * 1e6 / 3, tokens / 64, agreeing, None,
                     kl=1 / (tokens + 3), cosine=1 - 1 / (tokens + 7), latency_ms=tokens / 11, reference_latency_ms=64 / 11)


def _value(spec):
    return int(spec.rpartition("=")[2])


DIRECTIONS = {  # the same budgets (16, 19, ..., 64 tokens) reached by a knob whose values lower or raise them
    "larger-is-fewer": (Knob("tome:r={}", tuple(range(17))), lambda s: 64 - 3 * _value(s)),
    "larger-is-more": (Knob("random:tokens={}", tuple(range(16, 65, 3))), _value),
}


def _bisection(points, target):
    """Plain bisection over budgets, assuming the metric is monotone in the budget."""
    low, high = 0, len(points) - 1  # fewest tokens (assumed failing), most tokens (passing)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if target.met_by(points[middle].agreement) else (middle, high)
    return points[high]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_smallest_budget_on_a_non_monotone_metric(tmp_path, direction):
    knob, tokens = DIRECTIONS[direction]
    target = Target("agreement", 0.95)
    fake = Fake(tokens)
    result = smallest_budget(fake, knob, target, tmp_path / "tune.csv", coarse_step=4)
    everything = sorted((Fake(tokens)([s]) for s in knob.specs), key=lambda p: p.visual_tokens)
    truth = min((p for p in everything if target.met_by(p.agreement)), key=lambda p: p.visual_tokens)
    assert result.best == truth
    assert not target.met_by(result.below.agreement)
    index = {spec: i for i, spec in enumerate(knob.specs)}
    assert abs(index[result.below.specs[0]] - index[truth.specs[0]]) == 1  # the next grid value, not a coarse one
    assert result.below.visual_tokens == max(p.visual_tokens for p in everything if p.visual_tokens < truth.visual_tokens)
    assert len(fake.calls) == 1 + 5 + 3  # unreduced, coarse grid, refinement: far from all 17 values
    assert result.unreduced.specs == () and [p.visual_tokens for p in result.points] == sorted(p.visual_tokens for p in result.points)
    assert _bisection(everything, target).visual_tokens > truth.visual_tokens  # bisection is fooled by the dip
    coarse = [p for p in result.points if index[p.specs[0]] % 4 == 0 and target.met_by(p.agreement)]
    assert min(p.visual_tokens for p in coarse) > truth.visual_tokens  # so is the coarse grid alone
    assert "next smaller budget on the grid misses it" in str(result)


def test_unreachable_target_names_the_best_point(tmp_path):
    knob, tokens = DIRECTIONS["larger-is-fewer"]
    with pytest.raises(TuneError) as error:
        smallest_budget(Fake(tokens), knob, Target("kl", 0.001), tmp_path / "tune.csv")
    best = f"tome:r=0 (64.0±9.1 visual tokens): kl {1 / 67:.4g}"
    assert "none of the 5 values of tome:r=0,1,2" in str(error.value) and "meets kl<=0.001" in str(error.value)
    assert f"best point found: {best}" in str(error.value)


def test_a_metric_the_evaluator_lacks_is_refused_before_the_grid(tmp_path):
    knob, tokens = DIRECTIONS["larger-is-fewer"]
    fake = Fake(tokens)
    with pytest.raises(ValueError, match="none has no accuracy: no labels were given"):
        smallest_budget(fake, knob, Target("accuracy", 0.9), tmp_path / "tune.csv")
    assert fake.calls == [()]


def test_an_interrupted_sweep_resumes_without_redoing_points(tmp_path):
    knob, tokens = DIRECTIONS["larger-is-more"]
    path = tmp_path / "tune.csv"
    with pytest.raises(RuntimeError, match="interrupted"):
        sweep(Fake(tokens, fail_after=5), knob, path)
    with path.open("a") as handle:
        handle.write("random:tokens=31,100,31.0")  # a row cut short by the interruption
    resumed = Fake(tokens)
    points = sweep(resumed, knob, path)
    done = [(), *((s,) for s in knob.specs[:4])]
    assert len(resumed.calls) == len(knob.specs) + 1 - 5 and not set(done) & set(resumed.calls)
    fresh = Fake(tokens)
    assert points == sweep(fresh, knob, tmp_path / "fresh.csv")  # the finished points read back exactly
    again = Fake(tokens)
    assert sweep(again, knob, path) == points and again.calls == []
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS and len(rows) == len(points)
    assert [r["specs"] for r in rows] == [p.label for p in points]
    low, high = wilson(points[1].agreeing, points[1].examples)
    assert (float(rows[1]["agreement_low"]), float(rows[1]["agreement_high"])) == (low, high)


def test_a_results_file_of_another_setup_is_refused_and_kept(tmp_path):
    knob, tokens = DIRECTIONS["larger-is-more"]
    path = tmp_path / "tune.csv"
    sweep(Fake(tokens, setup={"evaluator": "fake", "model": "a"}), knob, path)
    before = path.read_bytes(), (tmp_path / "tune.csv.json").read_bytes()
    other = Fake(tokens, setup={"evaluator": "fake", "model": "b"})
    with pytest.raises(TuneError, match="holds results of another setup \\(model: 'a' there, 'b' here\\)"):
        sweep(other, knob, path)
    assert other.calls == [] and (path.read_bytes(), (tmp_path / "tune.csv.json").read_bytes()) == before
    orphan = tmp_path / "orphan.csv"
    orphan.write_text("specs\n")
    with pytest.raises(TuneError, match="exists without its setup file orphan.csv.json"):
        sweep(other, knob, orphan)


def test_search_evaluates_the_grid_and_returns_its_front(tmp_path):
    knobs = [parse_knob("tome:r=0..4:2"), parse_knob("random:tokens=40,52,64")]
    fake = Fake(lambda s: 64 - 3 * _value(s) if s.startswith("tome") else _value(s))
    front = search(fake, knobs, tmp_path / "search.csv")
    assert len(fake.calls) == 1 + 3 * 3 and ("tome:r=2", "random:tokens=52") in fake.calls
    everything = [Fake(fake.tokens)(specs) for specs in fake.calls]
    assert front == pareto(everything)
    again = Fake(fake.tokens)
    assert search(again, knobs, tmp_path / "search.csv") == front and again.calls == []


def test_search_with_trials_needs_optuna(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match="needs optuna \\(pip install optuna\\); leave trials unset"):
        search(Fake(_value), [parse_knob("random:tokens=4,8")], tmp_path / "search.csv", trials=3)


def test_search_with_optuna_trials(tmp_path):
    pytest.importorskip("optuna")
    knobs = [parse_knob("tome:r=0..4:2"), parse_knob("random:tokens=40,52,64")]
    fake = Fake(lambda s: 64 - 3 * _value(s) if s.startswith("tome") else _value(s))
    front = search(fake, knobs, tmp_path / "search.csv", trials=6)
    assert 1 < len(fake.calls) <= 7 and len(set(fake.calls)) == len(fake.calls)  # repeats read back, not redone
    assert front == pareto([Fake(fake.tokens)(specs) for specs in fake.calls])


def test_plot_pareto_writes_a_png(tmp_path):
    knob, tokens = DIRECTIONS["larger-is-more"]
    points = sweep(Fake(tokens), knob, tmp_path / "tune.csv")
    path = plot_pareto(points, tmp_path / "front.png", target=Target("agreement", 0.95))
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (880, 550)
    plot_pareto(points, tmp_path / "kl.png", x="flops", y="kl")
    assert (tmp_path / "kl.png").stat().st_size > 0


# ----- real models ------------------------------------------------------------------------------------
def test_classifier_smallest_budget_end_to_end(tmp_path, timm_vit, tools):
    model = timm_vit("plain")
    images, labels = tools.images(64, seed=3), [i % 10 for i in range(64)]
    evaluator = ClassifierEvaluator(model, images, labels, batch_size=32)
    knob, target = parse_knob("tome:r=0..16"), parse_target("agreement>=0.99")
    result = smallest_budget(evaluator, knob, target, tmp_path / "tune.csv")
    assert isinstance(result, TuneResult) and result.best.agreement >= 0.99
    assert result.below is not None and result.below.agreement < 0.99
    assert knob.specs.index(result.below.specs[0]) == knob.specs.index(result.best.specs[0]) + 1
    assert all(p.agreement < 0.99 for p in result.points if p.visual_tokens < result.best.visual_tokens)
    unreduced = result.unreduced
    assert (unreduced.agreement, unreduced.kl, unreduced.flops_ratio) == (1.0, 0.0, 1.0)
    assert unreduced.cosine == pytest.approx(1.0) and result.best.flops_ratio < 1
    with torch.inference_mode(), vtc.apply(model, *result.best.specs) as handle:
        predictions = model(images).argmax(-1)
        assert result.best.visual_tokens == handle.token_counts[-1] - 1  # patch tokens leaving the encoder
    assert result.best.correct == sum(int(p) == t for p, t in zip(predictions, labels))
    timed = ClassifierEvaluator(model, images[:8], repeats=2)(["tome:r=4"])
    assert timed.latency_ms > 0 and timed.reference_latency_ms > 0 and timed.accuracy is None


def test_a_combination_the_model_cannot_take_is_named(tmp_path, timm_vit, tools):
    evaluator = ClassifierEvaluator(timm_vit("plain"), tools.images(2))
    knobs = [parse_knob("tome:r=0,2"), parse_knob("evit:keep=0.5,0.7")]
    with pytest.raises(TuneError, match="^tome:r=2 \\| evit:keep=0.5: tome and evit both reduce at layer 1"):
        search(evaluator, knobs, tmp_path / "search.csv")
    assert "tome:r=0 | evit:keep=0.7" in (tmp_path / "search.csv").read_text()  # the points before it are kept


def test_classifier_evaluator_refuses_bad_input(timm_vit, tools):
    model = timm_vit("plain")
    with pytest.raises(ValueError, match="needs at least one example; got an empty set of images"):
        ClassifierEvaluator(model, tools.images(0))
    with pytest.raises(ValueError, match="3 labels for 4 images; give one per image"):
        ClassifierEvaluator(model, tools.images(4), labels=[0, 1, 2])
    with pytest.raises(TypeError, match="one \\(N, 3, H, W\\) tensor"):
        ClassifierEvaluator(model, [tools.images(1)])


def test_vlm_sweep_on_a_tiny_llava(tmp_path, llava):
    model, processor = llava
    images, prompts = llava_models.images(4), llava_models.prompts(4)
    full = model.config.image_seq_length
    answers = vtc.answer(model, processor, images, prompts, max_new_tokens=3)
    evaluator = VLMEvaluator(model, processor, images, prompts, answers, max_new_tokens=3, batch_size=3)
    points = sweep(evaluator, parse_knob(f"pool:tokens=4,{full}"), tmp_path / "vlm.csv")
    unreduced, small, whole = points
    assert unreduced.agreement == whole.agreement == 1.0 and whole.flops_ratio == 1.0 > small.flops_ratio
    assert [p.visual_tokens for p in points] == [full, 4, full] and small.visual_tokens_std == 0
    assert [p.accuracy for p in points] == [p.agreement for p in points]  # the answers are the unreduced model's
    assert small.kl is None and small.cosine is None
    with pytest.raises(ValueError, match="2 answers for 4 images"):
        VLMEvaluator(model, processor, images, prompts, answers[:2])


def test_run_tunes_shapes_vit_on_val(tmp_path):
    options = TuneOptions(knobs="tome:r=0..48:8", target="agreement>=0.95", examples=20, coarse_step=3,
                          results=str(tmp_path / "tune.csv"), plot=str(tmp_path / "tune.png"))
    assert TuneOptions().split == "val"
    result = run(options)
    assert result.best.agreement >= 0.95 and (result.below is None or result.below.agreement < 0.95)
    assert "shapes-vit on val[:20]" in Path(str(options.results) + ".json").read_text()
    assert (tmp_path / "tune.png").stat().st_size > 0
