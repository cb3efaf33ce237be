"""The fused LoRA MLP's stacked gate/up weight kept from call to call (``lora_mlp_fold``).

:mod:`plait_kernels.lora_mlp` multiplies ``[x | x A_g.T | x A_u.T]`` by the
stacked weight ``[[W_g, s_g B_g, 0], [W_u, 0, s_u B_u]]``. Built per call, that
weight is a copy of both frozen base weights, made in the forward, again in a
checkpoint's recompute and again in the backward: three writes and three
reads of ``2 * intermediate * hidden`` values a layer a step, and a
``[2 * intermediate, hidden + r_g + r_u]`` temporary alive at the backward's
peak (236 MB a layer at the 8B shape).

Here the stacked weight is one persistent buffer per MLP, made once when the
path is installed: the gate and up base layers' weights become views of its
first ``hidden`` columns (same values, dtype, shape and ``requires_grad``;
the old storage is freed, so the buffer costs only its ``r_g + r_u`` LoRA
columns more), and each call writes only those columns from peft's current
``B`` factors, a copy the size of the factors. peft's parameters, saved
adapters and merges are unchanged; a merge writes into the views.

The buffer is used while it still backs the weights (:meth:`StackedGateUp.backs`):
a ``param.data = ...`` elsewhere (a safe merge, a move to another device or
dtype), another rank or a compute dtype other than the weights' takes the
per-call build again, as does a ``torch.compile`` trace (the buffer is written
in place). Dense bases only: a 4-bit base is dequantized per use anyway, into
the per-call weight. Single-process runs by default: a sharding wrapper would
copy the weights out and leave the buffer holding a whole unsharded copy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

#: the attribute of a fused LoRA MLP holding its :class:`StackedGateUp`
FOLD_ATTRIBUTE = "stacked_gate_up"


class StackedGateUp:
    """The persistent ``[2 * inter, hidden + r_g + r_u]`` stacked weight of one
    MLP's gate and up projections (peft LoRA layers over dense frozen bases,
    ranks ``r_g`` and ``r_u`` of the active adapter when it was made)."""

    def __init__(self, gate_proj, up_proj, r_g: int, r_u: int):
        from plait_kernels.ops.stack import empty_gate_up

        w_g, w_u = gate_proj.base_layer.weight, up_proj.base_layer.weight
        inter, hidden = w_g.shape
        self.buffer = empty_gate_up(inter, hidden, r_g, r_u, w_g.dtype, w_g.device)
        with torch.no_grad():
            self.buffer[:inter, :hidden].copy_(w_g)
            self.buffer[inter:, :hidden].copy_(w_u)
        self.ranks = (r_g, r_u)
        gate_proj.base_layer.weight = nn.Parameter(self.buffer[:inter, :hidden], requires_grad=w_g.requires_grad)
        up_proj.base_layer.weight = nn.Parameter(self.buffer[inter:, :hidden], requires_grad=w_u.requires_grad)
        self.views = (gate_proj.base_layer.weight, up_proj.base_layer.weight)
        # what backs() compares, worked out once: it runs twice a layer a call
        self._fake = is_fake(self.buffer)
        self._where = tuple(_memory(view, self._fake) for view in self.views)

    def backs(self, w_g, w_u, b_g, b_u, dtype) -> bool:
        """Whether this call's gate/up weights are still the buffer's views, at
        the ranks and in the compute dtype it was made for."""
        view_g, view_u = self.views
        return (w_g is view_g and w_u is view_u and (b_g.shape[1], b_u.shape[1]) == self.ranks
                and w_g.dtype == dtype and w_u.dtype == dtype
                and (_memory(w_g, self._fake), _memory(w_u, self._fake)) == self._where
                and not torch.compiler.is_compiling())

    def with_factors(self, b_g, b_u, s_g: float, s_u: float) -> torch.Tensor:
        """The buffer with peft's current ``s B`` written into its LoRA columns."""
        from plait_kernels.ops.stack import fill_gate_up_

        return fill_gate_up_(self.buffer, b_g, b_u, s_g, s_u)


def _memory(weight, fake: bool) -> tuple:
    """Where ``weight``'s values are: ``param.data = ...`` (a safe merge, a move to
    another device or dtype) re-points a parameter without changing its identity.
    A fake tensor (bench/*_peak_cpu.py count on them) has no address: its offset
    and strides in a storage stand in."""
    where = weight.storage_offset() if fake else weight.data_ptr()
    return where, weight.stride(), weight.is_cuda


def foldable(mlp) -> str | None:
    """None when this fused LoRA MLP's gate/up can be folded, else why not."""
    from plait_kernels.lora_linear import lora_parts

    parts = [lora_parts(p) for p in (mlp.gate_proj, mlp.up_proj)]
    if any(p is None for p in parts):
        return "gate or up is not on the fused path (dropout in training, a bias, DoRA, several adapters)"
    (w_g, q_g, *_), (w_u, q_u, *_) = parts
    if q_g is not None or q_u is not None:
        return "a quantized base (dequantized per use)"
    if w_g.dtype != w_u.dtype or w_g.device != w_u.device or w_g.shape != w_u.shape:
        return "gate and up weights differ in dtype, device or shape"
    if not (w_g.is_contiguous() and w_u.is_contiguous()):
        return "a base weight that is not contiguous"
    return None


def fold_gate_up(mlp) -> StackedGateUp | None:
    """Make the persistent stacked weight of one fused LoRA MLP and keep it on
    the module; ``None`` (nothing changed) when :func:`foldable` says no."""
    if foldable(mlp) is not None:
        return None
    from plait_kernels.lora_linear import lora_parts

    r_g, r_u = (lora_parts(p)[3].shape[1] for p in (mlp.gate_proj, mlp.up_proj))
    folded = StackedGateUp(mlp.gate_proj, mlp.up_proj, r_g, r_u)
    setattr(mlp, FOLD_ATTRIBUTE, folded)
    return folded


def unfold_gate_up(model) -> int:
    """Give every folded MLP's gate and up weights their own contiguous storage
    again and drop the buffers; returns how many MLPs were unfolded.

    For saving a model in this process with transformers' ``save_pretrained``
    (after peft's ``merge_and_unload``, say): it refuses weights that share a
    storage without being contiguous. Plait's own saves do not need it: a run
    saves its adapter, and ``plait merge-lora`` loads the base afresh."""
    unfolded = 0
    for module in model.modules():
        folded = getattr(module, FOLD_ATTRIBUTE, None)
        if folded is None:
            continue
        buffer = folded.buffer
        for name in ("gate_proj", "up_proj"):
            linear = getattr(module, name)
            linear = getattr(linear, "base_layer", linear)  # a LoRA layer, or its base after an unload
            weight = linear.weight
            if weight.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=weight.requires_grad)
        delattr(module, FOLD_ATTRIBUTE)
        unfolded += 1
    return unfolded
