"""SwiGLU / GeGLU kernels vs float32 PyTorch, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from plait_kernels.ops.glu import geglu, swiglu
from plait_kernels.testing import gpu_test, outputs_and_grads

# gate values reach +-16, so outputs and grads reach ~50: float32 rounding there is ~5e-6
FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=2e-2)
# float32 on a GPU: 67M values up to ~50 through exp; a handful differ by ~1e-5 (CUDA exp vs torch)

KERNELS = {
    "swiglu": (swiglu, lambda g, u: F.silu(g.float()) * u.float()),
    "geglu": (geglu, lambda g, u: F.gelu(g.float(), approximate="tanh") * u.float()),
}


def _compare(name, shape, dtype, device, tol):
    kernel, ref = KERNELS[name]
    gen = torch.Generator().manual_seed(0)
    # a wide range of gate values: the activations bend around 0 and saturate far from it
    gate = (torch.randn(shape, generator=gen) * 4).to(device=device, dtype=dtype)
    up = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    out, grads = outputs_and_grads(kernel, [gate, up])
    ref_out, ref_grads = outputs_and_grads(lambda g, u: ref(g, u).to(dtype), [gate, up])
    for got, want in zip(out + grads, ref_out + ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 129), (1500,)])
def test_glu_matches_reference_fp32(name, shape, device):
    _compare(name, shape, torch.float32, device, FP32)


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@gpu_test
def test_glu_gpu(name, dtype):
    _compare(name, (4, 2048, 8192), dtype, "cuda", BF16 if dtype == torch.bfloat16 else dict(atol=3e-5, rtol=1e-5))


@pytest.mark.parametrize("gelu", [False, True])
def test_glu_on_the_halves_of_one_buffer(gelu, device):
    """gate and up as row-strided views of one [rows, 2 * cols] matmul output, and
    d_gate / d_up written into the halves of one buffer, give exactly what the
    contiguous tensors give (fp32); so does the forward written into a
    view of a wider buffer."""
    from plait_kernels.ops.glu import glu_backward, glu_forward

    gen = torch.Generator().manual_seed(1)
    rows, cols = 5, 1100  # more than one column block per row
    gate_up = (torch.randn(rows, 2 * cols, generator=gen) * 4).to(device)
    d_h = torch.randn(rows, cols, generator=gen).to(device)
    gate, up = gate_up[:, :cols], gate_up[:, cols:]
    assert not gate.is_contiguous()
    want_h = glu_forward(gate.contiguous(), up.contiguous(), gelu)
    want_dg, want_du = glu_backward(d_h, gate.contiguous(), up.contiguous(), gelu)
    torch.testing.assert_close(glu_forward(gate, up, gelu), want_h, atol=0, rtol=0)
    grads = torch.full_like(gate_up, float("nan"))
    glu_backward(d_h, gate, up, gelu, out=(grads[:, :cols], grads[:, cols:]))
    torch.testing.assert_close(grads, torch.cat([want_dg, want_du], dim=1), atol=0, rtol=0)
    # the forward written into the first columns of a wider buffer (the folded LoRA experts' operand)
    wide = torch.full((rows, cols + 8), float("nan"), device=device)
    assert glu_forward(gate, up, gelu, out=wide[:, :cols]).data_ptr() == wide.data_ptr()
    torch.testing.assert_close(wide[:, :cols], want_h, atol=0, rtol=0)
    assert wide[:, cols:].isnan().all()  # the columns past the view are not written
    torch.testing.assert_close(want_h, KERNELS["geglu" if gelu else "swiglu"][1](gate, up), **FP32)


@pytest.mark.parametrize("gelu", [False, True])
def test_glu_backward_rebuilds_h_over_its_input_gradient(gelu, device):
    """``h_out=dout``: the same pass writes ``act(gate) * up`` over the gradient it
    read, and the gradients are those of the plain call (fp32, exact)."""
    from plait_kernels.ops.glu import glu_backward, glu_forward

    gen = torch.Generator().manual_seed(3)
    gate = (torch.randn(6, 1100, generator=gen) * 4).to(device)
    up, d_h = torch.randn(6, 1100, generator=gen).to(device), torch.randn(6, 1100, generator=gen).to(device)
    want_dg, want_du = glu_backward(d_h, gate, up, gelu)
    buffer = d_h.clone()
    got_dg, got_du = glu_backward(buffer, gate, up, gelu, h_out=buffer)
    assert torch.equal(got_dg, want_dg) and torch.equal(got_du, want_du)
    assert torch.equal(buffer, glu_forward(gate, up, gelu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glu_backward_rebuilds_the_scaled_h_over_its_input_gradient(dtype, device):
    """``h_out=dout`` with ``row_scale`` (the folded routed experts keep no gated
    activations for their backward): the pass writes exactly what
    :func:`glu_forward` wrote -- the product rounded, then times the row's
    weight -- and its gradients, the weights' included, are the plain call's."""
    from plait_kernels.ops.glu import glu_backward, glu_forward

    gen = torch.Generator().manual_seed(4)
    gate = (torch.randn(6, 1100, generator=gen) * 4).to(device, dtype)
    up, d_h = (torch.randn(6, 1100, generator=gen).to(device, dtype) for _ in range(2))
    weights = torch.rand(6, generator=gen).to(device)
    want = glu_backward(d_h, gate, up, False, row_scale=weights)
    buffer = d_h.clone()
    got = glu_backward(buffer, gate, up, False, h_out=buffer, row_scale=weights)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(buffer, glu_forward(gate, up, False, row_scale=weights))
    assert not torch.equal(buffer, glu_forward(gate, up, False))  # the weights are in it


def test_glu_with_a_row_scale_matches_autograd_of_the_scaled_product(device):
    """``row_scale`` (a routed expert row's routing weight): the forward is
    ``w * act(gate) * up`` and the backward gives d_gate, d_up and d_w as
    autograd does for that product (float32); 1100 columns span two column
    blocks, so d_w sums the blocks' partial sums."""
    from plait_kernels.ops.glu import glu_backward, glu_forward

    gen = torch.Generator().manual_seed(5)
    gate = (torch.randn(6, 1100, generator=gen) * 4).to(device)
    up, d_h = torch.randn(6, 1100, generator=gen).to(device), torch.randn(6, 1100, generator=gen).to(device)
    weights = torch.rand(6, generator=gen).to(device)
    leaves = [t.clone().requires_grad_() for t in (gate, up, weights)]
    want = F.silu(leaves[0]) * leaves[1] * leaves[2][:, None]
    want.backward(d_h)
    torch.testing.assert_close(glu_forward(gate, up, False, row_scale=weights), want.detach(), **FP32)
    d_gate, d_up, d_w = glu_backward(d_h, gate, up, False, row_scale=weights)
    for got, leaf in zip((d_gate, d_up, d_w), leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-4, rtol=1e-5)
    assert d_w.dtype == torch.float32 and d_w.shape == (6,)
