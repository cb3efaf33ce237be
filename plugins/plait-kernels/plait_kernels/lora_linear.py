"""LoRA linears that share one input, computed in fewer passes than peft's modules.

peft computes each adapted projection as ``base(x) + lora_B(lora_A(x)) * s``.
For the query, key and value projections of one attention layer that reads
``x`` three more times for the three ``A`` products and, per output, spends a
scaling pass and an add pass over the output. Here the ``A`` matrices of all
projections that share ``x`` are stacked, so::

    xa = x @ [A_q; A_k; A_v].T                     one read of x for every A
    q  = x @ W_q.T  +  s_q * xa[:, r_q] @ B_q.T    the LoRA product added in place (addmm_)

and in backward the input gradient's LoRA terms and every ``dA`` are one
matmul each::

    coef = [dq @ B_q * s_q, dk @ B_k * s_k, dv @ B_v * s_v]     [tokens, r_q + r_k + r_v]
    dx   = dq @ W_q + dk @ W_k + dv @ W_v + coef @ [A_q; A_k; A_v]
    dA   = coef.T @ x                                            split per projection

The output projection is the same computation with one projection. Under
offloaded checkpointing the outputs are parked in host memory in the forward
and handed back in the recompute pass (``plait.model.recompute.take_kept``),
which then skips every base matmul here: an output costs ``tokens x out``
values to move and ``2 x tokens x in x out`` FLOPs to rebuild. A base
may be a bitsandbytes 4-bit ``Linear4bit``: it is dequantized to the compute
dtype where its matmul needs it and freed at once (:func:`dense_weight`).
Only frozen, bias-free bases with one active adapter, no dropout in training
and no DoRA take this path (:func:`lora_parts`); anything else runs peft's
modules. Parameters stay peft's, so adapters save as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.model.recompute import keep_for_recompute, keeps_for_recompute, take_kept
from plait_kernels.factor_casts import in_dtype, stacked


def dense_weight(w: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` base weight in ``dtype``: ``w`` itself, or ``w`` (packed
    4-bit data) dequantized with its bitsandbytes ``quant_state``."""
    if quant_state is None:
        return w
    from plait_kernels.ops.nf4 import dequantize_nf4_, dequantizes

    if dequantizes(w, quant_state):  # one launch instead of bitsandbytes' three, in dtype directly
        return dequantize_nf4_(torch.empty(quant_state.shape, dtype=dtype, device=w.device), w, quant_state)
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(w, quant_state).to(dtype)



def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(a @ b) * scale`` as one GEMM, into ``out`` (e.g. a block of columns of a
    wider buffer) or a new tensor: the scale is applied to the accumulator
    (``beta=0``: the uninitialised output is not read), no second pass."""
    out = a.new_empty(a.shape[0], b.shape[1]) if out is None else out
    return out.addmm_(a, b, beta=0, alpha=scale)


def _frozen_base(base):
    """``(weight, quant_state)`` of a frozen, bias-free base linear; ``None`` otherwise.

    A plain ``nn.Linear`` gives its weight and ``None``; a bitsandbytes 4-bit
    ``Linear4bit`` gives its packed data and quantization state.
    """
    params = base._parameters  # not base.weight: see lora_parts
    weight = params.get("weight")
    if weight is None or params.get("bias") is not None or weight.requires_grad:
        return None
    if type(base) is nn.Linear:
        return weight, None
    quant_state = getattr(weight, "quant_state", None)
    if type(base).__name__ == "Linear4bit" and quant_state is not None:
        return weight.data, quant_state
    return None  # 8-bit and other quantized layers: their own module path


def is_lora(module) -> bool:
    """Whether ``module`` is a peft LoRA layer (wrapping a base linear)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def lora_parts(layer):
    """``(W, quant_state, A, B, scaling)`` of a peft LoRA linear the fast path can run, else ``None``.

    Asked for every fused projection at every call (~20 times a layer a DPO step), so submodules
    and parameters are read from ``nn.Module``'s registries: ``layer.lora_A`` goes through
    ``nn.Module.__getattr__``'s fallback, which was half of this function's ~13 us on a CPU."""
    modules = getattr(layer, "_modules", None)
    if modules is None or "lora_A" not in modules or "base_layer" not in modules:  # not a peft LoRA layer
        return None
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    active = list(getattr(layer, "active_adapters", ()))
    lora_a = modules["lora_A"]
    if len(active) != 1 or active[0] not in lora_a or getattr(layer, "lora_variant", {}).get(active[0]):
        return None
    name = active[0]
    base, dropout = modules["base_layer"], modules["lora_dropout"][name]
    frozen = _frozen_base(base)
    if frozen is None:
        return None
    if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and
                                                      (dropout.p == 0 or not dropout.training)):
        return None
    if getattr(layer, "fan_in_fan_out", False):
        return None
    return (*frozen, lora_a[name]._parameters["weight"], modules["lora_B"][name]._parameters["weight"],
            float(layer.scaling[name]))


#: one projection's inputs to :class:`LoRASharedInputFunction`
PARTS_PER_PROJECTION = 5  # weight, quant_state, A, B, scaling


class LoRASharedInputFunction(torch.autograd.Function):
    """``[x @ W_i.T + s_i * (x @ A_i.T) @ B_i.T for each projection i]``; see the module docstring.

    ``apply(x, *parts)`` with ``x`` ``[tokens, in]`` and, per projection, the
    five items :func:`lora_parts` returns; returns one output per projection.
    """

    @staticmethod
    def forward(ctx, x, *parts):
        dt = x.dtype
        projections = [parts[i:i + PARTS_PER_PROJECTION] for i in range(0, len(parts), PARTS_PER_PROJECTION)]
        ranks = [a.shape[0] for _, _, a, _, _ in projections]
        a_all = stacked([a for _, _, a, _, _ in projections], dt)
        xa = x @ a_all.t()  # one read of x for every A
        compiling = torch.compiler.is_compiling()
        # a checkpoint's recompute pass gets the outputs the forward parked in
        # host memory: no base matmul, no dequantization (xa is still saved)
        outputs = None if compiling else take_kept()
        if outputs is not None:
            expected_shapes = [(x.shape[0], b.shape[0]) for _, _, _, b, _ in projections]
            if [tuple(o.shape) for o in outputs] != expected_shapes:
                raise RuntimeError("the recompute pass took outputs kept for other projections: the layer's "
                                   "forward ran a different path in its two passes")
        else:
            outputs, start = [], 0
            for (w, quant_state, _, b, scale), rank in zip(projections, ranks):
                out = x @ dense_weight(w, quant_state, dt).t()
                out.addmm_(xa[:, start:start + rank], in_dtype(b, dt).t(), alpha=scale)
                outputs.append(out)
                start += rank
            if not compiling and keeps_for_recompute():
                keep_for_recompute(outputs)
        weights = [w for w, _, _, _, _ in projections]
        bs = [b for _, _, _, b, _ in projections]
        ctx.save_for_backward(x, xa, a_all, *weights, *bs)
        ctx.quant_states = [q for _, q, _, _, _ in projections]
        ctx.scales = [s for _, _, _, _, s in projections]
        ctx.ranks = ranks
        ctx.param_dtypes = [(a.dtype, b.dtype) for _, _, a, b, _ in projections]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *d_outs):
        x, xa, a_all, *rest = ctx.saved_tensors
        n = len(ctx.ranks)
        weights, bs = rest[:n], rest[n:]
        dt = x.dtype
        d_x = None
        # [dq @ B_q * s_q | dk @ B_k * s_k | ...], each block written by its scaled GEMM
        coef = x.new_empty(x.shape[0], sum(ctx.ranks))
        d_bs, start = [], 0
        for d_out, w, quant_state, b, scale, rank in zip(d_outs, weights, ctx.quant_states, bs, ctx.scales, ctx.ranks):
            d_out = d_out.contiguous()
            weight = dense_weight(w, quant_state, dt)
            # accumulate in place: no [tokens, in] temporary and add pass per projection
            d_x = d_out @ weight if d_x is None else d_x.addmm_(d_out, weight)
            del weight
            scaled_mm(d_out, in_dtype(b, dt), scale, out=coef[:, start:start + rank])
            d_bs.append(scaled_mm(d_out.t(), xa[:, start:start + rank], scale))
            start += rank
        d_x.addmm_(coef, a_all)  # every LoRA A term of dx in one matmul
        d_a_all = coef.t() @ x
        a_dtypes = {a_dtype for a_dtype, _ in ctx.param_dtypes}
        if len(a_dtypes) == 1:  # one cast for every A's gradient (each a row block of it)
            d_a_all = d_a_all.to(*a_dtypes)
        grads, start = [], 0
        for d_b, rank, (a_dtype, b_dtype) in zip(d_bs, ctx.ranks, ctx.param_dtypes):
            grads += [None, None, d_a_all[start:start + rank].to(a_dtype), d_b.to(b_dtype), None]
            start += rank
        return (d_x, *grads)


def fused_projections(layers, x: torch.Tensor):
    """The outputs of the LoRA ``layers`` (all reading ``x``) through
    :class:`LoRASharedInputFunction`, or ``None`` when any of them cannot take it."""
    parts = [lora_parts(layer) for layer in layers]
    if any(p is None for p in parts):
        return None
    flat = x.reshape(-1, x.shape[-1])
    outputs = LoRASharedInputFunction.apply(flat, *(item for p in parts for item in p))
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outputs]
