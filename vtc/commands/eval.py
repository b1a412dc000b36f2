"""``vtc eval``: the shapes benchmark on the shipped checkpoints (:mod:`vtc.shapes_benchmark`), with
``--cards`` a check of their cards against a fresh evaluation, or with ``--folder`` the accuracy
harnesses on a folder of class folders (:mod:`vtc.harness`): top-1 of a classifier, or zero-shot
classification by a CLIP-style model, unreduced and under each ``--reducer`` side by side."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import vtc
from vtc import harness
from vtc.commands.common import DEVICE_FLAGS, positive_int, prepare_output, reducer_spec
from vtc.commands.models import FORMS, ModelSpecError, load_model
from vtc.commands.options import Flag, add_options, from_options
from vtc.data import shapes
from vtc.data.evaluate import classifier_scores, vlm_scores
from vtc.harness import HarnessConfig
from vtc.models import zoo
from vtc.shapes_benchmark import (
    DYMU_PRESETS,
    REDUCERS,
    BenchmarkOptions,
    format_exits,
    format_oracles,
    format_table,
    run,
)
from vtc.shapes_plots import write_outputs

DESCRIPTION = """\
Accuracy of reducers beside the unreduced model: the shapes benchmark (default) or, with --folder,
your own class folders.

Shapes benchmark (without --folder): every reducer at budgets of 256/128/64/32/16/4/1 visual tokens
on the shipped shapes checkpoints (a budget a reducer cannot reach is skipped and listed). For each
model (shapes-vit, shapes-llava), reducer (tome, evit, random, pool; on the LLaVA also holov, and
the trained m3 and mqt, run on their own checkpoints shapes-llava-m3 / shapes-llava-mqt, with
M3's oracle) and budget, and DyMU at its shipped presets (with and without virtual unmerging on
LLaVA): test accuracy overall and per question type with 95% intervals,
agreement with the unreduced model's predictions, FLOPs per image and latency measured side by
side with the unreduced model. Writes shapes.csv, shapes.json (the rows with the options, checkpoint
folders, versions and machine), pareto.png (accuracy against visual tokens and against FLOPs) and
per_type.png (accuracy per question type with 95% intervals at each budget) under --out. With
--cards it instead evaluates each model unreduced on the whole test split and compares the result
with its shipped card.json (overall and per-type accuracy, and the subset's predictions example by
example); --write-cards rewrites the cards from that evaluation.

Folder harness (--folder DIR --model MODEL): images in DIR/<class>/<image files> (ImageNet's and
torchvision ImageFolder's layout).
  - a classifier (timm): a folder's class index is its position among the sorted class folders
    (ImageNet's sorted wnids are its 1000 classes), so DIR needs one folder per class of the model,
    or --class-index FILE (JSON folder -> class index) for a subset; images are preprocessed with
    the model's own transform.
  - a CLIP-style model (open_clip, HF CLIP / SigLIP): zero-shot classification with --class-names
    (one per line in sorted folder order, or JSON folder -> name) and prompt templates (--template,
    --templates; default "a photo of a {}."), each class's prompt embeddings averaged as in CLIP;
    text embeddings are computed once.
For the unreduced model and each --reducer: top-1 with its 95% Wilson interval, agreement with the
unreduced predictions, visual tokens leaving the encoder (prefix tokens not counted), analytic
GFLOPs per image and FLOPs ratio, and images/s on the first batch timed in one interleaved loop
with an unreduced copy of the model. Writes accuracy.csv and accuracy.json (spec strings, model,
versions, options) under --out.

examples:
  vtc eval --examples 1000 --out outputs/shapes
  vtc eval --models shapes-llava --reducers holov pool --budgets 128 64
  vtc eval --models shapes-llava --spec "tome:r=16" --spec "holov:k=64"
  vtc eval --cards                              # reproduce the shipped cards
  vtc eval --model timm:vit_base_patch16_224 --pretrained --folder imagenet/val --reducer tome:r=13 --reducer evit:keep=0.7
  vtc eval --model timm:vit_base_patch16_224 --pretrained --folder imagenet-10/ --class-index imagenet-10.json --reducer tome:r=13
  vtc eval --model open_clip:ViT-B-32@laion2b_s34b_b79k --pretrained --folder photos/ --class-names names.txt --reducer tome:r=4
  vtc eval --model hf:openai/clip-vit-base-patch32 --pretrained --folder photos/ --class-names names.json --templates templates.txt \\
           --reducer tome:r=4 --batch-size 64 --device cuda --dtype bfloat16
"""

# options of one mode (dest -> flag); they default to None so that giving them in the other mode is caught
SHAPES_ONLY = {"models": "--models", "reducers": "--reducers", "budgets": "--budgets", "dymu_presets": "--dymu-presets",
               "extra_specs": "--spec", "examples": "--examples", "timing_batch": "--timing-batch", "cards": "--cards",
               "write_cards": "--write-cards", "export_lmms": "--export-lmms"}
FOLDER_ONLY = {"model": "--model", "pretrained": "--pretrained", "reducer": "--reducer", "class_index": "--class-index",
               "class_names": "--class-names", "template": "--template", "templates": "--templates"}
SHAPES_OUT, FOLDER_OUT = Path("outputs/shapes"), Path("outputs/eval")
# How the fields of BenchmarkOptions appear as options (names, help and defaults come from the dataclass).
SHAPES_FLAGS = {
    "models": Flag(metavar="NAME", example=f"--models shapes-llava outputs/shapes-llava-r5 (shipped: {', '.join(zoo.names())})"),
    "reducers": Flag(choices=REDUCERS, metavar="NAME", empty=True,
                     example="--reducers tome pool (holov, m3 and mqt act only at the LLaVA connector, exit and dyvte "
                             "inside its LLM; none given: only --spec and DyMU)"),
    "budgets": Flag(type=positive_int, metavar="N", example="--budgets 64 16"),
    "dymu_presets": Flag(choices=DYMU_PRESETS, metavar="P", empty=True, example="--dymu-presets mid"),
    "extra_specs": Flag(name="--spec", type=reducer_spec, repeat=True, metavar="SPEC",
                        example="--spec tome:r=16 --spec holov:k=64 (repeatable)"),
    "examples": Flag(type=positive_int, metavar="N", example="--examples 200"),
    "timing_batch": Flag(type=positive_int, metavar="N", example="--timing-batch 32"),
}
SHARED_FLAGS = {
    **DEVICE_FLAGS,
    "progress": Flag(example="--no-progress for a log file"),
    "batch_size": Flag(type=positive_int, metavar="N",
                       help=f"examples (shapes) or images (--folder) per forward (default: "
                            f"{BenchmarkOptions.batch_size} for the shapes benchmark, {HarnessConfig.batch_size} with --folder, whose "
                            "first batch is also the timed one)",
                       example="--batch-size 128"),
    "repeats": Flag(type=positive_int, metavar="N",
                    help=f"timed repeats per configuration, interleaved with the unreduced model (default: "
                         f"{BenchmarkOptions.repeats} for the shapes benchmark, {HarnessConfig.repeats} with --folder)",
                    example="--repeats 30"),
}


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("eval", help="accuracy, agreement, FLOPs and speed of reducers: the shapes models, or "
                                              "a folder of class folders (--folder)",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help=f"folder for the results: shapes.csv, shapes.json, pareto.png and per_type.png (default "
                             f"{SHAPES_OUT}), or with --folder accuracy.csv and accuracy.json (default {FOLDER_OUT}); a "
                             "non-empty one gets a new run-<timestamp> subfolder unless --overwrite, e.g. --out outputs/imagenet-tome")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing its files, e.g. --out outputs/eval --overwrite")
    shared = parser.add_argument_group("both modes")
    add_options(shared, BenchmarkOptions, SHARED_FLAGS, only=("device", "dtype", "progress"))
    add_options(shared, BenchmarkOptions, SHARED_FLAGS, only=("batch_size", "repeats"), unset=True)
    shapes_group = parser.add_argument_group("shapes benchmark (without --folder)")
    add_options(shapes_group, BenchmarkOptions, SHAPES_FLAGS, only=SHAPES_FLAGS, unset=True)
    _add_shapes_actions(shapes_group)
    _add_folder_options(parser.add_argument_group("folder harness (--folder)"))
    parser.set_defaults(handler=run_eval)
    return parser


def _add_shapes_actions(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--export-lmms", type=Path, metavar="DIR",
                       help="write the first --examples test examples as the lmms-eval task vtc_shapes under DIR and exit; "
                            "then: lmms-eval --model vtc --model_args pretrained=shapes-llava,reducers=pool:tokens=64 "
                            "--tasks vtc_shapes --include_path DIR (pip install 'vtc-vlm[lmms]'), "
                            "e.g. --export-lmms shapes-task --examples 500")
    checks = group.add_mutually_exclusive_group()
    checks.add_argument("--cards", action="store_true", default=None,
                        help="check the shipped cards against a fresh evaluation (exit 1 if they differ), e.g. vtc eval --cards")
    checks.add_argument("--write-cards", action="store_true", default=None,
                        help="rewrite the shipped cards from a fresh evaluation, e.g. vtc eval --write-cards")


def _add_folder_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--folder", type=Path, metavar="DIR",
                       help="images in DIR/<class>/<image files> (switches to the folder harness), e.g. --folder imagenet/val")
    group.add_argument("--model", metavar="MODEL",
                       help=f"the model: {FORMS}; a timm classifier or a CLIP-style model (open_clip, HF CLIP / "
                            "SigLIP), e.g. --model timm:vit_base_patch16_224")
    group.add_argument("--pretrained", action="store_true", default=None,
                       help="load hub weights (needs internet once); without it timm and open_clip models get random "
                            "weights, e.g. --model open_clip:ViT-B-32@laion2b_s34b_b79k --pretrained")
    group.add_argument("--reducer", action="append", type=reducer_spec, metavar="SPEC",
                       help="a reducer spec evaluated beside the unreduced model (repeatable; the spec string is "
                            "recorded as given), e.g. --reducer tome:r=13 --reducer evit:keep=0.7")
    group.add_argument("--class-index", type=Path, metavar="FILE",
                       help="classifiers: a JSON object mapping each class folder to the model's class index, for a "
                            'subset of its classes, e.g. --class-index subset.json holding {"n01440764": 0, "n01530575": 10}')
    group.add_argument("--class-names", type=Path, metavar="FILE",
                       help="zero-shot (needed there): class names, one per line in sorted folder order, or a .json "
                            "object folder -> name, e.g. --class-names names.txt")
    prompts = group.add_mutually_exclusive_group()
    prompts.add_argument("--template", action="append", metavar="TEXT",
                         help=f"zero-shot: a prompt template, {{}} standing for the class name (repeatable; default "
                              f"{harness.DEFAULT_TEMPLATES[0]!r}), e.g. --template 'a photo of a {{}}.' --template 'a sketch of a {{}}.'")
    prompts.add_argument("--templates", type=Path, metavar="FILE",
                         help="zero-shot: prompt templates, one per line with {} for the class name; each class's "
                              "prompt embeddings are averaged, e.g. --templates imagenet-templates.txt")


def _refuse_others(parser: argparse.ArgumentParser, args: argparse.Namespace, others: dict[str, str], why: str) -> None:
    given = [flag for dest, flag in others.items() if getattr(args, dest) is not None]
    if given:
        parser.error(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} {why}")


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.folder is not None:
        _refuse_others(parser, args, SHAPES_ONLY, "only to the shapes benchmark, not with --folder")
        return run_folder(args, parser)
    _refuse_others(parser, args, FOLDER_ONLY, "only with --folder DIR (the folder harness); without --folder vtc eval "
                                              "runs the shapes benchmark (its models: --models)")
    options = from_options(BenchmarkOptions, args)
    if args.export_lmms is not None:
        from vtc.lmms import export_lmms

        try:
            path = export_lmms(args.export_lmms, examples=options.examples, overwrite=args.overwrite)
        except (ImportError, FileExistsError, ValueError) as error:
            parser.error(str(error))
        print(f"wrote {path}")
        return 0
    if args.cards or args.write_cards:
        return 0 if all([check_card(name, bool(args.write_cards), options.device) for name in options.models]) else 1
    out = prepare_output(parser, args.out or SHAPES_OUT, args.overwrite)
    try:
        rows = run(options)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_table(rows))
    for extra in (format_exits(rows), format_oracles(rows)):
        if extra:
            print("\n" + extra)
    print("\n" + "\n".join(f"wrote {path}" for path in write_outputs(rows, out, options, "vtc eval")))
    return 0


def _tokenizer(spec: str):
    """The text tokenizer of a CLIP-style model named ``open_clip:<name>[@tag]`` or ``hf:<id>``."""
    kind, _, name = spec.partition(":")
    if kind == "open_clip":
        import open_clip

        return open_clip.get_tokenizer(name.partition("@")[0])
    import transformers

    return transformers.AutoTokenizer.from_pretrained(name)


def _load_folder_model(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The --model on --device / --dtype, and whether it is CLIP-style (zero-shot); the options of
    the other kind are refused."""
    try:
        loaded = load_model(args.model, bool(args.pretrained))
    except ModelSpecError as error:
        parser.error(str(error))
    if loaded.processor is not None:
        parser.error(f"--model {args.model} is a vision-language model; --folder evaluates classifiers (timm) and "
                     "CLIP-style models (open_clip, HF CLIP / SigLIP)")
    loaded.model.to(args.device, args.dtype)
    zero_shot = hasattr(loaded.model, "encode_text") or hasattr(loaded.model, "get_text_features")
    if zero_shot:
        _refuse_others(parser, args, {"class_index": "--class-index"},
                       f"only to classifiers; {args.model} is a CLIP-style model (zero-shot: --class-names, --template)")
        if args.class_names is None:
            parser.error(f"--model {args.model} is a CLIP-style model: zero-shot classification needs --class-names FILE "
                         "(one name per class folder, in sorted order, or a .json object folder -> name)")
    else:
        _refuse_others(parser, args, {"class_names": "--class-names", "template": "--template", "templates": "--templates"},
                       f"only to CLIP-style models (zero-shot); {args.model} is a classifier (a subset of its classes: "
                       "--class-index)")
    return loaded, zero_shot


def _folder_task(args: argparse.Namespace, loaded, zero_shot: bool, scan: harness.ClassFolders,
                 config: harness.HarnessConfig, setup: dict):
    """The evaluation to run, every input checked (HarnessError otherwise); ``setup`` gains the task,
    the class mapping or names and the templates."""
    specs = args.reducer or []
    harness.check_specs(loaded.model, specs)
    if zero_shot:
        names = harness.match_class_names(scan.classes, harness.read_class_names(args.class_names))
        templates = (harness.read_templates(args.templates) if args.templates
                     else harness.check_templates(args.template or harness.DEFAULT_TEMPLATES))
        setup.update(task="zero-shot", class_names=dict(zip(scan.classes, names)), templates=list(templates))
        return partial(harness.zero_shot_classification, loaded.model, _tokenizer(args.model), scan, names, specs,
                       transform=loaded.preprocess, templates=templates, config=config)
    mapping = harness.read_class_index(args.class_index) if args.class_index else None
    labels = harness.class_indices(scan.classes, harness.model_classes(loaded.model), mapping)
    setup.update(task="classification", class_index=dict(zip(scan.classes, labels)))
    return partial(harness.folder_classification, loaded.model, scan, specs, transform=loaded.preprocess,
                   class_index=mapping, config=config)


def run_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The folder harness: every check (folder, model, class mapping or names, templates, specs)
    before --out is created, then the evaluation, the table, accuracy.csv and accuracy.json."""
    if args.model is None:
        parser.error(f"--folder needs --model, the model to evaluate ({FORMS}), e.g. --model timm:vit_base_patch16_224")
    try:
        scan = harness.scan_folder(args.folder)
    except harness.HarnessError as error:
        parser.error(str(error))
    loaded, zero_shot = _load_folder_model(args, parser)
    config = from_options(HarnessConfig, args)
    setup = {"command": "vtc eval --folder", "model": args.model, "pretrained": bool(args.pretrained),
             "folder": str(args.folder), "classes": len(scan.classes), "images": scan.images, "specs": args.reducer or [],
             "batch_size": config.batch_size, "repeats": config.repeats, "warmup": config.warmup, "device": args.device,
             "dtype": str(args.dtype).removeprefix("torch.")}
    try:
        evaluate = _folder_task(args, loaded, zero_shot, scan, config, setup)
        out = prepare_output(parser, args.out or FOLDER_OUT, args.overwrite)
        rows = evaluate()
    except harness.HarnessError as error:
        parser.error(str(error))
    print(harness.format_table(rows))
    paths = harness.write_results(out, rows, setup, overwrite=args.overwrite)
    print("\n" + "\n".join(f"wrote {path}" for path in paths))
    return 0


def check_card(name: str, write: bool, device: str = "cpu") -> bool:
    """Evaluate ``name`` on the whole test split (unreduced, or with the reducer its card names:
    a trained method's checkpoint); print it beside its card (or write the card); True when they
    agree to the example."""
    ckpt = zoo.load(name, device)
    examples = shapes.examples("test", shapes.SPLITS["test"][1])
    with vtc.apply(ckpt.model, *([ckpt.card["spec"]] if ckpt.card.get("spec") else [])):  # a trained method's own reducer
        scores = (vlm_scores(ckpt.model, ckpt.processor, examples, batch_size=100) if ckpt.kind == "llava"
                  else classifier_scores(ckpt.model, examples))
    if write:
        card = zoo.write_card(ckpt.path, scores, **{k: ckpt.card[k] for k in ("spec", "budgets") if k in ckpt.card})
        print(f"{name}: wrote {ckpt.path / zoo.CARD}: {json.dumps(card['test_by_type'])}")
        return True
    fresh = {"test_accuracy": round(scores.accuracy, 4), "test_by_type": {k: round(v, 4) for k, v in scores.by_type().items()},
             "subset_predictions": scores.predicted[:zoo.SUBSET]}
    differing = [key for key, value in fresh.items() if ckpt.card.get(key) != value]
    print(f"{name}: test accuracy {fresh['test_accuracy']} (card {ckpt.card.get('test_accuracy')}), by type "
          f"{json.dumps(fresh['test_by_type'])}: " + (f"DIFFERS in {', '.join(differing)}" if differing else "matches the card"))
    return not differing
