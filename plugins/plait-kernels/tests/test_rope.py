"""Rotary kernel vs transformers' ``apply_rotary_pos_emb``, forward and backward."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from plait_kernels.ops.rope import apply_rope
from plait_kernels.testing import gpu_test, outputs_and_grads

# rotation is two products and a sum per element, in float32 either way
FP32 = dict(atol=1e-6, rtol=1e-6)
BF16 = dict(atol=2e-2, rtol=2e-2)


def _inputs(batch, q_heads, k_heads, seq, dim, cos_batch, dtype, device, transposed):
    gen = torch.Generator().manual_seed(0)
    if transposed:
        # how attention modules produce q/k: [B, S, H, D] viewed as [B, H, S, D]
        q = torch.randn(batch, seq, q_heads, dim, generator=gen).transpose(1, 2)
        k = torch.randn(batch, seq, k_heads, dim, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(batch, q_heads, seq, dim, generator=gen)
        k = torch.randn(batch, k_heads, seq, dim, generator=gen)
    # real rotary tables: cat(freqs, freqs), positions differing per batch row
    positions = torch.stack([torch.arange(seq) + 3 * b for b in range(cos_batch)]).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k), to(emb.cos()), to(emb.sin())


def _reference(q, k, cos, sin):
    return tuple(t.to(q.dtype) for t in apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float()))


def _compare(shape, dtype, device, tol, transposed=False):
    q, k, cos, sin = _inputs(*shape, dtype=dtype, device=device, transposed=transposed)
    out, grads = outputs_and_grads(lambda q, k: apply_rope(q, k, cos, sin), [q, k])
    ref_out, ref_grads = outputs_and_grads(lambda q, k: _reference(q, k, cos, sin), [q, k])
    for got, want in zip(out + grads, ref_out + ref_grads):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)


# batch, q_heads, k_heads (GQA), seq, head_dim, batch of cos/sin
CPU_SHAPES = [(2, 4, 2, 7, 16, 2), (1, 3, 1, 5, 16, 1), (2, 6, 2, 3, 12, 1)]


@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_rope_matches_transformers_fp32(shape, transposed, device):
    _compare(shape, torch.float32, device, FP32, transposed)


def test_rope_rejects_odd_head_dim(device):
    q, k, cos, sin = _inputs(1, 2, 2, 3, 8, 1, torch.float32, device, False)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])


@pytest.mark.parametrize("shape", [(4, 32, 8, 2048, 64, 4), (2, 16, 16, 1000, 128, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@gpu_test
def test_rope_gpu(shape, dtype):
    _compare(shape, dtype, "cuda", BF16 if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5), transposed=True)
