"""Qwen 3 MoE (``model_type: qwen3_moe``): Qwen 3 attention (per-head q/k
norms), sparse MLP without a shared expert.

``mlp.gate`` is the router; experts are fused 3D parameters (see
:mod:`.mixtral`). Dense layers from ``config.mlp_only_layers`` (a
``Qwen3MoeMLP``; none in the released checkpoints) are not LoRA targets,
for the reason given in :mod:`.qwen2_moe`.
"""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, CHATML, CHATML_TOKENS, DENSE_ATTENTION_TP

FAMILY = ModelFamily(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    decoder_layer_class="Qwen3MoeDecoderLayer",
    lora_target_linear=ATTENTION_LINEARS,
    norm_class="Qwen3MoeRMSNorm",
    # Qwen3MoeMLP exists only in mlp_only_layers (none in released checkpoints)
    attention_class="Qwen3MoeAttention",
    mlp_class=None,
    mlp_activation="swiglu",
    tp_plan=dict(DENSE_ATTENTION_TP),
    default_chat_template=CHATML,
    end_of_turn_tokens=("<|im_end|>",),
    chat_special_tokens=CHATML_TOKENS,
    pad_token_candidates=("<|endoftext|>",),
    router_aux_loss_coef_key="router_aux_loss_coef",
    is_moe=True,
    expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
)
