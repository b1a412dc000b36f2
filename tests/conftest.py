"""Shared fixtures for the core tests: tiny timm ViTs built from configs, saved with safetensors
and reloaded through the real ``timm.create_model(..., pretrained=True)`` path (no download).

Test modules run with ``--import-mode=importlib``, so they cannot import this file; everything
they share is handed out as fixtures (``timm_vit`` builds models, ``tools`` holds helpers).
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import tolerance  # noqa: E402
import torch  # noqa: E402

# The models are tiny: one intra-op thread is fastest, and on a shared 2-core machine OpenMP
# threads spinning against other processes made the suite ~10x slower. VTC_TEST_THREADS=N runs
# it with N threads instead: results must not depend on how the CPU kernels split their sums.
_THREADS = os.environ.get("VTC_TEST_THREADS", "1")
if not _THREADS.isdigit() or int(_THREADS) < 1:
    raise pytest.UsageError(f"VTC_TEST_THREADS must be a positive number of threads, got {_THREADS!r}")
torch.set_num_threads(int(_THREADS))

NAME = "vit_tiny_patch16_224"
IMAGE, PATCH, GRID = 32, 4, 8
BASE = dict(img_size=IMAGE, patch_size=PATCH, depth=4, embed_dim=48, num_heads=3, num_classes=10)
# accumulated products from pixels to logits (tests/tolerance.py): patch embedding, blocks, head
VIT_TERMS = 3 * PATCH * PATCH + tolerance.transformer_terms(BASE["depth"], BASE["embed_dim"], GRID * GRID + 5) + BASE["embed_dim"]

# Every variant a reducer must work on (task: registers, avg / attention pooling, LayerScale,
# qk-norm, eager attention, no class token).
VARIANTS: dict[str, dict] = {
    "plain": {},
    "reg": dict(reg_tokens=4),
    "reg_noembed": dict(reg_tokens=4, no_embed_class=True),
    "avg": dict(global_pool="avg"),
    "map": dict(global_pool="map"),
    "layerscale": dict(init_values=0.5),
    "qknorm": dict(qk_norm=True),
    "eager": {},  # fused_attn = False on every block
    "nocls": dict(class_token=False, global_pool="avg"),
}
CLS_VARIANTS = [v for v in VARIANTS if v != "nocls"]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit-ish scale so attention is far from uniform and reducers matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in ("pos_embed", "token", "latent")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # norm weights, LayerScale gammas
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)


class TimmFactory:
    """Builds, saves (safetensors) and reloads tiny timm ViTs once per session; hands out copies."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self._cache: dict = {}

    def __call__(self, variant: str = "plain", seed: int = 0, **overrides) -> torch.nn.Module:
        key = (variant, seed, tuple(sorted(overrides.items())))
        if key not in self._cache:
            self._cache[key] = self._load(variant, seed, overrides, len(self._cache))
        return copy.deepcopy(self._cache[key])

    def _load(self, variant: str, seed: int, overrides: dict, index: int) -> torch.nn.Module:
        import timm
        from safetensors.torch import save_file

        kwargs = {**BASE, **VARIANTS[variant], **overrides}
        built = timm.create_model(NAME, **kwargs)
        _randomize(built, seed)
        path = self.directory / f"model{index}.safetensors"
        save_file(built.state_dict(), str(path))
        overlay = dict(file=str(path), num_classes=kwargs["num_classes"])
        model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
        expected = built.state_dict()
        loaded = model.state_dict()
        assert expected.keys() == loaded.keys()
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), "create_model did not load the file"
        if variant == "eager":
            for block in model.blocks:
                block.attn.fused_attn = False
        return model


@pytest.fixture(scope="session")
def timm_vit(tmp_path_factory) -> TimmFactory:
    """``timm_vit(variant, **create_model_overrides)`` -> a fresh eval-mode tiny ViT (a copy)."""
    return TimmFactory(tmp_path_factory.mktemp("timm_vits"))


def _images(batch: int, seed: int = 0, dtype=torch.float32, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _duplicate_pair_image(n_prefix: int, n_pairs: int, dtype=torch.float64, seed: int = 0):
    """An image whose patches are random except ``n_pairs`` exact duplicate pairs placed at token
    positions (2i, 2i+1), i.e. one A and one B token of ToMe's split, spaced apart.

    Returns the image and the list of (A patch, B patch) indices.
    """
    image = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pairs = []
    token = n_prefix + n_prefix % 2  # first even token index after the prefix
    for _ in range(n_pairs):
        pairs.append((token - n_prefix, token + 1 - n_prefix))
        token += 4
    for a, b in pairs:
        (ra, ca), (rb, cb) = divmod(a, GRID), divmod(b, GRID)
        image[..., rb * PATCH:(rb + 1) * PATCH, cb * PATCH:(cb + 1) * PATCH] = \
            image[..., ra * PATCH:(ra + 1) * PATCH, ca * PATCH:(ca + 1) * PATCH]
    return image.to(dtype), pairs


def _permute_patches(image: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Move patch ``perm[i]`` of ``image`` to raster position ``i``."""
    b, c = image.shape[:2]
    patches = image.reshape(b, c, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, GRID * GRID, c, PATCH, PATCH)
    patches = patches[:, perm]
    return patches.reshape(b, GRID, GRID, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, IMAGE, IMAGE)


def _check_state_maps(state, n0: int, dropped_allowed: bool = False) -> None:
    """``origin`` is a valid map onto existing tokens whose counts equal the sizes; sizes sum to N0."""
    batch, n = state.x.shape[:2]
    origin = state.origin
    assert origin.shape == (batch, n0)
    assert int(origin.max()) < n
    if not dropped_allowed:
        assert bool((origin >= 0).all())
    sizes = state.sizes()
    for b in range(batch):
        kept = origin[b][origin[b] >= 0]
        counts = torch.bincount(kept, minlength=n).to(sizes.dtype)
        assert torch.equal(counts, sizes[b]), (counts, sizes[b])
        if not dropped_allowed:
            assert float(sizes[b].sum()) == n0
    p = state.n_prefix
    assert torch.equal(origin[:, :p], torch.arange(p).expand(batch, p))
    assert bool((sizes[:, :p] == 1).all())


@pytest.fixture(scope="session")
def llava(tmp_path_factory):
    """A tiny LLaVA-1.5 (CLIP tower, Llama decoder) and its processor, reloaded with from_pretrained."""
    import llava_models

    return llava_models.build_llava(tmp_path_factory.mktemp("llava"), kind="llava")


@pytest.fixture(scope="session")
def llava_next(tmp_path_factory):
    """A tiny LLaVA-NeXT (AnyRes tiles) and its processor, reloaded with from_pretrained."""
    import llava_models

    return llava_models.build_llava(tmp_path_factory.mktemp("next"), kind="next")


@pytest.fixture(scope="session")
def tools() -> SimpleNamespace:
    return SimpleNamespace(
        images=_images,
        duplicate_pair_image=_duplicate_pair_image,
        permute_patches=_permute_patches,
        check_state_maps=_check_state_maps,
        variants=list(VARIANTS),
        vit_terms=VIT_TERMS,
        cls_variants=CLS_VARIANTS,
        grid=GRID,
    )


def pytest_generate_tests(metafunc) -> None:
    """Tests taking ``vit_variant`` run on every variant; ``cls_vit_variant`` on those with CLS."""
    for name, values in (("vit_variant", list(VARIANTS)), ("cls_vit_variant", CLS_VARIANTS)):
        if name in metafunc.fixturenames and not any(name in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
            metafunc.parametrize(name, values)


@pytest.fixture(scope="session")
def shapes_vit():
    """The shipped shapes-vit checkpoint, loaded once by name."""
    from vtc.models import zoo

    return zoo.load("shapes-vit")


@pytest.fixture(scope="session")
def shapes_llava():
    """The shipped shapes-llava checkpoint (model and processor), loaded once by name."""
    from vtc.models import zoo

    return zoo.load("shapes-llava")
