"""Checks for the offline tiny LLaVA / LLaVA-NeXT builders in ``llava_models``."""

from __future__ import annotations

import llava_models as lm
import pytest
import torch

NEXT_SIZES = [(32, 32), (64, 32), (32, 64), (64, 20)]  # (width, height)
NEXT_TOKENS = {(32, 32): 36, (64, 32): 52, (32, 64): 56, (64, 20): 34, (48, 20): 52}


@pytest.fixture(scope="module")
def llava_siglip(tmp_path_factory):
    return lm.build_llava(tmp_path_factory.mktemp("siglip"), vision="siglip", strategy="full")


def _image_counts(model, inputs) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


def _greedy(model, processor, imgs, texts, n: int = 4) -> list[list[int]]:
    inputs = processor(images=imgs, text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def test_tokenizer_image_token_is_single():
    tok = lm.build_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    for text in ["<image>", "USER: <image>\nwhat", "a<image>b", "<image>\n<image>"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids.count(image_id) == text.count("<image>")
    for prompt in lm.prompts(5):
        ids = tok(prompt)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) > 8 and tok.unk_token_id not in ids
        assert ids.count(image_id) == 1
    assert tok.padding_side == "left"
    lengths = [len(tok(p)["input_ids"]) for p in lm.prompts(12)]
    assert len(set(lengths)) == 12


def test_images_deterministic_and_sized():
    a, b = lm.images(2, seed=3), lm.images(2, seed=3)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert a[0].tobytes() != a[1].tobytes() and a[0].mode == "RGB"
    assert [im.size for im in lm.images(4, sizes=NEXT_SIZES)] == NEXT_SIZES


@pytest.mark.parametrize("name", ["llava", "llava_next", "llava_siglip"])
def test_reloaded_model_uses_sdpa(name, request):
    model, _ = request.getfixturevalue(name)
    assert not model.training
    configs = [model.config, model.config.text_config, model.config.vision_config,
               model.model.vision_tower.config, model.model.language_model.config]
    assert [c._attn_implementation for c in configs] == ["sdpa"] * len(configs)


def test_llava_batch_generate(llava):
    model, processor = llava
    texts = lm.prompts(2)
    inputs = processor(images=lm.images(2), text=texts, padding=True, return_tensors="pt")
    assert _image_counts(model, inputs) == [16, 16]
    mask = inputs["attention_mask"]
    assert mask.sum(1)[0] != mask.sum(1)[1] and (mask[:, -1] == 1).all()  # left padding
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    # batched (left-padded) greedy decoding agrees with one-by-one decoding
    batched = out[:, inputs["input_ids"].shape[1] :].tolist()
    single = [_greedy(model, processor, [im], [t])[0] for im, t in zip(lm.images(2), texts)]
    assert batched == single


def test_llava_two_images_in_one_prompt(llava):
    model, processor = llava
    inputs = processor(images=lm.images(2), text=[lm.two_image_prompt()], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 2 and _image_counts(model, inputs) == [32]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    swapped = _greedy(model, processor, lm.images(2)[::-1], [lm.two_image_prompt()])
    assert out[0, inputs["input_ids"].shape[1] :].tolist() != swapped[0]


def test_llava_next_token_counts_depend_on_aspect_ratio(llava_next):
    model, processor = llava_next
    counts = {}
    for size, im in zip(NEXT_SIZES, lm.images(len(NEXT_SIZES), sizes=NEXT_SIZES)):
        inputs = processor(images=[im], text=lm.prompts(1), return_tensors="pt")
        (counts[size],) = _image_counts(model, inputs)
        expected = processor._get_num_multimodal_tokens(image_sizes=[(size[1], size[0])]).num_image_tokens
        assert expected == [counts[size]]
    assert counts == {s: NEXT_TOKENS[s] for s in NEXT_SIZES}
    assert counts[(64, 32)] != counts[(32, 64)] != counts[(32, 32)]


def test_llava_next_batch_generate(llava_next):
    model, processor = llava_next
    sizes = [(64, 32), (32, 64)]
    inputs = processor(images=lm.images(2, sizes=sizes), text=lm.prompts(2), padding=True, return_tensors="pt")
    assert _image_counts(model, inputs) == [NEXT_TOKENS[s] for s in sizes]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_outputs_depend_on_image_and_prompt(name, request):
    model, processor = request.getfixturevalue(name)
    prompt = lm.prompts(1)
    by_image = [tuple(_greedy(model, processor, [im], prompt, n=6)[0]) for im in lm.images(3, seed=1)]
    assert len(set(by_image)) == 3
    image = lm.images(1, seed=1)
    by_prompt = [tuple(_greedy(model, processor, image, [p], n=6)[0]) for p in lm.prompts(3)]
    assert len(set(by_prompt)) == 3


def test_siglip_variant(llava_siglip):
    model, processor = llava_siglip
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert model.config.vision_feature_select_strategy == "full"
    inputs = processor(images=lm.images(2), text=lm.prompts(2), padding=True, return_tensors="pt")
    assert _image_counts(model, inputs) == [16, 16]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    a, b = (_greedy(model, processor, [im], lm.prompts(1), n=6)[0] for im in lm.images(2, seed=5))
    assert a != b


def test_multi_layer_features_and_cache(tmp_path):
    model, processor = lm.build_llava(tmp_path, feature_layer=[-3, -1])
    assert model.config.vision_feature_layer == [-3, -1]
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * model.config.vision_config.hidden_size
    first = _greedy(model, processor, lm.images(1), lm.prompts(1))
    weights = tmp_path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again, processor2 = lm.build_llava(tmp_path, feature_layer=[-3, -1])  # cached: just reloads
    assert weights.stat().st_mtime_ns == stamp
    assert _greedy(again, processor2, lm.images(1), lm.prompts(1)) == first
