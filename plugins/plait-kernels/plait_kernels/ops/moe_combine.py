"""The end of a routed MoE experts forward: weight each expert output row by
its routing weight and sum a token's ``k`` rows, in one pass.

The experts compute on rows sorted by expert (``rows[s]``, ``s`` a position in
sorted order); ``inverse[j]`` is the sorted position of the pair
``j = token * k + slot`` and ``weights[j]`` its routing weight (the router's
``[tokens, k]`` weights flattened, not permuted). Then::

    out[t]        = sum over slot of P(rows[inverse[t*k + slot]] * weights[t*k + slot])
    d_rows[s]     = P(d_out[j // k] * weights[j])               for s = inverse[j]
    d_weights[j]  = sum over h of P(d_out[j // k, h] * rows[s, h])

where ``P`` rounds to the product dtype torch would use (``rows`` and
``weights``' promoted dtype: float32 when the router weights are float32,
bf16 when both are bf16), and each sum is accumulated in float32 and rounded
once. That is what the PyTorch code (``lora_experts.combine_reference``:
multiply, write back to (token, k) order, sum over k) computes, to the
float32 rounding of the sum order, without its ``[tokens * k, hidden]``
intermediates: the rows are read once and the output written once. Each
sorted row belongs to exactly one pair, so the backward writes every
``d_rows`` row once, without atomics.

Launched with ``enable_fp_fusion=False``: a fused multiply-add would skip the
rounding of each product that the PyTorch code does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait_kernels.ops._util import block_size, num_warps

_MAX_BLOCK = 1024


@triton.jit
def _moe_combine_fwd(ROWS, W, INV, OUT, cols, stride_rows, stride_out, TOP_K: tl.constexpr,
                     ROUND_PRODUCT: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK columns of one token's output, its TOP_K rows summed in float32
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        row = tl.load(INV + pair).to(tl.int64)
        weight = tl.load(W + pair).to(tl.float32)
        values = tl.load(ROWS + row * stride_rows + offs, mask=mask, other=0.0).to(tl.float32)
        product = values * weight
        if ROUND_PRODUCT:  # the product dtype is the rows' (bf16/fp16 rows and weights): round as torch does
            product = product.to(ROWS.dtype.element_ty).to(tl.float32)
        acc += product
    tl.store(OUT + token * stride_out + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _moe_combine_bwd(DOUT, ROWS, W, INV, DROWS, DW, cols, stride_dout, stride_rows, stride_drows,
                     TOP_K: tl.constexpr, ROUND_PRODUCT: tl.constexpr, BLOCK: tl.constexpr):
    # one program: one (token, slot) pair, i.e. one sorted row; loops over the columns
    pair = tl.program_id(0).to(tl.int64)
    token = pair // TOP_K
    row = tl.load(INV + pair).to(tl.int64)
    weight = tl.load(W + pair).to(tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < cols
        d = tl.load(DOUT + token * stride_dout + offs, mask=mask, other=0.0).to(tl.float32)
        values = tl.load(ROWS + row * stride_rows + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DROWS + row * stride_drows + offs, (d * weight).to(DROWS.dtype.element_ty), mask=mask)
        product = d * values
        if ROUND_PRODUCT:
            product = product.to(ROWS.dtype.element_ty).to(tl.float32)
        dot += product
    tl.store(DW + pair, tl.sum(dot, axis=0).to(DW.dtype.element_ty))


def product_dtype(rows: torch.Tensor, weights: torch.Tensor) -> torch.dtype:
    """The dtype torch multiplies ``rows * weights`` in (and the PyTorch code sums in)."""
    return torch.promote_types(rows.dtype, weights.dtype)


def _rounds_product(rows: torch.Tensor, weights: torch.Tensor) -> bool:
    # bf16/fp16 rows with weights of the same or a narrower dtype: torch rounds each product to the rows' dtype
    return product_dtype(rows, weights) == rows.dtype != torch.float32


def _block(cols: int) -> int:
    return min(_MAX_BLOCK, block_size(cols))


def moe_combine_forward(rows: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor, top_k: int,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """``[tokens, hidden]`` in ``out_dtype`` (no autograd); see the module docstring."""
    pairs, cols = rows.shape
    out = torch.empty(pairs // top_k, cols, dtype=out_dtype, device=rows.device)
    if pairs and cols:
        block = _block(cols)
        _moe_combine_fwd[(pairs // top_k, triton.cdiv(cols, block))](
            rows, weights, inverse, out, cols, rows.stride(0), out.stride(0), TOP_K=top_k,
            ROUND_PRODUCT=_rounds_product(rows, weights), BLOCK=block,
            num_warps=num_warps(block), enable_fp_fusion=False)
    return out


def moe_combine_backward(grad_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor,
                         top_k: int):
    """``(d_rows, d_weights)`` of :func:`moe_combine_forward` for ``grad_out``."""
    pairs, cols = rows.shape
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    d_rows = torch.empty_like(rows)
    d_weights = torch.empty_like(weights)
    if pairs and cols:
        block = _block(cols)
        _moe_combine_bwd[(pairs,)](
            grad_out, rows, weights, inverse, d_rows, d_weights, cols, grad_out.stride(0), rows.stride(0),
            d_rows.stride(0), TOP_K=top_k, ROUND_PRODUCT=_rounds_product(rows, weights),
            BLOCK=block, num_warps=num_warps(block), enable_fp_fusion=False)
    elif pairs:
        d_weights.zero_()
    return d_rows, d_weights


class MoECombineFunction(torch.autograd.Function):
    """``out[t] = sum_slot rows[inverse[t*k+slot]] * weights[t*k+slot]`` (module docstring)."""

    @staticmethod
    def forward(ctx, rows, weights, inverse, top_k, out_dtype):
        ctx.save_for_backward(rows, weights, inverse)
        ctx.top_k = top_k
        return moe_combine_forward(rows, weights, inverse, top_k, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights, inverse = ctx.saved_tensors
        d_rows, d_weights = moe_combine_backward(grad_out, rows, weights, inverse, ctx.top_k)
        return d_rows, d_weights, None, None, None


def moe_combine(rows: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor, top_k: int,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The routed rows weighted and summed per token: ``rows`` ``[tokens * k, hidden]``
    in expert-sorted order, ``weights`` ``[tokens * k]`` in (token, slot) order,
    ``inverse`` ``[tokens * k]`` the sorted position of each (token, slot) pair.

    The result is in ``out_dtype`` (default: the product dtype); when that is
    wider than the product dtype, the sum is rounded to the product dtype
    first, as the PyTorch code does."""
    product = product_dtype(rows, weights)
    out_dtype = out_dtype or product
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weights, inverse = weights.reshape(-1).contiguous(), inverse.contiguous()
    if rows.shape[0] != weights.numel() or rows.shape[0] != inverse.numel() or rows.shape[0] % top_k:
        raise ValueError(f"moe_combine: rows {tuple(rows.shape)}, weights {tuple(weights.shape)}, "
                         f"inverse {tuple(inverse.shape)} are not tokens * {top_k} pairs")
    if out_dtype.itemsize > product.itemsize:
        return MoECombineFunction.apply(rows, weights, inverse, top_k, product).to(out_dtype)
    return MoECombineFunction.apply(rows, weights, inverse, top_k, out_dtype)
