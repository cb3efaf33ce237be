"""Gated activations of a GLU MLP: ``act(gate) * up`` for SwiGLU (SiLU) and GeGLU
(GELU, tanh approximation), forward and backward.

The backward recomputes ``act(gate)`` from the saved inputs instead of keeping
it, so the pair costs no more activation memory than the two projections::

    d_gate = d_out * up * act'(gate)
    d_up   = d_out * act(gate)

with ``silu'(g) = sig(g) * (1 + g * (1 - sig(g)))`` and, for
``gelu(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3)))``,
``gelu'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 * 0.044715 g^2)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait_kernels.ops._util import tanh

_BLOCK = 1024


@triton.jit
def _glu_fwd(G, U, OUT, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        act = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        act = g * tl.sigmoid(g)
    tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd(DOUT, G, U, DG, DU, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        t = tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, (dout * u * dact).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dout * act).to(DU.dtype.element_ty), mask=mask)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``act(gate) * up`` without autograd (for callers with their own backward)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    _glu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, GELU=gelu, BLOCK=_BLOCK)
    return out


def glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool):
    """``(d_gate, d_up)`` of :func:`glu_forward` for the output gradient ``dout``."""
    dout = dout.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _glu_bwd[(triton.cdiv(n, _BLOCK),)](dout, gate, up, d_gate, d_up, n, GELU=gelu, BLOCK=_BLOCK)
    return d_gate, d_up


class GLUFunction(torch.autograd.Function):
    """``act(gate) * up`` with ``act`` SiLU (``gelu=False``) or tanh-GELU."""

    @staticmethod
    def forward(ctx, gate, up, gelu):
        gate, up = gate.contiguous(), up.contiguous()
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
