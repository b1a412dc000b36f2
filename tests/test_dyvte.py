"""DyVTE: router features and labels, routers saved and loaded, the learned exit on a tiny LLaVA
(never-exit = unreduced, forced exit = exit:layer=k, batch = single runs, stacking), bad input."""

from __future__ import annotations

import llava_models as lm
import pytest
import tolerance
import torch

import vtc
from vtc.reducers.dyvte import DyVTE, RouterConfig, Routers, exit_labels, router_features


def _inputs(processor, images, texts):
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _config(model, width: int) -> RouterConfig:
    text = model.config.text_config
    return RouterConfig(text.num_hidden_layers, text.hidden_size, width, model.config._name_or_path)


def forced_routers(model, exit_after: set[int]) -> Routers:
    """Routers that exit after exactly the layers in ``exit_after`` (for any non-zero feature):
    ``W1 = [I; -I]`` makes ``sum GELU(W1 f) = sum x (2 Phi(x) - 1) > 0``; ``W2`` gives that sum to the
    exit logit with the sign chosen per layer."""
    routers = Routers(_config(model, 4 * model.config.text_config.hidden_size))
    eye = torch.eye(routers.first.shape[2])
    with torch.no_grad():
        for layer in range(routers.first.shape[0]):
            routers.first[layer] = torch.cat([eye, -eye])
            sign = 1.0 if layer in exit_after else -1.0
            routers.second[layer, 0] = -sign
            routers.second[layer, 1] = sign
    return routers


def _generate(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


# ----- pure functions -----------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_router_features_pick_the_prompt_text_after_the_image(side):
    # row layout: [bos, txt, img, img, t1, t2, last] (+ 2 padding), and a row without an image
    hidden = torch.arange(2 * 9 * 3, dtype=torch.float64).reshape(2, 9, 3)
    visual = torch.zeros(2, 9, dtype=torch.bool)
    prompt = torch.zeros(2, 9, dtype=torch.bool)
    start = 2 if side == "left" else 0
    visual[0, start + 2:start + 4] = True
    prompt[0, start:start + 7] = True
    prompt[1, start:start + 7] = True
    features, decidable = router_features(hidden, visual, prompt)
    expected_mean = hidden[0, start + 4:start + 6].mean(0)
    assert torch.equal(features[0], torch.cat([expected_mean, hidden[0, start + 6]]))
    assert decidable.tolist() == [True, False]
    # the last prompt token right after the image: an empty mean (zeros), still decidable
    short = prompt.clone()
    short[0, start + 5:] = False
    features, decidable = router_features(hidden, visual, short)
    assert torch.equal(features[0, :3], torch.zeros(3, dtype=torch.float64)) and bool(decidable[0])
    assert torch.equal(features[0, 3:], hidden[0, start + 4])
    # the image as the last prompt token: nothing to decide on
    visual[0, start + 6] = True
    assert not bool(router_features(hidden, visual, prompt)[1][0])


def test_exit_labels_follow_the_agreement_and_loss_rule():
    vocab = 5
    targets = torch.tensor([[-100, 1, 2], [-100, -100, 3], [-100, 4, 0]])
    full = torch.zeros(3, 3, vocab)
    for row, column, token in [(0, 1, 1), (0, 2, 2), (1, 2, 3), (2, 1, 4), (2, 2, 0)]:
        full[row, column, token] = 4.0
    assert exit_labels(full, full.clone(), targets).tolist() == [True, True, True]  # the same answer: exit
    one_wrong = full.clone()
    one_wrong[0, 2, 2], one_wrong[0, 2, 4] = 0.0, 4.0  # 1 of 2 answer tokens differs
    assert exit_labels(full, one_wrong, targets).tolist() == [False, True, True]
    prompt_changes = full.clone()
    prompt_changes[1, 0] = torch.randn(vocab) * 9  # a prompt position (target -100) changes nothing
    assert exit_labels(full, prompt_changes, targets).tolist() == [True, True, True]
    less_sure = full.clone()
    less_sure[2, 1, 4] = 3.0  # same greedy token, higher loss
    ratio = float(torch.nn.functional.cross_entropy(less_sure[2, 1:], targets[2, 1:]) /
                  torch.nn.functional.cross_entropy(full[2, 1:], targets[2, 1:]))
    assert ratio > 1.03
    assert exit_labels(full, less_sure, targets).tolist() == [True, True, False]
    assert exit_labels(full, less_sure, targets, loss_ratio=ratio * 1.01).tolist() == [True, True, True]
    with pytest.raises(ValueError, match=r"rows \[1\] have no answer token"):
        exit_labels(full, full, torch.tensor([[-100, 1, 2], [-100, -100, -100], [-100, 4, 0]]))


def test_router_shape_matches_the_official_count():
    routers = Routers(RouterConfig(num_layers=3, hidden_size=4096, width=2048))
    per_layer = sum(p.numel() for p in routers.parameters()) // 2  # two routers (none after the last layer)
    assert per_layer == 16_781_312  # 2d -> 2048 -> 2, no biases (the official router at 7B)
    assert routers(1, torch.randn(5, 8192)).shape == (5, 2)


def test_routers_save_and_reload_identically(tmp_path):
    routers = Routers(RouterConfig(4, 8, 6, "some-model"))
    folder = routers.save(tmp_path / "routers")
    again = Routers.load(folder)
    features = torch.randn(3, 16)
    assert again.config == routers.config
    for layer in range(3):
        assert torch.equal(again(layer, features), routers(layer, features))
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))


# ----- on a tiny LLaVA ----------------------------------------------------------------------------
def test_routers_that_never_exit_give_the_unreduced_model_exactly(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with vtc.apply(model):  # vtc's unreduced path (its decode steps round like HF's to tolerance)
        reference = _generate(model, inputs)
    with vtc.apply(model, DyVTE(module=forced_routers(model, set()))) as handle:
        tokens, logits = _generate(model, inputs)
        assert handle.exit_layers == [3, 3]  # the last of 4 layers still saw the image
        with torch.no_grad():
            forward = model(**inputs).logits
    assert torch.equal(tokens, reference[0]) and torch.equal(logits, reference[1])
    with torch.no_grad():
        assert torch.equal(forward, model(**inputs).logits)  # and the forward is HF's own, bit for bit


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_a_forced_exit_equals_the_fixed_exit_and_masking(llava, layer):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    runs = {}
    for name, spec in [("fixed", f"exit:layer={layer}"), ("dyvte", DyVTE(module=forced_routers(model, {layer}))),
                       ("mask", DyVTE(module=forced_routers(model, {layer}), mode="mask"))]:
        with vtc.apply(model, spec) as handle:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
            runs[name] = (out.sequences, torch.stack(out.logits, 1), [c.keys.shape[2] for c in out.past_key_values.layers])
            assert handle.exit_layers == [layer, layer]
    assert torch.equal(runs["dyvte"][0], runs["fixed"][0]) and torch.equal(runs["dyvte"][1], runs["fixed"][1])
    assert runs["dyvte"][2] == runs["fixed"][2]
    assert torch.equal(runs["mask"][0], runs["dyvte"][0])
    tolerance.assert_close(runs["mask"][1], runs["dyvte"][1], terms=lm.llava_terms(model, runs["mask"][0].shape[1]))
    drop_cache, mask_cache = runs["dyvte"][2], runs["mask"][2]
    assert drop_cache[:layer + 1] == mask_cache[:layer + 1]
    assert all(d < m for d, m in zip(drop_cache[layer + 1:], mask_cache[layer + 1:]))  # a shorter KV cache


def _differing_routers(model, processor, images, texts) -> tuple[Routers, list[int]]:
    """Random routers whose single-prompt exits differ between the prompts (searched over seeds)."""
    for seed in range(40):
        torch.manual_seed(seed)
        routers = Routers(_config(model, 16))
        with torch.no_grad():
            routers.second.mul_(4.0)
        exits = []
        for image, text in zip(images, texts):
            with vtc.apply(model, DyVTE(module=routers)) as handle, torch.no_grad():
                model(**_inputs(processor, [image], [text]))
                exits += handle.exit_layers
        if len(set(exits)) > 1:
            return routers, exits
    raise AssertionError("no seed gave different exits per prompt")


def test_a_batch_with_different_exits_equals_single_runs(llava):
    model, processor = llava
    images, texts = lm.images(4, seed=3), lm.prompts(4)
    routers, exits = _differing_routers(model, processor, images, texts)
    singles = []
    for image, text in zip(images, texts):
        with vtc.apply(model, DyVTE(module=routers)):
            singles.append(_generate(model, _inputs(processor, [image], [text])))
    processor.tokenizer.padding_side = "left"
    with vtc.apply(model, DyVTE(module=routers)) as handle:
        tokens, logits = _generate(model, _inputs(processor, images, texts))
        assert handle.exit_layers == exits
    for row, (single_tokens, single_logits) in enumerate(singles):
        new = single_tokens.shape[1] - logits.shape[1]
        assert torch.equal(tokens[row, -logits.shape[1]:], single_tokens[0, new:])
        tolerance.assert_close(logits[row], single_logits[0], terms=lm.llava_terms(model, tokens.shape[1]))


def test_sampling_after_an_exit_matches_masking(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    sequences = {}
    for mode in ("drop", "mask"):
        with vtc.apply(model, DyVTE(module=forced_routers(model, {1}), mode=mode)), torch.no_grad():
            torch.manual_seed(7)
            sequences[mode] = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(sequences["drop"], sequences["mask"])
    with vtc.apply(model, DyVTE(module=forced_routers(model, {1}))), \
            pytest.raises(ValueError, match="beam search and assisted decoding"):
        model.generate(**inputs, num_beams=2, max_new_tokens=2)


def test_stacks_on_encoder_and_connector_reducers(llava):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    with vtc.apply(model, "tome:r=2", "holov:k=6", "exit:layer=1"):
        fixed = _generate(model, inputs)
    with vtc.apply(model, "tome:r=2", "holov:k=6", DyVTE(module=forced_routers(model, {1}))) as handle:
        stacked = _generate(model, inputs)
        assert handle.visual_tokens == [6, 6] and handle.exit_layers == [1, 1]
    assert torch.equal(stacked[0], fixed[0]) and torch.equal(stacked[1], fixed[1])


def test_the_fixed_exit_reports_its_layer(llava):
    model, processor = llava
    with vtc.apply(model, "exit:layer=2") as handle, torch.no_grad():
        model(**_inputs(processor, lm.images(2), lm.prompts(2)))
        assert handle.exit_layers == [2, 2]
    with vtc.apply(model, "pool:tokens=4") as handle:
        assert handle.exit_layers is None


def test_routers_load_from_a_folder_and_from_the_spec(llava, tmp_path):
    model, processor = llava
    inputs = _inputs(processor, lm.images(2), lm.prompts(2))
    folder = forced_routers(model, {2}).save(tmp_path / "routers")
    with vtc.apply(model, f"dyvte:routers={folder}") as handle, torch.no_grad():
        model(**inputs)
        assert handle.exit_layers == [2, 2]


def test_bad_input_is_refused(llava, tmp_path):
    model, _ = llava
    text = model.config.text_config
    for threshold in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match="threshold must be strictly between 0 and 1"):
            DyVTE(routers="x", threshold=threshold)
    with pytest.raises(ValueError, match="threshold must be a number between 0 and 1"):
        vtc.parse_reducer("dyvte:threshold=high")
    with pytest.raises(ValueError, match="mode must be one of drop, mask"):
        DyVTE(mode="skip")
    wrong = [RouterConfig(text.num_hidden_layers + 2, text.hidden_size, 8, model.config._name_or_path),
             RouterConfig(text.num_hidden_layers, text.hidden_size * 2, 8, model.config._name_or_path)]
    for config in wrong:
        with pytest.raises(ValueError, match="these routers are for an LLM of"):
            vtc.apply(model, DyVTE(module=Routers(config)))
    other = Routers(RouterConfig(text.num_hidden_layers, text.hidden_size, 8, "/somewhere/another-llava"))
    with pytest.raises(ValueError, match="trained for '/somewhere/another-llava', not for this model"):
        vtc.apply(model, DyVTE(module=other))
    with pytest.raises(FileNotFoundError, match="neither a folder holding dyvte.json nor a shipped checkpoint with routers"):
        vtc.apply(model, f"dyvte:routers={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="give routers=<folder or shipped name>; this model"):
        vtc.apply(model, "dyvte")
    for module in model.modules():
        assert "forward" not in module.__dict__  # a refused apply leaves nothing behind
