"""The Triton MoE combine (plait_kernels.ops.moe_combine) against the PyTorch code it replaces.

``lora_experts.combine_reference`` is the routed experts path's own ending:
rows times their routing weights, written back to (token, k) order, summed
over k. The kernel computes the same products and float32 sums. Tolerances:

- float32 rows and weights: the output and the rows' gradient are the same
  products and sums, equal to within 1e-6 of their scale (the sum order may
  differ on a GPU; on the CPU they come out bit-equal); the weights' gradient
  is a sum over the hidden size in another order, within 1e-6 of its scale;
- bf16 rows (weights float32 or bf16): within bf16 rounding, 2e-2 absolute and
  relative for values of order 1: Triton's CPU interpreter truncates float32
  to bf16 where a GPU rounds to nearest, so the interpreted kernel is off by
  up to one bf16 step per rounding;
- float16 rows and weights: numpy rounds to nearest as the GPU does, so the
  interpreted kernel equals PyTorch to within the float32 sum order (1e-6 of
  the scale), which checks that every product is rounded where torch rounds it.
"""

from __future__ import annotations

import pytest
import torch

from plait_kernels import lora_experts
from plait_kernels.ops import moe_combine as combine_op
from plait_kernels.ops.moe_combine import moe_combine
from plait_kernels.testing import outputs_and_grads

TOKENS, TOP_K, HIDDEN, EXPERTS = 12, 4, 64, 6  # 48 routed rows
EXACT = dict(atol=1e-6, rtol=1e-6)
BF16 = dict(atol=2e-2, rtol=2e-2)


def routing(tokens=TOKENS, top_k=TOP_K, experts=EXPERTS, seed=0):
    """``(perm, inverse)`` as the routed path sorts its pairs: token 0's k rows
    all go to one expert, token 1's to k different experts, the rest at random."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, experts, (tokens, top_k), generator=gen)
    index[0] = 2
    index[1] = torch.arange(top_k) % experts
    _, perm = torch.sort(index.reshape(-1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm, inverse


def inputs(rows_dtype, weights_dtype, tokens=TOKENS, top_k=TOP_K, hidden=HIDDEN, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(tokens * top_k, hidden, generator=gen).to(device=device, dtype=rows_dtype)
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(device=device, dtype=weights_dtype)
    return rows, weights.reshape(-1)


def compare(rows_dtype, weights_dtype, tol, tokens=TOKENS, top_k=TOP_K, hidden=HIDDEN, device="cpu"):
    rows, weights = inputs(rows_dtype, weights_dtype, tokens, top_k, hidden, device)
    perm, inverse = (t.to(device) for t in routing(tokens, top_k))
    out, grads = outputs_and_grads(lambda r, w: moe_combine(r, w, inverse, top_k, rows_dtype), [rows, weights])
    ref, ref_grads = outputs_and_grads(
        lambda r, w: lora_experts.combine_reference(r, w, perm, top_k, rows_dtype), [rows, weights])
    for name, got, want in zip(("output", "d_rows", "d_weights"), out + grads, ref + ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        scale = want.float().abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol, msg=name)


@pytest.mark.parametrize("rows_dtype, weights_dtype, tol", [
    (torch.float32, torch.float32, EXACT),
    (torch.float16, torch.float16, EXACT),  # products rounded to float16, as torch does
    (torch.bfloat16, torch.float32, BF16),  # the routed path's case: bf16 experts, float32 router weights
    (torch.bfloat16, torch.bfloat16, BF16),  # transformers' Qwen3-MoE router returns the model's dtype
])
def test_combine_matches_the_pytorch_code_forward_and_backward(rows_dtype, weights_dtype, tol, device):
    compare(rows_dtype, weights_dtype, tol, device=device)


def test_a_hidden_size_over_one_block_and_not_a_power_of_two(device):
    # the backward loops over column blocks of 1024 for each row's weight gradient
    compare(torch.float32, torch.float32, EXACT, tokens=2, top_k=2, hidden=1100, device=device)
    compare(torch.float32, torch.float32, EXACT, tokens=3, top_k=3, hidden=40, device=device)


def test_an_output_dtype_wider_than_the_products_rounds_the_sum_first(device):
    rows, weights = inputs(torch.bfloat16, torch.bfloat16, device=device)
    perm, inverse = (t.to(device) for t in routing())
    got = moe_combine(rows, weights, inverse, TOP_K, torch.float32)
    want = lora_experts.combine_reference(rows, weights, perm, TOP_K, torch.float32)
    assert got.dtype == torch.float32
    # both are bf16 values (the sum rounded to bf16, then widened)
    assert torch.equal(got.bfloat16().float(), got)
    torch.testing.assert_close(got, want, **BF16)


def test_mismatched_shapes_are_refused():
    rows, weights = inputs(torch.float32, torch.float32)
    _, inverse = routing()
    with pytest.raises(ValueError, match="not tokens \\* 4 pairs"):
        moe_combine(rows[:-1], weights[:-1], inverse[:-1], TOP_K)
