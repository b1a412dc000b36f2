"""Tiny models of the backbone families vtc adapts, for the adapter and measurement tests.

Every model is built from a config, saved, and loaded back through the loading path users run
(docs/ARCHITECTURE.md): HF ``save_pretrained`` (safetensors) then ``from_pretrained``;
open_clip ``add_model_config`` then ``create_model(name, pretrained=<local .safetensors>)``.
Nothing is downloaded. Not a test module: test modules ``import families`` (``tests/`` is on
pytest's ``pythonpath``, set in pyproject.toml).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tolerance  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import vtc  # noqa: E402

WIDTH, HEADS, LAYERS, IMAGE, PATCH = 64, 4, 4, 32, 4
EMBED = 32  # CLIP joint embedding width
# accumulated products from the pixels to a pooled, projected output: patch embedding, the blocks
# at the full 65 tokens, the projection (rounding bound of tests/tolerance.py)
MODEL_TERMS = 3 * PATCH * PATCH + tolerance.transformer_terms(LAYERS, WIDTH, 65) + WIDTH


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights of unit-ish scale (HF initialises with std 0.02, which makes attention nearly uniform
    and CLS-attention rankings nearly tied): reducers then make clear, reproducible choices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in ("position", "class_embedding", "probe", "query")):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif "logit" in name:
                continue
            else:  # norm weights
                p.copy_(1 + torch.randn(p.shape, generator=generator) * 0.1)
    return model


# ----- HF ----------------------------------------------------------------------------------------
def _hf_vision_kwargs(patch: int) -> dict:
    return dict(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE, patch_size=patch,
    )


def _hf_roundtrip(model: nn.Module, directory: Path) -> nn.Module:
    randomize(model)
    model.save_pretrained(directory)  # safetensors by default
    assert (directory / "model.safetensors").is_file()
    loaded = type(model).from_pretrained(directory).eval()
    saved = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} did not survive save_pretrained/from_pretrained"
    return loaded


def hf_clip_vision(directory: Path, patch: int = PATCH) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    return _hf_roundtrip(CLIPVisionModel(CLIPVisionConfig(**_hf_vision_kwargs(patch))), directory)


def hf_siglip_vision(directory: Path, patch: int = PATCH) -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(**_hf_vision_kwargs(patch))
    assert config.vision_use_head, "the default SigLIP tower has the attention-pooling head"
    return _hf_roundtrip(SiglipVisionModel(config), directory)


def _hf_text_kwargs() -> dict:
    return dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def hf_clip_model(directory: Path, patch: int = PATCH) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=_hf_text_kwargs(), vision_config=_hf_vision_kwargs(patch), projection_dim=EMBED)
    return _hf_roundtrip(CLIPModel(config), directory)


def hf_siglip_model() -> nn.Module:
    """A SigLIP dual encoder built from its config (only used for error checks)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    return SiglipModel(SiglipConfig(text_config=_hf_text_kwargs(), vision_config=_hf_vision_kwargs(PATCH))).eval()


# ----- open_clip ---------------------------------------------------------------------------------
def open_clip_config(patch: int = PATCH, **vision) -> dict:
    return dict(
        embed_dim=EMBED,
        vision_cfg=dict(image_size=IMAGE, layers=LAYERS, width=WIDTH, patch_size=patch, head_width=WIDTH // HEADS, **vision),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
    )


def to_lnd(model: nn.Module) -> nn.Module:
    """Switch an open_clip vision tower to the LND (sequence-first) layout of older open_clip.

    open_clip 3.3.0's VisionTransformer always builds its Transformer batch-first (there is no
    constructor flag for the tower); ``Transformer.forward`` transposes to LND when its
    ``batch_first`` is False, and every block's ``nn.MultiheadAttention`` must then agree.
    """
    transformer = model.visual.transformer
    transformer.batch_first = False
    for block in transformer.resblocks:
        block.attn.batch_first = False
    return model


def open_clip_model(directory: Path, patch: int = PATCH, lnd: bool = False, **vision) -> nn.Module:
    """A registered tiny config, weights saved as safetensors, loaded by ``create_model``."""
    import open_clip
    from safetensors.torch import save_file

    cfg = open_clip_config(patch, **vision)
    name = f"vtc-test-{directory.name}"
    config_file = directory / f"{name}.json"
    config_file.write_text(json.dumps(cfg))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    reference = randomize(open_clip.CLIP(**copy.deepcopy(cfg)))
    weights = directory / "open_clip_model.safetensors"
    save_file(reference.state_dict(), str(weights))
    model = open_clip.create_model(name, pretrained=str(weights)).eval()
    saved = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} did not survive create_model(pretrained=...)"
    return to_lnd(model) if lnd else model


def _open_clip_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.encode_image(x)


def _hf_pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).pooler_output


def _hf_image_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.get_image_features(pixel_values=x).pooler_output


def _zero_open_clip_pos(model: nn.Module) -> None:
    model.visual.positional_embedding.data.zero_()


def _zero_hf_pos(model: nn.Module) -> None:
    vision = getattr(model, "vision_model", model)
    vision.embeddings.position_embedding.weight.data.zero_()


@dataclass(frozen=True)
class Family:
    """One backbone configuration: how to build it, what its pooled output is, what it has."""

    name: str
    build: Callable[..., nn.Module]  # (directory, patch=...) -> eval model loaded from disk
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # the pooled image output
    n_prefix: int
    zero_positions: Callable[[nn.Module], None]

    @property
    def has_cls(self) -> bool:
        return self.n_prefix > 0

    def __str__(self) -> str:
        return self.name


def _oc(**kw) -> Callable[..., nn.Module]:
    return lambda directory, patch=PATCH: open_clip_model(directory, patch, **kw)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("open_clip", _oc(), _open_clip_image, 1, _zero_open_clip_pos),
        Family("open_clip-lnd", _oc(lnd=True), _open_clip_image, 1, _zero_open_clip_pos),
        Family("open_clip-avg", _oc(pool_type="avg"), _open_clip_image, 1, _zero_open_clip_pos),
        Family(
            "open_clip-attnpool", _oc(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
            _open_clip_image, 1, _zero_open_clip_pos,
        ),
        Family("hf-clip-vision", hf_clip_vision, _hf_pooled, 1, _zero_hf_pos),
        Family("hf-clip-model", hf_clip_model, _hf_image_features, 1, _zero_hf_pos),
        Family("hf-siglip-vision", hf_siglip_vision, _hf_pooled, 0, _zero_hf_pos),
    )
}
OPEN_CLIP = [name for name in FAMILIES if name.startswith("open_clip")]
HF = [name for name in FAMILIES if name.startswith("hf")]

# Spec strings with a real reduction at the default 8x8 patch grid (65 tokens with CLS, 64 without).
REDUCERS = ("tome:r=8", "evit:keep=0.5", "random:keep=0.5", "pool:kernel=2", "pool:tokens=16")


def reducers_for(family: Family, specs=REDUCERS) -> list[str]:
    """The specs that apply to a family (EViT needs a CLS token)."""
    return [s for s in specs if family.has_cls or not s.startswith("evit")]


def images(batch: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=generator).to(dtype)


def varied_images(seed: int = 0) -> torch.Tensor:
    """Images of decreasing redundancy: smooth, half smooth, noise (32 x 32, as IMAGE), which DyMU
    reduces to three different counts. Smooth, not flat: exact duplicates put many edges at one
    score, where the last bit of a padded batch's arithmetic could decide a tie at the threshold."""
    noise = images(3, seed=seed)
    coarse = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed + 100))
    smooth = torch.nn.functional.interpolate(coarse, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
    half = noise[1].clone()
    half[:, :, IMAGE // 2:] = smooth[1, :, :, IMAGE // 2:]
    return torch.stack([smooth[0], half, noise[2]])


def calibrated(model: nn.Module, target: str = "mid") -> tuple[float, ...]:
    """DyMU thresholds calibrated on other images than :func:`varied_images` (on its own images a
    calibrated threshold equals an edge's score, a tie that the last bit of arithmetic decides)."""
    from vtc.dymu import calibrate

    calibration = torch.cat([varied_images(seed) for seed in (11, 12)])
    return tuple(calibrate(model, calibration, target, batch_size=3, progress=False).thresholds)


def duplicate_pair_image(n_prefix: int, pair_starts, patch: int, dtype=torch.float64) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """An image whose patches repeat so that chosen ToMe (A, B) pairs are exact duplicates.

    ToMe splits the *sequence* (prefix included) into A = even and B = odd positions, and the
    A token at position ``2i`` is paired with the B token at ``2i + 1``. Patch ``q`` sits at
    sequence position ``q + n_prefix`` (row-major), so pair ``i`` is patches
    ``(2i - n_prefix, 2i + 1 - n_prefix)``: with a CLS token (1, 2), (5, 6), ...; without
    (SigLIP) (0, 1), (4, 5), .... The second patch of each pair is overwritten by the first.

    Returns the (1, 3, H, W) image and the sequence positions ``(2i, 2i + 1)`` of the pairs.
    """
    grid = IMAGE // patch
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 3, IMAGE, IMAGE, generator=generator, dtype=torch.float64)
    positions = []
    for i in pair_starts:
        a, b = 2 * i - n_prefix, 2 * i + 1 - n_prefix
        assert a >= 0
        (ra, ca), (rb, cb) = divmod(a, grid), divmod(b, grid)
        x[:, :, rb * patch:(rb + 1) * patch, cb * patch:(cb + 1) * patch] = \
            x[:, :, ra * patch:(ra + 1) * patch, ca * patch:(ca + 1) * patch]
        positions.append((2 * i, 2 * i + 1))
    return x.to(dtype), positions


def no_instance_patches(model: nn.Module) -> list[str]:
    """Names of modules that still carry an instance-level override left by vtc."""
    left = []
    for name, module in model.named_modules():
        for attr in ("forward", "_global_pool", "pool"):
            if attr in module.__dict__:
                left.append(f"{name or '<root>'}.{attr}")
    if "_vtc_handle" in model.__dict__:
        left.append("<root>._vtc_handle")
    return left


class ModelCache:
    """Builds each family once per test module (tests restore the models they patch)."""

    def __init__(self, tmp_path_factory) -> None:
        self._factory = tmp_path_factory
        self._models: dict[tuple[str, int], nn.Module] = {}

    def get(self, name: str, patch: int = PATCH) -> nn.Module:
        key = (name, patch)
        if key not in self._models:
            directory = self._factory.mktemp(f"{name}-p{patch}")
            self._models[key] = FAMILIES[name].build(directory, patch=patch)
        return self._models[key]

    def fresh(self, name: str, patch: int = PATCH) -> nn.Module:
        """A private copy the caller may modify (dtype, positions)."""
        return copy.deepcopy(self.get(name, patch))


# ----- checks shared by the adapter test modules -------------------------------------------------

IDENTITY_SPECS = ("tome:r=0", "evit:keep=1", "random:keep=1", "tome:r=0;0;0;0", "evit:keep=1,layers=0;1")


def check_identity(model: nn.Module, family: Family, spec: str) -> None:
    """A zero budget is the unpatched model, bit for bit."""
    x = images(2)
    with torch.no_grad():
        reference = family.forward(model, x)
        with vtc.apply(model, spec) as handle:
            out = family.forward(model, x)
            counts = handle.token_counts
    n0 = counts[0]
    assert counts == [n0] * (LAYERS + 1)
    assert torch.equal(out, reference), f"{spec}: max diff {(out - reference).abs().max().item():.3g}"


def check_remove_restores(model: nn.Module, family: Family, spec: str) -> None:
    assert no_instance_patches(model) == []
    x = images(2, seed=1)
    with torch.no_grad():
        reference = family.forward(model, x)
        handle = vtc.apply(model, spec)
        reduced = family.forward(model, x)
        assert handle.token_counts[-1] < handle.token_counts[0]
        assert not torch.allclose(reduced, reference, atol=1e-4), "the reduction should change the output"
        handle.remove()
        assert no_instance_patches(model) == []
        assert torch.equal(family.forward(model, x), reference)
        handle.remove()  # idempotent
        with vtc.apply(model, spec):  # and applicable again
            assert torch.equal(family.forward(model, x), reduced)
        assert torch.equal(family.forward(model, x), reference)


def check_batch_equals_singles(model: nn.Module, family: Family, spec: str) -> None:
    x = images(3, seed=2)
    with torch.no_grad(), vtc.apply(model, spec) as handle:
        batched = family.forward(model, x)
        batch_counts = handle.token_counts
        singles = []
        for i in range(x.shape[0]):
            singles.append(family.forward(model, x[i:i + 1]))
            assert handle.token_counts == batch_counts
    tolerance.assert_close(batched, torch.cat(singles), terms=MODEL_TERMS, msg=f"{family.name} {spec}")


def check_low_precision(model: nn.Module, family: Family, spec: str, dtype: torch.dtype) -> None:
    """``model`` is a private copy: it is cast to ``dtype``."""
    model.to(dtype)
    x = images(2, seed=3, dtype=dtype)
    with torch.no_grad():
        reference = family.forward(model, x)
        with vtc.apply(model, spec) as handle:
            out = family.forward(model, x)
            assert handle.token_counts == handle.planned_token_counts()
    assert out.dtype == dtype and out.shape == reference.shape
    assert torch.isfinite(out).all() and torch.isfinite(reference).all()


def check_token_counts(model: nn.Module, family: Family, spec: str) -> None:
    x = images(2, seed=4)
    with torch.no_grad(), vtc.apply(model, spec) as handle:
        family.forward(model, x)
        counts, planned = handle.token_counts, handle.planned_token_counts()
        state = handle.state
    n0 = 64 + family.n_prefix
    assert counts == planned
    assert counts[0] == n0 and len(counts) == LAYERS + 1
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[-1] < n0
    assert state.x.shape[:2] == (2, counts[-1])
    # every original patch is accounted for: merged tokens carry their size, dropped ones are -1
    sizes = state.sizes().sum(dim=1)
    carried = (state.origin >= 0).sum(dim=1).to(sizes.dtype)
    if spec.startswith(("tome", "pool", "evit")):  # merging / fusing keeps all patches
        assert torch.equal(sizes, torch.full_like(sizes, n0)) and torch.equal(carried, sizes)
    else:  # random drop discards
        assert torch.equal(sizes, torch.full_like(sizes, counts[-1])) and torch.equal(carried, sizes)


def check_exactness(models: ModelCache, family: Family, prop_attn: bool) -> tuple[float, torch.Tensor]:
    """ToMe check f.7: merging exact duplicates in the first layer changes nothing (float64).

    Returns the max abs difference to the unreduced pooled output and that output.
    """
    patch = 8  # 4x4 grid: 16 patches
    model = models.fresh(family.name, patch=patch).double()
    family.zero_positions(model)
    pair_starts = (1, 3, 6)
    x, positions = duplicate_pair_image(family.n_prefix, pair_starts, patch)
    k = len(positions)
    n0 = 16 + family.n_prefix
    spec = f"tome:r={k};0;0;0" + ("" if prop_attn else ",prop_attn=false")
    with torch.no_grad():
        reference = family.forward(model, x)
        with vtc.apply(model, spec) as handle:
            out = family.forward(model, x)
            origin = handle.state.origin[0]
            counts = handle.token_counts
    assert counts == [n0] + [n0 - k] * LAYERS
    for a, b in positions:  # exactly the duplicate pairs merged
        assert origin[a] == origin[b], f"positions {a} and {b} should have merged; origin {origin.tolist()}"
    assert len(set(origin.tolist())) == n0 - k
    if family.has_cls:
        assert origin[0] == 0
    return (out - reference).abs().max().item(), reference
