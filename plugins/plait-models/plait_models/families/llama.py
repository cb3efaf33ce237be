"""Llama 1/2/3.x (``model_type: llama``): the reference dense decoder.

The default chat template is Llama 3's; a Llama 2 checkpoint ships its own
template in the tokenizer, which wins over this default.
"""

from plait.families import ModelFamily

from ._common import ATTENTION_LINEARS, DENSE_ATTENTION_TP, DENSE_MLP_TP, LLAMA3, LLAMA3_TOKENS, MLP_LINEARS

FAMILY = ModelFamily(
    name="llama",
    model_types=("llama",),
    decoder_layer_class="LlamaDecoderLayer",
    lora_target_linear=ATTENTION_LINEARS + MLP_LINEARS,
    norm_class="LlamaRMSNorm",
    attention_class="LlamaAttention",
    mlp_class="LlamaMLP",
    mlp_activation="swiglu",
    mlp_output_feeds_residual=True,
    tp_plan={**DENSE_ATTENTION_TP, **DENSE_MLP_TP},
    default_chat_template=LLAMA3,
    end_of_turn_tokens=("<|eot_id|>",),
    chat_special_tokens=LLAMA3_TOKENS,
    # Llama 3 reserves a pad token; Llama 2 has <unk>
    pad_token_candidates=("<|finetune_right_pad_id|>", "<unk>"),
)
