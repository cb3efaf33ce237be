"""The row-strided copies behind the fused LoRA MLP's widened operands, against torch."""

import pytest
import torch

from plait_kernels.ops.stack import copy_rows_, gate_up_weight
from plait_kernels.testing import gpu_test


def _reference(w_g, w_u, b_g, b_u, s_g, s_u, dtype):
    inter, r_g, r_u = w_g.shape[0], b_g.shape[1], b_u.shape[1]
    zeros = torch.zeros  # the off-diagonal LoRA blocks
    top = torch.cat([w_g.to(dtype), (b_g.float() * s_g).to(dtype), zeros(inter, r_u, dtype=dtype, device=w_g.device)], 1)
    bottom = torch.cat([w_u.to(dtype), zeros(inter, r_g, dtype=dtype, device=w_g.device), (b_u.float() * s_u).to(dtype)], 1)
    return torch.cat([top, bottom])


def _operands(inter, hidden, r_g, r_u, dtype, device, strided):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2 * inter, hidden + 7, generator=gen).to(device=device, dtype=dtype)
    # strided: the base weights as column blocks of wider buffers (a dequantized
    # or sliced weight need not be contiguous)
    w_g, w_u = (wide[:inter, :hidden], wide[inter:, :hidden]) if strided else \
        (wide[:inter, :hidden].contiguous(), wide[inter:, :hidden].contiguous())
    b_g = torch.randn(inter, r_g, generator=gen).to(device)  # LoRA B stays float32 (peft's default)
    b_u = torch.randn(inter, r_u, generator=gen).to(device)
    return w_g, w_u, b_g, b_u


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("inter,hidden,r_g,r_u", [(5, 1100, 3, 5), (3, 16, 16, 16), (1, 7, 1, 2)])
def test_gate_up_weight_equals_torch_fp32(inter, hidden, r_g, r_u, strided, device):
    """Exactly the blocks torch's cat builds: hidden wider than one block, odd ranks, strided bases."""
    w_g, w_u, b_g, b_u = _operands(inter, hidden, r_g, r_u, torch.float32, device, strided)
    got = gate_up_weight(w_g, w_u, b_g, b_u, 2.0, 0.5, torch.float32)
    assert got.shape == (2 * inter, hidden + r_g + r_u) and got.is_contiguous()
    torch.testing.assert_close(got, _reference(w_g, w_u, b_g, b_u, 2.0, 0.5, torch.float32), atol=0, rtol=0)


def test_copy_rows_into_a_column_block(device):
    """Only the destination's column block changes, and it equals the source exactly."""
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(6, 1500, generator=gen).to(device)
    buffer = torch.full((6, 1520), -7.0, device=device)
    copy_rows_(buffer[:, :1500], src)
    assert torch.equal(buffer[:, :1500], src)
    assert torch.all(buffer[:, 1500:] == -7.0)


def test_copies_refuse_what_they_cannot_stack(device):
    with pytest.raises(ValueError, match="unit column stride"):
        copy_rows_(torch.empty(4, 3, device=device).t(), torch.empty(3, 4, device=device))
    with pytest.raises(ValueError, match="do not stack"):
        w = torch.empty(4, 8, device=device)
        gate_up_weight(w, torch.empty(5, 8, device=device), torch.empty(4, 2, device=device),
                       torch.empty(4, 2, device=device), 1.0, 1.0, torch.float32)


@pytest.mark.parametrize("hidden,inter", [(2048, 8192), (4096, 14336)])
@gpu_test
def test_gate_up_weight_gpu_bf16(hidden, inter):
    """Llama shapes in bf16: the base blocks are bit copies, the LoRA blocks B * s rounded once."""
    w_g, w_u, b_g, b_u = _operands(inter, hidden, 16, 16, torch.bfloat16, "cuda", strided=False)
    got = gate_up_weight(w_g, w_u, b_g, b_u, 2.0, 2.0, torch.bfloat16)
    assert torch.equal(got, _reference(w_g, w_u, b_g, b_u, 2.0, 2.0, torch.bfloat16))
    x = torch.randn(16384, hidden, device="cuda", dtype=torch.bfloat16)
    wide = torch.empty(16384, hidden + 32, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(copy_rows_(wide[:, :hidden], x), x)
