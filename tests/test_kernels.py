"""The kernel dispatch rule, and the Triton kernels checked in Triton's CPU interpreter (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtc.kernels import bipartite_match, merge_weighted, triton_available, use_backend
from vtc.kernels.dispatch import use_triton


def test_auto_takes_the_reference_on_cpu_tensors():
    x = torch.randn(2, 8, 4)
    assert not use_triton(x)
    with use_backend("reference"):
        assert not use_triton(x)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="kernel backend must be one of auto, reference, triton, got 'cuda'"):
        with use_backend("cuda"):
            pass


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_on_cpu_outside_the_interpreter_is_a_clear_error():
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        bipartite_match(torch.randn(1, 6, 4))
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        merge_weighted(torch.randn(1, 6, 4), None, torch.zeros(1, 6, dtype=torch.long), 1)


def test_float64_always_takes_the_reference():
    with use_backend("triton"):  # no Triton kernel for float64: the reference, not an error
        score, _ = bipartite_match(torch.randn(1, 6, 4, dtype=torch.float64))
    assert score.dtype == torch.float64


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_kernels_match_their_references_in_the_interpreter():
    tests = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "kernel_cases.py")],
        cwd=tests.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


def test_bench_kernels_formulations_agree():
    """scripts/bench_kernels.py times ToMe's formulation against vtc's step: same tokens, other order."""
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = torch.randn(3, 197, 16, dtype=torch.float64)
    size = torch.rand(3, 197, dtype=torch.float64) + 0.5
    (tome_x, tome_size), (vtc_x, vtc_size) = bench.tome_step(x, size, 24), bench.vtc_step(x, size, 24)
    assert tome_x.shape == vtc_x.shape == (3, 173, 16)
    order_t, order_v = tome_size.argsort(dim=1), vtc_size.argsort(dim=1)  # sizes are distinct: a token key
    torch.testing.assert_close(tome_size.gather(1, order_t), vtc_size.gather(1, order_v))
    torch.testing.assert_close(tome_x.gather(1, order_t[..., None].expand_as(tome_x)),
                               vtc_x.gather(1, order_v[..., None].expand_as(vtc_x)))
