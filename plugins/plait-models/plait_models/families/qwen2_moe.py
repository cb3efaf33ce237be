"""Qwen 1.5/2 MoE (``model_type: qwen2_moe``).

A sparse layer's ``mlp`` holds the router ``mlp.gate``, fused experts
``mlp.experts.{gate_up_proj,down_proj}`` (3D parameters, see :mod:`.mixtral`),
a dense shared expert ``mlp.shared_expert`` (a ``Qwen2MoeMLP``: LoRA and TP
targets) and ``mlp.shared_expert_gate`` (a 1-output gate: not a target).
LoRA targets and the TP plan name only modules every sparse layer has (the
released checkpoints are sparse in every layer): a target list naming modules
a model lacks is an error for the adapter plugin. Dense layers from
``config.mlp_only_layers`` are therefore not in ``lora_target_linear``;
``describe_optimisations`` says so when a model has them.
"""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, CHATML, CHATML_TOKENS, DENSE_ATTENTION_TP

SHARED_EXPERT = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")

FAMILY = ModelFamily(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    decoder_layer_class="Qwen2MoeDecoderLayer",
    lora_target_linear=ATTENTION_LINEARS + SHARED_EXPERT,
    norm_class="Qwen2MoeRMSNorm",
    attention_class="Qwen2MoeAttention",
    mlp_class="Qwen2MoeMLP",
    mlp_activation="swiglu",
    tp_plan={
        **DENSE_ATTENTION_TP,
        "mlp.shared_expert.gate_proj": "colwise",
        "mlp.shared_expert.up_proj": "colwise",
        "mlp.shared_expert.down_proj": "rowwise",
    },
    default_chat_template=CHATML,
    end_of_turn_tokens=("<|im_end|>",),
    chat_special_tokens=CHATML_TOKENS,
    pad_token_candidates=("<|endoftext|>",),
    router_aux_loss_coef_key="router_aux_loss_coef",
    is_moe=True,
    expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
)
