"""The work behind ``vtc demo``.

By default it runs the shapes benchmark (:mod:`vtc.shapes_benchmark`) on the checkpoints shipped
with vtc (``shapes-vit``, ``shapes-llava``): accuracy per question type, fidelity, FLOPs and latency
for every reducer at several visual-token budgets, a CSV and a Pareto plot. Nothing is downloaded.

With ``--models timm,open_clip`` it runs reducers side by side on a timm ViT and an open_clip ViT.
Sample images ship inside scikit-image (nothing is downloaded). Models get random weights unless
``pretrained`` is asked for, so by default the fidelity columns show the mechanics only. Each
reducer budget is measured with :func:`vtc.measure.compare` (interleaved timing against an
unreduced copy); the table goes to the terminal and a CSV, and one merge picture per reducer
family (first image) is written as PNG.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

import vtc
from vtc import shapes_benchmark as bench
from vtc.measure import Comparison, compare
from vtc.records import write_records
from vtc.shapes_plots import write_outputs
from vtc.viz import save_groups

# Colour images bundled inside the scikit-image package (checked to load without pooch/network).
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "retina", "stereo_motorcycle")
SHAPES_MODELS = ("shapes-vit", "shapes-llava")
SAMPLE_MODELS = ("timm", "open_clip")
MODELS = SHAPES_MODELS + SAMPLE_MODELS
SHORT_BUDGETS = bench.MATRYOSHKA_BUDGETS  # the default and --quick demo; --full runs bench.BUDGETS
RANKED_BUDGETS = (64,)  # budgets at which the demo ranks the reducers with a paired test

# Budgets per model: ViT-S/16 has 197 tokens, ViT-B/32 only 50 (so far smaller ToMe r).
DEFAULT_SPECS = {
    "timm": ["tome:r=8", "tome:r=13", "tome:r=16", "evit:keep=0.9", "evit:keep=0.7", "evit:keep=0.5",
             "random:keep=0.7", "random:keep=0.5", "pool:tokens=100", "pool:kernel=2"],
    "open_clip": ["tome:r=2", "tome:r=3", "tome:r=4", "evit:keep=0.9", "evit:keep=0.7",
                  "evit:keep=0.5", "random:keep=0.7", "random:keep=0.5", "pool:tokens=25", "pool:kernel=2"],
}
QUICK_SPECS = {
    "timm": ["tome:r=13", "evit:keep=0.7", "random:keep=0.5", "pool:kernel=2"],
    "open_clip": ["tome:r=3", "evit:keep=0.7", "random:keep=0.5", "pool:kernel=2"],
}
CSV_COLUMNS = ("model", "reducer", "tokens_per_layer", "tokens_out", "gflops", "flops_ratio", "latency_ms",
               "throughput_img_s", "speedup", "top1_agreement", "kl", "cosine")


class DemoError(RuntimeError):
    """A demo run that cannot go ahead; the message says why and what to do."""


@dataclass
class DemoOptions:
    """What ``vtc demo`` runs."""

    out_dir: Path  # folder for the results
    quick: bool = False  # smoke test, timings rough: shapes on 40 examples at budgets 256/64/16/4/1; timm / open_clip
    # as tiny 6-block models with one budget per reducer family; batch 4, 1 repeat
    full: bool = False  # the whole shapes benchmark: 500 examples, budgets 256/128/64/32/16/4/1, DyMU low/mid/high
    # (about 9 minutes on 2 CPU cores)
    pretrained: bool = False  # hub weights for timm vit_small_patch16_224 (augreg) and open_clip ViT-B-32
    # (laion2b_s34b_b79k); needs internet on first use
    batch: int | None = None  # images per timed forward (default 8, 4 with quick); beyond the 8 bundled sample
    # images mirrored copies are used
    repeats: int | None = None  # timed forwards per model and budget after the warm-up (default 3, 1 with quick)
    warmup: int = 1  # untimed forwards before the timed ones
    reducers: Sequence[str] | None = None  # reducer specs measured instead of the built-in budgets (each must fit every model)
    models: Sequence[str] = SHAPES_MODELS  # models to run: shapes-vit, shapes-llava (shipped, trained) and/or timm,
    # open_clip (sample images)
    examples: int | None = None  # shapes test examples to score (default 200, 500 with full, 40 with quick)
    device: str = "cpu"  # torch device: cpu, cuda or cuda:N (refused when absent)
    dtype: torch.dtype = torch.float32  # weights and inputs in this dtype: float32, bfloat16 or float16
    seed: int = 0  # seeds the random weights of timm / open_clip and the random reducers
    progress: bool = True  # a progress bar over the work

    def __post_init__(self) -> None:
        if self.batch is None:
            self.batch = 4 if self.quick else 8
        if self.repeats is None:
            self.repeats = 1 if self.quick else 3


@dataclass
class Case:
    """One model of the demo and how to run and judge it."""

    name: str
    family: str
    model: nn.Module
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    output: str  # "logits" (top-1 agreement, KL) or "embedding" (cosine)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    specs: list[str]


@dataclass
class Row:
    model: str
    reducer: str
    token_counts: list[int]
    gflops: float
    flops_ratio: float
    latency_ms: float
    throughput: float
    speedup: float
    top1_agreement: float | None
    kl: float | None
    cosine: float

    def csv_record(self) -> dict[str, str]:
        def number(value: float | None, digits: int) -> str:
            return "" if value is None else f"{value:.{digits}f}"

        return {
            "model": self.model, "reducer": self.reducer,
            "tokens_per_layer": ">".join(map(str, self.token_counts)), "tokens_out": str(self.token_counts[-1]),
            "gflops": number(self.gflops, 4), "flops_ratio": number(self.flops_ratio, 4),
            "latency_ms": number(self.latency_ms, 2), "throughput_img_s": number(self.throughput, 2),
            "speedup": number(self.speedup, 3), "top1_agreement": number(self.top1_agreement, 4),
            "kl": number(self.kl, 6), "cosine": number(self.cosine, 6),
        }


@dataclass
class DemoResult:
    rows: list[Row]
    csv_path: Path | None
    pictures: list[Path] = field(default_factory=list)
    shapes_rows: list = field(default_factory=list)
    shapes_files: list[Path] = field(default_factory=list)  # shapes.csv, shapes.json, pareto.png, per_type.png


# ----- images --------------------------------------------------------------------------------------
def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop to ``size x size`` (uint8 RGB)."""
    picture = Image.fromarray(image).convert("RGB")
    scale = size / min(picture.size)
    width, height = max(size, round(picture.width * scale)), max(size, round(picture.height * scale))
    picture = picture.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(picture.crop((left, top, left + size, top + size)))


def load_samples(count: int, size: int = 224) -> list[np.ndarray]:
    """``count`` (size, size, 3) uint8 images from scikit-image's bundled data; beyond the
    bundled set, mirrored copies are used."""
    from skimage import data

    if count < 1:
        raise ValueError(f"need at least one image, got count={count}")
    base = []
    for name in SAMPLE_IMAGES:
        image = getattr(data, name)()
        base.append(_square(image[0] if isinstance(image, tuple) else image, size))
    return [base[i % len(base)] if (i // len(base)) % 2 == 0 else base[i % len(base)][:, ::-1].copy()
            for i in range(count)]


def to_batch(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) float tensor normalised with the model's mean/std."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----- models --------------------------------------------------------------------------------------
def _pretrained_failure(what: str, error: Exception) -> DemoError:
    return DemoError(
        f"could not load pretrained weights for {what}: {type(error).__name__}: {error}\n"
        f"Weights are fetched from the Hugging Face hub on first use and cached; check the internet "
        f"connection (or the hub cache), or run without --pretrained to use random weights."
    )


def build_timm(quick: bool, pretrained: bool) -> Case:
    import timm

    if quick:
        name, model = "timm vit_tiny_patch16_224 (6 blocks, tiny: --quick)", timm.create_model(
            "vit_tiny_patch16_224", depth=6)
    else:
        name = "timm vit_small_patch16_224"
        try:
            model = timm.create_model("vit_small_patch16_224", pretrained=pretrained)
        except Exception as error:  # hub/network errors come in many types
            raise _pretrained_failure(name, error) from error
    cfg = model.pretrained_cfg
    specs = (QUICK_SPECS if quick else DEFAULT_SPECS)["timm"]
    return Case(name, "timm", model.eval(), lambda m, x: m(x), "logits",
                tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3)), list(specs))


def build_open_clip(quick: bool, pretrained: bool) -> Case:
    import open_clip

    if quick:
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        name = "open_clip ViT (6 blocks, width 192, patch 32, tiny: --quick)"
        vision = CLIPVisionCfg(layers=6, width=192, head_width=64, patch_size=32, image_size=224)
        text = CLIPTextCfg(context_length=8, vocab_size=64, width=64, heads=2, layers=1)
        model = open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text)
    else:
        tag = "laion2b_s34b_b79k" if pretrained else None
        name = "open_clip ViT-B-32" + (f" ({tag})" if tag else "")
        try:
            model = open_clip.create_model("ViT-B-32", pretrained=tag, require_pretrained=pretrained)
        except Exception as error:
            raise _pretrained_failure(name, error) from error
    visual = model.visual
    mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    specs = (QUICK_SPECS if quick else DEFAULT_SPECS)["open_clip"]
    return Case(name, "open_clip", model.eval(), lambda m, x: m.encode_image(x), "embedding", mean, std, list(specs))


def build_cases(options: DemoOptions) -> list[Case]:
    builders = {"timm": build_timm, "open_clip": build_open_clip}
    cases = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        for family in [m for m in options.models if m in builders]:
            case = builders[family](options.quick, options.pretrained)
            try:
                case.model.to(options.device, options.dtype)
            except (RuntimeError, AssertionError, ValueError) as error:  # e.g. cuda asked for, not available
                raise DemoError(f"cannot use device {options.device!r}: {error}") from error
            if options.reducers:
                case.specs = list(options.reducers)
            cases.append(case)
    return cases


def check_specs(cases: Sequence[Case]) -> None:
    """Fail before any timing if a budget does not fit a model (the library's own message)."""
    for case in cases:
        for spec in case.specs:
            try:
                vtc.apply(case.model, spec).remove()
            except (TypeError, ValueError) as error:
                hint = " (choose budgets per model, or limit the run with --models)" if len(cases) > 1 else ""
                raise DemoError(f"reducer {spec!r} cannot run on {case.name}: {error}{hint}") from error


# ----- measuring -----------------------------------------------------------------------------------
def _row(case: Case, spec: str, comparison: Comparison) -> Row:
    fid = comparison.fidelity
    logits = case.output == "logits"
    return Row(case.name, spec, comparison.token_counts, comparison.flops / 1e9, comparison.flops_ratio,
               comparison.latency.median * 1e3, comparison.throughput, comparison.speedup,
               fid.top1_agreement if logits else None, fid.kl if logits else None, fid.cosine)


def _baseline_row(case: Case, comparisons: Sequence[Comparison]) -> Row:
    first = comparisons[0]
    samples = [s for c in comparisons for s in c.latency_reference.samples]
    median = statistics.median(samples)
    n0 = first.token_counts[0]
    logits = case.output == "logits"
    return Row(case.name, "none", [n0] * len(first.token_counts), first.flops_reference / 1e9, 1.0, median * 1e3,
               first.batch_size / median, 1.0, 1.0 if logits else None, 0.0 if logits else None, 1.0)


def compact_counts(counts: Sequence[int], max_runs: int = 5) -> str:
    """``197x4>139x3>98x3>69x3``: runs of equal counts, middle elided when long."""
    runs: list[list[int]] = []
    for count in counts:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    parts = [f"{value}x{times}" if times > 1 else str(value) for value, times in runs]
    if len(parts) > max_runs:
        parts = parts[:2] + ["..."] + parts[-1:]
    return ">".join(parts)


def format_table(rows: Sequence[Row], output: str) -> str:
    """A fixed-width table; fidelity columns depend on the output kind."""
    fidelity_head = "top1   KL" if output == "logits" else "cosine"
    lines = [f"{'reducer':<20} {'tokens per layer':<24} {'GFLOPs':>7} {'FLOPs':>6} {'img/s':>7} {'speedup':>7}  {fidelity_head}"]
    for row in rows:
        if output == "logits":
            fid = f"{row.top1_agreement:.2f}  {max(row.kl, 0.0):.4f}"  # KL can round to -0
        else:
            fid = f"{row.cosine:.4f}"
        lines.append(f"{row.reducer:<20} {compact_counts(row.token_counts):<24} {row.gflops:>7.2f} "
                     f"{row.flops_ratio:>6.2f} {row.throughput:>7.1f} {row.speedup:>6.2f}x  {fid}")
    return "\n".join(lines)


def measure_case(case: Case, batch: torch.Tensor, options: DemoOptions) -> list[Row]:
    comparisons = []
    bar = tqdm(case.specs, desc=case.name.split(" (")[0], unit="budget", disable=not options.progress, leave=False)
    for spec in bar:
        bar.set_postfix_str(spec)
        comparisons.append(compare(case.model, spec, batch, warmup=options.warmup, repeats=options.repeats,
                                   forward=case.forward))
    bar.close()
    return [_baseline_row(case, comparisons)] + [_row(case, s, c) for s, c in zip(case.specs, comparisons)]


def _family_examples(specs: Sequence[str]) -> dict[str, str]:
    """One spec per reducer family: the middle budget of that family's list."""
    by_family: dict[str, list[str]] = {}
    for spec in specs:
        by_family.setdefault(vtc.parse_reducer(spec).name, []).append(spec)
    return {family: group[len(group) // 2] for family, group in by_family.items()}


def draw_case(case: Case, image: np.ndarray, batch: torch.Tensor, out_dir: Path) -> list[Path]:
    """One merge/prune picture per reducer family for the first image."""
    paths = [out_dir / "input.png"]
    Image.fromarray(image).save(paths[0], format="PNG")
    for family, spec in _family_examples(case.specs).items():
        with vtc.apply(case.model, spec) as handle, torch.inference_mode():
            case.forward(case.model, batch[:1])
            state, grid = handle.state, handle.adapter.info.grid
        paths.append(save_groups(out_dir / f"groups_{family}.png", image, state, grid))
    return paths


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    return write_records(path, CSV_COLUMNS, (row.csv_record() for row in rows))


def run_shapes(options: DemoOptions, echo: Callable[[str], None]) -> tuple[list, list[Path]]:
    """The shapes benchmark on the shipped checkpoints chosen in ``options.models``."""
    models = [m for m in options.models if m in SHAPES_MODELS]
    bench_options = bench.BenchmarkOptions(
        examples=options.examples or (500 if options.full else 40 if options.quick else 200),
        budgets=bench.BUDGETS if options.full else SHORT_BUDGETS,
        reducers=() if options.reducers else bench.REDUCERS, extra_specs=list(options.reducers or ()),
        dymu_presets=() if options.reducers else (bench.DYMU_PRESETS if options.full else ("mid",)),
        models=models, timing_batch=options.batch, repeats=options.repeats, progress=options.progress,
        device=options.device, dtype=options.dtype)
    echo(f"vtc demo: shapes benchmark on {', '.join(models)}: the first {bench_options.examples} test examples, "
         f"budgets {'/'.join(map(str, bench_options.budgets))} visual tokens of 256, timing batch {options.batch}, "
         f"{options.repeats} timed repeats interleaved with the unreduced model, {torch.get_num_threads()} CPU threads")
    try:
        rows = bench.run(bench_options)
    except (TypeError, ValueError, FileNotFoundError) as error:
        raise DemoError(f"shapes benchmark: {error}") from error
    echo("accuracy: exact match (VLM) or top-1 (classifier) on the test split; agree: same prediction as the "
         "unreduced model; GFLOPs per image (vision + prefill for the VLM); speedup: timed side by side")
    echo(bench.format_table(rows))
    for budget in [b for b in RANKED_BUDGETS if b in bench_options.budgets]:
        echo(bench.format_rankings(rows, budget))
    for extra in (bench.format_exits(rows), bench.format_oracles(rows)):
        if extra:
            echo("\n" + extra)
    return rows, write_outputs(rows, options.out_dir, bench_options, "vtc demo")


def run(options: DemoOptions, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the shapes benchmark and/or the sample-image comparison, print tables, write CSVs and pictures."""
    unknown = [m for m in options.models if m not in MODELS]
    if unknown or not options.models:
        raise DemoError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    needed = {"matplotlib": any(m in SHAPES_MODELS for m in options.models),  # pareto.png, per_type.png
              "skimage": any(m not in SHAPES_MODELS for m in options.models)}  # the sample pictures
    missing = [name for name, used in needed.items() if used and importlib.util.find_spec(name) is None]
    if missing:
        raise DemoError(f"the demo needs {' and '.join(missing)}, which vtc's demo extra installs: "
                        f"pip install 'vtc-vlm[demo]'")
    if options.pretrained and any(m in SHAPES_MODELS for m in options.models):
        raise DemoError("--pretrained loads hub weights for timm / open_clip; the shapes models are shipped "
                        "trained: pass --models timm,open_clip with --pretrained")
    if options.quick and options.full:
        raise DemoError("--quick and --full ask for opposite sizes; choose one")
    if options.quick and options.pretrained:
        raise DemoError("--quick uses tiny models that have no pretrained weights; drop one of --quick/--pretrained")
    if options.batch < 1 or options.repeats < 1 or options.warmup < 0:
        raise DemoError("batch and repeats must be >= 1 and warmup >= 0")
    result = DemoResult([], None)
    if any(m in SHAPES_MODELS for m in options.models):
        options.out_dir.mkdir(parents=True, exist_ok=True)
        result.shapes_rows, result.shapes_files = run_shapes(options, echo)
        echo("\n" + "\n".join(f"wrote {path}" for path in result.shapes_files))
    if any(m in SAMPLE_MODELS for m in options.models):
        result.rows, result.csv_path, result.pictures = run_samples(options, echo)
    return result


def run_samples(options: DemoOptions, echo: Callable[[str], None]) -> tuple[list[Row], Path, list[Path]]:
    """Reducers side by side on a timm and/or open_clip ViT over scikit-image samples."""
    cases = build_cases(options)
    check_specs(cases)
    images = load_samples(options.batch)
    echo(f"vtc demo: {len(images)} scikit-image sample images at 224x224, batch {len(images)}, "
         f"{options.repeats} timed repeats (interleaved with the unreduced model), device {options.device}, "
         f"{torch.get_num_threads()} CPU threads")
    if options.pretrained:
        echo("weights: pretrained")
    else:
        echo("weights: RANDOM (no --pretrained): fidelity shows the mechanics only, not accuracy on real weights")
    echo("GFLOPs: analytic, per image, 2 per multiply-add; speedup: against the unreduced model timed in the same "
         "interleaved loop (the 'none' row's img/s is the median over all those loops)")
    if options.quick:
        echo("--quick: tiny models (not the real ViT-S/16 and ViT-B/32), one budget per reducer, timing is rough")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    pictures: list[Path] = []
    for index, case in enumerate(cases):
        batch = to_batch(images, case.mean, case.std).to(options.device, options.dtype)
        case_rows = measure_case(case, batch, options)
        rows += case_rows
        echo(f"\n{case.name}")
        echo(format_table(case_rows, case.output))
        if index == 0:
            pictures = draw_case(case, images[0], batch, options.out_dir)
    csv_path = write_csv(rows, options.out_dir / "results.csv")
    echo(f"\nwrote {csv_path}")
    for path in pictures:
        echo(f"wrote {path}")
    return rows, csv_path, pictures
