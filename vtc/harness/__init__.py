"""Accuracy harnesses for vision transformers on folders of images (``DIR/<class>/<images>``):
top-1 of a classifier (timm) and zero-shot classification by a CLIP-style model (open_clip, HF
CLIP / SigLIP), unreduced and under each reducer spec side by side in one run: accuracy with its
95% Wilson interval, agreement with the unreduced predictions, visual tokens, analytic FLOPs and
throughput timed in one interleaved loop with the unreduced model.

    rows = folder_classification(model, "imagenet/val", ["tome:r=13"], transform=transform)
    rows = zero_shot_classification(model, tokenizer, "photos", ["cat", "dog"], ["tome:r=4"], transform=preprocess)
    write_results("outputs/eval", rows, {"model": "timm:vit_base_patch16_224"})

Modules: ``folders`` (scanning), ``labels`` (class indices), ``prompts`` (class names, templates),
``images`` (batches of pixels), ``side_by_side`` (the shared loop), ``classification`` and
``zero_shot`` (the harnesses), ``rows`` and ``results`` (rows, table, CSV + JSON).
"""

from vtc.harness.classification import folder_classification, model_classes
from vtc.harness.errors import HarnessError
from vtc.harness.folders import IMAGE_SUFFIXES, ClassFolders, scan_folder
from vtc.harness.labels import class_indices, read_class_index
from vtc.harness.prompts import DEFAULT_TEMPLATES, check_templates, match_class_names, read_class_names, read_templates
from vtc.harness.results import write_results
from vtc.harness.rows import UNREDUCED, HarnessRow, format_table
from vtc.harness.side_by_side import HarnessConfig, check_specs
from vtc.harness.zero_shot import class_embeddings, text_encoder, zero_shot_classification

__all__ = ["DEFAULT_TEMPLATES", "IMAGE_SUFFIXES", "UNREDUCED", "ClassFolders", "HarnessConfig", "HarnessError", "HarnessRow",
           "check_specs", "check_templates", "class_embeddings", "class_indices", "folder_classification", "format_table",
           "match_class_names", "model_classes", "read_class_index", "read_class_names", "read_templates", "scan_folder",
           "text_encoder", "write_results", "zero_shot_classification"]
