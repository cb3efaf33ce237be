"""Helpers for comparing a kernel with its reference, forward and backward."""

from __future__ import annotations


def outputs_and_grads(fn, inputs, seed: int = 1):
    """Call ``fn(*inputs)`` on fresh leaf copies of ``inputs``, backprop a fixed
    random projection of every output (so each output element matters, unlike
    ``.sum()``) and return ``(outputs, grads of the floating-point inputs)``."""
    import torch

    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    total = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs)
    total.backward()
    return [o.detach() for o in outputs], [t.grad for t in leaves if t.requires_grad]


def gpu_test(fn):
    """Mark a test ``gpu`` and skip it when CUDA is absent."""
    import pytest
    import torch

    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn)
    return pytest.mark.gpu(fn)
