"""A LoRA GLU MLP in fewer passes over its activations than peft's separate modules.

peft runs each LoRA projection as ``base(x) + lora_B(lora_A(dropout(x))) * s``:
for the three projections of a GLU MLP that is three extra reads of ``x``-sized
inputs, and for each output a LoRA product, a scaling pass and an add pass over
``[tokens, intermediate]`` tensors, with autograd keeping the activation
``h = act(gate) * up`` for the down projection's backward. Here:

- gate and up, base and LoRA, are one matmul over a widened input::

      x_wide = [x | x A_g.T | x A_u.T]                  [tokens, hidden + r_g + r_u]
      W_wide = [[W_g, s_g B_g, 0], [W_u, 0, s_u B_u]]   [2 * intermediate, hidden + r_g + r_u]
      [gate | up] = x_wide @ W_wide.T

  so no pass over the ``[tokens, intermediate]`` outputs adds a LoRA product.
  The widened input is built per call (``ops/stack.py``, vectorized row
  copies), which is cheaper: at Llama shapes ``x`` is a quarter as wide as
  each output. The stacked weight is a persistent buffer whose first columns
  the base weights are views of (``lora_mlp_fold``, :mod:`plait_kernels.lora_mlp_fold`;
  each call writes only its ``B`` columns), else built per call. In backward ``[d_gate | d_up] @ W_wide``
  gives ``dx``'s base part and both LoRA coefficients in one matmul, and both
  ``dB`` come from one more read of ``[d_gate | d_up]``;
- the down projection's LoRA product is accumulated into its output by
  ``addmm_(alpha=s)``: no separate scaling or add pass;
- ``h`` is not stored: the backward's GLU kernel rebuilds it in the pass that
  computes ``[d_gate | d_up]``, over ``d_h`` which it has just read;
- in a checkpoint's recompute pass the activation and the down projection are
  skipped when the family says nothing after the MLP saves its output (the
  pass only rebuilds what backward saved; the layer output is discarded).

Frozen base weights only (LoRA training): a base weight that needs a gradient,
a bias, dropout, DoRA or several active adapters take the module's ordinary
path. Parameters stay peft's, so adapters save as usual.

QLoRA: a bitsandbytes 4-bit base (``Linear4bit``) is dequantized to the
compute dtype right where its matmul needs it, in forward and again in
backward, and freed at once, so no dense weight is kept for backward.
bitsandbytes' own training matmul dequantizes the same way; what this saves
is peft's separate LoRA passes, and for NF4 (``ops/nf4.py``) the gate and up
bases are dequantized straight into the stacked weight.
"""

from __future__ import annotations

import torch

from plait.model.recompute import is_recomputing
from plait_kernels.factor_casts import in_dtype, stacked
from plait_kernels.lora_linear import dense_weight, is_lora, lora_parts, scaled_mm
from plait_kernels.lora_mlp_fold import FOLD_ATTRIBUTE
from plait_kernels.modules import PlaitGLUMLP


def _gate_up_weight(w_g, q_g, b_g, s_g, w_u, q_u, b_u, s_u, dtype, fold=None) -> torch.Tensor:
    """``[[W_g, s_g B_g, 0], [W_u, 0, s_u B_u]]``: gate's and up's base and LoRA ``B``
    weights as one ``[2 * intermediate, hidden + r_g + r_u]`` matrix, so that
    ``[x | x A_g.T | x A_u.T] @ it.T`` is ``[gate | up]`` with LoRA included. With
    the MLP's :class:`~plait_kernels.lora_mlp_fold.StackedGateUp` still backing the
    bases, that buffer with the current ``B`` written in; else a new tensor."""
    from plait_kernels.ops.nf4 import dequantize_nf4_, dequantizes
    from plait_kernels.ops.stack import empty_gate_up, fill_gate_up_, gate_up_weight

    if fold is not None and q_g is None and q_u is None and fold.backs(w_g, w_u, b_g, b_u, dtype):
        return fold.with_factors(b_g, b_u, s_g, s_u)
    if q_g is not None and dequantizes(w_g, q_g) and dequantizes(w_u, q_u):
        # 4-bit bases dequantized straight into their blocks: no dense temporary, no copy
        inter, hidden = q_g.shape
        out = empty_gate_up(inter, hidden, b_g.shape[1], b_u.shape[1], dtype, b_g.device)
        dequantize_nf4_(out[:inter, :hidden], w_g, q_g)
        dequantize_nf4_(out[inter:, :hidden], w_u, q_u)
        return fill_gate_up_(out, b_g, b_u, s_g, s_u)
    return gate_up_weight(dense_weight(w_g, q_g, dtype), dense_weight(w_u, q_u, dtype), b_g, b_u, s_g, s_u, dtype)


class LoRAGLUMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with LoRA on all three; see the module docstring.

    Inputs per projection: frozen base weight ``W`` (dense, or 4-bit packed data
    with its ``quant_state``; ``None`` for dense), LoRA ``A`` ``[r, in]``, ``B``
    ``[out, r]`` and scaling ``s``. ``x`` is ``[tokens, hidden]``. With
    ``skip_output`` (a checkpoint's recompute pass, whose output is discarded)
    neither the activation nor the down projection is computed, and the output
    is left uninitialised. ``fold``: the MLP's persistent stacked gate/up weight
    (:mod:`plait_kernels.lora_mlp_fold`), used where it still backs the bases.
    """

    @staticmethod
    def forward(ctx, x, w_g, q_g, a_g, b_g, s_g, w_u, q_u, a_u, b_u, s_u, w_d, q_d, a_d, b_d, s_d, gelu,
                skip_output=False, fold=None):
        from plait_kernels.ops.glu import glu_forward
        from plait_kernels.ops.stack import copy_rows_

        dt = x.dtype
        tokens, hidden = x.shape
        inter = b_g.shape[0]
        a_gu = stacked([a_g, a_u], dt)
        # x_wide = [x | x A_g.T | x A_u.T]: one read of x for both A's, and with
        # the stacked weight one matmul gives gate and up with their LoRA terms
        # (no add pass over the [tokens, 2 * intermediate] output)
        x_wide = x.new_empty(tokens, hidden + a_gu.shape[0])
        copy_rows_(x_wide[:, :hidden], x)
        torch.mm(x, a_gu.t(), out=x_wide[:, hidden:])
        gate_up = x_wide @ _gate_up_weight(w_g, q_g, b_g, s_g, w_u, q_u, b_u, s_u, dt, fold).t()
        if skip_output:
            # nothing of the activation is needed: backward gets h from its GLU kernel
            out = x.new_empty(tokens, b_d.shape[0])
        else:
            h = glu_forward(gate_up[:, :inter], gate_up[:, inter:], gelu)
            out = h @ dense_weight(w_d, q_d, dt).t()
            out.addmm_(h @ in_dtype(a_d, dt).t(), in_dtype(b_d, dt).t(), alpha=s_d)
            del h
        # the same tensors whether or not the output was skipped: a checkpoint's
        # recompute must save what the first forward saved (count, shapes, dtypes)
        ctx.save_for_backward(x_wide, gate_up, w_g, b_g, w_u, b_u, w_d, a_gu, a_d, b_d)
        ctx.quant_states = (q_g, q_u, q_d)
        ctx.scales, ctx.r_g, ctx.gelu, ctx.fold = (s_g, s_u, s_d), a_g.shape[0], gelu, fold
        ctx.param_dtypes = (a_g.dtype, b_g.dtype, a_u.dtype, b_u.dtype, a_d.dtype, b_d.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):
        from plait_kernels.ops.glu import glu_backward

        x_wide, gate_up, w_g, b_g, w_u, b_u, w_d, a_gu, a_d, b_d = ctx.saved_tensors
        s_g, s_u, s_d = ctx.scales
        q_g, q_u, q_d = ctx.quant_states
        dt = x_wide.dtype
        r_g = ctx.r_g
        hidden = x_wide.shape[1] - a_gu.shape[0]
        inter = gate_up.shape[1] // 2
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        a_d, b_d = in_dtype(a_d, dt), in_dtype(b_d, dt)
        d_out = d_out.contiguous()

        # down projection's input gradient
        d_out_b = d_out @ b_d  # [T, r_d]
        d_h = d_out @ dense_weight(w_d, q_d, dt)
        d_h.addmm_(d_out_b, a_d, alpha=s_d)

        # activation, written over [gate | up] itself: each value of d_gate and d_up is
        # stored where the same kernel program has just read gate and up, and nothing
        # after this reads gate or up, so no second [T, 2 * intermediate] buffer exists
        # (it was the peak of a checkpointed DPO step: bench/preference_peak_cpu.py).
        # The same pass rebuilds h = act(gate) * up (not stored by forward) over d_h.
        glu_backward(d_h, gate, up, ctx.gelu, out=(gate, up), h_out=d_h)
        d_gate_up, gate_up, gate, up = gate_up, None, None, None
        # a second backward through this graph (retain_graph) would read the overwritten
        # inputs: the bump makes autograd refuse it instead (a compiled graph tracks the
        # kernel's writes itself)
        if not torch.compiler.is_compiling():
            torch.autograd.graph.increment_version(d_gate_up)
        h, d_h = d_h, None  # the buffer now holds h (one name, so `del h` frees it)
        # down projection's LoRA gradients
        ha = h @ a_d.t()  # [T, r_d], cheaper to redo from h than to keep across a checkpoint
        d_b_d = scaled_mm(d_out.t(), ha, s_d)
        d_a_d = scaled_mm(d_out_b.t(), h, s_d)
        del h, ha
        # one matmul with the stacked weight: dx's base part, and in the last
        # r_g + r_u columns the LoRA coefficients [d_gate s_g B_g | d_up s_u B_u]
        d_x_wide = d_gate_up @ _gate_up_weight(w_g, q_g, b_g, s_g, w_u, q_u, b_u, s_u, dt, ctx.fold)
        coef = d_x_wide[:, hidden:]
        d_x = torch.addmm(d_x_wide[:, :hidden], coef, a_gu)  # both LoRA A terms of dx in one matmul
        d_a_gu = coef.t() @ x_wide[:, :hidden]
        del d_x_wide
        # both B gradients in one read of [d_gate | d_up]; the off-diagonal blocks are unused
        d_b_gu = d_gate_up.t() @ x_wide[:, hidden:]
        d_b_g = d_b_gu[:inter, :r_g].mul(s_g)
        d_b_u = d_b_gu[inter:, r_g:].mul(s_u)
        dtypes = ctx.param_dtypes
        if dtypes[0] == dtypes[2]:
            d_a_gu = d_a_gu.to(dtypes[0])  # both A gradients in one cast
        return (d_x, None, None, d_a_gu[:r_g].to(dtypes[0]), d_b_g.to(dtypes[1]), None,
                None, None, d_a_gu[r_g:].to(dtypes[2]), d_b_u.to(dtypes[3]), None,
                None, None, d_a_d.to(dtypes[4]), d_b_d.to(dtypes[5]), None, None, None, None)


def is_lora_mlp(mlp) -> bool:
    """Whether ``mlp``'s three projections are peft LoRA layers."""
    return all(is_lora(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))


class PlaitLoRAGLUMLP(PlaitGLUMLP):
    """:class:`PlaitGLUMLP` with the fused LoRA path when the adapters allow it."""

    def __init__(self, gate_proj, up_proj, down_proj, glu_fn, kernel_name: str, gelu: bool,
                 output_feeds_residual: bool = False):
        super().__init__(gate_proj, up_proj, down_proj, glu_fn, kernel_name)
        self.gelu = gelu
        # the decoder layer adds our output to the residual and saves nothing of
        # it, so a checkpoint's recompute pass may skip the down projection
        self.output_feeds_residual = output_feeds_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [lora_parts(p) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        if any(p is None for p in parts):
            return super().forward(x)  # peft's own modules, with the GLU kernel
        flat = x.reshape(-1, x.shape[-1])
        skip = self.output_feeds_residual and is_recomputing() and not torch.compiler.is_compiling()
        # a compiled layer's trace gets the per-call build: the kept buffer is written in place
        fold = None if torch.compiler.is_compiling() else getattr(self, FOLD_ATTRIBUTE, None)
        out = LoRAGLUMLPFunction.apply(flat, *parts[0], *parts[1], *parts[2], self.gelu, skip, fold)
        return out.view(*x.shape[:-1], out.shape[-1])
