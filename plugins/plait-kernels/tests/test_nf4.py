"""The NF4 dequantization kernel against bitsandbytes' own ``dequantize_4bit``."""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from plait_kernels.ops.nf4 import dequantize_nf4_, dequantizes  # noqa: E402
from plait_kernels.testing import gpu_test  # noqa: E402


def _quantized(shape, device, nested, dtype=torch.float32, storage=torch.uint8):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    return bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested,
                                        quant_storage=storage)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(6, 128), (5, 1100), (3, 37)])
def test_dequantize_matches_bitsandbytes_exactly(shape, nested, device):
    """Same bits as bitsandbytes, written into a column block of a wider buffer:
    rows longer than one kernel block, and an odd size whose scale blocks and
    bytes straddle rows."""
    packed, state = _quantized(shape, device, nested)
    assert dequantizes(packed, state)
    want = bnb_functional.dequantize_4bit(packed, state)
    buffer = torch.full((shape[0], shape[1] + 9), 5.0, device=device)
    dequantize_nf4_(buffer[:, :shape[1]], packed, state)
    assert torch.equal(buffer[:, :shape[1]], want)
    assert torch.all(buffer[:, shape[1]:] == 5.0)  # nothing written outside the block


def test_fp4_and_wrong_shapes_are_not_taken(device):
    gen = torch.Generator().manual_seed(1)
    packed, state = bnb_functional.quantize_4bit(torch.randn(4, 64, generator=gen).to(device), quant_type="fp4")
    assert not dequantizes(packed, state)  # bitsandbytes' own path
    packed, state = _quantized((4, 64), device, nested=True)
    with pytest.raises(ValueError, match="4x64 weight into shape"):
        dequantize_nf4_(torch.empty(64, 4, device=device), packed, state)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(8192, 2048), (4096, 14336)])
@gpu_test
def test_dequantize_gpu_bf16_matches_bitsandbytes(shape, nested):
    """Llama shapes in bf16 with bf16 byte storage (what FSDP sharding uses): bitsandbytes' bits."""
    packed, state = _quantized(shape, "cuda", nested, dtype=torch.bfloat16, storage=torch.bfloat16)
    want = bnb_functional.dequantize_4bit(packed, state)
    got = dequantize_nf4_(torch.empty(shape, dtype=torch.bfloat16, device="cuda"), packed, state)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_cached_arguments_follow_moved_scales(device):
    """The per-weight argument cache is rebuilt when the scales are replaced (as
    ``QuantState.to`` does): the second dequantization uses the new ones."""
    packed, state = _quantized((4, 128), device, nested=False)
    first = dequantize_nf4_(torch.empty(4, 128, device=device), packed, state)
    state.absmax = state.absmax * 2
    second = dequantize_nf4_(torch.empty(4, 128, device=device), packed, state)
    assert torch.equal(second, first * 2)
    assert torch.equal(second, bnb_functional.dequantize_4bit(packed, state))
