"""A LoRA GLU MLP in fewer passes over its activations than peft's separate modules.

peft runs each LoRA projection as ``base(x) + lora_B(lora_A(dropout(x))) * s``:
for the three projections of a GLU MLP that is three extra reads of ``x``-sized
inputs, and for each output a LoRA product, a scaling pass and an add pass over
``[tokens, intermediate]`` tensors, with autograd keeping the activation
``h = act(gate) * up`` for the down projection's backward. Here:

- gate's and up's ``A`` matrices are stacked, so ``x`` is read once for both
  (``xa = x @ [A_g; A_u].T``), and in backward ``dx``'s two LoRA terms and both
  ``dA`` are one matmul each;
- each LoRA product is accumulated into its base output by ``addmm_(alpha=s)``:
  no separate scaling or add passes, no ``[tokens, intermediate]`` temporaries;
- ``h`` is not stored: the backward recomputes it with the GLU kernel.

Frozen base weights only (LoRA training): a base weight that needs a gradient,
a bias, dropout, DoRA or several active adapters take the module's ordinary
path. Parameters stay peft's, so adapters save as usual.

QLoRA: a bitsandbytes 4-bit base (``Linear4bit``) is dequantized to the
compute dtype right where its matmul needs it, in forward and again in
backward, and freed at once, so only one projection's dense weight exists at a
time and none is kept for backward. bitsandbytes' own training matmul
dequantizes the same way; what this saves is peft's separate LoRA passes.
"""

from __future__ import annotations

import torch

from plait_kernels.lora_linear import dense_weight, is_lora, lora_parts
from plait_kernels.modules import PlaitGLUMLP


class LoRAGLUMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with LoRA on all three; see the module docstring.

    Inputs per projection: frozen base weight ``W`` (dense, or 4-bit packed data
    with its ``quant_state``; ``None`` for dense), LoRA ``A`` ``[r, in]``, ``B``
    ``[out, r]`` and scaling ``s``. ``x`` is ``[tokens, hidden]``.
    """

    @staticmethod
    def forward(ctx, x, w_g, q_g, a_g, b_g, s_g, w_u, q_u, a_u, b_u, s_u, w_d, q_d, a_d, b_d, s_d, gelu):
        from plait_kernels.ops.glu import glu_forward

        dt = x.dtype
        a_gu = torch.cat([a_g, a_u]).to(dt)
        r_g = a_g.shape[0]
        xa = x @ a_gu.t()  # one read of x for both LoRA A's
        gate = x @ dense_weight(w_g, q_g, dt).t()
        gate.addmm_(xa[:, :r_g], b_g.to(dt).t(), alpha=s_g)
        up = x @ dense_weight(w_u, q_u, dt).t()
        up.addmm_(xa[:, r_g:], b_u.to(dt).t(), alpha=s_u)
        h = glu_forward(gate, up, gelu)
        ha = h @ a_d.to(dt).t()
        out = h @ dense_weight(w_d, q_d, dt).t()
        out.addmm_(ha, b_d.to(dt).t(), alpha=s_d)
        ctx.save_for_backward(x, gate, up, xa, ha, w_g, a_gu, b_g, w_u, b_u, w_d, a_d, b_d)
        ctx.quant_states = (q_g, q_u, q_d)
        ctx.scales, ctx.r_g, ctx.gelu = (s_g, s_u, s_d), r_g, gelu
        ctx.param_dtypes = (a_g.dtype, b_g.dtype, a_u.dtype, b_u.dtype, a_d.dtype, b_d.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):
        from plait_kernels.ops.glu import glu_backward, glu_forward

        x, gate, up, xa, ha, w_g, a_gu, b_g, w_u, b_u, w_d, a_d, b_d = ctx.saved_tensors
        s_g, s_u, s_d = ctx.scales
        q_g, q_u, q_d = ctx.quant_states
        dt = x.dtype
        b_g, b_u, a_d, b_d = b_g.to(dt), b_u.to(dt), a_d.to(dt), b_d.to(dt)
        d_out = d_out.contiguous()

        # down projection
        h = glu_forward(gate, up, ctx.gelu)  # recomputed rather than stored
        d_out_b = d_out @ b_d  # [T, r_d]
        d_b_d = (d_out.t() @ ha).mul_(s_d)
        d_a_d = (d_out_b.t() @ h).mul_(s_d)
        del h
        d_h = d_out @ dense_weight(w_d, q_d, dt)
        d_h.addmm_(d_out_b, a_d, alpha=s_d)

        # activation, then gate and up together
        d_gate, d_up = glu_backward(d_h, gate, up, ctx.gelu)
        del d_h
        r_g = ctx.r_g
        d_b_g = (d_gate.t() @ xa[:, :r_g]).mul_(s_g)
        d_b_u = (d_up.t() @ xa[:, r_g:]).mul_(s_u)
        coef = torch.cat([(d_gate @ b_g).mul_(s_g), (d_up @ b_u).mul_(s_u)], dim=1)  # [T, r_g + r_u]
        d_x = d_gate @ dense_weight(w_g, q_g, dt)
        d_x.addmm_(d_up, dense_weight(w_u, q_u, dt))
        d_x.addmm_(coef, a_gu)  # both LoRA A terms in one matmul
        d_a_gu = coef.t() @ x
        dtypes = ctx.param_dtypes
        return (d_x, None, None, d_a_gu[:r_g].to(dtypes[0]), d_b_g.to(dtypes[1]), None,
                None, None, d_a_gu[r_g:].to(dtypes[2]), d_b_u.to(dtypes[3]), None,
                None, None, d_a_d.to(dtypes[4]), d_b_d.to(dtypes[5]), None, None)


def is_lora_mlp(mlp) -> bool:
    """Whether ``mlp``'s three projections are peft LoRA layers."""
    return all(is_lora(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))


class PlaitLoRAGLUMLP(PlaitGLUMLP):
    """:class:`PlaitGLUMLP` with the fused LoRA path when the adapters allow it."""

    def __init__(self, gate_proj, up_proj, down_proj, glu_fn, kernel_name: str, gelu: bool):
        super().__init__(gate_proj, up_proj, down_proj, glu_fn, kernel_name)
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [lora_parts(p) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        if any(p is None for p in parts):
            return super().forward(x)  # peft's own modules, with the GLU kernel
        flat = x.reshape(-1, x.shape[-1])
        out = LoRAGLUMLPFunction.apply(flat, *parts[0], *parts[1], *parts[2], self.gelu)
        return out.view(*x.shape[:-1], out.shape[-1])
