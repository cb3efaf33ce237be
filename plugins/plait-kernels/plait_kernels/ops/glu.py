"""Gated activations of a GLU MLP: ``act(gate) * up`` for SwiGLU (SiLU) and GeGLU
(GELU, tanh approximation), forward and backward.

The backward recomputes ``act(gate)`` from the saved inputs instead of keeping
it, so the pair costs no more activation memory than the two projections::

    d_gate = d_out * up * act'(gate)
    d_up   = d_out * act(gate)

with ``silu'(g) = sig(g) * (1 + g * (1 - sig(g)))`` and, for
``gelu(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3)))``,
``gelu'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 * 0.044715 g^2)``.

A routed MoE expert passes ``row_scale``, each row's routing weight ``w``: the
forward is then ``w * act(gate) * up`` (the weight applied to the gated
activation, before the down projection, instead of to the down projection's
wider output), and the backward also gives ``d_w = sum(d_out * act(gate) * up)``
per row, in the same pass (float32 sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait_kernels.ops._util import tanh

_BLOCK = 1024


@triton.jit
def _glu_fwd(G, U, OUT, S, cols, stride_g, stride_u, stride_out, GELU: tl.constexpr, SCALED: tl.constexpr,
             BLOCK: tl.constexpr):
    # one program: BLOCK columns of one row; rows may be strided (gate and up as
    # the two halves of one [tokens, 2 * intermediate] matmul output)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        act = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        act = g * tl.sigmoid(g)
    h = act * u
    if SCALED:  # the row's routing weight, as torch multiplies: the product rounded to the output dtype first
        h = h.to(OUT.dtype.element_ty).to(tl.float32) * tl.load(S + row).to(tl.float32)
    tl.store(OUT + row * stride_out + offs, h.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd(DOUT, G, U, DG, DU, H, S, DS, cols, stride_dout, stride_g, stride_u, stride_dg, stride_du, stride_h,
             n_blocks, GELU: tl.constexpr, STORE_H: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    dout = tl.load(DOUT + row * stride_dout + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        t = tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    if SCALED:
        # d_w: this block's part of the row's sum(d_out * act * up), the unscaled product as the forward rounded it
        scale = tl.load(S + row).to(tl.float32)
        h = (act * u).to(DG.dtype.element_ty).to(tl.float32)
        tl.store(DS + row * n_blocks + tl.program_id(1), tl.sum(tl.where(mask, dout * h, 0.0), axis=0))
        dout = (dout * scale).to(DG.dtype.element_ty).to(tl.float32)
    tl.store(DG + row * stride_dg + offs, (dout * u * dact).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + offs, (dout * act).to(DU.dtype.element_ty), mask=mask)
    if STORE_H:  # the forward's output, for a caller that did not keep it (may overwrite DOUT in place)
        h_fwd = act * u
        if SCALED:  # as the forward scales it: the product rounded first, then times the row's weight
            h_fwd = h_fwd.to(H.dtype.element_ty).to(tl.float32) * scale
        tl.store(H + row * stride_h + offs, h_fwd.to(H.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, cols]`` with unit column stride; a view where it can be."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _grid(rows: int, cols: int):
    return (rows, triton.cdiv(cols, _BLOCK))


def glu_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool, out: torch.Tensor | None = None,
                row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gate) * up`` without autograd (for callers with their own backward);
    times ``row_scale[row]`` per row when given (``[rows]``, module docstring).

    ``gate`` and ``up`` may be row-strided views (the halves of one matmul's
    output); the result is contiguous, or written into ``out``, a
    ``[rows, cols]`` view with unit column stride (e.g. the first columns of a
    wider buffer).
    """
    g, u = _rows(gate), _rows(up)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows, cols = g.shape
    o = out.view(g.shape) if out.shape != g.shape else out
    if o.stride(-1) != 1:
        raise ValueError("glu_forward writes rows with unit column stride")
    scale = _row_scale(row_scale, rows)
    if rows and cols:
        _glu_fwd[_grid(rows, cols)](g, u, o, scale if scale is not None else o, cols, g.stride(0), u.stride(0),
                                    o.stride(0), GELU=gelu, SCALED=scale is not None, BLOCK=_BLOCK)
    return out


def _row_scale(row_scale, rows: int):
    if row_scale is None:
        return None
    scale = row_scale.reshape(-1)
    if scale.numel() != rows:
        raise ValueError(f"row_scale has {scale.numel()} entries for {rows} rows")
    return scale.contiguous()


def glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool, out=None, h_out=None,
                 row_scale: torch.Tensor | None = None):
    """``(d_gate, d_up)`` of :func:`glu_forward` for the output gradient ``dout``;
    with ``row_scale`` (as the forward's) ``(d_gate, d_up, d_row_scale)``,
    ``d_row_scale`` float32 ``[rows]``.

    ``out``: a ``(d_gate, d_up)`` pair of ``[rows, cols]`` views to write into
    (the halves of one buffer), which may be ``(gate, up)`` themselves (each
    program stores where it has just loaded); new contiguous tensors otherwise. ``h_out``: also
    write the forward's output ``act(gate) * up`` (with ``row_scale``, times it as
    :func:`glu_forward` does: the same values) there, in the same pass; it may
    be ``dout`` itself (each value is read before it is overwritten).
    """
    d, g, u = _rows(dout), _rows(gate), _rows(up)
    if out is None:
        out = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
               torch.empty(up.shape, dtype=up.dtype, device=up.device))
    d_gate, d_up = out
    dg, du = d_gate.view(g.shape), d_up.view(u.shape)
    h = dg if h_out is None else h_out.view(g.shape)  # an unwritten placeholder without h_out
    if dg.stride(-1) != 1 or du.stride(-1) != 1 or h.stride(-1) != 1:
        raise ValueError("glu_backward writes rows with unit column stride")
    rows, cols = g.shape
    scale = _row_scale(row_scale, rows)
    n_blocks = triton.cdiv(cols, _BLOCK)
    # per (row, column block) partial sums of d_w, summed below (no atomics: the same bits every run)
    make = torch.empty if rows and cols else torch.zeros  # every entry is written when there is a column
    d_scale = make(rows, n_blocks, dtype=torch.float32, device=gate.device) if scale is not None else None
    if rows and cols:
        _glu_bwd[_grid(rows, cols)](d, g, u, dg, du, h, scale if scale is not None else dg,
                                    d_scale if d_scale is not None else dg, cols, d.stride(0), g.stride(0),
                                    u.stride(0), dg.stride(0), du.stride(0), h.stride(0), n_blocks, GELU=gelu,
                                    STORE_H=h_out is not None, SCALED=scale is not None, BLOCK=_BLOCK)
    if scale is not None:
        return d_gate, d_up, d_scale[:, 0] if n_blocks == 1 else d_scale.sum(dim=1)
    return d_gate, d_up


class GLUFunction(torch.autograd.Function):
    """``act(gate) * up`` with ``act`` SiLU (``gelu=False``) or tanh-GELU."""

    @staticmethod
    def forward(ctx, gate, up, gelu):
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return glu_forward(gate, up, gelu)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        d_gate, d_up = glu_backward(dout, gate, up, ctx.gelu)
        return d_gate, d_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return GLUFunction.apply(gate, up, False)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelutanh(gate) * up`` (Gemma's ``gelu_pytorch_tanh``)."""
    return GLUFunction.apply(gate, up, True)
