"""HF CLIPVisionModel / CLIPModel / SiglipVisionModel adapter, on tiny models saved with
``save_pretrained`` and reloaded with ``from_pretrained`` (see families.py)."""

from __future__ import annotations

import families as fam  # tests/ is on pytest's pythonpath (pyproject.toml)
import pytest
import tolerance
import torch

import vtc

FAMILIES = [fam.FAMILIES[name] for name in fam.HF]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fam.ModelCache(tmp_path_factory)


def test_models_come_from_from_pretrained(models):
    from transformers import CLIPModel, CLIPVisionModel, SiglipVisionModel

    clip, model, siglip = (models.get(n) for n in ("hf-clip-vision", "hf-clip-model", "hf-siglip-vision"))
    assert isinstance(clip, CLIPVisionModel) and not hasattr(clip, "vision_model")  # transformers 5.x: flat
    assert isinstance(model, CLIPModel) and isinstance(model.vision_model, CLIPVisionModel)
    assert isinstance(siglip, SiglipVisionModel) and siglip.use_head
    for m, n0, prefix in ((clip, 65, 1), (model, 65, 1), (siglip, 64, 0)):
        with vtc.apply(m) as handle:
            assert handle.adapter.family == "hf"
            assert (handle.adapter.info.num_tokens, handle.adapter.info.n_prefix) == (n0, prefix)
            assert handle.planned_token_counts() == [n0] * (fam.LAYERS + 1)


def test_merging_exact_duplicates_float64_round_off(models):
    diff, _ = fam.check_exactness(models, fam.FAMILIES["hf-clip-vision"], prop_attn=True)
    assert diff < 1e-12


def test_hidden_states_follow_the_token_counts(models):
    model = models.get("hf-clip-vision")
    with torch.no_grad(), vtc.apply(model, "tome:r=8") as handle:
        out = model(pixel_values=fam.images(2), output_hidden_states=True)
        counts = handle.token_counts
    assert len(out.hidden_states) == fam.LAYERS + 1  # embeddings first, then one per layer
    assert [h.shape[1] for h in out.hidden_states] == counts
    assert out.last_hidden_state.shape[1] == counts[-1]


def test_eager_attention_model_gives_the_same_reduction(models, tmp_path):
    """The adapter re-runs attention with SDPA; a model loaded with eager attention agrees."""
    from transformers import CLIPVisionModel

    sdpa = models.get("hf-clip-vision")
    sdpa.save_pretrained(tmp_path)
    eager = CLIPVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    x = fam.images(2)
    with torch.no_grad():
        reference = eager(pixel_values=x).pooler_output
        with vtc.apply(eager, "tome:r=0"):
            assert torch.equal(eager(pixel_values=x).pooler_output, reference)
        outs = []
        for model in (sdpa, eager):
            with vtc.apply(model, "tome:r=8"):
                outs.append(model(pixel_values=x).pooler_output)
    tolerance.assert_close(outs[1], outs[0], terms=fam.MODEL_TERMS)  # SDPA and eager sum in other orders


def test_clip_model_text_tower_is_untouched(models):
    model = models.get("hf-clip-model")
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids).pooler_output
        image = model.get_image_features(pixel_values=fam.images(1)).pooler_output
        with vtc.apply(model, "tome:r=8"):
            assert torch.equal(model.get_text_features(input_ids=ids).pooler_output, text)
            reduced = model.get_image_features(pixel_values=fam.images(1)).pooler_output
    assert reduced.shape == image.shape == (1, fam.EMBED)


def test_siglip_evit_is_refused_for_lack_of_cls(models):
    for model in (models.get("hf-siglip-vision"), fam.hf_siglip_model()):
        with pytest.raises(ValueError, match="no CLS token"):
            vtc.apply(model, "evit:keep=0.5")
        assert fam.no_instance_patches(model) == []
        vtc.apply(model, "tome:r=4").remove()  # still usable with a CLS-free reducer


def test_siglip_model_is_reduced_through_its_vision_tower(models):
    model = fam.hf_siglip_model()
    with torch.no_grad(), vtc.apply(model, "tome:r=8") as handle:
        out = model.get_image_features(pixel_values=fam.images(2)).pooler_output
        assert handle.token_counts == [64, 56, 48, 40, 32]
    assert torch.isfinite(out).all()


def test_unsupported_models_are_type_errors():
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(**fam._hf_text_kwargs()))
    for model in (torch.nn.Linear(4, 4), text):
        with pytest.raises(TypeError, match="supported:.*open_clip.*CLIPVisionModel.*SiglipVisionModel"):
            vtc.apply(model, "tome:r=1")
        assert fam.no_instance_patches(model) == []
