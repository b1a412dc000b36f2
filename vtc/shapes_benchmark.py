"""Every reducer at every budget on the shipped shapes checkpoints: accuracy, fidelity, FLOPs, latency.

Budgets are visual tokens per image at the output of the reduction (of 256 patch tokens): what
reaches the classifier head (CLS not counted) or the LLaVA decoder. Each reducer reaches a budget
its own way (:func:`budget_spec`):

- ``tome``: a per-layer ``r`` list shrinking the patch tokens geometrically over all blocks;
- ``evit`` (and ``random`` on the ViT): explicit kept counts at EViT's drop layers, geometric
  down to the budget (EViT's fused token is counted, so it keeps ``budget - 1`` plus the fused one);
- ``random`` on LLaVA: at the connector, ``random:tokens=K``;
- ``pool``: ``pool:tokens=K`` (the connector on LLaVA, after block 0 on the ViT);
- ``holov``: ``holov:k=K`` at the LLaVA connector (not run on the ViT, which has no connector);
- ``m3`` and ``mqt``: trained methods, run on their own checkpoints fine-tuned from the base
  (:data:`TRAINED`: ``shapes-llava-m3`` with ``m3:tokens=K`` at the nested scales among the
  budgets, ``shapes-llava-mqt`` with ``mqt:tokens=K``); their rows join the base model's table,
  agreement and FLOP ratio measured against the base's unreduced model, latency against their
  own checkpoint without the method in the same interleaved loop.

A budget a reducer cannot reach (ToMe below what halving per block allows, EViT at 1, M3 off its
nested scales) is skipped and listed (:func:`plan_specs`).

``exit`` and ``dyvte`` act inside the LLM and keep every visual token (budget column "-"): the
fixed exit after each LLM layer but the last (``exit:layer=k``), and DyVTE with the routers
shipped for the checkpoint (``dyvte:routers=<name>``, with the argmax decision and at
:data:`DYVTE_THRESHOLDS`; skipped with a note where there are none).
Their rows add the mean exit layer (the last layer that saw the image) and the KV-cache ratio,
and count FLOPs per example alone: the tower's counted FLOPs plus the analytic prefill of the
real tokens each LLM layer ran on, against the same count without the exit (in a padded batch,
a row that exits early still occupies the width of the widest row).

DyMU has no fixed budget: its rows run the calibrations shipped with each checkpoint
(``dymu:preset=low|mid|high``, budget column = the calibration's target average), and report
tokens per image as mean ± std; on LLaVA once with virtual unmerging (``dymu``) and once
without (``dymu-novtu``).

A budget of all 256 tokens keeps every token and must reproduce the unreduced model. Latency is
timed side by side with the unreduced model (:func:`vtc.measure.compare` for the ViT, one
interleaved loop over all configurations with :func:`vtc.measure_vlm.time_stages` for LLaVA);
speedups are the median of the per-repeat ratios with their interquartile range, marked ``~``
when that range reaches 1x (the spread is larger than the effect). Every accuracy carries its 95%
Wilson interval, and :func:`ranking` orders reducers at one budget only where an exact paired
test on the same examples separates them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

import vtc
from vtc.budget import default_drop_layers
from vtc.data import shapes
from vtc.data.evaluate import ExitScores, Scores, classifier_scores, exit_scores, vlm_scores
from vtc.data.training import pixels
from vtc.dymu import load_calibration
from vtc.measure import compare, patch_tokens
from vtc.measure_vlm import llm_flops, profile, time_stages
from vtc.models import zoo
from vtc.records import environment, write_records
from vtc.reducers.dyvte import CONFIG_FILE as ROUTERS_FILE
from vtc.reducers.dyvte import SHIPPED_FOLDER as ROUTERS_FOLDER
from vtc.reducers.m3 import check_scale
from vtc.stats import Spread, mcnemar_exact, speedup_spread, wilson

BUDGETS = (256, 128, 64, 32, 16, 4, 1)
MATRYOSHKA_BUDGETS = (256, 64, 16, 4, 1)  # the nested scales of the 16x16 grid (M3 / MQT comparisons)
REDUCERS = ("tome", "evit", "random", "pool", "holov", "m3", "mqt", "exit", "dyvte")
DECODER = ("exit", "dyvte")  # inside the LLM: no token budget, one row per exit layer / the routers
CONNECTOR_ONLY = ("holov", "m3", "mqt", *DECODER)  # run on the VLM only (a classifier has no connector or LLM)
TRAINED = {"m3": "-m3", "mqt": "-mqt"}  # method -> suffix of its checkpoint's name (shapes-llava -> shapes-llava-m3)
DYMU_PRESETS = ("low", "mid", "high")
DYVTE_THRESHOLDS = (None, 0.9)  # DyVTE rows: the paper's argmax, and exiting only where p_exit > 0.9
CSV_COLUMNS = ("model", "checkpoint", "reducer", "budget", "spec", "visual_tokens", "visual_tokens_std", "examples", "accuracy",
               "accuracy_low", "accuracy_high",
               *(f"acc_{q}{end}" for q in shapes.QUESTION_TYPES for end in ("", "_low", "_high")),
               "agreement", "gflops_per_image", "flops_ratio", "latency_ms", "speedup", "speedup_q1", "speedup_q3",
               "exit_layer", "kv_cache_ratio")
SIGNIFICANCE = 0.05  # paired test level at which ranking() calls one reducer better than another


@dataclass
class Row:
    model: str
    reducer: str  # "none" for the unreduced model
    budget: int
    spec: str
    visual_tokens: float  # mean per image
    visual_tokens_std: float
    scores: Scores
    agreement: float  # same prediction as the unreduced model
    gflops: float  # per image: vision (+ prefill for a VLM)
    flops_ratio: float
    latency_ms: float  # per batch of the timing inputs (median)
    speedup: Spread  # of the per-repeat ratios to the unreduced model
    checkpoint: str = ""  # the checkpoint run, when not ``model`` (a trained method's own)
    exit_layer: float = math.nan  # decoder-site rows: mean last LLM layer that saw the image
    kv_ratio: float = math.nan  # decoder-site rows: prefill KV-cache entries over the unreduced model's

    def record(self) -> dict[str, str]:
        by_type = self.scores.by_type()
        per_type = {}
        for q in shapes.QUESTION_TYPES:
            low, high = self.scores.interval(q) if q in by_type else (None, None)
            per_type.update({f"acc_{q}": f"{by_type[q]:.4f}" if q in by_type else "",
                             f"acc_{q}_low": f"{low:.4f}" if q in by_type else "",
                             f"acc_{q}_high": f"{high:.4f}" if q in by_type else ""})
        low, high = self.scores.interval()
        return {
            "model": self.model, "checkpoint": self.checkpoint or self.model, "reducer": self.reducer,
            "budget": str(self.budget), "spec": self.spec,
            "visual_tokens": f"{self.visual_tokens:.2f}", "visual_tokens_std": f"{self.visual_tokens_std:.2f}",
            "examples": str(len(self.scores.truth)), "accuracy": f"{self.scores.accuracy:.4f}",
            "accuracy_low": f"{low:.4f}", "accuracy_high": f"{high:.4f}", **per_type,
            "agreement": f"{self.agreement:.4f}", "gflops_per_image": f"{self.gflops:.5f}",
            "flops_ratio": f"{self.flops_ratio:.4f}", "latency_ms": f"{self.latency_ms:.2f}",
            "speedup": f"{self.speedup.median:.3f}", "speedup_q1": f"{self.speedup.q1:.3f}",
            "speedup_q3": f"{self.speedup.q3:.3f}",
            "exit_layer": "" if math.isnan(self.exit_layer) else f"{self.exit_layer:.3f}",
            "kv_cache_ratio": "" if math.isnan(self.kv_ratio) else f"{self.kv_ratio:.4f}",
        }


@dataclass
class BenchmarkOptions:
    """What the shapes benchmark runs (the options of ``vtc eval``)."""

    examples: int = 1000  # test examples scored: the first N of the test split, every question type equally
    budgets: Sequence[int] = BUDGETS  # visual tokens per image of 256 at which every reducer runs
    reducers: Sequence[str] = REDUCERS  # reducers run at every budget (exit and dyvte: after every LLM layer /
    # with the shipped routers, no budget)
    models: Sequence[str] = ("shapes-vit", "shapes-llava")  # shipped checkpoints or folders written by the shapes training scripts
    timing_batch: int = 16  # images per timed forward
    repeats: int = 15  # timed repeats per configuration, interleaved with the unreduced model
    batch_size: int = 50  # examples per scored forward / generate call
    progress: bool = True  # a progress bar over the examples
    extra_specs: Sequence[str] = ()  # an extra reducer spec run on every model (budget column "-")
    dymu_presets: Sequence[str] = DYMU_PRESETS  # shipped DyMU calibrations to run (with and without virtual
    # unmerging on LLaVA; none: skip DyMU)
    device: str = "cpu"  # torch device: cpu, cuda or cuda:N (refused when absent)
    dtype: torch.dtype = torch.float32  # weights and inputs in this dtype: float32, bfloat16 or float16


def geometric_counts(start: int, end: int, steps: int) -> list[int]:
    """Token counts after each of ``steps`` reductions from ``start`` to ``end`` at a constant ratio."""
    counts = [round(start * (end / start) ** ((i + 1) / steps)) for i in range(steps)]
    counts[-1] = end
    return counts


def budget_spec(reducer: str, budget: int, kind: str, patches: int = 256, layers: int = 6) -> str:
    """The spec string with which ``reducer`` keeps ``budget`` of ``patches`` visual tokens on a
    ``kind`` ("timm" or "llava") model with ``layers`` encoder blocks (see the module docstring)."""
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r} for the shapes benchmark; choose from {', '.join(REDUCERS)}")
    if reducer in DECODER:
        raise ValueError(f"{reducer} acts inside the LLM and keeps every visual token: it has no token budget "
                         f"(its rows come from decoder_specs)")
    if not 1 <= budget <= patches:
        raise ValueError(f"budget {budget} is not between 1 and the {patches} visual tokens of an image")
    if reducer == "tome":
        counts = [patches, *geometric_counts(patches, budget, layers)]
        if any(a - b > a // 2 for a, b in zip(counts, counts[1:])):
            raise ValueError(f"tome: budget {budget} needs more than half of a block's tokens merged in one block "
                             f"(at most {patches >> layers} after {layers} blocks)")
        return "tome:r=" + ";".join(str(a - b) for a, b in zip(counts, counts[1:])) + ("" if layers > 1 else ";")
    if reducer in CONNECTOR_ONLY:
        if kind != "llava":
            raise ValueError(f"{reducer} acts at a VLM's connector; a {kind} classifier has none")
        if reducer == "m3":
            side = math.isqrt(patches)
            return f"m3:tokens={check_scale(budget, (side, side))}"
        return f"{reducer}:tokens={budget}" if reducer == "mqt" else f"{reducer}:k={budget}"
    if reducer == "pool" or (reducer == "random" and kind == "llava"):
        return f"{reducer}:tokens={budget}"
    drops = default_drop_layers(layers)
    fused = 1 if reducer == "evit" and budget < patches else 0
    counts = geometric_counts(patches, budget, len(drops))
    kept = [c - fused for c in counts]
    if min(kept) < 1:
        raise ValueError(f"{reducer}: budget {budget} leaves no kept token besides EViT's fused one")
    return f"{reducer}:tokens={';'.join(map(str, kept))};"


def dymu_specs(ckpt, presets: Sequence[str]) -> list[tuple[str, int, str]]:
    """(reducer, budget, spec) of DyMU at each shipped preset of a checkpoint; the budget is the
    calibration's target. On LLaVA each preset runs with and without virtual unmerging."""
    specs = []
    for preset in presets:
        target = round(load_calibration(f"{ckpt.name}/{preset}").target)
        specs.append(("dymu", target, f"dymu:preset={preset}"))
        if ckpt.kind == "llava":
            specs.append(("dymu-novtu", target, f"dymu:preset={preset},vtu=off"))
    return specs


def decoder_specs(ckpt, reducers: Sequence[str]) -> tuple[list[tuple[str, int, str]], list[str]]:
    """(reducer, -1, spec) of the decoder-site reducers among ``reducers`` on a LLaVA checkpoint:
    ``exit`` after every LLM layer but the last, ``dyvte`` with the routers shipped for it; and a
    note where it ships none."""
    specs, skipped = [], []
    if ckpt.kind != "llava":
        return specs, skipped
    layers = ckpt.model.config.text_config.num_hidden_layers
    if "exit" in reducers:
        specs += [("exit", -1, f"exit:layer={k}") for k in range(layers - 1)]
    if "dyvte" in reducers:
        if (ckpt.path / ROUTERS_FOLDER / ROUTERS_FILE).is_file():  # a folder's own routers: "dyvte" finds them
            options = [f"routers={ckpt.name}"] if ckpt.name in zoo.names() else []
            for threshold in DYVTE_THRESHOLDS:
                spec = ",".join(options + ([f"threshold={threshold}"] if threshold else []))
                specs.append(("dyvte", -1, f"dyvte:{spec}" if spec else "dyvte"))
        else:
            skipped.append(f"dyvte (no routers trained for {ckpt.name}: scripts/train_dyvte.py)")
    return specs, skipped


def exit_costs(model, kept: torch.Tensor) -> tuple[float, float, float]:
    """From the real tokens each LLM layer ran on per example (``kept``, (N, L + 1)): the mean
    analytic prefill FLOPs per example (layers and the head on the last token), the same without
    the exit (every layer on the full prompt), and the ratio of prefill KV-cache entries."""
    language_model = model.model.language_model
    layers = len(language_model.layers)
    head = 2 * language_model.config.hidden_size * model.lm_head.out_features
    ran = kept[:, :layers].tolist()
    reduced = [llm_flops(language_model, row, row, 1) + head for row in ran]
    full = [llm_flops(language_model, [row[0]] * layers, [row[0]] * layers, 1) + head for row in ran]
    kv = float(kept[:, :layers].sum()) / float(kept[:, 0].sum() * layers)
    return statistics.fmean(reduced), statistics.fmean(full), kv


def _depth(ckpt) -> int:
    """Encoder blocks the reducers act in (the tower runs up to LLaVA's feature layer)."""
    if ckpt.kind == "llava":
        config = ckpt.model.config
        return config.vision_config.num_hidden_layers + 1 + config.vision_feature_layer \
            if config.vision_feature_layer < 0 else config.vision_feature_layer
    return len(ckpt.model.blocks)


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _vit_rows(ckpt, examples, specs: list[tuple[str, int, str]], options: BenchmarkOptions, step: Callable) -> list[Row]:
    model = ckpt.model
    full = classifier_scores(model, examples, options.batch_size)
    parameter = next(model.parameters())
    images = pixels([e.image for e in examples[:options.timing_batch]]).to(parameter.device, parameter.dtype)
    rows, base_latency = [], []
    for reducer, budget, spec in specs:
        with vtc.apply(model, spec) as handle:
            scores = classifier_scores(model, examples, options.batch_size)
            tokens = patch_tokens(handle)  # the last scored batch
        comparison = compare(model, spec, images, warmup=1, repeats=options.repeats)
        base_latency += comparison.latency_reference.samples
        mean, std = _stats(tokens)
        rows.append(Row(ckpt.name, reducer, budget, spec, mean, std, scores, scores.agreement(full),
                        comparison.flops / 1e9, comparison.flops_ratio, comparison.latency.median * 1e3,
                        speedup_spread(comparison.latency_reference.samples, comparison.latency.samples)))
        step()
    patches = (shapes.IMAGE_SIZE // 4) ** 2
    reference_flops = rows[0].gflops / rows[0].flops_ratio if rows else float("nan")
    baseline = Row(ckpt.name, "none", patches, "none", patches, 0.0, full, 1.0, reference_flops, 1.0,
                   statistics.median(base_latency) * 1e3 if base_latency else float("nan"), Spread(1.0, 1.0, 1.0))
    return [baseline, *rows]


def _vlm_rows(ckpt, examples, specs: list[tuple[str, int, str]], options: BenchmarkOptions, step: Callable,
              base: Row | None = None) -> list[Row]:
    """Rows of ``ckpt`` unreduced and with each spec. A trained method's checkpoint passes its
    ``base``'s unreduced row: the rows then carry the base's model name, agreement and FLOP ratio
    are against the base, and the checkpoint's own unreduced run is only the timing reference."""
    model, processor = ckpt.model, ckpt.processor
    timing = examples[:options.timing_batch]
    saved_side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
    inputs = processor(images=[Image.fromarray(e.image) for e in timing], text=[e.prompt for e in timing],
                       padding=True, return_tensors="pt").to(model.device)
    processor.tokenizer.padding_side = saved_side
    configs = [("none", 256, None)] + specs
    measured: list[tuple[Scores, object, ExitScores | None]] = []
    for reducer, _budget, spec in configs:
        with vtc.apply(model, *([spec] if spec else [])):
            exits = exit_scores(model, processor, examples, options.batch_size) if reducer in DECODER else None
            scores = exits.scores if exits else vlm_scores(model, processor, examples, options.batch_size)
            report = profile(model, inputs, new_tokens=2, timed=False)
        measured.append((scores, report, exits))
        step()
    seconds = time_stages(model, [[spec] if spec else [] for _, _, spec in configs], inputs, new_tokens=2,
                          warmup=1, repeats=options.repeats)
    full_scores, full_report, _ = measured[0]
    batch = len(timing)
    full_flops = (full_report.vision.flops + full_report.prefill.flops) / batch
    full_samples = seconds[0]["vision_prefill_samples"]
    if base is not None:
        full_scores, full_flops = base.scores, base.gflops * 1e9
    rows = []
    for (reducer, budget, spec), (scores, report, exits), stage in zip(configs, measured, seconds):
        flops = (report.vision.flops + report.prefill.flops) / batch
        ratio, exit_layer, kv = flops / full_flops, math.nan, math.nan
        if exits is not None:  # each example's own prefill, against the same count without the exit
            prefill, unreduced, kv = exit_costs(model, exits.kept)
            flops = report.vision.flops / batch + prefill
            ratio, exit_layer = flops / (report.vision.flops / batch + unreduced), exits.mean_exit_layer
        latency = stage["vision"] + stage["prefill"]
        mean, std = _stats(report.visual_tokens)
        rows.append(Row(base.model if base else ckpt.name, reducer, budget, spec or "none", mean, std, scores,
                        scores.agreement(full_scores), flops / 1e9, ratio, latency * 1e3,
                        speedup_spread(full_samples, stage["vision_prefill_samples"]), checkpoint=ckpt.name,
                        exit_layer=exit_layer, kv_ratio=kv))
    return rows[1:] if base is not None else rows


def plan_specs(reducers: Sequence[str], budgets: Sequence[int], kind: str, layers: int) -> tuple[list[tuple[str, int, str]], list[str]]:
    """(reducer, budget, spec) of every reducer at every budget it can reach, and a note for each
    budget it cannot (:func:`budget_spec`'s reason)."""
    specs, skipped = [], []
    for reducer in (r for r in reducers if r not in DECODER):
        for budget in budgets:
            try:
                specs.append((reducer, budget, budget_spec(reducer, budget, kind, layers=layers)))
            except ValueError as error:
                skipped.append(f"{reducer} at {budget}: {error}")
    return specs, skipped


def trained_checkpoint(base: str, reducer: str) -> str:
    """The checkpoint a trained method runs on for the base checkpoint ``base`` (:data:`TRAINED`)."""
    return base + TRAINED[reducer]


def run(options: BenchmarkOptions) -> list[Row]:
    """Load each shipped model, run every (reducer, budget) on the first ``options.examples`` test
    examples and measure it; rows start with the unreduced model of each model."""
    unknown = [b for b in options.budgets if not 1 <= b <= 256]
    if unknown:
        raise ValueError(f"budget(s) {unknown} outside 1..256 (the visual tokens of a shapes image)")
    rows: list[Row] = []
    loaded = [zoo.load(name, options.device) for name in options.models]
    plans, trained, skipped = [], [], []
    for ckpt in loaded:
        kind = ckpt.kind
        ckpt.model.to(options.dtype)
        runnable = [r for r in options.reducers if kind == "llava" or r not in CONNECTOR_ONLY]
        if options.reducers and not runnable:
            raise ValueError(f"{', '.join(options.reducers)} act only in a LLaVA (its connector or LLM) and "
                             f"{ckpt.name} is a ViT classifier: add shapes-llava to the models, or choose from "
                             f"{', '.join(r for r in REDUCERS if r not in CONNECTOR_ONLY)}")
        specs, cannot = plan_specs(runnable, options.budgets, kind, _depth(ckpt))
        skipped += [f"{ckpt.name}: {note}" for note in cannot]
        own = {r: [spec for spec in specs if spec[0] == r] for r in TRAINED if any(spec[0] == r for spec in specs)}
        methods = []
        for reducer, plan in own.items():
            try:
                methods.append((zoo.load(trained_checkpoint(ckpt.name, reducer), options.device), plan))
            except (ValueError, FileNotFoundError) as error:
                skipped.append(f"{ckpt.name}: {reducer} (no checkpoint trained for it: {error})")
        trained.append(methods)
        specs = [spec for spec in specs if spec[0] not in TRAINED]
        inside, cannot = decoder_specs(ckpt, runnable)
        skipped += [f"{ckpt.name}: {note}" for note in cannot]
        specs += inside
        specs += dymu_specs(ckpt, options.dymu_presets)
        specs += [(vtc.parse_reducer(s).name, -1, s) for s in options.extra_specs]
        plans.append(specs)
    for note in skipped:
        print(f"skipped {note}")
    examples = shapes.examples("test", options.examples)
    total = sum(len(s) + (1 if c.kind == "llava" else 0) + sum(len(p) + 1 for _, p in t)
                for s, c, t in zip(plans, loaded, trained))
    with tqdm(total=total, desc="shapes benchmark", unit="config", disable=not options.progress) as bar:
        for ckpt, specs, methods in zip(loaded, plans, trained):
            bar.set_postfix_str(ckpt.name)
            runner = _vlm_rows if ckpt.kind == "llava" else _vit_rows
            own = runner(ckpt, examples, specs, options, bar.update)
            for method_ckpt, method_specs in methods:
                bar.set_postfix_str(method_ckpt.name)
                method_ckpt.model.to(options.dtype)
                own += _vlm_rows(method_ckpt, examples, method_specs, options, bar.update, base=own[0])
            rows += own
    return rows


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    return write_records(path, CSV_COLUMNS, (row.record() for row in rows))


def write_json(rows: Sequence[Row], path: Path, options: BenchmarkOptions, command: str) -> Path:
    """The rows (with their exact spec strings) beside the command, the options, each model's
    checkpoint folder, and the versions and machine (:func:`vtc.records.environment`)."""
    setup = {key: list(value) if isinstance(value, (list, tuple)) else value for key, value in asdict(options).items()}
    setup["dtype"] = str(options.dtype).removeprefix("torch.")
    names = dict.fromkeys([*options.models, *(row.checkpoint for row in rows if row.checkpoint)])
    checkpoints = {name: str(zoo.locate(name)[2]) for name in names}
    path.write_text(json.dumps({"command": command, "options": setup, "checkpoints": checkpoints, **environment(),
                                "rows": [row.record() for row in rows]}, indent=2) + "\n")
    return path


def _with_interval(accuracy: float, interval: tuple[float, float]) -> str:
    return f"{accuracy:.3f} ({interval[0]:.2f}-{interval[1]:.2f})"


def format_table(rows: Sequence[Row]) -> str:
    """One fixed-width table per model: budget, tokens, accuracy with its 95% Wilson interval
    (overall and per type), agreement, GFLOPs and speedup with its interquartile range."""
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        group = [r for r in rows if r.model == model]
        qtypes = list(group[0].scores.by_type())
        lines.append(f"\n{model} ({len(group[0].scores.truth)} examples; accuracy (95% Wilson interval); "
                     f"speedup median [interquartile range], ~ where the range reaches 1x)")
        lines.append(f"{'reducer':<10} {'budget':>6} {'tokens':>11} {'accuracy':>18} "
                     + " ".join(f"{q[:8]:>18}" for q in qtypes)
                     + f" {'agree':>6} {'GFLOPs':>8} {'FLOPs':>6} {'speedup':>20}")
        for r in group:
            by_type = r.scores.by_type()
            tokens = f"{r.visual_tokens:.1f}" + (f"±{r.visual_tokens_std:.1f}" if r.visual_tokens_std else "")
            lines.append(f"{r.reducer:<10} {r.budget if r.budget > 0 else '-':>6} {tokens:>11} "
                         f"{_with_interval(r.scores.accuracy, r.scores.interval()):>18} "
                         + " ".join(f"{_with_interval(by_type[q], r.scores.interval(q)):>18}" for q in qtypes)
                         + f" {r.agreement:>6.3f} {r.gflops:>8.4f} {r.flops_ratio:>6.3f} {r.speedup.format():>20}")
    return "\n".join(lines)


def ranking(rows: Sequence[Row], model: str, budget: int, qtype: str | None = None) -> str:
    """The reducers of ``model`` at ``budget`` ordered by accuracy (of ``qtype``, or overall):
    ``a > b`` where an exact McNemar test on the same examples separates neighbours at
    :data:`SIGNIFICANCE`, ``a ~ b`` where it does not (the order between them is then not claimed)."""
    group = sorted((r for r in rows if r.model == model and r.budget == budget and r.reducer != "none"),
                   key=lambda r: -sum(r.scores.correct_of(qtype)))
    if not group:
        return ""
    text = f"{group[0].reducer} {sum(group[0].scores.correct_of(qtype)) / len(group[0].scores.correct_of(qtype)):.3f}"
    for better, worse in zip(group, group[1:]):
        p = mcnemar_exact(better.scores.correct_of(qtype), worse.scores.correct_of(qtype))
        hits = worse.scores.correct_of(qtype)
        text += f" {'>' if p < SIGNIFICANCE else '~'} {worse.reducer} {sum(hits) / len(hits):.3f}"
    return text


def format_rankings(rows: Sequence[Row], budget: int) -> str:
    """:func:`ranking` of every model at ``budget``, overall and per question type."""
    lines = []
    for model in dict.fromkeys(r.model for r in rows if r.budget == budget and r.reducer != "none"):
        qtypes = list(next(r for r in rows if r.model == model).scores.by_type())
        lines.append(f"\n{model} at {budget} visual tokens ('>': paired exact test p < {SIGNIFICANCE}, '~': not separated)")
        for qtype in [None, *qtypes] if len(qtypes) > 1 else [None]:
            lines.append(f"  {qtype or 'overall':<9} {ranking(rows, model, budget, qtype)}")
    return "\n".join(lines)


def format_exits(rows: Sequence[Row]) -> str:
    """The decoder-site rows of each model beside its unreduced row: mean exit layer, accuracy per
    type with 95% intervals, FLOPs and KV-cache ratios, speedup; then DyVTE against the full model
    and the fixed exits around its mean layer (exact paired test on the same examples)."""
    lines = []
    for model in dict.fromkeys(r.model for r in rows if r.reducer in DECODER):
        full = next(r for r in rows if r.model == model and r.reducer == "none")
        group = [full, *(r for r in rows if r.model == model and r.reducer in DECODER)]
        qtypes = list(full.scores.by_type())
        lines.append(f"\n{model}: exits inside the LLM ({len(full.scores.truth)} examples; exit layer = the last "
                     f"layer that saw the image, mean; FLOPs and KV cache per example, prefill included)")
        lines.append(f"{'spec':<28} {'exit':>5} {'accuracy':>18} " + " ".join(f"{q[:8]:>18}" for q in qtypes)
                     + f" {'agree':>6} {'FLOPs':>6} {'KV':>6} {'speedup':>20}")
        for r in group:
            by_type = r.scores.by_type()
            exit_layer = "-" if math.isnan(r.exit_layer) else f"{r.exit_layer:.2f}"
            kv = "1" if math.isnan(r.kv_ratio) else f"{r.kv_ratio:.3f}"
            lines.append(f"{r.spec:<28} {exit_layer:>5} {_with_interval(r.scores.accuracy, r.scores.interval()):>18} "
                         + " ".join(f"{_with_interval(by_type[q], r.scores.interval(q)):>18}" for q in qtypes)
                         + f" {r.agreement:>6.3f} {r.flops_ratio:>6.3f} {kv:>6} {r.speedup.format():>20}")
        fixed = {round(r.exit_layer): r for r in group if r.reducer == "exit"}
        for learned in (r for r in group if r.reducer == "dyvte"):
            around = [fixed[k] for k in sorted({math.floor(learned.exit_layer), math.ceil(learned.exit_layer)}) if k in fixed]
            tests = [f"vs {other.spec} {other.scores.accuracy:.3f}: p = "
                     f"{mcnemar_exact(learned.scores.correct, other.scores.correct):.3g}" for other in [full, *around]]
            lines.append(f"{learned.spec} (mean exit {learned.exit_layer:.2f}, accuracy {learned.scores.accuracy:.3f}) "
                         + "; ".join(tests))
    return "\n".join(lines)


@dataclass(frozen=True)
class Oracle:
    """M3's oracle (Cai et al., 2024, Table 2): per example, the cheapest budget of a method that
    still answers it correctly."""

    model: str
    reducer: str
    budgets: tuple[int, ...]  # the budgets it chose among, smallest first
    chosen: tuple[int | None, ...]  # per example: the cheapest correct budget (None: none answers it)

    @property
    def accuracy(self) -> float:
        return sum(c is not None for c in self.chosen) / len(self.chosen)

    @property
    def mean_tokens(self) -> float:
        """Average budget used, an unanswerable example counted at the largest budget."""
        return statistics.fmean(self.budgets[-1] if c is None else c for c in self.chosen)

    def interval(self) -> tuple[float, float]:
        return wilson(sum(c is not None for c in self.chosen), len(self.chosen))


def oracle(rows: Sequence[Row], model: str, reducer: str) -> Oracle | None:
    """The oracle of ``reducer`` on ``model`` over its budgets in ``rows`` (None without rows)."""
    group = sorted((r for r in rows if r.model == model and r.reducer == reducer and r.budget > 0), key=lambda r: r.budget)
    if not group:
        return None
    chosen = tuple(next((r.budget for r in group if r.scores.correct[i]), None) for i in range(len(group[0].scores.truth)))
    return Oracle(model, reducer, tuple(r.budget for r in group), chosen)


def format_oracles(rows: Sequence[Row], reducers: Sequence[str] = tuple(TRAINED)) -> str:
    """One line per trained method present in ``rows``: the oracle's accuracy and average tokens."""
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        for reducer in reducers:
            found = oracle(rows, model, reducer)
            if found is None:
                continue
            low, high = found.interval()
            full = max((r for r in rows if r.model == model and r.reducer == reducer), key=lambda r: r.budget)
            lines.append(f"{model} {reducer} oracle (cheapest of {'/'.join(map(str, found.budgets))} tokens answering each "
                         f"example): accuracy {found.accuracy:.3f} ({low:.2f}-{high:.2f}) at {found.mean_tokens:.1f} tokens "
                         f"on average; {reducer} at {full.budget}: {full.scores.accuracy:.3f}")
    return "\n".join(lines)
