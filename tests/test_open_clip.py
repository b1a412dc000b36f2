"""open_clip VisionTransformer adapter, on tiny registered configs loaded with
``open_clip.create_model(name, pretrained=<local .safetensors>)`` (see families.py).

Covers the batch-first and LND layouts, token pooling, size-weighted average pooling and the
attentional pooler (which receives the log(size) key bias)."""

from __future__ import annotations

import families as fam  # tests/ is on pytest's pythonpath (pyproject.toml)
import pytest
import tolerance
import torch

import vtc

FAMILIES = [fam.FAMILIES[name] for name in fam.OPEN_CLIP]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fam.ModelCache(tmp_path_factory)


def _tiny_clip(**vision):
    import open_clip

    torch.manual_seed(0)
    cfg = fam.open_clip_config(**vision)
    if vision.get("attentional_pool") in ("parallel", "cascade"):
        cfg["embed_dim"] = fam.WIDTH  # open_clip's WIP parallel pooler only runs when output_dim == width
    return open_clip.CLIP(**cfg).eval()


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_create_model_loads_a_local_checkpoint(tmp_path, suffix):
    """The loading path the fixtures use: add_model_config + create_model(pretrained=<file>)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = fam.open_clip_config()
    name = f"vtc-test-load-{suffix}-{tmp_path.name}"
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    assert name in open_clip.list_models()
    torch.manual_seed(3)
    source = open_clip.CLIP(**cfg).eval()
    path = tmp_path / f"weights.{suffix}"
    if suffix == "safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = open_clip.create_model(name, pretrained=str(path)).eval()
    x = fam.images(2)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), source.encode_image(x))
        with vtc.apply(model, "tome:r=8") as handle:
            model.encode_image(x)
            assert handle.adapter.family == "open_clip"
            assert handle.token_counts == [65, 57, 49, 41, 33]


def test_lnd_fixture_really_runs_sequence_first(models):
    model = models.get("open_clip-lnd")
    assert model.visual.transformer.batch_first is False
    assert all(block.attn.batch_first is False for block in model.visual.transformer.resblocks)
    seen = []
    hook = model.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            model.encode_image(fam.images(2))
    finally:
        hook.remove()
    assert seen == [torch.Size([65, 2, fam.WIDTH])]  # (L, N, D)


@pytest.mark.parametrize("spec", fam.REDUCERS)
def test_lnd_layout_matches_batch_first(models, spec):
    """Same weights in both layouts: the reduction is the same up to float round-off (the two
    layouts run their products in other orders: a tolerance from float32 and the model's depth)."""
    first, lnd = models.get("open_clip"), models.get("open_clip-lnd")
    x = fam.images(3, seed=5)
    with torch.no_grad():
        with vtc.apply(first, spec) as a, vtc.apply(lnd, spec) as b:
            out_first, out_lnd = first.encode_image(x), lnd.encode_image(x)
            assert a.token_counts == b.token_counts
            assert torch.equal(a.state.origin, b.state.origin)
    tolerance.assert_close(out_lnd, out_first, terms=fam.MODEL_TERMS)


def test_visual_tower_alone_is_accepted(models):
    model = models.get("open_clip")
    x = fam.images(2)
    with torch.no_grad():
        with vtc.apply(model, "tome:r=8"):
            whole = model.encode_image(x)
        with vtc.apply(model.visual, "tome:r=8") as handle:
            tower = model.visual(x)
            assert handle.token_counts == [65, 57, 49, 41, 33]
    assert torch.equal(whole, tower)


def test_text_tower_is_untouched(models):
    model = models.get("open_clip")
    text = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.encode_text(text)
        with vtc.apply(model, "tome:r=8"):
            assert torch.equal(model.encode_text(text), reference)


@pytest.mark.parametrize("spec", ["tome:r=8", "pool:tokens=6", "evit:keep=0.5"])  # unequal sizes
def test_average_pooling_is_size_weighted(models, spec):
    """pool_type='avg': the pooled patch feature is sum(size * x) / sum(size), not a plain mean."""
    model = models.get("open_clip-avg")
    visual = model.visual
    x = fam.images(2, seed=6)
    with torch.no_grad(), vtc.apply(model, spec) as handle:
        out = model.encode_image(x)
        tokens = visual.ln_post(visual.transformer(visual._embeds(x)))
        size = handle.state.size[:, 1:]
        weighted = (size.unsqueeze(-1) * tokens[:, 1:]).sum(1) / size.sum(1, keepdim=True)
        plain = tokens[:, 1:].mean(1)
    assert not torch.allclose(size, torch.ones_like(size))
    tolerance.assert_close(out, weighted @ visual.proj, terms=65 + fam.WIDTH)  # the weighted sum, then proj
    assert not torch.allclose(out, plain @ visual.proj, atol=1e-4)


def test_attentional_pool_outputs_are_not_mistaken_for_tokens():
    model = _tiny_clip(attentional_pool=True, attn_pooler_queries=33, attn_pooler_heads=2, pool_type="avg")
    visual = model.visual
    x = fam.images(2, seed=7)
    with torch.no_grad(), vtc.apply(model, "tome:r=8") as handle:
        out = model.encode_image(x)
        assert handle.token_counts[-1] == 33
        queries = visual.ln_post(visual.attn_pool(visual.transformer(visual._embeds(x))))
        expected = queries[:, 1:].mean(1) @ visual.proj  # what open_clip does with the pooler's outputs
    tolerance.assert_close(out, expected, terms=33 + fam.WIDTH)  # the queries' mean, then proj


def test_custom_residual_blocks_are_type_errors():
    model = _tiny_clip(qk_norm=True)
    assert type(model.visual.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    with pytest.raises(TypeError, match="ResidualAttentionBlock"):
        vtc.apply(model, "tome:r=8")
    assert fam.no_instance_patches(model) == []


def test_refused_attentional_pooling_leaves_the_model_unpatched():
    model = _tiny_clip(attentional_pool="parallel", attn_pooler_queries=4, attn_pooler_heads=2)
    x = fam.images(1)
    with torch.no_grad():
        reference = model.encode_image(x)
        with pytest.raises(TypeError, match="parallel/cascade"):
            vtc.apply(model, "tome:r=8")
        assert fam.no_instance_patches(model) == []
        assert torch.equal(model.encode_image(x), reference)


def test_unsupported_models_are_type_errors(models):
    model = models.get("open_clip")
    for bad in (model.transformer, torch.nn.Linear(4, 4)):  # the text transformer, a plain layer
        with pytest.raises(TypeError, match="supported:.*timm.*open_clip.*CLIPVisionModel.*SiglipVisionModel"):
            vtc.apply(bad, "tome:r=1")
        assert fam.no_instance_patches(bad) == []
