"""RMSNorm kernel vs the float32 PyTorch reference, forward and backward."""

import pytest
import torch

from plait_kernels import reference
from plait_kernels.ops.rms_norm import rms_norm
from plait_kernels.testing import gpu_test, outputs_and_grads

# fp32 on the interpreter: the kernel does the same float32 maths in another
# order, so differences are rounding only
FP32 = dict(atol=2e-5, rtol=2e-5)
# bf16 on a GPU: the reference upcasts the same bf16 tensors to float32 and
# rounds its outputs to bf16 once, as the kernel does, so both see the same bf16
# output gradient; they differ by summation order, i.e. about one bf16 ulp
# (2^-8 relative) of each value
BF16 = dict(atol=3e-2, rtol=2e-2)

CPU_CASES = [
    # rows x width, residual?, offset
    ((7, 33), False, 0.0),
    ((7, 33), True, 0.0),
    ((2, 3, 20), True, 1.0),
    ((5, 64), False, 1.0),
]


def _inputs(shape, residual, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(shape[-1], generator=gen) * 0.5 + 1.0
    r = torch.randn(shape, generator=gen) if residual else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(r)


def _compare(shape, residual, offset, dtype, device, tol):
    x, w, r = _inputs(shape, residual, dtype, device)
    if residual:
        kernel = lambda x, w, r: rms_norm(x, w, 1e-6, offset, residual=r)  # noqa: E731
        ref = lambda x, w, r: reference.rms_norm(x, w, 1e-6, offset, residual=r)  # noqa: E731
        inputs = [x, w, r]
    else:
        kernel = lambda x, w: rms_norm(x, w, 1e-6, offset)  # noqa: E731
        ref = lambda x, w: reference.rms_norm(x, w, 1e-6, offset)  # noqa: E731
        inputs = [x, w]
    out, grads = outputs_and_grads(kernel, inputs)
    ref_out, ref_grads = outputs_and_grads(ref, inputs)
    assert len(out) == (2 if residual else 1) and len(grads) == len(inputs)
    for got, want in zip(out + grads, ref_out + ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("shape,residual,offset", CPU_CASES)
def test_rms_norm_matches_reference_fp32(shape, residual, offset, device):
    _compare(shape, residual, offset, torch.float32, device, FP32)


def test_residual_output_is_the_sum(device):
    x, w, r = _inputs((4, 24), True, torch.float32, device)
    _, new_residual = rms_norm(x, w, residual=r)
    torch.testing.assert_close(new_residual, x + r, atol=0, rtol=0)


def test_gemma_offset_matches_transformers(device):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    norm = GemmaRMSNorm(24, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 24, device=device)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6, offset=1.0), norm(x), **FP32)


@pytest.mark.parametrize("shape,residual,offset", [((4096, 2048), False, 0.0), ((4096, 2048), True, 0.0),
                                                   ((3, 1000, 3072), True, 1.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@gpu_test
def test_rms_norm_gpu(shape, residual, offset, dtype):
    _compare(shape, residual, offset, dtype, "cuda", BF16 if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4))

