"""Properties every adapted family must have (open_clip and HF towers; timm is in test_apply.py):
zero budgets and no-op pooling are bit-identical, remove() restores, a batch equals single runs,
fp16/bf16 give no NaN, token counts follow the plan, and merging exact duplicates is lossless.
Models come from families.py."""

from __future__ import annotations

import families as fam  # tests/ is on pytest's pythonpath (pyproject.toml)
import pytest
import torch

FAMILIES = [fam.FAMILIES[name] for name in (*fam.OPEN_CLIP, *fam.HF)]
CASES = [pytest.param(f, spec, id=f"{f.name}-{spec}") for f in FAMILIES for spec in fam.reducers_for(f)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fam.ModelCache(tmp_path_factory)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
@pytest.mark.parametrize("spec", [*fam.IDENTITY_SPECS, "pool:kernel=1", "pool:tokens=64"])
def test_zero_budget_is_bit_identical(models, family, spec):
    if spec.startswith("evit") and not family.has_cls:
        pytest.skip("EViT needs a CLS token")
    fam.check_identity(models.get(family.name), family, spec)


@pytest.mark.parametrize("family, spec", CASES)
def test_remove_restores_bit_identical(models, family, spec):
    fam.check_remove_restores(models.get(family.name), family, spec)


@pytest.mark.parametrize("family, spec", CASES)
def test_batch_equals_single_runs(models, family, spec):
    fam.check_batch_equals_singles(models.get(family.name), family, spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family, spec", CASES)
def test_low_precision_runs_without_nan(models, family, spec, dtype):
    fam.check_low_precision(models.fresh(family.name), family, spec, dtype)


@pytest.mark.parametrize("family, spec", CASES)
def test_token_counts_follow_the_plan(models, family, spec):
    fam.check_token_counts(models.get(family.name), family, spec)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_merging_exact_duplicates_is_lossless(models, family):
    """ToMe f.7 through every pooling: CLS, size-weighted average, the attentional pooler's and
    SigLIP's head's log(size) key bias."""
    diff, reference = fam.check_exactness(models, family, prop_attn=True)
    assert diff < 1e-7 * max(1.0, reference.abs().max().item())
    diff, _ = fam.check_exactness(models, family, prop_attn=False)
    assert diff > 1e-4, "without proportional attention the merged duplicates must be under-weighted"
