"""The one dispatch rule between each kernel's Triton version and its PyTorch reference
(docs/ARCHITECTURE.md "Shared reduction functions").

``auto`` (default): Triton for CUDA tensors when Triton imports, the reference otherwise.
:func:`use_backend` overrides it for a block of code (tests, benchmarks): ``"reference"`` always
runs the reference; ``"triton"`` always runs Triton, which on CPU tensors works only in Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is first imported).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

BACKENDS = ("auto", "reference", "triton")
_backend: ContextVar[str] = ContextVar("vtc_kernel_backend", default="auto")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the kernels inside the block with backend ``name`` (``auto``, ``reference`` or ``triton``)."""
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


@functools.cache
def triton_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return bool(triton.__version__)


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter in this process."""
    from triton.runtime.interpreter import InterpretedFunction

    from vtc.kernels.matching_triton import best_match_kernel

    return isinstance(best_match_kernel.fn, InterpretedFunction)  # the jitted function under the autotuner


def use_triton(tensor: torch.Tensor) -> bool:
    """The dispatch decision for an op whose main input is ``tensor``."""
    backend = _backend.get()
    if backend == "reference":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("vtc kernels: backend 'triton' was asked for but Triton does not import")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            "vtc kernels: Triton kernels take CPU tensors only in Triton's interpreter; set TRITON_INTERPRET=1 "
            "before Triton is first imported, or use backend 'reference'"
        )
    return True
