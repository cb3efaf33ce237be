"""RMSNorm with an optional fused residual add and a Gemma-style ``1 + weight`` offset.

Forward, per row ``x`` of width ``N`` (``r`` the residual, when given)::

    s    = x + r                        # the new residual stream (returned)
    rstd = 1 / sqrt(mean(s * s) + eps)
    y    = s * rstd * (weight + offset)

Backward, with ``s_hat = s * rstd`` and ``g = dy * (weight + offset)``::

    ds      = rstd * (g - s_hat * mean(g * s_hat)) + d_residual_out
    dweight = sum over rows of dy * s_hat

``dx`` and ``dr`` both equal ``ds``. The weight gradient is reduced in two
stages: each program accumulates its rows into one float32 partial row, and
torch sums the few partials, which avoids atomics and is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait_kernels.ops._util import block_size, num_programs, num_warps


@triton.jit
def _rms_norm_fwd(X, R, Y, S, W, RSTD, stride_x, stride_r, stride_y, stride_s, N, eps, offset,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(S + row * stride_s + cols, s.to(S.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(Y + row * stride_y + cols, (s * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(DY, S, W, RSTD, DRES, DS, DW_PARTIAL, stride_dy, stride_s, stride_dres, stride_ds,
                  M, N, offset, HAS_DRES: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(pid, M, nprog):
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        s_hat = s * rstd
        g = dy * w
        ds = rstd * (g - s_hat * (tl.sum(g * s_hat, axis=0) / N))
        if HAS_DRES:
            ds += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DS + row * stride_ds + cols, ds.to(DS.dtype.element_ty), mask=mask)
        dw += dy * s_hat
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, N]`` tensor whose rows are contiguous."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper; see the module docstring for the maths."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset):
        shape = x.shape
        x2 = _rows(x)
        m, n = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        if residual is not None:
            r2 = _rows(residual)
            s = torch.empty_like(x2)
        else:
            r2, s = x2, x2  # placeholders; the kernel does not touch them without a residual
        _rms_norm_fwd[(m,)](x2, r2, y, s, weight, rstd, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
                            n, eps, offset, HAS_RESIDUAL=residual is not None, BLOCK=block_size(n),
                            num_warps=num_warps(block_size(n)))
        ctx.save_for_backward(s, weight, rstd)
        ctx.offset, ctx.has_residual, ctx.shape = offset, residual is not None, shape
        if residual is not None:
            return y.view(shape), s.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dres=None):
        s, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        m, n = dy2.shape
        ds = torch.empty_like(s)
        programs = num_programs(m, dy.device)
        dw_partial = torch.empty(programs, n, dtype=torch.float32, device=dy.device)
        dres2 = _rows(dres) if dres is not None else dy2
        _rms_norm_bwd[(programs,)](dy2, s, weight, rstd, dres2, ds, dw_partial, dy2.stride(0), s.stride(0),
                                   dres2.stride(0), ds.stride(0), m, n, ctx.offset, HAS_DRES=dres is not None,
                                   BLOCK=block_size(n), num_warps=num_warps(block_size(n)))
        dweight = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = ds.view(ctx.shape)
        return dx, dweight, (dx if ctx.has_residual else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             residual: torch.Tensor | None = None):
    """RMSNorm of ``x`` over its last dimension, times ``weight + offset``.

    With ``residual``, normalises ``x + residual`` and returns
    ``(normed, x + residual)`` so the caller keeps the residual stream without
    a separate add kernel. ``offset=1.0`` gives Gemma's ``(1 + weight)``.
    """
    return RMSNormFunction.apply(x, weight, residual, float(eps), float(offset))
