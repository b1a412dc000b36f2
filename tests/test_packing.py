"""Packed execution of batches whose images keep different token counts (vtc.models.packing):
the same outputs as the padded batch and as single runs, on every encoder family, the LLaVA tower,
with each attention backend."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path
from unittest import mock

import families as fam
import llava_models as lm
import pytest
import tolerance
import torch
import torch.nn.functional as F

import vtc
from vtc.models.attention import attend
from vtc.models.packing import Packing, segment_softmax, varlen_attention
from vtc.sites import Signal

PACKED = ("split", "nested")
FAMILIES = [fam.FAMILIES[name] for name in ("open_clip", "open_clip-lnd", "open_clip-attnpool", "hf-clip-vision",
                                             "hf-siglip-vision")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fam.ModelCache(tmp_path_factory)


def _padded(packed: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H, T, d) packed heads -> (B, H, N, d) padded and the (B, N) valid mask."""
    width = max(lengths)
    out = packed.new_zeros(len(lengths), packed.shape[1], width, packed.shape[3])
    valid = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, part in enumerate(packed.split(lengths, dim=2)):
        out[b, :, :lengths[b]] = part[0]
        valid[b, :lengths[b]] = True
    return out, valid


@pytest.mark.parametrize("backend", PACKED)
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "key bias"])
def test_varlen_attention_equals_masked_padded_sdpa(backend, biased):
    lengths, heads, dim = [17, 1, 5, 30], 2, 16
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, sum(lengths), dim, generator=generator) for _ in range(3))
    valid = _padded(q, lengths)[1]
    bias = torch.rand(valid.shape, generator=generator).add(0.5).log() if biased else torch.zeros(valid.shape)
    packing = Packing.of(valid, bias if biased else None, backend=backend)
    out = varlen_attention(q, k, v, packing, scale=0.3)
    mask = bias.masked_fill(~valid, float("-inf"))[:, None, None, :]
    reference = F.scaled_dot_product_attention(*(_padded(t, lengths)[0] for t in (q, k, v)), attn_mask=mask, scale=0.3)
    expected = torch.cat([reference[b, :, :n] for b, n in enumerate(lengths)], dim=1)[None]
    # logits: d products (+ the folded bias); outputs: softmax-weighted sums over the longest image
    tolerance.assert_close(out, expected, terms=dim + 1 + max(lengths))


def test_pack_and_unpack_follow_the_valid_mask():
    valid = torch.tensor([[True, False, True, True], [False, True, False, False]])
    x = torch.arange(8.0).reshape(2, 4, 1)
    packing = Packing.of(valid)
    assert packing.lengths == (3, 1)
    assert packing.pack(x)[0, :, 0].tolist() == [0.0, 2.0, 3.0, 5.0]
    assert packing.unpack(packing.pack(x))[:, :, 0].tolist() == [[0.0, 0.0, 2.0, 3.0], [0.0, 5.0, 0.0, 0.0]]
    assert packing.segments(x.device).tolist() == [0, 0, 0, 1] and packing.starts(x.device).tolist() == [0, 3]


def test_packing_refuses_an_empty_image_and_unknown_backends():
    with pytest.raises(ValueError, match="no real token"):
        Packing.of(torch.tensor([[True, True], [False, False]]))
    with pytest.raises(ValueError, match="auto, split, nested"):
        Packing.of(torch.ones(1, 2, dtype=torch.bool), backend="flash")


def test_segment_softmax_is_a_softmax_per_segment():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    expected = torch.cat([part.softmax(dim=-1) for part in logits.split([2, 3, 2], dim=-1)], dim=-1)
    tolerance.assert_close(segment_softmax(logits, segments, 3), expected, terms=3)


@contextlib.contextmanager
def _checked_execution(execution: str, padding: bool):
    """Fail unless the block-diagonal attention ran with ``execution``'s backend exactly when the
    batch has padding and ``execution`` is not ``padded``: packed and padded runs agreeing would
    prove nothing if packing never ran."""
    seen: list[str] = []

    def spy(q, k, v, packing, **kwargs):
        seen.append(packing.backend)
        return varlen_attention(q, k, v, packing, **kwargs)

    with mock.patch("vtc.models.attention.varlen_attention", spy):
        yield
    assert set(seen) == ({execution} if padding and execution != "padded" else set()), (execution, seen)


def _run(model, forward, x, reducers, execution, padding=True):
    with _checked_execution(execution, padding), torch.no_grad(), vtc.apply(model, *reducers, execution=execution) as handle:
        out = forward(model, x)
        return out, handle.image_token_counts, handle.state


def _check_executions(model, forward, x, reducers, terms):
    """Padded, split and nested runs: equal per-image counts, outputs and real tokens equal up to
    rounding; returns the padded run's counts."""
    out, counts, state = _run(model, forward, x, reducers, "padded")
    assert state.valid is not None, "the batch should keep per-image counts"
    for execution in PACKED:
        packed_out, packed_counts, packed_state = _run(model, forward, x, reducers, execution)
        assert torch.equal(packed_counts, counts), execution
        assert torch.equal(packed_state.valid, state.valid) and torch.equal(packed_state.origin, state.origin)
        tolerance.assert_close(packed_out, out, terms=terms)
        real = state.valid.unsqueeze(-1)
        tolerance.assert_close(packed_state.x * real, state.x * real, terms=terms)
    return counts


def test_timm_packed_equals_padded_and_single_runs(timm_vit, tools):
    model = timm_vit("plain")
    x = fam.varied_images()
    dymu = vtc.DyMU(thresholds=fam.calibrated(model))
    counts = _check_executions(model, lambda m, images: m(images), x, [dymu], tools.vit_terms)
    assert len(set(counts[:, -1].tolist())) == 3
    batched = _run(model, lambda m, images: m(images), x, [dymu], "auto")[0]
    singles = torch.cat([_run(model, lambda m, images: m(images), x[i:i + 1], [dymu], "auto", padding=False)[0]
                        for i in range(3)])
    tolerance.assert_close(batched, singles, terms=tools.vit_terms)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_packed_equals_padded_on_every_family(models, family):
    model = models.get(family.name)
    x = fam.varied_images()
    counts = _check_executions(model, family.forward, x, [vtc.DyMU(thresholds=fam.calibrated(model))], fam.MODEL_TERMS)
    assert len(set(counts[:, -1].tolist())) == 3


def test_tome_after_dymu_runs_packed(timm_vit, tools):
    """ToMe (the only fixed-count reducer that takes padding) after DyMU's per-image counts."""
    model = timm_vit("plain")
    dymu = vtc.DyMU(thresholds=(*fam.calibrated(model)[:3], 1.0))
    _check_executions(model, lambda m, images: m(images), fam.varied_images(), [dymu, "tome:r=0;0;0;2"], tools.vit_terms)


def test_packed_signals_equal_the_padded_ones():
    """Key means and the CLS attention row (each image's first token as the query, softmax within
    the image) from packed heads, unpacked, equal the padded computation's on real tokens."""
    lengths, heads, dim = [9, 3, 14], 2, 8
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, sum(lengths), dim, generator=generator) for _ in range(3))
    valid = _padded(q, lengths)[1]
    bias = torch.rand(valid.shape, generator=generator).add(0.5).log()
    needs = frozenset({Signal.KEY_MEAN, Signal.CLS_ATTN})
    packing = Packing.of(valid, bias)
    _, packed = attend(q, k, v, packing, needs)
    packed = packing.unpack_signals(packed)
    padded_bias = bias.masked_fill(~valid, float("-inf"))[:, None, None, :]
    _, padded = attend(_padded(q, lengths)[0], _padded(k, lengths)[0], _padded(v, lengths)[0], padded_bias, needs)
    real = valid.unsqueeze(-1)
    tolerance.assert_close(packed.key_mean * real, padded.key_mean * real, terms=heads)
    tolerance.assert_close(packed.cls_attn, padded.cls_attn, terms=dim + max(lengths))
    assert bool((packed.cls_attn[~valid] == 0).all())


def test_one_image_at_full_width_among_31_small(timm_vit):
    """A noise image keeps every token while 31 flat images merge down to one: packed, padded and
    single runs agree."""
    model = timm_vit("nocls", depth=8)
    with torch.no_grad():
        model.pos_embed.zero_()
    flats = torch.linspace(0.1, 0.9, 31)[:, None, None, None].expand(31, 3, 32, 32)
    x = torch.cat([fam.images(1, seed=3), flats])
    spec = "dymu:thresholds=0.9999"
    terms = 3 * 4 * 4 + tolerance.transformer_terms(8, model.embed_dim, 64) + 64
    forward = lambda m, images: m(images)  # noqa: E731
    counts = _check_executions(model, forward, x, [spec], terms)
    assert counts[0].tolist() == [64] * 9 and counts[1:, -1].tolist() == [1] * 31
    packed, _, _ = _run(model, forward, x, [spec], "auto")
    singles = torch.cat([_run(model, forward, x[i:i + 1], [spec], "auto", padding=False)[0] for i in range(32)])
    tolerance.assert_close(packed, singles, terms=terms)


@pytest.mark.parametrize("connector", [(), ("holov:k=4",)], ids=["dymu", "dymu+holov"])
def test_llava_tower_packed_equals_padded(llava, connector):
    """The LLaVA tower with DyMU (and HoloV's CLS attention row at the feature layer): the
    logits of the three executions agree."""
    model, processor = llava
    inputs = processor(images=lm.images(3, seed=2), text=lm.prompts(3), padding=True, return_tensors="pt")
    reducers = ("dymu:thresholds=0.3,vtu=off", *connector)
    logits = {}
    for execution in ("padded", *PACKED):
        with _checked_execution(execution, True), torch.no_grad(), vtc.apply(model, *reducers, execution=execution) as handle:
            logits[execution] = model(**inputs).logits
            counts = handle.image_token_counts
        assert len(set(counts[:, -1].tolist())) > 1, "the images should keep different counts"
    terms = lm.llava_terms(model, inputs["input_ids"].shape[1])
    for execution in PACKED:
        tolerance.assert_close(logits[execution], logits["padded"], terms=terms)


def test_execution_option_is_checked(timm_vit, llava):
    for model in (timm_vit("plain"), llava[0]):
        with pytest.raises(ValueError, match="execution must be one of auto, padded, split, nested"):
            vtc.apply(model, "dymu:thresholds=0.5", execution="packed")


def test_bench_dymu_times_padded_and_packed_beside_tome(tmp_path, monkeypatch):
    """scripts/bench_dymu.py's encoder rows (a real-size timm ViT with random weights, tiny batch):
    one row per preset with both executions, efficiencies as speedup over FLOPs cut."""
    path = Path(__file__).parents[1] / "scripts" / "bench_dymu.py"
    spec = importlib.util.spec_from_file_location("bench_dymu_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks the module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench"
    assert bench.main(["--vit", "timm:vit_tiny_patch16_224", "--skip", "llava", "--batch", "4", "--repeats", "1",
                       "--calibration-images", "8", "--out", str(out)]) == 0
    rows = json.loads((out / "bench_dymu.json").read_text())["vit"]
    assert [row["preset"] for row in rows] == ["low", "mid", "high"]
    for row in rows:
        assert row["model"] == "timm:vit_tiny_patch16_224" and row["tome_tokens"] == round(row["dymu_tokens_mean"])
        assert row["dymu_flops_cut"] > 1 and row["tome_flops_cut"] > 1
        for label in ("dymu_padded", "dymu_packed", "tome"):
            cut = row["tome_flops_cut"] if label == "tome" else row["dymu_flops_cut"]
            assert row[f"{label}_efficiency"] == row[f"{label}_speedup"] / cut
        assert row["packed_over_tome_efficiency"] == row["dymu_packed_efficiency"] / row["tome_efficiency"]
    assert "| timm:vit_tiny_patch16_224 | low |" in (out / "bench_dymu.md").read_text()
