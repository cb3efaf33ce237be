"""Gated RMSNorm: an RMSNorm and a SiLU gate in one kernel, forward and backward.

The linear-attention and Mamba layers of hybrid models end with a norm gated
by a second projection. transformers writes it in two orders, and this kernel
does both (``NORM_BEFORE_GATE``), rounding where the library's code rounds so
that bf16 outputs match it:

norm, then gate (Qwen3-Next, Qwen3.5, OLMo-hybrid; one group, the whole row)::

    n = round_in(x * rstd(x))           # rstd(v) = 1 / sqrt(mean(v * v) + eps)
    p = round_p(weight * n)             # p: the dtype of weight * input
    y = round_in(p * silu(gate))

gate, then a norm per group of ``group_size`` columns (Mamba-2, NemotronH,
Zamba2, Bamba, Granite-hybrid; the gate may be absent)::

    h = x * silu(gate)
    n = round_in(h * rstd(h over its group))
    y = round_p(weight * n)

``round_in`` rounds to the input's dtype, ``round_p`` to the dtype of the
product ``weight * n`` (the input's, or float32 when the weight is float32).
Everything else is float32.

Backward, with ``s = silu(g)``, ``ds = sigmoid(g) * (1 + g * (1 - sigmoid(g)))``
and, per group, ``v_hat = v * rstd`` normalising ``v`` (``x`` or ``h``)::

    dv     = rstd * (d_nhat - v_hat * mean(d_nhat * v_hat))   # the RMSNorm backward
    norm, then gate: d_nhat = dy * s * weight,  dgate = dy * p * ds,  dx = dv
    gate, then norm: d_nhat = dy * weight,      dgate = dv * x * ds,  dx = dv * s
    dweight = sum over rows of (dy * s or dy) * n

The weight gradient is reduced like :mod:`plait_kernels.ops.rms_norm`'s: a
float32 partial row per program, summed by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait_kernels.ops._util import block_size, num_programs, num_warps

#: how the product ``weight * n`` is rounded (``round_p`` above)
PRODUCT_FLOAT32, PRODUCT_INPUT, PRODUCT_WEIGHT = 0, 1, 2


@triton.jit
def _round_product(p, X, W, PRODUCT: tl.constexpr):
    if PRODUCT == 1:
        p = p.to(X.dtype.element_ty).to(tl.float32)
    elif PRODUCT == 2:
        p = p.to(W.dtype.element_ty).to(tl.float32)
    return p


@triton.jit
def _gated_rms_norm_fwd(X, G, W, Y, RSTD, stride_x, stride_g, stride_y, groups, group_size, eps,
                        HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, PRODUCT: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    # the row as a [groups, group_size] tile: reductions run along axis 1
    group = tl.arange(0, BLOCK_G)[:, None]
    col = tl.arange(0, BLOCK_S)[None, :]
    mask = (group < groups) & (col < group_size)
    offs = group * group_size + col
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        s = g * tl.sigmoid(g)
    v = x
    if not NORM_BEFORE_GATE:
        if HAS_GATE:
            v = x * s
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / group_size + eps)
    tl.store(RSTD + row * groups + tl.arange(0, BLOCK_G), rstd, mask=tl.arange(0, BLOCK_G) < groups)
    n = (v * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    y = _round_product(w * n, X, W, PRODUCT)
    if NORM_BEFORE_GATE:
        y = y * s
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rms_norm_bwd(DY, X, G, W, RSTD, DX, DG, DW_PARTIAL, stride_dy, stride_x, stride_g, stride_dx, stride_dg,
                        rows, groups, group_size, HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                        PRODUCT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    group = tl.arange(0, BLOCK_G)[:, None]
    col = tl.arange(0, BLOCK_S)[None, :]
    mask = (group < groups) & (col < group_size)
    offs = group * group_size + col
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_G, BLOCK_S), dtype=tl.float32)
    for row in range(pid, rows, nprog):
        dy = tl.load(DY + row * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row * groups + tl.arange(0, BLOCK_G), mask=tl.arange(0, BLOCK_G) < groups,
                       other=0.0)[:, None]
        if HAS_GATE:
            g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            s = g * sig
            ds = sig * (1.0 + g * (1.0 - sig))
        v = x
        if not NORM_BEFORE_GATE:
            if HAS_GATE:
                v = x * s
        v_hat = v * rstd
        n = v_hat.to(X.dtype.element_ty).to(tl.float32)
        if NORM_BEFORE_GATE:
            dp = dy * s
            p = _round_product(w * n, X, W, PRODUCT)
            tl.store(DG + row * stride_dg + offs, (dy * p * ds).to(DG.dtype.element_ty), mask=mask)
        else:
            dp = dy
        dw += dp * n
        d_nhat = dp * w
        dv = rstd * (d_nhat - v_hat * (tl.sum(d_nhat * v_hat, axis=1) / group_size)[:, None])
        if NORM_BEFORE_GATE:
            dx = dv
        elif HAS_GATE:
            dx = dv * s
            tl.store(DG + row * stride_dg + offs, (dv * x * ds).to(DG.dtype.element_ty), mask=mask)
        else:
            dx = dv
        tl.store(DX + row * stride_dx + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * groups * group_size + offs, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, N]`` tensor whose rows are contiguous."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _product_rounding(x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """How ``weight * n`` (``n`` in the input's dtype) rounds in PyTorch, and its dtype."""
    product = torch.promote_types(w_dtype, x_dtype)
    if product in (torch.float32, torch.float64):
        return PRODUCT_FLOAT32, product
    return (PRODUCT_INPUT if product == x_dtype else PRODUCT_WEIGHT), product


def _blocks(groups: int, group_size: int) -> dict:
    block_g = triton.next_power_of_2(groups)
    block_s = block_size(group_size)
    return dict(BLOCK_G=block_g, BLOCK_S=block_s, num_warps=num_warps(block_g * block_s))


class GatedRMSNormFunction(torch.autograd.Function):
    """Autograd wrapper; see the module docstring for the maths."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps, group_size, norm_before_gate):
        shape = x.shape
        x2 = _rows(x)
        rows, n = x2.shape
        g2 = _rows(gate) if gate is not None else x2  # a placeholder the kernel does not read
        groups = n // group_size
        product, product_dtype = _product_rounding(x.dtype, weight.dtype)
        # norm-then-gate returns the input's dtype (it casts back); gate-then-norm returns weight * n
        y = torch.empty(rows, n, dtype=x.dtype if norm_before_gate else product_dtype, device=x.device)
        rstd = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
        _gated_rms_norm_fwd[(rows,)](x2, g2, weight, y, rstd, x2.stride(0), g2.stride(0), y.stride(0), groups,
                                    group_size, eps, HAS_GATE=gate is not None, NORM_BEFORE_GATE=norm_before_gate,
                                    PRODUCT=product, **_blocks(groups, group_size))
        ctx.save_for_backward(x2, g2 if gate is not None else None, weight, rstd)
        ctx.shape, ctx.group_size, ctx.norm_before_gate, ctx.product = shape, group_size, norm_before_gate, product
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, g2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        rows, n = x2.shape
        groups = n // ctx.group_size
        dx = torch.empty_like(x2)
        dg = torch.empty_like(g2) if g2 is not None else None
        programs = num_programs(rows, dy.device)
        dw_partial = torch.empty(programs, n, dtype=torch.float32, device=dy.device)
        g_arg = g2 if g2 is not None else x2
        dg_arg = dg if dg is not None else dx
        _gated_rms_norm_bwd[(programs,)](dy2, x2, g_arg, weight, rstd, dx, dg_arg, dw_partial, dy2.stride(0),
                                         x2.stride(0), g_arg.stride(0), dx.stride(0), dg_arg.stride(0), rows, groups,
                                         ctx.group_size, HAS_GATE=g2 is not None,
                                         NORM_BEFORE_GATE=ctx.norm_before_gate, PRODUCT=ctx.product,
                                         **_blocks(groups, ctx.group_size))
        dweight = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        dgate = dg.view(ctx.shape) if dg is not None and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dgate, dweight, None, None, None


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6,
                   group_size: int | None = None, norm_before_gate: bool = True) -> torch.Tensor:
    """Gated RMSNorm of ``x`` over its last dimension (see the module docstring).

    ``norm_before_gate=True`` is Qwen3-Next's order (the gate is required and
    the whole row is one group); ``False`` gates first and normalises each
    group of ``group_size`` columns (Mamba-2's order; the gate may be ``None``).
    """
    n = x.shape[-1]
    group_size = n if group_size is None else int(group_size)
    if n % group_size:
        raise ValueError(f"gated RMSNorm: the width {n} is not a multiple of the group size {group_size}")
    if gate is None and norm_before_gate:
        raise ValueError("gated RMSNorm: the norm-then-gate order needs a gate")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gated RMSNorm: the gate's shape {tuple(gate.shape)} is not the input's {tuple(x.shape)}")
    return GatedRMSNormFunction.apply(x, gate, weight, float(eps), group_size, bool(norm_before_gate))
