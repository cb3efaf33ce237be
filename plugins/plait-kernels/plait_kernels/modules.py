"""Drop-in modules that route a decoder's norm, MLP activation and rotary
embedding through a kernel backend.

Each replacement keeps the original parameters and submodules under the same
attribute names, so ``state_dict`` keys, peft adapters and checkpoints are
unchanged by patching.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class PlaitRMSNorm(nn.Module):
    """RMSNorm through a kernel backend; holds the replaced module's ``weight``.

    ``offset`` is 1.0 for Gemma-style norms that scale by ``1 + weight``.
    """

    def __init__(self, weight: nn.Parameter, eps: float, offset: float, rms_norm_fn, kernel_name: str):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset
        self._rms_norm = rms_norm_fn
        self.kernel_name = kernel_name

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        return self._rms_norm(hidden_states, self.weight, self.eps, self.offset, residual=residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, kernel={self.kernel_name}"


#: transformers' gated RMSNorm classes whose forward is exactly one of the two
#: orders :mod:`plait_kernels.ops.gated_rms_norm` computes: class name -> norm
#: before the gate. Plait supports transformers >=5.17,<6 and the names moved
#: between releases (5.17's Mamba-2 norm is ``MambaRMSNormGated``, 5.25's
#: ``Mamba2RMSNormGated``; NemotronH's arrived after 5.17), so the table lists
#: every release's name and a model only ever holds the ones its version has.
#: The gate-first ones normalise per ``module.group_size`` columns where the
#: module has that attribute (5.25's Mamba-2/NemotronH/Zamba2/Bamba/
#: GraniteMoeHybrid) and over the whole row where it has none (5.17's Bamba and
#: GraniteMoeHybrid): see :func:`gated_norm_group_size`.
#: ``tests/test_gated_rms_norm.py`` checks each one the installed version has.
GATED_NORM_CLASSES = {
    "Qwen3NextRMSNormGated": True,
    "Qwen3_5RMSNormGated": True,
    "Qwen3_5MoeRMSNormGated": True,
    "OlmoHybridRMSNormGated": True,
    "NemotronHRMSNormGated": False,
    "MambaRMSNormGated": False,
    "Mamba2RMSNormGated": False,
    "Zamba2RMSNormGated": False,
    "BambaRMSNormGated": False,
    "GraniteMoeHybridRMSNormGated": False,
}


def gated_norm_group_size(module: nn.Module) -> int | None:
    """The column group a gate-first norm normalises over: its ``group_size``
    when it has one, else its whole width (a gate-first norm without the
    attribute takes the mean over the last dimension); None for norm-then-gate."""
    if GATED_NORM_CLASSES[type(module).__name__]:
        return None
    group_size = getattr(module, "group_size", None)
    return int(group_size) if group_size is not None else int(module.weight.shape[-1])


class PlaitGatedRMSNorm(nn.Module):
    """A gated RMSNorm (``norm(x) * silu(gate)`` or ``norm(x * silu(gate))`` per
    group) through one kernel; holds the replaced module's ``weight``, and keeps
    its ``variance_epsilon`` and ``group_size`` names."""

    def __init__(self, weight: nn.Parameter, eps: float, group_size: int | None, norm_before_gate: bool,
                 gated_rms_norm_fn, kernel_name: str):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self._gated_rms_norm = gated_rms_norm_fn
        self.kernel_name = kernel_name

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return self._gated_rms_norm(hidden_states, gate, self.weight, self.variance_epsilon, self.group_size,
                                    self.norm_before_gate)

    def extra_repr(self) -> str:
        order = "norm, then gate" if self.norm_before_gate else f"gate, then norm per {self.group_size} columns"
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, {order}, kernel={self.kernel_name}"


class PlaitGLUMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the gated activation fused.

    Holds the replaced MLP's three projections (possibly peft LoRA layers).
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, glu_fn, kernel_name: str):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self._glu = glu_fn
        self.kernel_name = kernel_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._glu(self.gate_proj(x), self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_name}"


#: attention classes whose training forward is exactly the one below (checked
#: against transformers 5.x): q/k/v/o projections, rotate-half rotary, the
#: attention-function registry; Mistral/Qwen2/Qwen3 add a sliding window, Qwen3
#: per-head q/k norms; Qwen3-MoE's attention is Qwen 3's (the same source).
ROPE_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                          "Qwen3MoeAttention")

_rope_classes: dict[type, type] = {}


def rope_attention_class(base: type) -> type:
    """A subclass of attention class ``base`` whose forward rotates q and k with
    ``self._plait_rope`` (one kernel for both) instead of the library function.

    A subclass, not a wrapper: parameters keep their names and
    ``isinstance(module, base)`` stays true for FSDP/peft code that checks it.
    Calls with a KV cache (generation) go to the library's own forward.
    With ``_plait_lora_qkv`` / ``_plait_lora_o`` set (LoRA on the projections,
    Plait's kernels), q/k/v and o run through :mod:`plait_kernels.lora_linear`.
    """
    if base in _rope_classes:
        return _rope_classes[base]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, **kwargs):
        if past_key_values is not None or cache is not None or position_embeddings is None:
            kw = {"past_key_values": past_key_values} if past_key_values is not None else {}
            if cache is not None:
                kw["cache"] = cache
            return base.forward(self, hidden_states, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, **kw, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from plait_kernels.lora_linear import fused_projections

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        qkv = None
        if getattr(self, "_plait_lora_qkv", False):  # one pass over hidden_states for the three LoRA A's
            qkv = fused_projections((self.q_proj, self.k_proj, self.v_proj), hidden_states)
        if qkv is None:
            qkv = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        query, key, value = (t.view(hidden_shape) for t in qkv)
        if hasattr(self, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self._plait_rope(query, key, cos, sin)

        implementation = self.config._attn_implementation
        if implementation in (None, "eager"):
            attention = sys.modules[base.__module__].eager_attention_forward
        else:
            attention = ALL_ATTENTION_FUNCTIONS[implementation]
        window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        if window is not None:
            kwargs["sliding_window"] = window
        output, weights = attention(self, query, key, value, attention_mask,
                                    dropout=0.0 if not self.training else self.attention_dropout,
                                    scaling=self.scaling, **kwargs)
        output = output.reshape(*input_shape, -1).contiguous()
        projected = fused_projections((self.o_proj,), output) if getattr(self, "_plait_lora_o", False) else None
        return (projected[0] if projected is not None else self.o_proj(output)), weights

    cls = type(f"Plait{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    _rope_classes[base] = cls
    return cls
