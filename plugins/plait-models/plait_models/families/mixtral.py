"""Mixtral (``model_type: mixtral``): Mistral attention, sparse MoE MLP.

In transformers 5 the block is ``mlp`` (``MixtralSparseMoeBlock``): ``mlp.gate``
is the router (a ``MixtralTopKRouter`` holding a plain weight, never a LoRA
target), and ``mlp.experts`` stores every expert fused in two 3D parameters,
``gate_up_proj [experts, 2*inter, hidden]`` and ``down_proj [experts, hidden, inter]``.
They are not ``nn.Linear``, so ``lora_target_linear`` cannot reach them; with
``lora_target_experts: true`` peft adapts them through ``target_parameters``.
Under tensor parallel the experts stay replicated (the plan covers attention).
"""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, DENSE_ATTENTION_TP, MISTRAL, MISTRAL_TOKENS

FAMILY = ModelFamily(
    name="mixtral",
    model_types=("mixtral",),
    decoder_layer_class="MixtralDecoderLayer",
    lora_target_linear=ATTENTION_LINEARS,
    norm_class="MixtralRMSNorm",
    # no per-expert MLP module to swap: experts are fused parameters
    attention_class="MixtralAttention",
    mlp_class=None,
    mlp_activation="swiglu",
    tp_plan=dict(DENSE_ATTENTION_TP),
    default_chat_template=MISTRAL,
    end_of_turn_tokens=MISTRAL_TOKENS,
    chat_special_tokens=MISTRAL_TOKENS,
    pad_token_candidates=("<pad>", "<unk>"),
    router_aux_loss_coef_key="router_aux_loss_coef",
    is_moe=True,
    expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
)
