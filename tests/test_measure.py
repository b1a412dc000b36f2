"""vtc.measure: analytic FLOPs against torch.utils.flop_counter, fidelity, timing and compare().

FLOPs are counted with autograd enabled (no ``torch.no_grad``): in eval mode under no_grad,
batch-first ``nn.MultiheadAttention`` (open_clip's blocks) takes a fused fast path
(``torch._native_multi_head_attention``) that ``torch.utils.flop_counter`` does not see, so the
counter would miss the unreduced blocks' attention. With autograd on, MHA runs its ordinary
linear + SDPA path, which the counter (with vtc's CPU SDPA mapping) counts.
"""

from __future__ import annotations

import math
from pathlib import Path

import families as fam  # tests/ is on pytest's pythonpath (pyproject.toml)
import pytest
import torch

import vtc
from vtc.flops import counted_flops
from vtc.measure import Comparison, Fidelity, analytic_flops, compare, fidelity, latency, time_calls

TIMM_KWARGS = dict(img_size=fam.IMAGE, patch_size=fam.PATCH, embed_dim=fam.WIDTH, depth=fam.LAYERS,
                   num_heads=fam.HEADS, num_classes=10)


def timm_vit(directory: Path):
    """A tiny timm ViT loaded through ``create_model(pretrained=True)`` from a local safetensors file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS)
    path = directory / "model.safetensors"
    save_file(source.state_dict(), str(path))
    overlay = dict(file=str(path), num_classes=10)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **TIMM_KWARGS)
    saved = source.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fam.ModelCache(tmp_path_factory)


@pytest.fixture(scope="module")
def timm_model(tmp_path_factory):
    return timm_vit(tmp_path_factory.mktemp("timm"))


def _family_model(name, models, timm_model):
    if name == "timm":
        return timm_model, (lambda m, x: m(x)), True
    family = fam.FAMILIES[name]
    return models.get(name), family.forward, family.has_cls


FLOP_NAMES = ["open_clip", "open_clip-lnd", "open_clip-avg", "open_clip-attnpool", "hf-clip-vision",
              "hf-clip-model", "hf-siglip-vision", "timm"]
SPECS = (None, "tome:r=0", *fam.REDUCERS, "tome:r=12,schedule=linear", "evit:keep=0.7,fuse=false")
FLOP_CASES = [
    pytest.param(name, spec, id=f"{name}-{spec}")
    for name in FLOP_NAMES for spec in SPECS
    if not (name == "hf-siglip-vision" and spec and spec.startswith("evit"))
]


def _flops(model, forward, spec, batch):
    """(counted for ``batch`` images with autograd on, analytic per image from the measured counts)."""
    x = fam.images(batch, seed=batch)
    handle = vtc.apply(model, *([spec] if spec else []))
    try:
        counted = counted_flops(lambda: forward(model, x))
        report = analytic_flops(handle.adapter, handle.token_counts)
        planned = analytic_flops(handle.adapter)
    finally:
        handle.remove()
    return counted, report, planned


@pytest.mark.parametrize("name, spec", FLOP_CASES)
def test_analytic_flops_equal_flop_counter(models, timm_model, name, spec):
    model, forward, _ = _family_model(name, models, timm_model)
    assert torch.is_grad_enabled()  # see the module docstring
    counted, report, planned = _flops(model, forward, spec, batch=1)
    assert counted == report.total
    assert report.total == report.stem + sum(report.blocks) + report.head
    assert report.total == planned.total and report.token_counts == planned.token_counts
    counted_2, report_2, _ = _flops(model, forward, spec, batch=2)
    assert report_2.total == report.total  # analytic is per image
    assert counted_2 == 2 * report.total


@pytest.mark.parametrize("name", ["open_clip", "hf-clip-vision", "hf-siglip-vision", "timm"])
def test_reductions_cost_fewer_flops(models, timm_model, name):
    model, _, has_cls = _family_model(name, models, timm_model)
    with vtc.apply(model) as plain:
        full = analytic_flops(plain.adapter)
    assert full.blocks == [full.blocks[0]] * fam.LAYERS
    for spec in fam.reducers_for(fam.FAMILIES["hf-clip-vision" if has_cls else "hf-siglip-vision"]):
        with vtc.apply(model, spec) as handle:
            report = analytic_flops(handle.adapter)
        assert report.total < full.total, spec
        assert report.stem == full.stem
        assert all(a >= b for a, b in zip(report.blocks[1:], report.blocks[2:])), spec


def test_analytic_flops_rejects_wrong_count_length(models):
    with vtc.apply(models.get("open_clip"), "tome:r=8") as handle:
        with pytest.raises(ValueError, match="token_counts needs 5 entries"):
            analytic_flops(handle.adapter, [65, 57, 49])


def test_analytic_flops_hand_computed_for_open_clip(models):
    """One block of the unreduced tiny open_clip tower, counted by hand."""
    n, c, hidden = 65, fam.WIDTH, 4 * fam.WIDTH
    with vtc.apply(models.get("open_clip")) as handle:
        report = analytic_flops(handle.adapter)
    attention = 2 * n * (3 * c * c + c * c) + 4 * n * n * c  # qkv + out projections, QK^T and PV
    mlp = 2 * n * (c * hidden + hidden * c)
    assert report.blocks == [attention + mlp] * fam.LAYERS
    assert report.stem == 2 * 64 * (c * 3 * fam.PATCH * fam.PATCH)
    assert report.head == 2 * c * fam.EMBED  # CLS pooling then the projection


def test_clip_model_analytic_flops_cover_get_image_features(models):
    model = models.get("hf-clip-model")
    counted, report, _ = _flops(model, fam.FAMILIES["hf-clip-model"].forward, "tome:r=8", batch=1)
    assert counted == report.total


# ----- fidelity ----------------------------------------------------------------------------------
def test_fidelity_of_identical_outputs():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    result = fidelity(logits, logits.clone())
    assert isinstance(result, Fidelity)
    assert result.top1_agreement == 1.0
    assert result.kl == pytest.approx(0.0, abs=1e-7)
    assert result.cosine == pytest.approx(1.0, abs=1e-6)


def test_fidelity_hand_computed():
    reference = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    reduced = torch.tensor([[0.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
    result = fidelity(reference, reduced)
    assert result.top1_agreement == 0.5
    # row 1: log p - log q = (2, -2, 0) with p = softmax(2, 0, 0): KL = 2 (e^2 - 1) / (e^2 + 2); row 2: 0
    e2 = math.exp(2.0)
    assert result.kl == pytest.approx((2 * (e2 - 1) / (e2 + 2)) / 2, rel=1e-5)
    assert result.cosine == pytest.approx(0.5, abs=1e-6)  # cos 0 for row 1, 1 for row 2


def test_fidelity_flattens_and_checks_shapes():
    a = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    assert fidelity(a, a).cosine == pytest.approx(1.0, abs=1e-6)
    assert fidelity(a, -a).cosine == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        fidelity(a, a[:, :2])


# ----- timing and compare ------------------------------------------------------------------------
def test_time_calls_returns_positive_medians():
    calls = []
    timings = time_calls([lambda: calls.append(1), lambda: calls.append(2)], warmup=1, repeats=3)
    assert len(timings) == 2 and calls.count(1) == calls.count(2) == 4
    for timing in timings:
        assert len(timing.samples) == 3 and timing.median > 0
    assert latency(lambda: torch.zeros(3), warmup=0, repeats=2).median > 0


def test_compare_on_timm(timm_model):
    x = fam.images(2, seed=8)
    with torch.no_grad():
        reference = timm_model(x)
    result = compare(timm_model, "tome:r=8", x, warmup=1, repeats=2)
    assert isinstance(result, Comparison)
    assert result.reducer == "tome:r=8" and result.batch_size == 2
    assert result.token_counts == [65, 57, 49, 41, 33]
    assert result.flops < result.flops_reference and 0 < result.flops_ratio < 1
    with vtc.apply(timm_model, "tome:r=8") as handle:
        assert result.flops == analytic_flops(handle.adapter).total
    assert 0.0 <= result.fidelity.top1_agreement <= 1.0
    assert result.fidelity.kl >= 0.0
    assert -1.0 <= result.fidelity.cosine <= 1.0 + 1e-6
    assert result.latency.median > 0 and result.latency_reference.median > 0
    assert result.speedup > 0 and result.throughput > 0
    assert fam.no_instance_patches(timm_model) == []  # compare() removed its reducer
    with torch.no_grad():
        assert torch.equal(timm_model(x), reference)


def test_compare_identity_budget_is_perfect_fidelity(timm_model):
    result = compare(timm_model, "tome:r=0", fam.images(2, seed=9), warmup=0, repeats=1)
    assert result.flops == result.flops_reference
    assert result.fidelity.top1_agreement == 1.0
    assert result.fidelity.kl == pytest.approx(0.0, abs=1e-7)
    assert result.fidelity.cosine == pytest.approx(1.0, abs=1e-6)


def test_compare_with_custom_forward_on_open_clip(models):
    model = models.get("open_clip-avg")
    result = compare(model, "pool:kernel=2", fam.images(2, seed=10), warmup=0, repeats=1,
                     forward=lambda m, x: m.encode_image(x))
    assert result.token_counts == [65, 17, 17, 17, 17]
    assert 0 < result.flops_ratio < 1
    assert 0.0 < result.fidelity.cosine <= 1.0 + 1e-6
    assert fam.no_instance_patches(model) == []
