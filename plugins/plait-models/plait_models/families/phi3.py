"""Phi-3 / Phi-3.5 / Phi-4-mini (``model_type: phi3``).

Phi-3 fuses its projections: ``self_attn.qkv_proj`` (q, k, v stacked) and
``mlp.gate_up_proj`` (gate, up stacked; the MLP chunks it in that order).
LoRA targets the fused linears. The TP plan is empty: a plain column split of a
fused weight hands each rank a slice of q *or* of k, and the model's own
slicing then reads the wrong rows (transformers gathers those outputs instead,
which saves no memory), so Plait runs phi3 without tensor parallel.
"""

from plait.families import ModelFamily

from ._common import PHI3, PHI3_TOKENS

FAMILY = ModelFamily(
    name="phi3",
    model_types=("phi3",),
    decoder_layer_class="Phi3DecoderLayer",
    lora_target_linear=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    norm_class="Phi3RMSNorm",
    attention_class="Phi3Attention",
    mlp_class="Phi3MLP",
    # swiglu over ONE fused gate_up_proj (first half gate, second half up): a
    # kernel written for separate gate_proj/up_proj must not take this MLP
    mlp_activation="swiglu_fused",
    tp_plan={},
    default_chat_template=PHI3,
    end_of_turn_tokens=("<|end|>",),
    chat_special_tokens=PHI3_TOKENS,
    pad_token_candidates=("<unk>",),
)
