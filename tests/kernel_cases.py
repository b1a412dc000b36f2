"""Every Triton kernel against its PyTorch reference, run in Triton's CPU interpreter.

Not collected by the main run: ``tests/test_kernels.py`` runs this file in a fresh process with
``TRITON_INTERPRET=1``, which Triton reads when it is first imported.
"""

from __future__ import annotations

import os

import pytest
import tolerance
import torch

from vtc.kernels import bipartite_match, bipartite_match_reference, merge_weighted, merge_weighted_reference, use_backend
from vtc.kernels.dispatch import interpreting
from vtc.merge import bipartite_threshold_matching

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 2, 3), (2, 3, 5), (3, 16, 8), (2, 31, 17), (1, 65, 40), (2, 130, 24)]
LONG = [(1, 513, 16), (1, 1025, 8)]  # the interpreter is slow: fewer dtypes at these lengths
CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES]


def test_the_interpreter_is_on():
    assert os.environ.get("TRITON_INTERPRET") == "1" and interpreting()


def _metric(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def _assert_same_matches(metric, n_prefix, valid):
    with use_backend("triton"):
        score, index = bipartite_match(metric, n_prefix, valid)
    ref_score, ref_index = bipartite_match_reference(metric, n_prefix, valid)
    finite = torch.isfinite(ref_score)
    assert torch.equal(torch.isfinite(score), finite)
    # cosines (|value| <= 1) from float32 dot products over the channels, summed in other orders
    noise = tolerance.tolerance(torch.float32, metric.shape[-1], scale=1.0)
    tolerance.assert_close(score[finite], ref_score[finite].float(), terms=metric.shape[-1], scale=1.0)
    # identical decisions except where the best two candidates are closer than the float32 noise
    norm = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-30)
    sims = norm[:, 0::2] @ norm[:, 1::2].transpose(1, 2)
    chosen = sims.gather(2, index[..., None])[..., 0]
    close = (sims.gather(2, ref_index[..., None])[..., 0] - chosen).abs() < 2 * noise  # both scores err
    assert bool(((index == ref_index) | close | ~finite).all())


@pytest.mark.parametrize(("shape", "dtype"), CASES + [(s, d) for s in LONG for d in (torch.float32, torch.bfloat16)], ids=str)
def test_bipartite_match_equals_the_reference(shape, dtype):
    metric = _metric(shape, dtype, seed=shape[1])
    _assert_same_matches(metric, 0, None)
    _assert_same_matches(metric, 1, None)
    valid = torch.arange(shape[1]) < max(1, shape[1] - shape[1] // 3)
    valid = valid.expand(shape[0], -1).clone()
    valid[0, 0] = shape[1] == 1  # a padded first token too
    _assert_same_matches(metric, 1, valid)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_lowest_index(dtype):
    metric = torch.ones(2, 77, 12, dtype=dtype)  # every pair has cosine 1
    for n_prefix in (0, 1, 2):
        with use_backend("triton"):
            score, index = bipartite_match(metric, n_prefix)
        ref_score, ref_index = bipartite_match_reference(metric, n_prefix)
        assert torch.equal(index, ref_index)
        assert bool((index[:, (n_prefix + 1) // 2 :] == n_prefix // 2).all())  # the first eligible B token


@pytest.mark.parametrize(("shape", "dtype"), CASES + [(s, torch.float32) for s in LONG], ids=str)
def test_merge_weighted_equals_the_reference_and_is_deterministic(shape, dtype):
    batch, n, channels = shape
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(batch, n, channels, generator=generator).to(dtype)
    size = torch.rand(batch, n, generator=generator) * 3 + 0.5
    n_out = max(1, n // 2 + 1)
    dest = torch.randint(0, n_out, (batch, n), generator=generator)
    with use_backend("triton"):
        again, _ = merge_weighted(x, size, dest, n_out)
    for weights in (size, None):
        with use_backend("triton"):
            out, out_size = merge_weighted(x, weights, dest, n_out)
        ref, ref_size = merge_weighted_reference(x, weights, dest, n_out)
        if weights is size:
            assert torch.equal(out, again)  # no atomics: the same bits every run
        torch.testing.assert_close(out_size, ref_size.float())
        torch.testing.assert_close(out, ref)  # dtype tolerance (bf16: 1 ulp)
        empty = ref_size == 0
        assert bool((out[empty] == 0).all())


def test_threshold_matching_on_the_kernels():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 16)
    valid = torch.arange(40) < torch.tensor([[40], [29], [33]])
    for tau in (0.3, 0.0, float("-inf")):
        with use_backend("triton"):
            dest, real, width = bipartite_threshold_matching(x, tau, 1, valid)
        with use_backend("reference"):
            ref_dest, ref_real, ref_width = bipartite_threshold_matching(x, tau, 1, valid)
        assert torch.equal(dest, ref_dest) and torch.equal(real, ref_real) and width == ref_width


def test_tome_in_a_vit_takes_the_same_decisions(timm_vit):
    import vtc

    model = timm_vit("plain")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with vtc.apply(model, "tome:r=4") as handle, torch.no_grad():
        with use_backend("reference"):
            reference = model(images)
            ref_origin = handle.state.origin
        with use_backend("triton"):
            fused = model(images)
            assert torch.equal(handle.state.origin, ref_origin)
    # depth 4, width 48, 65 tokens (tests/conftest.py BASE), the 48-wide head
    tolerance.assert_close(fused, reference, terms=tolerance.transformer_terms(4, 48, 65) + 48)
