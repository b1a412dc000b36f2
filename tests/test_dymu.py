"""DyMU's DToMe on every encoder family, and threshold calibration (DyMU paper, Wang et al., 2025,
Sec. 3.1).

timm tiny ViTs come from conftest; open_clip and HF towers from families.py; the shipped
shapes-vit checkpoint gives a trained encoder whose redundancy follows the image.
"""

from __future__ import annotations

import json

import families as fam
import pytest
import tolerance
import torch

import vtc
from vtc.dymu import Calibration, calibrate, load_calibration, merge_schedule, token_counts
from vtc.kernels import bipartite_match
from vtc.merge import batch_top_edges, bipartite_threshold_matching
from vtc.reducers.dymu import CalibrationRecorder
from vtc.sites import EncoderInfo

FAMILIES = [fam.FAMILIES[name] for name in ("open_clip", "open_clip-attnpool", "hf-clip-vision", "hf-siglip-vision")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fam.ModelCache(tmp_path_factory)


def test_threshold_one_is_the_unreduced_model(timm_vit, models):
    for model, forward in [(timm_vit("plain"), lambda m, x: m(x))] + [
        (models.get(f.name), f.forward) for f in FAMILIES
    ]:
        x = fam.varied_images()
        with torch.no_grad():
            reference = forward(model, x)
            with vtc.apply(model, "dymu:thresholds=1.0") as handle:
                out = forward(model, x)
                counts = handle.image_token_counts
        assert torch.equal(out, reference)
        assert bool((counts == counts[:, :1]).all())


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_minus_one_in_one_layer_merges_the_most_it_allows(models, family):
    model = models.get(family.name)
    n0 = 64 + family.n_prefix
    with torch.no_grad(), vtc.apply(model, "dymu:thresholds=1;-1;1;1") as handle:
        family.forward(model, fam.varied_images())
        counts = handle.image_token_counts
    expected = n0 - (n0 - family.n_prefix) // 2
    assert counts[:, 1].tolist() == [n0] * 3 and counts[:, 2:].tolist() == [[expected] * 3] * 3
    assert handle.state.valid is None  # every image merged the same number: no padding


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_batch_equals_single_runs_with_per_image_counts(models, family):
    model = models.get(family.name)
    x = fam.varied_images()
    thresholds = fam.calibrated(model)
    with torch.no_grad(), vtc.apply(model, vtc.DyMU(thresholds=thresholds)) as handle:
        batched = family.forward(model, x)
        batch_counts = handle.image_token_counts
        singles, single_counts = [], []
        for i in range(3):
            singles.append(family.forward(model, x[i:i + 1]))
            single_counts.append(handle.image_token_counts)
    assert torch.equal(batch_counts, torch.cat(single_counts))
    assert len(set(batch_counts[:, -1].tolist())) == 3, "the three images should keep different counts"
    tolerance.assert_close(batched, torch.cat(singles), terms=fam.MODEL_TERMS)  # padded vs unpadded sums


def test_timm_batch_equals_single_runs_and_state_maps(timm_vit, tools):
    model = timm_vit("plain")
    x = fam.varied_images()
    thresholds = fam.calibrated(model)
    with torch.no_grad(), vtc.apply(model, vtc.DyMU(thresholds=thresholds)) as handle:
        batched = model(x)
        state = handle.state
        counts = handle.image_token_counts[:, -1]
        singles = torch.cat([model(x[i:i + 1]) for i in range(3)])
    tolerance.assert_close(batched, singles, terms=tools.vit_terms)  # padded vs unpadded sums
    assert counts.tolist() == state.valid.sum(1).tolist() and len(set(counts.tolist())) == 3
    n0 = state.origin.shape[1]
    for b in range(3):  # sizes of real tokens sum to N0, origin only points at real tokens
        real = state.valid[b]
        assert float(state.size[b][real].sum()) == n0 and float(state.size[b][~real].sum()) == 0
        assert bool(real[state.origin[b]].all())
        assert state.origin[b, 0] == 0 and state.size[b, 0] == 1  # CLS first, alone


def test_flat_images_get_fewer_tokens_than_noisy_ones(shapes_vit):
    """The same thresholds give a flat image fewer tokens than a noisy one (content-dependent counts)."""
    model = shapes_vit.model
    generator = torch.Generator().manual_seed(0)
    flat = torch.zeros(1, 3, 64, 64)
    noisy = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    counts = token_counts(model, "dymu:preset=mid", torch.cat([flat, noisy]))
    assert counts[0] < counts[1], counts.tolist()


def test_batch_top_edges_select_exactly_b_times_r():
    """One calibration batch: B * r edges above the threshold, which is the (B r + 1)-th score."""
    score = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64).abs()
    is_src, threshold = batch_top_edges(score, 4 * 3)
    assert int(is_src.sum()) == 12 and int((score > threshold).sum()) == 12
    assert threshold == score.flatten().sort(descending=True).values[12].item()
    duplicates = torch.cat([torch.full((1, 9), 0.99, dtype=torch.float64), torch.rand(3, 9, dtype=torch.float64) * 0.5])
    is_src, _ = batch_top_edges(duplicates, 4 * 3)
    assert int(is_src[0].sum()) == 9  # the redundant image takes more than its r = 3 merges
    negative = -torch.rand(2, 5, dtype=torch.float64)
    assert batch_top_edges(negative, 2)[1] == 0.0  # clamped at 0


def test_running_mean_over_batches(timm_vit):
    """A layer's threshold is the mean of its per-batch thresholds."""
    model = timm_vit("plain")
    x = torch.cat([fam.varied_images(seed) for seed in range(3)])
    per_batch = []
    for batch in x.split(3):
        single = calibrate(model, batch, "mid", batch_size=3, progress=False)
        per_batch.append(single.thresholds[0])  # layer 0 sees the unmerged batch in both runs
    whole = calibrate(model, x, "mid", batch_size=3, progress=False)
    assert whole.thresholds[0] == sum(per_batch) / 3  # the same float64 sum, in the same order, over 3


def test_calibration_hits_its_target_within_five_percent(shapes_vit):
    from vtc.data import shapes, training

    images = training.pixels([e.image for e in shapes.examples("train", 96, start=5000)])
    for target in ("mid", 120):
        result = calibrate(shapes_vit.model, images, target, batch_size=32, progress=False)
        assert abs(result.realised - result.target) <= 0.05 * result.target, (target, result.realised, result.target)
    low = calibrate(shapes_vit.model, images, "low", batch_size=32, progress=False, clamp=True)
    assert abs(low.realised - low.target) <= 0.05 * low.target and low.schedule == "constant+clamp"


def test_calibration_saves_loads_and_refuses_other_models(tmp_path, timm_vit, shapes_vit):
    model = timm_vit("plain")
    result = calibrate(model, fam.varied_images(), "high", batch_size=3, progress=False, held_out=fam.varied_images(5))
    assert result.held_out is not None and result.held_out_std is not None
    folder = result.save(tmp_path / "cal")
    assert sorted(p.name for p in folder.iterdir()) == ["dymu.json", "thresholds.safetensors"]
    with pytest.raises(FileExistsError, match="overwrite"):
        result.save(folder)
    loaded = load_calibration(folder)
    assert loaded.thresholds == result.thresholds and loaded.merges == result.merges
    x = fam.varied_images(7)
    with torch.no_grad():
        with vtc.apply(model, vtc.DyMU(calibration=str(folder))):
            from_file = model(x)
        with vtc.apply(model, vtc.DyMU(thresholds=tuple(loaded.thresholds))):
            direct = model(x)
    assert torch.equal(from_file, direct)
    with pytest.raises(ValueError, match="was made for an encoder with"):
        vtc.apply(shapes_vit.model, vtc.DyMU(calibration=str(folder)))
    meta = json.loads((folder / "dymu.json").read_text())
    meta["model_id"] = "someone/else"
    (folder / "dymu.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="someone/else"):
        vtc.apply(model, vtc.DyMU(calibration=str(folder)))


def test_shipped_presets_load_by_name(shapes_vit):
    for preset in ("low", "mid", "high"):
        by_name = load_calibration(f"shapes-vit/{preset}")
        assert by_name.preset == preset and by_name.model_id == "shapes-vit"
        assert abs(by_name.held_out - by_name.target) <= 0.1 * by_name.target
    with torch.no_grad(), vtc.apply(shapes_vit.model, "dymu:preset=low") as handle:
        shapes_vit.model(torch.zeros(1, 3, 64, 64))
        assert handle.image_token_counts[0, -1] < 257


def test_bad_input_gives_clear_errors(timm_vit):
    model = timm_vit("plain")
    with pytest.raises(ValueError, match="got 2 thresholds but this timm encoder has 4 layers"):
        vtc.apply(model, "dymu:thresholds=0.9;0.8")
    with pytest.raises(ValueError, match="exactly one of"):
        vtc.parse_reducer("dymu")
    with pytest.raises(ValueError, match="exactly one of"):
        vtc.parse_reducer("dymu:thresholds=0.9,preset=low")
    with pytest.raises(ValueError, match="unknown preset"):
        vtc.parse_reducer("dymu:preset=tiny")
    with pytest.raises(ValueError, match="no calibration ships"):
        vtc.apply(model, "dymu:preset=low")
    with pytest.raises(ValueError, match="outside 1..64"):
        calibrate(model, fam.varied_images(), 65, progress=False)
    with pytest.raises(ValueError, match="vtu must be one of"):
        vtc.parse_reducer("dymu:thresholds=0.9,vtu=fast")
    with pytest.raises(TypeError, match="generator"):
        calibrate(model, (x for x in [fam.varied_images()]), "mid", progress=False)
    with pytest.raises(FileNotFoundError, match="no DyMU calibration"):
        load_calibration("nowhere/low")


def test_merge_schedule_presets_and_clamp():
    info = EncoderInfo("timm", 24, 577, 1, True, (24, 24))
    assert merge_schedule(info, "low", "constant") == (72.0, [21] * 24)  # the paper's 72out: R = 504
    assert merge_schedule(info, "mid", "constant")[1] == [16] * 24
    assert merge_schedule(info, "high", "constant")[1] == [8] * 24
    shallow = EncoderInfo("timm", 6, 257, 1, True, (16, 16))
    with pytest.raises(ValueError, match="clamp=True"):
        merge_schedule(shallow, "low", "constant")
    target, merges = merge_schedule(shallow, "low", "constant", clamp=True)
    assert sum(merges) == 256 - 32
    n = 257
    for r in merges:  # every layer now within ToMe's cap
        assert r <= (n - 1) // 2
        n -= r


def test_calibrating_reducer_records_one_threshold_per_batch(timm_vit):
    model = timm_vit("plain")
    reducer = CalibrationRecorder(target="mid")
    with torch.no_grad(), vtc.apply(model, reducer):
        model(fam.varied_images())
        model(fam.varied_images(1))
    assert reducer.counts.tolist() == [2.0 if r else 0.0 for r in reducer.merges]


def test_accelerate_single_process_matches_plain_calibration(timm_vit):
    accelerate = pytest.importorskip("accelerate")
    model = timm_vit("plain")
    x = fam.varied_images()
    plain = calibrate(model, x, "mid", batch_size=3, progress=False)
    accelerated = calibrate(model, x, "mid", batch_size=3, progress=False, accelerator=accelerate.Accelerator(cpu=True))
    # one process: the reduction over processes is the identity, the same sums in the same order
    assert accelerated.thresholds == plain.thresholds and accelerated.realised == plain.realised
    assert isinstance(accelerated, Calibration)


def _bits(values) -> list[str]:
    return [float(v).hex() for v in values]


def test_calibration_reloads_bit_identical(tmp_path, timm_vit):
    """Thresholds averaged over batches are float64 values float32 cannot hold; a saved and
    reloaded calibration gives them back bit for bit, and the same counts and outputs."""
    model = timm_vit("plain")
    images = torch.cat([fam.varied_images(seed) for seed in (11, 12)])
    result = calibrate(model, images, "mid", batch_size=3, progress=False)
    as_float32 = torch.tensor(result.thresholds, dtype=torch.float32).double().tolist()
    assert _bits(as_float32) != _bits(result.thresholds), "the check needs a threshold float32 rounds"
    loaded = load_calibration(result.save(tmp_path / "cal"))
    assert _bits(loaded.thresholds) == _bits(result.thresholds)
    x = torch.cat([fam.varied_images(7), fam.varied_images(8)])
    with torch.no_grad():
        with vtc.apply(model, vtc.DyMU(thresholds=tuple(result.thresholds))) as handle:
            in_memory, memory_counts = model(x), handle.image_token_counts
        with vtc.apply(model, vtc.DyMU(calibration=str(tmp_path / "cal"))) as handle:
            from_file, file_counts = model(x), handle.image_token_counts
    assert torch.equal(file_counts, memory_counts) and torch.equal(from_file, in_memory)


def test_an_edge_between_the_float32_and_float64_threshold_merges_before_and_after_saving(tmp_path, timm_vit):
    """A threshold t64 whose float32 rounding is an edge's score s (t64 < s = fl32(t64)): the
    edge scores strictly above the threshold, so it merges, from memory and after reloading."""
    model = timm_vit("plain")
    x = fam.varied_images()[2:]  # the noise image: distinct edge scores
    seen = {}

    class Recording(vtc.DyMU):
        def reduce(self, state, signals, budget, layer):
            seen[layer] = bipartite_match(signals.key_mean.float(), state.n_prefix, state.valid)[0]
            return super().reduce(state, signals, budget, layer)

    with torch.no_grad(), vtc.apply(model, Recording(thresholds=(-1.0, 1.0, 1.0, 1.0), vtu="off")) as handle:
        model(x)
        info = handle.adapter.info
    scores = seen[0][0].sort(descending=True).values  # float32, layer 0 of the one image
    k = 3
    edge = scores[k - 1]
    assert scores[k - 2] > edge > scores[k]  # no tie at the decisive edge
    below = edge.double() - torch.finfo(torch.float32).eps * edge.double().abs() / 8  # within half an ulp below s
    assert below.float() == edge and below < edge.double()
    tau = below.item()
    calibration = Calibration(
        thresholds=[tau, 1.0, 1.0, 1.0], merges=[8, 0, 0, 0], schedule="constant", target=57.0,
        encoder={"family": info.family, "num_layers": info.num_layers, "num_tokens": info.num_tokens,
                 "n_prefix": info.n_prefix},
        model_id=info.model_id,
    )
    folder = calibration.save(tmp_path / "edge")
    assert _bits(load_calibration(folder).thresholds) == _bits(calibration.thresholds)
    n0 = info.num_tokens
    with torch.no_grad():
        for reducer in (vtc.DyMU(thresholds=(tau, 1.0, 1.0, 1.0)), vtc.DyMU(calibration=str(folder))):
            with vtc.apply(model, reducer) as handle:
                model(x)
                assert handle.image_token_counts[0, 1].item() == n0 - k, reducer.describe()


def _flat() -> torch.Tensor:
    """One flat grey image: with zero positional embeddings all its tokens are identical."""
    return torch.full((1, 3, 32, 32), 0.3)


@pytest.mark.parametrize("tower", ["timm-nocls", "hf-siglip-vision"])
def test_no_cls_image_merged_to_one_token_passes_through_later_blocks(models, timm_vit, tower):
    """Without a CLS token an image can be merged down to one token; the blocks after that have
    nothing to merge and pass it through. With zero positional embeddings a flat image's tokens
    are identical, so merging them is lossless: the output is the unreduced model's."""
    if tower == "timm-nocls":
        model = timm_vit("nocls", depth=8)  # 64 tokens: 32, 16, 8, 4, 2, 1, then two blocks with one token
        with torch.no_grad():
            model.pos_embed.zero_()
        forward, expected, patch, width = (lambda m, x: m(x)), [64, 32, 16, 8, 4, 2, 1, 1, 1], 4, model.embed_dim
    else:
        family = fam.FAMILIES[tower]
        model = models.fresh(tower, patch=16)  # 2 x 2 patches: 4, 2, 1, then two blocks with one token
        family.zero_positions(model)
        forward, expected, patch, width = family.forward, [4, 2, 1, 1, 1], 16, fam.WIDTH
    x = _flat()
    with torch.no_grad():
        reference = forward(model, x)
        with vtc.apply(model, "dymu:thresholds=-1") as handle:
            out = forward(model, x)
            counts = handle.image_token_counts
    assert counts[0].tolist() == expected
    assert handle.state.size.sum().item() == expected[0]
    # the same values through other orders: patch embedding, the blocks, a pooling head like one more block
    depth = len(expected) - 1
    terms = 3 * patch * patch + tolerance.transformer_terms(depth + 1, width, expected[0])
    tolerance.assert_close(out, reference, terms=terms)


def test_batch_with_one_image_down_to_one_token_equals_single_runs(timm_vit):
    """A flat image reaches one token while a noise image keeps many: the padded batch gives each
    image the counts and output of its own single run."""
    model = timm_vit("nocls", depth=8)
    with torch.no_grad():
        model.pos_embed.zero_()
    x = torch.cat([_flat(), fam.images(1, seed=3)])
    spec = "dymu:thresholds=0.999"
    with torch.no_grad(), vtc.apply(model, spec) as handle:
        batched, batch_counts = model(x), handle.image_token_counts
        singles, single_counts = [], []
        for i in range(2):
            singles.append(model(x[i:i + 1]))
            single_counts.append(handle.image_token_counts)
    assert batch_counts[0].tolist() == [64, 32, 16, 8, 4, 2, 1, 1, 1]
    assert batch_counts[1, -1] > 1
    assert torch.equal(batch_counts, torch.cat(single_counts))
    # padded vs unpadded attention: the same sums in other orders (patch embedding, 8 blocks, avg-pool head)
    terms = 3 * 4 * 4 + tolerance.transformer_terms(8, model.embed_dim, 64) + 64
    tolerance.assert_close(batched, torch.cat(singles), terms=terms)


@pytest.mark.parametrize("n_prefix", [0, 1])
def test_threshold_matching_on_one_token_is_the_identity(n_prefix):
    """One token (plus a prefix) leaves no B token to merge into: the map is the identity."""
    n = 1 + n_prefix
    metric = torch.randn(2, n, 4)
    dest, real, n_out = bipartite_threshold_matching(metric, -1.0, n_prefix)
    assert torch.equal(dest, torch.arange(n).expand(2, n)) and real.tolist() == [n, n] and n_out == n


def test_a_calibration_object_is_used_as_its_folder_is_and_realised_counts_it_so(tmp_path, timm_vit):
    model = timm_vit("plain")
    result = calibrate(model, fam.varied_images(), "mid", batch_size=3, cap=1.5, progress=False)
    assert result.cap == 1.5 and load_calibration(result.save(tmp_path / "cal")).cap == 1.5
    x = fam.varied_images()
    with torch.no_grad():
        with vtc.apply(model, vtc.DyMU(calibration=result, cap=1.5)) as handle:
            from_object = model(x)
            counts = handle.image_token_counts[:, -1] - 1  # patch tokens leaving the last block
        with vtc.apply(model, vtc.DyMU(calibration=str(tmp_path / "cal"), cap=1.5)):
            from_folder = model(x)
    assert torch.equal(from_object, from_folder)
    assert result.realised == float(counts.float().mean())  # the calibration images, counted as used
    assert "calibration=<DyMU calibration of" in vtc.DyMU(calibration=result).describe()
