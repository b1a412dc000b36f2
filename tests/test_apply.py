"""vtc.apply / Handle on timm ViTs, and the properties every reducer must have on every variant:
identity at a zero budget, bit-identical restore, batch == single runs, low precision, gradients."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import timm
import tolerance
import torch
from timm.models.vision_transformer import Block

import vtc
from vtc.reducers import Reducer, Site, ToMe

REDUCERS = {"tome": "tome:r=6", "evit": "evit:keep=0.5", "random": "random:keep=0.5", "pool": "pool:kernel=2"}
ANY_MODEL = ["tome", "random", "pool"]  # EViT needs a CLS token: run on the CLS variants only
IDENTITY = ["tome:r=0", "tome:r=0;0;0;0,prop_attn=false", "random:keep=1", "pool:kernel=1"]
EVIT_IDENTITY = ["evit:keep=1", "evit:keep=1,fuse=false"]


def _instance_attrs(model):
    return {name: set(module.__dict__) for name, module in model.named_modules()}


# ----- properties of every reducer on every variant ------------------------------------------------
def check_identity(model, images, spec, n0):
    with torch.no_grad():
        reference = model(images)
        with vtc.apply(model, spec) as handle:
            assert torch.equal(model(images), reference)
            assert handle.token_counts == [n0] * 5


@pytest.mark.parametrize("spec", IDENTITY)
def test_zero_budget_is_bit_identical(timm_vit, tools, vit_variant, spec):
    model = timm_vit(vit_variant)
    check_identity(model, tools.images(2), spec, model.num_prefix_tokens + tools.grid**2)


@pytest.mark.parametrize("spec", EVIT_IDENTITY)
def test_evit_keep_one_is_bit_identical(timm_vit, tools, cls_vit_variant, spec):
    model = timm_vit(cls_vit_variant)
    check_identity(model, tools.images(2), spec, model.num_prefix_tokens + tools.grid**2)


def check_remove_restores(model, images, spec):
    attrs = _instance_attrs(model)
    with torch.no_grad():
        reference = model(images)
        with vtc.apply(model, spec) as handle:
            reduced = model(images)
            assert handle.token_counts[-1] < handle.token_counts[0]
        assert not torch.equal(reduced, reference)  # a real reduction ran
        assert torch.equal(model(images), reference)  # leaving the with block restored the model
        assert _instance_attrs(model) == attrs
        handle = vtc.apply(model, spec)
        model(images)
        handle.remove()
        assert torch.equal(model(images), reference)
        assert _instance_attrs(model) == attrs


@pytest.mark.parametrize("name", ANY_MODEL)
def test_remove_restores_bit_identical(timm_vit, tools, vit_variant, name):
    check_remove_restores(timm_vit(vit_variant), tools.images(2), REDUCERS[name])


def test_evit_remove_restores_bit_identical(timm_vit, tools, cls_vit_variant):
    check_remove_restores(timm_vit(cls_vit_variant), tools.images(2), REDUCERS["evit"])


def check_batch_equals_singles(model, images, spec, terms):
    with torch.no_grad(), vtc.apply(model, spec) as handle:
        batched = model(images)
        counts = handle.token_counts
        assert counts[-1] < counts[0]
        singles = []
        for image in images:
            singles.append(model(image[None]))
            assert handle.token_counts == counts
    tolerance.assert_close(batched, torch.cat(singles), terms=terms)


@pytest.mark.parametrize("name", ANY_MODEL)
def test_batch_equals_single_runs(timm_vit, tools, vit_variant, name):
    check_batch_equals_singles(timm_vit(vit_variant), tools.images(4, seed=1), REDUCERS[name], tools.vit_terms)


def test_evit_batch_equals_single_runs(timm_vit, tools, cls_vit_variant):
    check_batch_equals_singles(timm_vit(cls_vit_variant), tools.images(4, seed=1), REDUCERS["evit"], tools.vit_terms)


LOW_PRECISION_CASES = [(v, n) for v in ("plain", "reg", "map", "nocls") for n in REDUCERS if (v, n) != ("nocls", "evit")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant,name", LOW_PRECISION_CASES)
def test_low_precision_runs_without_nan(timm_vit, tools, variant, name, dtype):
    spec = REDUCERS[name]
    model = timm_vit(variant).to(dtype)
    with torch.no_grad(), vtc.apply(model, spec) as handle:
        out = model(tools.images(2, dtype=dtype))
        assert handle.token_counts == handle.planned_token_counts()
        assert handle.token_counts[-1] < handle.token_counts[0]
        assert handle.state.x.dtype == dtype
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", list(REDUCERS))
def test_gradient_flows(timm_vit, tools, name):
    model = timm_vit("reg")
    images = tools.images(2).requires_grad_(True)
    with vtc.apply(model, REDUCERS[name]):
        model(images).square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    for block in model.blocks:
        grad = block.mlp.fc1.weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0


# ----- the handle ----------------------------------------------------------------------------------
def test_handle_reports_state_and_counts(timm_vit, tools):
    model = timm_vit("plain")
    handle = vtc.apply(model, "tome:r=8")
    try:
        assert handle.state is None and handle.token_counts == []
        assert handle.planned_token_counts() == [65, 57, 49, 41, 33]
        with torch.no_grad():
            model(tools.images(2))
        assert handle.token_counts == [65, 57, 49, 41, 33]
        assert handle.state.x.shape == (2, 33, 48)
        assert handle.reducers == [ToMe(r=8)]
        assert repr(handle) == "<vtc.Handle timm: tome:r=8>"
        with torch.no_grad():
            model(tools.images(1))  # a new forward starts a fresh state (other batch size)
        assert handle.state.x.shape == (1, 33, 48)
    finally:
        handle.remove()
    assert handle.state.x.shape == (1, 33, 48)  # the last forward stays readable after remove()
    assert handle.token_counts == [65, 57, 49, 41, 33]
    assert repr(handle) == "<vtc.Handle timm: tome:r=8 (removed)>"
    handle.remove()  # idempotent


def test_apply_without_reducers_changes_nothing(timm_vit, tools):
    model = timm_vit("plain")
    images = tools.images(2)
    with torch.no_grad():
        reference = model(images)
        with vtc.apply(model) as handle:
            assert torch.equal(model(images), reference)
            assert handle.planned_token_counts() == [65] * 5


def test_object_and_spec_string_give_the_same_model(timm_vit, tools):
    model = timm_vit("plain")
    images = tools.images(2)
    with torch.no_grad():
        with vtc.apply(model, "tome:r=5,schedule=linear"):
            from_string = model(images)
        with vtc.apply(model, ToMe(r=5, schedule="linear")):
            from_object = model(images)
    assert torch.equal(from_string, from_object)


def test_applying_twice_needs_remove_first(timm_vit):
    model = timm_vit("plain")
    handle = vtc.apply(model, "tome:r=2")
    with pytest.raises(ValueError, match=r"this model already has vtc reducers applied; call handle.remove\(\) first"):
        vtc.apply(model, "evit:keep=0.5")
    handle.remove()
    vtc.apply(model, "evit:keep=0.5").remove()


def test_exception_inside_with_block_still_removes(timm_vit, tools):
    model = timm_vit("plain")
    attrs = _instance_attrs(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vtc.apply(model, "tome:r=4"):
            raise RuntimeError("boom")
    assert _instance_attrs(model) == attrs
    vtc.apply(model, "tome:r=4").remove()


def test_patches_this_instance_only(timm_vit, tools):
    model = timm_vit("plain")
    other = copy.deepcopy(model)
    block_forward = Block.forward
    images = tools.images(2)
    with torch.no_grad():
        reference = other(images)
        with vtc.apply(model, "tome:r=8") as handle:
            model(images)
            assert torch.equal(other(images), reference)
            assert Block.forward is block_forward
            assert "forward" in model.blocks[0].__dict__ and "forward" not in other.blocks[0].__dict__
            assert handle.token_counts[-1] == 33
    assert set(model.state_dict()) == set(other.state_dict())


def test_forward_features_then_head_matches_forward(timm_vit, tools):
    """The pooling patch follows the state of the last forward_features (size-weighted avg)."""
    model = timm_vit("avg")
    images = tools.images(2)
    with torch.no_grad(), vtc.apply(model, "tome:r=8"):
        direct = model(images)
        split = model.forward_head(model.forward_features(images))
    assert torch.equal(direct, split)


# ----- refusals ------------------------------------------------------------------------------------
def test_unsupported_model_is_a_type_error_naming_the_families():
    with pytest.raises(TypeError, match=r"vtc cannot reduce tokens in a torch.nn.modules.linear.Linear; supported: timm VisionTransformer; open_clip"):
        vtc.apply(torch.nn.Linear(4, 4), "tome:r=2")
    with pytest.raises(TypeError, match="vtc.apply needs a torch.nn.Module, got str"):
        vtc.apply("vit", "tome:r=2")


def test_nonstandard_timm_block_is_a_type_error():
    from timm.models.vision_transformer import ResPostBlock

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3,
                              block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="standard Block and Attention; this one has ResPostBlock / Attention"):
        vtc.apply(model, "tome:r=2")
    assert "_vtc_handle" not in model.__dict__


class ConnectorOnly(Reducer, register=False):  # passed as an object; no spec name
    sites: ClassVar[tuple[Site, ...]] = (Site.CONNECTOR,)
    name: ClassVar[str] = "connector-only"


def test_reducer_at_a_site_the_model_lacks(timm_vit):
    model = timm_vit("plain")
    with pytest.raises(ValueError, match="connector-only acts at the connector site, but a timm model only has the encoder site"):
        vtc.apply(model, ConnectorOnly())
    assert "_vtc_handle" not in model.__dict__


def test_encoder_reducers_at_shared_layers_are_refused(timm_vit):
    with pytest.raises(ValueError, match="tome and evit both reduce at layer 1; chained encoder reducers need disjoint layers"):
        vtc.apply(timm_vit("plain"), "tome:r=2", "evit:keep=0.5")


def test_encoder_reducers_at_disjoint_layers_chain(timm_vit, tools):
    model = timm_vit("plain")
    images = tools.images(3)
    with torch.no_grad(), vtc.apply(model, "evit:keep=0.5,layers=1;", "tome:r=0;0;4;4") as handle:
        batch = model(images)
        assert handle.token_counts == handle.planned_token_counts() == [65, 65, 34, 30, 26]  # EViT: 32 + fused + CLS
        assert repr(handle).startswith("<vtc.Handle timm: evit:keep=0.5,layers=1;, tome:r=0;0;4;4")
        singles = torch.cat([model(image[None]) for image in images])
    tolerance.assert_close(batch, singles, terms=tools.vit_terms)


def test_failed_apply_leaves_the_model_untouched(timm_vit, tools):
    model = timm_vit("plain")
    attrs = _instance_attrs(model)
    for spec in ("tome:r=40,strict=true", "evit:layers=9", "pool:tokens=67", "nonsense"):
        with pytest.raises(ValueError):
            vtc.apply(model, spec)
        assert _instance_attrs(model) == attrs


def test_unknown_reducer_or_option_through_apply(timm_vit):
    model = timm_vit("plain")
    with pytest.raises(ValueError, match="unknown reducer 'merge' in 'merge:r=2'; known reducers: dymu, dyvte, evit, exit, holov, m3, mqt, pool, random, tome, vtu"):
        vtc.apply(model, "merge:r=2")
    with pytest.raises(ValueError, match=r"evit: bad option 'ratio=0.5' in 'evit:ratio=0.5'; options are fuse, keep, layers, tokens"):
        vtc.apply(model, "evit:ratio=0.5")


# ----- copies and grid-shaped outputs --------------------------------------------------------------
def test_deepcopy_of_a_patched_model_uses_its_own_weights(timm_vit, tools):
    model = timm_vit("plain")
    images = tools.images(2)
    with torch.no_grad(), vtc.apply(model, "tome:r=8"):
        clone = copy.deepcopy(model)
        before = clone(images)
        for p in clone.blocks.parameters():
            p.mul_(0.5)
        assert not torch.equal(clone(images), before)


def test_deepcopy_of_a_patched_model_can_be_restored(timm_vit, tools):
    model = timm_vit("plain")
    images = tools.images(2)
    with torch.no_grad():
        reference = model(images)
        with vtc.apply(model, "tome:r=8"):
            clone = copy.deepcopy(model)
        clone.__dict__["_vtc_handle"].remove()
        assert torch.equal(clone(images), reference)


def test_forward_intermediates_is_refused_while_reducing(timm_vit, tools):
    """Grid-shaped intermediates of a shorter sequence would be scrambled: a clear refusal instead."""
    model = timm_vit("plain")
    with torch.no_grad():
        with vtc.apply(model, "tome:r=8"), pytest.raises(ValueError, match="full patch grid"):
            model.forward_intermediates(tools.images(2))
        with vtc.apply(model, "tome:r=0"):
            _, intermediates = model.forward_intermediates(tools.images(2))
    assert all(t.shape[1] == model.embed_dim for t in intermediates)


def test_after_a_content_dependent_reducer_only_padding_aware_ones_chain(timm_vit, tools):
    model = timm_vit("plain")
    images = tools.images(3)
    images[1] = images[1] * 0.01 + 1  # a flat image merges more: per-image counts differ
    with torch.no_grad(), vtc.apply(model, "dymu:thresholds=0.5;1;1;1", "tome:r=0;0;4;4") as handle:
        batch = model(images)
        counts = handle.image_token_counts[:, 1].tolist()
        singles = torch.cat([model(image[None]) for image in images])
    assert len(set(counts)) > 1
    tolerance.assert_close(batch, singles, terms=tools.vit_terms)
    for later in ("evit:keep=0.5,layers=2;", "random:keep=0.5,layers=2;"):
        with pytest.raises(ValueError, match="per-image token counts as one padded width"):
            vtc.apply(model, "dymu:thresholds=0.5;1;1;1", later)
    with vtc.apply(model, "evit:keep=0.5,layers=0;", "dymu:thresholds=1;0.5;1;1"):  # before it is fine
        pass
